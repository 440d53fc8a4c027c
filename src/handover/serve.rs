//! [`Handover::serve`]: the drain half's serve loop, run by a generation.

use std::io;
use std::ops::ControlFlow;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use super::{Exit, Handover, Outcome};
use crate::drain::DrainReport;
use crate::drain::Graceful;
use crate::error::Error;
use crate::inherit::channel;
use crate::lock::lock;
use crate::notify;
use crate::serve::host::sealed::Sealed;
use crate::serve::moves::Moves;
use crate::serve::{Accept, Host, HttpService, Serve};

impl Handover {
    /// Serves `service` on `listener` (see [`serve`](crate::serve())) until
    /// this generation hands over or shuts down, then drains; `.await` it.
    ///
    /// The returned [`Serve`] is configured as any other (`tcp_nodelay`,
    /// `connect_info`, `handshake` for TLS, …); awaiting it gives how this
    /// generation ended ([`Exit`]).
    ///
    /// The first call starts the signal driver and, unless
    /// [`Builder::auto_ready`](super::Builder::auto_ready) is off, reports
    /// readiness. Serve several listeners by calling it once per listener
    /// and awaiting them together: they share one drain.
    pub fn serve<L, S>(
        &self,
        listener: L,
        service: S,
    ) -> Serve<L, S, crate::serve::NoHandshake, Handover>
    where
        L: Accept,
        S: HttpService,
    {
        Serve::new(listener, service, self.clone())
    }

    /// After a hand-over, tells the new generation how this one drained,
    /// on its readiness channel (which closes with it).
    fn tell_the_next_generation(&self, exit: &Exit) {
        let Exit::HandedOver { report, .. } = exit else {
            return;
        };
        let Some(mut channel) = self.inner.upgrader.take_report_channel() else {
            return;
        };
        let took = lock(&self.inner.upgrade_took).unwrap_or_default();
        let line = channel::drain_report_line(took, report);
        let _ = channel.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = std::io::Write::write_all(&mut channel, line.as_bytes());
    }

    fn finish(&self, report: DrainReport) -> Exit {
        let outcome = *lock(&self.inner.outcome);
        match outcome {
            Some(Outcome::HandedOver(pid)) => Exit::HandedOver { pid, report },
            Some(Outcome::Shutdown) | None => {
                // A next generation that became ready as the shutdown came
                // serves on these files' sockets.
                if !self.inner.upgrader.has_handed_over() {
                    self.inner.listeners.remove_socket_files();
                }
                if let Some(path) = &self.inner.pid_file
                    && let Err(e) = notify::remove_pid_file_if_ours(path)
                {
                    log!(warn, error = %e, "could not remove the pid file");
                }
                Exit::Shutdown { report }
            }
        }
    }
}

impl Sealed for Handover {}

impl Host for Handover {
    type Output = Result<Exit, Error>;

    fn graceful(&self) -> &Graceful {
        &self.inner.graceful
    }

    fn start(&self) -> ControlFlow<Self::Output> {
        if let Err(e) = self.start_signal_driver() {
            return ControlFlow::Break(Err(e));
        }
        // The listener accepts from the moment the loop is first polled,
        // and connections wait in its backlog until then: ready now.
        if self.inner.auto_ready {
            let _ = self.ready();
        }
        ControlFlow::Continue(())
    }

    fn closes_for_good(&self) -> bool {
        // After a hand-over, the next generation accepts from the same
        // socket.
        self.stops_for_good()
    }

    fn moves(&self, listener: Option<BorrowedFd<'_>>) -> Moves {
        // Only the listeners this generation took from `tcp` or `unix`
        // have a name the next generation knows them by.
        let Some((name, family)) = listener.and_then(|fd| self.inner.listeners.name_of(fd)) else {
            return Moves::none();
        };
        Moves {
            incoming: self.inner.incoming.register(&name, family),
            give_up: self
                .inner
                .hand_over_connections
                .then(|| self.inner.outgoing.give_up(&name)),
        }
    }

    async fn finish(self, drained: io::Result<DrainReport>) -> Self::Output {
        // Every connection given up has its answer by now: the next
        // generation stops waiting for more.
        self.inner.outgoing.close();
        let report = drained.map_err(|e| Error::io("serving", e))?;
        // A shutdown during an upgrade has cancelled it: let it kill and
        // reap its child before this process exits, or the child would be
        // left running.
        let upgrader = &self.inner.upgrader;
        if upgrader.is_running()
            && tokio::time::timeout(Duration::from_secs(10), upgrader.wait_ended())
                .await
                .is_err()
        {
            log!(
                error,
                "a pending upgrade did not end in 10 s; exiting anyway"
            );
        }
        if let Some(mut standby) = upgrader.discard_standby() {
            let _ = tokio::time::timeout(Duration::from_secs(5), standby.wait()).await;
        }
        // The answer to the `upgrade` that ended this generation.
        let control = &self.inner.control_tasks;
        control.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), control.wait()).await;
        let exit = Handover::finish(&self, report);
        self.tell_the_next_generation(&exit);
        Ok(exit)
    }
}
