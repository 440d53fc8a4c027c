//! `Builder::standby` with real processes (`hello --standby on`): upgrades
//! hand the listeners to the waiting standby under load; a standby that is
//! stale, dead or not ready in time never costs a request; no standby
//! outlives its generation.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use support::{Deploy, Load, Server, children_of, is_reaped, send_signal, wait_exit, wait_until};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(120);

/// `hello`'s usual test settings, with a standby.
const ARGS: &[&str] = &[
    "--ready-timeout",
    "2",
    "--drain-timeout",
    "10",
    "--standby",
    "on",
];

/// The pid of the `n`th standby started (from 1), once it is.
async fn standby(server: &Server, n: usize) -> u32 {
    server.wait_log("standby started pid=", n).await;
    let log = server.log_text();
    let line = log
        .lines()
        .filter(|line| line.contains("standby started pid="))
        .nth(n - 1)
        .unwrap();
    line.split("pid=").nth(1).unwrap().trim().parse().unwrap()
}

fn count(server: &Server, text: &str) -> usize {
    server.log_text().matches(text).count()
}

/// Asserts that the server logged `text` exactly `n` times (`n` > 0), once
/// the lines logged so far have come through the pipe.
async fn assert_logged(server: &Server, text: &str, n: usize) {
    server.wait_log(text, n).await;
    assert_eq!(count(server, text), n, "{}", server.log_text());
}

/// Waits until the standby `pid` has been killed and has exited, and checks
/// that the server logged why, once.
async fn assert_passed_over(server: &Server, pid: u32, why: &str) {
    wait_exit("the standby passed over", pid).await;
    assert_logged(server, why, 1).await;
}

/// The device and inode of what `path` names.
fn identity(path: impl AsRef<std::path::Path>) -> (u64, u64) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.dev(), meta.ino())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_hand_the_listeners_to_the_waiting_standby_under_load() {
    timeout(BOUND, async {
        const RESTARTS: usize = 3;
        let server = Server::start_with(Deploy::new("standby-load"), ARGS, &[]).await;
        let load = Load::start(server.addr, 4, "/");
        let load_h2 = Load::start_with(server.addr, 2, "/", true);
        load.wait_answers(100).await;
        load_h2.wait_answers(100).await;

        for n in 1..=RESTARTS {
            let current = server.current_pid();
            let waiting = standby(&server, n).await;
            assert_eq!(
                children_of(current),
                vec![waiting],
                "the standby waits under its generation"
            );
            // Waiting means taking no connections: everything so far was
            // answered by the generations.
            assert!(!load.pids.lock().unwrap().contains(&waiting));
            let new = server.restart().await;
            assert_eq!(new, waiting, "restart {n} went to the standby");
            load.wait_pid(new).await;
            load_h2.wait_pid(new).await;
        }
        assert_logged(&server, "handing the listeners to the standby", RESTARTS).await;
        assert_eq!(count(&server, "starting the next generation exe="), 0);

        // The last generation's standby: SIGTERM ends it too.
        let last = standby(&server, RESTARTS + 1).await;
        load.stop_all_answered().await;
        load_h2.stop_all_answered().await;
        let log = server.logs.clone();
        // No process is left behind, the standby included.
        server.stop().await;
        assert!(is_reaped(last), "the standby was reaped");
        wait_until(
            "the shutdown discarded the standby",
            Duration::from_secs(10),
            || {
                log.lock()
                    .unwrap()
                    .contains(&format!("standby discarded pid={last}"))
            },
        )
        .await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_replaced_binary_is_started_afresh_and_its_stale_standby_killed() {
    timeout(BOUND, async {
        let server = Server::start_with(Deploy::new("standby-binary"), ARGS, &[]).await;
        let stale = standby(&server, 1).await;
        // A deploy: a new file renamed over the binary's path.
        server.deploy.install_good();
        let load = Load::start(server.addr, 2, "/");
        load.wait_answers(50).await;

        let new = server.restart().await;
        assert_ne!(new, stale);
        assert_eq!(
            identity(format!("/proc/{new}/exe")),
            identity(&server.deploy.bin),
            "the new generation runs the new binary"
        );
        assert_passed_over(&server, stale, "the binary has changed").await;
        load.wait_pid(new).await;
        load.stop_all_answered().await;
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_release_in_another_directory_is_started_there_not_in_the_standby() {
    timeout(BOUND, async {
        let deploy = Deploy::releases("standby-release");
        // v2 is the same file as v1 (a hard link): only the directory
        // tells the standby, started in v1, from a fresh start in v2.
        deploy.add_release("v2");
        let v2 = deploy.dir.join("releases/v2");
        std::fs::remove_file(v2.join("hello")).unwrap();
        std::fs::hard_link(deploy.dir.join("releases/v1/hello"), v2.join("hello")).unwrap();
        let server = Server::start_with(deploy, ARGS, &[]).await;
        let stale = standby(&server, 1).await;
        server.deploy.point_current_at("v2");

        let new = server.restart().await;
        assert_ne!(new, stale);
        assert_eq!(identity(format!("/proc/{new}/cwd")), identity(&v2));
        assert_passed_over(&server, stale, "the working directory has changed").await;
        server.stop().await;
    })
    .await
    .unwrap();
}

/// Where this process loaded `name` from (a shared library it links).
fn loaded_library(name: &str) -> std::path::PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let path = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with(&format!("/{name}")))
        .unwrap_or_else(|| panic!("this test links {name}"));
    path.into()
}

#[tokio::test]
async fn a_replaced_shared_library_is_loaded_afresh_not_kept_from_the_standby() {
    timeout(BOUND, async {
        // hello loads libgcc_s from the deploy's own directory, as a server
        // loads libssl from the system's; a package upgrade renames a new
        // file over it.
        const LIB: &str = "libgcc_s.so.1";
        let deploy = Deploy::new("standby-library");
        let libs = deploy.dir.join("lib");
        std::fs::create_dir(&libs).unwrap();
        let install = || {
            std::fs::copy(loaded_library(LIB), libs.join("new.so")).unwrap();
            std::fs::rename(libs.join("new.so"), libs.join(LIB)).unwrap();
        };
        install();
        let library_path = libs.to_str().unwrap().to_owned();
        let server =
            Server::start_with(deploy, ARGS, &[("LD_LIBRARY_PATH", library_path.as_str())]).await;
        let stale = standby(&server, 1).await;
        let ours = libs.join(LIB).to_str().unwrap().to_owned();
        let maps = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        // The loader maps it as the standby starts up, after it is spawned
        // (and logged).
        wait_until(
            &format!("the standby loads {ours}"),
            Duration::from_secs(20),
            || maps(stale).contains(&ours),
        )
        .await;
        install();

        let new = server.restart().await;
        assert_ne!(new, stale);
        assert!(maps(new).contains(&ours));
        assert!(!maps(new).contains(" (deleted)"), "{}", maps(new));
        let why = format!("a file it has mapped, {ours}, has been replaced or deleted");
        assert_passed_over(&server, stale, &why).await;
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_standby_that_died_is_replaced_by_a_fresh_start() {
    timeout(BOUND, async {
        let server = Server::start_with(Deploy::new("standby-died"), ARGS, &[]).await;
        let dead = standby(&server, 1).await;
        send_signal(dead, "KILL");
        wait_exit("the killed standby", dead).await;

        let new = server.restart().await;
        assert_ne!(new, dead);
        assert_logged(&server, "starting the next generation exe=", 1).await;
        // Found dead, or (not reaped yet) found unreachable: either way it
        // was passed over once.
        assert_eq!(
            count(&server, "the standby exited before the upgrade")
                + count(&server, "the standby could not be reached"),
            1,
            "{}",
            server.log_text()
        );
        // The new generation keeps a standby of its own.
        let next = standby(&server, 2).await;
        assert_eq!(children_of(new), vec![next]);
        server.stop().await;
    })
    .await
    .unwrap();
}

/// A standby that never reads the listeners (stopped here; one that a
/// signal to the whole process group killed at the same moment is alike)
/// is killed at the ready timeout, and the same upgrade starts afresh.
#[tokio::test]
async fn a_standby_that_never_takes_the_listeners_is_replaced_within_the_upgrade() {
    timeout(BOUND, async {
        let args = ["--ready-timeout", "1", "--standby", "on"];
        let server = Server::start_with(Deploy::new("standby-stopped"), &args, &[]).await;
        let stopped = standby(&server, 1).await;
        send_signal(stopped, "STOP");
        let load = Load::start(server.addr, 2, "/");
        load.wait_answers(50).await;

        let new = server.restart().await;
        assert_ne!(new, stopped);
        assert_passed_over(&server, stopped, "the standby did not take the listeners").await;
        assert_eq!(count(&server, "upgrade failed"), 0);
        load.wait_pid(new).await;
        load.stop_all_answered().await;
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_standby_not_ready_in_time_is_killed_and_the_generation_serves_on() {
    timeout(BOUND, async {
        // Every generation warms up until the gate opens, and an upgrade
        // allows it 1 s: the standby, woken with the gate closed, misses it.
        let deploy = Deploy::new("standby-slow");
        let gate = deploy.gate();
        let args = [
            "--ready-timeout",
            "1",
            "--warmup-until",
            gate.arg(),
            "--standby",
            "on",
        ];
        let server = Server::start_with(deploy, &args, &[]).await;
        let old = server.current_pid();
        let slow = standby(&server, 1).await;
        gate.close();
        let load = Load::start(server.addr, 2, "/");
        load.wait_answers(50).await;

        send_signal(old, "HUP");
        server.wait_log("was not ready within 1s", 1).await;
        wait_exit("the standby that was not ready", slow).await;
        // Still serving, and ready for the next upgrade with a new standby.
        let next = standby(&server, 2).await;
        assert_ne!(next, slow);
        assert_eq!(server.current_pid(), old);
        // It had taken the listeners: the failure was its own, and was not
        // tried again afresh.
        assert_eq!(
            count(&server, "upgrade failed; this generation keeps serving"),
            1
        );
        assert_eq!(count(&server, "the standby did not take the listeners"), 0);
        load.wait_answers(50).await;
        let (_, failed, pids) = load.stop().await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(pids.into_iter().collect::<Vec<_>>(), vec![old]);
        server.stop().await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_standby_exits_by_itself_when_its_generation_is_killed() {
    timeout(BOUND, async {
        let server = Server::start_with(Deploy::new("standby-orphan"), ARGS, &[]).await;
        let generation = server.current_pid();
        let waiting = standby(&server, 1).await;
        send_signal(generation, "KILL");
        wait_exit("the killed generation", generation).await;
        // End of file on its socket: it exits, as no upgrade will come.
        wait_exit("the orphaned standby", waiting).await;
    })
    .await
    .unwrap();
}
