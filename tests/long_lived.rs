//! Long-lived connections across restarts of a real server process
//! (`examples/hello`): WebSocket and server-sent events, with real clients
//! (tokio-tungstenite, hyper), signals sent by pid, every process ended by
//! the test.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use support::websocket::expect_going_away;
use support::{Deploy, Load, Server, is_alive, open_events, send_signal, wait_until};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

const BOUND: Duration = Duration::from_secs(120);

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr) -> Ws {
    connect_async(format!("ws://{addr}/ws")).await.unwrap().0
}

/// Reads until the server's Close; returns the texts read before it and the
/// Close frame's code and reason. Then reads on: the stream must end.
async fn read_until_close(ws: &mut Ws) -> (Vec<String>, CloseCode, String) {
    let mut texts = Vec::new();
    let frame = loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => texts.push(text.to_string()),
            Some(Ok(Message::Close(frame))) => break frame.expect("a Close with a code"),
            Some(Ok(other)) => panic!("unexpected message {other:?}"),
            Some(Err(e)) => panic!("the connection failed instead of closing: {e}"),
            None => panic!("the connection ended without a Close"),
        }
    };
    // tungstenite answers the Close; then the server closes the socket.
    while let Some(next) = ws.next().await {
        assert!(
            !matches!(next, Ok(Message::Text(_))),
            "nothing after the Close"
        );
    }
    (texts, frame.code, frame.reason.to_string())
}

/// The `drain finished` line the generation logged, with its counts.
/// The drain reports of the first `generations` generations, once all are
/// in the log (an exited process's last lines may still be in the pipe).
async fn drain_log(server: &Server, generations: usize) -> String {
    let reports = || {
        server
            .log_text()
            .lines()
            .filter(|line| line.contains("drain finished"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    wait_until(
        "the drain reports in the log",
        Duration::from_secs(20),
        || reports().len() >= generations,
    )
    .await;
    reports().join("\n")
}

/// How long the drain of a `drain finished` line took, from its start.
fn drain_took(line: &str) -> Duration {
    let ms: f64 = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("elapsed_ms="))
        .unwrap_or_else(|| panic!("no elapsed_ms in {line}"))
        .parse()
        .unwrap();
    Duration::from_secs_f64(ms / 1e3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_gets_every_echo_then_going_away_and_reconnects_to_the_new_generation() {
    timeout(BOUND, async {
        const CLOSE_GRACE: Duration = Duration::from_secs(2);
        let server = Server::start_with(
            Deploy::new("ws"),
            &["--ready-timeout", "5", "--close-grace", "2"],
            &[],
        )
        .await;
        let load = Load::start(server.addr, 2, "/");
        let mut ws = connect(server.addr).await;
        for round in 0..3 {
            let old = server.current_pid();
            // Owed: every message sent before the drain.
            let sent: Vec<String> = (0..50).map(|i| format!("{round}-{i}")).collect();
            for text in &sent {
                ws.send(Message::text(text.clone())).await.unwrap();
            }
            let first = ws.next().await.unwrap().unwrap();
            assert_eq!(first.to_text().unwrap(), sent[0]);

            send_signal(old, "HUP");
            let (mut echoes, code, reason) = read_until_close(&mut ws).await;
            echoes.insert(0, sent[0].clone());
            assert_eq!(echoes, sent, "every echo owed, in order, before the Close");
            assert_eq!(code, CloseCode::Away);
            // Names the generation that served this socket: after the first
            // round, the one the client reconnected to.
            assert_eq!(reason, format!("{old} is restarting"));

            let new = server.wait_pid_file_change(Some(old)).await;
            wait_until("the old generation exits", Duration::from_secs(10), || {
                !is_alive(old)
            })
            .await;
            // Reconnect: the new generation answers.
            ws = connect(server.addr).await;
            ws.send(Message::text("again")).await.unwrap();
            let echo = ws.next().await.unwrap().unwrap();
            assert_eq!(echo.to_text().unwrap(), "again");
            load.wait_pid(new).await;
        }
        // Each generation's drain: the socket closed by the handshake the
        // handler began, before the close grace would have forced it.
        let log = drain_log(&server, 3).await;
        assert_eq!(log.lines().count(), 3, "{log}");
        for line in log.lines() {
            assert!(
                line.contains("upgraded_finished=1") && line.contains("upgraded_forced=0"),
                "{line}"
            );
            assert!(drain_took(line) < CLOSE_GRACE, "{line}");
        }
        drop(ws);
        load.stop_all_answered().await;
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_idle_websockets_close_at_once_and_do_not_hold_the_drain() {
    timeout(BOUND, async {
        const CLOSE_GRACE: Duration = Duration::from_secs(5);
        let server = Server::start_with(
            Deploy::new("ws-idle"),
            &["--ready-timeout", "5", "--close-grace", "5"],
            &[],
        )
        .await;
        let old = server.current_pid();
        let mut clients = Vec::new();
        for _ in 0..100 {
            // Idle: they send nothing, and only read (as browsers do).
            let mut ws = connect(server.addr).await;
            clients.push(tokio::spawn(async move {
                let (texts, code, reason) = read_until_close(&mut ws).await;
                assert!(texts.is_empty());
                (code, reason)
            }));
        }
        send_signal(old, "HUP");
        wait_until("the old generation exits", Duration::from_secs(20), || {
            !is_alive(old)
        })
        .await;
        for client in clients {
            let (code, reason) = client.await.unwrap();
            assert_eq!(code, CloseCode::Away);
            assert_eq!(reason, format!("{old} is restarting"));
        }
        // The drain ended with the last of them, well before the close
        // grace would have forced any.
        let log = drain_log(&server, 1).await;
        assert!(
            log.contains("upgraded_finished=100") && log.contains("upgraded_forced=0"),
            "{log}"
        );
        let took = drain_took(&log);
        assert!(took < CLOSE_GRACE, "the drain took {took:?}: {log}");
        eprintln!("100 idle WebSockets: drained in {took:?}");
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_peers_that_ignore_close_are_forced_at_the_close_grace() {
    timeout(BOUND, async {
        const CLOSE_GRACE: Duration = Duration::from_millis(500);
        let server = Server::start_with(
            Deploy::new("ws-deaf"),
            &["--ready-timeout", "5", "--close-grace", "0.5"],
            &[],
        )
        .await;
        let old = server.current_pid();
        let mut deaf = Vec::new();
        for i in 0..10 {
            let mut ws = connect(server.addr).await;
            ws.send(Message::text(format!("{i}"))).await.unwrap();
            assert_eq!(
                ws.next().await.unwrap().unwrap().to_text().unwrap(),
                format!("{i}")
            );
            // From now on this client reads nothing, so never answers the
            // server's Close.
            deaf.push(ws);
        }
        let signalled = Instant::now();
        send_signal(old, "HUP");
        let new = server.wait_pid_file_change(Some(old)).await;
        wait_until("the old generation exits", Duration::from_secs(10), || {
            !is_alive(old)
        })
        .await;
        let exited = signalled.elapsed();
        assert!(
            exited >= CLOSE_GRACE,
            "exited {exited:?} after the signal: before the close grace"
        );
        let log = drain_log(&server, 1).await;
        assert!(
            log.contains("upgraded_finished=0") && log.contains("upgraded_forced=10"),
            "{log}"
        );
        // What the deaf clients find when they look: the Close, then the end.
        for mut ws in deaf {
            expect_going_away(&mut ws).await;
        }
        // The new generation serves WebSockets.
        let mut ws = connect(server.addr).await;
        ws.send(Message::text("hi")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap().to_text().unwrap(), "hi");
        assert_eq!(server.current_pid(), new);
        eprintln!("10 deaf WebSockets: old generation gone {exited:?} after the signal");
        drop(ws);
        server.stop().await;
    })
    .await
    .unwrap();
}

/// One server-sent event: `(id, data)`.
fn parse_event(text: &str) -> (u64, String) {
    let mut id = None;
    let mut data = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v.parse().unwrap());
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = Some(v.to_owned());
        }
    }
    (
        id.unwrap_or_else(|| panic!("no id in {text:?}")),
        data.unwrap_or_else(|| panic!("no data in {text:?}")),
    )
}

#[derive(Default)]
struct Seen {
    ids: Vec<u64>,
    pids: BTreeSet<u32>,
    last_pid: Option<u32>,
    streams: usize,
}

/// An EventSource-style client: reads events, and when the stream ends
/// (cleanly: an error fails the test) reconnects with `Last-Event-ID`.
async fn event_source(addr: SocketAddr, seen: Arc<Mutex<Seen>>, events: usize) {
    let mut last = None;
    while seen.lock().unwrap().ids.len() < events {
        let mut body = open_events(addr, last).await;
        seen.lock().unwrap().streams += 1;
        let mut text = String::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("the event stream ends cleanly, not with an error");
            text.push_str(std::str::from_utf8(&frame.into_data().unwrap()).unwrap());
            while let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                let (id, data) = parse_event(&event);
                let pid: u32 = data.rsplit(' ').next().unwrap().parse().unwrap();
                assert_eq!(data, format!("{id} from {pid}"));
                let mut seen = seen.lock().unwrap();
                seen.ids.push(id);
                seen.pids.insert(pid);
                seen.last_pid = Some(pid);
                last = Some(id);
            }
        }
        assert!(
            text.is_empty(),
            "the stream ended inside an event: {text:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_resumes_with_consecutive_ids_across_five_restarts_under_load() {
    timeout(BOUND, async {
        let server = Server::start(Deploy::new("sse"), &[]).await;
        let load = Load::start(server.addr, 3, "/");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let client = tokio::spawn(event_source(server.addr, seen.clone(), usize::MAX));
        let mut generations = vec![server.current_pid()];
        for _ in 0..5 {
            let old = *generations.last().unwrap();
            wait_until(
                "events from this generation",
                Duration::from_secs(10),
                || seen.lock().unwrap().last_pid == Some(old),
            )
            .await;
            generations.push(server.restart().await);
        }
        let last = *generations.last().unwrap();
        wait_until(
            "events from the last generation",
            Duration::from_secs(10),
            || seen.lock().unwrap().last_pid == Some(last),
        )
        .await;
        client.abort();
        let seen = std::mem::take(&mut *seen.lock().unwrap());
        let expected: Vec<u64> = (0..seen.ids.len() as u64).collect();
        assert_eq!(
            seen.ids, expected,
            "strictly consecutive ids: no gap, no duplicate"
        );
        assert_eq!(
            seen.pids,
            generations.iter().copied().collect(),
            "every generation sent events"
        );
        assert_eq!(seen.streams, 6, "one stream per generation");
        load.stop_all_answered().await;
        server.stop().await;
    })
    .await
    .unwrap();
}
