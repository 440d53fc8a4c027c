//! Starting the next generation with `posix_spawn`, and waiting for it.
//!
//! `std::process::Command` (and tokio's) can only put fds at chosen numbers
//! with a `pre_exec` closure, which makes it `fork` the whole process: the
//! parent stops while its page tables are copied (about 1 ms per 30 MB of
//! memory here, tens of milliseconds for a large service), and every page
//! it writes until the child's `exec` is then copied once more. A
//! `posix_spawn` with file actions does the same fd layout from a
//! `vfork`-style child that shares the parent's memory until `exec`, so the
//! cost no longer grows with the server's size.
//!
//! Without `Command`, the child is reaped here too, only after it has
//! exited (a pidfd says so, or a thread waits with `WNOWAIT`) and under the
//! lock [`Child::kill`] takes: until it is reaped its pid cannot be reused,
//! so `kill` can never hit another process.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::watch;

/// A child started by [`spawn`].
///
/// Dropping it neither kills nor waits: a successful upgrade leaves the
/// child running as the next generation.
#[derive(Debug)]
pub(crate) struct Child {
    pid: libc::pid_t,
    /// `Some` once reaped; the lock is held while reaping, so `kill` never
    /// signals a pid that was reaped (and may have been reused).
    reaped: Arc<Mutex<Option<ExitStatus>>>,
    exited: watch::Receiver<Option<ExitStatus>>,
    /// A pidfd for it (Linux), opened as it started: `kill` goes through
    /// it, so it reaches this child even if the application reaped it
    /// (`waitpid(-1)`, `SIGCHLD` ignored) and its pid has been reused.
    #[cfg(target_os = "linux")]
    process: Option<super::process::Process>,
    #[cfg_attr(
        not(test),
        allow(dead_code, reason = "shown by Debug, checked by tests")
    )]
    reaper: Reaper,
}

/// What waits for a [`Child`] to exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reaper {
    /// A task of the runtime, woken by the child's pidfd.
    #[cfg_attr(
        not(target_os = "linux"),
        allow(dead_code, reason = "pidfds are Linux's")
    )]
    Task,
    /// A thread blocked in `waitid`.
    Thread,
}

impl Child {
    pub(crate) fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Waits until the child has exited and been reaped. Cancel safe, and
    /// may be called again.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self.exited.wait_for(Option::is_some).await {
            Ok(status) => Ok(status.expect("waited for Some")),
            Err(_) => Err(io::Error::other(
                "what reaps the child is gone (its runtime shut down?)",
            )),
        }
    }

    /// How it exited, if it has been reaped.
    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        *self.exited.borrow()
    }

    /// Sends `SIGKILL`, unless the child has been reaped already.
    pub(crate) fn kill(&self) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if let Some(process) = &self.process {
            return match process.signal(libc::SIGKILL) {
                // Gone and reaped (by us or by the application).
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
                sent => sent,
            };
        }
        kill_unreaped(self.pid, &self.reaped)
    }
}

/// Sends `SIGKILL` to our child `pid`, unless `reaped` says it is reaped.
fn kill_unreaped(pid: libc::pid_t, reaped: &Mutex<Option<ExitStatus>>) -> io::Result<()> {
    let reaped = crate::lock::lock(reaped);
    if reaped.is_some() {
        return Ok(());
    }
    // SAFETY: `kill` takes plain integers. `pid` is our child and is not
    // reaped (checked under the lock the reaper holds while reaping), so it
    // still names that child, running or a zombie.
    if unsafe { libc::kill(pid, libc::SIGKILL) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

type AddChdir =
    unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, *const libc::c_char) -> libc::c_int;

/// `posix_spawn_file_actions_addchdir_np`, where the C library has it
/// (glibc 2.29 and later, musl 1.1.24, macOS 10.15). Looked up at run time,
/// as std does, so the crate still builds and runs against an older glibc
/// (RHEL 8 has 2.28, Amazon Linux 2 has 2.26).
fn addchdir() -> Option<AddChdir> {
    static ADDCHDIR: OnceLock<Option<AddChdir>> = OnceLock::new();
    *ADDCHDIR.get_or_init(|| {
        // SAFETY: `dlsym` with RTLD_DEFAULT only looks a symbol up by its
        // NUL-terminated name.
        let found = unsafe {
            libc::dlsym(
                libc::RTLD_DEFAULT,
                c"posix_spawn_file_actions_addchdir_np".as_ptr(),
            )
        };
        if found.is_null() {
            return None;
        }
        // SAFETY: where the C library defines this symbol, it is this
        // function, with this signature.
        Some(unsafe { std::mem::transmute::<*mut libc::c_void, AddChdir>(found) })
    })
}

fn c_string(bytes: &OsStr, what: &str) -> io::Result<CString> {
    CString::new(bytes.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte: {bytes:?}"),
        )
    })
}

/// The pointers to `strings`, then a null pointer: `argv` / `envp`.
fn null_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

/// Maps a `posix_spawn*` return code (an errno value, not `-1`).
fn check(code: libc::c_int) -> io::Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(code))
    }
}

/// Owns initialised file actions and attributes, destroying them on drop.
struct SpawnSetup {
    actions: libc::posix_spawn_file_actions_t,
    attr: libc::posix_spawnattr_t,
}

impl SpawnSetup {
    /// Initialised where they stay: in the box, which is never moved out
    /// of (some C libraries keep pointers into the objects).
    fn new() -> io::Result<Box<Self>> {
        let mut setup = Box::new(MaybeUninit::<Self>::uninit());
        let place = setup.as_mut_ptr();
        // SAFETY: `place` points at the box's uninitialised `Self`, whose
        // fields `addr_of_mut!` reaches without reading them; the `_init`
        // functions initialise the objects they are given, each destroyed
        // only if its init succeeded. The box is turned into a `Box<Self>`
        // only once both are initialised, which is all of `Self`.
        unsafe {
            let actions = std::ptr::addr_of_mut!((*place).actions);
            let attr = std::ptr::addr_of_mut!((*place).attr);
            check(libc::posix_spawn_file_actions_init(actions))?;
            if let Err(e) = check(libc::posix_spawnattr_init(attr)) {
                libc::posix_spawn_file_actions_destroy(actions);
                return Err(e);
            }
            Ok(Box::from_raw(Box::into_raw(setup).cast::<Self>()))
        }
    }
}

impl Drop for SpawnSetup {
    fn drop(&mut self) {
        // SAFETY: both were initialised in `new` and are destroyed once.
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
            libc::posix_spawnattr_destroy(&mut self.attr);
        }
    }
}

/// Starts `exe` with `args`, in `cwd` (`None`: in this process's working
/// directory), with exactly `env`, and with
/// `fds[i]` at fd `3 + i` (without `FD_CLOEXEC`, so they cross `exec`; all
/// other fds of this process have `FD_CLOEXEC`, as std and tokio open
/// them). Returns once the child has called `exec`: a binary that cannot
/// be executed is an error here.
pub(crate) fn spawn(
    exe: &Path,
    args: &[OsString],
    cwd: Option<&Path>,
    env: &[(OsString, OsString)],
    fds: &[BorrowedFd<'_>],
) -> io::Result<Child> {
    use std::os::fd::AsRawFd;

    let program = c_string(exe.as_os_str(), "the binary's path")?;
    let mut argv_owned = vec![program.clone()];
    for arg in args {
        argv_owned.push(c_string(arg, "an argument")?);
    }
    let mut envp_owned = Vec::with_capacity(env.len());
    for (key, value) in env {
        let mut pair = key.clone();
        pair.push("=");
        pair.push(value);
        envp_owned.push(c_string(&pair, "an environment variable")?);
    }
    let argv = null_terminated(&argv_owned);
    let envp = null_terminated(&envp_owned);
    let chdir = cwd
        .map(|cwd| -> io::Result<(AddChdir, CString)> {
            let addchdir = addchdir().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "the next generation must start in {}, which is not this \
                         process's working directory, and this C library cannot start a \
                         child elsewhere (posix_spawn_file_actions_addchdir_np needs \
                         glibc 2.29 or later)",
                        cwd.display()
                    ),
                )
            })?;
            Ok((
                addchdir,
                c_string(cwd.as_os_str(), "the working directory")?,
            ))
        })
        .transpose()?;

    // Each fd goes first to a spare number, then to its place: placing one
    // can never overwrite a source not yet placed, and `dup2` onto a
    // different number clears `FD_CLOEXEC`.
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let count = raw.len() as RawFd;
    let spares = spare_fds(&raw, super::is_open);

    let mut setup = SpawnSetup::new()?;
    let mut pid: libc::pid_t = 0;
    // SAFETY: `setup` holds initialised objects; every pointer passed
    // (`program`, `chdir`'s path, `argv`, `envp` and the strings they point to)
    // outlives the calls, and `argv`/`envp` end with a null pointer. The fds
    // in `raw` are open for the whole call (`fds` borrows them), and
    // `posix_spawn` only reads its arguments.
    unsafe {
        let actions = &mut setup.actions;
        for (&fd, &spare) in raw.iter().zip(&spares) {
            check(libc::posix_spawn_file_actions_adddup2(actions, fd, spare))?;
        }
        for (i, &spare) in (0..count).zip(&spares) {
            check(libc::posix_spawn_file_actions_adddup2(
                actions,
                spare,
                3 + i,
            ))?;
            check(libc::posix_spawn_file_actions_addclose(actions, spare))?;
        }
        if let Some((addchdir, dir)) = &chdir {
            check(addchdir(actions, dir.as_ptr()))?;
        }

        // As std's `Command`: an empty signal mask, and SIGPIPE back to its
        // default (the Rust runtime ignores it, and ignoring crosses exec).
        let attr = &mut setup.attr;
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        check(libc::posix_spawnattr_setsigmask(attr, set.as_ptr()))?;
        libc::sigaddset(set.as_mut_ptr(), libc::SIGPIPE);
        check(libc::posix_spawnattr_setsigdefault(attr, set.as_ptr()))?;
        check(libc::posix_spawnattr_setflags(
            attr,
            (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as _,
        ))?;

        check(libc::posix_spawn(
            &mut pid,
            program.as_ptr(),
            &setup.actions,
            &setup.attr,
            argv.as_ptr(),
            envp.as_ptr(),
        ))?;
    }
    drop(setup);
    // `posix_spawn` is a `vfork` here: this thread slept until the child
    // called `exec`, and the child had its core meanwhile. Woken by that
    // `exec`, this thread, having slept, is favoured by the scheduler and
    // takes the core back while the child has hardly begun to start up; on
    // a busy machine the child then waits out this thread's time slice (up
    // to 2.3 ms seen with `perf sched`). Yielding once gives the core back
    // to the child: in 18 alternating pairs of restart benchmark runs, the
    // median time from signal to the new generation answering fell from
    // 6.76 to 6.35 ms (means of the runs' medians), throughput unchanged.
    #[cfg(target_os = "linux")]
    std::thread::yield_now();

    // At once, before anything could reap it: the pid names our child.
    #[cfg(target_os = "linux")]
    let process = super::process::Process::open(pid as u32).ok();
    let reaped = Arc::new(Mutex::new(None));
    let (tell, exited) = watch::channel(None);
    match start_reaper(pid, reaped.clone(), tell) {
        Ok(reaper) => Ok(Child {
            pid,
            reaped,
            exited,
            #[cfg(target_os = "linux")]
            process,
            reaper,
        }),
        Err(e) => {
            // Nothing to reap it: end the child here rather than leave it
            // unreaped.
            let _ = kill_unreaped(pid, &reaped);
            reap(pid, &reaped);
            Err(e)
        }
    }
}

/// Reaps `pid` once it exits and sends its status on `tell`.
///
/// On Linux (5.3 and later), a task of the current runtime waits for the
/// child's pidfd to become readable. It holds no thread, so once an upgrade
/// has succeeded nothing of it can delay this process's exit: a thread
/// blocked in `waitid` must be scheduled once more to die when the process
/// exits, and on a loaded machine that held the old generation up to 8 ms
/// after its last response. Elsewhere, or without pidfds or a runtime, a
/// thread blocks in `waitid`.
fn start_reaper(
    pid: libc::pid_t,
    reaped: Arc<Mutex<Option<ExitStatus>>>,
    tell: watch::Sender<Option<ExitStatus>>,
) -> io::Result<Reaper> {
    #[cfg(target_os = "linux")]
    if let Ok(runtime) = tokio::runtime::Handle::try_current()
        && let Ok(pidfd) = super::process::pidfd_open(pid)
        && let Ok(pidfd) = readable_when_exited(pidfd)
    {
        runtime.spawn(async move {
            // An error means the runtime is shutting down, and this
            // process with it: the child is then left to init, as after a
            // successful upgrade.
            while let Ok(mut ready) = pidfd.readable().await {
                // Never blocks this worker, even on a spurious wake-up.
                if let Some(status) = try_reap(pid, &reaped) {
                    let _ = tell.send(Some(status));
                    return;
                }
                ready.clear_ready();
            }
        });
        return Ok(Reaper::Task);
    }
    std::thread::Builder::new()
        .name(format!("handover-reap-{pid}"))
        .spawn(move || {
            let status = reap(pid, &reaped);
            let _ = tell.send(Some(status));
        })?;
    Ok(Reaper::Thread)
}

/// Registers `pidfd` with the current runtime, which reports it readable
/// once the child has exited.
#[cfg(target_os = "linux")]
fn readable_when_exited(
    pidfd: std::os::fd::OwnedFd,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // tokio 1.54 deprecates this for `register_with_interest`, an unsafe
    // function whose condition is that the fd stays open while registered;
    // an `OwnedFd` that the `AsyncFd` owns does, and this crate still
    // supports tokio from 1.40, which has only this one.
    #[allow(deprecated)]
    tokio::io::unix::AsyncFd::with_interest(pidfd, tokio::io::Interest::READABLE)
}

/// Numbers to park `sources` on in the child while they are laid out at
/// 3, 4, …: the lowest ones past the targets that are neither sources nor
/// open here (`open` says which are).
///
/// Low on purpose: a server near its fd limit has its sources at high
/// numbers, and a number past all of them could be past the limit. Not
/// open here, so that a spare replaces nothing in the child: an fd this
/// process was started with and passes on (one its launcher leaked, say)
/// reaches the next generation as it reached this one.
fn spare_fds(sources: &[RawFd], open: impl Fn(RawFd) -> bool) -> Vec<RawFd> {
    let first = 3 + sources.len() as RawFd;
    (first..)
        .filter(|&fd| !sources.contains(&fd) && !open(fd))
        .take(sources.len())
        .collect()
}

/// Blocks until `pid` exits, then reaps it while holding `reaped`.
///
/// The lock is never held while blocking, so `kill` always gets it at once:
/// the wait happens first, without reaping (`WNOWAIT`), and only the
/// non-blocking reap runs under the lock.
fn reap(pid: libc::pid_t, reaped: &Mutex<Option<ExitStatus>>) -> ExitStatus {
    loop {
        // SAFETY: `info` is written by `waitid` and not read; WNOWAIT
        // leaves the child a zombie, so its pid stays ours until
        // `try_reap` below reaps it.
        let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
        let waited = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                info.as_mut_ptr(),
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if waited == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if let Some(status) = try_reap(pid, reaped) {
            return status;
        }
        // Still running although `waitid` returned (it should not): wait
        // again rather than spin.
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Reaps `pid` if it has exited, without blocking, holding `reaped`.
fn try_reap(pid: libc::pid_t, reaped: &Mutex<Option<ExitStatus>>) -> Option<ExitStatus> {
    let mut slot = crate::lock::lock(reaped);
    let mut raw_status = 0;
    // SAFETY: `raw_status` is a valid place for `waitpid` to write to.
    let done = unsafe { libc::waitpid(pid, &mut raw_status, libc::WNOHANG) };
    if done == pid
        || (done == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD))
    {
        // Reaped; or reaped by someone else (a handler that reaps every
        // child), which leaves no status to learn: reported as 0.
        let status = ExitStatus::from_raw(raw_status);
        *slot = Some(status);
        return Some(status);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn env() -> Vec<(OsString, OsString)> {
        std::env::vars_os().collect()
    }

    /// `/bin/sh -c script`, in `/`, with this process's environment.
    fn sh(script: &str) -> Child {
        spawn(
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            Some(Path::new("/")),
            &env(),
            &[],
        )
        .expect("spawn")
    }

    /// The child's exit status, waited for at most 10 s.
    async fn exit_status(child: &mut Child) -> ExitStatus {
        tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
            .await
            .expect("exits")
            .expect("status")
    }

    #[tokio::test]
    async fn places_fds_and_reports_the_exit_status() {
        // Two pipes whose write ends go to the child at 3 and 4 (given in
        // the opposite order, so a naive placement would clobber one).
        let (mut r1, w1) = std::io::pipe().expect("pipe");
        let (mut r2, w2) = std::io::pipe().expect("pipe");
        let script = "echo first >&3 && echo second >&4 && exit 7";
        let mut child = spawn(
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            Some(Path::new("/")),
            &env(),
            &[w2.as_fd(), w1.as_fd()],
        )
        .expect("spawn");
        drop((w1, w2));
        let status = exit_status(&mut child).await;
        assert_eq!(status.code(), Some(7));
        let read = |r: &mut std::io::PipeReader| {
            let mut s = String::new();
            std::io::Read::read_to_string(r, &mut s).expect("read");
            s
        };
        assert_eq!(read(&mut r2), "first\n");
        assert_eq!(read(&mut r1), "second\n");
        // Reaped: a second wait says the same, and kill is a no-op.
        assert_eq!(exit_status(&mut child).await.code(), Some(7));
        child.kill().expect("no-op");
    }

    #[test]
    fn spare_fds_are_low_and_clear_of_sources_targets_and_open_fds() {
        let none_open = |_| false;
        assert_eq!(spare_fds(&[], none_open), Vec::<RawFd>::new());
        // Sources inside the target range and past it.
        assert_eq!(spare_fds(&[4, 3], none_open), vec![5, 6]);
        assert_eq!(spare_fds(&[5, 6, 9], none_open), vec![7, 8, 10]);
        // Sources high up (a server near its limit): spares stay low.
        assert_eq!(spare_fds(&[1021, 1022, 1023], none_open), vec![6, 7, 8]);
        // An fd open here (which the child may inherit) is passed over.
        assert_eq!(spare_fds(&[4, 3], |fd| fd == 5), vec![6, 7]);
    }

    #[tokio::test]
    async fn runs_in_the_given_directory_with_the_given_environment() {
        let (mut r, w) = std::io::pipe().expect("pipe");
        let mut child = spawn(
            Path::new("/bin/sh"),
            &["-c".into(), "echo \"$(pwd) $ONLY\" >&3".into()],
            Some(Path::new("/tmp")),
            &[("ONLY".into(), "this".into())],
            &[w.as_fd()],
        )
        .expect("spawn");
        drop(w);
        exit_status(&mut child).await;
        let mut s = String::new();
        std::io::Read::read_to_string(&mut r, &mut s).expect("read");
        let tmp = std::fs::canonicalize("/tmp").expect("tmp");
        assert_eq!(s, format!("{} this\n", tmp.display()));
    }

    #[tokio::test]
    async fn kill_ends_a_running_child() {
        let mut child = spawn(
            Path::new("/bin/sleep"),
            &["30".into()],
            Some(Path::new("/")),
            &env(),
            &[],
        )
        .expect("spawn");
        child.kill().expect("kill");
        let status = exit_status(&mut child).await;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn under_a_runtime_no_thread_waits_for_the_child() {
        // A thread blocked in `waitid` for the next generation would have
        // to be scheduled once more before the old generation could exit.
        let mut child = sh("exit 5");
        assert_eq!(child.reaper, Reaper::Task);
        let status = exit_status(&mut child).await;
        assert_eq!(status.code(), Some(5));
    }

    #[test]
    fn without_a_runtime_a_thread_reaps_the_child() {
        let mut child = sh("exit 6");
        assert_eq!(child.reaper, Reaper::Thread);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let status = runtime.block_on(exit_status(&mut child));
        assert_eq!(status.code(), Some(6));
        // Reaped: killing it now is a no-op, not a signal to a reused pid.
        child.kill().expect("no-op");
    }

    #[test]
    fn a_binary_that_cannot_run_is_an_error_at_spawn() {
        let err = spawn(Path::new("/nonexistent/binary"), &[], None, &env(), &[])
            .expect_err("missing binary");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        // A file that is not an executable format (and has no `#!`).
        let dir = std::env::temp_dir().join(format!("handover-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let junk = dir.join("junk");
        std::fs::write(&junk, b"\x00\x01 not a program").expect("write");
        std::fs::set_permissions(&junk, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let err = spawn(&junk, &[], None, &env(), &[]).expect_err("not a program");
        assert_eq!(err.raw_os_error(), Some(libc::ENOEXEC));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
