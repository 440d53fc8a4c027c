//! What a serve loop needs to give its idle HTTP/1 connections up to the
//! next generation, and to take over those the previous one gave up. The
//! drain half gives a connection up; carrying it is the hand-over half's
//! (see [`Host`](super::Host)).

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

/// A connection given up by one generation for the next: its socket, the
/// bytes read from it and not parsed yet (a request head half sent, say),
/// and what its handshake learned that the socket does not tell (see
/// [`Handshake::give_up`](super::Handshake::give_up)).
#[derive(Debug)]
pub(crate) struct Moved {
    pub(crate) fd: OwnedFd,
    pub(crate) unread: Bytes,
    pub(crate) learned: Vec<u8>,
}

/// What became of a connection given up.
#[derive(Debug)]
pub(crate) enum Carried {
    /// The next generation owns it.
    Taken,
    /// The next generation did not take it: it is this one's again, and
    /// drained as any other.
    Refused(Moved),
    /// Lost on the way: closed.
    Lost,
}

/// Hands a connection to the next generation: resolves once it owns it,
/// or it is back.
pub(crate) type GiveUp =
    Arc<dyn Fn(Moved) -> Pin<Box<dyn Future<Output = Carried> + Send>> + Send + Sync>;

/// How one serve loop's connections move between generations.
pub struct Moves {
    /// The connections of this loop's listener that the previous
    /// generation gave up, until it has given up the last.
    pub(crate) incoming: Option<mpsc::UnboundedReceiver<Moved>>,
    /// Where this loop gives connections up, when its drain gives them up.
    pub(crate) give_up: Option<GiveUp>,
}

impl Moves {
    /// Nothing moves.
    pub(crate) fn none() -> Self {
        Self {
            incoming: None,
            give_up: None,
        }
    }
}

impl std::fmt::Debug for Moves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moves")
            .field("incoming", &self.incoming.is_some())
            .field("give_up", &self.give_up.is_some())
            .finish()
    }
}
