//! [`DrainReport`]: how a drain ended.

use std::fmt;
use std::time::Duration;

use crate::log::Ms;

/// How a drain ended: what finished in time and what had to be forced.
///
/// "Finished" counts the requests and connections that ended after the drain
/// started, including ones that arrived during it; "forced" counts those
/// still running when the deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DrainReport {
    /// Requests (with their response bodies) that ended during the drain.
    pub requests_finished: usize,
    /// Requests still in flight when the deadline passed.
    pub requests_forced: usize,
    /// Connections that closed during the drain.
    pub connections_finished: usize,
    /// Connections still open when the deadline passed, closed by force.
    pub connections_forced: usize,
    /// Upgraded connections (WebSocket) that closed during the drain.
    pub upgraded_finished: usize,
    /// Upgraded connections still open when the close grace passed, forced
    /// (with, under [`serve`](crate::serve()), HTTP/2 connections closed then
    /// for the WebSockets they carried).
    pub upgraded_forced: usize,
    /// Connections given up to the next generation, which serves them on
    /// (plaintext HTTP/1 on a hand-over): neither finished nor forced, and
    /// their clients saw nothing.
    pub connections_handed_over: usize,
    /// Time from the start of the drain to its end.
    pub elapsed: Duration,
}

impl DrainReport {
    /// What the metrics record of it.
    pub(crate) fn counts(&self) -> crate::metrics::Drained {
        crate::metrics::Drained {
            counts: [
                (self.requests_finished, self.requests_forced),
                (self.connections_finished, self.connections_forced),
                (self.upgraded_finished, self.upgraded_forced),
            ],
            handed_over: self.connections_handed_over,
        }
    }

    /// `true` when nothing had to be forced.
    pub fn is_clean(&self) -> bool {
        self.requests_forced == 0 && self.connections_forced == 0 && self.upgraded_forced == 0
    }
}

impl fmt::Display for DrainReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "drained in {} ms: {} requests, {} connections and {} upgraded finished, {} requests, {} connections and {} upgraded forced, {} connections handed over",
            Ms(self.elapsed),
            self.requests_finished,
            self.connections_finished,
            self.upgraded_finished,
            self.requests_forced,
            self.connections_forced,
            self.upgraded_forced,
            self.connections_handed_over,
        )
    }
}
