//! The count of in-flight requests and the drain flag, in one word.
//!
//! A release learns in the same atomic step whether it ended during the
//! drain (and must be reported) and whether it was the last one (and must
//! wake the drain). The word sits beside the value it counts for, in an
//! `Arc` that every counted reference holds: a request costs the count's
//! atomic operation each way, plus the `Arc`'s.
//!
//! This replaced a counter that was its own reference count (raw pointers,
//! a packed word of counts and holders, a free on the last release), which
//! saved the `Arc`'s two operations per request. Measured end to end with
//! `cargo bench --bench serve`'s servers, the two could not be told apart
//! (see the README's Performance section), so the safe one stays.

use std::ops::Deref;
use std::process::abort;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const DRAINING: u64 = 1 << 63;
const COUNT_MASK: u64 = DRAINING - 1;
/// More counted references than this is a leak (`mem::forget` in a loop):
/// abort, as `Arc` does, long before the count could reach the flag.
const MAX_COUNT: u64 = 1 << 62;

/// What the counted value does when one of its references is released
/// during a drain.
pub(crate) trait ReleasedInDrain: Send + Sync {
    /// One counted reference was released while draining; `now_zero` when
    /// it was the last one.
    fn released_in_drain(&self, now_zero: bool);
}

struct Inner<T> {
    /// Counted references (the low 63 bits) and `DRAINING`.
    word: AtomicU64,
    value: T,
}

/// The owning handle: counts nothing itself, hands out [`Counted`]
/// references, and starts the drain.
pub(crate) struct Owner<T: ReleasedInDrain> {
    inner: Arc<Inner<T>>,
}

/// One counted reference (one request in flight). Released on drop.
pub(crate) struct Counted<T: ReleasedInDrain> {
    inner: Arc<Inner<T>>,
}

impl<T: ReleasedInDrain> Owner<T> {
    /// A new count of zero for `value`.
    pub(crate) fn new(value: T) -> Self {
        Self {
            inner: Arc::new(Inner {
                word: AtomicU64::new(0),
                value,
            }),
        }
    }

    /// Counts one more reference.
    #[inline]
    pub(crate) fn count_one(&self) -> Counted<T> {
        let previous = self.inner.word.fetch_add(1, Ordering::SeqCst);
        if previous & COUNT_MASK >= MAX_COUNT {
            abort();
        }
        Counted {
            inner: self.inner.clone(),
        }
    }

    /// How many counted references are alive.
    pub(crate) fn count(&self) -> usize {
        (self.inner.word.load(Ordering::SeqCst) & COUNT_MASK) as usize
    }

    /// Starts draining: from now on every release reports itself through
    /// [`ReleasedInDrain`]. Returns whether it had started already.
    pub(crate) fn start_draining(&self) -> bool {
        self.inner.word.fetch_or(DRAINING, Ordering::SeqCst) & DRAINING != 0
    }
}

impl<T: ReleasedInDrain> Deref for Owner<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner.value
    }
}

impl<T: ReleasedInDrain> Counted<T> {
    /// Whether the drain has started.
    #[inline]
    pub(crate) fn is_draining(&self) -> bool {
        self.inner.word.load(Ordering::SeqCst) & DRAINING != 0
    }
}

impl<T: ReleasedInDrain> Deref for Counted<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner.value
    }
}

impl<T: ReleasedInDrain> Drop for Counted<T> {
    #[inline]
    fn drop(&mut self) {
        let previous = self.inner.word.fetch_sub(1, Ordering::SeqCst);
        if previous & DRAINING != 0 {
            released_in_drain(&self.inner.value, previous & COUNT_MASK == 1);
        }
    }
}

/// The rest of a release once draining, out of the hot path.
#[cold]
#[inline(never)]
fn released_in_drain<T: ReleasedInDrain>(value: &T, now_zero: bool) {
    value.released_in_drain(now_zero);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    struct Log {
        released: AtomicUsize,
        zeros: AtomicUsize,
        dropped: Arc<AtomicUsize>,
    }

    impl ReleasedInDrain for Log {
        fn released_in_drain(&self, now_zero: bool) {
            self.released.fetch_add(1, Ordering::SeqCst);
            if now_zero {
                self.zeros.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    impl Drop for Log {
        fn drop(&mut self) {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn logged() -> (Owner<Log>, Arc<AtomicUsize>) {
        let dropped = Arc::new(AtomicUsize::new(0));
        let owner = Owner::new(Log {
            released: AtomicUsize::new(0),
            zeros: AtomicUsize::new(0),
            dropped: dropped.clone(),
        });
        (owner, dropped)
    }

    #[test]
    fn counts_up_and_down_without_reporting_before_the_drain() {
        let (owner, _) = logged();
        let a = owner.count_one();
        let b = owner.count_one();
        assert_eq!(owner.count(), 2);
        assert!(!a.is_draining());
        drop(a);
        drop(b);
        assert_eq!(owner.count(), 0);
        assert_eq!(owner.released.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn releases_in_the_drain_report_and_the_last_says_zero() {
        let (owner, _) = logged();
        let a = owner.count_one();
        let b = owner.count_one();
        assert!(!owner.start_draining());
        assert!(owner.start_draining(), "the second start sees the first");
        assert!(a.is_draining());
        drop(a);
        assert_eq!(owner.zeros.load(Ordering::SeqCst), 0);
        drop(b);
        assert_eq!(owner.released.load(Ordering::SeqCst), 2);
        assert_eq!(owner.zeros.load(Ordering::SeqCst), 1);
        assert_eq!(owner.count(), 0);
        // Counted again during the drain, and back to zero: reported again.
        drop(owner.count_one());
        assert_eq!(owner.zeros.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_value_lives_until_the_last_reference_of_either_kind() {
        let (owner, dropped) = logged();
        let counted = owner.count_one();
        drop(owner);
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        assert_eq!(counted.released.load(Ordering::SeqCst), 0);
        drop(counted);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);

        let (owner, dropped) = logged();
        owner.start_draining();
        let counted = owner.count_one();
        drop(owner);
        drop(counted);
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "freed by a release in the drain"
        );
    }

    /// Threads count and release while the drain starts and the owner goes
    /// away: every release after the drain started is reported, and the
    /// value is dropped exactly once.
    #[test]
    fn concurrent_releases_across_the_drain_start() {
        let rounds = 200;
        for _ in 0..rounds {
            let (owner, dropped) = logged();
            let owner = Arc::new(owner);
            let threads: Vec<_> = (0..3)
                .map(|_| {
                    let owner = owner.clone();
                    std::thread::spawn(move || {
                        let mut held = Vec::new();
                        for i in 0..20 {
                            held.push(owner.count_one());
                            if i % 3 == 0 {
                                held.clear();
                            }
                        }
                        held
                    })
                })
                .collect();
            owner.start_draining();
            let held: Vec<_> = threads
                .into_iter()
                .flat_map(|t| t.join().expect("no panic"))
                .collect();
            let reported_before = owner.released.load(Ordering::SeqCst);
            let left = held.len();
            assert_eq!(owner.count(), left);
            let zeros_before = owner.zeros.load(Ordering::SeqCst);
            drop(held);
            assert_eq!(owner.count(), 0);
            assert_eq!(
                owner.released.load(Ordering::SeqCst),
                reported_before + left
            );
            if left > 0 {
                assert_eq!(owner.zeros.load(Ordering::SeqCst), zeros_before + 1);
            }
            let owner = Arc::into_inner(owner).expect("threads are done");
            drop(owner);
            assert_eq!(dropped.load(Ordering::SeqCst), 1);
        }
    }

    /// Two releases race in the drain with the owner gone: whichever is
    /// last frees the value, and the other never touches it afterwards.
    #[test]
    fn releases_race_each_other_in_the_drain() {
        let rounds = 500;
        for _ in 0..rounds {
            let (owner, dropped) = logged();
            owner.start_draining();
            let (a, b) = (owner.count_one(), owner.count_one());
            drop(owner);
            let other = std::thread::spawn(move || drop(a));
            drop(b);
            other.join().expect("no panic");
            assert_eq!(dropped.load(Ordering::SeqCst), 1);
        }
    }

    /// The owner is dropped while other threads release in the drain: the
    /// last of them frees the value, once.
    #[test]
    fn the_owner_goes_while_releases_run_in_the_drain() {
        let rounds = 200;
        for _ in 0..rounds {
            let (owner, dropped) = logged();
            let held: Vec<_> = (0..4).map(|_| owner.count_one()).collect();
            owner.start_draining();
            let threads: Vec<_> = held
                .into_iter()
                .map(|counted| std::thread::spawn(move || drop(counted)))
                .collect();
            drop(owner);
            for t in threads {
                t.join().expect("no panic");
            }
            assert_eq!(dropped.load(Ordering::SeqCst), 1);
        }
    }
}
