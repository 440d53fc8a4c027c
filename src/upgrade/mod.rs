//! Starting the next generation and waiting until it is ready.
//!
//! Part of the hand-over half: it knows nothing of HTTP.

mod binary;
mod container;
mod standby;

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::inherit::{Listeners, channel, env, standby as standby_message};
use crate::lock::lock;
use crate::notify;
use crate::sys::{self, FileId, spawn::Child};
use binary::{logical_dir, program, running_binary};
pub(crate) use container::check_parent;
pub(crate) use standby::STANDBY_DELAY;
use standby::Standby;

/// Takes the snapshot of state to hand to the next generation.
pub(crate) type Snapshot<'a> = &'a (dyn Fn() -> Result<Vec<u8>, Error> + Send + Sync);

/// How this process starts its successor: resolved once, at start-up.
#[derive(Debug)]
pub(crate) struct Upgrader {
    /// The path this process was started by (see [`program`]).
    exe: PathBuf,
    args: Vec<OsString>,
    /// The working directory as this process was started in it (see
    /// [`logical_dir`]).
    cwd: PathBuf,
    /// The directory itself, to tell whether this process is still in it.
    start_dir: Option<FileId>,
    ready_timeout: Duration,
    running: AtomicBool,
    /// Woken when an upgrade ends (its child ready, or killed and reaped).
    ended: Notify,
    /// Whether to keep a standby (see `standby`).
    keep_standby: bool,
    /// The standby, once started and until an upgrade takes it. Its lock
    /// is held while one is started, so that an upgrade that begins
    /// meanwhile finds it.
    standby: Mutex<Option<Standby>>,
    /// Set once this process has handed over or is shutting down: no more
    /// standbys.
    retired: AtomicBool,
    /// Set once a next generation has said it is ready (before the upgrade
    /// stops counting as running).
    handed_over: AtomicBool,
    /// That generation's readiness channel, for the drain report.
    report_to: Mutex<Option<UnixStream>>,
    /// That generation's end of the connections channel, if it takes this
    /// one's idle connections.
    connections_to: Mutex<Option<OwnedFd>>,
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
    pub(crate) fn from_current_process(
        ready_timeout: Duration,
        keep_standby: bool,
    ) -> Result<Self, Error> {
        // In a directory deleted since it was entered (an old release's),
        // `getcwd` fails, but the process runs on there, and so can the
        // next generation: "." names it.
        let physical = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let start_dir = FileId::of(&physical);
        let cwd = logical_dir(physical, start_dir, std::env::var_os("PWD"));
        let mut args = std::env::args_os();
        let invoked = args.next().and_then(|argv0| {
            let path_var = std::env::var_os("PATH");
            program(&argv0, &cwd, path_var.as_deref(), running_binary()?)
        });
        let exe = match invoked {
            Some(exe) => exe,
            None => std::env::current_exe()
                .map_err(|e| Error::io("resolving the path of this binary", e))?,
        };
        Ok(Self {
            exe,
            args: args.collect(),
            cwd,
            start_dir,
            ready_timeout,
            running: AtomicBool::new(false),
            ended: Notify::new(),
            keep_standby,
            standby: Mutex::new(None),
            retired: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            report_to: Mutex::new(None),
            connections_to: Mutex::new(None),
        })
    }

    /// The binary the next generation is started from.
    pub(crate) fn exe(&self) -> &std::path::Path {
        &self.exe
    }

    pub(crate) fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Whether a next generation has taken over (it said it was ready),
    /// even if this process was told to shut down meanwhile.
    pub(crate) fn has_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::SeqCst)
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

    /// Where the next generation starts: `None` for this process's own
    /// working directory, which it inherits.
    fn child_dir(&self) -> Option<&Path> {
        self.child_dir_and_id().0
    }

    /// [`child_dir`](Self::child_dir), and the identity of the directory
    /// that is (`None` if it does not exist), from the same two `stat`s.
    fn child_dir_and_id(&self) -> (Option<&Path>, Option<FileId>) {
        let here = FileId::of(Path::new("."));
        match FileId::of(&self.cwd) {
            Some(there) if Some(there) == here => (None, here),
            // A symlink on the path now points elsewhere (a new release),
            // or this process has changed directory since it started.
            Some(there) => (Some(&self.cwd), Some(there)),
            // The path is gone (an old release's directory, removed), but
            // this process is still where it started: so is the child.
            None if here.is_some() && here == self.start_dir => (None, here),
            None => (Some(&self.cwd), None),
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
    /// ready; returns its pid. With `connections`, it is passed a channel
    /// to take this generation's idle connections on (see
    /// [`take_connections_channel`](Self::take_connections_channel)). On
    /// any failure the child is killed and reaped, and this process goes on
    /// as before.
    pub(crate) async fn upgrade(
        &self,
        listeners: &Listeners,
        cancel: &CancellationToken,
        snapshot: Option<Snapshot<'_>>,
        connections: bool,
    ) -> Result<u32, Error> {
        check_parent()?;
        if self.running.swap(true, Ordering::SeqCst) {
            return Err(Error::UpgradeInProgress);
        }
        let _running = Running(self);
        // Only the upgrade that holds the slot tells systemd it reloads, and
        // says ready again if it fails (not when a shutdown called it off:
        // systemd has heard STOPPING=1 by then).
        // With `MONOTONIC_USEC=`, as `Type=notify-reload` requires.
        let _ = notify::sd_notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            sys::monotonic_usec()
        ));
        let result = match state_file(snapshot) {
            Ok(state) => {
                let passing = Passing {
                    state: state.as_ref(),
                    connections,
                };
                self.start_next(listeners, cancel, passing).await
            }
            Err(e) => {
                log!(error, error = %e, "upgrade failed; this generation keeps serving");
                Err(e)
            }
        };
        if result
            .as_ref()
            .is_err_and(|e| !matches!(e, Error::Cancelled))
        {
            let _ = notify::sd_notify("READY=1");
        }
        result
    }

    /// Starts the next generation (wakes the standby, or spawns it) and
    /// waits until it is ready. A standby that never took the listeners
    /// (it died, or was stopped, before it read them) is replaced by a
    /// fresh start within the same upgrade.
    async fn start_next(
        &self,
        listeners: &Listeners,
        cancel: &CancellationToken,
        passing: Passing<'_>,
    ) -> Result<u32, Error> {
        self.check_binary()?;
        if let Some(standby) = self.take_standby() {
            match self
                .attempt(listeners, cancel, Some(standby), passing)
                .await
            {
                Err(Attempt::NotTaken) => {}
                Err(Attempt::Failed(e)) => return Err(e),
                Ok(pid) => return Ok(pid),
            }
        }
        match self.attempt(listeners, cancel, None, passing).await {
            Ok(pid) => Ok(pid),
            Err(Attempt::Failed(e)) => Err(e),
            // Only a woken standby leaves the listeners untaken.
            Err(Attempt::NotTaken) => Err(Error::io(
                "starting the next generation",
                std::io::Error::other("no process took the listeners"),
            )),
        }
    }

    /// One try at the next generation: `standby` woken, or else a fresh
    /// start. On failure the child has been killed and reaped.
    async fn attempt(
        &self,
        listeners: &Listeners,
        cancel: &CancellationToken,
        standby: Option<Standby>,
        passing: Passing<'_>,
    ) -> Result<u32, Attempt> {
        let passed = listeners.for_next_generation()?;
        // The readiness channel: the child says READY on it, and, once this
        // generation has drained, hears how the drain went.
        let (reader, writer) =
            UnixStream::pair().map_err(|e| Error::io("creating the readiness channel", e))?;
        let listed: Vec<(&str, bool)> = passed
            .iter()
            .map(|(name, _, bound)| (name.as_str(), *bound))
            .collect();
        let count = passed.len();
        let generation = listeners.generation() + 1;
        // The connections channel: the child takes this generation's idle
        // connections on it, if it says so when ready.
        let connections = match passing.connections {
            true => Some(
                sys::fdpass::seqpacket_pair()
                    .map_err(|e| Error::io("creating the connections channel", e))?,
            ),
            false => None,
        };
        let alongside = env::Alongside {
            state: passing.state.is_some(),
            connections: connections.is_some(),
        };
        // What the child is told of the listeners: a standby in its
        // message, a fresh start in its environment.
        let (vars, child_env) = match standby {
            Some(_) => (
                env::for_next_generation(&listed, generation, alongside),
                Vec::new(),
            ),
            None => (
                Vec::new(),
                env::child_env(env::process_env(), &listed, generation, alongside),
            ),
        };
        let mut fds: Vec<OwnedFd> = passed.into_iter().map(|(_, fd, _)| fd).collect();
        fds.push(OwnedFd::from(writer));
        if let Some(state) = passing.state {
            fds.push(
                state
                    .try_clone()
                    .map_err(|e| Error::io("passing the state on", e))?,
            );
        }
        let connections = connections.map(|(ours, theirs)| {
            fds.push(theirs);
            ours
        });
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();

        let (started, socket) = match standby {
            Some(standby) => {
                let pid = standby.child.id();
                if let Err(e) = standby_message::wake(standby.socket.as_fd(), &vars, &borrowed) {
                    log!(warn, pid, error = %e, "the standby could not be reached; starting the next generation afresh");
                    let _ = standby.child.kill();
                    return Err(Attempt::NotTaken);
                }
                log!(
                    info,
                    pid,
                    listeners = count,
                    "handing the listeners to the standby"
                );
                (Ok(standby.child), Some(standby.socket))
            }
            None => {
                log!(info, exe = %self.exe.display(), listeners = count, "starting the next generation");
                let child = sys::spawn::spawn(
                    &self.exe,
                    &self.args,
                    self.child_dir(),
                    &child_env,
                    &borrowed,
                );
                (child, None)
            }
        };
        // Closes this process's copies of the passed fds, above all the
        // pipe's write end: the child's exit must read as end of file.
        drop(borrowed);
        drop(fds);
        let mut child = started.map_err(|e| Error::Binary {
            path: self.exe.clone(),
            reason: e.to_string(),
        })?;
        let pid = child.id();

        let result = self.wait_ready(&mut child, pid, reader, cancel).await;
        match result {
            Ok((channel, ready)) => {
                *lock(&self.report_to) = Some(channel);
                // Kept only if the child takes connections: an older
                // binary never reads it.
                *lock(&self.connections_to) = connections.filter(|_| ready.connections);
                self.handed_over.store(true, Ordering::SeqCst);
                self.retired.store(true, Ordering::SeqCst);
                log!(info, pid, "the next generation is ready");
                Ok(pid)
            }
            Err(e) => {
                // Kill (if still running) and reap, whatever went wrong.
                let _ = child.kill();
                let status = child.wait().await;
                if matches!(e, Error::Cancelled) {
                    log!(warn, pid, error = %e, ?status, "upgrade cancelled; the child was killed and reaped");
                } else if socket.is_some_and(|socket| !standby_message::took_listeners(socket)) {
                    log!(warn, pid, error = %e, ?status, "the standby did not take the listeners; starting the next generation afresh");
                    return Err(Attempt::NotTaken);
                } else {
                    log!(error, pid, error = %e, ?status, "upgrade failed; this generation keeps serving");
                }
                Err(Attempt::Failed(e))
            }
        }
    }

    /// Waits for `READY=` on the readiness channel (`reader`); returns the
    /// channel, on which the drain report goes later, and what the line
    /// said.
    async fn wait_ready(
        &self,
        child: &mut Child,
        pid: u32,
        reader: UnixStream,
        cancel: &CancellationToken,
    ) -> Result<(UnixStream, channel::Ready), Error> {
        let mut channel = reader
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(reader))
            .map_err(|e| Error::io("reading the readiness channel", e))?;
        let read_ready = async {
            // Short lines; a child that says more than 256 bytes on one
            // line (or garbage) is not ready.
            let mut reader = BufReader::new(&mut channel);
            let mut line = Vec::with_capacity(32);
            loop {
                line.clear();
                match (&mut reader)
                    .take(channel::MAX_LINE + 1)
                    .read_until(b'\n', &mut line)
                    .await
                {
                    Ok(_) if line.ends_with(b"\n") => {
                        if let Some(ready) = channel::parse_ready_line(&line) {
                            return Some(ready);
                        }
                    }
                    // End of file, a line too long, or an error.
                    _ => return None,
                }
            }
        };
        tokio::select! {
            ready = read_ready => {
                if let Some(ready) = ready {
                    return channel
                        .into_std()
                        .and_then(|channel| channel.set_nonblocking(false).map(|()| channel))
                        .map(|channel| (channel, ready))
                        .map_err(|e| Error::io("keeping the readiness channel", e));
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

    /// The readiness channel of the generation this one handed over to, on
    /// which it tells it how its drain went (once).
    pub(crate) fn take_report_channel(&self) -> Option<UnixStream> {
        lock(&self.report_to).take()
    }

    /// The connections channel to the generation this one handed over to,
    /// if it takes this one's idle connections; once.
    pub(crate) fn take_connections_channel(&self) -> Option<OwnedFd> {
        lock(&self.connections_to).take()
    }
}

/// What an upgrade passes the next generation besides the listeners.
#[derive(Clone, Copy)]
struct Passing<'a> {
    /// The state snapshot's file.
    state: Option<&'a OwnedFd>,
    /// Whether to offer it this generation's idle connections.
    connections: bool,
}

/// How one try at the next generation failed.
enum Attempt {
    /// The standby never took the listeners: try again afresh.
    NotTaken,
    /// The upgrade failed.
    Failed(Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Failed(e)
    }
}

/// The state `snapshot` takes, in a sealed file for the next generation
/// (none without a snapshot).
fn state_file(snapshot: Option<Snapshot<'_>>) -> Result<Option<OwnedFd>, Error> {
    let Some(snapshot) = snapshot else {
        return Ok(None);
    };
    let bytes = snapshot()?;
    let file = sys::sealed_file(&bytes).map_err(|e| Error::State {
        reason: format!("could not write the snapshot down: {e}"),
    })?;
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use binary::tests::Layout;

    #[test]
    fn the_child_starts_in_the_directory_the_path_names_now() {
        let l = Layout::new("child-dir");
        let here = std::env::current_dir().expect("cwd");
        let upgrader = |cwd: PathBuf, start_dir: &Path| Upgrader {
            cwd,
            start_dir: FileId::of(start_dir),
            ..Upgrader::from_current_process(Duration::from_secs(1), false).expect("upgrader")
        };
        // Where this process is: inherited, no chdir needed.
        assert_eq!(upgrader(here.clone(), &here).child_dir(), None);
        // A path (a symlink, say) that now names another directory.
        let current = l.dir.join("current");
        assert_eq!(
            upgrader(current.clone(), &here).child_dir(),
            Some(current.as_path())
        );
        // A path that is gone: the child stays where this process started,
        // if it is still there; otherwise the path is tried (and fails).
        let gone = l.dir.join("gone");
        assert_eq!(upgrader(gone.clone(), &here).child_dir(), None);
        assert_eq!(
            upgrader(gone.clone(), &l.dir).child_dir(),
            Some(gone.as_path())
        );
        // The identity that comes with it is the directory the child starts
        // in, as a standby is checked against.
        assert_eq!(
            upgrader(here.clone(), &here).child_dir_and_id().1,
            FileId::of(&here)
        );
        assert_eq!(
            upgrader(current.clone(), &here).child_dir_and_id().1,
            FileId::of(&current)
        );
        assert_eq!(
            upgrader(gone.clone(), &here).child_dir_and_id().1,
            FileId::of(&here)
        );
        assert_eq!(upgrader(gone.clone(), &l.dir).child_dir_and_id().1, None);
    }
}
