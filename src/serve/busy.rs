//! What each connection is doing, for the drain and for the slowloris
//! watchdog: its requests in progress and started, counted in one atomic
//! operation each way.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::drain::poll_registered;
use crate::lock::lock;

/// One in progress, in the low half of the word.
const ONE_IN_PROGRESS: u64 = 1;
/// One started, in the high half.
const ONE_STARTED: u64 = 1 << 32;
const IN_PROGRESS: u64 = ONE_STARTED - 1;

/// How many looks, one every `timeout / LOOKS`, a connection must be seen
/// waiting for a request head with no request started in between before
/// it is closed: it is closed between the timeout and a quarter more.
pub(super) const LOOKS: u32 = 4;

/// One connection's requests, and what the watchdog knows of it.
pub(super) struct Busy {
    /// Requests in progress (low 32 bits) and started (high 32 bits,
    /// wrapping).
    count: AtomicU64,
    /// An extended CONNECT (RFC 8441) was answered with 2xx: hyper handed
    /// the stream to the handler, and it may stay open as long as the
    /// handler keeps it.
    pub(super) tunnels: AtomicBool,
    /// Someone waits in [`idle`](Busy::idle): a release to zero wakes it.
    /// Only then, so that the common release costs no lock.
    watched: AtomicBool,
    became_idle: tokio::sync::Notify,
    /// The watchdog's: the count at its last look, and how many looks in a
    /// row found the connection waiting with no request started.
    last_look: AtomicU64,
    idle_looks: AtomicU32,
    /// Set by the watchdog: no request head came in time.
    expired: AtomicBool,
    /// Not watched (an HTTP/2 connection, whose clients may stay idle).
    exempt: AtomicBool,
    /// The connection's task, woken when it expires.
    task: Mutex<Option<Waker>>,
}

/// One request in progress on a connection, until dropped.
pub(super) struct BusyGuard(pub(super) Arc<Busy>);

impl Default for Busy {
    fn default() -> Self {
        Self {
            count: AtomicU64::new(0),
            tunnels: AtomicBool::new(false),
            watched: AtomicBool::new(false),
            became_idle: tokio::sync::Notify::new(),
            // No count: the first look only notes the count.
            last_look: AtomicU64::new(u64::MAX),
            idle_looks: AtomicU32::new(0),
            expired: AtomicBool::new(false),
            exempt: AtomicBool::new(false),
            task: Mutex::new(None),
        }
    }
}

impl Busy {
    /// How many requests have started on the connection (wrapping).
    pub(super) fn started(&self) -> u32 {
        (self.count.load(Ordering::SeqCst) >> 32) as u32
    }

    pub(super) fn is_idle(&self) -> bool {
        self.count.load(Ordering::SeqCst) & IN_PROGRESS == 0
    }

    /// Counts a request in, until the guard is dropped.
    #[inline]
    pub(super) fn start(self: &Arc<Self>) -> BusyGuard {
        self.count
            .fetch_add(ONE_IN_PROGRESS + ONE_STARTED, Ordering::SeqCst);
        BusyGuard(self.clone())
    }

    /// Resolves when no request is in progress.
    pub(super) async fn idle(&self) {
        self.watched.store(true, Ordering::SeqCst);
        loop {
            let notified = self.became_idle.notified();
            let mut notified = pin!(notified);
            // Registered before the count is read: a release in between
            // still wakes us.
            notified.as_mut().enable();
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }

    /// Stops the watchdog from looking at this connection.
    pub(super) fn exempt(&self) {
        self.exempt.store(true, Ordering::SeqCst);
    }

    /// The watchdog's look: whether the connection has now waited for a
    /// request head, with none started, through `LOOKS` whole periods
    /// between looks (the waiting began at the earliest just after the
    /// look that last saw something change).
    pub(super) fn look(&self) -> bool {
        if self.exempt.load(Ordering::SeqCst) {
            return false;
        }
        let now = self.count.load(Ordering::SeqCst);
        let before = self.last_look.swap(now, Ordering::SeqCst);
        if now & IN_PROGRESS != 0 || now != before {
            self.idle_looks.store(0, Ordering::SeqCst);
            return false;
        }
        self.idle_looks.fetch_add(1, Ordering::SeqCst) + 1 >= LOOKS
    }

    pub(super) fn expire(&self) {
        self.expired.store(true, Ordering::SeqCst);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            task.wake();
        }
    }

    /// Whether the watchdog has expired this connection.
    #[cfg(test)]
    pub(super) fn is_expired(&self) -> bool {
        self.expired.load(Ordering::SeqCst)
    }

    /// Resolves once the watchdog has expired this connection.
    pub(super) fn expired(self: &Arc<Self>) -> Expired {
        Expired {
            busy: self.clone(),
            registered: None,
        }
    }
}

impl Drop for BusyGuard {
    #[inline]
    fn drop(&mut self) {
        let busy = &*self.0;
        let before = busy.count.fetch_sub(ONE_IN_PROGRESS, Ordering::SeqCst);
        if before & IN_PROGRESS == 1 && busy.watched.load(Ordering::SeqCst) {
            busy.became_idle.notify_waiters();
        }
    }
}

/// See [`Busy::expired`]. A poll costs one atomic load unless the task's
/// waker has changed since the last one.
pub(super) struct Expired {
    busy: Arc<Busy>,
    registered: Option<Waker>,
}

impl Future for Expired {
    type Output = ();

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Expired { busy, registered } = &mut *self;
        poll_registered(
            registered,
            cx,
            || busy.expired.load(Ordering::SeqCst),
            |cx| {
                *lock(&busy.task) = Some(cx.waker().clone());
                // Expired while the waker was being stored: it may have
                // taken the one stored before.
                if busy.expired.load(Ordering::SeqCst) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_word_counts_requests_in_progress_and_started() {
        let busy = Arc::new(Busy::default());
        assert!(busy.is_idle());
        let first = busy.start();
        let second = busy.start();
        assert!(!busy.is_idle());
        drop(first);
        assert!(!busy.is_idle());
        drop(second);
        assert!(busy.is_idle());
        assert_eq!(busy.count.load(Ordering::SeqCst) >> 32, 2);
    }

    #[test]
    fn a_connection_waiting_through_four_looks_expires_and_one_that_works_does_not() {
        let waiting = Arc::new(Busy::default());
        let working = Arc::new(Busy::default());
        let exempt = Arc::new(Busy::default());
        exempt.exempt();
        // The first look only notes the count.
        for look in 0..LOOKS {
            assert!(!waiting.look(), "look {look}");
            drop(working.start());
            assert!(!working.look());
            assert!(!exempt.look());
        }
        assert!(waiting.look(), "a whole timeout without a request head");
        // A request in progress for a long time is not waiting for a head.
        let long = working.start();
        for _ in 0..2 * LOOKS {
            assert!(!working.look());
        }
        drop(long);
    }
}
