//! A wait whose registration costs (a lock) only when it must.

use std::task::{Context, Poll, Waker};

/// Polls a wait whose registration costs (a lock) only when it must: once
/// `done` says it is over (one atomic load), `Ready`; else `register` runs
/// on the first poll and whenever the task's waker has changed since,
/// and not otherwise, since a waker it registered stays registered until
/// it is woken. `registered` keeps the waker last registered.
#[inline]
pub(crate) fn poll_registered(
    registered: &mut Option<Waker>,
    cx: &mut Context<'_>,
    done: impl FnOnce() -> bool,
    register: impl FnOnce(&mut Context<'_>) -> Poll<()>,
) -> Poll<()> {
    if done() {
        return Poll::Ready(());
    }
    if registered
        .as_ref()
        .is_some_and(|waker| waker.will_wake(cx.waker()))
    {
        return Poll::Pending;
    }
    let poll = register(cx);
    if poll.is_pending() {
        *registered = Some(cx.waker().clone());
    }
    poll
}
