//! [`DrainSignal`]: what a handler watches to end long-lived work when the
//! drain starts.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use pin_project_lite::pin_project;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::tokens::UpgradeToken;
use super::{Graceful, Shared, poll_registered};

/// Resolves when the drain starts: what a handler watches to end a
/// long-poll, an event stream or a WebSocket on its own terms.
///
/// The drain starts on a shutdown and on a hand-over to the next
/// generation alike; either way this process takes no new work, and what
/// it is doing should end soon, so that clients come back to whichever
/// process serves next.
///
/// [`GracefulLayer::signal_extension`](crate::layer::GracefulLayer::signal_extension)
/// and [`Serve::signal_extension`](crate::serve::Serve::signal_extension)
/// put one in every request's extensions, where an axum handler takes it as
/// `Extension<DrainSignal>`; [`Graceful::signal`] makes one anywhere else
/// (to keep in an application's state, say). It is cheap to clone.
///
/// `.await` it (it implements [`IntoFuture`]) or call
/// [`draining`](DrainSignal::draining) for a future that borrows nothing,
/// to use in `tokio::select!` or a spawned task.
///
/// # Examples
///
/// ```
/// use axum::{Extension, Router, routing::get};
/// use handover::{DrainSignal, Graceful};
///
/// async fn long_poll(Extension(drain): Extension<DrainSignal>) -> &'static str {
///     tokio::select! {
///         _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => "nothing new",
///         _ = drain.draining() => "server restarting, poll again",
///     }
/// }
///
/// let graceful = Graceful::new();
/// let app: Router = Router::new()
///     .route("/poll", get(long_poll))
///     .layer(graceful.layer().signal_extension(true));
/// ```
#[derive(Clone)]
pub struct DrainSignal {
    shared: Arc<Shared>,
    /// The serve loop tracks this connection's upgrades itself.
    upgrades_tracked: bool,
}

impl DrainSignal {
    pub(super) fn new(shared: Arc<Shared>, upgrades_tracked: bool) -> Self {
        Self {
            shared,
            upgrades_tracked,
        }
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared.is_draining()
    }

    /// Keeps the connection this request upgrades (a WebSocket, say) counted
    /// until the returned token is dropped: move it into the task that
    /// serves the upgraded connection.
    ///
    /// Under [`serve`](crate::serve()) (and [`Handover`](crate::Handover))
    /// upgraded connections are tracked already, from the upgrade until the
    /// upgraded IO is dropped, and this token counts nothing extra; with
    /// another server (`axum::serve`) it is what makes the drain wait for
    /// the connection, up to the close grace.
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
    /// use axum::{Extension, Router, response::Response, routing::get};
    /// use handover::{DrainSignal, Graceful};
    ///
    /// async fn ws(upgrade: WebSocketUpgrade, Extension(drain): Extension<DrainSignal>) -> Response {
    ///     let token = drain.track_upgrade();
    ///     upgrade.on_upgrade(move |socket| async move {
    ///         echo(socket, drain).await;
    ///         drop(token);
    ///     })
    /// }
    ///
    /// async fn echo(mut socket: WebSocket, drain: DrainSignal) {
    ///     loop {
    ///         tokio::select! {
    ///             message = socket.recv() => match message {
    ///                 Some(Ok(Message::Text(text))) => {
    ///                     if socket.send(Message::Text(text)).await.is_err() { return }
    ///                 }
    ///                 Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
    ///                 Some(Ok(_)) => {}
    ///             },
    ///             () = drain.draining() => break,
    ///         }
    ///     }
    ///     // Going away: the client reconnects, to the next generation.
    ///     let close = CloseFrame { code: close_code::AWAY, reason: "restarting".into() };
    ///     let _ = socket.send(Message::Close(Some(close))).await;
    ///     // Wait for the client's Close (the close grace bounds this).
    ///     while let Some(Ok(_)) = socket.recv().await {}
    /// }
    ///
    /// let graceful = Graceful::new();
    /// let app: Router = Router::new()
    ///     .route("/ws", get(ws))
    ///     .layer(graceful.layer().signal_extension(true));
    /// ```
    pub fn track_upgrade(&self) -> UpgradeToken {
        if self.upgrades_tracked {
            UpgradeToken::untracked(&self.shared)
        } else {
            UpgradeToken::new(&self.shared, None)
        }
    }

    /// Whether this signal is `graceful`'s.
    pub(crate) fn is_from(&self, graceful: &Graceful) -> bool {
        Arc::ptr_eq(&self.shared, &graceful.shared)
    }

    /// A future that resolves when the drain starts (at once if it has).
    pub fn draining(&self) -> Draining {
        Draining {
            shared: self.shared.clone(),
            inner: self.shared.drain_started.clone().cancelled_owned(),
            registered: None,
        }
    }
}

impl IntoFuture for DrainSignal {
    type Output = ();
    type IntoFuture = Draining;

    fn into_future(self) -> Draining {
        self.draining()
    }
}

impl fmt::Debug for DrainSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainSignal")
            .field("draining", &self.is_draining())
            .finish()
    }
}

pin_project! {
    /// Future returned by [`DrainSignal::draining`]: resolves when the
    /// drain starts.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping it loses nothing, and a new one resolves at
    /// once if the drain has started meanwhile.
    #[must_use = "futures do nothing unless polled"]
    pub struct Draining {
        shared: Arc<Shared>,
        #[pin]
        inner: WaitForCancellationFutureOwned,
        // The waker `inner` has registered, once it has.
        registered: Option<Waker>,
    }
}

impl Future for Draining {
    type Output = ();

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Internal: a poll while the drain has not started costs one atomic
        // load, so that a connection or a stream can poll it beside its own
        // work on every wake-up. The notification (whose poll takes a lock
        // that every waiter shares) is polled only on the first poll and
        // when the task's waker has changed.
        let this = self.project();
        let shared = &**this.shared;
        let inner = this.inner;
        poll_registered(
            this.registered,
            cx,
            // Set before the notification fires.
            || shared.draining.load(Ordering::SeqCst),
            |cx| inner.poll(cx),
        )
    }
}

impl fmt::Debug for Draining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Draining").finish_non_exhaustive()
    }
}
