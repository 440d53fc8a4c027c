//! [`ConnService`]: one connection's hyper service, which does for each
//! request what the layer does, and counts it on the connection.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use http::{Method, Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::busy::{Busy, BusyGuard};
use super::info::Extend;
use super::io::ConnState;
use super::presized::Presized;
use crate::drain::Graceful;
use crate::error::BoxError;
use crate::layer::{ResponseBody, ResponseFuture, Tracked, serving, track};

/// One connection's hyper service: does for each request what
/// [`GracefulLayer`](crate::layer::GracefulLayer) does (counts it until its
/// response body ends, gives it a [`DrainSignal`](crate::DrainSignal) if
/// asked to, `Connection: close` once draining), and also counts it on the
/// connection, from `call` until the response body is dropped, so that the
/// drain can tell a busy HTTP/1 connection from an idle one. hyper drops a
/// response body as soon as it has written its end (and at once after a
/// 2xx to a CONNECT, whose stream it hands to the handler). It adds the
/// connection's [`Serve::connect_info`](super::Serve::connect_info) to
/// each request too.
///
/// As hyper-util's `TowerToHyperService`, it clones the application's
/// service for each request and calls it once it is ready; nothing of its
/// own is cloned but the connection's count.
pub(super) struct ConnService<S> {
    /// Boxed, so that the connection can be taken apart whatever `S` is
    /// (hyper's `into_parts` needs it `Unpin`).
    pub(super) inner: Box<S>,
    pub(super) graceful: Graceful,
    pub(super) conn: Arc<ConnState>,
    pub(super) busy: Arc<Busy>,
    pub(super) extend: Option<Extend>,
    pub(super) presized: Option<Arc<Presized>>,
    /// HTTP/1 on a connection that moves to the next generation when the
    /// drain gives connections up: its responses then say nothing of the
    /// drain.
    pub(super) moves: bool,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
{
    type Response = Response<BusyBody<ResponseBody<B>>>;
    type Error = BoxError;
    type Future = ConnFuture<S>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let busy = self.busy.start();
        // Counted before the signal goes in: a request that carries one of
        // this `Graceful`'s counts as counted already.
        let mut tracked = track(&self.graceful, false, true, &mut req);
        if self.moves {
            tracked = tracked.on_a_connection_that_moves();
        }
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
        let mut service = S::clone(&self.inner);
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
    pub(super) struct ConnFuture<S: Service<Request<Incoming>>> {
        // The `Graceful` that counts the request (see `layer::track::serving`).
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
    type Output = Result<Response<BusyBody<ResponseBody<B>>>, BoxError>;

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
    pub(super) struct BusyBody<B> {
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
