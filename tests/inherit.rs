//! The inheritance protocol from outside: malformed environments, systemd
//! socket activation and sd_notify, with the `hello` example as the server.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::ports::reserve;
use support::{Deploy, children_of, send_signal, wait_exit, wait_until};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(60);

/// Runs `hello` through `sh -c` (to lay out fds) with `env`; returns its
/// exit success and everything it printed.
async fn run_hello(shell_redirects: &str, env: &[(&str, &str)]) -> (bool, String) {
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(format!("exec \"$0\" --addr 127.0.0.1:0 {shell_redirects}"))
        .arg(support::hello_binary())
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = timeout(Duration::from_secs(20), command.output())
        .await
        .expect("a malformed environment ends the process at once")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn malformed_environments_are_clear_errors_not_panics() {
    // A file that is not a socket, for the fds that must be one.
    let deploy = Deploy::new("malformed");
    let file = deploy.dir.join("not-a-socket");
    std::fs::write(&file, "a file").unwrap();
    let not_a_socket = |fd: u32| format!("{fd}<{}", file.display());
    let (three, five) = (not_a_socket(3), not_a_socket(5));
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case<'_>] = &[
        (
            "",
            &[("LISTEN_FDS", "abc")],
            "LISTEN_FDS=\"abc\": not a number of fds",
        ),
        (
            &three,
            &[("LISTEN_FDS", "1")],
            "inherited fd 3 named \"unknown\": it is not a socket",
        ),
        (
            "3<&-",
            &[("LISTEN_FDS", "1")],
            "inherited fd 3 named \"unknown\": it is not open",
        ),
        (
            "",
            &[("LISTEN_FDS", "1"), ("LISTEN_PID", "1")],
            "LISTEN_PID=\"1\": the listeners are meant for pid 1",
        ),
        (
            "",
            &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "http:admin")],
            "2 names for 1 fds",
        ),
        (
            "",
            &[("HANDOVER_READY_FD", "1")],
            "HANDOVER_READY_FD=\"1\": must be an fd of its own",
        ),
        (
            &five,
            &[("HANDOVER_READY_FD", "5")],
            "inherited fd 5 named \"HANDOVER_READY_FD\": it is not a socket or a pipe",
        ),
        (
            "",
            &[
                ("LISTEN_FDS", "1"),
                ("LISTEN_FDNAMES", "http"),
                ("HANDOVER_BOUND_FDNAMES", "admin"),
            ],
            "HANDOVER_BOUND_FDNAMES=\"admin\": \"admin\" is not among the inherited listeners' names",
        ),
        (
            "",
            &[("HANDOVER_GENERATION", "1x")],
            "HANDOVER_GENERATION=\"1x\": not a generation number (2 to 9223372036854775807)",
        ),
        (
            "",
            &[("HANDOVER_STANDBY_FD", "abc")],
            "HANDOVER_STANDBY_FD=\"abc\": not an fd number",
        ),
        (
            &three,
            &[("HANDOVER_STANDBY_FD", "3")],
            "HANDOVER_STANDBY_FD=\"3\": it is not a socket",
        ),
        (
            "3<&-",
            &[("HANDOVER_STANDBY_FD", "3")],
            "HANDOVER_STANDBY_FD=\"3\": it is not open",
        ),
    ];
    for (redirects, env, expected) in cases {
        let (ok, text) = run_hello(redirects, env).await;
        assert!(!ok, "{env:?} {redirects}: should fail\n{text}");
        assert!(
            text.contains(expected),
            "{env:?} {redirects}: expected {expected:?} in\n{text}"
        );
        assert!(!text.contains("panicked"), "{env:?}: no panic\n{text}");
        assert!(
            !text.contains("listening"),
            "{env:?}: nothing was bound instead\n{text}"
        );
    }
}

/// Connects once the activator listens on `port` (the connection triggers
/// the activation).
async fn connect_when_listening(port: u16) -> tokio::net::TcpStream {
    support::connect_when_listening(([127, 0, 0, 1], port).into()).await
}

/// Waits for the activator, which execs `hello` and so is the first
/// generation: it exits 0, whether it handed over or shut down.
async fn assert_exits_cleanly(activator: &mut tokio::process::Child) {
    let status = timeout(Duration::from_secs(20), activator.wait())
        .await
        .expect("the first generation exits")
        .unwrap();
    assert!(
        status.success(),
        "the first generation exited with {status}"
    );
}

/// The body of `GET /` on 127.0.0.1:`port`.
async fn get(port: u16) -> String {
    support::get_body(([127, 0, 0, 1], port).into()).await
}

/// Under `systemd-socket-activate` (Debian's `systemd` package), with an
/// sd_notify socket of the test's own: the activated socket is adopted, an
/// upgrade hands it on, and systemd hears READY, RELOADING, MAINPID and
/// STOPPING as a `Type=notify` unit with `NotifyAccess=all` would.
#[tokio::test]
async fn systemd_socket_activation_and_notifications() {
    timeout(BOUND, async {
        let deploy = Deploy::new("systemd");
        let notify = Notifications::bind(&deploy);
        let reserved = reserve();
        let port = reserved.port;
        let (mut activator, _log) = activated_hello(&deploy, port, port, &[&notify.var], &[]).await;
        let first = activator.id().unwrap();
        let body = get(port).await;
        assert_eq!(
            body,
            format!("hello from {first}"),
            "the activated socket is served"
        );

        assert_eq!(notify.next().await, format!("READY=1\nMAINPID={first}"));

        send_signal(first, "HUP");
        assert_reloading(&notify.next().await);
        let ready = notify.next().await;
        let second: u32 = ready
            .strip_prefix("READY=1\nMAINPID=")
            .unwrap_or_else(|| panic!("READY from the new generation, got {ready:?}"))
            .parse()
            .unwrap();
        assert_ne!(second, first);
        wait_exit("the first generation exits", first).await;
        assert_eq!(get(port).await, format!("hello from {second}"), "handed on");

        send_signal(second, "TERM");
        assert_eq!(notify.next().await, "STOPPING=1");
        wait_exit("the second generation exits", second).await;
        assert_exits_cleanly(&mut activator).await;
    })
    .await
    .unwrap();
}

/// Under systemd with a standby: the standby takes over the socket systemd
/// passed and keeps it where the `.socket` unit put it (the message says
/// that no generation bound it), and systemd hears the new main pid from
/// the standby itself.
#[tokio::test]
async fn a_standby_takes_over_a_socket_systemd_passed_and_systemd_hears_it() {
    timeout(BOUND, async {
        let deploy = Deploy::new("systemd-standby");
        let notify = Notifications::bind(&deploy);
        let reserved = (reserve(), reserve());
        let (passed, asked) = (reserved.0.port, reserved.1.port);
        let (mut activator, log) =
            activated_hello(&deploy, passed, asked, &[&notify.var], &["--standby", "on"]).await;
        let first = activator.id().unwrap();
        assert_eq!(notify.next().await, format!("READY=1\nMAINPID={first}"));
        let mut standby = None;
        wait_until("the standby", Duration::from_secs(20), || {
            standby = children_of(first).first().copied();
            standby.is_some()
        })
        .await;
        let standby = standby.unwrap();

        send_signal(first, "HUP");
        assert_reloading(&notify.next().await);
        assert_eq!(
            notify.next().await,
            format!("READY=1\nMAINPID={standby}"),
            "the standby is the new main process"
        );
        wait_exit("the first generation exits", first).await;
        assert_eq!(get(passed).await, format!("hello from {standby}"));
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", asked)).await;
        assert!(refused.is_err(), "nothing bound in its place: {refused:?}");

        send_signal(standby, "TERM");
        assert_eq!(notify.next().await, "STOPPING=1");
        wait_exit("the second generation exits", standby).await;
        assert_exits_cleanly(&mut activator).await;
        let log = log.await.unwrap();
        assert_eq!(
            log.matches("listener passed by systemd is bound elsewhere than asked; keeping it")
                .count(),
            2,
            "by both generations:\n{log}"
        );
        assert!(
            log.contains("handing the listeners to the standby"),
            "{log}"
        );
    })
    .await
    .unwrap();
}

/// An inherited listener whose name and address both differ from what the
/// application asks for is not silently replaced: the bind on the port it
/// holds fails, and the error lists every inherited fd with its name and
/// address.
#[tokio::test]
async fn an_inherited_listener_whose_name_and_address_disagree_is_a_clear_error() {
    timeout(BOUND, async {
        let deploy = Deploy::new("disagree");
        let reserved = reserve();
        let port = reserved.port;
        // Asked on every address, passed on loopback only: the port is taken.
        let (mut activator, log) =
            activate(&deploy, &[port], Some("other"), &format!("0.0.0.0:{port}"), &[], &[]).await;
        let status = timeout(Duration::from_secs(20), activator.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(!status.success());
        let log = log.await.unwrap();
        assert!(
            log.contains(&format!(
                "binding listener \"http\" to [0.0.0.0:{port}] (inherited: fd 3 \"other\" on 127.0.0.1:{port})"
            )),
            "{log}"
        );
        assert!(!log.contains("panicked"), "{log}");
    })
    .await
    .unwrap();
}

/// The way most people run socket activation: no names at all
/// (`systemd-socket-activate` without `--fdname`, tools that pass none),
/// or the name systemd gives an fd of a `.socket` unit without
/// `FileDescriptorName=` (the unit's). The listener bound where the
/// application asks is adopted, with a log line that says so, and the next
/// generation receives it under the application's name.
#[tokio::test]
async fn an_unnamed_or_unit_named_socket_is_adopted_by_its_address() {
    timeout(BOUND, async {
        for fdname in [None, Some("hello.socket")] {
            let deploy = Deploy::new("unnamed");
            let reserved = reserve();
        let port = reserved.port;
            let addr = format!("127.0.0.1:{port}");
            let (mut activator, log) = activate(&deploy, &[port], fdname, &addr, &[], &[]).await;
            let first = activator.id().unwrap();
            assert_eq!(get(port).await, format!("hello from {first}"), "{fdname:?}");
            send_signal(first, "HUP");
            wait_exit("the first generation exits", first).await;
            let second = deploy.read_pid().unwrap();
            assert_eq!(get(port).await, format!("hello from {second}"), "handed on");
            send_signal(second, "TERM");
            wait_exit("the second generation exits", second).await;
            assert_exits_cleanly(&mut activator).await;
            let log = log.await.unwrap();
            let passed_as = fdname.unwrap_or("unknown");
            assert!(
                log.contains(&format!(
                    "adopting an inherited listener passed under another name: it is bound where this one is asked to be fd=3 passed_as=\"{passed_as}\" name=\"http\" address={addr}"
                )),
                "{fdname:?}: the first generation says which fd it adopted and why\n{log}"
            );
            assert_eq!(
                log.matches("adopting an inherited listener").count(),
                1,
                "the second generation finds it by name\n{log}"
            );
            assert!(!log.contains("Address already in use"), "{log}");
        }
    })
    .await
    .unwrap();
}

/// Two unnamed sockets: the one bound where the application asks is
/// adopted, the other is closed as one the application did not take.
#[tokio::test]
async fn of_two_unnamed_sockets_the_one_at_the_address_asked_for_is_adopted() {
    timeout(BOUND, async {
        let deploy = Deploy::new("unnamed-two");
        let reserved = (reserve(), reserve());
        let (other, asked) = (reserved.0.port, reserved.1.port);
        let (mut activator, log) =
            activate(&deploy, &[other, asked], None, &format!("127.0.0.1:{asked}"), &[], &[]).await;
        let pid = activator.id().unwrap();
        assert_eq!(get(asked).await, format!("hello from {pid}"));
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", other)).await;
        assert!(refused.is_err(), "the other socket was closed: {refused:?}");
        send_signal(pid, "TERM");
        wait_exit("the server exits", pid).await;
        assert_exits_cleanly(&mut activator).await;
        let log = log.await.unwrap();
        assert!(log.contains("fd=4 passed_as=\"unknown\" name=\"http\""), "{log}");
        assert!(
            log.contains("inherited listener was not taken by the application; closing it name=\"unknown\" fd=3"),
            "{log}"
        );
    })
    .await
    .unwrap();
}

/// A socket systemd passed is systemd's: a shutdown leaves it open (under
/// a `.socket` unit, the next start accepts what queued meanwhile), while
/// the request in flight finishes.
#[tokio::test]
async fn a_socket_systemd_passed_stays_open_during_a_shutdown_drain() {
    timeout(BOUND, async {
        let deploy = Deploy::new("systemd-term");
        let notify = Notifications::bind(&deploy);
        let reserved = reserve();
        let port = reserved.port;
        let (mut activator, _log) = activated_hello(&deploy, port, port, &[&notify.var], &[]).await;
        let pid = activator.id().unwrap();
        assert_eq!(notify.next().await, format!("READY=1\nMAINPID={pid}"));
        let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut slow,
            b"GET /sleep/1500 HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await
        .unwrap();
        send_signal(pid, "TERM");
        assert_eq!(notify.next().await, "STOPPING=1");
        for attempt in 0..5 {
            let queued = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
            assert!(
                queued.is_ok(),
                "attempt {attempt}: still listening: {queued:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut response = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut slow, &mut response)
            .await
            .unwrap();
        assert!(
            response.ends_with(&format!("slept 1500 in {pid}")),
            "{response}"
        );
        wait_exit("the server exits", pid).await;
        assert_exits_cleanly(&mut activator).await;
    })
    .await
    .unwrap();
}

/// Listeners passed but never taken by the application are reported and
/// closed once it is ready: they stop accepting connections.
#[tokio::test]
async fn inherited_listeners_the_application_does_not_take_are_closed_when_ready() {
    timeout(BOUND, async {
        let reserved = (reserve(), reserve());
        let (port, extra) = (reserved.0.port, reserved.1.port);
        let mut activator = tokio::process::Command::new(support::tool("systemd-socket-activate"))
            .arg("-l")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-l")
            .arg(format!("127.0.0.1:{extra}"))
            .arg("--fdname=http:extra")
            .args(["-E", "RUST_LOG=info"])
            .arg(support::hello_binary())
            .arg("--addr")
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        drop(connect_when_listening(port).await);
        let pid = activator.id().unwrap();
        assert_eq!(get(port).await, format!("hello from {pid}"));
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", extra)).await;
        assert!(refused.is_err(), "the unused listener was closed: {refused:?}");

        send_signal(pid, "TERM");
        let status = timeout(Duration::from_secs(20), activator.wait()).await.unwrap().unwrap();
        assert!(status.success());
        let mut stdout = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut activator.stdout.take().unwrap(), &mut stdout)
            .await
            .unwrap();
        assert!(
            stdout.contains("inherited listener was not taken by the application; closing it name=\"extra\" fd=4"),
            "{stdout}"
        );
    })
    .await
    .unwrap();
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` that `Type=notify-reload`
/// requires: `CLOCK_MONOTONIC` now, in microseconds, which on a machine
/// that has not been suspended is close to its uptime.
fn assert_reloading(message: &str) {
    let usec: u64 = message
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("RELOADING=1 with MONOTONIC_USEC=, got {message:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("a number of microseconds: {message:?}"));
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let uptime_usec = (uptime * 1e6) as u64;
    assert!(
        usec > 0 && usec <= uptime_usec + 1_000_000,
        "MONOTONIC_USEC={usec}, uptime {uptime_usec} µs"
    );
}

/// A `NOTIFY_SOCKET` of the test's own, as systemd's: `var` passes it.
struct Notifications {
    socket: tokio::net::UnixDatagram,
    var: String,
}

impl Notifications {
    fn bind(deploy: &Deploy) -> Self {
        let path = deploy.dir.join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        let var = format!("NOTIFY_SOCKET={}", path.display());
        Self { socket, var }
    }

    /// The next notification, within 20 s.
    async fn next(&self) -> String {
        let mut buf = vec![0u8; 4096];
        let n = timeout(Duration::from_secs(20), self.socket.recv(&mut buf))
            .await
            .expect("a notification")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

/// Starts `hello --addr 127.0.0.1:{asked}` and `args` under
/// `systemd-socket-activate` listening on `passed` (named `http`), with
/// `env`; triggers the activation. Returns the activator (which execs
/// `hello`, so its pid is the first generation's) and the log it will
/// print.
async fn activated_hello(
    deploy: &Deploy,
    passed: u16,
    asked: u16,
    env: &[&str],
    args: &[&str],
) -> (tokio::process::Child, tokio::task::JoinHandle<String>) {
    let asked = format!("127.0.0.1:{asked}");
    activate(deploy, &[passed], Some("http"), &asked, env, args).await
}

/// Starts `hello --addr {asked}` and `args` under `systemd-socket-activate`
/// listening on each of `ports` (on 127.0.0.1, with `fdname` if given),
/// with `env`; triggers the activation on the first port. Returns the
/// activator (which execs `hello`, so its pid is the first generation's)
/// and everything it will print.
async fn activate(
    deploy: &Deploy,
    ports: &[u16],
    fdname: Option<&str>,
    asked: &str,
    env: &[&str],
    args: &[&str],
) -> (tokio::process::Child, tokio::task::JoinHandle<String>) {
    let mut command = tokio::process::Command::new(support::tool("systemd-socket-activate"));
    for port in ports {
        command.arg("-l").arg(format!("127.0.0.1:{port}"));
    }
    if let Some(fdname) = fdname {
        command.arg(format!("--fdname={fdname}"));
    }
    command.args(["-E", "RUST_LOG=info"]);
    for var in env {
        command.args(["-E", var]);
    }
    let mut activator = command
        .arg(&deploy.bin)
        .arg("--addr")
        .arg(asked)
        .arg("--pid-file")
        .arg(&deploy.pid_file)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = activator.stdout.take().unwrap();
    let mut stderr = activator.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let (mut out, mut err) = (String::new(), String::new());
        let _ = tokio::join!(
            tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut out),
            tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut err)
        );
        out + &err
    });
    drop(connect_when_listening(ports[0]).await);
    (activator, log)
}

/// A listener a previous generation bound itself follows the address the
/// application asks for now (a reload with a new port): bound afresh
/// there, the old socket closed; the generation after it keeps the new
/// one. One that systemd passed stays where its `.socket` unit put it.
#[tokio::test]
async fn a_listener_a_generation_bound_follows_a_new_address_and_a_systemd_one_stays() {
    timeout(BOUND, async {
        // As a previous generation that bound `http` on `old` passes it.
        let deploy = Deploy::new("moved");
        let reserved = (reserve(), reserve());
        let (old, new) = (reserved.0.port, reserved.1.port);
        let (mut activator, log) =
            activated_hello(&deploy, old, new, &["HANDOVER_BOUND_FDNAMES=http"], &[]).await;
        let first = activator.id().unwrap();
        drop(connect_when_listening(new).await);
        assert_eq!(get(new).await, format!("hello from {first}"));
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", old)).await;
        assert!(refused.is_err(), "the old socket is closed: {refused:?}");

        // The next generation inherits the new socket and keeps it.
        send_signal(first, "HUP");
        wait_exit("the first generation exits", first).await;
        let second = deploy.read_pid().unwrap();
        assert_ne!(second, first);
        assert_eq!(get(new).await, format!("hello from {second}"));
        send_signal(second, "TERM");
        wait_exit("the second generation exits", second).await;
        assert_exits_cleanly(&mut activator).await;
        let log = log.await.unwrap();
        assert_eq!(
            log.matches("listener moved to the address asked for")
                .count(),
            1,
            "moved once, by the first generation:\n{log}"
        );
        assert!(
            log.contains(&format!("was=127.0.0.1:{old} now=Some(127.0.0.1:{new})")),
            "{log}"
        );

        // Passed by systemd: kept, with a warning.
        let deploy = Deploy::new("activated-elsewhere");
        let reserved = (reserve(), reserve());
        let (passed, asked) = (reserved.0.port, reserved.1.port);
        let (mut activator, log) = activated_hello(&deploy, passed, asked, &[], &[]).await;
        let pid = activator.id().unwrap();
        assert_eq!(get(passed).await, format!("hello from {pid}"));
        let refused = tokio::net::TcpStream::connect(("127.0.0.1", asked)).await;
        assert!(refused.is_err(), "nothing bound in its place: {refused:?}");
        send_signal(pid, "TERM");
        let status = timeout(Duration::from_secs(20), activator.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
        let log = log.await.unwrap();
        assert!(
            log.contains("listener passed by systemd is bound elsewhere than asked; keeping it"),
            "{log}"
        );
    })
    .await
    .unwrap();
}
