//! What each connection is doing, for the drain and for the slowloris
//! watchdog: its requests in progress and started, counted in one atomic
//! operation each way.
//!
//! The watchdog closes an HTTP/1 connection that has not sent a whole
//! request head within the header read timeout, as hyper's own
//! `header_read_timeout` does, but without a timer per request: one task per
//! serve loop looks at every connection a few times per timeout. hyper's
//! timer costs an allocation and a timer wheel entry for every request
//! (about 6% of a keep-alive hello-world server's throughput on the
//! development machine); this costs nothing per request beyond the count
//! the drain needs anyway.

use std::collections::HashMap;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::graceful::poll_registered;

/// One in progress, in the low half of the word.
const ONE_IN_PROGRESS: u64 = 1;
/// One started, in the high half.
const ONE_STARTED: u64 = 1 << 32;
const IN_PROGRESS: u64 = ONE_STARTED - 1;

/// How many looks, one every `timeout / LOOKS`, a connection must be seen
/// waiting for a request head with no request started in between before
/// it is closed: it is closed between the timeout and a quarter more.
const LOOKS: u32 = 4;

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
    fn look(&self) -> bool {
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

    fn expire(&self) {
        self.expired.store(true, Ordering::SeqCst);
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.wake();
        }
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
                *busy.task.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(cx.waker().clone());
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

/// The connections of one serve loop that the watchdog looks at.
#[derive(Default)]
pub(super) struct Watched {
    connections: Mutex<Connections>,
}

#[derive(Default)]
struct Connections {
    next: u64,
    live: HashMap<u64, Weak<Busy>>,
}

/// A connection's place among the watched, given up on drop.
pub(super) struct WatchedEntry {
    watched: Arc<Watched>,
    id: u64,
}

impl Drop for WatchedEntry {
    fn drop(&mut self) {
        self.watched.lock().live.remove(&self.id);
    }
}

impl Watched {
    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches `busy` until the returned entry is dropped.
    pub(super) fn watch(self: &Arc<Self>, busy: &Arc<Busy>) -> WatchedEntry {
        let mut connections = self.lock();
        let id = connections.next;
        connections.next += 1;
        connections.live.insert(id, Arc::downgrade(busy));
        WatchedEntry {
            watched: self.clone(),
            id,
        }
    }

    /// Looks at every connection once, expiring those that have waited
    /// for a request head through `LOOKS` periods.
    fn look_at_all(&self) {
        let connections: Vec<Arc<Busy>> = self
            .lock()
            .live
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for busy in connections {
            if busy.look() {
                busy.expire();
            }
        }
    }

    /// Starts looking at every connection `LOOKS` times per `timeout`, on
    /// a thread of its own, until the returned handle is dropped.
    ///
    /// A thread rather than a task on a tokio timer: while a tokio runtime
    /// has a timer, every time a worker parks it reads the clock and looks
    /// for the next expiration (about 270 instructions per request of a
    /// sequential client, on the development machine, where a server with
    /// no timer at all, such as `axum::serve`, spends none).
    pub(super) fn start(self: Arc<Self>, timeout: Duration) -> std::io::Result<Watchdog> {
        let period = (timeout / LOOKS).max(Duration::from_millis(1));
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("handover-watchdog".into())
                .spawn(move || {
                    let (stopped, wake) = &*stop;
                    let mut next = Instant::now() + period;
                    let mut stopped = stopped.lock().unwrap_or_else(PoisonError::into_inner);
                    loop {
                        let now = Instant::now();
                        if *stopped {
                            return;
                        }
                        if now < next {
                            stopped = wake
                                .wait_timeout(stopped, next - now)
                                .unwrap_or_else(PoisonError::into_inner)
                                .0;
                            continue;
                        }
                        next += period;
                        self.look_at_all();
                    }
                })?
        };
        Ok(Watchdog {
            stop,
            thread: Some(thread),
        })
    }
}

/// The watchdog's thread; stopped when dropped.
pub(super) struct Watchdog {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (stopped, wake) = &*self.stop;
        *stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        // It returns at once: woken, it sees the flag before looking again.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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

    #[tokio::test]
    async fn the_watchdog_wakes_and_expires_only_the_stale_connection() {
        const TIMEOUT: Duration = Duration::from_millis(400);
        let watched = Arc::new(Watched::default());
        let stale = Arc::new(Busy::default());
        let active = Arc::new(Busy::default());
        let entries = (watched.watch(&stale), watched.watch(&active));
        let watchdog = watched.clone().start(TIMEOUT).unwrap();
        let keep_busy = {
            let active = active.clone();
            tokio::spawn(async move {
                loop {
                    drop(active.start());
                    tokio::time::sleep(TIMEOUT / 8).await;
                }
            })
        };
        let started = std::time::Instant::now();
        tokio::time::timeout(TIMEOUT * 20, stale.expired())
            .await
            .expect("the stale connection expires");
        let waited = started.elapsed();
        assert!(waited >= TIMEOUT, "expired after {waited:?}");
        assert!(!active.expired.load(Ordering::SeqCst));
        keep_busy.abort();
        drop(watchdog);
        drop(entries);
        assert!(watched.lock().live.is_empty());
    }
}
