//! What the benchmark examples share: starting `examples/hello` as a real
//! process, watching processes by pid, and the load client ([`client`]).

#![allow(dead_code, unreachable_pub)]

pub mod client;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

/// Whether `pid` runs (a zombie does not).
pub fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !(state.starts_with('Z') || state.starts_with('X'))
        })
        .unwrap_or(false)
}

/// Starts watching `pid` until it exits (or `limit` passes), on a thread
/// of its own so that a busy runtime does not delay the observation: woken
/// by a pidfd the moment the process exits (Linux 5.3 and later), else
/// polling every 0.2 ms.
///
/// Start it before whatever ends the process: the thread is then created
/// and parked before the moment being measured, not inside it, where it
/// would take CPU from the processes being timed.
pub fn watch_exit(pid: u32, limit: Duration) -> ExitWatch {
    let (tell, told) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tell.send(wait_exit_blocking(pid, limit));
    });
    ExitWatch(told)
}

/// A process being watched by [`watch_exit`].
pub struct ExitWatch(tokio::sync::oneshot::Receiver<Instant>);

impl ExitWatch {
    /// When the process was seen gone (or the limit passed).
    pub async fn exited(self) -> Instant {
        self.0.await.unwrap_or_else(|_| Instant::now())
    }
}

fn wait_exit_blocking(pid: u32, limit: Duration) -> Instant {
    let deadline = Instant::now() + limit;
    #[cfg(target_os = "linux")]
    if let Some(pidfd) = pidfd_open(pid) {
        use std::os::fd::AsRawFd;
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = left.as_millis().min(i32::MAX as u128) as i32;
            #[allow(unsafe_code)]
            // SAFETY: `poll` points to one pollfd that outlives the call.
            let n = unsafe { libc::poll(&mut poll, 1, timeout) };
            let interrupted =
                n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted;
            // Readable (it has exited), the limit, or an error: done.
            if !interrupted {
                return Instant::now();
            }
        }
    }
    while is_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    Instant::now()
}

/// A pidfd for `pid`, or `None` where the kernel has none or `pid` is gone.
#[cfg(target_os = "linux")]
fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid = libc::pid_t::try_from(pid).ok()?;
    #[allow(unsafe_code)]
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    #[allow(unsafe_code)]
    // SAFETY: `fd` was just opened for us and nothing else owns it.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Sums `key=N` (`connections_handed_over`, say) over the `drain
/// finished` lines in `logs`: what the generations that have drained so
/// far did.
pub fn drained_count(logs: &[String], key: &str) -> usize {
    logs.iter()
        .filter(|line| line.contains("drain finished"))
        .filter_map(|line| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix(key)?.strip_prefix('='))
                .and_then(|n| n.parse::<usize>().ok())
        })
        .sum()
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Resident memory of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Sends `signal` (`libc::SIGHUP`, `libc::SIGTERM`) to `pid` with one
/// `kill(2)`: no `kill` command to start, so the moment before the call is
/// the moment the signal leaves. `Ok(false)` when `pid` is gone.
#[allow(unsafe_code)]
pub fn kill(pid: u32, signal: libc::c_int) -> std::io::Result<bool> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ESRCH) => Ok(false),
        _ => Err(e),
    }
}

/// `examples/hello` in release mode, built first under `cargo run`.
pub fn hello_binary() -> Result<PathBuf, String> {
    example_binary("hello")
}

/// The example `name` in release mode, built first under `cargo run`, so
/// that the figures are for this code.
pub fn example_binary(name: &str) -> Result<PathBuf, String> {
    if let Some(cargo) = std::env::var_os("CARGO") {
        let status = std::process::Command::new(cargo)
            .args(["build", "--release", "--example", name])
            .status()
            .map_err(|e| format!("cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("building examples/{name} failed"));
        }
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let binary = exe.with_file_name(name);
    if binary.exists() {
        Ok(binary)
    } else {
        Err(format!(
            "{} is missing: build it with cargo build --release --example {name}",
            binary.display()
        ))
    }
}

/// The `hello` a benchmark runs: the one `--hello` names, which must be a
/// file, or else [`hello_binary`].
pub fn chosen_hello(named: Option<&Path>) -> Result<PathBuf, String> {
    match named {
        Some(path) if path.is_file() => Ok(path.to_path_buf()),
        Some(path) => Err(format!("--hello {}: no such file", path.display())),
        None => hello_binary(),
    }
}

/// A running `hello` (its first generation) and what it logs.
pub struct Hello {
    pub addr: SocketAddr,
    pub pid_file: PathBuf,
    pub first: tokio::process::Child,
    /// Lines hello logged after `listening`.
    pub logs: Arc<Mutex<Vec<String>>>,
    /// Reads them, until every generation has closed hello's stdout.
    reader: tokio::task::JoinHandle<()>,
}

impl Hello {
    /// Starts `hello` on a free port with `args`, a pid file in `dir`, and
    /// `RUST_LOG=warn,hello=info,axum=info,handover=info` (it may be the
    /// axum example too); returns once it is ready.
    pub async fn start(
        hello: &Path,
        dir: &Path,
        args: &[&str],
    ) -> Result<Hello, Box<dyn std::error::Error>> {
        let pid_file = dir.join("hello.pid");
        let mut first = tokio::process::Command::new(hello)
            .args(["--addr", "127.0.0.1:0", "--pid-file"])
            .arg(&pid_file)
            .args(args)
            .env("RUST_LOG", "warn,hello=info,axum=info,handover=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(first.stdout.take().ok_or("stdout")?).lines();
        let addr: SocketAddr = loop {
            let line = lines
                .next_line()
                .await?
                .ok_or("hello exited before listening")?;
            if let Some(addr) = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("addr="))
                .and_then(|a| a.parse().ok())
            {
                break addr;
            }
        };
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let reader = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().expect("logs").push(line);
            }
        });
        let hello = Hello {
            addr,
            pid_file,
            first,
            logs,
            reader,
        };
        while hello.pid().is_none() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(hello)
    }

    /// The pid in the pid file: the generation that serves now.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Ends the current generation with SIGTERM, waits for the first, and
    /// for the last lines of their log.
    pub async fn stop(mut self) {
        if let Some(pid) = self.pid() {
            let exit = watch_exit(pid, Duration::from_secs(30));
            let _ = kill(pid, libc::SIGTERM);
            exit.exited().await;
        }
        let _ = self.first.wait().await;
        // The last lines (the last generation's drain) are in `logs` once
        // the pipe is closed; a process left holding it does not hold this.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.reader).await;
    }
}
