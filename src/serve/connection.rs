//! One connection, from its first byte to its end: served, and drained as
//! its protocol allows.

use std::io;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite};

use super::HttpService;
use super::busy::Busy;
use super::info::Extend;
use super::io::{ConnIo, ConnState, PROTOCOL_H2};
use super::presized::Presized;
use super::service::ConnService;
use super::watchdog::Watched;
use crate::drain::ConnectionToken;
use crate::drain::Force;
use crate::drain::Graceful;
use crate::error::BoxError;

/// What every connection of one serve loop is served with.
pub(super) struct ConnSettings {
    pub(super) builder: Builder<TokioExecutor>,
    pub(super) idle_grace: Duration,
    /// The slowloris watchdog's, if it runs.
    pub(super) watched: Option<Arc<Watched>>,
    /// What each request's extensions start from, when something will put
    /// a `ShutdownSignal` in them: this loop or a layer.
    pub(super) presized: Option<Arc<Presized>>,
}

/// Serves HTTP on `io` until the connection ends, and drains it when the
/// drain starts; `token` counts it until then (and, upgraded, until its IO
/// is dropped).
pub(super) async fn serve_connection<I, S>(
    io: I,
    service: S,
    extend: Option<Extend>,
    settings: &ConnSettings,
    graceful: Graceful,
    token: ConnectionToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService,
{
    let state = Arc::new(ConnState::default());
    let busy = Arc::new(Busy::default());
    let io = TokioIo::new(ConnIo::new(io, state.clone()));
    let service = ConnService {
        inner: service,
        graceful: graceful.clone(),
        conn: state.clone(),
        busy: busy.clone(),
        extend,
        presized: settings.presized.clone(),
    };
    let idle_grace = settings.idle_grace;
    // Set when the close grace forced the connection for its HTTP/2 tunnels.
    let mut tunnels_forced = false;
    // Driven in a block of its own, so the connection (and with it the IO,
    // unless upgraded) is dropped when the block ends.
    async {
        let mut conn = pin!(settings.builder.serve_connection_with_upgrades(io, service));
        let mut drain = pin!(graceful.signal().draining());
        let mut forced = pin!(graceful.forced());
        // The slowloris watchdog, until the drain takes over.
        let _watched = settings
            .watched
            .as_ref()
            .map(|watched| watched.watch(&busy));
        let mut expired = pin!(busy.expired());
        let mut watching = settings.watched.is_some();

        loop {
            tokio::select! {
                biased;
                result = conn.as_mut() => return log_end(result),
                () = &mut drain => break,
                () = &mut expired, if watching => {
                    if state.protocol.load(Ordering::Relaxed) == PROTOCOL_H2 {
                        // HTTP/2 clients (gRPC channels) may stay idle.
                        busy.exempt();
                        watching = false;
                    } else {
                        log!(debug, "no request head within the header read timeout; closed");
                        return;
                    }
                }
            }
        }
        if state.protocol.load(Ordering::Relaxed) != PROTOCOL_H2 && busy.is_idle() {
            // An idle HTTP/1 connection (or one that has sent nothing yet):
            // its client may have a request on the wire that closing now
            // would reset. Give it the grace; a request that arrives in it
            // is served with `Connection: close`, after which hyper closes
            // by itself.
            tokio::select! {
                result = conn.as_mut() => return log_end(result),
                () = tokio::time::sleep(idle_grace) => {}
                _ = &mut forced => {
                    log!(debug, "connection forced closed");
                    return;
                }
            }
        }
        // HTTP/2: GOAWAY now, open streams finish. HTTP/1 busy at drain
        // start: close right after the response in progress (its client is
        // reading, not writing). HTTP/1 after the grace: close if idle, or
        // after the response in progress.
        conn.as_mut().graceful_shutdown();
        tokio::select! {
            result = conn.as_mut() => log_end(result),
            _ = &mut forced => log!(debug, "connection forced closed"),
            () = tunnels_outlive_close_grace(&graceful, &busy) => {
                // WebSockets over HTTP/2 still open at the close grace, and
                // no other request in progress: the connection is closed,
                // as the IO of an upgraded HTTP/1 connection would be. First
                // it is polled once more, so that it writes what it has
                // queued (the end of the responses just finished) as far
                // as its socket takes it at once; a client that has stopped
                // reading does not hold it.
                let polled = std::future::poll_fn(|cx| {
                    Poll::Ready(match conn.as_mut().poll(cx) {
                        Poll::Ready(result) => Some(result),
                        Poll::Pending => None,
                    })
                });
                if let Some(result) = polled.await {
                    return log_end(result);
                }
                log!(debug, "HTTP/2 tunnels forced closed at the close grace");
                state.force();
                tunnels_forced = true;
                tokio::select! {
                    result = conn.as_mut() => log_end(result),
                    _ = &mut forced => {}
                }
            }
        }
    }
    .await;
    if tunnels_forced {
        token.forced_at_close_grace();
        return;
    }
    if Arc::strong_count(&state) > 1 {
        // Upgraded: hyper handed the IO to the handler (a WebSocket task).
        // It stays counted, and forced at the close grace, until that IO is
        // dropped (which drops the last `state`, and the token with it).
        let force: Weak<dyn Force> = Arc::downgrade(&state) as Weak<dyn Force>;
        let _ = state.upgrade.set(graceful.upgrade_token_forcing(force));
    }
    // Counted as an upgraded connection from now on, if it is one.
    drop(token);
}

/// Resolves once the close grace has passed, no request is in progress on
/// the connection, and it has opened an HTTP/2 tunnel (an extended CONNECT
/// answered with 2xx: a WebSocket over HTTP/2). Called after GOAWAY, so no
/// request starts after it; an open connection then holds tunnels only.
async fn tunnels_outlive_close_grace(graceful: &Graceful, busy: &Busy) {
    graceful.closing().await;
    busy.idle().await;
    // A tunnel is marked before its request stops counting as busy.
    if !busy.tunnels.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
}

fn log_end(result: Result<(), BoxError>) {
    if let Err(e) = result {
        // A shutdown before the protocol was read is reported as
        // `Interrupted`: benign. So are peers that hang up.
        let benign = e
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::Interrupted);
        if !benign {
            log!(debug, error = %e, "connection ended with an error");
        }
    }
}
