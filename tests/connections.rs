//! Idle HTTP/1 connections handed to the next generation, with real
//! processes (`hello`, `axum`), real sockets and real clients (hyper's,
//! `curl`): a client sees no close, no `Connection: close` and no new TCP
//! connection across an upgrade; a next generation that cannot take them
//! leaves them to the old one's drain, which serves them as before.
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use support::{
    Deploy, KeepAlive, Server, holds_socket, is_alive, send_signal, tool, wait_exit, wait_until,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::time::timeout;

/// Every test ends within this, whatever happens.
const BOUND: Duration = Duration::from_secs(120);

/// An idle grace longer than any wait of these tests: an old generation
/// that waited for it would fail them.
const LONG_IDLE_GRACE: &[&str] = &["--idle-grace", "600"];

/// The first `drain finished` line the server logged: the first
/// generation's.
fn first_drain(server: &Server) -> String {
    server
        .log_text()
        .lines()
        .find(|line| line.contains("drain finished"))
        .unwrap_or_else(|| panic!("no drain finished line:\n{}", server.log_text()))
        .to_owned()
}

/// Idle keep-alive connections open across an upgrade go on, each on its
/// own TCP connection as before, answered by the new generation, which
/// holds their sockets; the old generation hands them over without an
/// idle grace (here ten minutes) and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_go_on_with_the_new_generation() {
    timeout(BOUND, async {
        let server = Server::start_with(Deploy::new("moves-idle"), LONG_IDLE_GRACE, &[]).await;
        let old = server.current_pid();
        let mut conns = Vec::new();
        for _ in 0..20 {
            let mut conn = KeepAlive::open(server.addr).await;
            assert_eq!(conn.get("/").await, format!("hello from {old}"));
            conns.push(conn);
        }
        let sockets: Vec<u64> = conns
            .iter()
            .map(|conn| conn.server_socket().unwrap().inode)
            .collect();
        // And one HTTP/2 connection: drained (GOAWAY), not moved.
        let h2 = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let (mut h2_sender, h2_conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(h2),
        )
        .await
        .unwrap();
        let h2_conn = tokio::spawn(h2_conn);
        let answer = h2_sender
            .send_request(support::served::get_req("/"))
            .await
            .unwrap();
        assert_eq!(answer.status(), http::StatusCode::OK);

        send_signal(old, "HUP");
        let new = server.wait_handed_over(old).await;
        let drained = first_drain(&server);
        assert!(
            drained.contains("connections_finished=1 connections_forced=0")
                && drained.contains("connections_handed_over=20"),
            "{drained}"
        );
        assert!(h2_conn.is_finished(), "the HTTP/2 connection was closed");
        for (conn, socket) in conns.iter_mut().zip(&sockets) {
            assert!(conn.is_open(), "the client saw no close");
            assert_eq!(conn.get("/").await, format!("hello from {new}"));
            // The same socket, the new generation's now.
            assert_eq!(conn.server_socket().unwrap().inode, *socket);
            assert!(holds_socket(new, *socket));
        }
        server
            .wait_log(
                "took over the previous generation's connections connections=20",
                1,
            )
            .await;
        // Closed by their clients: the last generation need not wait the
        // idle grace for them.
        drop(conns);
        server.stop().await;
    })
    .await
    .unwrap();
}

/// `curl` sending a request every 200 ms on one connection (`--rate`)
/// through an upgrade: every request is answered, the later ones by the
/// new generation, and curl connects once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_keeps_its_one_connection_through_an_upgrade() {
    timeout(BOUND, async {
        let server = Server::start_with(Deploy::new("moves-curl"), LONG_IDLE_GRACE, &[]).await;
        let old = server.current_pid();
        let url = format!("http://{}/", server.addr);
        let mut curl = tokio::process::Command::new(tool("curl"))
            .args(["-sSv", "--no-buffer", "--rate", "5/s", "-w", "\\n"])
            .args(std::iter::repeat_n(&url, 50))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stderr = curl.stderr.take().unwrap();
        let verbose = tokio::spawn(async move {
            let mut text = String::new();
            stderr.read_to_string(&mut text).await.unwrap();
            text
        });
        let mut lines = BufReader::new(curl.stdout.take().unwrap()).lines();
        let mut answers = Vec::new();
        let mut new = None;
        // Two answers before the upgrade, two after.
        while let Some(line) = lines.next_line().await.unwrap() {
            answers.push(line);
            if answers.len() == 2 {
                send_signal(old, "HUP");
                new = Some(server.wait_handed_over(old).await);
            }
            let from_new = format!("hello from {}", new.unwrap_or(0));
            if answers.iter().filter(|a| **a == from_new).count() == 2 {
                break;
            }
        }
        curl.kill().await.unwrap();
        let verbose = verbose.await.unwrap();
        let new = new.expect("curl answered twice");
        let from_old = format!("hello from {old}");
        let from_new = format!("hello from {new}");
        let switch = answers.iter().position(|a| *a == from_new);
        let Some(switch) = switch.filter(|&at| at >= 2) else {
            panic!("answers: {answers:?}");
        };
        assert!(
            answers[..switch].iter().all(|a| *a == from_old),
            "{answers:?}"
        );
        assert!(
            answers[switch..].iter().all(|a| *a == from_new),
            "{answers:?}"
        );
        assert_eq!(verbose.matches("* Connected to").count(), 1, "{verbose}");
        assert!(
            verbose.matches("Re-using existing connection").count() >= answers.len() - 1,
            "{verbose}"
        );
        server.stop().await;
    })
    .await
    .unwrap();
}

/// Sends `bytes` on `stream` and waits until the server has read them:
/// nothing waits in its socket.
async fn send_and_wait_read(server: &Server, stream: &mut tokio::net::TcpStream, bytes: &[u8]) {
    let local = stream.local_addr().unwrap();
    stream.write_all(bytes).await.unwrap();
    wait_until(
        "the server reads what was sent",
        Duration::from_secs(20),
        || support::tcp_socket(server.addr, local).is_some_and(|socket| socket.rx_queue == 0),
    )
    .await;
}

/// Half a request head sent, and read by the old generation, when it hands
/// the connection over: the new generation gets those bytes with it, and
/// answers the request once its client has sent the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_head_is_finished_on_the_new_generation_and_answered_once() {
    timeout(BOUND, async {
        let server = Server::start_with(Deploy::new("moves-half"), LONG_IDLE_GRACE, &[]).await;
        let old = server.current_pid();
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        send_and_wait_read(&server, &mut stream, b"GET / HTTP/1.1\r\nHo").await;
        send_signal(old, "HUP");
        let new = server.wait_handed_over(old).await;
        assert!(first_drain(&server).contains("connections_handed_over=1"));

        stream
            .write_all(b"st: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        // Two requests, two answers, both the new generation's.
        assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
        assert_eq!(
            answer.matches(&format!("hello from {new}")).count(),
            2,
            "{answer}"
        );
        server.stop().await;
    })
    .await
    .unwrap();
}

/// A request in flight when the drain starts (its body still coming: the
/// client decides when it ends; axum's example echoes `POST /echo`) is
/// answered by the old generation without `Connection: close`, and its
/// connection then moves. The idle ones have moved by then: the old
/// generation, alive for that request, no longer holds their sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_moves_after_its_response_and_the_idle_ones_leave_the_old_process() {
    timeout(BOUND, async {
        let server = Server::start_with(Deploy::of("moves-busy", "axum"), &[], &[]).await;
        let old = server.current_pid();
        let mut idle = Vec::new();
        for _ in 0..5 {
            let mut conn = KeepAlive::open(server.addr).await;
            assert_eq!(conn.get("/").await, format!("hello from {old}"));
            idle.push(conn);
        }
        let sockets: Vec<u64> = idle
            .iter()
            .map(|conn| conn.server_socket().unwrap().inode)
            .collect();

        let mut busy = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        // Read by the old generation: the request is in its handler.
        let head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\nhalf, ";
        send_and_wait_read(&server, &mut busy, head).await;

        send_signal(old, "HUP");
        let new = server.wait_pid_file_change(Some(old)).await;
        wait_until(
            "the idle connections leave the old generation",
            Duration::from_secs(20),
            || {
                sockets
                    .iter()
                    .all(|socket| holds_socket(new, *socket) && !holds_socket(old, *socket))
            },
        )
        .await;
        assert!(is_alive(old), "the old generation waits for its request");
        for conn in &mut idle {
            assert_eq!(conn.get("/").await, format!("hello from {new}"));
        }

        busy.write_all(b"then whole").await.unwrap();
        let (head, body) = read_response(&mut busy).await;
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("connection:"), "{head}");
        assert_eq!(body, "half, then whole");
        wait_exit("the old generation exits", old).await;
        let drained = first_drain(&server);
        assert!(
            drained.contains("requests_finished=1 requests_forced=0")
                && drained.contains("connections_finished=0 connections_forced=0")
                && drained.contains("connections_handed_over=6"),
            "{drained}"
        );
        // The same connection, the new generation's.
        busy.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        busy.read_to_string(&mut answer).await.unwrap();
        assert!(answer.ends_with(&format!("hello from {new}")), "{answer}");
        server.stop().await;
    })
    .await
    .unwrap();
}

/// One response with a `Content-Length`, read from `stream`: its head and
/// body.
async fn read_response(stream: &mut tokio::net::TcpStream) -> (String, String) {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let (head, length) = loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&bytes));
        bytes.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Some((head, _)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().unwrap())
                })
                .unwrap();
            break (head.to_owned(), length);
        }
    };
    let start = head.len() + 4;
    while bytes.len() < start + length {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed mid-body");
        bytes.extend_from_slice(&buf[..n]);
    }
    assert_eq!(bytes.len(), start + length, "nothing after the response");
    (head, String::from_utf8(bytes[start..].to_vec()).unwrap())
}

/// A pool of keep-alive clients, each idle a different time between its
/// requests (as a load balancer's upstream pool or browsers are), through
/// upgrade after upgrade: no request fails, and no client ever opens a
/// second connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_clients_never_see_a_close_through_repeated_upgrades() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    const CLIENTS: usize = 200;
    const UPGRADES: usize = 6;
    timeout(BOUND, async {
        let server = Server::start(Deploy::new("moves-pool"), &[]).await;
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::<String>::new()));
        let pids = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let (stop, opened, answered) = (stop.clone(), opened.clone(), answered.clone());
                let (failed, pids, addr) = (failed.clone(), pids.clone(), server.addr);
                tokio::spawn(async move {
                    // Idle 0 to 200 ms between requests, differently for
                    // each client and each request.
                    let mut idle = (client as u64 * 7919) % 201;
                    while !stop.load(Ordering::SeqCst) {
                        let mut conn = KeepAlive::open(addr).await;
                        opened.fetch_add(1, Ordering::SeqCst);
                        while !stop.load(Ordering::SeqCst) {
                            match conn.try_get("/").await {
                                Ok((head, body)) => {
                                    answered.fetch_add(1, Ordering::SeqCst);
                                    let body = String::from_utf8(body.to_vec()).unwrap();
                                    let pid = body.strip_prefix("hello from ").unwrap();
                                    pids.lock().unwrap().insert(pid.parse::<u32>().unwrap());
                                    if head.headers.contains_key(http::header::CONNECTION) {
                                        break;
                                    }
                                }
                                Err(e) => {
                                    failed.lock().unwrap().push(e);
                                    break;
                                }
                            }
                            idle = (idle * 31 + 17) % 201;
                            tokio::time::sleep(Duration::from_millis(idle)).await;
                        }
                    }
                })
            })
            .collect();
        let mut generations = vec![server.current_pid()];
        for _ in 0..UPGRADES {
            // Every client has made a request since the last upgrade.
            let now = answered.load(Ordering::SeqCst);
            wait_until("requests between upgrades", Duration::from_secs(20), || {
                answered.load(Ordering::SeqCst) >= now + CLIENTS
            })
            .await;
            generations.push(server.restart().await);
        }
        let now = answered.load(Ordering::SeqCst);
        wait_until(
            "requests after the last upgrade",
            Duration::from_secs(20),
            || answered.load(Ordering::SeqCst) >= now + CLIENTS,
        )
        .await;
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.unwrap();
        }
        let failed = failed.lock().unwrap().clone();
        assert!(
            failed.is_empty(),
            "{} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert_eq!(opened.load(Ordering::SeqCst), CLIENTS, "connections opened");
        let pids = pids.lock().unwrap().clone();
        for pid in &generations {
            assert!(pids.contains(pid), "generation {pid} answered");
        }
        server.stop().await;
    })
    .await
    .unwrap();
}

/// Idle connections opened for the fallback tests, each answered once by
/// the first generation.
async fn idle_connections(server: &Server, n: usize) -> Vec<KeepAlive> {
    let old = server.current_pid();
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut conn = KeepAlive::open(server.addr).await;
        assert_eq!(conn.get("/").await, format!("hello from {old}"));
        conns.push(conn);
    }
    conns
}

/// Each of `conns`, the old generation `old`'s still, as before connections
/// moved: its next request answered by `old` (which then closes it, or its
/// client does).
async fn assert_still_served_by(conns: Vec<KeepAlive>, old: u32) {
    for mut conn in conns {
        let (_, body) = conn.try_get("/").await.unwrap();
        assert_eq!(body, format!("hello from {old}"));
    }
}

/// A next generation with the hand-over off (as a handover of an older
/// version is, which has no such thing): it says nothing of connections
/// when ready, and the old generation drains its own as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_generation_that_does_not_take_connections_leaves_them_to_the_drain() {
    timeout(BOUND, async {
        let server = Server::start_with(Deploy::new("moves-off"), LONG_IDLE_GRACE, &[]).await;
        let old = server.current_pid();
        let conns = idle_connections(&server, 5).await;
        let real = server.deploy.keep_real_binary();
        server.deploy.install_script(&format!(
            "#!/bin/sh\nexec {} \"$@\" --hand-over-connections off\n",
            real.display()
        ));
        send_signal(old, "HUP");
        let new = server.wait_pid_file_change(Some(old)).await;
        server.wait_log("connections_move=false", 1).await;
        assert_still_served_by(conns, old).await;
        wait_exit("the old generation exits", old).await;
        let drained = first_drain(&server);
        assert!(
            drained.contains("connections_finished=5 connections_forced=0")
                && drained.contains("connections_handed_over=0"),
            "{drained}"
        );
        assert_eq!(
            support::get_body(server.addr).await,
            format!("hello from {new}")
        );
        server.stop().await;
    })
    .await
    .unwrap();
}

/// A next generation, in Python, that says it takes connections, then
/// does `misbehave` with the first batch it receives (`message`, `fds`).
fn fake_next_generation(misbehave: &str) -> String {
    format!(
        r#"#!{python}
import os, socket, struct
ready = int(os.environ["HANDOVER_READY_FD"])
channel = socket.socket(fileno=int(os.environ["HANDOVER_CONNECTIONS_FD"]))
channel.setblocking(True)
os.write(ready, b"READY=%d connections=1\n" % os.getpid())
def received(ancillary):
    fds = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += struct.unpack("%di" % (len(data) // 4), data[: len(data) // 4 * 4])
    return fds
message, ancillary, _, _ = channel.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
fds = received(ancillary)
{misbehave}
"#,
        python = tool("python3").display()
    )
}

/// Dies with the first batch unanswered: the old generation gets every
/// connection back (the answer never came, so the next generation served
/// none) and drains them.
const DIES_UNANSWERED: &str = "os._exit(0)";

/// Answers, for each batch, that it took none, until the old generation
/// closes the channel.
const TAKES_NONE: &str = r#"while message:
    for fd in fds:
        os.close(fd)
    count = struct.unpack(">I", message[12:16])[0]
    channel.send(b"HOA1" + message[4:16] + bytes(count))
    message, ancillary, _, _ = channel.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
    fds = received(ancillary)"#;

async fn a_next_generation_that_misbehaves_costs_no_connection(tag: &str, misbehave: &str) {
    let server = Server::start_with(Deploy::new(tag), LONG_IDLE_GRACE, &[]).await;
    let old = server.current_pid();
    let conns = idle_connections(&server, 5).await;
    server
        .deploy
        .install_script(&fake_next_generation(misbehave));
    send_signal(old, "HUP");
    server.wait_log("connections_move=true", 1).await;
    assert_still_served_by(conns, old).await;
    wait_exit("the old generation exits", old).await;
    let drained = first_drain(&server);
    assert!(
        drained.contains("connections_finished=5 connections_forced=0")
            && drained.contains("connections_handed_over=0"),
        "{drained}"
    );
    server.wait_exited().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_generation_that_dies_before_answering_leaves_every_connection_to_the_drain() {
    timeout(
        BOUND,
        a_next_generation_that_misbehaves_costs_no_connection("moves-dies", DIES_UNANSWERED),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_generation_that_takes_none_leaves_them_to_the_drain() {
    timeout(
        BOUND,
        a_next_generation_that_misbehaves_costs_no_connection("moves-none", TAKES_NONE),
    )
    .await
    .unwrap();
}

/// A new generation killed once it has taken the connections: they are
/// gone with it (nothing else owns them), and each client hears so at
/// once, rather than waiting on a connection nobody serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_taken_by_a_generation_that_dies_end_at_once() {
    timeout(BOUND, async {
        let server = Server::start(Deploy::new("moves-killed"), &[]).await;
        let old = server.current_pid();
        let mut conns = idle_connections(&server, 3).await;
        send_signal(old, "HUP");
        let new = server.wait_handed_over(old).await;
        server
            .wait_log(
                "took over the previous generation's connections connections=3",
                1,
            )
            .await;
        send_signal(new, "KILL");
        wait_exit("the new generation is killed", new).await;
        for conn in &mut conns {
            assert!(conn.try_get("/").await.is_err());
        }
        server.wait_exited().await;
    })
    .await
    .unwrap();
}

/// Thirty generations, each handing the same keep-alive connections to
/// the next: each is answered by every one, and the last has as many fds
/// open as the first had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_move_through_thirty_generations_with_no_fd_growth() {
    timeout(BOUND, async {
        let server = Server::start(Deploy::new("moves-thirty"), &[]).await;
        let first = server.current_pid();
        let mut conns = idle_connections(&server, 5).await;
        let first_fds = support::fd_count(first);
        let mut last = first;
        for _ in 0..30 {
            last = server.restart().await;
            for conn in &mut conns {
                assert_eq!(conn.get("/").await, format!("hello from {last}"));
            }
        }
        support::assert_fds_settle(last, first_fds, 30).await;
        drop(conns);
        server.stop().await;
    })
    .await
    .unwrap();
}

/// With a standby, the upgrade wakes it with the listeners and the
/// connections channel: the connections move to it as to a fresh start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_move_to_a_standby() {
    timeout(BOUND, async {
        let server = Server::start_with(
            Deploy::new("moves-standby"),
            &["--standby", "on", "--idle-grace", "600"],
            &[],
        )
        .await;
        let old = server.current_pid();
        server.wait_log("standby started pid=", 1).await;
        let mut conns = idle_connections(&server, 5).await;
        send_signal(old, "HUP");
        let new = server.wait_handed_over(old).await;
        assert!(
            server
                .log_text()
                .contains("handing the listeners to the standby")
        );
        assert!(first_drain(&server).contains("connections_handed_over=5"));
        for conn in &mut conns {
            assert_eq!(conn.get("/").await, format!("hello from {new}"));
        }
        drop(conns);
        server.stop().await;
    })
    .await
    .unwrap();
}
