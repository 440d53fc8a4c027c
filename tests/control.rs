//! The control socket from outside: the `handover` command-line tool and
//! raw peers against `examples/hello --control-socket`, real processes and
//! real sockets, every process ended by the test.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::{
    Deploy, Launch, Server, fd_count, is_alive, processes_from, send_signal, unreaped_children_of,
    wait_exit, wait_until,
};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(110);

/// The `handover` tool, run with `args`: whether it exited 0, and what it
/// printed on stdout and on stderr.
async fn cli(args: &[&str]) -> (bool, String, String) {
    cli_as(None, env!("CARGO_BIN_EXE_handover").as_ref(), args).await
}

/// The tool at `tool`, run through `prefix` (`setpriv …`), if given.
async fn cli_as(prefix: Option<&[&str]>, tool: &Path, args: &[&str]) -> (bool, String, String) {
    let mut command = match prefix {
        Some(prefix) => {
            let mut command = tokio::process::Command::new(prefix[0]);
            command.args(&prefix[1..]).arg(tool);
            command
        }
        None => tokio::process::Command::new(tool),
    };
    let output = timeout(
        Duration::from_secs(60),
        command
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the tool answers within a minute")
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The value of `key=` in a reply.
fn field<'a>(reply: &'a str, key: &str) -> &'a str {
    reply
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in\n{reply}"))
}

/// `hello` with a 2 s ready timeout and its control socket in its deploy
/// directory.
async fn start(tag: &str, args: &[&str]) -> (Server, PathBuf) {
    let deploy = Deploy::new(tag);
    let socket = deploy.dir.join("control.sock");
    let socket_arg = socket.to_str().unwrap().to_owned();
    let mut all = vec!["--ready-timeout", "2", "--control-socket", &socket_arg];
    all.extend_from_slice(args);
    let server = Server::start_with(deploy, &all, &[]).await;
    wait_until("the control socket", Duration::from_secs(20), || {
        socket.exists()
    })
    .await;
    (server, socket)
}

/// `GET /` answered by the server at `addr`: "hello from <pid>".
async fn hello_from(addr: std::net::SocketAddr) -> u32 {
    let body = support::get_body(addr).await;
    body.strip_prefix("hello from ")
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("not a hello: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_upgrade_answers_with_the_new_generation_which_then_serves() {
    timeout(BOUND, async {
        let (server, socket) = start("control-upgrade", &[]).await;
        let path = socket.to_str().unwrap();
        let old = server.current_pid();
        let (ok, reply, stderr) = cli(&["upgrade", path]).await;
        assert!(ok, "{reply}{stderr}");
        assert_eq!(field(&reply, "result"), "ok");
        let new: u32 = field(&reply, "pid").parse().unwrap();
        assert_ne!(new, old);
        assert_eq!(field(&reply, "previous_pid"), old.to_string());
        assert_eq!(field(&reply, "generation"), "2");
        assert!(field(&reply, "took_ms").parse::<f64>().unwrap() > 0.0);
        // It serves: the old generation has stopped accepting by now.
        assert_eq!(hello_from(server.addr).await, new);
        wait_exit("the old generation exits", old).await;

        // The same socket, now the new generation's.
        let (ok, reply, _) = cli(&["status", path]).await;
        assert!(ok, "{reply}");
        assert_eq!(field(&reply, "pid"), new.to_string());
        assert_eq!(field(&reply, "generation"), "2");
        assert_eq!(field(&reply, "draining"), "false");
        server.stop().await;
        assert!(
            !socket.exists(),
            "the socket file goes with the last generation"
        );
    })
    .await
    .unwrap();
}

/// A binary that exits, one that hangs past the ready timeout: the tool
/// exits non-zero with the reason, and the old generation serves on, its
/// status telling the last failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_exits_non_zero_with_the_reason_and_the_old_generation_serves_on() {
    timeout(BOUND, async {
        let (server, socket) = start("control-broken", &[]).await;
        let path = socket.to_str().unwrap();
        let old = server.current_pid();
        for (script, reason, says) in [
            (
                "#!/bin/sh\nexit 3\n",
                "child_exited",
                "exited before it was ready: exit status: 3",
            ),
            (
                "#!/bin/sh\nexec sleep 600\n",
                "ready_timeout",
                "was not ready within 2s; it was killed",
            ),
        ] {
            server.deploy.install_script(script);
            let (ok, reply, stderr) = cli(&["upgrade", path]).await;
            assert!(!ok, "{reply}");
            assert_eq!(field(&reply, "result"), "error");
            assert_eq!(field(&reply, "reason"), reason);
            assert!(field(&reply, "message").contains(says), "{reply}");
            assert!(stderr.contains(says), "{stderr}");
            assert_eq!(
                hello_from(server.addr).await,
                old,
                "the old generation serves on"
            );
            let (_, status, _) = cli(&["status", path]).await;
            assert_eq!(field(&status, "last_upgrade"), reason);
            assert!(field(&status, "last_upgrade_message").contains(says));
        }
        // The children (a script that exited, a `sleep` killed) are gone,
        // not left as zombies.
        assert!(
            unreaped_children_of(old).is_empty(),
            "children reaped: {:?}",
            unreaped_children_of(old)
        );
        assert_eq!(processes_from(&server.deploy.dir), vec![old]);
        server.deploy.install_good();
        let (ok, reply, _) = cli(&["upgrade", path]).await;
        assert!(ok, "and the next upgrade works: {reply}");
        // The pid file names the new generation by the time the answer
        // comes.
        assert_eq!(field(&reply, "pid"), server.current_pid().to_string());
        wait_exit("the old generation exits", old).await;
        server.stop().await;
    })
    .await
    .unwrap();
}

/// In a container, where the old generation's exit would end it, the
/// upgrade is refused, and the tool says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_exits_non_zero_with_the_reason() {
    timeout(BOUND, async {
        let deploy = Deploy::new("control-refused");
        let socket = deploy.dir.join("control.sock");
        let mut server = Server::launch(
            deploy,
            Launch::Container(&["tini", "--"]),
            &["--control-socket", socket.to_str().unwrap()],
            &[],
        )
        .await;
        wait_until("the control socket", Duration::from_secs(20), || {
            socket.exists()
        })
        .await;
        let (ok, reply, stderr) = cli(&["upgrade", socket.to_str().unwrap()]).await;
        assert!(!ok, "{reply}");
        assert_eq!(field(&reply, "reason"), "container", "{reply}");
        assert!(stderr.contains("refusing to upgrade"), "{stderr}");
        let (ok, status, _) = cli(&["status", socket.to_str().unwrap()]).await;
        assert!(ok);
        assert_eq!(field(&status, "generation"), "1");
        let pid: u32 = field(&status, "pid").parse().unwrap();
        // The pid as the container sees it: the server runs under tini.
        assert_eq!(pid, 2);
        let init = server.first.id().unwrap();
        // unshare's child, tini, is PID 1 of the container; end it all.
        for child in support::children_of(init) {
            send_signal(child, "TERM");
        }
        let status = timeout(Duration::from_secs(20), server.first.wait())
            .await
            .expect("the container ends")
            .unwrap();
        assert!(status.success(), "{status}");
    })
    .await
    .unwrap();
}

/// Two `upgrade` requests at once: exactly one new generation; the other
/// request is told an upgrade is in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_upgrade_requests_at_once_make_exactly_one_new_generation() {
    timeout(BOUND, async {
        // The next generation warms up until the gate opens: the first
        // request's upgrade is under way until then.
        let gate_path = std::env::temp_dir().join(format!(
            "handover-control-twice-gate-{}",
            std::process::id()
        ));
        let gate = support::Gate { path: gate_path };
        gate.open();
        let (server, socket) = start("control-twice", &["--warmup-until", gate.arg()]).await;
        gate.close();
        let path = socket.to_str().unwrap().to_owned();
        let old = server.current_pid();
        let args = ["upgrade", path.as_str()];
        let (mut a, mut b) = (Box::pin(cli(&args)), Box::pin(cli(&args)));
        // The one refused answers while the other still waits at the gate.
        let (lost, won) = tokio::select! {
            lost = &mut a => (lost, b),
            lost = &mut b => (lost, a),
        };
        assert!(!lost.0, "{lost:?}");
        assert_eq!(field(&lost.1, "reason"), "in_progress", "{lost:?}");
        assert!(
            lost.2.contains("an upgrade is already in progress"),
            "{lost:?}"
        );
        gate.open();
        let won = won.await;
        assert!(won.0, "{won:?}");
        let new: u32 = field(&won.1, "pid").parse().unwrap();
        wait_exit("the old generation exits", old).await;
        assert_eq!(processes_from(&server.deploy.dir), vec![new]);
        server.stop().await;
        gate.close();
    })
    .await
    .unwrap();
}

/// Sends `bytes` (then half-closes if `close`) on a fresh connection and
/// reads what comes back until the server closes.
fn raw(socket: &Path, bytes: &[u8], close: bool) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    if close {
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
}

/// What a peer controls is bounded: a peer of another uid is refused (the
/// 0600 socket keeps it out; let in, the server still refuses it and logs
/// it), oversized, garbage, partial and silent requests, and 200
/// connections at once. None of it disturbs serving or the next upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_and_bad_or_many_peers_are_refused_and_disturb_nothing() {
    let setpriv = support::tool("setpriv");
    timeout(BOUND, async {
        let (server, socket) = start("control-peers", &[]).await;
        let path = socket.to_str().unwrap().to_owned();
        let old = server.current_pid();
        let nobody: &[&str] = &[
            setpriv.to_str().unwrap(),
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ];
        // The tool itself must be reachable by that user (a checkout may be
        // 0700): a copy in the deploy directory, which that user may enter.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&server.deploy.dir, std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let tool = server.deploy.dir.join("handover-tool");
        std::fs::copy(env!("CARGO_BIN_EXE_handover"), &tool).unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the socket is the server's user's only"
        );
        let (ok, reply, stderr) = cli_as(Some(nobody), &tool, &["status", path.as_str()]).await;
        assert!(!ok, "{reply}");
        // The tool ran, and the socket's mode kept it out.
        assert!(
            stderr.contains(&format!("asking the server at {path} to status"))
                && stderr.contains("Permission denied"),
            "{stderr}"
        );
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (ok, reply, _) = cli_as(Some(nobody), &tool, &["upgrade", path.as_str()]).await;
        assert!(!ok, "{reply}");
        assert_eq!(field(&reply, "reason"), "refused", "{reply}");
        assert!(field(&reply, "message").contains("uid 65534 may not use this socket"));
        server
            .wait_log("refused a peer that runs as another user", 1)
            .await;
        assert!(server.log_text().contains("peer_uid=65534"));

        let socket_path = socket.clone();
        let replies = tokio::task::spawn_blocking(move || {
            let socket = socket_path.as_path();
            let oversized = raw(socket, &[b'x'; 300], false);
            let garbage = raw(socket, b"\xff\xfe\x00upgrade\n", false);
            let unknown = raw(socket, b"reboot\n", false);
            let partial = raw(socket, b"stat", true);
            (oversized, garbage, unknown, partial)
        })
        .await
        .unwrap();
        assert_eq!(field(&replies.0, "reason"), "bad_request", "{replies:?}");
        assert!(field(&replies.0, "message").contains("at most 256 bytes"));
        assert_eq!(field(&replies.1, "reason"), "bad_request", "{replies:?}");
        assert!(field(&replies.2, "message").contains("unknown request \"reboot\""));
        assert!(
            field(&replies.3, "message").contains("without a newline"),
            "{replies:?}"
        );

        // 1,000 silent peers at once: 16 are served (and answered after 5 s
        // of silence), at most 16 more told the server is busy, and the
        // rest closed at once, costing the server nothing; HTTP under load
        // and a status request from a well-behaved peer go on meanwhile.
        let load = support::Load::start(server.addr, 4, "/");
        let socket_path = socket.clone();
        let crowd = tokio::task::spawn_blocking(move || {
            let streams: Vec<UnixStream> = (0..1000)
                .map(|_| UnixStream::connect(&socket_path).unwrap())
                .collect();
            streams
                .into_iter()
                .map(|mut stream| {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .unwrap();
                    let mut reply = String::new();
                    let _ = stream.read_to_string(&mut reply);
                    reply
                })
                .collect::<Vec<String>>()
        });
        assert_eq!(hello_from(server.addr).await, old, "serving goes on");
        let crowd = crowd.await.unwrap();
        let busy = crowd.iter().filter(|r| r.contains("reason=busy")).count();
        let late = crowd
            .iter()
            .filter(|r| r.contains("no whole request line within"))
            .count();
        let closed = crowd.iter().filter(|r| r.is_empty()).count();
        assert_eq!(busy + late + closed, 1000, "{:?}", &crowd[..3]);
        assert!(
            late <= 16 && busy <= 16,
            "{late} served, {busy} busy, {closed} closed"
        );
        load.wait_answers(100).await;
        let (answered, failed, _) = load.stop().await;
        assert!(
            failed.is_empty(),
            "{} of {answered} failed: {:?}",
            failed.len(),
            &failed[..1]
        );

        let (ok, reply, _) = cli(&["status", path.as_str()]).await;
        assert!(ok, "{reply}");
        let (ok, reply, _) = cli(&["upgrade", path.as_str()]).await;
        assert!(ok, "the next upgrade works: {reply}");
        wait_exit("the old generation exits", old).await;
        assert!(is_alive(field(&reply, "pid").parse().unwrap()));
        server.stop().await;
    })
    .await
    .unwrap();
}

/// `status` counts generations across upgrades, and the socket's path
/// serves 30 generations with no fd growth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_serves_thirty_generations_counting_them_with_no_fd_growth() {
    timeout(BOUND, async {
        let (server, socket) = start("control-thirty", &[]).await;
        let first = server.current_pid();
        let first_fds = fd_count(first);
        let path = socket.clone();
        let last = tokio::task::spawn_blocking(move || {
            let mut last = None;
            let mut previous = 0;
            for generation in 2..=31u64 {
                let up = handover::control::upgrade(&path, Duration::from_secs(30)).unwrap();
                assert_eq!(up.generation, generation);
                let status = handover::control::status(&path, Duration::from_secs(10)).unwrap();
                assert_eq!((status.pid, status.generation), (up.pid, generation));
                assert!(matches!(
                    status.last_upgrade,
                    None | Some(handover::control::LastUpgrade::Succeeded { .. })
                ));
                last = Some(up.pid);
                previous = up.previous_pid;
            }
            // The 30th previous generation, still draining at the answer.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while support::is_alive(previous) {
                assert!(std::time::Instant::now() < deadline, "{previous} exits");
                std::thread::sleep(Duration::from_millis(2));
            }
            last.unwrap()
        })
        .await
        .unwrap();
        assert_eq!(server.current_pid(), last);
        support::assert_fds_settle(last, first_fds, 30).await;
        server.stop().await;
    })
    .await
    .unwrap();
}

/// What answers at the socket's path is believed only if it runs as this
/// user or as root: a server of another user at the path (the real one was
/// down, and the directory lets others write) is not, whatever it says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_from_a_server_of_another_user_is_not_believed() {
    let setpriv = support::tool("setpriv");
    if !support::tools::is_root() {
        eprintln!("skipped: running a server as another user needs root");
        return;
    }
    timeout(BOUND, async {
        use std::os::unix::fs::PermissionsExt;
        let deploy = Deploy::new("control-impostor");
        std::fs::set_permissions(&deploy.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = deploy.dir.join("control.sock");
        // `hello` itself, run as nobody: it answers root's `status`.
        let mut impostor = tokio::process::Command::new(&setpriv)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&deploy.bin)
            .args(["--addr", "127.0.0.1:0", "--control-socket"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_until("the impostor's socket", Duration::from_secs(20), || {
            path.exists()
        })
        .await;
        let (ok, stdout, stderr) = cli(&["status", path.to_str().unwrap()]).await;
        assert!(!ok, "{stdout}");
        assert!(
            stderr.contains("the server runs as uid 65534") && stderr.contains("not believed"),
            "{stderr}"
        );
        let pid = impostor.id().unwrap();
        send_signal(pid, "TERM");
        impostor.wait().await.unwrap();
    })
    .await
    .unwrap();
}

/// A new generation that cannot have its control socket (here: the
/// deploy moved it somewhere it cannot be bound) tells nobody it is ready:
/// the old generation serves on, kills it at the ready timeout and reaps
/// it, and the next upgrade with a good binary works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_without_its_control_socket_never_says_ready() {
    timeout(BOUND, async {
        let (server, socket) = start("control-unready", &[]).await;
        let old = server.current_pid();
        let real = server.deploy.keep_real_binary();
        let unbindable = server.deploy.dir.join("missing-dir").join("control.sock");
        server.deploy.install_script(&format!(
            "#!/bin/sh\nfor a in \"$@\"; do shift; if [ \"$a\" = {old_path:?} ]; then set -- \"$@\" {new_path:?}; else set -- \"$@\" \"$a\"; fi; done\nexec {real:?} \"$@\"\n",
            old_path = socket.to_str().unwrap(),
            new_path = unbindable.to_str().unwrap(),
            real = real.to_str().unwrap(),
        ));
        send_signal(old, "HUP");
        server
            .wait_log("cannot become ready; the previous generation serves on", 1)
            .await;
        server.wait_log("upgrade failed; this generation keeps serving", 1).await;
        assert!(is_alive(old));
        assert_eq!(hello_from(server.addr).await, old, "the old generation serves on");
        assert!(unreaped_children_of(old).is_empty(), "the child was reaped");
        server.deploy.install_good();
        let (ok, reply, _) = cli(&["upgrade", socket.to_str().unwrap()]).await;
        assert!(ok, "{reply}");
        wait_exit("the old generation exits", old).await;
        server.stop().await;
    })
    .await
    .unwrap();
}
