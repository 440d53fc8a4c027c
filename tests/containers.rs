//! In a container, the old generation's exit can end the container, and the
//! new generation with it: when the server is PID 1, or when its parent is
//! an init that exits with its one child (tini, which Docker's `--init`
//! installs as `docker-init`; dumb-init; catatonit, Podman's `--init`), or
//! a shell running the entry script as PID 1. There an upgrade is refused,
//! with an error that says why, and the server goes on serving.
//!
//! Each test starts `hello` as a container does, in a pid namespace of its
//! own (`unshare`, from util-linux), under the real init, and signals it
//! the way `docker kill` does: to the namespace's PID 1, which forwards it.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{
    Deploy, Kept, Launch, Load, Server, children_of, namespace_pid, processes_from, send_signal,
    wait_until,
};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(60);

/// Who receives the operator's signals.
#[derive(Clone, Copy)]
enum SignalTo {
    /// The namespace's PID 1 (the init forwards them, as `docker kill`
    /// relies on).
    Init,
    /// The server itself (`docker exec .. kill`): a shell as PID 1 forwards
    /// nothing.
    Server,
}

/// Starts `hello` in a pid namespace under `init`, loads it, sends an
/// upgrade signal, and asserts that the upgrade is refused with `refusal`
/// in the log, that no request fails and no next generation starts; then
/// stops it with `SIGTERM` and asserts that the container ends cleanly.
async fn an_upgrade_is_refused_under(tag: &str, init: &[&str], to: SignalTo, refusal: &str) {
    let mut server = Server::launch(Deploy::new(tag), Launch::Container(init), &[], &[]).await;
    let [pid] = processes_from(&server.deploy.dir)[..] else {
        panic!("one server process: {}", server.log_text());
    };
    let unshare = server.first.id().unwrap();
    let [ns_init] = children_of(unshare)[..] else {
        panic!("unshare has one child, the namespace's PID 1");
    };
    if init.is_empty() {
        assert_eq!(ns_init, pid, "the server is PID 1");
    } else {
        assert_eq!(children_of(ns_init), vec![pid], "the server is its child");
    }
    let signal_to = match to {
        SignalTo::Init => ns_init,
        SignalTo::Server => pid,
    };

    let load = Load::start(server.addr, 4, "/");
    load.wait_answers(50).await;
    send_signal(signal_to, "HUP");
    server.wait_log("upgrade refused or failed", 1).await;
    let logs = server.log_text();
    assert!(logs.contains(refusal), "{logs}");
    assert!(
        !logs.contains("starting the next generation exe="),
        "{logs}"
    );
    // Serving goes on, from the same process, with no other started.
    load.wait_answers(50).await;
    assert_eq!(processes_from(&server.deploy.dir), vec![pid]);
    assert!(children_of(pid).is_empty(), "no next generation");
    let (ok, failed, pids) = load.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {ok} requests failed: {failed:?}",
        failed.len()
    );
    assert_eq!(pids.len(), 1, "one generation answered: {pids:?}");

    send_signal(signal_to, "TERM");
    let status = timeout(Duration::from_secs(20), server.first.wait())
        .await
        .expect("the container ends after SIGTERM")
        .unwrap();
    assert!(status.success(), "the container exited with {status}");
    wait_until(
        "every process of the container is gone",
        Duration::from_secs(20),
        || processes_from(&server.deploy.dir).is_empty(),
    )
    .await;
    server.wait_log("shutdown requested", 1).await;
}

#[tokio::test]
async fn as_pid_1_an_upgrade_is_refused_and_serving_goes_on() {
    timeout(
        BOUND,
        an_upgrade_is_refused_under("pid1", &[], SignalTo::Init, "refusing to upgrade as PID 1"),
    )
    .await
    .unwrap();
}

/// `docker run --init`.
#[tokio::test]
async fn under_tini_an_upgrade_is_refused_and_serving_goes_on() {
    timeout(
        BOUND,
        an_upgrade_is_refused_under(
            "tini",
            &["tini", "--"],
            SignalTo::Init,
            "refusing to upgrade: the parent process, tini (pid 1), exits when this process does",
        ),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn under_dumb_init_an_upgrade_is_refused_and_serving_goes_on() {
    timeout(
        BOUND,
        an_upgrade_is_refused_under(
            "dumb-init",
            &["dumb-init"],
            SignalTo::Init,
            "the parent process, dumb-init (pid 1), exits when this process does",
        ),
    )
    .await
    .unwrap();
}

/// `podman run --init`.
#[tokio::test]
async fn under_catatonit_an_upgrade_is_refused_and_serving_goes_on() {
    timeout(
        BOUND,
        an_upgrade_is_refused_under(
            "catatonit",
            &["catatonit", "--"],
            SignalTo::Init,
            "the parent process, catatonit (pid 1), exits when this process does",
        ),
    )
    .await
    .unwrap();
}

/// An entry script that starts the server without `exec`.
#[tokio::test]
async fn under_an_entry_script_as_pid_1_an_upgrade_is_refused_and_serving_goes_on() {
    timeout(
        BOUND,
        an_upgrade_is_refused_under(
            "entry-script",
            &["sh", "-c", "\"$0\" \"$@\"; echo the entry script goes on"],
            SignalTo::Server,
            "the parent process, sh (pid 1), exits when this process does",
        ),
    )
    .await
    .unwrap();
}

/// With `stable_parent`, an upgrade in a container works: restarts under
/// load lose no request, exactly one generation runs after each (plus the
/// stable parent, which reaps every old one), and `SIGTERM` to PID 1 drains
/// the last one and ends the container with its exit status, 0.
async fn restarts_under(tag: &str, init: &[&str]) {
    let mut kept = Kept::start(tag, init).await;
    let load = Load::start(kept.server.addr, 4, "/");
    load.wait_pid(namespace_pid(kept.generation())).await;
    for _ in 0..3 {
        let new = kept.restart().await;
        load.wait_pid(namespace_pid(new)).await;
        let mut running = processes_from(&kept.server.deploy.dir);
        running.sort_unstable();
        let mut expected = vec![kept.keeper, new];
        expected.sort_unstable();
        assert_eq!(running, expected, "the stable parent and one generation");
        kept.wait_reaped().await;
    }
    let (ok, failed, pids) = load.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {ok} failed: {failed:?}",
        failed.len()
    );
    assert_eq!(pids.len(), 4, "four generations answered: {pids:?}");

    kept.stop().await;
    kept.server
        .wait_log("no generation left; exiting status=exit status: 0", 1)
        .await;
    // Each signal reached one generation once: dumb-init signals the
    // stable parent's whole process group, which the generations are not in.
    let logs = kept.server.log_text();
    assert_eq!(logs.matches("upgrade requested").count(), 3, "{logs}");
    assert!(!logs.contains("upgrade refused or failed"), "{logs}");
}

#[tokio::test]
async fn with_a_stable_parent_as_pid_1_restarts_lose_nothing() {
    timeout(BOUND, restarts_under("kept-pid1", &[]))
        .await
        .unwrap();
}

#[tokio::test]
async fn with_a_stable_parent_under_tini_restarts_lose_nothing() {
    timeout(BOUND, restarts_under("kept-tini", &["tini", "--"]))
        .await
        .unwrap();
}

#[tokio::test]
async fn with_a_stable_parent_under_dumb_init_restarts_lose_nothing() {
    timeout(BOUND, restarts_under("kept-dumb-init", &["dumb-init"]))
        .await
        .unwrap();
}

/// A standby works under a stable parent: each restart goes to the current
/// generation's standby, the stable parent learns it from its `READY=1`
/// and reaps the old generation, and `SIGTERM` to PID 1 leaves nothing.
#[tokio::test]
async fn with_a_stable_parent_under_tini_restarts_go_to_the_standby() {
    timeout(BOUND, async {
        let mut kept =
            Kept::start_with("kept-standby", &["tini", "--"], &["--standby", "on"]).await;
        let load = Load::start(kept.server.addr, 4, "/");
        for _ in 0..3 {
            let generation = kept.generation();
            let mut standby = None;
            wait_until("the generation's standby", Duration::from_secs(20), || {
                standby = match children_of(generation)[..] {
                    [one] => Some(one),
                    _ => None,
                };
                standby.is_some()
            })
            .await;
            let new = kept.restart().await;
            assert_eq!(Some(new), standby, "the restart went to the standby");
            load.wait_pid(namespace_pid(new)).await;
            kept.wait_reaped().await;
        }
        load.stop_all_answered().await;
        kept.stop().await;
        kept.server
            .wait_log("handing the listeners to the standby", 3)
            .await;
        let logs = kept.server.log_text();
        assert_eq!(
            logs.matches("handing the listeners to the standby").count(),
            3,
            "{logs}"
        );
    })
    .await
    .unwrap();
}

/// A socket-activated container (Podman passes `LISTEN_FDS` to the
/// container's main process): the stable parent, PID 1 here, passes the
/// activated socket on to the first generation, and upgrades go on serving
/// it.
#[tokio::test]
async fn with_a_stable_parent_a_socket_activated_container_upgrades_on_its_socket() {
    timeout(BOUND, async {
        let reserved = support::ports::reserve();
        let port = reserved.port;
        let addr = format!("127.0.0.1:{port}");
        // systemd-socket-activate starts the server on the first connection.
        let activate = tokio::spawn(support::connect_when_listening(reserved.addr()));
        // It execs the server in its place: the server is PID 1.
        let init = [
            "systemd-socket-activate",
            "-l",
            &addr,
            "--fdname=http",
            "-E",
            "RUST_LOG=info",
        ];
        let server = Server::launch(
            Deploy::new("kept-activated"),
            Launch::Container(&init),
            &["--stable-parent", "on"],
            &[],
        )
        .await;
        drop(activate.await.unwrap());
        assert_eq!(server.addr.port(), port, "it serves the activated socket");
        let unshare = server.first.id().unwrap();
        let [ns_init] = children_of(unshare)[..] else {
            panic!("unshare has one child, the namespace's PID 1");
        };
        let mut kept = Kept {
            server,
            ns_init,
            keeper: ns_init,
        };
        let load = Load::start(kept.server.addr, 2, "/");
        load.wait_pid(namespace_pid(kept.generation())).await;
        for _ in 0..2 {
            let new = kept.restart().await;
            load.wait_pid(namespace_pid(new)).await;
        }
        load.stop_all_answered().await;
        kept.stop().await;
        let logs = kept.server.log_text();
        assert!(
            logs.contains("inherited listeners listeners=http=fd 3 from_previous_generation=false"),
            "the first generation adopted systemd's socket:\n{logs}"
        );
        assert!(!logs.contains("upgrade refused or failed"), "{logs}");
    })
    .await
    .unwrap();
}

/// A generation that dies (a crash, the OOM killer) ends the container with
/// its status, as it would without the stable parent, so that the
/// orchestrator restarts it.
#[tokio::test]
async fn a_stable_parent_exits_with_the_status_of_a_generation_that_died() {
    timeout(BOUND, async {
        let mut kept = Kept::start("kept-killed", &["tini", "--"]).await;
        let generation = kept.restart().await;
        send_signal(generation, "KILL");
        let status = timeout(Duration::from_secs(20), kept.server.first.wait())
            .await
            .expect("the container ends")
            .unwrap();
        assert_eq!(status.code(), Some(137), "128 + SIGKILL, through tini");
        assert!(processes_from(&kept.server.deploy.dir).is_empty());
    })
    .await
    .unwrap();
}

/// A new generation that dies while the old one still drains (here a
/// WebSocket holds the old one for its close grace) ends the container
/// with a failure once the old one has exited, not with the old one's 0:
/// an orchestrator that restarts containers on failure must restart it.
#[tokio::test]
async fn a_stable_parent_fails_when_the_new_generation_died_during_the_old_ones_drain() {
    timeout(BOUND, async {
        let mut kept = Kept::start_with(
            "kept-died-draining",
            &["tini", "--"],
            &["--close-grace", "2"],
        )
        .await;
        let old = kept.generation();
        // A client that never answers the Close holds the old generation
        // for the close grace.
        let (_ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", kept.server.addr))
            .await
            .unwrap();
        send_signal(kept.ns_init, "HUP");
        kept.server
            .wait_log("handed over; draining this generation", 1)
            .await;
        let [new] = children_of(old)[..] else {
            panic!("the new generation is the old one's child until it exits");
        };
        send_signal(new, "KILL");
        let status = timeout(Duration::from_secs(20), kept.server.first.wait())
            .await
            .expect("the container ends once the old generation has drained")
            .unwrap();
        assert_eq!(status.code(), Some(1), "a failure, through tini");
        assert!(processes_from(&kept.server.deploy.dir).is_empty());
        // Its last lines may still be on their way through the pipe.
        kept.server
            .wait_log(
                "the newest generation exited as another's child, its status unknown",
                1,
            )
            .await;
    })
    .await
    .unwrap();
}

/// Where an exit ends nothing (here the parent is this test), the setting
/// does nothing: the process started is the first generation, and it
/// upgrades as ever.
#[tokio::test]
async fn outside_a_container_a_stable_parent_is_not_kept() {
    timeout(BOUND, async {
        let server = Server::start_with(
            Deploy::new("not-kept"),
            &["--stable-parent", "on", "--ready-timeout", "5"],
            &[],
        )
        .await;
        assert_eq!(server.current_pid(), server.first.id().unwrap());
        let load = Load::start(server.addr, 4, "/");
        let new = server.restart().await;
        load.wait_pid(new).await;
        assert_eq!(processes_from(&server.deploy.dir), vec![new]);
        load.stop_all_answered().await;
        assert!(
            !server.log_text().contains("handover::keeper"),
            "no stable parent logged anything: {}",
            server.log_text()
        );
        server.stop().await;
    })
    .await
    .unwrap();
}

/// The stable parent believes only its generations: `READY=1` with
/// `MAINPID=1` (the container's init) sent to its notify socket by another
/// process (the test, from outside the container) is ignored, and the next
/// upgrade signal still reaches the real generation.
#[tokio::test]
async fn a_stable_parent_ignores_notify_messages_from_other_processes() {
    timeout(BOUND, async {
        use std::os::linux::net::SocketAddrExt;
        let mut kept = Kept::start("kept-forged", &["tini", "--"]).await;
        let generation = kept.generation();
        // Its address, from the generation's environment as it started.
        let environ = std::fs::read(format!("/proc/{generation}/environ")).unwrap();
        let socket = environ
            .split(|&byte| byte == 0)
            .find_map(|var| var.strip_prefix(b"NOTIFY_SOCKET=@"))
            .expect("the generation was given the stable parent's socket")
            .to_vec();
        let address = std::os::unix::net::SocketAddr::from_abstract_name(&socket).unwrap();
        let forger = std::os::unix::net::UnixDatagram::unbound().unwrap();
        forger
            .send_to_addr(b"READY=1\nMAINPID=1", &address)
            .unwrap();
        kept.server
            .wait_log("ignored a notify message from a process that is not one of this stable parent's generations", 1)
            .await;
        let new = kept.restart().await;
        assert_ne!(new, generation);
        kept.stop().await;
    })
    .await
    .unwrap();
}
