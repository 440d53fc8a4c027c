//! Waiting for a condition, never for time: each wait polls what the
//! assertion after it needs, and fails, saying what it waited for, after a
//! bound.

use std::time::Duration;

use super::proc::{is_alive, is_reaped};

/// Polls `check` every 2 ms until it is true; panics after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until `pid` has exited (a zombie has; `what` names it); panics
/// after 20 s.
pub async fn wait_exit(what: &str, pid: u32) {
    wait_until(what, Duration::from_secs(20), || !is_alive(pid)).await;
}

/// Waits until `pid` has exited and been reaped; panics after 20 s.
pub async fn wait_reaped(what: &str, pid: u32) {
    wait_until(what, Duration::from_secs(20), || is_reaped(pid)).await;
}
