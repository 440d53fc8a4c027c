//! State handed to the next generation, with `examples/state` (a request
//! count and the generations' pids): real processes, every process ended
//! by the test.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{Deploy, Kept, Server, namespace_pid, processes_from, send_signal, wait_exit};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(110);

/// `GET /` from the server at `addr`: (pid, request number, generations).
async fn count(addr: std::net::SocketAddr) -> (u32, u64, Vec<u32>) {
    let body = support::get_body(addr).await;
    // "pid P: request N, generations a,b,c"
    let (pid, rest) = body
        .strip_prefix("pid ")
        .and_then(|b| b.split_once(": request "))
        .unwrap_or_else(|| panic!("{body}"));
    let (n, generations) = rest.split_once(", generations ").unwrap();
    (
        pid.parse().unwrap(),
        n.parse().unwrap(),
        generations.split(',').map(|p| p.parse().unwrap()).collect(),
    )
}

/// Upgrades `server` ten times with `restart`, checking after each that
/// the count goes on where the last generation left it and the pids of the
/// generations arrived in order; `pid_of` makes a pid as the server sees
/// it.
async fn ten_generations<F, Fut>(addr: std::net::SocketAddr, mut restart: F, pid_of: fn(u32) -> u32)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u32>,
{
    let (first, n, generations) = count(addr).await;
    assert_eq!((n, generations.clone()), (1, vec![first]));
    let (_, n, _) = count(addr).await;
    assert_eq!(n, 2);
    let mut expected = vec![first];
    let mut requests = 2;
    for _ in 0..10 {
        let new = pid_of(restart().await);
        expected.push(new);
        requests += 1;
        let (pid, n, generations) = count(addr).await;
        assert_eq!(pid, new, "the new generation answers");
        assert_eq!(n, requests, "the count arrived whole");
        assert_eq!(generations, expected, "and the generations in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_handed_across_ten_generations_arrives_whole_and_in_order() {
    timeout(BOUND, async {
        let server = Server::start_with(Deploy::of("state-ten", "state"), &[], &[]).await;
        ten_generations(server.addr, || server.restart(), |pid| pid).await;
        server.stop().await;
    })
    .await
    .unwrap();
}

/// The same, each upgrade waking a standby, which receives the state in
/// its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_standby_the_count_arrives_whole_and_in_order() {
    timeout(BOUND, async {
        let server = Server::start_with(
            Deploy::of("state-standby", "state"),
            &["--standby", "on"],
            &[],
        )
        .await;
        let mut started = 0;
        let serving = &server;
        ten_generations(
            server.addr,
            || {
                started += 1;
                let standbys = started;
                async move {
                    serving.wait_log("standby started", standbys).await;
                    serving.restart().await
                }
            },
            |pid| pid,
        )
        .await;
        assert_eq!(
            server
                .log_text()
                .matches("handing the listeners to the standby")
                .count(),
            10,
            "every upgrade woke a standby"
        );
        server.stop().await;
    })
    .await
    .unwrap();
}

/// The same under a stable parent in a container (tini as PID 1), where
/// the server sees its pid in the container's namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_stable_parent_the_count_arrives_whole_and_in_order() {
    timeout(BOUND, async {
        let mut kept =
            Kept::start_deploy(Deploy::of("state-kept", "state"), &["tini", "--"], &[]).await;
        let addr = kept.server.addr;
        let kept_ref = &kept;
        ten_generations(addr, || kept_ref.restart(), namespace_pid).await;
        kept.stop().await;
    })
    .await
    .unwrap();
}

/// A snapshot over the size limit, and one that panics: the upgrade fails
/// with the reason, and the old generation serves on, its count whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_or_panicking_snapshot_fails_the_upgrade_and_serving_goes_on() {
    timeout(BOUND, async {
        for (args, says) in [
            (
                &["--max-state-size", "64", "--pad", "100"][..],
                "handing state to the next generation: the snapshot is 113 bytes, more than the limit of 64",
            ),
            (
                &["--panic-in-snapshot", "on"][..],
                "handing state to the next generation: the snapshot panicked: the snapshot panics, as asked",
            ),
        ] {
            let server = Server::start_with(Deploy::of("state-broken", "state"), args, &[]).await;
            let old = server.current_pid();
            let (_, n, _) = count(server.addr).await;
            assert_eq!(n, 1);
            send_signal(old, "HUP");
            server.wait_log("upgrade refused or failed", 1).await;
            let logs = server.log_text();
            assert!(logs.contains(says), "{logs}");
            assert!(!logs.contains("upgrade: starting the next generation"), "{logs}");
            let (pid, n, _) = count(server.addr).await;
            assert_eq!((pid, n), (old, 2), "the old generation serves on");
            assert_eq!(processes_from(&server.deploy.dir), vec![old]);
            server.stop().await;
        }
    })
    .await
    .unwrap();
}

/// The old generation SIGKILLed while it takes its snapshot: no next
/// generation was started (nor a standby woken) with half of it; the
/// standby, which has taken nothing, exits by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_killed_while_taking_its_snapshot_hands_nothing_over() {
    timeout(BOUND, async {
        for args in [
            &["--snapshot-delay-ms", "3000"][..],
            &["--snapshot-delay-ms", "3000", "--standby", "on"][..],
        ] {
            let server = Server::start_with(Deploy::of("state-killed", "state"), args, &[]).await;
            let old = server.current_pid();
            if args.contains(&"--standby") {
                server.wait_log("standby started", 1).await;
            }
            send_signal(old, "HUP");
            // In its snapshot, which takes 3 s.
            server.wait_log("taking the snapshot", 1).await;
            send_signal(old, "KILL");
            wait_exit("the killed generation", old).await;
            // A standby, if there is one, exits by itself; then the log
            // pipes end, and every line logged can be looked at.
            let logs = server.all_logs().await;
            assert!(processes_from(&server.deploy.dir).is_empty(), "{logs}");
            assert!(!logs.contains("state taken generation=2"), "{logs}");
            assert!(!logs.contains("handing the listeners"), "{logs}");
            assert!(!logs.contains("starting the next generation"), "{logs}");
        }
    })
    .await
    .unwrap();
}
