//! [`serve`]: an accept loop on hyper's HTTP/1 and HTTP/2 connections that
//! counts every connection and request on a [`Graceful`], and drains each
//! protocol the way its clients take without an error.
//!
//! Part of the drain half: it knows nothing of processes. A
//! [`Handover`](crate::Handover) runs the same loop through
//! [`Handover::serve`](crate::Handover::serve); when its drain gives
//! connections up, the loop hands each idle HTTP/1 connection (its socket,
//! the bytes read and not parsed, what its handshake learned) to the
//! hand-over half to carry, and serves on those the previous generation
//! gave up.

mod accept;
mod busy;
mod connection;
mod handshake;
pub(crate) mod host;
mod http;
mod info;
mod io;
pub(crate) mod moves;
mod presized;
mod run;
mod service;
mod watchdog;

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;

use crate::drain::Graceful;
use crate::error::BoxError;

pub use accept::Accept;
pub use handshake::{Handshake, NoHandshake};
pub use host::Host;
pub use http::HttpBuilder;
use info::{MakeExtend, MakeHandshakeExtend};

/// Default for [`Serve::idle_grace`]: 500 ms.
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_millis(500);
/// Default for [`Serve::header_read_timeout`]: 30 s, hyper's.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`Serve::handshake_timeout`]: 10 s.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`serve`] serves: a tower service of `Request<Incoming>` whose
/// responses have a body hyper can write (an axum `Router`, tonic's
/// `Routes`, a `tower::service_fn`). Implemented for every such service.
pub trait HttpService:
    tower_service::Service<
        Request<Incoming>,
        Response = Response<Self::ResBody>,
        Future: Send + 'static,
        Error: Into<BoxError>,
    > + Clone
    + Send
    + 'static
{
    /// The response body.
    type ResBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> HttpService for S
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    type ResBody = B;
}

/// Serves `service` on `listener` until `graceful` drains, then drains.
///
/// Every request is tracked as [`GracefulLayer`](crate::layer::GracefulLayer)
/// would track it (counted until its response body ends, `Connection:
/// close` once draining, event and gRPC streams ended at the close grace),
/// without the layer: there is no need to add it. Every connection is
/// counted on `graceful`. HTTP/1.1 and HTTP/2 (cleartext, with prior
/// knowledge) share the port. When the drain starts (by
/// [`Graceful::start_drain`], or a [`Handover`](crate::Handover)'s signal):
///
/// - nothing more is accepted: connections already waiting in the
///   listener's backlog are accepted and served through the drain (closing
///   the socket would reset them), and the listener is dropped at once;
/// - HTTP/2 connections get GOAWAY and finish their open streams;
/// - HTTP/1 responses carry `Connection: close`, so a keep-alive client
///   leaves after its next response; a connection with a request in
///   progress when the drain starts is closed right after that response;
///   an idle one is given [`idle_grace`](Serve::idle_grace), then closed;
/// - after the drain timeout ([`GracefulBuilder::drain_timeout`](crate::GracefulBuilder::drain_timeout)),
///   what is left is closed and counted as forced.
///
/// A connection upgraded with HTTP/1.1 `Upgrade` (a WebSocket) stays
/// counted until its upgraded IO is dropped, and is forced at the close
/// grace ([`GracefulBuilder::close_grace`](crate::GracefulBuilder::close_grace)).
/// WebSockets over HTTP/2 (RFC 8441 extended CONNECT) are offered too, as
/// `axum::serve` offers them; at the close grace, an HTTP/2 connection that
/// still carries one is closed once its other requests are answered.
///
/// `.await` the returned builder to run it; it resolves to the
/// [`DrainReport`](crate::DrainReport) once this server has drained.
/// Accept errors (such as running out of file descriptors) are logged and
/// retried with a backoff, never returned.
///
/// Pass an axum `Router` without state as `app.with_state(())`: that turns
/// every handler into a route once, as `axum::serve` does before it
/// serves, where a `Router` called as a plain service does it for every
/// request.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use axum::{Router, routing::get};
/// use handover::Graceful;
///
/// # async fn run() -> std::io::Result<()> {
/// let graceful = Graceful::builder()
///     .drain_timeout(Duration::from_secs(10))
///     .build();
/// let app = Router::new().route("/", get(|| async { "hello" })).with_state(());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
///
/// let trigger = graceful.clone();
/// tokio::spawn(async move {
///     let _ = tokio::signal::ctrl_c().await;
///     trigger.start_drain();
/// });
///
/// let report = handover::serve(listener, app, &graceful)
///     .idle_grace(Duration::from_millis(250))
///     .await?;
/// assert!(report.is_clean(), "{report}");
/// # Ok(())
/// # }
/// ```
pub fn serve<L, S>(listener: L, service: S, graceful: &Graceful) -> Serve<L, S>
where
    L: Accept,
    S: HttpService,
{
    Serve::new(listener, service, graceful.clone())
}

/// Adjusts the HTTP builder, after handover's own settings.
type Configure = Box<dyn FnOnce(&mut HttpBuilder) + Send>;

/// The settings of a serve loop that do not depend on its types.
struct Options {
    idle_grace: Duration,
    tcp_nodelay: bool,
    handshake_timeout: Duration,
    configure: Vec<Configure>,
    header_read_timeout: Option<Duration>,
    signal_extension: bool,
    hand_over_connections: bool,
}

/// The builder returned by [`serve`] and
/// [`Handover::serve`](crate::Handover::serve); `.await` it to run the
/// server.
///
/// `H` is the [handshake](Serve::handshake) each connection goes through
/// before HTTP (none, or TLS), and `R` who runs the loop, which decides
/// what `.await` gives (see [`Host`]).
#[must_use = "a server does nothing until it is `.await`ed"]
pub struct Serve<L: Accept, S, H: Handshake<L::Io> = NoHandshake, R = Graceful> {
    listener: L,
    service: S,
    host: R,
    handshake: Arc<H>,
    connect_info: Option<MakeExtend<L>>,
    handshake_info: Option<MakeHandshakeExtend<H::Io>>,
    options: Options,
}

impl<L: Accept, S, R: Host> Serve<L, S, NoHandshake, R> {
    /// A serve loop that `host` runs, with the defaults.
    pub(crate) fn new(listener: L, service: S, host: R) -> Self {
        Serve {
            listener,
            service,
            host,
            handshake: Arc::new(NoHandshake),
            connect_info: None,
            handshake_info: None,
            options: Options {
                idle_grace: DEFAULT_IDLE_GRACE,
                tcp_nodelay: true,
                handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
                configure: Vec::new(),
                header_read_timeout: Some(DEFAULT_HEADER_READ_TIMEOUT),
                signal_extension: false,
                hand_over_connections: true,
            },
        }
    }
}

impl<L: Accept, S, H: Handshake<L::Io>, R> Serve<L, S, H, R> {
    /// How long an HTTP/1 connection may stay open once the drain has
    /// started before it is shut down ([`DEFAULT_IDLE_GRACE`], 500 ms,
    /// unless set).
    ///
    /// A busy keep-alive client leaves long before that, after the
    /// `Connection: close` response it reads; the grace is for clients that
    /// sit idle, and for the client whose next request is already on the
    /// wire, which closing at once would reset.
    pub fn idle_grace(mut self, idle_grace: Duration) -> Self {
        self.options.idle_grace = idle_grace;
        self
    }

    /// Whether every request gets a [`DrainSignal`](crate::DrainSignal) in
    /// its extensions (off by default).
    ///
    /// Handlers that end long-lived work when the drain starts (WebSocket,
    /// event streams, long-polls, a readiness route) read it, with axum's
    /// `Extension<DrainSignal>`. It costs an allocation per request: rather
    /// than turn it on here, the routes that need it can have a layer that
    /// puts it in (`get(ws).layer(graceful.layer().signal_extension(true))`),
    /// which under this loop counts nothing again.
    pub fn signal_extension(mut self, enabled: bool) -> Self {
        self.options.signal_extension = enabled;
        self
    }

    /// How long an HTTP/1 connection may take to send a whole request head
    /// once it is waiting for one ([`DEFAULT_HEADER_READ_TIMEOUT`], 30 s,
    /// hyper's, unless set); `None` turns the limit off.
    ///
    /// A connection that sends a head too slowly (a slowloris client), or
    /// nothing at all, is closed, as is a keep-alive connection that stays
    /// idle that long, as under hyper's own timeout; it is closed between
    /// the timeout and a quarter more after it began to wait. HTTP/2
    /// connections are not limited: their clients (gRPC channels) may stay
    /// idle as long as they like. Once the drain starts, the idle grace and
    /// the drain timeout apply instead.
    pub fn header_read_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.options.header_read_timeout = timeout.into();
        self
    }

    /// Whether, on a hand-over to the next generation, this loop's idle
    /// HTTP/1 connections move there rather than close (on by default).
    ///
    /// HTTP/1 has no GOAWAY: closing a keep-alive connection between two
    /// requests races the client's next one, whatever the grace, and a
    /// pooled client (a load balancer, a browser) pays a new handshake. With
    /// this on, when a [`Handover`](crate::Handover) hands over to a
    /// generation that takes connections, each plaintext HTTP/1 connection
    /// moves: at once if idle, else once the response in progress has been
    /// written (within the close grace), and that response says nothing of
    /// the drain. The next generation serves it on, the bytes it had sent
    /// and this one had not parsed first: its client sees no close, no
    /// reset and no new handshake. TLS, HTTP/2 and upgraded connections,
    /// and every connection on a shutdown, drain as ever; so does one the
    /// next generation cannot take (it is never lost, nor served twice).
    /// Under [`serve`](crate::serve()) alone nothing moves.
    pub fn hand_over_connections(mut self, enabled: bool) -> Self {
        self.options.hand_over_connections = enabled;
        self
    }

    /// Whether accepted TCP connections get `TCP_NODELAY` (on by default).
    ///
    /// On keeps tail latency low for request/response traffic; off (Nagle)
    /// can raise HTTP/2 throughput of many small frames at the cost of
    /// tens of milliseconds on some responses.
    pub fn tcp_nodelay(mut self, nodelay: bool) -> Self {
        self.options.tcp_nodelay = nodelay;
        self
    }

    /// Adjusts hyper's HTTP/1 and HTTP/2 server settings: HTTP/2
    /// keep-alive pings for long gRPC streams (what tonic's
    /// `http2_keepalive_interval` sets on its own server), concurrent
    /// stream and header size limits, HTTP/1 buffer sizes.
    ///
    /// `configure` runs once, when serving starts, on builders that have
    /// handover's settings already: tokio's timer for both protocols, and
    /// extended CONNECT (WebSockets over HTTP/2). Call it again to add more.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// # async fn run(
    /// #     graceful: handover::Graceful,
    /// #     listener: tokio::net::TcpListener,
    /// #     app: axum::Router,
    /// # ) -> std::io::Result<()> {
    /// handover::serve(listener, app, &graceful)
    ///     .http_builder(|builder| {
    ///         builder
    ///             .http2()
    ///             .keep_alive_interval(Duration::from_secs(20))
    ///             .max_concurrent_streams(500);
    ///         builder.http1().max_buf_size(64 * 1024);
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn http_builder<F>(mut self, configure: F) -> Self
    where
        F: FnOnce(&mut HttpBuilder) + Send + 'static,
    {
        self.options.configure.push(Box::new(configure));
        self
    }

    /// Gives every request what `make` says of its connection, in its
    /// extensions: who the peer is, as `axum::serve` does for axum's
    /// `ConnectInfo` and tonic's server for `Request::remote_addr`.
    ///
    /// `make` runs once per connection, when it is accepted, with the
    /// accepted IO and the peer's address; each request on that connection
    /// gets a clone of its value. Call it again to add another value.
    /// Without it, requests carry no connection information.
    ///
    /// # Examples
    ///
    /// axum's `ConnectInfo` extractor, and tonic's `remote_addr`:
    ///
    /// ```no_run
    /// use std::net::SocketAddr;
    /// use axum::{Router, extract::ConnectInfo, routing::get};
    /// use tokio::net::TcpStream;
    /// use tonic::transport::server::TcpConnectInfo;
    ///
    /// # async fn run(graceful: handover::Graceful) -> std::io::Result<()> {
    /// let app = Router::new().route(
    ///     "/",
    ///     get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("hello {peer}") }),
    /// );
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// handover::serve(listener, app, &graceful)
    ///     .connect_info(|_, peer: &SocketAddr| ConnectInfo(*peer))
    ///     .connect_info(|io: &TcpStream, peer: &SocketAddr| TcpConnectInfo {
    ///         local_addr: io.local_addr().ok(),
    ///         remote_addr: Some(*peer),
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn connect_info<T, F>(mut self, make: F) -> Self
    where
        F: Fn(&L::Io, &L::Addr) -> T + Send + Sync + 'static,
        T: Clone + Send + Sync + 'static,
    {
        self.connect_info = Some(info::chain::<L, T, F>(self.connect_info.take(), make));
        self
    }

    /// The longest a [handshake](Serve::handshake) may take
    /// ([`DEFAULT_HANDSHAKE_TIMEOUT`], 10 s, unless set) before its
    /// connection is closed.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.options.handshake_timeout = timeout;
        self
    }

    /// Gives every request what `make` says of its connection as the
    /// [handshake](Serve::handshake) returned it: for TLS, the client's
    /// certificate, the server name it asked for, the protocol chosen.
    ///
    /// As [`connect_info`](Serve::connect_info), but run once the
    /// handshake is done, on its stream; call it again to add another
    /// value. Both may be used together.
    ///
    /// # Examples
    ///
    /// The client certificate of a mutual-TLS connection, for handlers to
    /// read with axum's `Extension` extractor:
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// use tokio::net::TcpStream;
    /// use tokio_rustls::server::TlsStream;
    /// use tokio_rustls::rustls::pki_types::CertificateDer;
    ///
    /// /// The certificate a client presented, leaf first.
    /// #[derive(Clone)]
    /// struct ClientChain(Arc<Vec<CertificateDer<'static>>>);
    ///
    /// # async fn run(
    /// #     graceful: handover::Graceful,
    /// #     listener: tokio::net::TcpListener,
    /// #     app: axum::Router,
    /// #     tls: tokio_rustls::TlsAcceptor,
    /// # ) -> std::io::Result<()> {
    /// handover::serve(listener, app, &graceful)
    ///     .handshake(move |tcp| tls.accept(tcp))
    ///     .handshake_info(|tls: &TlsStream<TcpStream>| {
    ///         let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    ///         ClientChain(Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect()))
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn handshake_info<T, F>(mut self, make: F) -> Self
    where
        F: Fn(&H::Io) -> T + Send + Sync + 'static,
        T: Clone + Send + Sync + 'static,
    {
        self.handshake_info = Some(info::chain_handshake(self.handshake_info.take(), make));
        self
    }

    /// Runs `handshake` on each accepted connection and serves HTTP on the
    /// stream it returns: terminates TLS, or reads a PROXY protocol header.
    ///
    /// The handshake runs in the connection's own task, bounded by
    /// [`handshake_timeout`](Serve::handshake_timeout); a connection whose
    /// handshake fails or times out is closed (and logged at `debug`). The
    /// connection counts from its `accept`, so a drain waits for a
    /// handshake in progress, for at most [`idle_grace`](Serve::idle_grace):
    /// a client that connected just before the drain started finishes its
    /// handshake and is served, with `Connection: close` or GOAWAY as any
    /// other, and one that stays silent is closed then, as an idle
    /// connection is. [`connect_info`](Serve::connect_info) and
    /// [`tcp_nodelay`](Serve::tcp_nodelay) apply to the connection as
    /// accepted, before the handshake; a
    /// [`handshake_info`](Serve::handshake_info) set before this call is
    /// dropped (it read another stream type).
    ///
    /// For HTTP/2 over TLS, offer it by ALPN (`h2`, then `http/1.1`): HTTP/1.1
    /// and HTTP/2 share the port, told apart by what the client sends first.
    ///
    /// # Examples
    ///
    /// TLS with tokio-rustls, the certificate read at start-up, so that each
    /// new generation serves the certificate on disk when it starts (a
    /// `SIGHUP` after a renewal is enough):
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use axum::{Router, routing::get};
    /// use tokio_rustls::TlsAcceptor;
    /// use tokio_rustls::rustls::ServerConfig;
    /// use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    ///
    /// # async fn run(
    /// #     graceful: handover::Graceful,
    /// #     chain: Vec<CertificateDer<'static>>,
    /// #     key: PrivateKeyDer<'static>,
    /// # ) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut config = ServerConfig::builder()
    ///     .with_no_client_auth()
    ///     .with_single_cert(chain, key)?;
    /// config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    /// let tls = TlsAcceptor::from(Arc::new(config));
    ///
    /// let app = Router::new().route("/", get(|| async { "hello over TLS" }));
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3443").await?;
    /// handover::serve(listener, app, &graceful)
    ///     .handshake(move |tcp| tls.accept(tcp))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn handshake<T: Handshake<L::Io>>(self, handshake: T) -> Serve<L, S, T, R> {
        Serve {
            listener: self.listener,
            service: self.service,
            host: self.host,
            handshake: Arc::new(handshake),
            connect_info: self.connect_info,
            handshake_info: None,
            options: self.options,
        }
    }
}

impl<L: Accept, S, H: Handshake<L::Io>, R> fmt::Debug for Serve<L, S, H, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options = &self.options;
        f.debug_struct("Serve")
            .field("local_addr", &self.listener.local_addr().ok())
            .field("idle_grace", &options.idle_grace)
            .field("tcp_nodelay", &options.tcp_nodelay)
            .field("connect_info", &self.connect_info.is_some())
            .field("handshake", &std::any::type_name::<H>())
            .field("handshake_timeout", &options.handshake_timeout)
            .field("handshake_info", &self.handshake_info.is_some())
            .field("http_builder", &options.configure.len())
            .field("header_read_timeout", &options.header_read_timeout)
            .field("signal_extension", &options.signal_extension)
            .field("hand_over_connections", &options.hand_over_connections)
            .finish_non_exhaustive()
    }
}

impl<L, S, H, R> IntoFuture for Serve<L, S, H, R>
where
    L: Accept,
    S: HttpService,
    H: Handshake<L::Io>,
    R: Host,
{
    type Output = R::Output;
    type IntoFuture = ServeFuture<R::Output>;

    fn into_future(self) -> Self::IntoFuture {
        ServeFuture(Box::pin(run::run(self)))
    }
}

/// The future of a [`Serve`]: serves until the drain, then drains.
///
/// Resolves to the [`DrainReport`](crate::DrainReport) for [`serve`], and
/// to how the generation ended ([`Exit`](crate::Exit)) for
/// [`Handover::serve`](crate::Handover::serve).
#[must_use = "futures do nothing unless polled"]
pub struct ServeFuture<T>(Pin<Box<dyn Future<Output = T> + Send>>);

impl<T> Future for ServeFuture<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        self.0.as_mut().poll(cx)
    }
}

impl<T> fmt::Debug for ServeFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeFuture").finish_non_exhaustive()
    }
}
