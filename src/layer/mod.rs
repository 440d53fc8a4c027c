//! [`GracefulLayer`]: a tower layer that counts every request on a
//! [`Graceful`] until its response body has ended, for any server:
//! `axum::serve`, tonic's `Server`, hyper-util's loop, or your own.
//!
//! A request counts from the moment it reaches the service's `call` until
//! the response body yields its last frame or an error, or until the
//! response future or the body is dropped (a client that went away).
//! Streaming bodies and long downloads therefore keep a drain waiting until
//! they are done, and a handler that fails releases its count at once.
//! Errors from the inner service pass through unchanged. Event streams and
//! gRPC streams, which may never end by themselves, are ended on a frame
//! boundary at the close grace (see [`ResponseBody`]).
//!
//! Once the drain has started, HTTP/1.x responses carry `Connection: close`
//! (except `101 Switching Protocols`), so a keep-alive client leaves after
//! the response it is reading instead of racing a socket close with its
//! next request.
//!
//! Under [`serve`](crate::serve()) (and [`Handover`](crate::Handover)),
//! which does all of this for every request itself, the layer is not
//! needed; a layer of the same [`Graceful`] there, or twice on one service,
//! counts a request once.
//!
//! # Examples
//!
//! On an axum router:
//!
//! ```
//! use axum::{Router, routing::get};
//! use handover::Graceful;
//!
//! let graceful = Graceful::new();
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(graceful.layer());
//! ```
//!
//! Under `axum::serve` and its own graceful shutdown, with the deadline
//! that axum does not have:
//!
//! ```no_run
//! use std::future::IntoFuture;
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use handover::Graceful;
//!
//! # async fn run() -> std::io::Result<()> {
//! let graceful = Graceful::builder()
//!     .drain_timeout(Duration::from_secs(30))
//!     .build();
//! let app = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .layer(graceful.layer());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//!
//! let trigger = graceful.clone();
//! tokio::spawn(async move {
//!     let _ = tokio::signal::ctrl_c().await;
//!     trigger.start_drain();
//! });
//!
//! let server = axum::serve(listener, app)
//!     .with_graceful_shutdown(graceful.signal().into_future());
//! tokio::select! {
//!     result = server => result?,
//!     // The drain starts with the signal; it ends when the last request
//!     // and body have, or at the drain timeout.
//!     report = async {
//!         graceful.signal().await;
//!         graceful.drain().await
//!     } => println!("{report}"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! On a tonic server:
//!
//! ```no_run
//! use std::future::IntoFuture;
//! use handover::Graceful;
//!
//! # async fn run() -> Result<(), tonic::transport::Error> {
//! let graceful = Graceful::new();
//! let (_reporter, health) = tonic_health::server::health_reporter();
//!
//! tonic::transport::Server::builder()
//!     .layer(graceful.layer())
//!     .add_service(health)
//!     .serve_with_shutdown("127.0.0.1:50051".parse().unwrap(), graceful.signal().into_future())
//!     .await?;
//! # Ok(())
//! # }
//! ```

mod body;
mod future;
mod service;
mod track;

use std::fmt;

use tower_layer::Layer;

use crate::drain::Graceful;

pub use body::ResponseBody;
pub use future::ResponseFuture;
pub use service::GracefulService;
pub(crate) use track::{Tracked, serving, track};

/// A [`Layer`] that counts every request on a [`Graceful`] until its
/// response body has ended; made by [`Graceful::layer`]. See the
/// [module](self) for what it does.
#[derive(Clone)]
pub struct GracefulLayer {
    graceful: Graceful,
    signal_extension: bool,
}

impl GracefulLayer {
    fn new(graceful: Graceful) -> Self {
        Self {
            graceful,
            signal_extension: false,
        }
    }

    /// Whether to put a [`DrainSignal`](crate::DrainSignal) in each
    /// request's extensions (off by default), for handlers that end
    /// long-lived work when the drain starts (WebSockets, event streams,
    /// long polls) and take it as axum's `Extension<DrainSignal>`.
    ///
    /// It costs an allocation per request when nothing else has used the
    /// extensions yet. Under [`serve`](crate::serve()), a layer with this on,
    /// on just the routes that need the signal
    /// (`get(ws).layer(graceful.layer().signal_extension(true))`), gives it
    /// to them and counts nothing again.
    pub fn signal_extension(mut self, enabled: bool) -> Self {
        self.signal_extension = enabled;
        self
    }
}

impl Graceful {
    /// A [`GracefulLayer`] that counts every request and its response body
    /// on this handle: `.layer(graceful.layer())` on an axum `Router` or a
    /// tonic `Server`.
    pub fn layer(&self) -> GracefulLayer {
        GracefulLayer::new(self.clone())
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
        GracefulService::new(inner, self.graceful.clone(), self.signal_extension)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::header::{CONNECTION, HeaderValue};
    use http::{Request, Response, StatusCode, Version};
    use http_body::Body;
    use http_body_util::{BodyExt, Empty, Full};
    use std::convert::Infallible;
    use tower::{ServiceExt, service_fn};
    use tower_service::Service;

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

    /// Twice on one service, and on an inner service the outer one calls
    /// only once its future is polled (as an axum route does): counted
    /// once, one `Connection: close`.
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

        let route = graceful.layer().layer(service_fn(hello));
        let deferred = graceful.layer().layer(service_fn(move |req: Request<()>| {
            let route = route.clone();
            async move { route.oneshot(req).await }
        }));
        let response = deferred.oneshot(Request::new(())).await.unwrap();
        assert_eq!(graceful.in_flight(), 1);
        drop(response);
        assert_eq!(graceful.in_flight(), 0);
    }

    /// Off by default, on when asked: the signal in the request's
    /// extensions.
    #[tokio::test]
    async fn the_signal_goes_in_only_when_asked_for() {
        let has_signal = |req: Request<()>| async move {
            let has = req.extensions().get::<crate::DrainSignal>().is_some();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(has.to_string()))))
        };
        let graceful = Graceful::new();
        for (layer, expected) in [
            (graceful.layer(), "false"),
            (graceful.layer().signal_extension(true), "true"),
        ] {
            let svc = layer.layer(service_fn(has_signal));
            let body = svc.oneshot(Request::new(())).await.unwrap().into_body();
            assert_eq!(body.collect().await.unwrap().to_bytes(), expected);
        }
    }

    /// Only a layer that puts the signal in asks the serve loop to make
    /// room for it.
    #[test]
    fn a_layer_that_puts_the_signal_in_is_noted_on_its_graceful() {
        let graceful = Graceful::new();
        let _quiet = graceful.layer().layer(service_fn(hello));
        assert!(!graceful.has_signal_layer());
        let _loud = graceful
            .layer()
            .signal_extension(true)
            .layer(service_fn(hello));
        assert!(graceful.has_signal_layer());
    }
}
