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

use served::{Served, get_req};
use tonic::transport::server::TcpConnectInfo;

#[path = "support/h2_websocket.rs"]
mod h2_websocket;
#[path = "support/served.rs"]
mod served;
#[path = "support/tools.rs"]
mod tools;
#[path = "support/websocket.rs"]
mod websocket;

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
    let server = Served::start(|listener, graceful| {
        handover::serve(listener, app, graceful)
            .idle_grace(idle_grace)
            .drain_timeout(drain_timeout)
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
        let drain_started = Instant::now();
        let mut received = vec![first];
        while let Some(frame) = body.frame().await {
            received.push(frame.unwrap().into_data().unwrap());
        }
        let last_chunk_at = Instant::now();
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
        assert!(
            report.elapsed >= last_chunk_at - drain_started - Duration::from_millis(5),
            "the drain outlived the stream: {report}"
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

        let report = server.graceful.drain(drain_timeout).await;
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
/// `ShutdownSignal` is there beside them.
#[tokio::test]
async fn connect_info_tells_each_request_the_peer_of_its_own_connection() {
    timeout(BOUND, async {
        async fn peer(
            ConnectInfo(peer): ConnectInfo<SocketAddr>,
            Extension(info): Extension<TcpConnectInfo>,
            Extension(signal): Extension<handover::ShutdownSignal>,
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

/// Behind a load balancer that speaks the PROXY protocol (HAProxy, AWS NLB),
/// an acceptor reads the header and `accepted_info` gives handlers the real
/// client's address: the acceptor's stream carries it.
mod proxy_protocol {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// A connection whose PROXY v1 header has been read.
    struct Proxied {
        stream: TcpStream,
        client: SocketAddr,
    }

    impl AsyncRead for Proxied {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Proxied {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.stream).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        }
    }

    /// Reads `PROXY TCP4|TCP6 <client> <server> <client port> <server
    /// port>\r\n`, a byte at a time so that nothing after it is read.
    async fn read_header(mut stream: TcpStream) -> io::Result<Proxied> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") {
            if line.len() == 107 {
                return Err(invalid("PROXY header too long"));
            }
            line.push(stream.read_u8().await?);
        }
        let line = std::str::from_utf8(&line).map_err(|_| invalid("PROXY header not text"))?;
        let fields: Vec<&str> = line.trim_end().split(' ').collect();
        let ["PROXY", "TCP4" | "TCP6", client, _, port, _] = fields[..] else {
            return Err(invalid("not a PROXY v1 header"));
        };
        let ip = client.parse().map_err(|_| invalid("bad client address"))?;
        let port = port.parse().map_err(|_| invalid("bad client port"))?;
        Ok(Proxied {
            stream,
            client: SocketAddr::new(ip, port),
        })
    }

    #[tokio::test]
    async fn an_acceptor_reads_the_header_and_handlers_see_the_real_client() {
        timeout(BOUND, async {
            let app =
                Router::new().route(
                    "/",
                    get(|ConnectInfo(client): ConnectInfo<SocketAddr>| async move {
                        client.to_string()
                    }),
                );
            let server = Served::start(|listener, graceful| {
                handover::serve(listener, app, graceful)
                    .acceptor(read_header)
                    .accepted_info(|proxied: &Proxied| ConnectInfo(proxied.client))
            })
            .await;
            let addr = server.addr;

            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n")
                .await
                .unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            for _ in 0..2 {
                let res = sender.send_request(get_req("/")).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                let body = res.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, "203.0.113.7:51234");
            }

            // No header: that connection is closed, unanswered.
            let mut plain = TcpStream::connect(addr).await.unwrap();
            plain
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            let _ = plain.read_to_end(&mut answer).await;
            assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

            drop(sender);
            server.drain_clean().await;
        })
        .await
        .unwrap();
    }
}

mod upgraded {
    //! WebSocket connections, upgraded through axum, under the serve loop
    //! and under `axum::serve` with an `UpgradeToken`.
    use super::h2_websocket::{self, H2Ws};
    use super::websocket::expect_going_away;
    use super::*;
    use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
    use axum::response::Response;
    use axum::routing::any;
    use axum::{Extension, Router};
    use futures_util::{SinkExt, StreamExt};
    use handover::ShutdownSignal;
    use tokio::sync::mpsc;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message as ClientMessage;
    use tokio_tungstenite::tungstenite::protocol::Role;

    /// A naive echo that never looks at the drain signal; reports how its
    /// socket ended.
    fn naive_echo(ended: mpsc::UnboundedSender<String>) -> Router {
        async fn ws(
            upgrade: WebSocketUpgrade,
            Extension(shutdown): Extension<ShutdownSignal>,
            Extension(ended): Extension<mpsc::UnboundedSender<String>>,
        ) -> Response {
            // Under `serve` this counts nothing extra.
            let token = shutdown.track_upgrade();
            upgrade.on_upgrade(move |mut socket: WebSocket| async move {
                let end = loop {
                    match socket.recv().await {
                        Some(Ok(Message::Text(t))) => {
                            if let Err(e) = socket.send(Message::Text(t)).await {
                                break format!("send error: {e}");
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break format!("recv error: {e}"),
                        None => break "closed".to_owned(),
                    }
                };
                drop(token);
                ended.send(end).unwrap();
            })
        }
        // `any`: a WebSocket over HTTP/2 is a CONNECT, not a GET.
        Router::new()
            .route("/", get(|| async { "hello" }))
            .route("/ws", any(ws))
            .layer(Extension(ended))
    }

    /// `app` under `serve` on 127.0.0.1, with `close_grace` and a 30 s drain
    /// timeout: its address, its `Graceful`, and the task that resolves to
    /// its report.
    async fn serve_app(
        app: Router,
        close_grace: Duration,
    ) -> (SocketAddr, Graceful, JoinHandle<io::Result<DrainReport>>) {
        let server = Served::start(|listener, graceful| {
            handover::serve(listener, app, graceful)
                .signal_extension(true)
                .close_grace(close_grace)
                .drain_timeout(Duration::from_secs(30))
        })
        .await;
        (server.addr, server.graceful, server.task)
    }

    /// `took` from the drain's start to a force: at the close grace, not
    /// before, and not anywhere near the drain timeout.
    fn assert_forced_at_close_grace(took: Duration, close_grace: Duration) {
        assert!(took >= close_grace, "forced after {took:?}");
        assert!(took < close_grace * 10, "forced after {took:?}");
    }

    /// An echo that says goodbye (Close 1001) when the drain starts, then
    /// waits for the client's Close.
    async fn polite_ws(
        upgrade: WebSocketUpgrade,
        Extension(shutdown): Extension<ShutdownSignal>,
    ) -> Response {
        upgrade.on_upgrade(move |mut socket: WebSocket| async move {
            loop {
                tokio::select! {
                    biased;
                    message = socket.recv() => match message {
                        Some(Ok(Message::Text(t))) => {
                            if socket.send(Message::Text(t)).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return,
                    },
                    () = shutdown.draining() => break,
                }
            }
            let close = CloseFrame {
                code: close_code::AWAY,
                reason: "restarting".into(),
            };
            if socket.send(Message::Close(Some(close))).await.is_ok() {
                while let Some(Ok(_)) = socket.recv().await {}
            }
        })
    }

    /// `/flood`: sends binary messages until a send fails, ignoring the
    /// drain; reports how it ended.
    fn flood(ended: mpsc::UnboundedSender<String>) -> Router {
        Router::new()
            .route("/", get(|| async { "hello" }))
            .route("/flood", any(flood_ws))
            .layer(Extension(ended))
    }

    async fn flood_ws(
        upgrade: WebSocketUpgrade,
        Extension(ended): Extension<mpsc::UnboundedSender<String>>,
    ) -> Response {
        upgrade.on_upgrade(move |mut socket: WebSocket| async move {
            let chunk = Bytes::from(vec![0u8; 16 * 1024]);
            let mut sent = 0usize;
            let end = loop {
                if let Err(e) = socket.send(Message::Binary(chunk.clone())).await {
                    break format!("send error after {sent} messages: {e}");
                }
                sent += 1;
            };
            ended.send(end).unwrap();
        })
    }

    async fn echo_once(ws: &mut H2Ws, text: &str) {
        ws.send(ClientMessage::text(text)).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().to_text().unwrap(), text);
    }

    async fn sleep(Path(ms): Path<u64>) -> String {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        format!("slept {ms}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_websocket_over_http2_says_goodbye_at_the_drain_and_its_connection_finishes() {
        timeout(BOUND, async {
            const CLOSE_GRACE: Duration = Duration::from_secs(5);
            let app = Router::new()
                .route("/", get(|| async { "hello" }))
                .route("/ws", any(polite_ws));
            let (addr, graceful, server) = serve_app(app, CLOSE_GRACE).await;

            let (mut ws, sender, conn) = h2_websocket::connect(addr, "/ws").await;
            echo_once(&mut ws, "hi").await;
            // Inside its HTTP/2 connection: counted as that connection.
            assert_eq!((graceful.connections(), graceful.upgraded()), (1, 0));

            let started = Instant::now();
            graceful.start_drain();
            expect_going_away(&mut ws).await;
            // tungstenite answers the Close; then the stream ends.
            while let Some(next) = ws.next().await {
                assert!(!matches!(next, Ok(ClientMessage::Text(_))), "{next:?}");
            }
            drop(sender);
            let ended = conn.await.unwrap();
            assert!(ended.is_ok(), "GOAWAY, then a clean end: {ended:?}");
            let report = server.await.unwrap().unwrap();
            assert!(report.is_clean(), "{report}");
            assert_eq!(report.connections_finished, 1, "{report}");
            assert!(
                started.elapsed() < CLOSE_GRACE,
                "it did not wait for the close grace: {report}"
            );
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn websockets_over_http2_that_ignore_the_drain_are_forced_at_the_close_grace() {
        timeout(BOUND, async {
            const CLOSE_GRACE: Duration = Duration::from_millis(300);
            let (ended_tx, mut ended) = mpsc::unbounded_channel();
            let (addr, graceful, server) = serve_app(naive_echo(ended_tx), CLOSE_GRACE).await;

            // Two WebSockets on one connection; the client then goes quiet
            // and the handlers ignore the drain.
            let (mut ws, mut sender, conn) = h2_websocket::connect(addr, "/ws").await;
            echo_once(&mut ws, "hi").await;
            let mut second = h2_websocket::open(&mut sender, "/ws").await;
            echo_once(&mut second, "there").await;

            let started = Instant::now();
            graceful.start_drain();
            for _ in 0..2 {
                let end = ended.recv().await.unwrap();
                assert!(
                    end.starts_with("recv error"),
                    "the blocked read fails: {end}"
                );
            }
            let took = started.elapsed();
            assert_forced_at_close_grace(took, CLOSE_GRACE);
            let report = server.await.unwrap().unwrap();
            assert_eq!(
                (
                    report.connections_finished,
                    report.connections_forced,
                    report.upgraded_forced
                ),
                (0, 0, 1),
                "the connection counts as upgraded and forced: {report}"
            );
            assert!(report.elapsed < CLOSE_GRACE * 10, "{report}");
            // The client's connection is gone, without a Close handshake.
            assert!(!matches!(ws.next().await, Some(Ok(ClientMessage::Text(_)))));
            let _ = conn.await.unwrap();
        })
        .await
        .unwrap();
    }

    /// A socket whose reads stop (stay pending) once `stop` is set, as a hung
    /// client's would.
    struct StopReading {
        inner: TcpStream,
        stop: Arc<std::sync::atomic::AtomicBool>,
    }

    impl tokio::io::AsyncRead for StopReading {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if self.stop.load(Ordering::SeqCst) {
                return std::task::Poll::Pending;
            }
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for StopReading {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_websocket_over_http2_whose_client_hung_is_forced_at_the_close_grace() {
        timeout(BOUND, async {
            const CLOSE_GRACE: Duration = Duration::from_millis(300);
            let (ended_tx, mut ended) = mpsc::unbounded_channel();
            let (addr, graceful, server) = serve_app(flood(ended_tx), CLOSE_GRACE).await;

            // Windows wider than any socket buffer: once the client stops
            // reading its socket, the server's writes fill it.
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let io = StopReading {
                inner: TcpStream::connect(addr).await.unwrap(),
                stop: stop.clone(),
            };
            let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(1 << 30)
                .initial_connection_window_size(1 << 30)
                .handshake(TokioIo::new(io))
                .await
                .unwrap();
            let conn = tokio::spawn(conn);
            // The server's SETTINGS (extended CONNECT) come before this answer.
            let hello = sender.send_request(get_req("/")).await.unwrap();
            assert_eq!(hello.status(), StatusCode::OK);
            let mut response = sender
                .send_request(h2_websocket::request("/flood"))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
            assert!(matches!(
                ws.next().await,
                Some(Ok(ClientMessage::Binary(_)))
            ));
            stop.store(true, Ordering::SeqCst);

            let started = Instant::now();
            graceful.start_drain();
            let end: String = ended.recv().await.unwrap();
            let took = started.elapsed();
            assert!(
                end.starts_with("send error"),
                "the blocked write fails: {end}"
            );
            assert_forced_at_close_grace(took, CLOSE_GRACE);
            let report = server.await.unwrap().unwrap();
            assert_eq!(report.upgraded_forced, 1, "{report}");
            conn.abort();
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_websocket_over_http2_whose_client_stopped_reading_is_forced_at_the_close_grace() {
        timeout(BOUND, async {
            const CLOSE_GRACE: Duration = Duration::from_millis(300);
            let (ended_tx, mut ended) = mpsc::unbounded_channel();
            let (addr, graceful, server) = serve_app(flood(ended_tx), CLOSE_GRACE).await;

            // The client never reads: the server's writes back up.
            let (ws, _sender, conn) = h2_websocket::connect(addr, "/flood").await;
            let started = Instant::now();
            graceful.start_drain();
            let end: String = ended.recv().await.unwrap();
            let took = started.elapsed();
            assert!(
                end.starts_with("send error"),
                "the blocked write fails: {end}"
            );
            assert_forced_at_close_grace(took, CLOSE_GRACE);
            let report = server.await.unwrap().unwrap();
            assert_eq!(report.upgraded_forced, 1, "{report}");
            drop(ws);
            let _ = conn.await.unwrap();
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http2_connection_with_a_websocket_finishes_its_other_requests_before_it_is_forced()
    {
        timeout(BOUND, async {
            const CLOSE_GRACE: Duration = Duration::from_millis(200);
            const SLOW_MS: u64 = 1000;
            let (ended_tx, mut ended) = mpsc::unbounded_channel();
            let app = naive_echo(ended_tx).route("/sleep/{ms}", get(sleep));
            let (addr, graceful, server) = serve_app(app, CLOSE_GRACE).await;

            let (mut ws, mut sender, conn) = h2_websocket::connect(addr, "/ws").await;
            echo_once(&mut ws, "hi").await;
            let slow = tokio::spawn(async move {
                let response = sender
                    .send_request(get_req(&format!("/sleep/{SLOW_MS}")))
                    .await
                    .unwrap();
                response.into_body().collect().await.unwrap().to_bytes()
            });
            while graceful.in_flight() < 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }

            let started = Instant::now();
            graceful.start_drain();
            assert_eq!(
                slow.await.unwrap(),
                format!("slept {SLOW_MS}"),
                "the request in progress is not cut at the close grace"
            );
            let end = ended.recv().await.unwrap();
            let took = started.elapsed();
            assert!(
                end.starts_with("recv error"),
                "then the WebSocket is forced: {end}"
            );
            assert!(
                took < Duration::from_millis(SLOW_MS) * 5,
                "forced after {took:?}"
            );
            let report = server.await.unwrap().unwrap();
            assert_eq!(
                (
                    report.requests_finished,
                    report.requests_forced,
                    report.upgraded_forced
                ),
                (1, 0, 1),
                "{report}"
            );
            drop(ws);
            let _ = conn.await.unwrap();
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upgraded_connection_is_counted_until_dropped_and_its_io_forced_at_the_close_grace()
    {
        timeout(BOUND, async {
            const CLOSE_GRACE: Duration = Duration::from_millis(300);
            let (ended_tx, mut ended) = mpsc::unbounded_channel();
            let (addr, graceful, server) = serve_app(naive_echo(ended_tx), CLOSE_GRACE).await;

            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
                .await
                .unwrap();
            ws.send(ClientMessage::text("hi")).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap().to_text().unwrap(), "hi");
            assert_eq!(graceful.upgraded(), 1, "counted once, as upgraded");
            assert_eq!(graceful.connections(), 0);
            assert_eq!(graceful.in_flight(), 0);

            // The client goes quiet; the handler ignores the drain.
            let started = Instant::now();
            graceful.start_drain();
            let end = ended.recv().await.unwrap();
            let took = started.elapsed();
            assert!(
                end.starts_with("recv error"),
                "the blocked read fails: {end}"
            );
            assert_forced_at_close_grace(took, CLOSE_GRACE);
            let report = server.await.unwrap().unwrap();
            assert_eq!(
                (report.upgraded_finished, report.upgraded_forced),
                (0, 1),
                "{report}"
            );
            // The client's socket is closed, without a Close handshake.
            assert!(!matches!(ws.next().await, Some(Ok(ClientMessage::Text(_)))));
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_axum_serve_an_upgrade_token_holds_the_drain_until_the_socket_closes() {
        timeout(BOUND, async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let graceful = Graceful::new();
            let (ended_tx, mut ended) = mpsc::unbounded_channel();
            let app = naive_echo(ended_tx).layer(graceful.layer());
            let server = tokio::spawn(
                axum::serve(listener, app)
                    .with_graceful_shutdown(graceful.signal().into_future())
                    .into_future(),
            );

            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
                .await
                .unwrap();
            ws.send(ClientMessage::text("hi")).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap().to_text().unwrap(), "hi");
            assert_eq!(graceful.upgraded(), 1);

            // Started here, not in the task: the socket must close after
            // the drain has started, whenever the task first runs.
            graceful.start_drain();
            let drain = tokio::spawn({
                let graceful = graceful.clone();
                async move { graceful.drain(Duration::from_secs(30)).await }
            });
            // The socket still works during the drain; the drain waits.
            ws.send(ClientMessage::text("still")).await.unwrap();
            assert_eq!(
                ws.next().await.unwrap().unwrap().to_text().unwrap(),
                "still"
            );
            assert!(!drain.is_finished());
            ws.close(None).await.unwrap();
            assert_eq!(ended.recv().await.unwrap(), "closed");
            let report = drain.await.unwrap();
            assert_eq!(
                (report.upgraded_finished, report.upgraded_forced),
                (1, 0),
                "{report}"
            );
            server.await.unwrap().unwrap();
        })
        .await
        .unwrap();
    }
}

mod signal_and_limits {
    //! What `serve` puts in a request (nothing, unless asked), and the
    //! slowloris watchdog.
    use super::*;
    use handover::ShutdownSignal;

    /// Answers whether the request carried a `ShutdownSignal`, and how many
    /// requests the `Graceful` counted while it ran.
    async fn probe(State(graceful): State<Graceful>, request: axum::extract::Request) -> String {
        let signal = request.extensions().get::<ShutdownSignal>().is_some();
        format!("signal={signal} in_flight={}", graceful.in_flight())
    }

    async fn body(addr: SocketAddr, path: &str) -> String {
        let (mut sender, _conn) = http1(addr).await;
        let response = sender.send_request(get_req(path)).await.unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// A `ShutdownSignal` comes from a layer on the route that reads it
    /// (which counts nothing again), or from `signal_extension(true)`; by
    /// default a request carries none. Either way each request is counted
    /// once: the serve loop counts it before it puts a signal in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_signal_comes_from_a_layer_on_the_route_or_the_option_and_requests_count_once() {
        timeout(BOUND, async {
            for option in [false, true] {
                let server = Served::start(|listener, graceful| {
                    let app = Router::new()
                        .route("/plain", get(probe))
                        .route("/layered", get(probe).layer(graceful.layer()))
                        .with_state(graceful.clone());
                    handover::serve(listener, app, graceful).signal_extension(option)
                })
                .await;
                assert_eq!(
                    body(server.addr, "/plain").await,
                    format!("signal={option} in_flight=1")
                );
                assert_eq!(
                    body(server.addr, "/layered").await,
                    "signal=true in_flight=1",
                    "the route's layer counts nothing again"
                );
                server.graceful.start_drain();
                let report = server.task.await.unwrap().unwrap();
                assert_eq!(report.requests_forced, 0);
            }
        })
        .await
        .unwrap();
    }

    /// A client that opens a connection and sends a request head slowly,
    /// or nothing, is closed within the header read timeout and a quarter
    /// more; one that sends requests all along is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_or_silent_http1_client_is_closed_at_the_header_read_timeout() {
        timeout(BOUND, async {
            const TIMEOUT: Duration = Duration::from_millis(800);
            let server = Served::start(|listener, graceful| {
                handover::serve(listener, app(Calls::default()), graceful)
                    .header_read_timeout(TIMEOUT)
            })
            .await;
            let started = Instant::now();
            let silent = TcpStream::connect(server.addr).await.unwrap();
            let mut slow = TcpStream::connect(server.addr).await.unwrap();
            let (mut busy, _conn) = http1(server.addr).await;
            let dripping = tokio::spawn(async move {
                // One byte of a head every 100 ms: never a whole head.
                for byte in
                    b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter()
                {
                    if slow.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let mut rest = Vec::new();
                let _ = slow.read_to_end(&mut rest).await;
                (started.elapsed(), rest)
            });
            let closed_at = |mut stream: TcpStream| async move {
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
                (started.elapsed(), rest)
            };
            let silent = tokio::spawn(closed_at(silent));
            // The busy client sends a request every 100 ms throughout.
            while !silent.is_finished() || !dripping.is_finished() {
                let response = busy.send_request(get_req("/")).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for (what, (took, rest)) in [
                ("silent", silent.await.unwrap()),
                ("slow", dripping.await.unwrap()),
            ] {
                assert!(rest.is_empty(), "{what}: closed without an answer");
                assert!(
                    took >= TIMEOUT && took < TIMEOUT * 5,
                    "{what}: closed after {took:?}"
                );
            }
            let response = busy.send_request(get_req("/")).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "the busy client stays");
        })
        .await
        .unwrap();
    }
}
