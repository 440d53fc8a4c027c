//! A subscriber that panics on every event must not stop handover from
//! answering its signals or from draining.
//!
//! tracing-subscriber's `fmt` layer does panic: it reports a failed write
//! with `eprintln!`, which panics when stderr is a broken pipe as well (the
//! log collector died, the SSH session that started the server ended).
//! Before handover kept its log lines from unwinding, the first of them
//! ended the task that handles signals, and the process ignored `SIGTERM`.
//!
//! A file of its own: the subscriber is the process's global default, and
//! nextest runs each test in a process of its own.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use handover::{Exit, Handover};
use tokio::sync::Notify;
use tokio::time::timeout;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

const BOUND: Duration = Duration::from_secs(30);
const PANIC_MESSAGE: &str = "the log pipe is broken";

/// Panics on every event, as a `fmt` subscriber whose stdout and stderr
/// are both broken pipes does.
struct Panicking;

impl Subscriber for Panicking {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {
        panic!("{PANIC_MESSAGE}");
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_serve_returns_when_every_log_line_panics() {
    tracing::subscriber::set_global_default(Panicking).unwrap();
    // The panics this test provokes are expected: keep them off the
    // output, and let any other panic (a failed assertion) print.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let ours =
            info.payload().downcast_ref::<String>().map(String::as_str) == Some(PANIC_MESSAGE);
        if !ours {
            default_hook(info);
        }
    }));

    timeout(BOUND, async {
        let handover = Handover::builder()
            .drain_timeout(Duration::from_secs(20))
            .from_env()
            .unwrap();
        let listener = handover.tcp("http", "127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // `/slow` answers once the test says so: after the drain started.
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (on_start, released) = (started.clone(), release.clone());
        let app = Router::new().route("/", get(|| async { "hello" })).route(
            "/slow",
            get(move || async move {
                on_start.notify_one();
                released.notified().await;
                "slow"
            }),
        );
        // serve reports readiness itself, which starts the signal driver
        // (and logs "ready", which panics).
        let server = tokio::spawn(handover.serve(listener, app.with_state(())).into_future());
        assert!(support::get(addr, "/").await.ends_with("hello"));

        // A request in flight when SIGTERM comes: the drain must let it end.
        let slow = tokio::spawn(support::get(addr, "/slow"));
        started.notified().await;
        support::send_signal(std::process::id(), "TERM");
        // The signal is handled, although its log line panics: the drain
        // starts, with the request still in flight; then it may end.
        support::wait_until("the drain starts", Duration::from_secs(10), || {
            handover.graceful().is_draining()
        })
        .await;
        assert_eq!(handover.graceful().in_flight(), 1);
        release.notify_one();

        let exit = timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returns after SIGTERM although every log line panics")
            .unwrap()
            .unwrap();
        let Exit::Shutdown { report } = exit else {
            panic!("expected a shutdown, got {exit:?}");
        };
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.requests_finished, 1, "{report}");
        assert!(slow.await.unwrap().ends_with("slow"));
    })
    .await
    .expect("the test ends within the bound");
}
