//! The signals that ask for an upgrade or a shutdown, as one stream of
//! commands: for a generation ([`Handover`](crate::Handover)) and for the
//! stable parent alike.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::Error;

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Upgrade,
    Shutdown,
}

/// Starts handling `upgrade` and `shutdown` signals (within the current
/// runtime); each one received comes out of the channel with what it asks
/// for.
pub(crate) fn channel(
    upgrade: &[SignalKind],
    shutdown: &[SignalKind],
) -> Result<UnboundedReceiver<(SignalKind, Command)>, Error> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let kinds = upgrade
        .iter()
        .map(|k| (*k, Command::Upgrade))
        .chain(shutdown.iter().map(|k| (*k, Command::Shutdown)));
    for (kind, command) in kinds {
        let mut stream = signal(kind)
            .map_err(|e| Error::io(format!("listening for signal {}", kind.as_raw_value()), e))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send((kind, command)).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}
