//! What a generation listens to besides its HTTP listeners: the upgrade
//! and shutdown signals, and the control socket.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Handover;
use crate::control::{CONTROL_NAME, Controls, Upgraded};
use crate::error::Error;
use crate::signals::{self, Command};

impl Handover {
    /// Starts handling the upgrade and shutdown signals, and the control
    /// socket if there is one; calling it again does nothing.
    pub(super) fn start_signal_driver(&self) -> Result<(), Error> {
        if self.inner.driver_started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Err(e) = self.start_control_socket() {
            // Tried again (and failed again, with the error) by `serve`.
            self.inner.driver_started.store(false, Ordering::SeqCst);
            return Err(e);
        }
        let mut rx = signals::channel(&self.inner.upgrade_signals, &self.inner.shutdown_signals)?;
        let handover = self.clone();
        tokio::spawn(async move {
            while let Some((kind, command)) = rx.recv().await {
                let signal = kind.as_raw_value();
                if command == Command::Upgrade {
                    log!(info, signal, "upgrade requested");
                    let handover = handover.clone();
                    // Its own task, so that a shutdown signal is heard
                    // while the upgrade waits for the child.
                    tokio::spawn(async move {
                        if let Err(e) = handover.upgrade().await {
                            log!(error, error = %e, "upgrade refused or failed");
                        }
                    });
                } else {
                    log!(info, signal, "shutdown requested");
                    handover.shutdown();
                }
            }
        });
        Ok(())
    }

    /// Takes the control socket (inherited, or bound afresh with mode 0600)
    /// and answers on it until this generation drains, if there is one.
    fn start_control_socket(&self) -> Result<(), Error> {
        let Some(path) = &self.inner.control_socket else {
            return Ok(());
        };
        // 0600 from the moment it exists: no window for another user to
        // connect, and no path for a swapped-in link to redirect a chmod.
        let listener = self
            .inner
            .listeners
            .unix_with_mode(CONTROL_NAME, path, Some(0o600))?;
        let upgrading = self.clone();
        let status = self.clone();
        let controls = Controls {
            upgrade: Box::new(move || {
                let handover = upgrading.clone();
                Box::pin(async move {
                    let started = std::time::Instant::now();
                    let pid = handover.upgrade().await?;
                    Ok(Upgraded {
                        pid,
                        previous_pid: std::process::id(),
                        generation: handover.generation() + 1,
                        took: started.elapsed(),
                    })
                })
            }),
            status: Box::new(move || status.status()),
        };
        let stop = self.inner.graceful.signal().draining();
        tokio::spawn(crate::control::serve(
            listener,
            Arc::new(controls),
            stop,
            self.inner.control_tasks.clone(),
        ));
        log!(info, path = %path.display(), "control socket ready");
        Ok(())
    }
}
