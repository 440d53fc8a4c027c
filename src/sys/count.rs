//! A counter that is its own reference count: one atomic operation to
//! count a request in, one to count it out.
//!
//! An `Arc` plus a counter inside it costs four atomic operations per
//! request (clone, increment, decrement, drop). Here the count of in-flight
//! requests and the count of references to the allocation are the same
//! word, so holding a request *is* holding the allocation.
//!
//! The word (a `u64`):
//!
//! | bits   | what                                                        |
//! |--------|-------------------------------------------------------------|
//! | 0-31   | counted references ([`Counted`]): the requests in flight     |
//! | 32-62  | holders: the [`Owner`], and releases in progress in a drain |
//! | 63     | draining                                                    |
//!
//! The allocation is freed when both counts reach zero. Once draining, a
//! release first turns its count into a holder (in the same atomic step as
//! the decrement), so that it can still reach the allocation to report
//! "released in the drain" (and wake the drain when the count is zero)
//! while nobody can free it under its feet.

use std::ops::Deref;
use std::process::abort;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering, fence};

const COUNT_MASK: u64 = (1 << 32) - 1;
const ONE_HOLDER: u64 = 1 << 32;
const DRAINING: u64 = 1 << 63;
/// More counted references than this is a leak (`mem::forget` in a loop):
/// abort, as `Arc` does, long before the count could spill into the holders.
const MAX_COUNT: u64 = 1 << 31;

/// What the counted value does when one of its references is released
/// during a drain.
pub(crate) trait ReleasedInDrain: Send + Sync {
    /// One counted reference was released while draining; `now_zero` when
    /// it was the last one.
    fn released_in_drain(&self, now_zero: bool);
}

struct Inner<T> {
    word: AtomicU64,
    value: T,
}

/// The owning handle: counts nothing itself, hands out [`Counted`]
/// references, and starts the drain.
pub(crate) struct Owner<T: ReleasedInDrain> {
    inner: NonNull<Inner<T>>,
}

/// One counted reference (one request in flight). Released on drop.
pub(crate) struct Counted<T: ReleasedInDrain> {
    inner: NonNull<Inner<T>>,
}

// SAFETY: both handles only give out `&T` (shared across threads, hence
// `T: Sync`) and may drop `T` on whichever thread releases last (hence
// `T: Send`), exactly like `Arc<T>`.
unsafe impl<T: ReleasedInDrain> Send for Owner<T> {}
// SAFETY: as above.
unsafe impl<T: ReleasedInDrain> Sync for Owner<T> {}
// SAFETY: as above.
unsafe impl<T: ReleasedInDrain> Send for Counted<T> {}
// SAFETY: as above.
unsafe impl<T: ReleasedInDrain> Sync for Counted<T> {}

fn inner<T>(ptr: &NonNull<Inner<T>>) -> &Inner<T> {
    // SAFETY: every caller is a handle (`Owner` or `Counted`) that holds one
    // reference in the word, or a release that holds a holder reference;
    // the allocation is freed only when the word's counts reach zero, so it
    // outlives the borrow.
    unsafe { ptr.as_ref() }
}

/// Drops one holder reference, freeing the allocation if it was the last
/// reference of any kind.
fn release_holder<T>(ptr: NonNull<Inner<T>>) {
    let previous = inner(&ptr).word.fetch_sub(ONE_HOLDER, Ordering::Release);
    if previous & !DRAINING == ONE_HOLDER {
        free(ptr);
    }
}

/// Frees the allocation; called by whoever took the word's last reference.
fn free<T>(ptr: NonNull<Inner<T>>) {
    // Every other handle's use happened before its (release) decrement;
    // this acquire makes them all happen before the drop, as in `Arc`.
    fence(Ordering::Acquire);
    // SAFETY: the allocation came from `Box::into_raw` in `Owner::new`, and
    // the caller saw the word drop to no reference at all: no handle is
    // left to use it, and none can be made (only a handle can make one).
    drop(unsafe { Box::from_raw(ptr.as_ptr()) });
}

impl<T: ReleasedInDrain> Owner<T> {
    /// A new allocation holding `value`, with nothing counted.
    pub(crate) fn new(value: T) -> Self {
        let inner = Box::new(Inner {
            word: AtomicU64::new(ONE_HOLDER),
            value,
        });
        Self {
            inner: NonNull::from(Box::leak(inner)),
        }
    }

    /// Counts one more reference.
    #[inline]
    pub(crate) fn count_one(&self) -> Counted<T> {
        let previous = inner(&self.inner).word.fetch_add(1, Ordering::SeqCst);
        if previous & COUNT_MASK >= MAX_COUNT {
            abort();
        }
        Counted { inner: self.inner }
    }

    /// How many counted references are alive.
    pub(crate) fn count(&self) -> usize {
        (inner(&self.inner).word.load(Ordering::SeqCst) & COUNT_MASK) as usize
    }

    /// Starts draining: from now on every release reports itself through
    /// [`ReleasedInDrain`]. Returns whether it had started already.
    pub(crate) fn start_draining(&self) -> bool {
        inner(&self.inner).word.fetch_or(DRAINING, Ordering::SeqCst) & DRAINING != 0
    }
}

impl<T: ReleasedInDrain> Deref for Owner<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &inner(&self.inner).value
    }
}

impl<T: ReleasedInDrain> Drop for Owner<T> {
    fn drop(&mut self) {
        release_holder(self.inner);
    }
}

impl<T: ReleasedInDrain> Counted<T> {
    /// Whether the drain has started.
    #[inline]
    pub(crate) fn is_draining(&self) -> bool {
        inner(&self.inner).word.load(Ordering::SeqCst) & DRAINING != 0
    }
}

impl<T: ReleasedInDrain> Deref for Counted<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &inner(&self.inner).value
    }
}

impl<T: ReleasedInDrain> Drop for Counted<T> {
    #[inline]
    fn drop(&mut self) {
        let word = &inner(&self.inner).word;
        let mut current = word.load(Ordering::Relaxed);
        loop {
            // Draining: trade this count for a holder in the same step, so
            // the allocation stays ours while we report the release.
            let next = if current & DRAINING == 0 {
                current - 1
            } else {
                current - 1 + ONE_HOLDER
            };
            match word.compare_exchange_weak(current, next, Ordering::SeqCst, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        if current & DRAINING == 0 {
            if current == 1 {
                // The last reference of any kind: the owner is gone.
                free(self.inner);
            }
            return;
        }
        released_in_drain(self.inner, current & COUNT_MASK == 1);
    }
}

/// The rest of a release once draining, out of the hot path.
#[cold]
#[inline(never)]
fn released_in_drain<T: ReleasedInDrain>(ptr: NonNull<Inner<T>>, now_zero: bool) {
    inner(&ptr).value.released_in_drain(now_zero);
    release_holder(ptr);
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
    /// away: every release after the drain started is reported, the value
    /// is dropped exactly once, and (under Miri) nothing races or leaks.
    #[test]
    fn concurrent_releases_across_the_drain_start() {
        let rounds = if cfg!(miri) { 4 } else { 200 };
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
        let rounds = if cfg!(miri) { 30 } else { 500 };
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
        let rounds = if cfg!(miri) { 4 } else { 200 };
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
