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

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use handover::{Exit, Handover};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// One request on a fresh connection; the response as text.
async fn get_text(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
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
        let started = Arc::new(Notify::new());
        let on_start = started.clone();
        let app = Router::new().route("/", get(|| async { "hello" })).route(
            "/slow",
            get(move || async move {
                on_start.notify_one();
                tokio::time::sleep(Duration::from_millis(300)).await;
                "slow"
            }),
        );
        // serve reports readiness itself, which starts the signal driver
        // (and logs "ready", which panics).
        let server = tokio::spawn(handover.serve(listener, app).into_future());
        assert!(get_text(addr, "/").await.ends_with("hello"));

        // A request in flight when SIGTERM comes: the drain must let it end.
        let slow = tokio::spawn(get_text(addr, "/slow"));
        started.notified().await;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let signalled = Instant::now();

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
        assert!(signalled.elapsed() < Duration::from_secs(5));
    })
    .await
    .expect("the test ends within the bound");
}
