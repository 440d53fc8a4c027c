//! What holds a request, a connection or an upgraded connection in the
//! counts until it is dropped.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio_util::sync::WaitForCancellationFutureOwned;

use super::Shared;
use super::count::Counted;

/// Something the close grace can force: an upgraded connection's IO.
pub(crate) trait Force: Send + Sync {
    /// Makes the connection fail from now on, waking whoever waits on it.
    fn force(&self);
}

/// Holds one request in the count; released on drop (one pointer).
pub(crate) struct RequestGuard {
    request: Counted,
}

impl RequestGuard {
    pub(super) fn new(request: Counted) -> Self {
        Self { request }
    }

    #[inline]
    pub(crate) fn is_draining(&self) -> bool {
        self.request.is_draining()
    }

    /// Whether the drain gives connections up to the next generation.
    #[inline]
    pub(crate) fn gives_up(&self) -> bool {
        self.request.gives_up()
    }

    /// Resolves when the close grace has passed.
    pub(crate) fn closing(&self) -> WaitForCancellationFutureOwned {
        self.request.closing()
    }
}

/// Counts one open connection on a [`Graceful`](crate::Graceful) until it
/// is dropped.
///
/// Made by [`Graceful::connection_token`](crate::Graceful::connection_token).
/// Move it into the task that serves the connection, so that the count
/// falls when the task ends, however it ends.
pub struct ConnectionToken {
    shared: Arc<Shared>,
    /// Counts as finished when dropped (not when the close grace forced it).
    finished: bool,
}

impl ConnectionToken {
    pub(super) fn new(shared: &Arc<Shared>) -> Self {
        shared.connections.active.fetch_add(1, Ordering::SeqCst);
        Self {
            shared: shared.clone(),
            finished: true,
        }
    }

    /// Releases the connection as one given up to the next generation: it
    /// counts as handed over in the report, not as finished.
    pub(crate) fn handed_over(mut self) {
        // Counted before the release, which may end the drain.
        self.shared.handed_over.fetch_add(1, Ordering::SeqCst);
        self.finished = false;
    }

    /// Releases the connection as one the close grace forced for the
    /// WebSockets it carried (over HTTP/2): it counts as upgraded and
    /// forced in the report, not as a finished connection.
    pub(crate) fn forced_at_close_grace(mut self) {
        // Past the deadline, the drain has counted what was left itself.
        if self.shared.force.is_cancelled() {
            return;
        }
        // Counted before the release, which may end the drain.
        self.shared.upgraded_forced.fetch_add(1, Ordering::SeqCst);
        self.finished = false;
    }
}

impl Drop for ConnectionToken {
    fn drop(&mut self) {
        self.shared.settle(&self.shared.connections, self.finished);
    }
}

impl fmt::Debug for ConnectionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionToken").finish_non_exhaustive()
    }
}

/// Counts one upgraded connection (a WebSocket, say) on a
/// [`Graceful`](crate::Graceful) until it is dropped.
///
/// Made by [`DrainSignal::track_upgrade`](crate::DrainSignal::track_upgrade)
/// or [`Graceful::upgrade_token`](crate::Graceful::upgrade_token). Move it
/// into the task that serves the upgraded connection. When the close grace
/// passes with the token still alive, the connection counts as forced and
/// the drain stops waiting for it.
///
/// [`serve`](crate::serve()) tracks upgraded connections by itself, and can
/// also force their IO; tokens are for other servers.
pub struct UpgradeToken {
    shared: Arc<Shared>,
    /// `None` when this token counts nothing (tracked elsewhere, or forced
    /// at once because the close grace had passed).
    id: Option<u64>,
}

impl UpgradeToken {
    pub(super) fn new(shared: &Arc<Shared>, force: Option<Weak<dyn Force>>) -> Self {
        let mut upgrades = shared.upgrades();
        let id = upgrades.next_id;
        upgrades.next_id += 1;
        if upgrades.closed {
            drop(upgrades);
            log!(debug, "upgraded after the close grace; forced at once");
            shared.force_upgraded(force);
            return Self::untracked(shared);
        }
        shared.upgraded.active.fetch_add(1, Ordering::SeqCst);
        upgrades.live.insert(id, force);
        Self {
            shared: shared.clone(),
            id: Some(id),
        }
    }

    pub(super) fn untracked(shared: &Arc<Shared>) -> Self {
        Self {
            shared: shared.clone(),
            id: None,
        }
    }
}

impl Drop for UpgradeToken {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        // Absent when the close grace took it (and counted it as forced).
        let live = self.shared.upgrades().live.remove(&id).is_some();
        if live {
            self.shared.release(&self.shared.upgraded);
        }
    }
}

impl fmt::Debug for UpgradeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpgradeToken")
            .field("tracked", &self.id.is_some())
            .finish_non_exhaustive()
    }
}

/// Keeps a drain from ending until dropped, counting nothing: made by
/// `Graceful::hold`.
pub(crate) struct Hold {
    shared: Arc<Shared>,
}

impl Hold {
    pub(super) fn new(shared: &Arc<Shared>) -> Self {
        shared.holds.fetch_add(1, Ordering::SeqCst);
        Self {
            shared: shared.clone(),
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        // As `Shared::settle`: the decrement first, then the flag.
        let previous = self.shared.holds.fetch_sub(1, Ordering::SeqCst);
        if previous == 1 && self.shared.is_draining() {
            self.shared.requests.idle().notify_waiters();
        }
    }
}
