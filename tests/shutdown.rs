//! A shutdown (`SIGTERM`, or `Handover::shutdown`) closes every socket this
//! process bound at the start of its drain: a new connection is refused at
//! once, never accepted into a backlog that is reset at exit, while the
//! requests in flight finish. A Unix socket's file is removed.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::io::ErrorKind;
use std::time::Duration;

use handover::{Exit, Handover};
use support::{Deploy, Server, send_signal, wait_exit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(60);

/// Sends `GET path` on a connection of its own; the response, whole, once
/// the server has closed the connection.
async fn start_request<S>(mut stream: S, path: &str) -> tokio::task::JoinHandle<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::spawn(async move {
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    })
}

/// While `slow` (a request started before the shutdown) is still in
/// flight, five connections in a row are refused, each at once; then
/// `slow`'s response, once it has come whole.
async fn refused_while_in_flight<F, Fut>(
    connect: F,
    slow: tokio::task::JoinHandle<String>,
) -> String
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>>,
{
    for attempt in 0..5 {
        let result = timeout(Duration::from_secs(1), connect())
            .await
            .unwrap_or_else(|_| panic!("attempt {attempt}: a refusal comes at once"));
        let error = result.expect_err("nothing accepts during a shutdown drain");
        assert!(
            matches!(
                error.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::NotFound
            ),
            "attempt {attempt}: refused, not {error:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !slow.is_finished(),
        "the refusals were seen during the drain, with a request still in flight"
    );
    timeout(Duration::from_secs(10), slow)
        .await
        .expect("the request in flight finishes")
        .unwrap()
}

async fn sigterm_refuses_new_connections_during_the_drain(server: Server) {
    let pid = server.current_pid();
    let addr = server.addr;
    let slow = start_request(
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        "/sleep/3000",
    )
    .await;
    // Whether the request has reached the handler yet or still waits in
    // the backlog, it is served: the drain accepts what waits there
    // before the socket closes.
    let stopped = "stopped accepting; draining";
    let before = server.log_text().matches(stopped).count();
    send_signal(pid, "TERM");
    server.wait_log(stopped, before + 1).await;
    let response = refused_while_in_flight(
        || async { tokio::net::TcpStream::connect(addr).await.map(drop) },
        slow,
    )
    .await;
    assert!(
        response.starts_with("HTTP/1.1 200 OK")
            && response.ends_with(&format!("slept 3000 in {pid}")),
        "the request in flight finishes: {response}"
    );
    wait_exit("the server exits", pid).await;
    assert!(server.wait_exited().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_port_at_once_and_new_connections_are_refused_not_reset() {
    timeout(BOUND, async {
        let server = Server::start(Deploy::new("term-refuses"), &[]).await;
        sigterm_refuses_new_connections_during_the_drain(server).await;
    })
    .await
    .unwrap();
}

/// The same, in a generation that inherited the socket from the one that
/// bound it, and beside a standby: no copy is left open anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_upgrade_and_with_a_standby_sigterm_still_refuses_new_connections() {
    timeout(BOUND, async {
        let server = Server::start_with(
            Deploy::new("term-refuses-standby"),
            &["--ready-timeout", "5", "--standby", "on"],
            &[],
        )
        .await;
        server.wait_log("standby started", 1).await;
        let second = server.restart().await;
        server.wait_log("standby started", 2).await;
        assert_eq!(server.current_pid(), second);
        sigterm_refuses_new_connections_during_the_drain(server).await;
    })
    .await
    .unwrap();
}

/// In this process: a `Handover` that handles no signal, and its Unix
/// listener `api` bound in a fresh directory.
fn on_unix_socket(
    tag: &str,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    Handover,
    tokio::net::UnixListener,
) {
    let dir = std::env::temp_dir().join(format!("handover-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("api.sock");
    let handover = Handover::builder()
        .upgrade_signals([])
        .shutdown_signals([])
        .from_env()
        .unwrap();
    let listener = handover.unix("api", &path).unwrap();
    (dir, path, handover, listener)
}

/// In process, on a Unix socket: `Handover::shutdown` removes the socket
/// file at the start of the drain, so a client finds no server there at
/// once (and a new server can bind the path), while the request in flight
/// finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_removes_the_unix_socket_file_it_bound_and_finishes_what_is_in_flight() {
    timeout(BOUND, async {
        let (dir, path, handover, listener) = on_unix_socket("unix-shutdown");
        let app = axum::Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                "slow and done"
            }),
        );
        let serving = tokio::spawn(handover.serve(listener, app).into_future());

        let slow = start_request(
            tokio::net::UnixStream::connect(&path).await.unwrap(),
            "/slow",
        )
        .await;
        support::wait_until("the request is in flight", Duration::from_secs(10), || {
            handover.graceful().in_flight() == 1
        })
        .await;
        handover.shutdown();
        assert!(!path.exists(), "the socket file is removed at once");
        let response = refused_while_in_flight(
            || async { tokio::net::UnixStream::connect(&path).await.map(drop) },
            slow,
        )
        .await;
        assert!(response.ends_with("slow and done"), "{response}");
        let exit = serving.await.unwrap().unwrap();
        assert!(matches!(exit, Exit::Shutdown { .. }), "{exit:?}");
        assert!(exit.report().is_clean(), "{}", exit.report());
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await
    .unwrap();
}

/// A socket file the process did not create (it was passed by systemd,
/// or bound by another server since) is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_leaves_a_socket_file_that_another_server_bound_since() {
    timeout(BOUND, async {
        let (dir, path, handover, listener) = on_unix_socket("unix-rebound");
        // Another server took the path over meanwhile (after removing the
        // file by hand, say).
        std::fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        let serving = tokio::spawn(handover.serve(listener, app).into_future());
        handover.shutdown();
        let exit = serving.await.unwrap().unwrap();
        assert!(matches!(exit, Exit::Shutdown { .. }), "{exit:?}");
        assert!(path.exists(), "the other server's socket file stays");
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await
    .unwrap();
}

use std::future::IntoFuture;
