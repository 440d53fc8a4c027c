//! One connection, from its first byte to its end: served, and drained as
//! its protocol allows, or given up to the next generation.

use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::HttpService;
use super::busy::Busy;
use super::http::HttpBuilder;
use super::info::Extend;
use super::io::{ConnIo, ConnState, Version};
use super::presized::Presized;
use super::service::ConnService;
use super::watchdog::Watched;
use crate::drain::{ConnectionToken, Force, Graceful};
use crate::error::BoxError;

/// What every connection of one serve loop is served with.
pub(super) struct ConnSettings {
    pub(super) http: HttpBuilder,
    pub(super) idle_grace: Duration,
    /// The slowloris watchdog's, if it runs.
    pub(super) watched: Option<Arc<Watched>>,
    /// What each request's extensions start from, when something will put
    /// a `DrainSignal` in them: this loop or a layer.
    pub(super) presized: Option<Arc<Presized>>,
}

/// How a connection's service ended.
pub(super) enum Ended<I> {
    /// It ended, or was closed; its token is released (or, upgraded, held
    /// by its IO).
    Done,
    /// Given up, idle, for the next generation: the stream, what was read
    /// of it and not parsed, and its token.
    GivenUp {
        io: I,
        unread: Bytes,
        token: ConnectionToken,
    },
}

/// What a connection is served with beyond its stream: its service, what
/// each request learns of it, and whether it moves to the next generation
/// when the drain gives connections up.
pub(super) struct Conn<'a, S> {
    pub(super) service: S,
    pub(super) extend: Option<Extend>,
    pub(super) settings: &'a ConnSettings,
    pub(super) graceful: Graceful,
    pub(super) token: ConnectionToken,
    pub(super) moves: bool,
}

/// Serves HTTP on `io`, whose first bytes are `prefix` (what a previous
/// generation read and did not parse), until the connection ends, and
/// drains it when the drain starts: closed as its protocol allows, or,
/// when the drain gives connections up and this one `moves`, given up once
/// idle. The token counts it until then (and, upgraded, until its IO is
/// dropped).
pub(super) async fn serve_connection<I, S>(io: I, prefix: Bytes, conn: Conn<'_, S>) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService,
{
    let Conn {
        service,
        extend,
        settings,
        graceful,
        token,
        moves,
    } = conn;
    let state = Arc::new(ConnState::default());
    let busy = Arc::new(Busy::default());
    let mut io = ConnIo::new(io, state.clone(), prefix);
    // The slowloris watchdog, until the drain takes over.
    let _watched = settings
        .watched
        .as_ref()
        .map(|watched| watched.watch(&busy));
    let mut expired = busy.expired();
    let watching = settings.watched.is_some();
    let mut drain = pin!(graceful.signal().draining());
    let mut forced = pin!(graceful.forced());

    // The protocol, from the first bytes. A connection that has sent none
    // (or half the HTTP/2 preface) when the drain starts is idle: it moves
    // at once, or is given the idle grace, as an idle HTTP/1 one is.
    let mut draining_since = None;
    let version = loop {
        let idle_grace_over = async {
            match draining_since {
                Some(since) => tokio::time::sleep_until(since + settings.idle_grace).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            version = io.read_version() => match version {
                Ok(version) => break version,
                Err(e) => {
                    log!(debug, error = %e, "connection ended before its first request");
                    return Ended::Done;
                }
            },
            () = &mut drain, if draining_since.is_none() => {
                if moves && graceful.gives_up_connections() {
                    let (io, unread) = io.into_parts();
                    return Ended::GivenUp { io, unread, token };
                }
                draining_since = Some(tokio::time::Instant::now());
            }
            () = idle_grace_over => return Ended::Done,
            () = &mut expired, if watching && draining_since.is_none() => {
                log!(debug, "no request head within the header read timeout; closed");
                return Ended::Done;
            }
            _ = &mut forced => return Ended::Done,
        }
    };

    let service = ConnService {
        inner: Box::new(service),
        graceful: graceful.clone(),
        conn: state.clone(),
        busy: busy.clone(),
        extend,
        presized: settings.presized.clone(),
        moves: moves && version == Version::H1,
    };
    match version {
        Version::H1 => {
            let conn = settings
                .http
                .h1()
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let served = Served {
                state: &state,
                busy: &busy,
                graceful: &graceful,
                settings,
                expired: &mut expired,
                watching,
            };
            http1(conn, served, token, moves).await
        }
        Version::H2 => {
            let conn = settings
                .http
                .h2()
                .serve_connection(TokioIo::new(io), service);
            // HTTP/2 clients (gRPC channels) may stay idle.
            busy.exempt();
            http2(conn, &state, &busy, &graceful, token).await;
            Ended::Done
        }
    }
}

type H1Conn<I, S> =
    hyper::server::conn::http1::UpgradeableConnection<TokioIo<ConnIo<I>>, ConnService<S>>;
type H2Conn<I, S> = hyper::server::conn::http2::Connection<
    TokioIo<ConnIo<I>>,
    ConnService<S>,
    hyper_util::rt::TokioExecutor,
>;

/// How an HTTP/1 connection's first phases ended.
enum Step {
    /// Its service ended by itself (hyper's result).
    Ended(hyper::Result<()>),
    /// Closed: the watchdog, or the drain's deadline.
    Closed,
    /// Go on with the next phase.
    Next,
}

/// Drives an HTTP/1 connection until it ends, and through the drain.
async fn http1<I, S>(
    mut conn: H1Conn<I, S>,
    served: Served<'_>,
    token: ConnectionToken,
    moves: bool,
) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService,
{
    let Served {
        state,
        busy,
        graceful,
        settings,
        expired,
        watching,
    } = served;
    let mut drain = pin!(graceful.signal().draining());
    let mut forced = pin!(graceful.forced());
    // Until the drain, or the end.
    let step = tokio::select! {
        biased;
        result = &mut conn => Step::Ended(result),
        () = &mut drain => Step::Next,
        () = expired, if watching => {
            log!(debug, "no request head within the header read timeout; closed");
            Step::Closed
        }
    };
    // A drain that gives connections up takes this one once it is idle:
    // at once if it is, or when the response in progress has been written,
    // as long as that is within the close grace.
    let step = match step {
        Step::Next
            if moves
                && graceful.gives_up_connections()
                && !state.may_upgrade.load(Ordering::SeqCst) =>
        {
            let idle = tokio::select! {
                biased;
                result = &mut conn => Err(Step::Ended(result)),
                () = busy.idle() => Ok(true),
                _ = graceful.closing() => Ok(false),
                _ = &mut forced => Err(Step::Closed),
            };
            match idle {
                Ok(true) if !state.may_upgrade.load(Ordering::SeqCst) => {
                    return give_up(conn, state, busy, graceful, token, &mut forced).await;
                }
                Ok(_) => Step::Next,
                Err(step) => step,
            }
        }
        step => step,
    };
    let step = match step {
        Step::Next if busy.is_idle() => {
            // An idle HTTP/1 connection: its client may have a request on
            // the wire that closing now would reset. Give it the grace; a
            // request that arrives in it is served with `Connection:
            // close`, after which hyper closes by itself.
            tokio::select! {
                result = &mut conn => Step::Ended(result),
                () = tokio::time::sleep(settings.idle_grace) => Step::Next,
                _ = &mut forced => {
                    log!(debug, "connection forced closed");
                    Step::Closed
                }
            }
        }
        step => step,
    };
    let step = match step {
        Step::Next => {
            // Busy at drain start: closed right after the response in
            // progress (its client is reading, not writing). After the
            // grace: closed if idle, or after the response in progress.
            Pin::new(&mut conn).graceful_shutdown();
            tokio::select! {
                result = &mut conn => Step::Ended(result),
                _ = &mut forced => {
                    log!(debug, "connection forced closed");
                    Step::Closed
                }
            }
        }
        step => step,
    };
    // The connection, and with it the IO unless upgraded, goes first.
    drop(conn);
    match step {
        Step::Ended(result) => {
            log_end(result.map_err(Into::into));
            finish(state, graceful, token)
        }
        _ => Ended::Done,
    }
}

/// What an HTTP/1 connection's phases share.
struct Served<'a> {
    state: &'a Arc<ConnState>,
    busy: &'a Arc<Busy>,
    graceful: &'a Graceful,
    settings: &'a ConnSettings,
    expired: &'a mut super::busy::Expired,
    watching: bool,
}

/// Gives an idle HTTP/1 connection up: hyper stops it without a word to
/// the client and without shutting its socket down, and hands back the
/// socket and what it read and did not parse. A request that came in the
/// meantime is answered first, with `Connection: close` (hyper's, since
/// keep-alive is off by then): then its client leaves, and the connection
/// is closed instead.
async fn give_up<I, S>(
    mut conn: H1Conn<I, S>,
    state: &Arc<ConnState>,
    busy: &Busy,
    graceful: &Graceful,
    token: ConnectionToken,
    forced: &mut Pin<&mut tokio_util::sync::WaitForCancellationFutureOwned>,
) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService,
{
    let started = busy.started();
    state.giving_up.store(true, Ordering::SeqCst);
    // Before its first request hyper has written nothing and counts the
    // connection as busy (it shuts it down only after a first request):
    // taken as it is, with the head it may have read in part. After one,
    // it finishes writing the last response, then stops.
    if started != 0 {
        Pin::new(&mut conn).graceful_shutdown();
        let result = tokio::select! {
            result = &mut conn => result,
            _ = forced => return Ended::Done,
        };
        if let Err(e) = result {
            log_end(Err(e.into()));
            return Ended::Done;
        }
    }
    if busy.started() != started {
        // Answered with `Connection: close`: closed, as any other drained
        // connection.
        state.giving_up.store(false, Ordering::SeqCst);
        return Ended::Done;
    }
    let Some(parts) = conn.into_parts() else {
        // Upgraded after all: its IO is the handler's.
        return finish(state, graceful, token);
    };
    drop(parts.service);
    let (io, rest) = parts.io.into_inner().into_parts();
    let unread = if rest.is_empty() {
        parts.read_buf
    } else if parts.read_buf.is_empty() {
        rest
    } else {
        // What hyper read came before what it had not read yet.
        let mut unread = BytesMut::from(&parts.read_buf[..]);
        unread.extend_from_slice(&rest);
        unread.freeze()
    };
    Ended::GivenUp { io, unread, token }
}

/// Drives an HTTP/2 connection until it ends, and through the drain:
/// GOAWAY at once, open streams finish.
async fn http2<I, S>(
    conn: H2Conn<I, S>,
    state: &Arc<ConnState>,
    busy: &Arc<Busy>,
    graceful: &Graceful,
    token: ConnectionToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService,
{
    let mut conn = pin!(conn);
    let mut drain = pin!(graceful.signal().draining());
    let mut forced = pin!(graceful.forced());
    tokio::select! {
        biased;
        result = conn.as_mut() => {
            log_end(result.map_err(Into::into));
            drop(token);
            return;
        }
        () = &mut drain => {}
    }
    conn.as_mut().graceful_shutdown();
    // Set when the close grace forced the connection for its tunnels.
    let mut tunnels_forced = false;
    tokio::select! {
        result = conn.as_mut() => log_end(result.map_err(Into::into)),
        _ = &mut forced => log!(debug, "connection forced closed"),
        () = tunnels_outlive_close_grace(graceful, busy) => {
            // WebSockets over HTTP/2 still open at the close grace, and
            // no other request in progress: the connection is closed, as
            // the IO of an upgraded HTTP/1 connection would be. First it
            // is polled once more, so that it writes what it has queued
            // (the end of the responses just finished) as far as its
            // socket takes it at once; a client that has stopped reading
            // does not hold it.
            let polled = std::future::poll_fn(|cx| {
                Poll::Ready(match conn.as_mut().poll(cx) {
                    Poll::Ready(result) => Some(result),
                    Poll::Pending => None,
                })
            });
            if let Some(result) = polled.await {
                log_end(result.map_err(Into::into));
            } else {
                log!(debug, "HTTP/2 tunnels forced closed at the close grace");
                state.force();
                tunnels_forced = true;
                tokio::select! {
                    result = conn.as_mut() => log_end(result.map_err(Into::into)),
                    _ = &mut forced => {}
                }
            }
        }
    }
    if tunnels_forced {
        token.forced_at_close_grace();
    }
}

/// Once an HTTP/1 connection's service has ended: if a request upgraded
/// it, hyper handed the IO to the handler (a WebSocket task), and it stays
/// counted, and forced at the close grace, until that IO is dropped (which
/// drops the last `state`, and the token with it).
fn finish<I>(state: &Arc<ConnState>, graceful: &Graceful, token: ConnectionToken) -> Ended<I> {
    if Arc::strong_count(state) > 1 {
        let force: Weak<dyn Force> = Arc::downgrade(state) as Weak<dyn Force>;
        let _ = state.upgrade.set(graceful.upgrade_token_forcing(force));
    }
    // Counted as an upgraded connection from now on, if it is one.
    drop(token);
    Ended::Done
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
