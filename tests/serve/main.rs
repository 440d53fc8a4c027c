//! The serve loop over real sockets on 127.0.0.1 with real clients: what a
//! client sees when the server drains.
#![allow(clippy::unwrap_used)]

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::routing::get;
use bytes::Bytes;
use handover::{DrainReport, Graceful};
use http::StatusCode;
use http::header::CONNECTION;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::future::IntoFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::UCred;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

use support::served::{Served, get_req};
use support::tools;
use tonic::transport::server::TcpConnectInfo;

#[path = "../support/mod.rs"]
mod support;

/// Every test ends within this, whatever happens.
const BOUND: Duration = Duration::from_secs(60);

const STREAM_CHUNKS: usize = 10;
const STREAM_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Clone, Default)]
struct Calls(Arc<AtomicUsize>);

fn app(calls: Calls) -> Router {
    async fn hello(State(calls): State<Calls>) -> &'static str {
        calls.0.fetch_add(1, Ordering::SeqCst);
        "hello"
    }
    async fn sleep(State(calls): State<Calls>, Path(ms): Path<u64>) -> String {
        calls.0.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        format!("slept {ms}")
    }
    async fn stream(State(calls): State<Calls>) -> Body {
        calls.0.fetch_add(1, Ordering::SeqCst);
        let chunks = futures_util::stream::unfold(0, |i| async move {
            if i == STREAM_CHUNKS {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(STREAM_INTERVAL).await;
            }
            Some((
                Ok::<_, io::Error>(Bytes::from(format!("chunk {i}\n"))),
                i + 1,
            ))
        });
        Body::from_stream(chunks)
    }
    Router::new()
        .route("/", get(hello))
        .route("/sleep/{ms}", get(sleep))
        .route("/stream", get(stream))
        .with_state(calls)
}

/// `app` on a fresh port with these settings; its calls are counted.
async fn start(idle_grace: Duration, drain_timeout: Duration) -> (Served, Calls) {
    let calls = Calls::default();
    let app = app(calls.clone());
    let graceful = Graceful::builder().drain_timeout(drain_timeout).build();
    let server = Served::start_with(graceful, |listener, graceful| {
        handover::serve(listener, app, graceful).idle_grace(idle_grace)
    })
    .await;
    (server, calls)
}

async fn http1(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    JoinHandle<hyper::Result<()>>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    (sender, tokio::spawn(conn))
}

#[derive(Debug, Default)]
struct ClientLog {
    answered: usize,
    last_said_close: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_clients_get_every_response_they_sent_for_during_a_drain() {
    timeout(BOUND, async {
        const CLIENTS: usize = 8;
        let (server, calls) = start(Duration::from_millis(500), Duration::from_secs(20)).await;
        let answered = Arc::new(AtomicUsize::new(0));

        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let answered = answered.clone();
                let addr = server.addr;
                tokio::spawn(async move {
                    let (mut sender, conn) = http1(addr).await;
                    let mut log = ClientLog::default();
                    loop {
                        if sender.ready().await.is_err() {
                            break; // closed between requests: nothing was sent
                        }
                        let response = match sender.send_request(get_req("/")).await {
                            Ok(response) => response,
                            // Refused before a byte was written: not lost.
                            Err(e) if e.is_canceled() => break,
                            Err(e) => panic!("a request that was sent failed: {e}"),
                        };
                        assert_eq!(response.status(), StatusCode::OK);
                        log.last_said_close = response
                            .headers()
                            .get(CONNECTION)
                            .is_some_and(|v| v == "close");
                        let body = response.into_body().collect().await.unwrap().to_bytes();
                        assert_eq!(body, "hello", "every response is whole");
                        log.answered += 1;
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    let ended = conn.await.unwrap();
                    assert!(ended.is_ok(), "the connection ended cleanly: {ended:?}");
                    log
                })
            })
            .collect();

        // Drain in the middle of the load.
        while answered.load(Ordering::SeqCst) < 400 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        server.graceful.start_drain();

        for client in clients {
            let log = client.await.unwrap();
            assert!(log.answered > 0);
            assert!(
                log.last_said_close,
                "each client left because its last response said `Connection: close`: {log:?}"
            );
        }
        let calls = calls.0.load(Ordering::SeqCst);
        let report = server.report().await;
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.connections_finished, CLIENTS);
        assert_eq!(
            calls,
            answered.load(Ordering::SeqCst),
            "every request the server handled reached its client"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn http2_open_streams_finish_after_goaway_and_new_streams_go_nowhere() {
    timeout(BOUND, async {
        const STREAMS: usize = 5;
        let (server, calls) = start(Duration::from_secs(5), Duration::from_secs(20)).await;
        let stream = TcpStream::connect(server.addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);

        let open: Vec<_> = (0..STREAMS)
            .map(|_| {
                let mut sender = sender.clone();
                tokio::spawn(async move {
                    let response = sender.send_request(get_req("/sleep/300")).await.unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                    assert!(
                        response.headers().get(CONNECTION).is_none(),
                        "HTTP/2 has no Connection header"
                    );
                    response.into_body().collect().await.unwrap().to_bytes()
                })
            })
            .collect();
        server.wait_in_flight(STREAMS).await;
        server.graceful.start_drain();

        for stream in open {
            assert_eq!(
                stream.await.unwrap(),
                "slept 300",
                "open streams finish whole"
            );
        }
        let ended = conn.await.unwrap();
        assert!(ended.is_ok(), "GOAWAY is a graceful end: {ended:?}");

        let mut late = sender.clone();
        assert!(
            late.send_request(get_req("/")).await.is_err(),
            "no new stream after GOAWAY"
        );
        assert_eq!(
            calls.0.load(Ordering::SeqCst),
            STREAMS,
            "nothing after GOAWAY was processed"
        );
        let report = server.report().await;
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.requests_finished, STREAMS);
        assert!(
            report.elapsed < Duration::from_secs(5),
            "an HTTP/2 connection does not wait for the idle grace: {report}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn streaming_response_started_before_the_drain_is_delivered_whole() {
    timeout(BOUND, async {
        let idle_grace = Duration::from_secs(10);
        let (server, _) = start(idle_grace, Duration::from_secs(30)).await;
        let (mut sender, conn) = http1(server.addr).await;
        let response = sender.send_request(get_req("/stream")).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "chunk 0\n");

        server.graceful.start_drain();
        let mut received = vec![first];
        while let Some(frame) = body.frame().await {
            received.push(frame.unwrap().into_data().unwrap());
            if received.len() < STREAM_CHUNKS {
                assert!(
                    !server.task.is_finished(),
                    "the drain ended with the body still streaming"
                );
            }
        }
        let expected: Vec<_> = (0..STREAM_CHUNKS)
            .map(|i| Bytes::from(format!("chunk {i}\n")))
            .collect();
        assert_eq!(received, expected, "every chunk, in order");
        assert!(conn.await.unwrap().is_ok(), "the connection closes cleanly");

        let report = server.report().await;
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.requests_finished, 1);
        // The drain ended with the body, not at the idle grace or the deadline.
        assert!(
            report.elapsed < idle_grace,
            "drain waited for a timer after the last chunk: {report}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_the_drain_past_idle_grace() {
    timeout(BOUND, async {
        const IDLE: usize = 20;
        let idle_grace = Duration::from_millis(300);
        let drain_timeout = Duration::from_secs(30);
        let (server, _) = start(idle_grace, drain_timeout).await;
        let mut conns = Vec::new();
        for _ in 0..IDLE {
            let (mut sender, conn) = http1(server.addr).await;
            let response = sender.send_request(get_req("/")).await.unwrap();
            response.into_body().collect().await.unwrap();
            conns.push((sender, conn));
        }
        assert_eq!(server.graceful.connections(), IDLE);

        let report = server.graceful.drain().await;
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.connections_finished, IDLE);
        assert!(
            report.elapsed >= idle_grace,
            "idle clients get their grace: {report}"
        );
        assert!(
            report.elapsed < drain_timeout,
            "idle clients closed at the grace, not the deadline: {report}"
        );
        for (_sender, conn) in conns {
            assert!(conn.await.unwrap().is_ok(), "closed cleanly, not reset");
        }
        server.report().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_forced_at_the_deadline() {
    timeout(BOUND, async {
        let drain_timeout = Duration::from_millis(800);
        let (server, _) = start(Duration::from_millis(100), drain_timeout).await;
        // Slowloris: a request head that never ends.
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            .await
            .unwrap();
        // And an ordinary idle client beside it.
        let (mut sender, idle) = http1(server.addr).await;
        sender
            .send_request(get_req("/"))
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
        while server.graceful.connections() < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        server.graceful.start_drain();
        let report = server.report().await;
        assert_eq!(report.connections_forced, 1, "{report}");
        assert_eq!(report.connections_finished, 1, "{report}");
        assert!(report.elapsed >= drain_timeout, "{report}");
        assert!(idle.await.unwrap().is_ok());

        // The forced connection is really closed.
        let mut buf = [0u8; 64];
        let read = timeout(Duration::from_secs(5), slow.read(&mut buf))
            .await
            .expect("the forced connection was closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn nothing_is_accepted_once_the_drain_starts() {
    timeout(BOUND, async {
        let (server, _) = start(Duration::from_millis(100), Duration::from_secs(10)).await;
        let addr = server.addr;
        server.graceful.start_drain();
        let report = server.report().await;
        assert!(report.is_clean());
        let refused = TcpStream::connect(addr).await;
        assert!(refused.is_err(), "the listener is closed: {refused:?}");
    })
    .await
    .unwrap();
}

/// curl, an independent HTTP/1.1 and HTTP/2 client, sees its slow request
/// answered across the start of a drain.
#[tokio::test]
async fn curl_requests_in_flight_during_a_drain_complete() {
    let curl = tools::tool("curl");
    timeout(BOUND, async {
        let (server, _) = start(Duration::from_millis(200), Duration::from_secs(20)).await;
        let url = format!("http://{}/sleep/400", server.addr);
        let spawn_curl = |extra: &'static str| {
            let mut cmd = tokio::process::Command::new(&curl);
            cmd.args([
                "-sS",
                "--max-time",
                "20",
                "-o",
                "-",
                "-w",
                " %{http_code} %{http_version}",
            ]);
            if !extra.is_empty() {
                cmd.arg(extra);
            }
            cmd.arg(&url).kill_on_drop(true).output()
        };
        let h1 = tokio::spawn(spawn_curl(""));
        let h2 = tokio::spawn(spawn_curl("--http2-prior-knowledge"));
        server.wait_in_flight(2).await;
        server.graceful.start_drain();

        let h1 = h1.await.unwrap().expect("curl is installed");
        let h2 = h2.await.unwrap().expect("curl is installed");
        assert!(h1.status.success(), "{h1:?}");
        assert!(h2.status.success(), "{h2:?}");
        assert_eq!(String::from_utf8_lossy(&h1.stdout), "slept 400 200 1.1");
        assert_eq!(String::from_utf8_lossy(&h2.stdout), "slept 400 200 2");
        let report = server.report().await;
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.requests_finished, 2);
    })
    .await
    .unwrap();
}

/// Garbage bytes are answered and closed at once; a request line that never
/// ends is closed at the deadline and counted as forced. Neither holds the
/// process past the drain timeout.
#[tokio::test]
async fn malformed_http_during_a_drain_never_holds_the_process() {
    timeout(BOUND, async {
        let drain_timeout = Duration::from_millis(600);
        let (server, _) = start(Duration::from_millis(100), drain_timeout).await;
        let mut garbage = TcpStream::connect(server.addr).await.unwrap();
        garbage
            .write_all(b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n")
            .await
            .unwrap();
        let mut endless = TcpStream::connect(server.addr).await.unwrap();
        endless
            .write_all(b"GET /a-request-line-that-never-ends")
            .await
            .unwrap();

        // The garbage connection is answered with an error and closed.
        let mut reply = Vec::new();
        timeout(Duration::from_secs(10), garbage.read_to_end(&mut reply))
            .await
            .expect("closed by the server")
            .unwrap();
        assert!(
            reply.starts_with(b"HTTP/1.1 400"),
            "{:?}",
            String::from_utf8_lossy(&reply)
        );
        while server.graceful.connections() != 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        server.graceful.start_drain();
        let report = server.report().await;
        assert_eq!(report.connections_forced, 1, "{report}");
        assert!(report.elapsed >= drain_timeout, "{report}");
        let mut buf = [0u8; 16];
        let read = timeout(Duration::from_secs(5), endless.read(&mut buf))
            .await
            .expect("the endless connection was closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    })
    .await
    .unwrap();
}

/// What `connect_info` makes of a connection reaches every request on it,
/// over HTTP/1 and HTTP/2: axum's `ConnectInfo` extractor and tonic's
/// `TcpConnectInfo` (which its `Request::remote_addr` reads) name the
/// request's own client, not another connection's. The serve loop's
/// `DrainSignal` is there beside them.
#[tokio::test]
async fn connect_info_tells_each_request_the_peer_of_its_own_connection() {
    timeout(BOUND, async {
        async fn peer(
            ConnectInfo(peer): ConnectInfo<SocketAddr>,
            Extension(info): Extension<TcpConnectInfo>,
            Extension(signal): Extension<handover::DrainSignal>,
        ) -> String {
            assert!(!signal.is_draining());
            format!("{peer} {:?} {:?}", info.local_addr, info.remote_addr)
        }
        let app = Router::new().route("/peer", get(peer));
        let server = Served::start(|listener, graceful| {
            handover::serve(listener, app, graceful)
                .signal_extension(true)
                .connect_info(|_, peer: &SocketAddr| ConnectInfo(*peer))
                .connect_info(|io: &TcpStream, peer: &SocketAddr| TcpConnectInfo {
                    local_addr: io.local_addr().ok(),
                    remote_addr: Some(*peer),
                })
        })
        .await;
        let addr = server.addr;
        let expected = |client: SocketAddr| format!("{client} Some({addr}) Some({client})");
        let body = |res: http::Response<hyper::body::Incoming>| async move {
            assert_eq!(res.status(), StatusCode::OK);
            res.into_body().collect().await.unwrap().to_bytes()
        };

        // Two HTTP/1 keep-alive connections, two requests each, in turn.
        let mut h1 = Vec::new();
        for _ in 0..2 {
            let stream = TcpStream::connect(addr).await.unwrap();
            let client = stream.local_addr().unwrap();
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            h1.push((client, sender));
        }
        for _ in 0..2 {
            for (client, sender) in &mut h1 {
                let res = sender.send_request(get_req("/peer")).await.unwrap();
                assert_eq!(body(res).await, expected(*client));
            }
        }
        // One HTTP/2 connection, two streams at once.
        let stream = TcpStream::connect(addr).await.unwrap();
        let client = stream.local_addr().unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let (a, b) = tokio::join!(
            sender.clone().send_request(get_req("/peer")),
            sender.clone().send_request(get_req("/peer")),
        );
        assert_eq!(body(a.unwrap()).await, expected(client));
        assert_eq!(body(b.unwrap()).await, expected(client));

        drop((h1, sender));
        server.drain_clean().await;
    })
    .await
    .unwrap();
}

/// On a Unix socket, `connect_info` can hand each request its peer's
/// credentials.
#[tokio::test]
async fn connect_info_on_a_unix_socket_gives_requests_the_peers_credentials() {
    timeout(BOUND, async {
        let dir = std::env::temp_dir().join(format!("handover-serve-ucred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let graceful = Graceful::new();
        let app = Router::new().route(
            "/whoami",
            get(|Extension(cred): Extension<UCred>| async move {
                format!("pid {:?} uid {}", cred.pid(), cred.uid())
            }),
        );
        let serve = handover::serve(listener, app, &graceful)
            .connect_info(|io: &UnixStream, _| io.peer_cred().unwrap());
        let server = tokio::spawn(serve.into_future());

        let stream = UnixStream::connect(&path).await.unwrap();
        let own = stream.peer_cred().unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let res = sender.send_request(get_req("/whoami")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        // Client and server are this process.
        assert_eq!(own.pid(), Some(std::process::id() as i32));
        assert_eq!(body, format!("pid {:?} uid {}", own.pid(), own.uid()));

        drop(sender);
        graceful.start_drain();
        let report = server.await.unwrap().unwrap();
        assert!(report.is_clean(), "{report}");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .unwrap();
}

/// `http_builder` reaches hyper's server settings: here HTTP/1 header
/// names go out in title case, and an HTTP/2 client is held to one stream
/// at a time.
#[tokio::test]
async fn http_builder_settings_reach_every_connection() {
    timeout(BOUND, async {
        let server = Served::start(|listener, graceful| {
            handover::serve(listener, app(Calls::default()), graceful)
                .http_builder(|builder| {
                    builder.http1().title_case_headers(true);
                })
                .http_builder(|builder| {
                    builder.http2().max_concurrent_streams(1);
                })
        })
        .await;
        let addr = server.addr;

        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.contains("\r\nContent-Length: 5\r\n"), "{response}");

        // Two slow requests on one HTTP/2 connection: the second waits for
        // the first's stream to end.
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        // Once this is answered, the client has the server's SETTINGS.
        let first = sender.clone().send_request(get_req("/")).await.unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        let started = Instant::now();
        let (a, b) = tokio::join!(
            sender.clone().send_request(get_req("/sleep/200")),
            sender.clone().send_request(get_req("/sleep/200")),
        );
        assert_eq!(a.unwrap().status(), StatusCode::OK);
        assert_eq!(b.unwrap().status(), StatusCode::OK);
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "one stream at a time: {:?}",
            started.elapsed()
        );

        drop(sender);
        server.drain_clean().await;
    })
    .await
    .unwrap();
}

/// A `connect_info` closure that panics costs its own connection only: the
/// accept loop goes on, and the drain does not wait for the lost one.
#[tokio::test]
async fn a_panicking_connect_info_closes_only_its_connection() {
    timeout(BOUND, async {
        use std::sync::atomic::AtomicBool;
        let first = Arc::new(AtomicBool::new(true));
        let server = Served::start(|listener, graceful| {
            handover::serve(listener, app(Calls::default()), graceful).connect_info(
                move |_, peer: &SocketAddr| {
                    assert!(
                        !first.swap(false, Ordering::SeqCst),
                        "a bug in the application"
                    );
                    ConnectInfo(*peer)
                },
            )
        })
        .await;
        let addr = server.addr;

        let mut doomed = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let read = doomed.read(&mut buf).await;
        assert!(matches!(read, Ok(0) | Err(_)), "closed: {read:?}");

        let (mut sender, conn) = http1(addr).await;
        let res = sender.send_request(get_req("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        drop(sender);
        let _ = conn.await;

        let graceful = server.graceful.clone();
        server.drain_clean().await;
        assert_eq!(graceful.connections(), 0);
    })
    .await
    .unwrap();
}

mod proxy_protocol;
mod signal_and_limits;
mod upgraded;
