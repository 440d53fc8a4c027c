//! Per-request cost of `GracefulLayer` against the floor of any counting
//! layer: a wrapper that increments and decrements one `Arc<AtomicUsize>`.
//!
//! The floor does four atomic operations per request (the `Arc`'s clone and
//! drop, the counter's increment and decrement). `GracefulLayer` does two:
//! its count shares a word with the drain flag, in a slot that lives as
//! long as the process, so a request holds a plain reference to it; the
//! rest of its added time is what it does besides counting (the drain
//! check, the long-lived stream check, the body wrapper). The target: at
//! most 1.5 times the floor's added time.
//!
//! Every variant runs the same trivial service; each iteration calls it,
//! polls the response future (ready at once) and the body to its end, and
//! drops both, on the current thread with a no-op waker, so what is measured
//! is the layer and not a runtime. Read the result as added time over
//! `bare`, and compare `graceful` with `floor` in the same run:
//!
//! ```text
//! cargo bench --bench layer
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use handover::Graceful;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use tower::{Layer, Service, service_fn};

fn hello(_req: Request<()>) -> std::future::Ready<Result<Response<Full<Bytes>>, Infallible>> {
    std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"hello")))))
}

/// Calls the service once and drives the response and its body to the end.
fn one_request<S, B>(svc: &mut S)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: Body,
{
    let mut cx = Context::from_waker(Waker::noop());
    let future = pin!(svc.call(Request::new(())));
    let Poll::Ready(Ok(response)) = future.poll(&mut cx) else {
        unreachable!("the service answers at once")
    };
    let mut body = pin!(response.into_body());
    while let Poll::Ready(Some(frame)) = body.as_mut().poll_frame(&mut cx) {
        black_box(frame.is_ok());
    }
}

// ---- the floor: one shared counter, nothing else ----

#[derive(Clone)]
struct Floor<S> {
    inner: S,
    count: Arc<AtomicUsize>,
}

struct FloorGuard(Arc<AtomicUsize>);

impl Drop for FloorGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pin_project_lite::pin_project! {
    struct FloorBody<B> {
        #[pin]
        inner: B,
        guard: FloorGuard,
    }
}

impl<B: Body> Body for FloorBody<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B> Service<Request<()>> for Floor<S>
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Response<FloorBody<B>>;
    type Error = Infallible;
    type Future = FloorFuture<S::Future>;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }
    fn call(&mut self, req: Request<()>) -> Self::Future {
        self.count.fetch_add(1, Ordering::SeqCst);
        FloorFuture {
            inner: self.inner.call(req),
            guard: Some(FloorGuard(self.count.clone())),
        }
    }
}

struct FloorFuture<F> {
    inner: F,
    guard: Option<FloorGuard>,
}

impl<F, B> Future for FloorFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>> + Unpin,
{
    type Output = Result<Response<FloorBody<B>>, Infallible>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = std::task::ready!(Pin::new(&mut self.inner).poll(cx))?;
        let guard = self.guard.take().expect("polled after completion");
        Poll::Ready(Ok(response.map(|inner| FloorBody { inner, guard })))
    }
}

fn layer(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_request");

    let mut bare = service_fn(hello);
    group.bench_function("bare", |b| b.iter(|| one_request(&mut bare)));

    let mut floor = Floor {
        inner: service_fn(hello),
        count: Arc::new(AtomicUsize::new(0)),
    };
    group.bench_function("floor", |b| b.iter(|| one_request(&mut floor)));

    let graceful = Graceful::new();
    let mut layered = graceful.layer().layer(service_fn(hello));
    group.bench_function("graceful", |b| b.iter(|| one_request(&mut layered)));

    let mut with_signal = graceful
        .layer()
        .signal_extension(true)
        .layer(service_fn(hello));
    group.bench_function("graceful+signal_extension", |b| {
        b.iter(|| one_request(&mut with_signal))
    });

    group.finish();
}

criterion_group!(benches, layer);
criterion_main!(benches);
