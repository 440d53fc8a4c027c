//! What crosses `exec` from one generation to the next, read and written
//! in one place: the environment variables ([`env`]), the listeners they
//! name ([`Listeners`]), the readiness channel's messages, the connections
//! channel's, and the message that wakes a standby.
//!
//! Part of the hand-over half.

mod address;
mod adopt;
pub(crate) mod channel;
pub(crate) mod connections;
pub mod env;
mod listeners;
pub(crate) mod standby;

pub use listeners::Listeners;

/// The most state a generation takes from the previous one unless told
/// otherwise: 1 MiB.
pub(crate) const DEFAULT_MAX_STATE_SIZE: usize = 1 << 20;
