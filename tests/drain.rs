//! The drain core: counts, releases, the drain's end and its report.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use handover::layer::ResponseBody;
use handover::{DrainSignal, Graceful};
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{Request, Response};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_test::{assert_pending, assert_ready, task};
use tower::{Layer, Service, ServiceExt, service_fn};

type Chunk = Result<Frame<Bytes>, Infallible>;

/// A handle whose drain times out after `drain` and whose close grace is
/// `close`.
fn graceful_with(drain: Duration, close: Duration) -> Graceful {
    Graceful::builder()
        .drain_timeout(drain)
        .close_grace(close)
        .build()
}

/// A handle whose drain times out after `secs` seconds.
fn draining_within(secs: u64) -> Graceful {
    Graceful::builder()
        .drain_timeout(Duration::from_secs(secs))
        .build()
}
type StreamingBody = StreamBody<ReceiverStream<Chunk>>;

/// A service whose responses stream whatever the test sends on the channel
/// handed back for each request.
#[allow(clippy::type_complexity)]
fn streaming(
    graceful: &Graceful,
) -> (
    impl Service<Request<()>, Response = Response<ResponseBody<StreamingBody>>, Error = Infallible>
    + Clone,
    mpsc::UnboundedReceiver<mpsc::Sender<Chunk>>,
) {
    streaming_as(graceful, None)
}

/// Like [`streaming`], with responses of this `content-type`.
#[allow(clippy::type_complexity)]
fn streaming_as(
    graceful: &Graceful,
    content_type: Option<&'static str>,
) -> (
    impl Service<Request<()>, Response = Response<ResponseBody<StreamingBody>>, Error = Infallible>
    + Clone,
    mpsc::UnboundedReceiver<mpsc::Sender<Chunk>>,
) {
    let (senders_tx, senders_rx) = mpsc::unbounded_channel();
    let svc = tower::ServiceBuilder::new()
        .layer(graceful.layer())
        .service(service_fn(move |_req: Request<()>| {
            let senders_tx = senders_tx.clone();
            async move {
                let (tx, rx) = mpsc::channel(8);
                senders_tx.send(tx).unwrap();
                let mut response = Response::new(StreamBody::new(ReceiverStream::new(rx)));
                if let Some(content_type) = content_type {
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                }
                Ok::<_, Infallible>(response)
            }
        }));
    (svc, senders_rx)
}

fn data(s: &'static str) -> Chunk {
    Ok(Frame::data(Bytes::from_static(s.as_bytes())))
}

#[tokio::test]
async fn count_goes_up_on_call_and_down_at_end_of_body() {
    let graceful = Graceful::new();
    let (svc, mut senders) = streaming(&graceful);

    let mut response = svc.oneshot(Request::new(())).await.unwrap();
    let tx = senders.recv().await.unwrap();
    assert_eq!(graceful.in_flight(), 1, "counted while the body streams");

    tx.send(data("one")).await.unwrap();
    response.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(graceful.in_flight(), 1, "a frame is not the end");

    drop(tx);
    assert!(response.body_mut().frame().await.is_none());
    assert_eq!(graceful.in_flight(), 0, "released at end of stream");
    drop(response);
    assert_eq!(
        graceful.in_flight(),
        0,
        "dropping an ended body releases nothing twice"
    );
}

#[tokio::test]
async fn count_starts_at_call_not_at_poll() {
    let graceful = Graceful::new();
    let (mut svc, _senders) = streaming(&graceful);
    let svc = svc.ready().await.unwrap();
    assert_eq!(graceful.in_flight(), 0);
    let future = svc.call(Request::new(()));
    assert_eq!(graceful.in_flight(), 1);
    drop(future);
    assert_eq!(
        graceful.in_flight(),
        0,
        "a dropped response future releases"
    );
}

#[tokio::test]
async fn dropped_body_releases() {
    let graceful = Graceful::new();
    let (svc, mut senders) = streaming(&graceful);
    let response = svc.oneshot(Request::new(())).await.unwrap();
    let _tx = senders.recv().await.unwrap();
    assert_eq!(graceful.in_flight(), 1);
    drop(response); // the client went away mid-stream
    assert_eq!(graceful.in_flight(), 0);
}

#[tokio::test]
async fn inner_errors_pass_through_unchanged_and_release() {
    #[derive(Debug, PartialEq)]
    struct Boom(u32);
    let graceful = Graceful::new();
    let svc = graceful.layer().layer(service_fn(|_req: Request<()>| {
        std::future::ready(Err::<Response<Full<Bytes>>, _>(Boom(7)))
    }));
    let err = svc.oneshot(Request::new(())).await.unwrap_err();
    assert_eq!(err, Boom(7));
    assert_eq!(graceful.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn drain_returns_exactly_when_the_last_body_ends() {
    let graceful = draining_within(60);
    let (svc, mut senders) = streaming(&graceful);
    let mut first = svc.clone().oneshot(Request::new(())).await.unwrap();
    let tx1 = senders.recv().await.unwrap();
    let mut second = svc.oneshot(Request::new(())).await.unwrap();
    let tx2 = senders.recv().await.unwrap();

    let mut drain = task::spawn(graceful.drain());
    assert_pending!(drain.poll());

    drop(tx1);
    assert!(first.body_mut().frame().await.is_none());
    assert!(!drain.is_woken(), "one body left: no wake-up");
    assert_pending!(drain.poll());

    tokio::time::advance(Duration::from_secs(5)).await;
    tx2.send(data("last")).await.unwrap();
    drop(tx2);
    second.body_mut().frame().await.unwrap().unwrap();
    assert_pending!(drain.poll(), "the last frame is not the end of the body");
    assert!(second.body_mut().frame().await.is_none());

    assert!(drain.is_woken(), "the last release wakes the drain itself");
    let report = assert_ready!(drain.poll());
    assert!(report.is_clean());
    assert_eq!(report.requests_finished, 2);
    assert_eq!(report.elapsed, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn deadline_returns_with_the_forced_count() {
    let graceful = draining_within(10);
    let (svc, mut senders) = streaming(&graceful);
    let mut held = Vec::new();
    for _ in 0..3 {
        let response = svc.clone().oneshot(Request::new(())).await.unwrap();
        held.push((response, senders.recv().await.unwrap()));
    }
    let (mut ending, ending_tx) = held.pop().unwrap();

    let drain = tokio::spawn({
        let graceful = graceful.clone();
        async move { graceful.drain().await }
    });
    tokio::task::yield_now().await;
    assert!(graceful.is_draining());
    // One of the three ends during the drain; two never do.
    drop(ending_tx);
    assert!(ending.body_mut().frame().await.is_none());

    let report = drain.await.unwrap();
    assert_eq!(report.requests_finished, 1);
    assert_eq!(report.requests_forced, 2);
    assert_eq!(report.elapsed, Duration::from_secs(10));
    assert!(!report.is_clean());
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn requests_during_a_drain_are_counted_and_get_connection_close() {
    let graceful = draining_within(60);
    let (svc, mut senders) = streaming(&graceful);

    let before = svc.clone().oneshot(Request::new(())).await.unwrap();
    assert!(before.headers().get(CONNECTION).is_none());
    drop((before, senders.recv().await.unwrap()));

    graceful.start_drain();
    let mut during = svc.oneshot(Request::new(())).await.unwrap();
    let tx = senders.recv().await.unwrap();
    assert_eq!(during.headers()[CONNECTION], "close");
    assert_eq!(graceful.in_flight(), 1);

    let mut drain = task::spawn(graceful.drain());
    assert_pending!(
        drain.poll(),
        "the drain waits for requests that came during it"
    );
    drop(tx);
    assert!(during.body_mut().frame().await.is_none());
    let report = assert_ready!(drain.poll());
    assert_eq!(report.requests_finished, 1);
    assert!(report.is_clean());
}

#[tokio::test(start_paused = true)]
async fn the_drain_signal_fires_once_a_drain_starts() {
    let graceful = Graceful::new();
    let seen = Arc::new(std::sync::Mutex::new(None));
    let svc = graceful.layer().signal_extension(true).layer(service_fn({
        let seen = seen.clone();
        move |req: Request<()>| {
            *seen.lock().unwrap() = req.extensions().get::<DrainSignal>().cloned();
            std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))))
        }
    }));
    svc.oneshot(Request::new(())).await.unwrap();
    let from_handler = seen
        .lock()
        .unwrap()
        .take()
        .expect("the layer puts a DrainSignal in the extensions");
    let standalone = graceful.signal();

    let mut a = task::spawn(from_handler.clone().into_future());
    let mut b = task::spawn(standalone.draining());
    assert_pending!(a.poll());
    assert_pending!(b.poll());
    assert!(!from_handler.is_draining());

    graceful.start_drain();
    assert!(a.is_woken() && b.is_woken());
    assert_ready!(a.poll());
    assert_ready!(b.poll());
    assert!(standalone.is_draining());
    // Once started, a new wait resolves at once.
    assert_ready!(task::spawn(standalone.draining()).poll());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_never_leave_the_count_off() {
    const TASKS: usize = 8;
    const REQUESTS: usize = 5_000;
    let graceful = draining_within(1);
    let svc = graceful
        .layer()
        .layer(service_fn(|_req: Request<()>| async {
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"x"))))
        }));

    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let graceful = graceful.clone();
        let done = done.clone();
        async move {
            let mut max = 0;
            while !done.load(Ordering::SeqCst) {
                // A count that went below zero would wrap to a huge number.
                let n = graceful.in_flight();
                assert!(n <= TASKS, "in flight {n} > {TASKS} clients");
                max = max.max(n);
                tokio::task::yield_now().await;
            }
            max
        }
    });
    let clients: Vec<_> = (0..TASKS)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                for i in 0..REQUESTS {
                    let response = svc.clone().oneshot(Request::new(())).await.unwrap();
                    if i % 2 == 0 {
                        // Half read to the end, half are dropped unread.
                        response.into_body().collect().await.unwrap();
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    assert_eq!(graceful.in_flight(), 0);
    let report = tokio::time::timeout(Duration::from_secs(5), graceful.drain())
        .await
        .unwrap();
    assert!(report.is_clean());
}

#[tokio::test(start_paused = true)]
async fn drain_twice_reports_against_the_same_start() {
    let graceful = draining_within(10);
    let (svc, mut senders) = streaming(&graceful);
    let _response = svc.oneshot(Request::new(())).await.unwrap();
    let _tx = senders.recv().await.unwrap();

    // A first wait gives up (dropped) after 3 s; the second keeps the
    // deadline of the drain that started then.
    let _ = tokio::time::timeout(Duration::from_secs(3), graceful.drain()).await;
    let report = graceful.drain().await;
    assert_eq!(report.elapsed, Duration::from_secs(10));
    assert_eq!(report.requests_forced, 1);
}

/// Starts a drain of `graceful` in a task of its own.
fn spawn_drain(graceful: &Graceful) -> tokio::task::JoinHandle<handover::DrainReport> {
    let graceful = graceful.clone();
    tokio::spawn(async move { graceful.drain().await })
}

#[tokio::test(start_paused = true)]
async fn an_event_stream_waiting_at_the_close_grace_ends_after_its_last_whole_event() {
    let graceful = graceful_with(Duration::from_secs(10), Duration::from_secs(1));
    let (svc, mut senders) = streaming_as(&graceful, Some("text/event-stream"));
    let mut response = svc.oneshot(Request::new(())).await.unwrap();
    let tx = senders.recv().await.unwrap();
    let start = tokio::time::Instant::now();
    let drain = spawn_drain(&graceful);

    // An event that is ready when the close grace passes is still delivered.
    tx.send(data("id: 1\ndata: one\n\n")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let frame = response.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "id: 1\ndata: one\n\n");
    // Then, with nothing more ready, the stream ends: no error, no half event.
    assert!(response.body_mut().frame().await.is_none());
    assert!(response.body().is_end_stream());
    assert_eq!(graceful.in_flight(), 0);

    let report = drain.await.unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.requests_finished, 1);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(report.elapsed, Duration::from_secs(2));
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn an_event_stream_ends_the_moment_the_close_grace_passes() {
    let graceful = graceful_with(Duration::from_secs(10), Duration::from_millis(1500));
    let (svc, mut senders) = streaming_as(&graceful, Some("text/event-stream"));
    let mut response = svc.oneshot(Request::new(())).await.unwrap();
    let _tx = senders.recv().await.unwrap();
    let drain = spawn_drain(&graceful);
    let start = tokio::time::Instant::now();
    assert!(response.body_mut().frame().await.is_none());
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    assert_eq!(drain.await.unwrap().elapsed, Duration::from_millis(1500));
}

#[tokio::test(start_paused = true)]
async fn a_grpc_stream_waiting_at_the_close_grace_ends_with_unavailable() {
    let graceful = graceful_with(Duration::from_secs(10), Duration::from_secs(1));
    let (svc, mut senders) = streaming_as(&graceful, Some("application/grpc+proto"));
    let mut response = svc.oneshot(Request::new(())).await.unwrap();
    let tx = senders.recv().await.unwrap();
    tx.send(data("message")).await.unwrap();
    let drain = spawn_drain(&graceful);

    let frame = response.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "message");
    let frame = response.body_mut().frame().await.unwrap().unwrap();
    let trailers = frame.into_trailers().unwrap();
    assert_eq!(trailers["grpc-status"], "14", "UNAVAILABLE: retry");
    assert!(response.body_mut().frame().await.is_none());
    let report = drain.await.unwrap();
    assert_eq!(report.elapsed, Duration::from_secs(1));
    assert!(report.is_clean());
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn other_bodies_are_not_cut_at_the_close_grace() {
    let graceful = graceful_with(Duration::from_secs(10), Duration::from_secs(1));
    // A download, and gRPC-Web (whose trailers live in the body).
    for content_type in [
        None,
        Some("application/octet-stream"),
        Some("application/grpc-web"),
    ] {
        let (svc, mut senders) = streaming_as(&graceful, content_type);
        let mut response = svc.oneshot(Request::new(())).await.unwrap();
        let tx = senders.recv().await.unwrap();
        let drain = spawn_drain(&graceful);
        tokio::time::sleep(Duration::from_secs(3)).await;
        tx.send(data("still going")).await.unwrap();
        drop(tx);
        let frame = response.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(
            frame.into_data().unwrap(),
            "still going",
            "{content_type:?}"
        );
        assert!(response.body_mut().frame().await.is_none());
        assert_eq!(drain.await.unwrap().requests_forced, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn an_upgraded_connection_counts_until_its_token_drops() {
    let graceful = draining_within(10);
    let token = graceful.signal().track_upgrade();
    assert_eq!(graceful.upgraded(), 1);
    let drain = spawn_drain(&graceful);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !drain.is_finished(),
        "the drain waits for the upgraded connection"
    );
    drop(token);
    let report = drain.await.unwrap();
    assert_eq!(report.elapsed, Duration::from_millis(700));
    assert_eq!((report.upgraded_finished, report.upgraded_forced), (1, 0));
    assert!(report.is_clean());
}

#[tokio::test(start_paused = true)]
async fn upgraded_connections_open_at_the_close_grace_are_forced_and_not_waited_for() {
    let graceful = graceful_with(Duration::from_secs(10), Duration::from_secs(2));
    let held: Vec<_> = (0..3).map(|_| graceful.upgrade_token()).collect();
    let ending = graceful.upgrade_token();
    let drain = spawn_drain(&graceful);
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(ending);
    let report = drain.await.unwrap();
    assert_eq!(report.elapsed, Duration::from_secs(2), "at the close grace");
    assert_eq!((report.upgraded_finished, report.upgraded_forced), (1, 3));
    assert!(!report.is_clean());
    assert_eq!(graceful.upgraded(), 0);

    // Dropping the forced tokens later changes nothing; an upgrade that
    // comes after the close grace is forced at once.
    drop(held);
    let late = graceful.upgrade_token();
    assert_eq!(graceful.upgraded(), 0);
    let again = graceful.drain().await;
    assert_eq!((again.upgraded_finished, again.upgraded_forced), (1, 4));
    drop(late);
}

#[tokio::test(start_paused = true)]
async fn the_close_grace_is_capped_by_the_drain_timeout() {
    let graceful = graceful_with(Duration::from_secs(5), Duration::from_secs(60));
    let token = graceful.upgrade_token();
    let report = graceful.drain().await;
    assert_eq!(report.elapsed, Duration::from_secs(5));
    assert_eq!(report.upgraded_forced, 1);
    drop(token);
}
