//! [`GracefulLayer`]: counts every request until its response body has ended.

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tower_layer::Layer;
use tower_service::Service;

use crate::graceful::{Graceful, RequestGuard, ShutdownSignal};

/// A [`Layer`] that counts every request on a [`Graceful`] until its
/// response body has ended.
///
/// A request counts from the moment it reaches the service's `call` until
/// the response body yields its last frame or an error, or until the
/// response future or the body is dropped (a client that went away).
/// Streaming bodies and long downloads therefore keep a drain waiting until
/// they are done, and a handler that fails releases its count at once.
/// Errors from the inner service pass through unchanged. Event streams and
/// gRPC streams, which may never end by themselves, are ended on a frame
/// boundary at the close grace (see [`TrackedBody`]).
///
/// Once the drain has started, HTTP/1.x responses carry `Connection: close`
/// (except `101 Switching Protocols`), so a keep-alive client leaves after
/// the response it is reading instead of racing a socket close with its next
/// request.
///
/// Applied twice for the same [`Graceful`], or under [`serve`](crate::serve)
/// (which does all of this for every request itself), a request is counted
/// once.
///
/// Each request also gets a [`ShutdownSignal`](crate::ShutdownSignal) in its
/// extensions; turn that off with [`signal_extension`](Self::signal_extension)
/// if no handler needs it and every nanosecond counts. Under `serve`, that
/// is what the layer is for: `serve` puts no signal in by default, and a
/// layer on the routes whose handlers read it
/// (`get(ws).layer(graceful.layer())`) gives it to just those, at no other
/// cost. On a whole axum `Router` it costs more than it does elsewhere:
/// axum boxes each layered route and its response body.
///
/// # Examples
///
/// On an axum router:
///
/// ```
/// use axum::{Router, routing::get};
/// use handover::Graceful;
///
/// let graceful = Graceful::new();
/// let app: Router = Router::new()
///     .route("/", get(|| async { "hello" }))
///     .layer(graceful.layer());
/// ```
///
/// Beside `axum::serve` and its own graceful shutdown, with a deadline that
/// axum does not have:
///
/// ```no_run
/// use std::time::Duration;
/// use axum::{Router, routing::get};
/// use handover::Graceful;
///
/// # async fn run() -> std::io::Result<()> {
/// let graceful = Graceful::new();
/// let app = Router::new()
///     .route("/", get(|| async { "hello" }))
///     .layer(graceful.layer());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
///
/// let trigger = graceful.clone();
/// tokio::spawn(async move {
///     let _ = tokio::signal::ctrl_c().await;
///     trigger.start_drain();
/// });
///
/// let server = axum::serve(listener, app).with_graceful_shutdown(graceful.signal().into_future());
/// tokio::select! {
///     result = server => result?,
///     report = async {
///         graceful.signal().await;
///         graceful.drain(Duration::from_secs(30)).await
///     } => println!("{report}"),
/// }
/// # Ok(())
/// # }
/// # use std::future::IntoFuture;
/// ```
///
/// On a tonic server:
///
/// ```no_run
/// use handover::Graceful;
///
/// # async fn run() -> Result<(), tonic::transport::Error> {
/// let graceful = Graceful::new();
/// let (_reporter, health) = tonic_health::server::health_reporter();
///
/// tonic::transport::Server::builder()
///     .layer(graceful.layer())
///     .add_service(health)
///     .serve_with_shutdown("127.0.0.1:50051".parse().unwrap(), graceful.signal().into_future())
///     .await?;
/// # Ok(())
/// # }
/// # use std::future::IntoFuture;
/// ```
#[derive(Clone)]
pub struct GracefulLayer {
    graceful: Graceful,
    signal_extension: bool,
}

impl GracefulLayer {
    /// A layer that counts on `graceful`.
    pub fn new(graceful: Graceful) -> Self {
        Self {
            graceful,
            signal_extension: true,
        }
    }

    /// Whether to put a [`ShutdownSignal`](crate::ShutdownSignal) in each
    /// request's extensions (on by default).
    ///
    /// Inserting it costs an allocation per request when nothing else has
    /// used the extensions yet; turn it off when no handler reads it.
    pub fn signal_extension(mut self, enabled: bool) -> Self {
        self.signal_extension = enabled;
        self
    }
}

impl fmt::Debug for GracefulLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GracefulLayer")
            .field("signal_extension", &self.signal_extension)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for GracefulLayer {
    type Service = GracefulService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        if self.signal_extension {
            self.graceful.note_signal_layer();
        }
        GracefulService {
            inner,
            graceful: self.graceful.clone(),
            signal_extension: self.signal_extension,
            upgrades_tracked: false,
        }
    }
}

/// The service made by [`GracefulLayer`]: see there for what it does.
#[derive(Clone)]
pub struct GracefulService<S> {
    inner: S,
    graceful: Graceful,
    signal_extension: bool,
    /// The serve loop tracks upgraded connections itself, so the signals
    /// this service hands out count none (`ShutdownSignal::track_upgrade`).
    upgrades_tracked: bool,
}

impl<S> GracefulService<S> {
    /// Wraps `inner`, counting on `graceful`.
    pub fn new(inner: S, graceful: Graceful) -> Self {
        GracefulLayer::new(graceful).layer(inner)
    }

    /// The [`GracefulLayer`] that makes this service, as in tower-http.
    pub fn layer(graceful: Graceful) -> GracefulLayer {
        GracefulLayer::new(graceful)
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for GracefulService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GracefulService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for GracefulService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let tracked = track(
            &self.graceful,
            self.signal_extension,
            self.upgrades_tracked,
            &mut req,
        );
        ResponseFuture::new(self.inner.call(req), tracked)
    }
}

/// A request as the layer took it in: its place in the count (none if the
/// same `Graceful` counts it already), and whether it came over HTTP/1.
pub(crate) struct Tracked {
    guard: Option<RequestGuard>,
    http1: bool,
}

thread_local! {
    /// The [`Graceful`] (by [`Graceful::id`]) whose serve loop is calling
    /// or polling the application's service on this thread right now, or 0.
    static SERVING: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f`, a call or poll of the application's service by the serve loop
/// of the `Graceful` with id `graceful`: a [`GracefulLayer`] of the same
/// `Graceful` inside it (on a router's routes, say) sees that the request
/// is counted already, without anything put in the request for it.
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

/// What the layer does to a request before the inner service sees it:
/// counts it on `graceful`, unless that `Graceful` counts it already (a
/// router with `.layer(graceful.layer())` under `serve`, which counts every
/// request too, or the same layer twice), and gives it a
/// [`ShutdownSignal`] if `signal_extension` (also when counted already by
/// a serve loop, which puts none in by default). The serve loop calls it
/// for each request without a `GracefulService`.
#[inline]
pub(crate) fn track<B>(
    graceful: &Graceful,
    signal_extension: bool,
    upgrades_tracked: bool,
    req: &mut Request<B>,
) -> Tracked {
    let http1 = req.version() < Version::HTTP_2;
    let served = SERVING.with(Cell::get) == graceful.id();
    let signal = req.extensions().get::<ShutdownSignal>();
    if served || signal.is_some_and(|signal| signal.is_from(graceful)) {
        if served && signal_extension && signal.is_none() {
            // The serve loop tracks upgrades itself.
            req.extensions_mut().insert(graceful.signal_with(true));
        }
        return Tracked { guard: None, http1 };
    }
    let guard = graceful.request_guard();
    if signal_extension {
        req.extensions_mut()
            .insert(graceful.signal_with(upgrades_tracked));
    }
    Tracked {
        guard: Some(guard),
        http1,
    }
}

pin_project! {
    /// Response future of [`GracefulService`].
    ///
    /// Holds the request's place in the count until the response is ready,
    /// then hands it to the [`TrackedBody`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: Option<RequestGuard>,
        http1: bool,
    }
}

impl<F> ResponseFuture<F> {
    /// The future of a request `track` took in, whose inner service's
    /// future is `inner`.
    #[inline]
    pub(crate) fn new(inner: F, tracked: Tracked) -> Self {
        Self {
            inner,
            guard: tracked.guard,
            http1: tracked.http1,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // An error drops the guard with the future: the request is done.
        let response = ready!(this.inner.poll(cx))?;
        let guard = this.guard.take();
        let (mut parts, body) = response.into_parts();
        let mut long_lived = None;
        if let Some(guard) = &guard {
            if guard.is_draining() {
                close_after(&mut parts, *this.http1);
            }
            // A body of known length ends by itself, and one without
            // headers has no content type to look up: the common cases skip
            // the header lookup.
            if !parts.headers.is_empty() && body.size_hint().exact().is_none() {
                long_lived = LongLived::of(&parts.headers, guard);
            }
        }
        Poll::Ready(Ok(Response::from_parts(
            parts,
            TrackedBody::new(body, guard, long_lived),
        )))
    }
}

/// Once draining: `Connection: close` on an HTTP/1 response, unless it
/// switches protocols.
#[cold]
#[inline(never)]
fn close_after(response: &mut http::response::Parts, http1: bool) {
    if http1 && response.status != StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

pin_project! {
    /// A response that may run for as long as the connection lives, and
    /// that can be ended cleanly between two of its frames when the close
    /// grace passes.
    struct LongLived {
        kind: StreamKind,
        #[pin]
        closing: WaitForCancellationFutureOwned,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamKind {
    /// `text/event-stream`: ends after its last whole event.
    EventStream,
    /// `application/grpc`: ends with trailers saying `UNAVAILABLE`.
    Grpc,
    /// Ended by the close grace.
    Ended,
}

impl LongLived {
    /// Boxed: the common body (not long-lived) pays one pointer for it.
    fn of(headers: &HeaderMap, guard: &RequestGuard) -> Option<Pin<Box<Self>>> {
        let content_type = headers.get(CONTENT_TYPE)?.as_bytes();
        let kind = if content_type.starts_with(b"text/event-stream") {
            StreamKind::EventStream
        } else if content_type == b"application/grpc"
            || content_type.starts_with(b"application/grpc+")
        {
            StreamKind::Grpc
        } else {
            return None;
        };
        Some(Box::pin(Self {
            kind,
            closing: guard.closing(),
        }))
    }
}

/// The trailers that end a gRPC stream at the close grace.
fn grpc_unavailable() -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(2);
    trailers.insert("grpc-status", HeaderValue::from_static("14"));
    trailers.insert(
        "grpc-message",
        HeaderValue::from_static("server restarting; retry"),
    );
    trailers
}

pin_project! {
    /// Response body of [`GracefulService`]: the request stays counted until
    /// this body has ended or is dropped.
    ///
    /// The count is released when `poll_frame` yields `None` or an error,
    /// when `is_end_stream` turns true after a frame, or at once when the
    /// body starts ended (`HEAD`, `204`, `304`). `is_end_stream` and
    /// `size_hint` are forwarded unchanged.
    ///
    /// An event stream (`text/event-stream`) or a gRPC response
    /// (`application/grpc`), of a length not known up front, that is still
    /// waiting for its next frame when the close grace passes ends there:
    /// the event stream after its last whole event, the gRPC stream with
    /// status `UNAVAILABLE` in its trailers (see
    /// [`Graceful::set_close_grace`]).
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: Option<RequestGuard>,
        long_lived: Option<Pin<Box<LongLived>>>,
    }
}

impl<B: Body> TrackedBody<B> {
    #[inline]
    fn new(inner: B, guard: Option<RequestGuard>, long_lived: Option<Pin<Box<LongLived>>>) -> Self {
        if inner.is_end_stream() {
            return Self {
                inner,
                guard: None,
                long_lived: None,
            };
        }
        Self {
            inner,
            guard,
            long_lived,
        }
    }
}

impl<B> TrackedBody<B> {
    /// The inner body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if let Some(long_lived) = this.long_lived.as_mut()
            && long_lived.kind == StreamKind::Ended
        {
            return Poll::Ready(None);
        }
        let Poll::Ready(frame) = this.inner.as_mut().poll_frame(cx) else {
            // Waiting for the next frame: a long-lived stream ends here once
            // the close grace has passed, on a frame boundary.
            if let Some(long_lived) = this.long_lived.as_mut()
                && long_lived.as_mut().project().closing.poll(cx).is_ready()
            {
                let kind = std::mem::replace(long_lived.as_mut().project().kind, StreamKind::Ended);
                *this.guard = None;
                log!(debug, "long-lived response ended at the close grace");
                return Poll::Ready(match kind {
                    StreamKind::Grpc => Some(Ok(Frame::trailers(grpc_unavailable()))),
                    _ => None,
                });
            }
            return Poll::Pending;
        };
        match &frame {
            Some(Ok(_)) if !this.inner.is_end_stream() => {}
            _ => *this.guard = None,
        }
        Poll::Ready(frame)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.long_lived
            .as_ref()
            .is_some_and(|long_lived| long_lived.kind == StreamKind::Ended)
            || self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for TrackedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedBody")
            .field("tracked", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use std::convert::Infallible;
    use tower::{ServiceExt, service_fn};

    async fn hello(_req: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
    }

    #[tokio::test]
    async fn poll_ready_alone_changes_nothing() {
        let graceful = Graceful::new();
        let mut svc = graceful.layer().layer(service_fn(hello));
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        assert_eq!(graceful.in_flight(), 0);
    }

    #[tokio::test]
    async fn body_that_starts_ended_releases_at_once() {
        let graceful = Graceful::new();
        let svc = graceful
            .layer()
            .layer(service_fn(|_req: Request<()>| async {
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }));
        let response = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(graceful.in_flight(), 0);
        assert!(response.body().is_end_stream());
    }

    #[tokio::test]
    async fn full_body_releases_after_its_only_frame() {
        let graceful = Graceful::new();
        let svc = graceful.layer().layer(service_fn(hello));
        let mut response = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(graceful.in_flight(), 1);
        let frame = response.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "hello");
        // `Full` reports its end after its only frame: no extra poll needed.
        assert_eq!(graceful.in_flight(), 0);
    }

    #[tokio::test]
    async fn switching_protocols_keeps_its_connection_header() {
        let graceful = Graceful::new();
        graceful.start_drain();
        let svc = graceful
            .layer()
            .layer(service_fn(|_req: Request<()>| async {
                let mut r = Response::new(Empty::<Bytes>::new());
                *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("upgrade"));
                Ok::<_, Infallible>(r)
            }));
        let response = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.headers()[CONNECTION], "upgrade");
    }

    #[tokio::test]
    async fn http2_responses_get_no_connection_header() {
        let graceful = Graceful::new();
        graceful.start_drain();
        let svc = graceful.layer().layer(service_fn(hello));
        let req = Request::builder()
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        let response = svc.oneshot(req).await.unwrap();
        assert!(response.headers().get(CONNECTION).is_none());
    }

    #[tokio::test]
    async fn the_same_graceful_applied_twice_counts_once() {
        let graceful = Graceful::new();
        graceful.start_drain();
        let inner = graceful.layer().layer(service_fn(hello));
        let svc = graceful.layer().layer(inner);
        let response = svc.oneshot(Request::new(())).await.unwrap();
        assert_eq!(graceful.in_flight(), 1);
        assert_eq!(response.headers().get_all(CONNECTION).iter().count(), 1);
        drop(response);
        assert_eq!(graceful.in_flight(), 0);
    }

    #[tokio::test]
    async fn signal_extension_can_be_turned_off() {
        let svc = GracefulLayer::new(Graceful::new())
            .signal_extension(false)
            .layer(service_fn(|req: Request<()>| async move {
                let has = req.extensions().get::<crate::ShutdownSignal>().is_some();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(has.to_string()))))
            }));
        let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "false");
    }

    /// Only a layer that puts the signal in asks the serve loop to make
    /// room for it.
    #[test]
    fn a_layer_that_puts_the_signal_in_is_noted_on_its_graceful() {
        let graceful = Graceful::new();
        let _quiet = graceful
            .layer()
            .signal_extension(false)
            .layer(service_fn(hello));
        assert!(!graceful.has_signal_layer());
        let _loud = graceful.layer().layer(service_fn(hello));
        assert!(graceful.has_signal_layer());
    }
}
