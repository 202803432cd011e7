//! The path layer: where packets for each peer go (direct or through a relay).

mod stub;
pub use stub::*;
pub mod vaddr;
