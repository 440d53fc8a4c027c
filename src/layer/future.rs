//! [`ResponseFuture`]: holds a request's place in the count until its
//! response is ready.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::{CONNECTION, HeaderValue};
use http::{Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;

use super::body::LongLived;
use super::track::CloseOnDrain;
use super::{ResponseBody, Tracked, serving};
use crate::drain::RequestGuard;

pin_project! {
    /// Response future of [`GracefulService`](super::GracefulService).
    ///
    /// Holds the request's place in the count until the response is ready,
    /// then hands it to the [`ResponseBody`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: Option<RequestGuard>,
        close: CloseOnDrain,
        // The `Graceful` (by id) this future counts on, while the inner
        // future runs: a layer of the same one inside counts nothing
        // again (see `track::serving`); 0 for none.
        serving: usize,
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
            close: tracked.close,
            serving: 0,
        }
    }

    /// Polls the inner future as one of the `Graceful` with id `graceful`.
    #[inline]
    pub(super) fn serving(mut self, graceful: usize) -> Self {
        self.serving = graceful;
        self
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let inner = this.inner;
        let polled = if *this.serving == 0 {
            inner.poll(cx)
        } else {
            serving(*this.serving, || inner.poll(cx))
        };
        // An error drops the guard with the future: the request is done.
        let response = ready!(polled)?;
        let guard = this.guard.take();
        let (mut parts, body) = response.into_parts();
        let mut long_lived = None;
        if let Some(guard) = &guard {
            if guard.is_draining() {
                close_after(&mut parts, *this.close, guard);
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
            ResponseBody::new(body, guard, long_lived),
        )))
    }
}

/// Once draining: `Connection: close` on an HTTP/1 response, unless it
/// switches protocols, or its connection moves to the next generation.
#[cold]
#[inline(never)]
fn close_after(response: &mut http::response::Parts, close: CloseOnDrain, guard: &RequestGuard) {
    let close = match close {
        CloseOnDrain::Never => false,
        CloseOnDrain::Always => true,
        CloseOnDrain::UnlessGivenUp => !guard.gives_up(),
    };
    if close && response.status != StatusCode::SWITCHING_PROTOCOLS {
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
