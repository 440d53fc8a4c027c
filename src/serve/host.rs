//! [`Host`]: who runs a serve loop, and what awaiting it gives.

use std::future::Future;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::BorrowedFd;

use super::moves::Moves;
use crate::drain::DrainReport;
use crate::drain::Graceful;

/// Who runs a serve loop: a [`Graceful`] alone ([`serve`](crate::serve()),
/// whose future gives the [`DrainReport`]), or a
/// [`Handover`](crate::Handover) ([`Handover::serve`](crate::Handover::serve),
/// whose future gives how the generation ended). The same
/// [`Serve`](super::Serve) builder configures both.
///
/// Sealed: implemented by those two only.
pub trait Host: sealed::Sealed + Send + Sync + 'static {
    /// What awaiting the serve loop gives.
    type Output: Send + 'static;

    /// The drain the loop serves under.
    #[doc(hidden)]
    fn graceful(&self) -> &Graceful;

    /// Before the loop accepts: `Break` ends it at once with that output.
    #[doc(hidden)]
    fn start(&self) -> ControlFlow<Self::Output>;

    /// Called as the loop stops accepting: whether its listener closes for
    /// good (nothing else accepts from it), so that what waits in its
    /// backlog is better accepted and served than reset.
    #[doc(hidden)]
    fn closes_for_good(&self) -> bool;

    /// How the connections of the loop on `listener` move between
    /// generations.
    #[doc(hidden)]
    fn moves(&self, listener: Option<BorrowedFd<'_>>) -> Moves;

    /// Once the loop has drained: what its future gives.
    #[doc(hidden)]
    fn finish(self, drained: io::Result<DrainReport>) -> impl Future<Output = Self::Output> + Send;
}

pub(crate) mod sealed {
    /// Keeps [`Host`](super::Host) to this crate's types.
    pub trait Sealed {}
}

impl sealed::Sealed for Graceful {}

impl Host for Graceful {
    type Output = io::Result<DrainReport>;

    fn graceful(&self) -> &Graceful {
        self
    }

    fn start(&self) -> ControlFlow<Self::Output> {
        ControlFlow::Continue(())
    }

    fn closes_for_good(&self) -> bool {
        true
    }

    fn moves(&self, _listener: Option<BorrowedFd<'_>>) -> Moves {
        Moves::none()
    }

    async fn finish(self, drained: io::Result<DrainReport>) -> Self::Output {
        drained
    }
}
