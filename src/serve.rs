//! The accept loop: every connection tracked, HTTP/1 and HTTP/2 drained
//! without a client error.

use std::error::Error as StdError;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Method, Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower_service::Service;

use crate::graceful::{
    ConnectionToken, DrainReport, Force, Graceful, ShutdownSignal, UpgradeToken,
};
use crate::layer::{ResponseFuture, Tracked, TrackedBody, serving, track};

mod busy;
use busy::{Busy, BusyGuard, Watched};

type BoxError = Box<dyn StdError + Send + Sync>;

/// Adds one connection's values to the extensions of a request on it.
type Extend = Arc<dyn Fn(&mut http::Extensions) + Send + Sync>;
/// Makes a connection's [`Extend`] from its IO and peer address.
type MakeExtend<L> =
    Arc<dyn Fn(&<L as Listener>::Io, &<L as Listener>::Addr) -> Extend + Send + Sync>;
/// Makes a connection's [`Extend`] from the stream its acceptor returned.
type MakeAcceptedExtend<Io> = Arc<dyn Fn(&Io) -> Extend + Send + Sync>;

/// Says, when the drain starts, whether the listener is about to close for
/// good (nothing else will accept from it), so that what waits in its
/// backlog is better accepted and served than reset.
type ClosesForGood = Arc<dyn Fn() -> bool + Send + Sync>;

/// Adjusts the HTTP builder, after handover's own settings.
type Configure = Box<dyn FnOnce(&mut Builder<TokioExecutor>) + Send>;

/// Inserts a clone of `value`.
fn insert<T: Clone + Send + Sync + 'static>(value: T) -> Extend {
    Arc::new(move |extensions: &mut http::Extensions| {
        extensions.insert(value.clone());
    })
}

/// Both, in this order.
fn both(first: Extend, then: Extend) -> Extend {
    Arc::new(move |extensions: &mut http::Extensions| {
        first(extensions);
        then(extensions);
    })
}

/// Default for [`Serve::idle_grace`].
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_millis(500);
/// Default for [`Serve::drain_timeout`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`Serve::header_read_timeout`]: hyper's.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`Serve::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A source of connections for [`serve`]: a TCP or Unix listener, or your own.
///
/// `accept` must be cancel safe (as tokio's listeners are): the serve loop
/// drops its future the moment a drain starts.
pub trait Listener: Send + 'static {
    /// The connection type.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The peer address type.
    type Addr: fmt::Debug + Send + 'static;

    /// Accepts the next connection.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;

    /// The address this listener is bound to.
    fn local_addr(&self) -> io::Result<Self::Addr>;

    /// Sets `TCP_NODELAY` on an accepted connection, where that means
    /// something. The default does nothing.
    fn set_nodelay(io: &Self::Io, nodelay: bool) -> io::Result<()> {
        let _ = (io, nodelay);
        Ok(())
    }
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        tokio::net::TcpListener::accept(self)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        tokio::net::TcpListener::local_addr(self)
    }

    fn set_nodelay(io: &Self::Io, nodelay: bool) -> io::Result<()> {
        io.set_nodelay(nodelay)
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        tokio::net::UnixListener::accept(self)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        tokio::net::UnixListener::local_addr(self)
    }
}

/// Makes the stream that HTTP is served on from an accepted connection: a
/// TLS handshake, or reading a PROXY protocol header (with
/// [`Serve::accepted_info`] to hand on the client's address). Set with
/// [`Serve::acceptor`].
///
/// Any `Fn(I) -> impl Future<Output = io::Result<Io>>` is one, such as
/// `move |tcp| tls.accept(tcp)` with tokio-rustls's `TlsAcceptor`.
///
/// The future runs in the connection's own task, so a slow handshake holds
/// up no other connection, and the connection counts from the moment it is
/// accepted, so a drain waits for a handshake in progress (see
/// [`Serve::acceptor`] for how long).
pub trait Accept<I>: Send + Sync + 'static {
    /// The stream HTTP is served on.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The handshake.
    type Future: Future<Output = io::Result<Self::Io>> + Send + 'static;

    /// Starts the handshake on an accepted connection.
    fn accept(&self, io: I) -> Self::Future;
}

/// The [`Accept`] that serves HTTP on each connection as it was accepted:
/// what [`serve`] does unless [`Serve::acceptor`] says otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultAcceptor;

impl<I> Accept<I> for DefaultAcceptor
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = I;
    type Future = std::future::Ready<io::Result<I>>;

    fn accept(&self, io: I) -> Self::Future {
        std::future::ready(Ok(io))
    }
}

impl<I, F, Fut, Io> Accept<I> for F
where
    F: Fn(I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<Io>> + Send + 'static,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = Io;
    type Future = Fut;

    fn accept(&self, io: I) -> Self::Future {
        self(io)
    }
}

/// Serves `service` on `listener` until `graceful` drains, then drains.
///
/// Every request is tracked as [`GracefulLayer`](crate::GracefulLayer) would
/// track it (counted until its response body ends, `Connection: close` once
/// draining, event and gRPC streams ended at the close grace), without the
/// layer: there is no need to add it, but on the routes whose handlers read
/// the [`ShutdownSignal`](crate::ShutdownSignal), which `serve` puts in no
/// request by default (see [`Serve::signal_extension`]). Every connection
/// is counted on `graceful`. HTTP/1 connections that do not send a request
/// head within [`header_read_timeout`](Serve::header_read_timeout) are
/// closed. HTTP/1.1 and HTTP/2 (cleartext,
/// with prior knowledge) share the port. When the drain starts (by
/// [`Graceful::start_drain`] or a signal driver):
///
/// - nothing more is accepted: connections already waiting in the
///   listener's backlog are accepted and served through the drain (closing
///   the socket would reset them), and the listener is dropped at once;
/// - HTTP/2 connections get GOAWAY and finish their open streams;
/// - HTTP/1 responses carry `Connection: close`, so a keep-alive client
///   leaves after its next response; a connection with a request in
///   progress when the drain starts is closed right after that response
///   (even one whose head went out before the drain); an idle one is given
///   [`idle_grace`](Serve::idle_grace), then closed;
/// - after [`drain_timeout`](Serve::drain_timeout), what is left is closed
///   and counted as forced.
///
/// A connection upgraded with HTTP/1.1 `Upgrade` (a WebSocket) stays
/// counted until its upgraded IO is dropped, and is forced at the
/// [`close_grace`](Serve::close_grace).
///
/// WebSockets over HTTP/2 (RFC 8441 extended CONNECT) are offered too, as
/// `axum::serve` offers them (axum's `http2` feature and an `any` route
/// accept them). Each is a stream inside its connection, which stays
/// counted as a connection while one is open. A handler that watches the
/// [`ShutdownSignal`](crate::ShutdownSignal) ends it; at the close grace, a
/// connection that still carries one is closed once its other requests are
/// answered, and counts as upgraded and forced.
///
/// `.await` the returned builder to run it; it resolves to the
/// [`DrainReport`] once this server has drained. Accept errors (such as
/// running out of file descriptors) are logged and retried with a backoff,
/// never returned.
///
/// # Performance
///
/// An axum `Router` without state is best passed as `app.with_state(())`,
/// which turns every handler into a route once, as `axum::serve` does
/// before it serves. A `Router` called as a plain tower service does that
/// on every request (about 180 instructions of a hello-world's 15,400, and
/// 730 with a layer on the whole router). A router given its state already
/// is ready as it is.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use axum::{Router, routing::get};
/// use handover::Graceful;
///
/// # async fn run() -> std::io::Result<()> {
/// let graceful = Graceful::new();
/// let app = Router::new().route("/", get(|| async { "hello" }));
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
///     .drain_timeout(Duration::from_secs(10))
///     .await?;
/// assert!(report.is_clean(), "{report}");
/// # Ok(())
/// # }
/// ```
pub fn serve<L, S, B>(listener: L, service: S, graceful: &Graceful) -> Serve<L, S>
where
    L: Listener,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Serve {
        listener,
        service,
        graceful: graceful.clone(),
        idle_grace: DEFAULT_IDLE_GRACE,
        drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        close_grace: None,
        tcp_nodelay: true,
        connect_info: None,
        acceptor: Arc::new(DefaultAcceptor),
        handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        accepted_info: None,
        configure: Vec::new(),
        closes_for_good: None,
        header_read_timeout: Some(DEFAULT_HEADER_READ_TIMEOUT),
        signal_extension: false,
    }
}

/// The builder returned by [`serve`]; `.await` it to run the server.
#[must_use = "a server does nothing until it is `.await`ed"]
pub struct Serve<L: Listener, S, A: Accept<L::Io> = DefaultAcceptor> {
    listener: L,
    service: S,
    graceful: Graceful,
    idle_grace: Duration,
    drain_timeout: Duration,
    close_grace: Option<Duration>,
    tcp_nodelay: bool,
    connect_info: Option<MakeExtend<L>>,
    acceptor: Arc<A>,
    handshake_timeout: Duration,
    accepted_info: Option<MakeAcceptedExtend<A::Io>>,
    configure: Vec<Configure>,
    /// `None`: the listener closes when the serve loop drops it.
    closes_for_good: Option<ClosesForGood>,
    header_read_timeout: Option<Duration>,
    signal_extension: bool,
}

impl<L: Listener, S, A: Accept<L::Io>> Serve<L, S, A> {
    /// How long an HTTP/1 connection may stay open once the drain has
    /// started before it is shut down (500 ms by default).
    ///
    /// A busy keep-alive client leaves long before that, after the
    /// `Connection: close` response it reads; the grace is for clients that
    /// sit idle, and for the client whose next request is already on the
    /// wire, which closing at once would reset.
    pub fn idle_grace(mut self, idle_grace: Duration) -> Self {
        self.idle_grace = idle_grace;
        self
    }

    /// The longest a drain may take (30 s by default); after it, remaining
    /// connections are closed and counted as forced.
    pub fn drain_timeout(mut self, drain_timeout: Duration) -> Self {
        self.drain_timeout = drain_timeout;
        self
    }

    /// How long upgraded connections (WebSocket) and event or gRPC streams
    /// have, once the drain starts, to say goodbye before they are forced.
    ///
    /// Sets [`Graceful::set_close_grace`] on the handle this server drains
    /// (whose default is [`DEFAULT_CLOSE_GRACE`](crate::DEFAULT_CLOSE_GRACE));
    /// see there for what "forced" means for each kind.
    pub fn close_grace(mut self, close_grace: Duration) -> Self {
        self.close_grace = Some(close_grace);
        self
    }

    /// Whether every request gets a [`ShutdownSignal`](crate::ShutdownSignal)
    /// in its extensions (off by default).
    ///
    /// Handlers that end long-lived work when the drain starts (WebSocket,
    /// event streams, long-polls, a readiness route) read it, with axum's
    /// `Extension<ShutdownSignal>`. Rather than turn it on here, add
    /// [`GracefulLayer`](crate::GracefulLayer) to just those routes
    /// (`get(ws).layer(graceful.layer())`): under this serve loop the layer
    /// counts nothing again, and puts the signal in. On every request it
    /// costs an allocation and a copy of a small map, which the
    /// application's own extensions then fill without growing it: about 2%
    /// of a hello-world axum server's instructions per request (see the
    /// README).
    pub fn signal_extension(mut self, enabled: bool) -> Self {
        self.signal_extension = enabled;
        self
    }

    /// How long an HTTP/1 connection may take to send a whole request head
    /// once it is waiting for one (30 s by default, as hyper's
    /// `header_read_timeout`); `None` turns the limit off.
    ///
    /// A connection that sends a head too slowly (a slowloris client), or
    /// nothing at all, is closed, as is a keep-alive connection that stays
    /// idle that long, as under hyper's own timeout. hyper arms a timer for
    /// every request to do this; here one task per serve loop looks at each
    /// connection four times per timeout, so nothing is spent per request,
    /// and a connection is closed between the timeout and a quarter more
    /// after it began to wait. HTTP/2 connections are not limited: their
    /// clients (gRPC channels) may stay idle as long as they like. Once the
    /// drain starts, the idle grace and the drain timeout apply instead.
    pub fn header_read_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.header_read_timeout = timeout.into();
        self
    }

    /// Whether accepted TCP connections get `TCP_NODELAY` (on by default).
    ///
    /// On keeps tail latency low for request/response traffic; off (Nagle)
    /// can raise HTTP/2 throughput of many small frames at the cost of
    /// tens of milliseconds on some responses.
    pub fn tcp_nodelay(mut self, nodelay: bool) -> Self {
        self.tcp_nodelay = nodelay;
        self
    }

    /// Adjusts hyper-util's HTTP/1 and HTTP/2 server settings: HTTP/2
    /// keep-alive pings for long gRPC streams (what tonic's
    /// `http2_keepalive_interval` sets on its own server), concurrent
    /// stream and header size limits, HTTP/1 header read timeouts.
    ///
    /// `configure` runs once, when serving starts, on a builder that has
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
    ///         builder.http1().header_read_timeout(Duration::from_secs(10));
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn http_builder<F>(mut self, configure: F) -> Self
    where
        F: FnOnce(&mut Builder<TokioExecutor>) + Send + 'static,
    {
        self.configure.push(Box::new(configure));
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
        let previous = self.connect_info.take();
        self.connect_info = Some(Arc::new(move |io: &L::Io, addr: &L::Addr| {
            let info = insert(make(io, addr));
            match &previous {
                Some(previous) => both(previous(io, addr), info),
                None => info,
            }
        }));
        self
    }

    /// The longest an [`acceptor`](Serve::acceptor)'s handshake may take
    /// (10 s by default) before its connection is closed.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Gives every request what `make` says of its connection as the
    /// [`acceptor`](Serve::acceptor) returned it: for TLS, the client's
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
    ///     .acceptor(move |tcp| tls.accept(tcp))
    ///     .accepted_info(|tls: &TlsStream<TcpStream>| {
    ///         let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    ///         ClientChain(Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect()))
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn accepted_info<T, F>(mut self, make: F) -> Self
    where
        F: Fn(&A::Io) -> T + Send + Sync + 'static,
        T: Clone + Send + Sync + 'static,
    {
        let previous = self.accepted_info.take();
        self.accepted_info = Some(Arc::new(move |io: &A::Io| {
            let info = insert(make(io));
            match &previous {
                Some(previous) => both(previous(io), info),
                None => info,
            }
        }));
        self
    }

    /// When the drain starts, the listener closes for good only if `check`
    /// says so then (it does not when a next generation accepts from the
    /// same socket); by default it does.
    pub(crate) fn closes_for_good_if(
        mut self,
        check: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        self.closes_for_good = Some(Arc::new(check));
        self
    }
}

impl<L: Listener, S> Serve<L, S> {
    /// Runs `acceptor` on each accepted connection and serves HTTP on the
    /// stream it returns: terminates TLS, for one.
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
    /// accepted, before the handshake.
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
    ///     .acceptor(move |tcp| tls.accept(tcp))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn acceptor<A>(self, acceptor: A) -> Serve<L, S, A>
    where
        A: Accept<L::Io>,
    {
        Serve {
            listener: self.listener,
            service: self.service,
            graceful: self.graceful,
            idle_grace: self.idle_grace,
            drain_timeout: self.drain_timeout,
            close_grace: self.close_grace,
            tcp_nodelay: self.tcp_nodelay,
            connect_info: self.connect_info,
            acceptor: Arc::new(acceptor),
            handshake_timeout: self.handshake_timeout,
            accepted_info: None,
            configure: self.configure,
            closes_for_good: self.closes_for_good,
            header_read_timeout: self.header_read_timeout,
            signal_extension: self.signal_extension,
        }
    }
}

impl<L: Listener, S, A: Accept<L::Io>> fmt::Debug for Serve<L, S, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serve")
            .field("local_addr", &self.listener.local_addr().ok())
            .field("idle_grace", &self.idle_grace)
            .field("drain_timeout", &self.drain_timeout)
            .field("close_grace", &self.close_grace)
            .field("tcp_nodelay", &self.tcp_nodelay)
            .field("connect_info", &self.connect_info.is_some())
            .field("acceptor", &std::any::type_name::<A>())
            .field("handshake_timeout", &self.handshake_timeout)
            .field("accepted_info", &self.accepted_info.is_some())
            .field("http_builder", &self.configure.len())
            .field("header_read_timeout", &self.header_read_timeout)
            .field("signal_extension", &self.signal_extension)
            .finish_non_exhaustive()
    }
}

impl<L, S, B, A> IntoFuture for Serve<L, S, A>
where
    L: Listener,
    A: Accept<L::Io>,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = io::Result<DrainReport>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let Serve {
                mut listener,
                service,
                graceful,
                idle_grace,
                drain_timeout,
                close_grace,
                tcp_nodelay,
                connect_info,
                acceptor,
                handshake_timeout,
                accepted_info,
                configure,
                closes_for_good,
                header_read_timeout,
                signal_extension,
            } = self;
            if let Some(close_grace) = close_grace {
                graceful.set_close_grace(close_grace);
            }
            let mut builder = Builder::new(TokioExecutor::new());
            // hyper's own header read timeout arms a timer for every
            // request; the watchdog below does its work for all of them.
            // The timer stays set, so that a `header_read_timeout` set
            // through `http_builder` works as in hyper.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(None);
            // Extended CONNECT (RFC 8441): WebSockets over HTTP/2, as
            // `axum::serve` offers them.
            builder
                .http2()
                .timer(TokioTimer::new())
                .enable_connect_protocol();
            for configure in configure {
                configure(&mut builder);
            }
            // Looks at every connection a few times per header read
            // timeout, until the drain starts.
            let mut watchdog = None;
            let watched = header_read_timeout.and_then(|timeout| {
                let watched = Arc::new(Watched::default());
                match watched.clone().start(timeout) {
                    Ok(started) => watchdog = Some(started),
                    Err(e) => {
                        log!(error, error = %e, "could not start the header read timeout's watchdog; serving without it");
                        return None;
                    }
                }
                Some(watched)
            });
            // The service, layers and all, is built by now.
            let presized = if signal_extension {
                Some(Presized::new(Some(graceful.signal_with(true))))
            } else {
                graceful.has_signal_layer().then(|| Presized::new(None))
            };
            let settings = Arc::new(ConnSettings {
                builder,
                idle_grace,
                watched,
                presized: presized.map(Arc::new),
            });
            // With metrics, the gauges of what is open, once a second.
            #[cfg(feature = "metrics")]
            let gauges = {
                let graceful = graceful.clone();
                AbortOnDrop(tokio::spawn(async move {
                    let mut every = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        every.tick().await;
                        sample_gauges(&graceful);
                    }
                }))
            };
            // Each accepted connection runs in a task of its own.
            let connections = graceful.clone();
            let start = move |io: L::Io, peer: L::Addr| {
                if let Err(e) = L::set_nodelay(&io, tcp_nodelay) {
                    log!(debug, error = %e, ?peer, "could not set TCP_NODELAY");
                }
                // Counted from now: a drain waits for the handshake too.
                let graceful = &connections;
                let token = graceful.connection_token();
                let acceptor = acceptor.clone();
                let service = service.clone();
                let settings = settings.clone();
                let graceful = graceful.clone();
                let connect_info = connect_info.clone();
                let accepted_info = accepted_info.clone();
                // In the connection's task, not here: the application's
                // closures cannot stall or end the accept loop.
                tokio::spawn(async move {
                    let extend = connect_info.map(|make| make(&io, &peer));
                    let handshake = acceptor.accept(io);
                    let idle_grace = settings.idle_grace;
                    let Some(io) =
                        handshake_within(handshake, &graceful, handshake_timeout, idle_grace).await
                    else {
                        return;
                    };
                    let extend = match (extend, accepted_info.map(|make| make(&io))) {
                        (Some(first), Some(then)) => Some(both(first, then)),
                        (first, then) => first.or(then),
                    };
                    serve_connection(io, service, extend, &settings, graceful, token).await;
                });
            };

            let mut drain = pin!(graceful.signal().draining());
            let mut backoff = ACCEPT_BACKOFF_MIN;
            loop {
                let accepted = tokio::select! {
                    biased;
                    () = &mut drain => break,
                    accepted = listener.accept() => accepted,
                };
                match accepted {
                    Ok((io, peer)) => {
                        backoff = ACCEPT_BACKOFF_MIN;
                        start(io, peer);
                    }
                    Err(e) if is_connection_error(&e) => {}
                    Err(e) => {
                        log!(error, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                        tokio::select! {
                            biased;
                            () = &mut drain => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                }
            }
            // The drain's idle grace and deadline take over from here.
            drop(watchdog);
            // Closing the socket resets every connection still waiting in
            // its backlog: when nothing else will accept them, they are
            // accepted and served through the drain first.
            if closes_for_good.as_ref().is_none_or(|closes| closes()) {
                while let Some(accepted) = accept_now(&mut listener) {
                    match accepted {
                        Ok((io, peer)) => start(io, peer),
                        Err(e) if is_connection_error(&e) => {}
                        Err(_) => break,
                    }
                }
            }
            drop(listener);
            log!(
                info,
                connections = graceful.connections(),
                in_flight = graceful.in_flight(),
                "stopped accepting; draining"
            );
            let report = graceful.drain(drain_timeout).await;
            #[cfg(feature = "metrics")]
            {
                drop(gauges);
                sample_gauges(&graceful);
            }
            Ok(report)
        })
    }
}

/// A connection already waiting in `listener`'s backlog, if there is one:
/// its `accept` polled once, never waiting.
fn accept_now<L: Listener>(listener: &mut L) -> Option<io::Result<(L::Io, L::Addr)>> {
    let accept = pin!(listener.accept());
    match accept.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => Some(result),
        Poll::Pending => None,
    }
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Sets the metrics' gauges from `graceful`'s counts.
#[cfg(feature = "metrics")]
fn sample_gauges(graceful: &Graceful) {
    crate::metrics::gauges(
        graceful.in_flight(),
        graceful.connections(),
        graceful.upgraded(),
    );
}

/// Aborts a task when dropped: it ends with the serve loop.
#[cfg(feature = "metrics")]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

#[cfg(feature = "metrics")]
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Errors that concern one connection only: skip it and accept the next.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Runs an [`Accept`] handshake: `None` when it failed, took longer than
/// `timeout`, or was still running `idle_grace` after the drain started (or
/// at the drain's deadline).
async fn handshake_within<F, Io>(
    handshake: F,
    graceful: &Graceful,
    timeout: Duration,
    idle_grace: Duration,
) -> Option<Io>
where
    F: Future<Output = io::Result<Io>>,
{
    let mut handshake = pin!(handshake);
    // Without an acceptor (or with one that needs no round trip) it is
    // done at once: no timer, no drain watch.
    let now = std::future::poll_fn(|cx| Poll::Ready(handshake.as_mut().poll(cx))).await;
    let result = match now {
        Poll::Ready(result) => result,
        Poll::Pending => {
            let mut handshake = pin!(tokio::time::timeout(timeout, handshake));
            let mut drain = pin!(graceful.signal().draining());
            let result = tokio::select! {
                result = handshake.as_mut() => result,
                () = &mut drain => tokio::select! {
                    result = handshake.as_mut() => result,
                    () = tokio::time::sleep(idle_grace) => {
                        log!(debug, "handshake still running at the drain's idle grace; closed");
                        return None;
                    }
                    _ = graceful.forced() => return None,
                },
            };
            let Ok(result) = result else {
                log!(
                    debug,
                    timeout_ms = timeout.as_millis() as u64,
                    "handshake timed out"
                );
                return None;
            };
            result
        }
    };
    match result {
        Ok(io) => Some(io),
        Err(e) => {
            log!(debug, error = %e, "handshake failed");
            None
        }
    }
}

/// What every connection of one serve loop is served with.
struct ConnSettings {
    builder: Builder<TokioExecutor>,
    idle_grace: Duration,
    /// The slowloris watchdog's, if it runs.
    watched: Option<Arc<Watched>>,
    /// What each request's extensions start from, when something will put
    /// a `ShutdownSignal` in them: this loop or a layer.
    presized: Option<Arc<Presized>>,
}

async fn serve_connection<I, S, B>(
    io: I,
    service: S,
    extend: Option<Extend>,
    settings: &ConnSettings,
    graceful: Graceful,
    token: ConnectionToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
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

/// An extension map to start each request's from: with room for seven
/// entries, and the serve loop's [`ShutdownSignal`] in it if it puts one
/// in every request.
///
/// A request's extensions start without a map. The first insert allocates
/// one with room for three entries, and the fourth makes it grow (a second
/// allocation, every entry moved). An axum `Router` puts three in every
/// request (the matched path, the path parameters, the original URI), so
/// a signal put in by the serve loop, or by a layer on the routes, is the
/// fourth. A clone of this map keeps its room (a `HashMap`'s clone has the
/// same capacity), so moving one into an empty request costs what the
/// first insert would have cost, and the growth never happens: in a
/// hello-world axum app over HTTP/1, about 400 instructions fewer per
/// request both for the serve loop's own signal (which then costs about
/// 300 instead of 700) and for a router-wide `.layer(graceful.layer())`.
/// Were a clone ever to lose the room, nothing would break: the map would
/// grow as before.
struct Presized {
    extensions: http::Extensions,
    /// For HTTP/2 requests too: only with the loop's own signal. An HTTP/2
    /// request is served in a task of its own, often on the other thread:
    /// room made on the connection's task would be allocated on one thread
    /// and freed on the other, which costs more than the growth it saves
    /// (measured). The loop's signal goes in there all the same, as it did
    /// before there was room to make.
    http2: bool,
}

impl Presized {
    /// Room for seven, holding `signal` (the loop's own, for every
    /// request) if given, or empty, for a layer's signal.
    fn new(signal: Option<ShutdownSignal>) -> Self {
        #[derive(Clone)]
        struct Room<const N: usize>;
        let mut extensions = http::Extensions::new();
        // Four entries make the map grow to eight buckets, room for seven;
        // removing them leaves it that size.
        extensions.insert(Room::<0>);
        extensions.insert(Room::<1>);
        extensions.insert(Room::<2>);
        extensions.insert(Room::<3>);
        extensions.remove::<Room<0>>();
        extensions.remove::<Room<1>>();
        extensions.remove::<Room<2>>();
        extensions.remove::<Room<3>>();
        let http2 = signal.is_some();
        if let Some(signal) = signal {
            extensions.insert(signal);
        }
        Self { extensions, http2 }
    }

    /// Puts a copy in `req`'s extensions (over HTTP/2 only with the loop's
    /// signal): moved in whole when they have no map yet (as when hyper
    /// hands a request over, unless it asks to upgrade), entry by entry
    /// otherwise.
    #[inline]
    fn put_in<B>(&self, req: &mut Request<B>) {
        if self.http2 || req.version() < http::Version::HTTP_2 {
            req.extensions_mut().extend(self.extensions.clone());
        }
    }
}

/// One connection's hyper service: does for each request what
/// [`GracefulLayer`](crate::GracefulLayer) does (counts it until its
/// response body ends, gives it a [`ShutdownSignal`](crate::ShutdownSignal),
/// `Connection: close` once draining), and also counts it on the
/// connection, from `call` until the response body is dropped, so that the
/// drain can tell a busy HTTP/1 connection from an idle one. hyper drops a
/// response body as soon as it has written its end (and at once after a
/// 2xx to a CONNECT, whose stream it hands to the handler). It adds the
/// connection's [`Serve::connect_info`] to each request too.
///
/// As hyper-util's `TowerToHyperService`, it clones the application's
/// service for each request and calls it once it is ready; nothing of its
/// own is cloned but the connection's count.
struct ConnService<S> {
    inner: S,
    graceful: Graceful,
    conn: Arc<ConnState>,
    busy: Arc<Busy>,
    extend: Option<Extend>,
    presized: Option<Arc<Presized>>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
{
    type Response = Response<BusyBody<TrackedBody<B>>>;
    type Error = BoxError;
    type Future = ConnFuture<S>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let busy = self.busy.start();
        // Counted before the signal goes in: a request that carries one of
        // this `Graceful`'s counts as counted already.
        let tracked = track(&self.graceful, false, true, &mut req);
        if let Some(presized) = &self.presized {
            presized.put_in(&mut req);
        }
        if let Some(extend) = &self.extend {
            extend(req.extensions_mut());
        }
        // hyper offers an upgrade (HTTP/1.1 `Upgrade`, `CONNECT`) only to a
        // request that asks for one: from now on the IO may go to another
        // task, which a force must wake.
        if req
            .extensions()
            .get::<hyper::upgrade::OnUpgrade>()
            .is_some()
        {
            self.conn.may_upgrade.store(true, Ordering::SeqCst);
        }
        // Only HTTP/2 carries `:protocol`, and only with extended CONNECT.
        let tunnel = req.method() == Method::CONNECT
            && req.extensions().get::<hyper::ext::Protocol>().is_some();
        let graceful = self.graceful.id();
        let mut service = self.inner.clone();
        // HTTP/1: most services (a router, a `service_fn`) are always ready,
        // so call it now, and the request is not moved into the future and
        // out again; one that is not is polled again, with the task's
        // waker. HTTP/2: in the stream's own task, as hyper-util does, so
        // that the connection's task, which reads every stream's frames,
        // does not also route every request.
        let ready = if req.version() < http::Version::HTTP_2 {
            serving(graceful, || {
                service.poll_ready(&mut Context::from_waker(Waker::noop()))
            })
        } else {
            Poll::Pending
        };
        let state = match ready {
            Poll::Ready(Ok(())) => CallState::Called {
                future: ResponseFuture::new(serving(graceful, || service.call(req)), tracked),
            },
            Poll::Ready(Err(error)) => CallState::Failed {
                error: Some(error.into()),
            },
            Poll::Pending => CallState::NotReady {
                service,
                request: Some((req, tracked)),
            },
        };
        ConnFuture {
            graceful,
            state,
            busy: Some(busy),
            tunnel,
        }
    }
}

pin_project! {
    /// The future of one request under [`ConnService`].
    struct ConnFuture<S: Service<Request<Incoming>>> {
        // The `Graceful` that counts the request (see `layer::serving`).
        graceful: usize,
        #[pin]
        state: CallState<S, S::Future>,
        busy: Option<BusyGuard>,
        tunnel: bool,
    }
}

pin_project! {
    #[project = CallStateProj]
    enum CallState<S, F> {
        /// Waiting for the service to be ready.
        NotReady { service: S, request: Option<(Request<Incoming>, Tracked)> },
        Called { #[pin] future: ResponseFuture<F> },
        /// The service said it could not take the request.
        Failed { error: Option<BoxError> },
    }
}

impl<S, B> Future for ConnFuture<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body,
{
    type Output = Result<Response<BusyBody<TrackedBody<B>>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        serving(*this.graceful, || {
            loop {
                match this.state.as_mut().project() {
                    CallStateProj::NotReady { service, request } => {
                        std::task::ready!(service.poll_ready(cx)).map_err(Into::into)?;
                        let Some((request, tracked)) = request.take() else {
                            unreachable!("a request is called once, and then the state moves on");
                        };
                        let future = ResponseFuture::new(service.call(request), tracked);
                        this.state.set(CallState::Called { future });
                    }
                    CallStateProj::Failed { error } => {
                        let Some(error) = error.take() else {
                            unreachable!("a failed request is polled once more at most");
                        };
                        return Poll::Ready(Err(error));
                    }
                    CallStateProj::Called { future } => {
                        let response = std::task::ready!(future.poll(cx)).map_err(Into::into)?;
                        let busy = this.busy.take();
                        if *this.tunnel
                            && response.status().is_success()
                            && let Some(busy) = &busy
                        {
                            busy.0.tunnels.store(true, Ordering::SeqCst);
                        }
                        return Poll::Ready(Ok(response.map(|inner| BusyBody {
                            inner,
                            _guard: busy,
                        })));
                    }
                }
            }
        })
    }
}

pin_project! {
    struct BusyBody<B> {
        #[pin]
        inner: B,
        _guard: Option<BusyGuard>,
    }
}

impl<B: Body> Body for BusyBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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

const PROTOCOL_UNKNOWN: u8 = 0;
const PROTOCOL_H1: u8 = 1;
const PROTOCOL_H2: u8 = 2;

/// The start of the HTTP/2 connection preface that an h2c client with
/// prior knowledge sends first.
const H2_PREFACE_START: &[u8; 4] = b"PRI ";

/// What the serve loop and one connection's IO share.
struct ConnState {
    /// `PROTOCOL_*`, from the first bytes read.
    protocol: AtomicU8,
    /// The close grace forced this (upgraded) connection: IO fails.
    forced: AtomicBool,
    /// A request on it asked to upgrade (HTTP/1.1 `Upgrade`, `CONNECT`):
    /// its IO may go to a handler's task, which the force must wake. Until
    /// then no waker is kept, and a pending read costs no lock.
    may_upgrade: AtomicBool,
    /// Who to wake when forced: the tasks blocked reading and writing
    /// (the two halves of a split WebSocket may be in different tasks).
    read_waker: Mutex<Option<Waker>>,
    write_waker: Mutex<Option<Waker>>,
    /// Counts the connection once upgraded; dropped with the last owner
    /// of this state, that is with the upgraded IO.
    upgrade: OnceLock<UpgradeToken>,
}

impl Default for ConnState {
    fn default() -> Self {
        Self {
            protocol: AtomicU8::new(PROTOCOL_UNKNOWN),
            forced: AtomicBool::new(false),
            may_upgrade: AtomicBool::new(false),
            read_waker: Mutex::new(None),
            write_waker: Mutex::new(None),
            upgrade: OnceLock::new(),
        }
    }
}

impl ConnState {
    fn is_forced(&self) -> bool {
        self.forced.load(Ordering::SeqCst)
    }

    /// Wakes `slot`'s owner on `force`; then says whether forced already,
    /// so a force between the caller's check and this call is not missed.
    ///
    /// Only once a request has asked to upgrade: before that the IO is
    /// polled by the connection's own task alone, which polls it again
    /// after forcing it.
    #[inline]
    fn park(&self, slot: &Mutex<Option<Waker>>, waker: &Waker) -> bool {
        if !self.may_upgrade.load(Ordering::SeqCst) {
            return false;
        }
        self.park_waker(slot, waker)
    }

    #[cold]
    fn park_waker(&self, slot: &Mutex<Option<Waker>>, waker: &Waker) -> bool {
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
        drop(slot);
        self.is_forced()
    }
}

impl Force for ConnState {
    fn force(&self) {
        self.forced.store(true, Ordering::SeqCst);
        for slot in [&self.read_waker, &self.write_waker] {
            let waker = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

fn forced_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "upgraded connection forced closed: the drain's close grace passed",
    )
}

/// Polls `$poll`; once forced, or when forced while it waits, fails with
/// [`forced_error`] instead.
macro_rules! unless_forced {
    ($state:expr, $slot:ident, $cx:expr, $poll:expr) => {{
        if $state.is_forced() {
            return Poll::Ready(Err(forced_error()));
        }
        match $poll {
            Poll::Pending if $state.park(&$state.$slot, $cx.waker()) => {
                Poll::Ready(Err(forced_error()))
            }
            other => other,
        }
    }};
}

pin_project! {
    /// One connection's IO: notes from the first bytes read whether the
    /// peer speaks HTTP/2 (hyper-util's auto builder does not tell), and
    /// fails once the close grace forces it (after an upgrade).
    struct ConnIo<I> {
        #[pin]
        inner: I,
        state: Arc<ConnState>,
        seen: [u8; 4],
        seen_len: u8,
        decided: bool,
    }
}

impl<I> ConnIo<I> {
    fn new(inner: I, state: Arc<ConnState>) -> Self {
        Self {
            inner,
            state,
            seen: [0; 4],
            seen_len: 0,
            decided: false,
        }
    }
}

impl<I: AsyncRead> AsyncRead for ConnIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let state = &**this.state;
        if *this.decided {
            return unless_forced!(state, read_waker, cx, this.inner.poll_read(cx, buf));
        }
        let before = buf.filled().len();
        let result = this.inner.poll_read(cx, buf);
        let new = &buf.filled()[before..];
        let have = usize::from(*this.seen_len);
        let take = new.len().min(4 - have);
        this.seen[have..have + take].copy_from_slice(&new[..take]);
        *this.seen_len += take as u8;
        let seen = &this.seen[..usize::from(*this.seen_len)];
        if seen.len() == 4 || !H2_PREFACE_START.starts_with(seen) {
            *this.decided = true;
            let protocol = if seen == H2_PREFACE_START {
                PROTOCOL_H2
            } else {
                PROTOCOL_H1
            };
            state.protocol.store(protocol, Ordering::Relaxed);
        }
        result
    }
}

impl<I: AsyncWrite> AsyncWrite for ConnIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let state = &**this.state;
        unless_forced!(state, write_waker, cx, this.inner.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let state = &**this.state;
        unless_forced!(state, write_waker, cx, this.inner.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.state.is_forced() {
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let state = &**this.state;
        unless_forced!(
            state,
            write_waker,
            cx,
            this.inner.poll_write_vectored(cx, bufs)
        )
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What a request's extensions start from: the signal (or nothing) in
    /// a map of their own, whatever was there before kept, and the next
    /// request's copy untouched by what this one does with its own; over
    /// HTTP/2, only the loop's own signal.
    #[test]
    fn presized_extensions_give_each_request_its_own_copy() {
        let graceful = Graceful::new();
        let presized = Presized::new(Some(graceful.signal_with(true)));
        let http2 = || {
            Request::builder()
                .version(http::Version::HTTP_2)
                .body(())
                .unwrap()
        };

        let mut first = Request::new(());
        presized.put_in(&mut first);
        let first = first.extensions_mut();
        assert_eq!(first.len(), 1);
        assert!(first.get::<ShutdownSignal>().unwrap().is_from(&graceful));
        first.insert(7u32);
        first.remove::<ShutdownSignal>();

        // Into extensions that have a map already (hyper's upgrade, say).
        let mut second = Request::new(());
        second.extensions_mut().insert("upgrade");
        presized.put_in(&mut second);
        let second = second.extensions();
        assert_eq!(second.len(), 2);
        assert_eq!(second.get::<&str>(), Some(&"upgrade"));
        assert!(second.get::<ShutdownSignal>().unwrap().is_from(&graceful));
        assert_eq!(second.get::<u32>(), None);

        let mut over_http2 = http2();
        presized.put_in(&mut over_http2);
        assert!(over_http2.extensions().get::<ShutdownSignal>().is_some());

        let room = Presized::new(None);
        let mut none = Request::new(());
        room.put_in(&mut none);
        assert!(none.extensions().is_empty());
        assert!(none.extensions().get::<ShutdownSignal>().is_none());
        let mut untouched = http2();
        room.put_in(&mut untouched);
        assert!(untouched.extensions().is_empty());
    }

    async fn sniff(chunks: &[&[u8]]) -> u8 {
        let (mut client, server) = tokio::io::duplex(64);
        let state = Arc::new(ConnState::default());
        let mut io = ConnIo::new(server, state.clone());
        let mut buf = [0u8; 64];
        for chunk in chunks {
            client.write_all(chunk).await.unwrap();
            let n = io.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], *chunk, "bytes pass through unchanged");
        }
        state.protocol.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn sniffs_the_http2_preface() {
        assert_eq!(
            sniff(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).await,
            PROTOCOL_H2
        );
        assert_eq!(sniff(&[b"PR", b"I * HTTP/2.0"]).await, PROTOCOL_H2);
        assert_eq!(sniff(&[b"P", b"R"]).await, PROTOCOL_UNKNOWN);
    }

    #[test]
    fn tracking_an_upgraded_connection_costs_under_200_bytes() {
        // Per connection: the shared state (with the upgrade's token) in an
        // `Arc`, and one entry in the close grace's map of live upgrades.
        let state = std::mem::size_of::<ConnState>() + 2 * std::mem::size_of::<usize>();
        let entry = std::mem::size_of::<(u64, Option<Weak<dyn Force>>)>() + 1;
        println!("tracking state {state} bytes + map entry {entry} bytes");
        assert!(state + entry < 200, "{state} + {entry}");
    }

    #[tokio::test]
    async fn sniffs_http1_methods() {
        assert_eq!(sniff(&[b"GET / HTTP/1.1\r\n"]).await, PROTOCOL_H1);
        assert_eq!(sniff(&[b"P", b"OST / HTTP/1.1\r\n"]).await, PROTOCOL_H1);
        assert_eq!(sniff(&[b"PRIX"]).await, PROTOCOL_H1);
    }
}
