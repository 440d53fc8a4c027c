//! Restarts of a real server process (`examples/hello`) under load: real
//! processes, real sockets, signals sent by pid, every process ended by the
//! test.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use std::sync::atomic::Ordering;

use support::{
    Deploy, Load, Server, fd_count, is_alive, is_reaped, processes_from, send_signal, wait_exit,
    wait_until,
};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_under_keep_alive_load_answer_every_request() {
    timeout(BOUND, async {
        const RESTARTS: usize = 10;
        let server = Server::start(Deploy::new("load"), &[]).await;
        let load = Load::start(server.addr, 4, "/");
        let load_h2 = Load::start_with(server.addr, 2, "/", true);
        load.wait_answers(100).await;
        load_h2.wait_answers(100).await;

        let mut generations = vec![server.current_pid()];
        for _ in 0..RESTARTS {
            let new = server.restart().await;
            assert!(!generations.contains(&new));
            generations.push(new);
            // The new generation answers before the next restart.
            load.wait_pid(new).await;
        }
        load.wait_answers(100).await;
        load_h2.wait_answers(100).await;
        let (ok, failed, pids) = load.stop().await;
        let refused = load_h2.refused.load(Ordering::Relaxed);
        let lost = load_h2.lost_by_client.load(Ordering::Relaxed);
        let (ok_h2, failed_h2, pids_h2) = load_h2.stop().await;
        eprintln!(
            "{RESTARTS} restarts: HTTP/1 {ok} answered, {} failed; HTTP/2 {ok_h2} answered, {} failed, {refused} refused unprocessed by a GOAWAY, {lost} lost by hyper's client, each sent again",
            failed.len(),
            failed_h2.len()
        );
        // Each HTTP/2 client has one stream open at a time, so a restart
        // can refuse (or hyper's client lose) at most one request of each.
        assert!(
            refused <= 2 * RESTARTS && lost <= 2 * RESTARTS,
            "HTTP/2: {refused} refused and {lost} lost in {RESTARTS} restarts of 2 clients"
        );
        assert!(
            failed.is_empty(),
            "HTTP/1: {} of {ok} requests failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(
            failed_h2.is_empty(),
            "HTTP/2: {} of {ok_h2} requests failed: {:?}",
            failed_h2.len(),
            &failed_h2[..failed_h2.len().min(5)]
        );
        assert!(pids_h2.len() > 1, "HTTP/2 clients moved to new generations");
        for pid in &generations {
            assert!(pids.contains(pid), "generation {pid} answered");
        }
        server.stop().await;
    })
    .await
    .unwrap();
}

/// A request whose body is still coming when the upgrade starts (the
/// client decides when it ends: axum's example echoes `POST /echo`) keeps
/// the old generation alive through the hand-over, is answered by it, and
/// the old generation exits with that answer, not at its drain timeout.
/// The answer does not close the connection: it moves to the new
/// generation, which answers the next request on it.
#[tokio::test]
async fn a_request_in_flight_during_the_restart_finishes_from_the_old_generation() {
    timeout(BOUND, async {
        use http_body_util::BodyExt;
        let server = Server::start_with(Deploy::of("inflight", "axum"), &[], &[]).await;
        let old = server.current_pid();
        let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let (body, rest) = {
            let (tx, rx) = tokio::sync::mpsc::channel::<
                Result<http_body::Frame<bytes::Bytes>, std::io::Error>,
            >(2);
            (
                http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
                tx,
            )
        };
        rest.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
            b"half, ",
        ))))
        .await
        .unwrap();
        let request = http::Request::post("/echo")
            .header(http::header::HOST, "127.0.0.1")
            .header(http::header::CONTENT_LENGTH, "16")
            .body(body)
            .unwrap();
        let response = tokio::spawn(sender.send_request(request));

        send_signal(old, "HUP");
        let new = server.wait_pid_file_change(Some(old)).await;
        server
            .wait_log("handed over; draining this generation", 1)
            .await;
        assert!(is_alive(old), "the old generation waits for its request");

        rest.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
            b"then whole",
        ))))
        .await
        .unwrap();
        drop(rest);
        let response = response.await.unwrap().unwrap();
        assert_eq!(response.headers().get(http::header::CONNECTION), None);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "half, then whole");
        wait_exit("the old generation exits", old).await;
        // The same connection, now the new generation's.
        sender.ready().await.unwrap();
        // A body of the same type as the first request's, empty.
        let (none, rx) = tokio::sync::mpsc::channel(1);
        drop(none);
        let empty =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let next = http::Request::get("/")
            .header(http::header::HOST, "127.0.0.1")
            .header(http::header::CONTENT_LENGTH, "0")
            .body(empty)
            .unwrap();
        let answer = sender.send_request(next).await.unwrap();
        let answer = answer.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(answer, format!("hello from {new}"));
        // Its drain ended with that request, which was in flight when the
        // drain started: finished, nothing forced.
        server.wait_log("drain finished", 1).await;
        let drained = server.log_text();
        let line = drained
            .lines()
            .find(|line| line.contains("drain finished"))
            .unwrap();
        assert!(
            line.contains("requests_finished=1 requests_forced=0")
                && line.contains("connections_forced=0"),
            "{line}"
        );
        assert_eq!(server.current_pid(), new);
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_binaries_keep_the_old_generation_serving() {
    timeout(BOUND, async {
        let server = Server::start(Deploy::new("broken"), &[]).await;
        let load = Load::start(server.addr, 2, "/");
        load.wait_answers(50).await;
        let old = server.current_pid();

        // 1. A binary that exits at once.
        server.deploy.install_script("#!/bin/sh\nexit 1\n");
        send_signal(old, "HUP");
        wait_until("the failure is logged", Duration::from_secs(20), || {
            server
                .log_text()
                .contains("exited before it was ready: exit status: 1")
        })
        .await;
        load.wait_answers(50).await;
        assert_eq!(server.current_pid(), old);

        // 2. A binary that hangs: killed at the ready timeout (2 s), reaped.
        server.deploy.install_script("#!/bin/sh\nexec sleep 600\n");
        send_signal(old, "HUP");
        wait_until("the timeout is logged", Duration::from_secs(20), || {
            server
                .log_text()
                .contains("was not ready within 2s; it was killed")
        })
        .await;
        let hung_pid: u32 = {
            let logs = server.log_text();
            let line = logs
                .lines()
                .rev()
                .find(|l| l.contains("was not ready within"))
                .unwrap();
            let at = line.find("new generation (pid ").unwrap() + "new generation (pid ".len();
            line[at..].split(')').next().unwrap().parse().unwrap()
        };
        assert!(
            is_reaped(hung_pid),
            "the hung child was killed and reaped before the failure was logged"
        );
        load.wait_answers(50).await;

        // 3. The binary was deleted.
        std::fs::remove_file(&server.deploy.bin).unwrap();
        send_signal(old, "HUP");
        wait_until(
            "the missing binary is logged",
            Duration::from_secs(20),
            || {
                server
                    .log_text()
                    .contains("it does not exist (was it deleted?)")
            },
        )
        .await;
        load.wait_answers(50).await;
        assert_eq!(server.current_pid(), old);

        // 4. A good deploy still works after all that.
        server.deploy.install_good();
        let new = server.restart().await;
        load.wait_pid(new).await;
        load.stop_all_answered().await;
        server.stop().await;
    })
    .await
    .unwrap();
}

/// Waits for the last line the generation `pid` logs before it exits
/// after a hand-over, and returns the log up to there: every line that
/// generation logged has come through the pipe by then.
async fn log_of_handed_over(server: &Server, pid: u32) -> String {
    let last = "handed over; exiting new_pid=";
    wait_exit("the old generation exits", pid).await;
    server.wait_log(last, 1).await;
    server.log_text()
}

/// Asserts that the upgrade `logs` tell of started one next generation,
/// `new`, and that it alone runs now.
fn assert_one_new_generation(server: &Server, logs: &str, new: u32) {
    assert_eq!(
        logs.matches("starting the next generation exe=").count(),
        1,
        "{logs}"
    );
    assert_eq!(
        processes_from(&server.deploy.dir),
        vec![new],
        "exactly one generation"
    );
}

/// Two `SIGHUP`s 5 ms apart while the next generation starts: exactly one
/// new generation. Where the process saw two signals (standard signals
/// that arrive before the first is handled merge into one), the second was
/// refused, and said so.
#[tokio::test]
async fn two_upgrade_signals_5ms_apart_make_exactly_one_new_generation() {
    timeout(BOUND, async {
        let deploy = Deploy::new("twice");
        let gate = deploy.gate();
        let args = ["--ready-timeout", "30", "--warmup-until", gate.arg()];
        let server = Server::start_with(deploy, &args, &[]).await;
        let old = server.current_pid();
        // The next generation waits at the gate until both signals are in.
        gate.close();
        send_signal(old, "HUP");
        tokio::time::sleep(Duration::from_millis(5)).await;
        send_signal(old, "HUP");
        server
            .wait_log("starting the next generation exe=", 1)
            .await;
        server.wait_log("warming up", 2).await;
        gate.open();
        let new = server.wait_handed_over(old).await;
        let logs = log_of_handed_over(&server, old).await;
        let requested = logs.matches("upgrade requested").count();
        let refused = logs.matches("an upgrade is already in progress").count();
        eprintln!("{requested} upgrade requests seen, {refused} refused");
        assert!(matches!(requested, 1 | 2), "{logs}");
        assert_eq!(
            refused,
            requested - 1,
            "every request but the first is refused: {logs}"
        );
        assert_one_new_generation(&server, &logs, new);
        server.stop().await;
    })
    .await
    .unwrap();
}

/// A second `SIGHUP` while the first upgrade waits for its next generation
/// is refused: one new generation, and the refusal logged.
#[tokio::test]
async fn an_upgrade_signal_during_an_upgrade_is_refused() {
    timeout(BOUND, async {
        let server = Server::start(Deploy::new("refused"), &[]).await;
        let old = server.current_pid();
        // The next generation's binary waits at the gate before it execs
        // the real one: the second signal arrives while the first upgrade
        // waits for it.
        let gate = server.deploy.gate();
        gate.close();
        let real = server.deploy.keep_real_binary();
        server.deploy.install_script(&gate.script(&real));
        send_signal(old, "HUP");
        // Only once the first upgrade is under way: two SIGHUPs that arrive
        // before the process handles the first are one signal to the kernel
        // (standard signals do not queue).
        server
            .wait_log("starting the next generation exe=", 1)
            .await;
        send_signal(old, "HUP");
        server
            .wait_log("an upgrade is already in progress", 1)
            .await;
        gate.open();
        let new = server.wait_handed_over(old).await;
        let logs = log_of_handed_over(&server, old).await;
        assert_eq!(logs.matches("upgrade requested").count(), 2, "{logs}");
        assert_one_new_generation(&server, &logs, new);
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_symlink_deploy_starts_the_release_the_link_points_at_now() {
    timeout(BOUND, async {
        // Started as `current/hello`, in `current`, pointing at v1; the
        // kernel knows the binary and directory only as `releases/v1`.
        let server = Server::start(Deploy::releases("symlink"), &[]).await;
        let releases = server.deploy.dir.join("releases");
        let exe_and_dir = |pid: u32| {
            (
                std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
                std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
            )
        };
        let load = Load::start(server.addr, 2, "/");
        let v1 = server.current_pid();
        assert_eq!(
            exe_and_dir(v1),
            (releases.join("v1/hello"), releases.join("v1"))
        );

        server.deploy.add_release("v2");
        server.deploy.point_current_at("v2");
        let v2 = server.restart().await;
        assert_eq!(
            exe_and_dir(v2),
            (releases.join("v2/hello"), releases.join("v2")),
            "the new generation runs the release `current` points at now, in its directory"
        );
        load.wait_pid(v2).await;

        // Old releases get cleaned up; the next deploy still works.
        std::fs::remove_dir_all(releases.join("v1")).unwrap();
        server.deploy.add_release("v3");
        server.deploy.point_current_at("v3");
        let v3 = server.restart().await;
        assert_eq!(
            exe_and_dir(v3),
            (releases.join("v3/hello"), releases.join("v3"))
        );
        load.wait_pid(v3).await;
        load.stop_all_answered().await;
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_working_directory_deleted_since_start_up_does_not_stop_upgrades() {
    timeout(BOUND, async {
        let mut deploy = Deploy::new("deleted-dir");
        let work = deploy.dir.join("work");
        std::fs::create_dir(&work).unwrap();
        deploy.cwd = Some(work.clone());
        let server = Server::start(deploy, &[]).await;
        let load = Load::start(server.addr, 2, "/");
        // An old release's directory, cleaned up while still in use.
        std::fs::remove_dir(&work).unwrap();
        let mut deleted = work.into_os_string();
        deleted.push(" (deleted)");
        for _ in 0..2 {
            let new = server.restart().await;
            assert_eq!(
                std::fs::read_link(format!("/proc/{new}/cwd")).unwrap(),
                deleted,
                "the new generation runs where the old one did"
            );
            load.wait_pid(new).await;
        }
        load.stop_all_answered().await;
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn fd_count_of_generation_31_equals_generation_1() {
    timeout(BOUND, async {
        let server = Server::start(Deploy::new("fds"), &[]).await;
        let first = server.current_pid();
        let first_fds = fd_count(first);
        let mut pid = first;
        for _ in 0..30 {
            pid = server.restart().await;
        }
        support::assert_fds_settle(pid, first_fds, 30).await;
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn sigterm_during_a_pending_upgrade_kills_the_child_and_drains() {
    timeout(BOUND, async {
        let mut server = Server::start(Deploy::new("term"), &[]).await;
        let old = server.current_pid();
        server.deploy.install_script("#!/bin/sh\nexec sleep 600\n");
        send_signal(old, "HUP");
        wait_until("the upgrade started", Duration::from_secs(20), || {
            server
                .log_text()
                .contains("starting the next generation exe=")
        })
        .await;
        send_signal(old, "TERM");
        let status = timeout(Duration::from_secs(20), server.first.wait())
            .await
            .expect("the process drained and exited")
            .unwrap();
        assert!(
            status.success(),
            "exit status {status}\n{}",
            server.log_text()
        );
        // The log lines arrive through a pipe: wait for the last one.
        wait_until("the exit is logged", Duration::from_secs(20), || {
            server.log_text().contains("shut down; exiting")
        })
        .await;
        let logs = server.log_text();
        assert!(logs.contains("upgrade cancelled by shutdown"), "{logs}");
        assert!(processes_from(&server.deploy.dir).is_empty());
        let line = logs
            .lines()
            .find(|l| l.contains("upgrade cancelled by shutdown"))
            .unwrap();
        let child: u32 = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("pid="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(is_reaped(child), "the pending child was killed and reaped");
        assert!(
            server.deploy.read_pid().is_none(),
            "the pid file is removed on shutdown"
        );
    })
    .await
    .unwrap();
}
