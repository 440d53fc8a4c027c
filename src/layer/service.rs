//! [`GracefulService`]: the service [`GracefulLayer`](super::GracefulLayer)
//! makes.

use std::fmt;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::{ResponseBody, ResponseFuture, serving, track};
use crate::drain::Graceful;

/// The service made by [`GracefulLayer`](super::GracefulLayer): see the
/// [module](super) for what it does.
#[derive(Clone)]
pub struct GracefulService<S> {
    inner: S,
    graceful: Graceful,
    signal_extension: bool,
}

impl<S> GracefulService<S> {
    pub(super) fn new(inner: S, graceful: Graceful, signal_extension: bool) -> Self {
        Self {
            inner,
            graceful,
            signal_extension,
        }
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
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let tracked = track(&self.graceful, self.signal_extension, false, &mut req);
        // Counted here: a layer of the same `Graceful` inside (the same
        // layer on a route, say) must see that it is, during this call and
        // until the response is ready.
        if tracked.guard.is_some() {
            let id = self.graceful.id();
            let inner = serving(id, || self.inner.call(req));
            ResponseFuture::new(inner, tracked).serving(id)
        } else {
            ResponseFuture::new(self.inner.call(req), tracked)
        }
    }
}
