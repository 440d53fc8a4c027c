//! Faults that real deploys meet, injected into real processes: each run is
//! bounded, and what clients saw is asserted.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::{
    Deploy, Launch, Load, Server, children_of, fd_count, is_alive, processes_from, send_signal,
    wait_exit, wait_until,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_killed_at_any_point_of_its_start_up_leaves_the_old_generation_serving() {
    timeout(BOUND, async {
        // Every generation warms up for 800 ms between taking its listener
        // and saying it is ready: the window "adopted, not yet ready". The
        // latest kill below comes 500 ms in, leaving 300 ms for this test
        // to see the log line late on a loaded machine (with 50 ms to
        // spare, a late look let the child become ready first).
        let server = Server::start_with(
            Deploy::new("killed"),
            &["--ready-timeout", "5", "--warmup-ms", "800"],
            &[],
        )
        .await;
        let old = server.current_pid();
        let load = Load::start(server.addr, 3, "/");
        load.wait_answers(50).await;
        let mut failures = 0;

        // 1. Before it adopts the listeners: a deploy that starts slowly.
        let real = server.deploy.dir.join("hello.real");
        std::fs::copy(support::hello_binary(), &real).unwrap();
        server.deploy.install_script(&format!(
            "#!/bin/sh\nsleep 5\nexec {} \"$@\"\n",
            real.display()
        ));
        send_signal(old, "HUP");
        let child = pending_child(old).await;
        send_signal(child, "KILL");
        failures += 1;
        server.wait_log("upgrade failed", failures).await;
        assert!(!is_alive(child), "reaped");
        load.wait_answers(50).await;

        // 2. After adopting, as it starts warming up; 3. late in the warm-up,
        // just before it would say ready.
        server.deploy.install_good();
        for (i, delay_ms) in [0u64, 500].into_iter().enumerate() {
            send_signal(old, "HUP");
            let child = pending_child(old).await;
            server.wait_log("warming up", 2 + i).await;
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            send_signal(child, "KILL");
            failures += 1;
            server.wait_log("upgrade failed", failures).await;
            assert!(
                server
                    .log_text()
                    .contains("exited before it was ready: signal: 9 (SIGKILL)"),
                "{}",
                server.log_text()
            );
            assert!(!is_alive(child), "reaped");
            assert_eq!(server.current_pid(), old, "the old generation still serves");
            load.wait_answers(50).await;
        }

        // A good upgrade afterwards still works.
        let new = server.restart().await;
        load.wait_pid(new).await;
        load.stop_all_answered().await;
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_stopped_child_is_killed_at_the_ready_timeout_and_reaped() {
    timeout(BOUND, async {
        let server = Server::start_with(
            Deploy::new("stopped"),
            // 500 ms of warm-up leaves time to stop the child in it, well
            // before it would be ready; 1 s is the ready timeout.
            &["--ready-timeout", "1", "--warmup-ms", "500"],
            &[],
        )
        .await;
        let old = server.current_pid();
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
        assert!(!is_alive(child), "killed and reaped");
        assert_eq!(server.current_pid(), old);
        assert!(children_of(old).is_empty());
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

        let slow_failed = slow.failed.lock().unwrap().len();
        let (ok, failed, _) = load.stop().await;
        assert!(
            failed.len() <= CLIENTS,
            "only requests in flight on the killed process may be lost: {} of {ok}: {failed:?}",
            failed.len()
        );
        assert_eq!(slow_failed, 2, "the slow requests it held are lost");
        drop(slow);
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
        assert!(children_of(old).is_empty(), "no half-started child");
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
