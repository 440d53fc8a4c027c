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

use support::{Deploy, Launch, Load, Server, children_of, processes_from, send_signal, wait_until};
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
    assert!(!logs.contains("starting the next generation"), "{logs}");
    // Serving goes on, from the same process, with no other started.
    load.wait_answers(50).await;
    assert_eq!(processes_from(&server.deploy.dir), vec![pid]);
    assert!(children_of(pid).is_empty(), "no next generation");
    let (_, _, pids) = load.stop().await;
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
