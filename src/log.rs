//! How this crate logs: events that cannot unwind into its own code, and
//! durations in one unit.

use std::fmt;
use std::time::Duration;

/// Emits a `tracing` event that cannot unwind into handover's own code.
///
/// A subscriber can panic: tracing-subscriber's `fmt` layer reports a
/// failed write with `eprintln!`, which panics when stderr is a broken pipe
/// as well (a log collector that died, the SSH session that started the
/// server gone). Such a panic in the task that handles signals would end
/// that task, and the process would ignore `SIGTERM` and `SIGHUP` from then
/// on; one in the middle of an upgrade could leave two generations serving.
/// Losing the log line is the lesser harm.
macro_rules! log {
    ($level:ident, $($arg:tt)+) => {{
        let _ = ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| {
            ::tracing::$level!($($arg)+);
        }));
    }};
}

/// A duration as logs and reports give it: in milliseconds, to a tenth.
pub(crate) struct Ms(pub(crate) Duration);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}", self.0.as_secs_f64() * 1e3)
    }
}
