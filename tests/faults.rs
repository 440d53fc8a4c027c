//! Faults that real deploys meet, injected into real processes: each run is
//! bounded, and what clients saw is asserted.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::{
    Deploy, Launch, Load, Server, children_of, fd_count, is_reaped, processes_from, send_signal,
    unreaped_children_of, wait_exit, wait_until,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(120);

/// Waits for the pending next generation (the only child of `old`).
async fn pending_child(old: u32) -> u32 {
    let mut child = None;
    wait_until(
        "the next generation is started",
        Duration::from_secs(20),
        || {
            child = children_of(old).first().copied();
            child.is_some()
        },
    )
    .await;
    child.unwrap()
}

/// A next generation killed before it takes the listeners (a deploy whose
/// binary starts slowly), or after, while it warms up: the old generation
/// serves on, has reaped it by the time it logs the failure, and upgrades
/// again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_killed_at_any_point_of_its_start_up_leaves_the_old_generation_serving() {
    timeout(BOUND, async {
        let deploy = Deploy::new("killed");
        // Every generation warms up until the gate opens: open, the first
        // becomes ready; closed, a new one stays "adopted, not yet ready"
        // for as long as the test likes.
        let gate = deploy.gate();
        let server = Server::start_with(
            deploy,
            &["--ready-timeout", "30", "--warmup-until", gate.arg()],
            &[],
        )
        .await;
        let old = server.current_pid();
        let load = Load::start(server.addr, 3, "/");
        load.wait_answers(50).await;
        gate.close();
        let killed = |child: u32| {
            format!("new generation (pid {child}) exited before it was ready: signal: 9 (SIGKILL)")
        };

        // 1. Before it adopts the listeners: a binary that waits at the
        // gate before it execs the real one.
        let real = server.deploy.keep_real_binary();
        server.deploy.install_script(&gate.script(&real));
        send_signal(old, "HUP");
        let child = pending_child(old).await;
        send_signal(child, "KILL");
        server.wait_log("upgrade failed", 1).await;
        assert!(server.logged(&killed(child)) > 0, "{}", server.log_text());
        assert!(is_reaped(child), "reaped before the failure is logged");
        load.wait_answers(50).await;

        // 2. After adopting, in its warm-up.
        server.deploy.install_good();
        send_signal(old, "HUP");
        let child = pending_child(old).await;
        server.wait_log("warming up", 2).await;
        send_signal(child, "KILL");
        server.wait_log("upgrade failed", 2).await;
        assert!(server.logged(&killed(child)) > 0, "{}", server.log_text());
        assert!(is_reaped(child), "reaped before the failure is logged");
        assert_eq!(server.current_pid(), old, "the old generation still serves");
        load.wait_answers(50).await;

        // A good upgrade afterwards still works.
        gate.open();
        let new = server.restart().await;
        load.wait_pid(new).await;
        load.stop_all_answered().await;
        server.stop().await;
    })
    .await
    .unwrap();
}

/// A next generation that hangs (stopped, in its warm-up) is killed at the
/// ready timeout, and reaped by the time that is logged.
#[tokio::test]
async fn a_stopped_child_is_killed_at_the_ready_timeout_and_reaped() {
    timeout(BOUND, async {
        let deploy = Deploy::new("stopped");
        let gate = deploy.gate();
        let server = Server::start_with(
            deploy,
            &["--ready-timeout", "1", "--warmup-until", gate.arg()],
            &[],
        )
        .await;
        let old = server.current_pid();
        gate.close();
        send_signal(old, "HUP");
        let child = pending_child(old).await;
        // Stopped once it runs the new binary (warming up): a child stopped
        // between clone and exec would also stop the spawn call that waits
        // for its exec, which no real deploy does.
        server.wait_log("warming up", 2).await;
        send_signal(child, "STOP");
        server
            .wait_log("was not ready within 1s; it was killed", 1)
            .await;
        assert!(is_reaped(child), "killed and reaped");
        assert_eq!(server.current_pid(), old);
        assert!(unreaped_children_of(old).is_empty());
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_generation_killed_mid_drain_loses_only_what_it_held() {
    timeout(BOUND, async {
        const CLIENTS: usize = 3;
        let server = Server::start(Deploy::new("oldkilled"), &[]).await;
        let old = server.current_pid();
        let load = Load::start(server.addr, CLIENTS, "/");
        load.wait_answers(50).await;
        // Requests the old generation will still hold when it is killed.
        let before = support::fd_count(old);
        let slow = Load::start(server.addr, 2, "/sleep/5000");
        wait_until(
            "the old generation holds the slow requests",
            Duration::from_secs(20),
            || support::fd_count(old) >= before + 2,
        )
        .await;

        send_signal(old, "HUP");
        let new = server.wait_pid_file_change(Some(old)).await;
        send_signal(old, "KILL");
        wait_exit("the old generation is gone", old).await;
        // The new generation keeps serving.
        load.wait_pid(new).await;
        load.wait_answers(200).await;

        // The slow requests fail as their connections are reset.
        wait_until("the slow requests fail", Duration::from_secs(20), || {
            slow.failed.lock().unwrap().len() >= 2
        })
        .await;
        let slow_failed = slow.failed.lock().unwrap().clone();
        drop(slow);
        let (ok, failed, _) = load.stop().await;
        assert!(
            failed.len() <= CLIENTS,
            "only requests in flight on the killed process may be lost: {} of {ok}: {failed:?}",
            failed.len()
        );
        assert_eq!(
            slow_failed.len(),
            2,
            "the slow requests it held are lost: {slow_failed:?}"
        );
        let status = server.stop_any().await;
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    })
    .await
    .unwrap();
}

/// A pid file that cannot be written and a `NOTIFY_SOCKET` nobody listens
/// on are logged clearly, and the server serves anyway.
#[tokio::test]
async fn unwritable_pid_file_and_dead_notify_socket_are_logged_and_serving_goes_on() {
    timeout(BOUND, async {
        let deploy = Deploy::new("unwritable");
        let not_a_dir = deploy.dir.join("file");
        std::fs::write(&not_a_dir, "").unwrap();
        let mut child = tokio::process::Command::new(&deploy.bin)
            .args(["--addr", "127.0.0.1:0", "--pid-file"])
            .arg(not_a_dir.join("hello.pid"))
            .env("RUST_LOG", "info")
            .env("NOTIFY_SOCKET", deploy.dir.join("nobody-listens.sock"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut logs = String::new();
        let mut addr = None;
        while addr.is_none()
            || !logs.contains("notifying systemd")
            || !logs.contains("writing pid file")
        {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the server keeps running");
            if line.contains(" listening ") {
                addr = line
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("addr="))
                    .map(str::to_owned);
            }
            logs.push_str(&line);
            logs.push('\n');
        }
        assert!(
            logs.contains(&format!(
                "writing pid file {}",
                not_a_dir.join("hello.pid").display()
            )),
            "{logs}"
        );
        assert!(logs.contains("Not a directory"), "{logs}");
        assert!(
            logs.contains("notifying systemd at NOTIFY_SOCKET="),
            "{logs}"
        );

        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let response = client
            .get(format!("http://{}/", addr.unwrap()).parse().unwrap())
            .await
            .unwrap();
        assert!(response.status().is_success(), "it serves anyway");
        send_signal(pid, "TERM");
        let status = timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
        drop(deploy);
    })
    .await
    .unwrap();
}

/// Out of fds: accept backs off, a restart fails cleanly (no half-started
/// child), and both recover once the fds are free.
#[tokio::test]
async fn out_of_fds_a_restart_fails_cleanly_and_recovers() {
    timeout(BOUND, async {
        let server = Server::launch(
            Deploy::new("nofds"),
            Launch::FdLimit(48),
            &["--ready-timeout", "5"],
            &[],
        )
        .await;
        let old = server.current_pid();
        let mut held = Vec::new();
        for _ in 0..80 {
            held.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
        }
        server.wait_log("accept failed; backing off", 1).await;

        send_signal(old, "HUP");
        server.wait_log("upgrade refused or failed", 1).await;
        assert!(
            server.log_text().contains("Too many open files"),
            "{}",
            server.log_text()
        );
        assert!(
            unreaped_children_of(old).is_empty(),
            "no half-started child"
        );
        assert_eq!(processes_from(&server.deploy.dir), vec![old]);

        // Once the server has closed the connections it held (it must see
        // each one end first), fds are free again and a restart works.
        drop(held);
        // A request on a new connection is answered only after every
        // connection queued before it has been accepted; once the server has
        // also seen those end, its fds are free and a restart works.
        let mut fresh = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        fresh
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        fresh.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        wait_until(
            "the held connections closed",
            Duration::from_secs(20),
            || fd_count(old) < 24,
        )
        .await;
        let new = server.restart().await;
        assert_ne!(new, old);
        server.stop().await;
    })
    .await
    .unwrap();
}

/// The server's stdout and stderr are pipes whose reader goes away (a log
/// collector that died, the SSH session that started it ended), so every
/// line it logs fails from then on. Upgrades and the drain go on: no
/// request is lost, the first generation exits 0 after handing over, and
/// the last ends on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_that_breaks_stops_neither_upgrades_nor_the_drain() {
    timeout(BOUND, async {
        let server = Server::start(Deploy::new("log-pipe"), &[]).await;
        server.close_log_pipes().await;
        let load = Load::start(server.addr, 4, "/");
        load.wait_answers(50).await;
        // The new generations start with the same broken pipes.
        for _ in 0..2 {
            let new = server.restart().await;
            load.wait_pid(new).await;
        }
        load.stop_all_answered().await;
        server.stop().await;
    })
    .await
    .expect("the test ends within the bound");
}
