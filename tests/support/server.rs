//! A running example server (`hello` by default) and its successors, as
//! real processes: started, restarted, stopped, their logs collected.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;

use super::deploy::Deploy;
use super::proc::{is_alive, kill_processes_from, processes_from, send_signal};
use super::tools::{is_root, require_pid_namespaces, tool};
use super::wait::{wait_exit, wait_until};

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

/// A running server and its successors.
pub struct Server {
    pub deploy: Deploy,
    pub addr: SocketAddr,
    pub logs: Arc<Mutex<String>>,
    pub first: tokio::process::Child,
    /// The tasks reading the server's stdout and stderr into `logs`.
    log_readers: Mutex<Vec<JoinHandle<()>>>,
}

impl Server {
    /// Starts the deploy's binary with a 2 s ready timeout and a 10 s drain
    /// timeout.
    pub async fn start(deploy: Deploy, extra_env: &[(&str, &str)]) -> Server {
        Self::start_with(
            deploy,
            &["--ready-timeout", "2", "--drain-timeout", "10"],
            extra_env,
        )
        .await
    }

    /// Starts the deployed binary with `--addr 127.0.0.1:0` (unless `args`
    /// name an address), `--pid-file ..`, and `args`.
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
                let mut sh = tokio::process::Command::new(tool("sh"));
                sh.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(&deploy.bin);
                sh
            }
            Launch::Container(init) => {
                if let Some(init) = init.first() {
                    tool(init);
                }
                require_pid_namespaces();
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
        if !args.contains(&"--addr") {
            command.args(["--addr", "127.0.0.1:0"]);
        }
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
        let what = format!("{n} log lines with {text:?}");
        wait_until(&what, Duration::from_secs(20), || self.logged(text) >= n).await;
    }

    /// How many times the server has logged `text` so far.
    pub fn logged(&self, text: &str) -> usize {
        self.log_text().matches(text).count()
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

    /// What the server has logged so far.
    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Everything the server logged, once every process that held its log
    /// pipes has exited and the pipes have been read to their end: what a
    /// test may count, or find absent.
    pub async fn all_logs(&self) -> String {
        let readers = std::mem::take(&mut *self.log_readers.lock().unwrap());
        for reader in readers {
            tokio::time::timeout(Duration::from_secs(20), reader)
                .await
                .expect("the log pipes end once every process is gone")
                .unwrap();
        }
        self.log_text()
    }

    /// The pid in the pid file.
    pub fn current_pid(&self) -> u32 {
        self.deploy.read_pid().expect("pid file")
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
        new.unwrap()
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
    pub async fn stop_any(self) -> std::process::ExitStatus {
        let pid = self.current_pid();
        send_signal(pid, "TERM");
        wait_exit("the last generation exits", pid).await;
        self.wait_exited().await
    }

    /// Once the last generation has been told to end: waits for the first
    /// process, and for every process of the deploy to be gone; returns how
    /// the first process exited.
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
