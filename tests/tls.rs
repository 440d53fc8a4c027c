//! The serve loop with a TLS acceptor (tokio-rustls), over real sockets on
//! 127.0.0.1 with real clients (hyper's over tokio-rustls, and curl): what a
//! client sees when the server drains, and what becomes of handshakes that
//! are slow, silent or garbage.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;
use bytes::Bytes;
use http::StatusCode;
use http::header::CONNECTION;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_rustls::client::TlsStream;

mod support;

use handover::Graceful;
use support::served::{Served, get_req};
use support::tls::{self, Cert};
use support::tools;

/// Every test ends within this, whatever happens.
const BOUND: Duration = Duration::from_secs(60);

fn app() -> Router {
    async fn sleep(Path(ms): Path<u64>) -> String {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        format!("slept {ms}")
    }
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/sleep/{ms}", get(sleep))
}

/// `app` over TLS with `cert`, on a fresh port, with these settings.
async fn start(cert: &Cert, idle_grace: Duration, handshake_timeout: Duration) -> Served {
    let tls = cert.acceptor();
    let graceful = Graceful::builder()
        .drain_timeout(Duration::from_secs(20))
        .build();
    Served::start_with(graceful, |listener, graceful| {
        handover::serve(listener, app(), graceful)
            .idle_grace(idle_grace)
            .handshake(move |tcp| tls.accept(tcp))
            .handshake_timeout(handshake_timeout)
    })
    .await
}

/// A TLS connection to `addr` over `tcp`, offering `alpn`; returns it and
/// the protocol the server chose.
async fn tls_over(tcp: TcpStream, cert: &Cert, alpn: &[&[u8]]) -> (TlsStream<TcpStream>, Vec<u8>) {
    let stream = tls::connector(&[cert], alpn)
        .connect(tls::server_name(), tcp)
        .await
        .unwrap();
    let chosen = stream
        .get_ref()
        .1
        .alpn_protocol()
        .unwrap_or_default()
        .to_vec();
    (stream, chosen)
}

/// An HTTP/1.1 client over TLS (chosen by ALPN) on `tcp`; its connection
/// runs in a task.
async fn https1(
    tcp: TcpStream,
    cert: &Cert,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    JoinHandle<hyper::Result<()>>,
) {
    let (stream, alpn) = tls_over(tcp, cert, &[b"http/1.1"]).await;
    assert_eq!(alpn, b"http/1.1");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    (sender, tokio::spawn(conn))
}

async fn body_of(res: http::Response<hyper::body::Incoming>) -> Bytes {
    res.into_body().collect().await.unwrap().to_bytes()
}

/// HTTPS requests in flight on HTTP/1.1 and HTTP/2 when the drain starts
/// are answered, with `Connection: close` and GOAWAY, and the report is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_requests_in_flight_over_http1_and_http2_finish_across_a_drain() {
    timeout(BOUND, async {
        let cert = Cert::new();
        let server = start(&cert, Duration::from_millis(200), Duration::from_secs(10)).await;

        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let (mut h1, h1_conn) = https1(tcp, &cert).await;
        // Keep-alive works before the drain.
        let res = h1.send_request(get_req("/")).await.unwrap();
        assert_eq!(body_of(res).await, "hello");

        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let (h2, alpn) = tls_over(tcp, &cert, &[b"h2", b"http/1.1"]).await;
        assert_eq!(alpn, b"h2");
        let (h2, h2_conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2))
                .await
                .unwrap();
        let h2_conn = tokio::spawn(h2_conn);

        let slow_h1 = tokio::spawn(h1.send_request(get_req("/sleep/300")));
        let slow_h2 = tokio::spawn(h2.clone().send_request(get_req("/sleep/300")));
        server.wait_in_flight(2).await;
        server.graceful.start_drain();

        let res = slow_h1.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[CONNECTION], "close");
        assert_eq!(body_of(res).await, "slept 300");
        let res = slow_h2.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(body_of(res).await, "slept 300");
        // Both connections end cleanly: closed after the response, and by
        // GOAWAY once its stream was done.
        assert!(h1_conn.await.unwrap().is_ok());
        drop(h2);
        assert!(h2_conn.await.unwrap().is_ok());

        let report = server.report().await;
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.requests_finished, 2);
        assert_eq!(report.connections_finished, 2);
    })
    .await
    .unwrap();
}

/// curl, an independent TLS client, is served over HTTP/1.1 and (by ALPN)
/// HTTP/2.
#[tokio::test]
async fn curl_is_served_over_https_with_http1_and_http2() {
    let curl = tools::tool("curl");
    timeout(BOUND, async {
        let cert = Cert::new();
        let dir = std::env::temp_dir().join(format!("handover-tls-curl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        cert.install(&dir);
        let server = start(&cert, Duration::from_millis(100), Duration::from_secs(10)).await;
        let url = format!("https://127.0.0.1:{}/", server.addr.port());
        for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
            let out = tokio::process::Command::new(&curl)
                .args(["-sS", "--max-time", "20", "-w", " %{http_version}", flag])
                .arg("--cacert")
                .arg(dir.join("cert.pem"))
                .arg(&url)
                .kill_on_drop(true)
                .output()
                .await
                .expect("curl is installed");
            assert!(out.status.success(), "{out:?}");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("hello {version}")
            );
        }
        server.drain_clean().await;
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .unwrap();
}

/// A client whose connection was accepted just before the drain started
/// finishes its handshake during the drain and is answered.
#[tokio::test]
async fn a_handshake_begun_before_the_drain_is_finished_and_its_request_answered() {
    timeout(BOUND, async {
        let cert = Cert::new();
        let server = start(&cert, Duration::from_millis(500), Duration::from_secs(10)).await;
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        server.wait_connections(1).await;
        server.graceful.start_drain();

        let (mut sender, conn) = https1(tcp, &cert).await;
        let res = sender.send_request(get_req("/")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[CONNECTION], "close");
        assert_eq!(body_of(res).await, "hello");
        assert!(conn.await.unwrap().is_ok());

        let report = server.report().await;
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.requests_finished, 1);
        assert!(
            report.elapsed < Duration::from_secs(20),
            "the drain ended with the connection, not at its deadline: {report}"
        );
    })
    .await
    .unwrap();
}

/// Reads until the server closes; says how long that took.
async fn time_to_close(tcp: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

/// A client that connects and never starts its handshake is closed at the
/// handshake timeout (not before it, and long before anything else would
/// close it: within ten times the timeout, where nothing but the timeout
/// closes it until the test's bound); during a drain, at the idle grace,
/// without being forced and without holding the drain to its deadline.
#[tokio::test]
async fn a_silent_client_is_closed_at_the_handshake_timeout_or_the_drains_idle_grace() {
    timeout(BOUND, async {
        let cert = Cert::new();
        let handshake_timeout = Duration::from_millis(300);
        let server = start(&cert, Duration::from_millis(100), handshake_timeout).await;
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let took = time_to_close(&mut silent).await;
        assert!(
            took >= handshake_timeout - Duration::from_millis(20) && took < handshake_timeout * 10,
            "closed after {took:?}, with a handshake timeout of {handshake_timeout:?}"
        );
        server.wait_connections(0).await;
        // The server goes on serving.
        let (mut sender, _) = https1(TcpStream::connect(server.addr).await.unwrap(), &cert).await;
        let res = sender.send_request(get_req("/")).await.unwrap();
        assert_eq!(body_of(res).await, "hello");
        drop(sender);
        server.wait_connections(0).await;

        // With a handshake timeout far away, the drain's idle grace ends it.
        let idle_grace = Duration::from_millis(150);
        let server = start(&cert, idle_grace, Duration::from_secs(30)).await;
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        server.wait_connections(1).await;
        server.graceful.start_drain();
        let took = time_to_close(&mut silent).await;
        assert!(took < idle_grace * 10, "closed after {took:?}");
        let report = server.report().await;
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.connections_finished, 1);
        assert!(
            report.elapsed >= idle_grace && report.elapsed < idle_grace * 10,
            "closed at the idle grace, not the drain's deadline: {report}"
        );
    })
    .await
    .unwrap();
}

/// Plain HTTP sent to the TLS port fails its handshake: that connection is
/// closed, and the others are served.
#[tokio::test]
async fn plain_http_on_the_tls_port_is_closed_and_others_are_served() {
    timeout(BOUND, async {
        let cert = Cert::new();
        let server = start(&cert, Duration::from_millis(100), Duration::from_secs(10)).await;
        let (mut sender, _) = https1(TcpStream::connect(server.addr).await.unwrap(), &cert).await;

        let mut plain = TcpStream::connect(server.addr).await.unwrap();
        plain
            .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer).await;
        assert!(
            !answer.windows(5).any(|w| w == b"hello"),
            "no HTTP answer without TLS: {answer:?}"
        );

        let res = sender.send_request(get_req("/")).await.unwrap();
        assert_eq!(body_of(res).await, "hello");
        drop(sender);
        server.wait_connections(0).await;
        server.drain_clean().await;
    })
    .await
    .unwrap();
}

/// The certificate a client presented, as handlers see it.
#[derive(Clone)]
struct ClientCert(Vec<u8>);

/// With mutual TLS, `handshake_info` hands each request the certificate its
/// own connection's client presented, over HTTP/1.1 and HTTP/2, next to
/// what `connect_info` says of the connection; a client without one is
/// turned away by the handshake.
#[tokio::test]
async fn handshake_info_gives_each_request_its_clients_certificate() {
    timeout(BOUND, async {
        use axum::Extension;
        use axum::extract::ConnectInfo;
        use tokio_rustls::server::TlsStream as ServerTls;

        let (server_cert, alice, bob) = (Cert::new(), Cert::new(), Cert::new());
        let app = Router::new().route(
            "/cert",
            get(
                |Extension(ClientCert(der)): Extension<ClientCert>,
                 ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                    let mut body = peer.to_string().into_bytes();
                    body.push(b' ');
                    body.extend(der);
                    body
                },
            ),
        );
        let tls = server_cert.acceptor_requiring(&[&alice, &bob]);
        let server = Served::start(|listener, graceful| {
            handover::serve(listener, app, graceful)
                .connect_info(|_, peer: &SocketAddr| ConnectInfo(*peer))
                .handshake(move |tcp| tls.accept(tcp))
                .handshake_info(|tls: &ServerTls<TcpStream>| {
                    let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
                    ClientCert(certs.first().map(|c| c.to_vec()).unwrap_or_default())
                })
        })
        .await;
        let addr = server.addr;

        let mut clients = Vec::new();
        for (who, alpn) in [(&alice, &b"http/1.1"[..]), (&bob, &b"h2"[..])] {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let local = tcp.local_addr().unwrap();
            let stream = tls::connector_as(&[&server_cert], &[alpn], who)
                .connect(tls::server_name(), tcp)
                .await
                .unwrap();
            let expected = [format!("{local} ").into_bytes(), who.der.to_vec()].concat();
            clients.push((stream, expected, alpn == b"h2"));
        }
        // Two requests on each connection, each told its own client.
        for (stream, expected, h2) in clients {
            let mut responses = Vec::new();
            if h2 {
                let (sender, conn) = hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                .unwrap();
                tokio::spawn(conn);
                let (a, b) = tokio::join!(
                    sender.clone().send_request(get_req("/cert")),
                    sender.clone().send_request(get_req("/cert")),
                );
                responses.extend([a.unwrap(), b.unwrap()]);
            } else {
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                for _ in 0..2 {
                    let res = sender.send_request(get_req("/cert")).await.unwrap();
                    responses.push(res);
                }
            }
            for res in responses {
                assert_eq!(res.status(), StatusCode::OK);
                assert_eq!(body_of(res).await, expected);
            }
        }

        // No client certificate: the handshake fails, nothing is served.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let anonymous = tls::connector(&[&server_cert], &[b"http/1.1"])
            .connect(tls::server_name(), tcp)
            .await;
        let refused = match anonymous {
            Err(_) => true,
            // TLS 1.3: the client learns of the refusal on its first read.
            Ok(mut stream) => {
                let _ = stream
                    .write_all(b"GET /cert HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    .await;
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).await.is_err() || answer.is_empty()
            }
        };
        assert!(refused, "a client without a certificate is not served");

        server.drain_clean().await;
    })
    .await
    .unwrap();
}
