//! WebSocket connections, upgraded through axum, under the serve loop
//! and under `axum::serve` with an `UpgradeToken`.

use super::support::h2_websocket::{self, H2Ws};
use super::support::websocket::expect_going_away;
use super::*;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use axum::routing::any;
use axum::{Extension, Router};
use futures_util::{SinkExt, StreamExt};
use handover::DrainSignal;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as ClientMessage;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A naive echo that never looks at the drain signal; reports how its
/// socket ended.
fn naive_echo(ended: mpsc::UnboundedSender<String>) -> Router {
    async fn ws(
        upgrade: WebSocketUpgrade,
        Extension(shutdown): Extension<DrainSignal>,
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
    let graceful = Graceful::builder()
        .drain_timeout(Duration::from_secs(30))
        .close_grace(close_grace)
        .build();
    let server = Served::start_with(graceful, |listener, graceful| {
        handover::serve(listener, app, graceful).signal_extension(true)
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
    Extension(shutdown): Extension<DrainSignal>,
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
async fn an_http2_connection_with_a_websocket_finishes_its_other_requests_before_it_is_forced() {
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
async fn an_upgraded_connection_is_counted_until_dropped_and_its_io_forced_at_the_close_grace() {
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
        let graceful = Graceful::builder()
            .drain_timeout(Duration::from_secs(30))
            .build();
        let (ended_tx, mut ended) = mpsc::unbounded_channel();
        let app = naive_echo(ended_tx).layer(graceful.layer().signal_extension(true));
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
            async move { graceful.drain().await }
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
