//! [`ResponseBody`]: holds a request's place in the count until its body
//! has ended, and ends long-lived streams at the close grace.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderMap;
use http::header::{CONTENT_TYPE, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::drain::RequestGuard;

pin_project! {
    /// A response that may run for as long as the connection lives, and
    /// that can be ended cleanly between two of its frames when the close
    /// grace passes.
    pub(super) struct LongLived {
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
    pub(super) fn of(headers: &HeaderMap, guard: &RequestGuard) -> Option<Pin<Box<Self>>> {
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
    /// Response body of [`GracefulService`](super::GracefulService): the request stays counted until
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
    /// [`GracefulBuilder::close_grace`](crate::GracefulBuilder::close_grace)).
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        guard: Option<RequestGuard>,
        long_lived: Option<Pin<Box<LongLived>>>,
    }
}

impl<B: Body> ResponseBody<B> {
    #[inline]
    pub(super) fn new(
        inner: B,
        guard: Option<RequestGuard>,
        long_lived: Option<Pin<Box<LongLived>>>,
    ) -> Self {
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

impl<B> ResponseBody<B> {
    /// The inner body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for ResponseBody<B> {
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

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("tracked", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}
