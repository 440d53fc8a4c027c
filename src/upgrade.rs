//! Starting the next generation and waiting until it is ready.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::listener::{
    HANDOVER_READY_FD, LISTEN_FDNAMES, LISTEN_FDS, LISTEN_FDS_START, LISTEN_PID, Listeners,
};
use crate::sys::spawn::Child;
use crate::{notify, sys};

/// How this process starts its successor: resolved once, at start-up.
#[derive(Debug)]
pub(crate) struct Upgrader {
    exe: PathBuf,
    args: Vec<OsString>,
    cwd: PathBuf,
    ready_timeout: Duration,
    running: AtomicBool,
    /// Woken when an upgrade ends (its child ready, or killed and reaped).
    ended: Notify,
}

/// Clears `running` when the upgrade ends, however it ends.
struct Running<'a>(&'a Upgrader);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

impl Upgrader {
    pub(crate) fn from_current_process(ready_timeout: Duration) -> Result<Self, Error> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::io("resolving the path of this binary", e))?;
        let cwd =
            std::env::current_dir().map_err(|e| Error::io("reading the working directory", e))?;
        Ok(Self {
            exe,
            args: std::env::args_os().skip(1).collect(),
            cwd,
            ready_timeout,
            running: AtomicBool::new(false),
            ended: Notify::new(),
        })
    }

    /// The binary the next generation is started from.
    pub(crate) fn exe(&self) -> &std::path::Path {
        &self.exe
    }

    pub(crate) fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Waits until no upgrade is under way: a cancelled one has killed and
    /// reaped its child by then, so the process can exit without leaving it
    /// behind.
    pub(crate) async fn wait_ended(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !self.is_running() {
                return;
            }
            ended.await;
        }
    }

    fn check_binary(&self) -> Result<(), Error> {
        let binary_error = |reason: String| Error::Binary {
            path: self.exe.clone(),
            reason,
        };
        let meta = std::fs::metadata(&self.exe).map_err(|e| {
            binary_error(if e.kind() == std::io::ErrorKind::NotFound {
                "it does not exist (was it deleted?)".into()
            } else {
                e.to_string()
            })
        })?;
        if !meta.is_file() {
            return Err(binary_error("it is not a file".into()));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(binary_error("it is not executable".into()));
        }
        Ok(())
    }

    /// Starts the next generation with the listeners and waits until it is
    /// ready; returns its pid. On any failure the child is killed and
    /// reaped, and this process goes on as before.
    pub(crate) async fn upgrade(
        &self,
        listeners: &Listeners,
        cancel: &CancellationToken,
    ) -> Result<u32, Error> {
        if std::process::id() == 1 {
            return Err(Error::Pid1);
        }
        if self.running.swap(true, Ordering::SeqCst) {
            return Err(Error::UpgradeInProgress);
        }
        let _running = Running(self);
        // Only the upgrade that holds the slot tells systemd it reloads, and
        // says ready again if it fails (not when a shutdown called it off:
        // systemd has heard STOPPING=1 by then).
        let _ = notify::sd_notify("RELOADING=1");
        let result = self.start_next(listeners, cancel).await;
        if result
            .as_ref()
            .is_err_and(|e| !matches!(e, Error::Cancelled))
        {
            let _ = notify::sd_notify("READY=1");
        }
        result
    }

    /// Spawns the next generation and waits until it is ready.
    async fn start_next(
        &self,
        listeners: &Listeners,
        cancel: &CancellationToken,
    ) -> Result<u32, Error> {
        self.check_binary()?;

        let passed = listeners.for_next_generation()?;
        let (reader, writer) =
            std::io::pipe().map_err(|e| Error::io("creating the readiness pipe", e))?;
        let names: Vec<&str> = passed.iter().map(|(name, _)| name.as_str()).collect();
        let count = passed.len();

        let ours = [LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES, HANDOVER_READY_FD];
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(key, _)| !ours.iter().any(|ours| key == ours))
            .collect();
        env.push((LISTEN_FDS.into(), count.to_string().into()));
        env.push((LISTEN_FDNAMES.into(), names.join(":").into()));
        env.push((
            HANDOVER_READY_FD.into(),
            (LISTEN_FDS_START + count as i32).to_string().into(),
        ));
        let mut fds: Vec<OwnedFd> = passed.into_iter().map(|(_, fd)| fd).collect();
        fds.push(OwnedFd::from(writer));
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();

        log!(info, exe = %self.exe.display(), listeners = count, "upgrade: starting the next generation");
        let spawned = sys::spawn::spawn(&self.exe, &self.args, &self.cwd, &env, &borrowed);
        // Closes this process's copies of the passed fds, above all the
        // pipe's write end: the child's exit must read as end of file.
        drop(borrowed);
        drop(fds);
        let mut child = spawned.map_err(|e| Error::Binary {
            path: self.exe.clone(),
            reason: e.to_string(),
        })?;
        let pid = child.id();

        let result = self
            .wait_ready(&mut child, pid, OwnedFd::from(reader), cancel)
            .await;
        match &result {
            Ok(()) => log!(info, pid, "upgrade: the next generation is ready"),
            Err(e) => {
                // Kill (if still running) and reap, whatever went wrong.
                let _ = child.kill();
                let status = child.wait().await;
                if matches!(e, Error::Cancelled) {
                    log!(warn, pid, error = %e, ?status, "upgrade cancelled; the child was killed and reaped");
                } else {
                    log!(error, pid, error = %e, ?status, "upgrade failed; this generation keeps serving");
                }
            }
        }
        result.map(|()| pid)
    }

    async fn wait_ready(
        &self,
        child: &mut Child,
        pid: u32,
        reader: OwnedFd,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(reader)
            .map_err(|e| Error::io("reading the readiness pipe", e))?;
        let mut lines = BufReader::new(pipe).lines();
        let read_ready = async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) if line.starts_with("READY=") => return true,
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return false,
                }
            }
        };
        tokio::select! {
            ready = read_ready => {
                if ready {
                    return Ok(());
                }
                // End of file without READY: it is exiting, or closed the
                // pipe by mistake. Tell which, briefly.
                match tokio::time::timeout(Duration::from_millis(200), child.wait()).await {
                    Ok(Ok(status)) => Err(Error::ChildExited { pid, status }),
                    _ => Err(Error::NotReady { pid }),
                }
            }
            status = child.wait() => match status {
                Ok(status) => Err(Error::ChildExited { pid, status }),
                Err(e) => Err(Error::io("waiting for the next generation", e)),
            },
            () = tokio::time::sleep(self.ready_timeout) => Err(Error::ReadyTimeout {
                pid,
                timeout: self.ready_timeout,
            }),
            () = cancel.cancelled() => Err(Error::Cancelled),
        }
    }
}
