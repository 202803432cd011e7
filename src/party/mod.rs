//! Party logic as plain data: who is in the party, who hosts it, which addresses they have.
//! No sockets, no clocks: [`engine::Engine`] takes time and messages and returns actions.

pub mod engine;
pub mod ipam;
pub mod password;

pub use engine::{
    Action, Engine, EngineConfig, EngineError, JoinError, JoinTarget, PeerSpec, SavedHost,
    SavedParty,
};
