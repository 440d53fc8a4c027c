//! Shared by the process tests: a deployable copy of `examples/hello`, its
//! generations, and a keep-alive load.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;

pub mod h2_websocket;
pub mod tls;
pub mod tools;
pub mod websocket;

pub use tools::tool;

/// The benchmarks' load client: the HTTP/2 load below uses it.
#[path = "../../examples/bench_support/client.rs"]
pub mod load_client;

/// The `hello` example built next to this test binary.
pub fn hello_binary() -> PathBuf {
    example_binary("hello")
}

/// An example built next to this test binary.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the examples (cargo build --examples)",
        path.display()
    );
    path
}

/// A directory holding the binary that generations are started from, so a
/// test can deploy another file over it.
pub struct Deploy {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub pid_file: PathBuf,
    /// The directory the first generation starts in, given as `$PWD` too
    /// (as a shell would); `None`: the test's own.
    pub cwd: Option<PathBuf>,
    source: PathBuf,
}

impl Deploy {
    /// A deploy of `examples/hello`.
    pub fn new(tag: &str) -> Self {
        Self::of(tag, "hello")
    }

    /// A deploy of the example `name`.
    pub fn of(tag: &str, name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("handover-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let deploy = Deploy {
            bin: dir.join(name),
            pid_file: dir.join("server.pid"),
            cwd: None,
            dir,
            source: example_binary(name),
        };
        deploy.install_good();
        deploy
    }

    /// A deploy of `examples/hello` laid out as release directories behind
    /// a symlink, as Capistrano and the like do: `releases/v1/hello`, with
    /// `current` pointing at `releases/v1`. The first generation is started
    /// as `current/hello`, in `current`.
    pub fn releases(tag: &str) -> Self {
        let mut deploy = Self::new(tag);
        deploy.add_release("v1");
        deploy.point_current_at("v1");
        deploy.bin = deploy.dir.join("current").join("hello");
        deploy.cwd = Some(deploy.dir.join("current"));
        deploy
    }

    /// A copy of `examples/hello` at `releases/{name}/hello`.
    pub fn add_release(&self, name: &str) {
        let release = self.dir.join("releases").join(name);
        std::fs::create_dir_all(&release).unwrap();
        std::fs::copy(&self.source, release.join("hello")).unwrap();
    }

    /// Points `current` at `releases/{name}`, atomically (a new symlink
    /// renamed over the old one).
    pub fn point_current_at(&self, name: &str) {
        let new = self.dir.join("current.new");
        let _ = std::fs::remove_file(&new);
        std::os::unix::fs::symlink(Path::new("releases").join(name), &new).unwrap();
        std::fs::rename(&new, self.dir.join("current")).unwrap();
    }

    fn install(&self, write: impl FnOnce(&Path)) {
        use std::os::unix::fs::PermissionsExt;
        let new = self.dir.join("binary.new");
        write(&new);
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
        // As deploys do: a rename over the path, never a write into it.
        std::fs::rename(&new, &self.bin).unwrap();
    }

    pub fn install_good(&self) {
        self.install(|new| {
            std::fs::copy(&self.source, new).unwrap();
        });
    }

    pub fn install_script(&self, script: &str) {
        self.install(|new| std::fs::write(new, script).unwrap());
    }

    pub fn read_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Deploy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `pid` is a live process (a zombie is not).
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !(state.starts_with('Z') || state.starts_with('X'))
        }
        Err(_) => false,
    }
}

pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Polls `check` every 2 ms until it is true; panics after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until `pid` has exited (`what` names it); panics after 20 s.
pub async fn wait_exit(what: &str, pid: u32) {
    wait_until(what, Duration::from_secs(20), || !is_alive(pid)).await;
}

/// Live processes running a binary from `dir`.
pub fn processes_from(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(exe) = std::fs::read_link(entry.path().join("exe"))
            && exe.starts_with(dir)
            && is_alive(pid)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Every process's pid, state (`R`, `S`, `Z`, ...) and parent's pid, from
/// `/proc/PID/stat`.
fn process_table() -> Vec<(u32, String, u32)> {
    let mut table = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let mut fields = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let state = fields.next().unwrap_or("").to_owned();
        if let Some(ppid) = fields.next().and_then(|p| p.parse().ok()) {
            table.push((pid, state, ppid));
        }
    }
    table
}

/// Live children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    process_table()
        .into_iter()
        .filter(|(child, _, ppid)| *ppid == pid && is_alive(*child))
        .map(|(child, _, _)| child)
        .collect()
}

/// Children of `pid` that have exited and not been reaped.
pub fn zombies_of(pid: u32) -> Vec<u32> {
    process_table()
        .into_iter()
        .filter(|(_, state, ppid)| *ppid == pid && state == "Z")
        .map(|(child, _, _)| child)
        .collect()
}

/// The numbers on the line `field:` of `/proc/PID/status`.
fn status_numbers(pid: u32, field: &str) -> Vec<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap();
    line.split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// Resident memory of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_numbers(pid, "VmRSS")[0]
}

/// The pid `pid` has in its own (innermost) pid namespace.
pub fn namespace_pid(pid: u32) -> u32 {
    let pids = status_numbers(pid, "NSpid");
    u32::try_from(*pids.last().unwrap()).unwrap()
}

/// The body of `GET /` from the server at `addr`, on a connection of its
/// own that the server closes after it.
pub async fn get_body(addr: SocketAddr) -> String {
    get_path_body(addr, "/").await
}

/// The body of `GET path` from the server at `addr`, on a connection of
/// its own that the server closes after it.
pub async fn get_path_body(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_else(|| panic!("no body in {response:?}"))
}

/// Waits (5 s at most) until `pid` has `expected` fds open, as generation
/// `generations` after the one that had them: the pid file a generation
/// replaces is closed on a short-lived thread of its own, so this allows it
/// a moment; a leak never settles.
pub async fn assert_fds_settle(pid: u32, expected: usize, generations: usize) {
    let settled = async {
        while fd_count(pid) != expected {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), settled)
            .await
            .is_ok(),
        "no fd leaks across {generations} hand-overs: {} fds, the first generation had {expected}",
        fd_count(pid)
    );
}

pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// How a test starts the first generation.
#[derive(Clone, Copy)]
pub enum Launch<'a> {
    /// As itself.
    Direct,
    /// Under `ulimit -n` this many fds.
    FdLimit(u32),
    /// As a container's process: in a pid namespace of its own (Linux's
    /// `unshare`), under `init` (a program and its arguments), or as PID 1
    /// itself when `init` is empty. `first` is `unshare`; nothing is
    /// written to the pid file (whose pids would be the namespace's), so
    /// find the server's pids with [`processes_from`].
    Container(&'a [&'a str]),
}

/// Whether this test runs as root.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A running `hello` and its successors.
pub struct Server {
    pub deploy: Deploy,
    pub addr: SocketAddr,
    pub logs: Arc<Mutex<String>>,
    pub first: tokio::process::Child,
    known_pids: Mutex<BTreeSet<u32>>,
    /// The tasks reading the server's stdout and stderr into `logs`.
    log_readers: Mutex<Vec<JoinHandle<()>>>,
}

impl Server {
    /// Starts `hello` with a 2 s ready timeout and a 10 s drain timeout.
    pub async fn start(deploy: Deploy, extra_env: &[(&str, &str)]) -> Server {
        Self::start_with(
            deploy,
            &["--ready-timeout", "2", "--drain-timeout", "10"],
            extra_env,
        )
        .await
    }

    /// Starts the deployed binary with `--addr 127.0.0.1:0 --pid-file ..`
    /// and `args`.
    pub async fn start_with(deploy: Deploy, args: &[&str], extra_env: &[(&str, &str)]) -> Server {
        Self::launch(deploy, Launch::Direct, args, extra_env).await
    }

    /// Like [`start_with`](Self::start_with), started as `launch` says.
    pub async fn launch(
        deploy: Deploy,
        launch: Launch<'_>,
        args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Server {
        let mut command = match launch {
            Launch::Direct => tokio::process::Command::new(&deploy.bin),
            Launch::FdLimit(limit) => {
                let mut sh = tokio::process::Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(&deploy.bin);
                sh
            }
            Launch::Container(init) => {
                if let Some(init) = init.first() {
                    tool(init);
                }
                let mut unshare = tokio::process::Command::new(tool("unshare"));
                if !is_root() {
                    unshare.args(["--user", "--map-root-user"]);
                }
                // `--kill-child`: if this test ends early, killing `unshare`
                // kills the namespace's PID 1, and with it everything in it.
                unshare
                    .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
                    .args(init)
                    .arg(&deploy.bin);
                unshare
            }
        };
        if let Some(cwd) = &deploy.cwd {
            command.current_dir(cwd).env("PWD", cwd);
        }
        command.args(["--addr", "127.0.0.1:0"]);
        if !matches!(launch, Launch::Container(_)) {
            command.arg("--pid-file").arg(&deploy.pid_file);
        }
        command
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in extra_env {
            command.env(k, v);
        }
        let mut first = command.spawn().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let mut log_readers = Vec::new();
        for stream in [
            Box::new(first.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(first.stderr.take().unwrap()),
        ] {
            let logs = logs.clone();
            log_readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut logs = logs.lock().unwrap();
                    logs.push_str(&line);
                    logs.push('\n');
                }
            }));
        }
        let addr_logs = logs.clone();
        let mut addr = None;
        wait_until(
            "the first generation listens",
            Duration::from_secs(20),
            || {
                addr = addr_logs.lock().unwrap().lines().find_map(|line| {
                    let rest = line.split(" listening ").nth(1)?;
                    rest.split_whitespace()
                        .find_map(|f| f.strip_prefix("addr="))?
                        .parse()
                        .ok()
                });
                addr.is_some()
            },
        )
        .await;
        let server = Server {
            addr: addr.unwrap(),
            deploy,
            logs,
            first,
            known_pids: Mutex::new(BTreeSet::new()),
            log_readers: Mutex::new(log_readers),
        };
        if matches!(launch, Launch::Container(_)) {
            server.wait_log("ready pid=", 1).await;
        } else {
            server.wait_pid_file_change(None).await;
        }
        server
    }

    /// Waits until the server has logged `text` at least `n` times.
    pub async fn wait_log(&self, text: &str, n: usize) {
        wait_until(text, Duration::from_secs(20), || {
            self.log_text().matches(text).count() >= n
        })
        .await;
    }

    /// Closes this end of the server's stdout and stderr, as a log
    /// collector that dies does: from then on every line the server (and
    /// every later generation) logs fails with `EPIPE`. Nothing more is
    /// collected in `logs`.
    pub async fn close_log_pipes(&self) {
        let readers = std::mem::take(&mut *self.log_readers.lock().unwrap());
        for reader in readers {
            reader.abort();
            let _ = reader.await;
        }
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    pub fn current_pid(&self) -> u32 {
        let pid = self.deploy.read_pid().expect("pid file");
        self.known_pids.lock().unwrap().insert(pid);
        pid
    }

    /// Waits until the pid file names a live process other than `old`.
    pub async fn wait_pid_file_change(&self, old: Option<u32>) -> u32 {
        let mut new = None;
        wait_until("a new pid in the pid file", Duration::from_secs(20), || {
            new = self
                .deploy
                .read_pid()
                .filter(|p| Some(*p) != old && is_alive(*p));
            new.is_some()
        })
        .await;
        let new = new.unwrap();
        self.known_pids.lock().unwrap().insert(new);
        new
    }

    /// SIGHUP to the current generation; returns the new pid once the old
    /// generation has exited.
    pub async fn restart(&self) -> u32 {
        let old = self.current_pid();
        send_signal(old, "HUP");
        self.wait_handed_over(old).await
    }

    /// Waits until a new generation is in the pid file and `old` has
    /// exited; returns the new pid. Says what the server logged if no new
    /// generation comes.
    pub async fn wait_handed_over(&self, old: u32) -> u32 {
        // Just inside the wait's own 20 s, to say what the server logged.
        let Ok(new) = tokio::time::timeout(
            Duration::from_secs(19),
            self.wait_pid_file_change(Some(old)),
        )
        .await
        else {
            panic!(
                "no new generation 19 s after SIGHUP; logs:\n{}",
                self.log_text()
            );
        };
        wait_exit("the old generation exits", old).await;
        new
    }

    /// SIGTERM to the current generation, and wait for it to end; every
    /// generation must have exited 0.
    pub async fn stop(self) {
        let status = self.stop_any().await;
        assert!(
            status.success(),
            "the first generation exited with {status}"
        );
    }

    /// SIGTERM to the current generation, and wait for it to end; returns
    /// how the first generation exited.
    pub async fn stop_any(mut self) -> std::process::ExitStatus {
        let pid = self.current_pid();
        send_signal(pid, "TERM");
        wait_exit("the last generation exits", pid).await;
        let status = self.first.wait().await.unwrap();
        assert!(
            processes_from(&self.deploy.dir).is_empty(),
            "no process left behind"
        );
        status
    }
}

impl Server {
    /// Once the last generation has been told to end: waits for the first
    /// process, and checks that no process is left; returns how the first
    /// process exited.
    pub async fn wait_exited(mut self) -> std::process::ExitStatus {
        let status = tokio::time::timeout(Duration::from_secs(20), self.first.wait())
            .await
            .expect("the first process exits")
            .unwrap();
        wait_until("no process left behind", Duration::from_secs(20), || {
            processes_from(&self.deploy.dir).is_empty()
        })
        .await;
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Only when a test failed midway: end whatever it started, by pid.
        kill_processes_from(&self.deploy.dir);
    }
}

/// SIGKILL, by pid, to every live process running a binary from `dir`.
pub fn kill_processes_from(dir: &Path) {
    for pid in processes_from(dir) {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    }
}

/// Keep-alive HTTP/1 load from a pooled hyper client (which, like most
/// clients, re-sends a request that was never written to a closed
/// connection), or HTTP/2 load from the benchmarks' client
/// ([`load_client`]), one connection per client, reconnecting when a
/// GOAWAY has closed it.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicUsize>,
    pub failed: Arc<Mutex<Vec<String>>>,
    pub pids: Arc<Mutex<BTreeSet<u32>>>,
    /// HTTP/2 requests refused unprocessed by a GOAWAY, or lost by hyper's
    /// client after their connection had closed (see [`load_client`]), and
    /// sent again.
    pub retried: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, clients: usize, path: &'static str) -> Load {
        Self::start_with(addr, clients, path, false)
    }

    /// Like [`start`](Self::start), over HTTP/2 (prior knowledge) when `http2`.
    pub fn start_with(addr: SocketAddr, clients: usize, path: &'static str, http2: bool) -> Load {
        let mut load = Self::not_started();
        load.tasks = if http2 {
            (0..clients)
                .map(|_| {
                    let (stop, ok, failed, pids, retried) = (
                        load.stop.clone(),
                        load.ok.clone(),
                        load.failed.clone(),
                        load.pids.clone(),
                        load.retried.clone(),
                    );
                    tokio::spawn(async move {
                        use load_client::Outcome;
                        let mut connection = None;
                        while !stop.load(Ordering::Relaxed) {
                            let next = load_client::next_sender(addr, &mut connection, None, true);
                            let mut sender = match next.await {
                                Ok(sender) => sender,
                                Err(e) => {
                                    failed.lock().unwrap().push(e);
                                    continue;
                                }
                            };
                            match load_client::get(&mut sender, path).await {
                                Outcome::Answered(body) => {
                                    match load_client::pid_of(&body) {
                                        Some(pid) => {
                                            ok.fetch_add(1, Ordering::Relaxed);
                                            pids.lock().unwrap().insert(pid);
                                        }
                                        None => failed
                                            .lock()
                                            .unwrap()
                                            .push(format!("unexpected body {body:?}")),
                                    }
                                    connection = Some(sender);
                                }
                                // Closing or closed: the next request
                                // goes on a new connection.
                                Outcome::NotSent { refused: false } => {}
                                Outcome::NotSent { refused: true } | Outcome::LostByClient => {
                                    retried.fetch_add(1, Ordering::Relaxed);
                                }
                                Outcome::Failed(e) => failed.lock().unwrap().push(e),
                            }
                        }
                    })
                })
                .collect()
        } else {
            let uri: http::Uri = format!("http://{addr}{path}").parse().unwrap();
            let client = || Client::builder(TokioExecutor::new()).build_http();
            load.pooled_clients(clients, client, uri)
        };
        load
    }

    /// Counts at zero, no client yet.
    fn not_started() -> Load {
        Load {
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::new(AtomicUsize::new(0)),
            failed: Arc::new(Mutex::new(Vec::new())),
            pids: Arc::new(Mutex::new(BTreeSet::new())),
            retried: Arc::new(AtomicUsize::new(0)),
            tasks: Vec::new(),
        }
    }

    /// Like [`start`](Self::start), over HTTPS (HTTP/1.1): `tls` says which
    /// certificates the clients trust, and offers no ALPN protocol (the
    /// connector offers `http/1.1`).
    pub fn start_https(
        addr: SocketAddr,
        clients: usize,
        path: &'static str,
        tls: tokio_rustls::rustls::ClientConfig,
    ) -> Load {
        let mut load = Self::not_started();
        let uri: http::Uri = format!("https://{addr}{path}").parse().unwrap();
        let client = || {
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_only()
                .enable_http1()
                .build();
            Client::builder(TokioExecutor::new()).build(https)
        };
        load.tasks = load.pooled_clients(clients, client, uri);
        load
    }

    /// `clients` loops of requests, each on a pooled keep-alive client of
    /// its own.
    fn pooled_clients<C>(
        &self,
        clients: usize,
        client: impl Fn() -> Client<C, Empty<Bytes>>,
        uri: http::Uri,
    ) -> Vec<JoinHandle<()>>
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        (0..clients)
            .map(|_| {
                let client = client();
                let (stop, ok, failed, pids) = (
                    self.stop.clone(),
                    self.ok.clone(),
                    self.failed.clone(),
                    self.pids.clone(),
                );
                let uri = uri.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let result = Self::one(&client, uri.clone()).await;
                        match result {
                            Ok(pid) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                pids.lock().unwrap().insert(pid);
                            }
                            Err(e) => failed.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect()
    }

    async fn one<C>(client: &Client<C, Empty<Bytes>>, uri: http::Uri) -> Result<u32, String>
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        let response = client
            .get(uri)
            .await
            .map_err(|e| format!("request: {e:?}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e:?}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        load_client::pid_of(&body).ok_or_else(|| format!("unexpected body {body:?}"))
    }

    /// Waits until `n` more requests have been answered.
    pub async fn wait_answers(&self, n: usize) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        wait_until("load answered", Duration::from_secs(20), || {
            self.ok.load(Ordering::Relaxed) >= target
        })
        .await;
    }

    /// Waits until generation `pid` has answered this load.
    pub async fn wait_pid(&self, pid: u32) {
        wait_until(
            &format!("generation {pid} answers"),
            Duration::from_secs(20),
            || self.pids.lock().unwrap().contains(&pid),
        )
        .await;
    }

    pub async fn stop(self) -> (usize, Vec<String>, BTreeSet<u32>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        let pids = self.pids.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failed, pids)
    }

    /// Stops the load and asserts that every request was answered.
    pub async fn stop_all_answered(self) {
        let (ok, failed, _) = self.stop().await;
        assert!(
            failed.is_empty(),
            "{} of {ok} requests failed: {failed:?}",
            failed.len()
        );
    }
}

/// Opens `GET /events` over HTTP/1.1, sending `Last-Event-ID` when given;
/// returns the event stream's body.
pub async fn open_events(addr: SocketAddr, last_event_id: Option<u64>) -> hyper::body::Incoming {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::get("/events").header(http::header::HOST, "127.0.0.1");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    response.into_body()
}

/// A server started with `--stable-parent on` in a pid namespace under
/// `init`: the namespace's PID 1, the stable parent, and its first
/// generation.
pub struct Kept {
    pub server: Server,
    pub ns_init: u32,
    pub keeper: u32,
}

impl Kept {
    pub async fn start(tag: &str, init: &[&str]) -> Kept {
        Self::start_with(tag, init, &[]).await
    }

    /// Like [`start`](Self::start), with more arguments for the server.
    pub async fn start_with(tag: &str, init: &[&str], args: &[&str]) -> Kept {
        Self::start_deploy(Deploy::new(tag), init, args).await
    }

    /// Like [`start_with`](Self::start_with), of another deploy (another
    /// example).
    pub async fn start_deploy(deploy: Deploy, init: &[&str], args: &[&str]) -> Kept {
        let args: Vec<&str> = ["--stable-parent", "on"]
            .iter()
            .chain(args)
            .copied()
            .collect();
        let server = Server::launch(deploy, Launch::Container(init), &args, &[]).await;
        let unshare = server.first.id().unwrap();
        let [ns_init] = children_of(unshare)[..] else {
            panic!("unshare has one child, the namespace's PID 1");
        };
        let keeper = if init.is_empty() {
            ns_init
        } else {
            let [keeper] = children_of(ns_init)[..] else {
                panic!("the init has one child, the stable parent");
            };
            keeper
        };
        Kept {
            server,
            ns_init,
            keeper,
        }
    }

    /// The one generation running under the stable parent.
    pub fn generation(&self) -> u32 {
        let [generation] = children_of(self.keeper)[..] else {
            panic!(
                "one generation under the stable parent: {:?}\n{}",
                children_of(self.keeper),
                self.server.log_text()
            );
        };
        generation
    }

    /// Upgrades through the namespace's PID 1, as `docker kill -s HUP`
    /// does; returns the new generation once the old one has exited.
    pub async fn restart(&self) -> u32 {
        let old = self.generation();
        send_signal(self.ns_init, "HUP");
        let mut new = None;
        wait_until(
            "the next generation alone under the stable parent",
            Duration::from_secs(20),
            || {
                new = match children_of(self.keeper)[..] {
                    [one] if one != old => Some(one),
                    _ => None,
                };
                new.is_some()
            },
        )
        .await;
        new.unwrap()
    }

    /// Waits until the stable parent has reaped every old generation.
    pub async fn wait_reaped(&self) {
        wait_until(
            "the stable parent reaps the old generation",
            Duration::from_secs(20),
            || zombies_of(self.keeper).is_empty(),
        )
        .await;
    }

    /// `SIGTERM` to the namespace's PID 1, as `docker stop` sends: the
    /// container must end with status 0 and leave no process.
    pub async fn stop(&mut self) {
        send_signal(self.ns_init, "TERM");
        let status = tokio::time::timeout(Duration::from_secs(20), self.server.first.wait())
            .await
            .expect("the container ends after SIGTERM")
            .unwrap();
        assert!(status.success(), "the container exited with {status}");
        assert!(processes_from(&self.server.deploy.dir).is_empty());
    }
}
