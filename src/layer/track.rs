//! What the layer, and the serve loop for each request it serves, do to a
//! request before the application sees it.

use std::cell::Cell;

use http::{Request, Version};

use crate::drain::DrainSignal;
use crate::drain::Graceful;
use crate::drain::RequestGuard;

/// A request as the layer took it in: its place in the count (none if the
/// same `Graceful` counts it already), and whether its response says
/// `Connection: close` once the drain has started.
pub(crate) struct Tracked {
    pub(super) guard: Option<RequestGuard>,
    pub(super) close: CloseOnDrain,
}

/// Whether a response says `Connection: close` once the drain has started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseOnDrain {
    /// HTTP/2 (GOAWAY says it), or a `101 Switching Protocols`.
    Never,
    /// HTTP/1: the client leaves after this response.
    Always,
    /// HTTP/1 on a connection that a drain giving connections up hands
    /// to the next generation: the client stays, and never learns.
    UnlessGivenUp,
}

impl Tracked {
    /// The request came on a connection that moves to the next generation
    /// if the drain gives connections up.
    #[inline]
    pub(crate) fn on_a_connection_that_moves(mut self) -> Self {
        if self.close == CloseOnDrain::Always {
            self.close = CloseOnDrain::UnlessGivenUp;
        }
        self
    }
}

thread_local! {
    /// The [`Graceful`] (by [`Graceful::id`]) whose serve loop is calling
    /// or polling the application's service on this thread right now, or 0.
    static SERVING: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f`, a call or poll of the application's service by the serve loop
/// of the `Graceful` with id `graceful`: a
/// [`GracefulLayer`](super::GracefulLayer) of the same `Graceful` inside it
/// (on a router's routes, say) sees that the request is counted already,
/// without anything put in the request for it.
#[inline]
pub(crate) fn serving<R>(graceful: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        #[inline]
        fn drop(&mut self) {
            SERVING.with(|serving| serving.set(self.0));
        }
    }
    let _restore = Restore(SERVING.with(|serving| serving.replace(graceful)));
    f()
}

/// Counts `req` on `graceful`, unless that `Graceful` counts it already (a
/// router with `.layer(graceful.layer())` under `serve`, which counts every
/// request too, or the same layer twice), and gives it a [`DrainSignal`]
/// if `signal_extension` (also when a serve loop counts it already). The
/// serve loop calls it for each request itself.
#[inline]
pub(crate) fn track<B>(
    graceful: &Graceful,
    signal_extension: bool,
    upgrades_tracked: bool,
    req: &mut Request<B>,
) -> Tracked {
    let close = if req.version() < Version::HTTP_2 {
        CloseOnDrain::Always
    } else {
        CloseOnDrain::Never
    };
    let served = SERVING.with(Cell::get) == graceful.id();
    let signal = req.extensions().get::<DrainSignal>();
    if served || signal.is_some_and(|signal| signal.is_from(graceful)) {
        if served && signal_extension && signal.is_none() {
            // The serve loop tracks upgrades itself.
            req.extensions_mut().insert(graceful.signal_with(true));
        }
        return Tracked { guard: None, close };
    }
    let guard = graceful.request_guard();
    if signal_extension {
        req.extensions_mut()
            .insert(graceful.signal_with(upgrades_tracked));
    }
    Tracked {
        guard: Some(guard),
        close,
    }
}
