//! The state a generation hands to the next one: its snapshot, taken
//! safely.

use std::sync::Arc;

use crate::error::BoxError;
use crate::error::Error;

/// Takes the snapshot of state that the next generation receives.
pub(super) type StateSource = Arc<dyn Fn() -> Result<Vec<u8>, BoxError> + Send + Sync>;

/// Runs `source` for the next generation's state: its bytes, or why the
/// upgrade cannot hand them over.
pub(super) fn take_snapshot(source: &StateSource, max: usize) -> Result<Vec<u8>, Error> {
    let reason = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| source())) {
        Ok(Ok(bytes)) if bytes.len() <= max => return Ok(bytes),
        Ok(Ok(bytes)) => format!(
            "the snapshot is {} bytes, more than the limit of {max} (Builder::max_state_size)",
            bytes.len()
        ),
        Ok(Err(e)) => format!("the snapshot failed: {e}"),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            format!("the snapshot panicked: {what}")
        }
    };
    Err(Error::State { reason })
}
