//! Party logic as plain data: who is in the party, who hosts it, which addresses they have.
//! No sockets, no clocks: [`engine::Engine`] takes time and messages and returns actions.
//!
//! - [`engine`]: the state machine (join, roster, liveness, succession);
//! - [`merge`]: two hosts of one party after a split, checked and merged;
//! - [`admission`]: password budgets for joiners;
//! - [`ipam`]: virtual addresses; [`password`]: verifiers.

pub mod admission;
#[cfg(test)]
mod auth_tests;
pub mod engine;
pub mod ipam;
pub mod merge;
pub mod password;
#[cfg(test)]
mod sim;

pub use engine::{
    Action, Engine, EngineConfig, EngineError, JoinError, JoinTarget, PeerSpec, SavedHost,
    SavedParty,
};
