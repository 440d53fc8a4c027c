//! The count of in-flight requests and the drain flag, in one word.
//!
//! A request costs one atomic operation when it is counted and one when it
//! is released, and nothing for the reference it holds: the word lives in
//! a [`Slot`] that is never freed, so a request holds a `&'static` to it
//! instead of an `Arc` (whose clone and drop would be two more atomic
//! operations on the same hot cache line). The release learns in the same
//! step whether it ended during the drain and whether it was the last one.
//!
//! A slot is not leaked once per counter: when its owner is gone and its
//! count is zero, it goes back to a free list, and the next
//! [`Requests::new`] takes it from there. No reference to it is left at
//! that point (only the owner makes new ones, and the last release is the
//! one that hands it back), so a slot is reused, never shared. The memory
//! held is one slot per counter alive at the same time, at the most ever.

use std::process::abort;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The low 32 bits: counted references.
const COUNT_MASK: u64 = (1 << 32) - 1;
/// More counted references than this is a leak (`mem::forget` in a loop):
/// abort, as `Arc` does, long before the count could reach the flags.
const MAX_COUNT: u64 = 1 << 31;
/// The drain has started.
const DRAINING: u64 = 1 << 32;
/// The owner ([`Requests`]) is gone: the last release hands the slot back.
const OWNER_GONE: u64 = 1 << 33;
/// The high 30 bits: releases so far, wrapping. What the drain started with
/// taken from what it ends with is how many finished during the drain.
const RELEASED_SHIFT: u32 = 34;
const RELEASED_MASK: u64 = (1 << (64 - RELEASED_SHIFT)) - 1;
/// A release in one addition: one off the count (which is at least one, so
/// nothing borrows from the flags), one onto the releases (whose carry
/// leaves the word).
const RELEASE: u64 = (1 << RELEASED_SHIFT) - 1;

/// Where a counter's state lives, for the rest of the process.
struct Slot {
    /// The count, `DRAINING`, `OWNER_GONE` and the releases.
    word: AtomicU64,
    /// Woken when the last counted reference is released during a drain
    /// (and by the owner, for its other counts).
    idle: Notify,
    /// The owner's close-grace token.
    close: Mutex<CancellationToken>,
    /// The drain gives connections up to the next generation rather than
    /// closing them: set before `DRAINING`, so that whoever sees the drain
    /// sees this too.
    giving_up: AtomicBool,
    /// The free list this slot goes back to.
    home: &'static FreeList,
}

/// Slots whose owner is gone and whose count is zero.
pub(crate) struct FreeList(Mutex<Vec<&'static Slot>>);

/// Every counter's slots, but the tests'.
static FREE: FreeList = FreeList::new();

impl FreeList {
    const fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<&'static Slot>> {
        // A push or pop cannot leave the list half done.
        crate::lock::lock(&self.0)
    }
}

impl Slot {
    /// The close token, cloned (a long-lived response's, once).
    fn close(&self) -> CancellationToken {
        crate::lock::lock(&self.close).clone()
    }

    /// Hands the slot back: called once per owner, by whichever of the
    /// owner's drop and the last release saw the other already done.
    #[cold]
    fn recycle(&'static self) {
        self.home.lock().push(self);
    }
}

/// The owning handle: counts nothing itself, hands out [`Counted`]
/// references, starts the drain and reports on it.
pub(crate) struct Requests {
    slot: &'static Slot,
    /// The releases so far when the drain started; `u64::MAX` before.
    released_at_drain: AtomicU64,
}

/// One counted reference (one request in flight). Released on drop.
pub(crate) struct Counted {
    slot: &'static Slot,
}

impl Requests {
    /// A new count of zero, in a slot from the free list if one is there.
    pub(crate) fn new() -> Self {
        Self::new_in(&FREE)
    }

    fn new_in(home: &'static FreeList) -> Self {
        let reused = home.lock().pop();
        let slot = match reused {
            Some(slot) => {
                // Nothing else refers to the slot: its count is zero and
                // its owner gone, so no reference can be made or released.
                slot.word.store(0, Ordering::SeqCst);
                slot.giving_up.store(false, Ordering::SeqCst);
                *crate::lock::lock(&slot.close) = CancellationToken::new();
                slot
            }
            None => Box::leak(Box::new(Slot {
                word: AtomicU64::new(0),
                idle: Notify::new(),
                close: Mutex::new(CancellationToken::new()),
                giving_up: AtomicBool::new(false),
                home,
            })),
        };
        Self {
            slot,
            released_at_drain: AtomicU64::new(u64::MAX),
        }
    }

    /// Counts one more reference.
    #[inline]
    pub(crate) fn count_one(&self) -> Counted {
        let previous = self.slot.word.fetch_add(1, Ordering::SeqCst);
        if previous & COUNT_MASK >= MAX_COUNT {
            abort();
        }
        Counted { slot: self.slot }
    }

    /// How many counted references are alive.
    pub(crate) fn count(&self) -> usize {
        (self.slot.word.load(Ordering::SeqCst) & COUNT_MASK) as usize
    }

    /// Marks the drain to come as one that gives connections up (see
    /// [`Counted::gives_up`]); before [`start_draining`](Self::start_draining).
    pub(crate) fn give_up_connections(&self) {
        self.slot.giving_up.store(true, Ordering::SeqCst);
    }

    /// Whether the drain gives connections up.
    pub(crate) fn gives_up(&self) -> bool {
        self.slot.giving_up.load(Ordering::SeqCst)
    }

    /// Starts draining: from now on a release that leaves the count at
    /// zero wakes [`idle`](Self::idle), and every release counts as
    /// finished in the drain. Returns whether it had started already.
    pub(crate) fn start_draining(&self) -> bool {
        let previous = self.slot.word.fetch_or(DRAINING, Ordering::SeqCst);
        if previous & DRAINING != 0 {
            return true;
        }
        self.released_at_drain
            .store(released(previous), Ordering::SeqCst);
        false
    }

    /// How many references were released since the drain started.
    pub(crate) fn finished_in_drain(&self) -> usize {
        let at_start = self.released_at_drain.load(Ordering::SeqCst);
        if at_start == u64::MAX {
            return 0;
        }
        let now = released(self.slot.word.load(Ordering::SeqCst));
        (now.wrapping_sub(at_start) & RELEASED_MASK) as usize
    }

    /// Woken when the count reaches zero during the drain. Also for the
    /// owner's other counts; a waiter checks what it waits for when woken.
    pub(crate) fn idle(&self) -> &Notify {
        &self.slot.idle
    }

    /// Fires when the close grace has passed.
    pub(crate) fn close(&self) -> CancellationToken {
        self.slot.close()
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        let previous = self.slot.word.fetch_or(OWNER_GONE, Ordering::SeqCst);
        if previous & COUNT_MASK == 0 {
            self.slot.recycle();
        }
    }
}

/// The releases counted in `word`.
fn released(word: u64) -> u64 {
    word >> RELEASED_SHIFT
}

impl Counted {
    /// Whether the drain has started.
    #[inline]
    pub(crate) fn is_draining(&self) -> bool {
        self.slot.word.load(Ordering::SeqCst) & DRAINING != 0
    }

    /// Whether the drain, once started, gives connections up to the next
    /// generation rather than closing them.
    #[inline]
    pub(crate) fn gives_up(&self) -> bool {
        self.slot.giving_up.load(Ordering::SeqCst)
    }

    /// Resolves when the close grace has passed.
    pub(crate) fn closing(&self) -> WaitForCancellationFutureOwned {
        // The slot is this counter's for as long as this reference lives.
        self.slot.close().cancelled_owned()
    }
}

impl Drop for Counted {
    #[inline]
    fn drop(&mut self) {
        let previous = self.slot.word.fetch_add(RELEASE, Ordering::SeqCst);
        if previous & (DRAINING | OWNER_GONE) != 0 {
            released_late(self.slot, previous);
        }
    }
}

/// The rest of a release once draining or once the owner is gone, out of
/// the hot path. After its own release, this reference may touch the slot
/// only if it was the last one: otherwise the slot may be another owner's
/// already. (A stray wake-up would do no harm either: every waiter checks
/// its counts when woken.)
#[cold]
#[inline(never)]
fn released_late(slot: &'static Slot, previous: u64) {
    if previous & COUNT_MASK != 1 {
        return;
    }
    if previous & DRAINING != 0 {
        slot.idle.notify_waiters();
    }
    if previous & OWNER_GONE != 0 {
        slot.recycle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::{Context, Waker};

    /// A free list of the test's own, so that no other test takes or adds
    /// slots while it looks.
    fn own_list() -> &'static FreeList {
        Box::leak(Box::new(FreeList::new()))
    }

    fn slot_of(requests: &Requests) -> *const Slot {
        requests.slot
    }

    /// Whether `idle` was woken since `enable`d: polls it once.
    fn woken(notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>) -> bool {
        notified
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_ready()
    }

    #[test]
    fn counts_up_and_down_and_nothing_finishes_before_the_drain() {
        let requests = Requests::new_in(own_list());
        let a = requests.count_one();
        let b = requests.count_one();
        assert_eq!(requests.count(), 2);
        assert!(!a.is_draining());
        drop(a);
        drop(b);
        assert_eq!(requests.count(), 0);
        assert_eq!(requests.finished_in_drain(), 0);
    }

    #[test]
    fn releases_in_the_drain_finish_and_the_last_wakes_the_drain() {
        let requests = Requests::new_in(own_list());
        let early = requests.count_one();
        drop(early);
        let a = requests.count_one();
        let b = requests.count_one();
        assert!(!requests.start_draining());
        assert!(requests.start_draining(), "the second start sees the first");
        assert!(a.is_draining());

        let mut notified = pin!(requests.idle().notified());
        notified.as_mut().enable();
        drop(a);
        assert!(!woken(notified.as_mut()), "one is still in flight");
        drop(b);
        assert!(woken(notified.as_mut()), "the last release wakes the drain");
        assert_eq!(requests.finished_in_drain(), 2, "the early one not");
        assert_eq!(requests.count(), 0);

        // Counted again during the drain, and back to zero: woken again.
        let mut notified = pin!(requests.idle().notified());
        notified.as_mut().enable();
        drop(requests.count_one());
        assert!(woken(notified.as_mut()));
        assert_eq!(requests.finished_in_drain(), 3);
    }

    #[test]
    fn the_finished_count_survives_the_releases_wrapping() {
        let requests = Requests::new_in(own_list());
        // Two releases short of wrapping.
        requests
            .slot
            .word
            .store((RELEASED_MASK - 1) << RELEASED_SHIFT, Ordering::SeqCst);
        let held: Vec<_> = (0..5).map(|_| requests.count_one()).collect();
        requests.start_draining();
        drop(held);
        assert_eq!(requests.count(), 0);
        assert_eq!(requests.finished_in_drain(), 5);
    }

    #[test]
    fn a_slot_goes_back_once_its_owner_and_its_last_reference_are_gone() {
        let list = own_list();
        let requests = Requests::new_in(list);
        drop(requests);
        assert_eq!(list.lock().len(), 1, "nothing counted: back at once");

        let requests = Requests::new_in(list);
        assert!(list.lock().is_empty(), "taken again");
        let (a, b) = (requests.count_one(), requests.count_one());
        drop(requests);
        drop(a);
        assert!(list.lock().is_empty(), "one reference is left");
        drop(b);
        assert_eq!(list.lock().len(), 1, "the last release hands it back");

        let requests = Requests::new_in(list);
        let only = requests.count_one();
        drop(requests);
        assert!(list.lock().is_empty(), "its one reference is left");
        drop(only);
        assert_eq!(list.lock().len(), 1, "back once");
    }

    #[test]
    fn a_reused_slot_starts_fresh() {
        let list = own_list();
        let old = Requests::new_in(list);
        let first = slot_of(&old);
        old.give_up_connections();
        old.start_draining();
        old.close().cancel();
        let held = old.count_one();
        drop(old);
        drop(held);

        let new = Requests::new_in(list);
        assert_eq!(slot_of(&new), first, "the same slot");
        assert_eq!(new.count(), 0);
        assert_eq!(new.finished_in_drain(), 0);
        let counted = new.count_one();
        assert!(!counted.is_draining());
        assert!(!counted.gives_up() && !new.gives_up());
        assert!(!new.close().is_cancelled());
        let mut closing = pin!(counted.closing());
        assert!(
            closing
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_pending(),
            "not the old owner's cancelled token"
        );
        new.close().cancel();
        assert!(
            closing
                .poll(&mut Context::from_waker(Waker::noop()))
                .is_ready(),
            "the new owner's"
        );
    }

    #[test]
    fn slots_are_not_made_once_per_counter() {
        let list = own_list();
        for _ in 0..1000 {
            let requests = Requests::new_in(list);
            drop(requests.count_one());
        }
        assert_eq!(list.lock().len(), 1);
    }

    /// Threads count and release while the drain starts: every release
    /// after the drain started counts as finished, and the count ends at
    /// zero; then the slot goes back exactly once.
    #[test]
    fn concurrent_releases_across_the_drain_start() {
        let list = own_list();
        for _ in 0..200 {
            let requests = Arc::new(Requests::new_in(list));
            let threads: Vec<_> = (0..3)
                .map(|_| {
                    let requests = requests.clone();
                    std::thread::spawn(move || {
                        let mut held = Vec::new();
                        for i in 0..20 {
                            held.push(requests.count_one());
                            if i % 3 == 0 {
                                held.clear();
                            }
                        }
                        held
                    })
                })
                .collect();
            requests.start_draining();
            let held: Vec<_> = threads
                .into_iter()
                .flat_map(|t| t.join().expect("no panic"))
                .collect();
            let finished_before = requests.finished_in_drain();
            let left = held.len();
            assert_eq!(requests.count(), left);
            drop(held);
            assert_eq!(requests.count(), 0);
            assert_eq!(requests.finished_in_drain(), finished_before + left);
            drop(Arc::into_inner(requests).expect("threads are done"));
            assert_eq!(list.lock().len(), 1, "back once");
        }
    }

    /// Releases race each other in the drain, and the owner going: the last
    /// one wakes a waiter and the slot goes back once.
    #[test]
    fn releases_race_each_other_and_the_owner_going() {
        let list = own_list();
        let release_all = |held: Vec<Counted>| -> Vec<std::thread::JoinHandle<()>> {
            held.into_iter()
                .map(|counted| std::thread::spawn(move || drop(counted)))
                .collect()
        };
        for round in 0..300 {
            let requests = Requests::new_in(list);
            requests.start_draining();
            let held: Vec<_> = (0..4).map(|_| requests.count_one()).collect();
            if round % 2 == 0 {
                let threads = release_all(held);
                drop(requests);
                threads
                    .into_iter()
                    .for_each(|t| t.join().expect("no panic"));
            } else {
                {
                    let mut notified = pin!(requests.idle().notified());
                    notified.as_mut().enable();
                    let threads = release_all(held);
                    threads
                        .into_iter()
                        .for_each(|t| t.join().expect("no panic"));
                    assert!(woken(notified.as_mut()), "round {round}");
                }
                assert_eq!(requests.finished_in_drain(), 4);
                drop(requests);
            }
            assert_eq!(list.lock().len(), 1, "back once, round {round}");
        }
    }
}
