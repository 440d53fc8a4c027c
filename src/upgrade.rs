//! Starting the next generation and waiting until it is ready.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::listener::{
    HANDOVER_BOUND_FDNAMES, HANDOVER_GENERATION, HANDOVER_READY_FD, HANDOVER_STANDBY_FD,
    HANDOVER_STATE_FD, INHERITANCE_VARS, LISTEN_FDNAMES, LISTEN_FDS, LISTEN_FDS_START, Listeners,
};

/// Takes the snapshot of state to hand to the next generation.
pub(crate) type Snapshot<'a> = &'a (dyn Fn() -> Result<Vec<u8>, Error> + Send + Sync);
use crate::sys::spawn::Child;
use crate::{notify, standby, sys};

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
    /// Whether to keep a standby (see [`standby`]).
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
}

/// A standby this process started: the next generation, waiting in
/// `from_env` for the other end of `socket` to hand it the listeners.
#[derive(Debug)]
struct Standby {
    child: Child,
    socket: UnixStream,
    /// The binary it runs.
    exe: Option<FileId>,
    /// The directory it runs in.
    dir: Option<FileId>,
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
        })
    }

    /// Whether this process keeps a standby.
    pub(crate) fn keeps_standby(&self) -> bool {
        self.keep_standby
    }

    fn standby_slot(&self) -> std::sync::MutexGuard<'_, Option<Standby>> {
        self.standby.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a standby, unless this process keeps none, has one, is
    /// upgrading, has handed over or is shutting down, or could not
    /// upgrade at all (see [`check_parent`]). Returns its pid if it
    /// started one.
    pub(crate) fn start_standby(&self) -> Result<Option<u32>, Error> {
        let mut slot = self.standby_slot();
        if !self.keep_standby
            || slot.is_some()
            || self.is_running()
            || self.retired.load(Ordering::SeqCst)
            || check_parent().is_err()
        {
            return Ok(None);
        }
        self.check_binary()?;
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| Error::io("creating the standby's socket", e))?;
        let env = standby_env(std::env::vars_os());
        let (dir, dir_id) = self.child_dir_and_id();
        let exe = FileId::of(&self.exe);
        let child = sys::spawn::spawn(&self.exe, &self.args, dir, &env, &[theirs.as_fd()])
            .map_err(|e| Error::Binary {
                path: self.exe.clone(),
                reason: e.to_string(),
            })?;
        let pid = child.id();
        // What it runs, if the binary was replaced while it started.
        #[cfg(target_os = "linux")]
        let exe = FileId::of(Path::new(&format!("/proc/{pid}/exe"))).or(exe);
        *slot = Some(Standby {
            child,
            socket: ours,
            exe,
            dir: dir_id,
        });
        log!(info, pid, "standby started");
        Ok(Some(pid))
    }

    /// Takes the standby for an upgrade, if it can serve as the next
    /// generation: still running, from the binary and in the directory an
    /// upgrade would start now. One that cannot is killed (and reaped once
    /// it has exited).
    fn take_standby(&self) -> Option<Standby> {
        let standby = self.standby_slot().take()?;
        let pid = standby.child.id();
        let stale = if let Some(status) = standby.child.exit_status() {
            log!(warn, pid, %status, "the standby exited before the upgrade; starting the next generation afresh");
            return None;
        } else if standby.exe.is_none() || FileId::of(&self.exe) != standby.exe {
            "the binary has changed".to_owned()
        } else if self.child_dir_and_id().1 != standby.dir {
            "the working directory has changed".to_owned()
        } else if let Some(path) = replaced_mapping(pid) {
            format!("a file it has mapped, {path}, has been replaced or deleted")
        } else {
            return Some(standby);
        };
        log!(
            info,
            pid,
            reason = %stale,
            "standby discarded; starting the next generation afresh"
        );
        let _ = standby.child.kill();
        None
    }

    /// Keeps this process from starting a standby from now on, and kills
    /// the one it has (which [`discard_standby`](Self::discard_standby)
    /// then reaps).
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        if let Some(standby) = &*self.standby_slot() {
            let _ = standby.child.kill();
        }
    }

    /// Ends the standby, if there is one, and keeps this process from
    /// starting another; returns it to be waited for.
    pub(crate) fn discard_standby(&self) -> Option<Child> {
        self.retired.store(true, Ordering::SeqCst);
        let standby = self.standby_slot().take()?;
        let _ = standby.child.kill();
        log!(info, pid = standby.child.id(), "standby discarded");
        Some(standby.child)
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
    /// ready; returns its pid. On any failure the child is killed and
    /// reaped, and this process goes on as before.
    pub(crate) async fn upgrade(
        &self,
        listeners: &Listeners,
        cancel: &CancellationToken,
        snapshot: Option<Snapshot<'_>>,
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
            Ok(state) => self.start_next(listeners, cancel, state.as_ref()).await,
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
        state: Option<&OwnedFd>,
    ) -> Result<u32, Error> {
        self.check_binary()?;
        if let Some(standby) = self.take_standby() {
            match self.attempt(listeners, cancel, Some(standby), state).await {
                Err(Attempt::NotTaken) => {}
                Err(Attempt::Failed(e)) => return Err(e),
                Ok(pid) => return Ok(pid),
            }
        }
        match self.attempt(listeners, cancel, None, state).await {
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
        state: Option<&OwnedFd>,
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
        // What the child is told of the listeners: a standby in its
        // message, a fresh start in its environment.
        let with_state = state.is_some();
        let (vars, env) = match standby {
            Some(_) => (
                inheritance_vars(&listed, generation, with_state),
                Vec::new(),
            ),
            None => (
                Vec::new(),
                child_env(std::env::vars_os(), &listed, generation, with_state),
            ),
        };
        let mut fds: Vec<OwnedFd> = passed.into_iter().map(|(_, fd, _)| fd).collect();
        fds.push(OwnedFd::from(writer));
        if let Some(state) = state {
            fds.push(
                state
                    .try_clone()
                    .map_err(|e| Error::io("passing the state on", e))?,
            );
        }
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();

        let (started, socket) = match standby {
            Some(standby) => {
                let pid = standby.child.id();
                if let Err(e) = standby::wake(standby.socket.as_fd(), &vars, &borrowed) {
                    log!(warn, pid, error = %e, "the standby could not be reached; starting the next generation afresh");
                    let _ = standby.child.kill();
                    return Err(Attempt::NotTaken);
                }
                log!(
                    info,
                    pid,
                    listeners = count,
                    "upgrade: handing the listeners to the standby"
                );
                (Ok(standby.child), Some(standby.socket))
            }
            None => {
                log!(info, exe = %self.exe.display(), listeners = count, "upgrade: starting the next generation");
                let child =
                    sys::spawn::spawn(&self.exe, &self.args, self.child_dir(), &env, &borrowed);
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
            Ok(channel) => {
                *self.report_to.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel);
                self.handed_over.store(true, Ordering::SeqCst);
                self.retired.store(true, Ordering::SeqCst);
                log!(info, pid, "upgrade: the next generation is ready");
                Ok(pid)
            }
            Err(e) => {
                // Kill (if still running) and reap, whatever went wrong.
                let _ = child.kill();
                let status = child.wait().await;
                if matches!(e, Error::Cancelled) {
                    log!(warn, pid, error = %e, ?status, "upgrade cancelled; the child was killed and reaped");
                } else if socket.is_some_and(|socket| !standby::took_listeners(socket)) {
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
    /// channel, on which the drain report goes later.
    async fn wait_ready(
        &self,
        child: &mut Child,
        pid: u32,
        reader: UnixStream,
        cancel: &CancellationToken,
    ) -> Result<UnixStream, Error> {
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
                match (&mut reader).take(257).read_until(b'\n', &mut line).await {
                    Ok(_) if line.ends_with(b"\n") => {
                        if line.starts_with(b"READY=") {
                            return true;
                        }
                    }
                    // End of file, a line too long, or an error.
                    _ => return false,
                }
            }
        };
        tokio::select! {
            ready = read_ready => {
                if ready {
                    return channel
                        .into_std()
                        .and_then(|channel| channel.set_nonblocking(false).map(|()| channel))
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
        self.report_to
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
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

/// A file's identity: its device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of what `path` names, following symlinks.
    pub(crate) fn of(path: &Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|meta| Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// Refuses an upgrade whose hand-over would end this process's container:
/// this process is PID 1, or its parent is an init that exits with it.
pub(crate) fn check_parent() -> Result<(), Error> {
    if std::process::id() == 1 {
        return Err(Error::Pid1);
    }
    let parent = std::os::unix::process::parent_id();
    // Only Linux has `/proc` (and containers); elsewhere nothing is read.
    let Ok(comm) = std::fs::read_to_string(format!("/proc/{parent}/comm")) else {
        return Ok(());
    };
    let name = comm.trim_end_matches('\n');
    if exits_with_its_child(parent, name) {
        return Err(Error::InitParent {
            pid: parent,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Whether a parent process called `name` (its `comm`), with pid `pid` as
/// this process sees it, exits when its child does, ending the container.
///
/// tini (also installed as Docker's `docker-init`), dumb-init and catatonit
/// (Podman's `podman-init`) each run one child and exit with it, whatever
/// their pid. A shell that is PID 1 runs a container's entry script that
/// started the server without `exec`: the script goes on, and ends, once the
/// server exits. A shell that is not PID 1 is left alone: an operator's
/// interactive shell, say, outlives its children.
fn exits_with_its_child(pid: u32, name: &str) -> bool {
    const INITS: [&str; 5] = [
        "tini",
        "docker-init",
        "dumb-init",
        "catatonit",
        "podman-init",
    ];
    const SHELLS: [&str; 8] = ["sh", "bash", "dash", "ash", "zsh", "ksh", "mksh", "busybox"];
    INITS.contains(&name) || name.starts_with("tini-") || (pid == 1 && SHELLS.contains(&name))
}

/// A file that process `pid` has mapped (a shared library) and that has
/// since been replaced or deleted, as `/proc/PID/maps` says: a package
/// upgrade that renamed a new `libssl.so.3` over the old one, say. A fresh
/// start would load the new file. `None` if there is none, or where there
/// is no `/proc`.
///
/// Memory a process mapped from a `memfd` or SysV shared memory reads as
/// deleted too, and is not a file on a path: it does not count.
fn replaced_mapping(pid: u32) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    replaced_in_maps(&maps)
}

/// The first replaced or deleted file in the text of a `/proc/PID/maps`.
fn replaced_in_maps(maps: &str) -> Option<String> {
    maps.lines().find_map(|line| {
        // address perms offset dev inode path: the path is what follows the
        // fifth field, and may contain spaces.
        let mut rest = line;
        for _ in 0..5 {
            rest = rest.trim_start().split_once(' ')?.1;
        }
        let path = rest.trim_start().strip_suffix(" (deleted)")?;
        (path.starts_with('/') && !path.starts_with("/memfd:") && !path.starts_with("/SYSV"))
            .then(|| path.to_owned())
    })
}

/// The identity of the binary this process runs, even if it has been
/// deleted or replaced since.
fn running_binary() -> Option<FileId> {
    if cfg!(target_os = "linux") {
        FileId::of(Path::new("/proc/self/exe"))
    } else {
        FileId::of(&std::env::current_exe().ok()?)
    }
}

/// `$PWD` if it is an absolute path to the directory `physical` (what
/// `getcwd` says, every symlink resolved), whose identity is
/// `physical_id`; else `physical`.
///
/// A shell started in `/srv/app/current` sets `PWD` to that, while
/// `getcwd` says `/srv/app/releases/v1`. Once a deploy points `current` at
/// `releases/v2`, the next generation must start there, as unicorn and
/// other re-executing servers have long done.
fn logical_dir(physical: PathBuf, physical_id: Option<FileId>, pwd: Option<OsString>) -> PathBuf {
    match pwd.map(PathBuf::from) {
        Some(pwd)
            if pwd.is_absolute() && physical_id.is_some() && FileId::of(&pwd) == physical_id =>
        {
            pwd
        }
        _ => physical,
    }
}

/// The path this process was started by, `argv0`, made absolute (against
/// `cwd`, or searched in `path_var` as a shell does when it has no `/`),
/// if it names the `running` binary.
///
/// Not the running binary's own path (`/proc/self/exe`), in which the
/// kernel has resolved every symlink: started as `/srv/app/current/server`
/// with `current` pointing at `releases/v1`, this process's successor must
/// be started from whatever `current` points at by then. `None` when
/// `argv0` names another file (a launcher set it to something else, or the
/// file was replaced already): the running binary's path is used then.
fn program(
    argv0: &OsStr,
    cwd: &Path,
    path_var: Option<&OsStr>,
    running: FileId,
) -> Option<PathBuf> {
    let is_running = |candidate: &Path| FileId::of(candidate) == Some(running);
    // `components` drops the `.` of `./server`.
    let tidy = |path: PathBuf| path.components().collect::<PathBuf>();
    if argv0.as_encoded_bytes().contains(&b'/') {
        let candidate = tidy(cwd.join(argv0));
        return is_running(&candidate).then_some(candidate);
    }
    std::env::split_paths(path_var?)
        .map(|dir| tidy(cwd.join(dir).join(argv0)))
        .find(|candidate| is_running(candidate))
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

/// The variables that tell the next generation about the listeners
/// `passed` (each one's name, and whether a generation bound it), in fd
/// order from 3, its number, `generation`, and, `with_state`, where the
/// state is (after the readiness pipe); a standby receives them in its
/// message instead.
fn inheritance_vars(
    passed: &[(&str, bool)],
    generation: u64,
    with_state: bool,
) -> Vec<(&'static str, String)> {
    let names: Vec<&str> = passed.iter().map(|(name, _)| *name).collect();
    let bound: Vec<&str> = passed
        .iter()
        .filter(|(_, bound)| *bound)
        .map(|(name, _)| *name)
        .collect();
    let mut vars = vec![
        (LISTEN_FDS, passed.len().to_string()),
        (LISTEN_FDNAMES, names.join(":")),
        (HANDOVER_BOUND_FDNAMES, bound.join(":")),
        (HANDOVER_GENERATION, generation.to_string()),
    ];
    if with_state {
        let fd = LISTEN_FDS_START + passed.len() as i32 + 1;
        vars.push((HANDOVER_STATE_FD, fd.to_string()));
    }
    vars
}

/// This process's environment without the inheritance variables it may
/// have been given.
fn own_env(ours: impl Iterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    ours.filter(|(key, _)| !INHERITANCE_VARS.iter().any(|var| key == var))
        .collect()
}

/// The next generation's environment: this one's, without the inheritance
/// variables it may have been given, plus the variables that describe
/// `passed` ([`inheritance_vars`]), and the readiness pipe's fd just after
/// the listeners'.
fn child_env(
    ours: impl Iterator<Item = (OsString, OsString)>,
    passed: &[(&str, bool)],
    generation: u64,
    with_state: bool,
) -> Vec<(OsString, OsString)> {
    let mut env = own_env(ours);
    env.extend(
        inheritance_vars(passed, generation, with_state)
            .into_iter()
            .map(|(key, value)| (key.into(), value.into())),
    );
    env.push((
        HANDOVER_READY_FD.into(),
        (LISTEN_FDS_START + passed.len() as i32).to_string().into(),
    ));
    env
}

/// A standby's environment: this one's, without the inheritance variables,
/// plus its socket's fd, 3.
fn standby_env(ours: impl Iterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    let mut env = own_env(ours);
    env.push((
        HANDOVER_STANDBY_FD.into(),
        LISTEN_FDS_START.to_string().into(),
    ));
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_replaced_library_is_found_in_the_maps_and_memfds_are_not() {
        let maps = "\
5581c5e00000-5581c5e2a000 r--p 00000000 08:01 1319                       /srv/app/server
7f7a1c000000-7f7a1c021000 rw-p 00000000 00:00 0 
7f7a1d200000-7f7a1d228000 r--p 00000000 08:01 2290                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f7a1d400000-7f7a1d401000 rw-s 00000000 00:01 1035                       /memfd:pool (deleted)
7f7a1d402000-7f7a1d403000 rw-s 00000000 00:01 32770                      /SYSV00000000 (deleted)
7ffd6a1e5000-7ffd6a206000 rw-p 00000000 00:00 0                          [stack]
";
        assert_eq!(replaced_in_maps(maps), None);
        let upgraded = format!(
            "{maps}7f7a1d600000-7f7a1d690000 r-xp 00000000 08:01 4471                       /usr/lib/x86_64-linux-gnu/libssl.so.3 (deleted)\n"
        );
        assert_eq!(
            replaced_in_maps(&upgraded).as_deref(),
            Some("/usr/lib/x86_64-linux-gnu/libssl.so.3")
        );
        let spaced =
            "7f7a1d600000-7f7a1d690000 r-xp 00000000 08:01 4471   /opt/my app/lib.so (deleted)";
        assert_eq!(
            replaced_in_maps(spaced).as_deref(),
            Some("/opt/my app/lib.so")
        );
    }

    #[test]
    fn inits_that_exit_with_their_child_are_told_from_supervisors_that_stay() {
        for (pid, name) in [
            (1, "tini"),
            (1, "docker-init"),
            (1, "tini-static"),
            (1, "tini-static-amd"),
            (1, "dumb-init"),
            (1, "catatonit"),
            (1, "podman-init"),
            (712, "tini"),
            (1, "sh"),
            (1, "bash"),
            (1, "busybox"),
        ] {
            assert!(exits_with_its_child(pid, name), "{name} as pid {pid}");
        }
        for (pid, name) in [
            (1, "systemd"),
            (1, "s6-svscan"),
            (1, "runit"),
            (712, "systemd"),
            (712, "bash"),
            (712, "sh"),
            (712, "cargo"),
            (712, "tinyproxy"),
        ] {
            assert!(!exits_with_its_child(pid, name), "{name} as pid {pid}");
        }
    }

    #[test]
    fn the_child_learns_which_listeners_a_generation_bound() {
        let ours = [
            ("PATH", "/usr/bin"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_FDNAMES", "old"),
            ("HANDOVER_BOUND_FDNAMES", "old"),
            ("HANDOVER_READY_FD", "9"),
            ("LISTEN_PID", "1"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let env = child_env(
            ours.into_iter(),
            &[("http", true), ("activated", false), ("admin", true)],
            4,
            true,
        );
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
            .collect();
        let expected = [
            ("PATH", "/usr/bin"),
            ("LISTEN_FDS", "3"),
            ("LISTEN_FDNAMES", "http:activated:admin"),
            ("HANDOVER_BOUND_FDNAMES", "http:admin"),
            ("HANDOVER_GENERATION", "4"),
            ("HANDOVER_STATE_FD", "7"),
            ("HANDOVER_READY_FD", "6"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(env, expected);
    }

    /// A fresh directory holding `bin/server` (the "running binary"),
    /// `link` → `bin/server`, `other` and `elsewhere/server` (other
    /// files), and `current` → `bin`.
    struct Layout {
        dir: PathBuf,
    }

    impl Layout {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("handover-upgrade-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("bin")).expect("dir");
            std::fs::create_dir_all(dir.join("elsewhere")).expect("dir");
            std::fs::write(dir.join("elsewhere/server"), "another").expect("write");
            std::fs::write(dir.join("bin/server"), "server").expect("write");
            std::fs::write(dir.join("other"), "other").expect("write");
            symlink("bin/server", dir.join("link")).expect("symlink");
            symlink("bin", dir.join("current")).expect("symlink");
            Self { dir }
        }

        fn running(&self) -> FileId {
            FileId::of(&self.dir.join("bin/server")).expect("exists")
        }
    }

    impl Drop for Layout {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn the_program_is_the_path_this_process_was_started_by_symlinks_kept() {
        let l = Layout::new("program");
        let running = l.running();
        let program = |argv0: &str, path_var: Option<&str>| {
            program(OsStr::new(argv0), &l.dir, path_var.map(OsStr::new), running)
        };
        let absolute = l.dir.join("current/server");
        assert_eq!(
            program(absolute.to_str().expect("utf-8"), None),
            Some(absolute.clone())
        );
        // Relative to the working directory, `./` dropped.
        assert_eq!(program("./link", None), Some(l.dir.join("link")));
        assert_eq!(
            program("current/server", None),
            Some(l.dir.join("current/server"))
        );
        // No `/`: searched in PATH, in order, relative entries against the
        // working directory, an empty entry meaning the directory itself.
        let search = format!("/nonexistent:{}", l.dir.join("current").display());
        assert_eq!(
            program("server", Some(&search)),
            Some(l.dir.join("current/server"))
        );
        assert_eq!(
            program("server", Some("/nonexistent:bin")),
            Some(l.dir.join("bin/server"))
        );
        assert_eq!(
            program("link", Some("/nonexistent:")),
            Some(l.dir.join("link"))
        );
        // A name found first as another file is passed over.
        assert_eq!(
            program("server", Some("elsewhere:bin")),
            Some(l.dir.join("bin/server"))
        );
        // Not the running binary, or not found: `None` (the caller then
        // uses the running binary's own path).
        assert_eq!(program("./other", None), None);
        assert_eq!(program("./missing", None), None);
        assert_eq!(program("server", None), None);
        assert_eq!(program("other", Some(l.dir.to_str().expect("utf-8"))), None);
    }

    #[test]
    fn the_working_directory_is_pwd_only_when_it_names_the_same_directory() {
        let l = Layout::new("pwd");
        let physical = l.dir.join("bin");
        let physical_id = FileId::of(&physical);
        let logical =
            |pwd: Option<PathBuf>| logical_dir(physical.clone(), physical_id, pwd.map(Into::into));
        assert_eq!(logical(Some(l.dir.join("current"))), l.dir.join("current"));
        // Unset (systemd sets no PWD), stale, relative, or missing.
        assert_eq!(logical(None), physical);
        assert_eq!(logical(Some(l.dir.clone())), physical);
        assert_eq!(logical(Some("current".into())), physical);
        assert_eq!(logical(Some(l.dir.join("gone"))), physical);
    }

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
