//! The slowloris watchdog: closes an HTTP/1 connection that has not sent a
//! whole request head within the header read timeout, as hyper's own
//! `header_read_timeout` does, but without a timer per request: one thread
//! per serve loop looks at every connection a few times per timeout.
//
// Internal: hyper's timer costs an allocation and a timer wheel entry for
// every request; this costs nothing per request beyond the count the drain
// needs anyway (the benchmarks' README has the figures).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::busy::{Busy, LOOKS};
use crate::lock::lock;

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
    fn lock(&self) -> MutexGuard<'_, Connections> {
        lock(&self.connections)
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
    // Internal: a thread rather than a task on a tokio timer: while a tokio
    // runtime has a timer, every time a worker parks it reads the clock and
    // looks for the next expiration, which a server with no timer at all,
    // such as `axum::serve`, does not pay.
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
                    let mut stopped = lock(stopped);
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
        *lock(stopped) = true;
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
        assert!(!active.is_expired());
        keep_busy.abort();
        drop(watchdog);
        drop(entries);
        assert!(watched.lock().live.is_empty());
    }
}
