//! What a stable parent needs of the processes under it (Linux): to signal
//! a generation that is not (or not yet) its child without ever hitting a
//! reused pid, to reap whatever ends up its child, and to be the one its
//! grandchildren are handed to when their parent exits.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// A process, held by a pidfd: signals go to that process even after its
/// pid has been reused.
#[derive(Debug)]
pub(crate) struct Process {
    pid: u32,
    pidfd: OwnedFd,
}

impl Process {
    /// Opens a pidfd for `pid`; an error if it does not exist (or the
    /// kernel has no pidfds: before 5.3).
    pub(crate) fn open(pid: u32) -> io::Result<Process> {
        let raw = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        Ok(Process {
            pid,
            pidfd: pidfd_open(raw)?,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal`; an error if the process has been reaped.
    pub(crate) fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal takes an fd we own, a signal number, a
        // null siginfo (the kernel fills one in, as for `kill`) and flags.
        let sent = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if sent == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the process has exited (a zombie has).
    pub(crate) fn has_exited(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and a zero timeout: `poll` only says
        // whether the pidfd is readable, which it is once the process exits.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready == 1 && poll.revents & (libc::POLLIN | libc::POLLHUP) != 0
    }
}

/// A pidfd for process `pid` (`O_CLOEXEC`, as every pidfd); an error if
/// there is no such process, or no pidfds (kernels before 5.3, or a sandbox
/// that forbids them).
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: `fd` was just opened for us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Who sent a datagram, as the kernel says (`SCM_CREDENTIALS`): the pid
/// is `0` for a sender in a pid namespace this process cannot see into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sender {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
}

/// Has every datagram received on the Unix socket `fd` carry its
/// sender's credentials (`SO_PASSCRED`).
pub(crate) fn pass_credentials(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a valid `c_int` for the call, whose size is given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one datagram into `buf` without blocking (`WouldBlock` when
/// none is there), with its sender's credentials if the socket passes them
/// (see [`pass_credentials`]). Fds sent with it are closed.
pub(crate) fn recv_with_credentials(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Option<Sender>)> {
    let received = super::fdpass::recv_message(fd, buf, libc::MSG_DONTWAIT)?;
    Ok((received.read, received.sender))
}

/// The parent of process `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name, in parentheses, may hold spaces and parentheses: what
    // follows the last `)` is `state ppid …`.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` is `ancestor` or one of its descendants.
pub(crate) fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut current = pid;
    // A chain longer than this is not one of ours.
    for _ in 0..64 {
        if current == ancestor {
            return true;
        }
        match parent_of(current) {
            Some(parent) if parent != 0 && parent != current => current = parent,
            _ => return false,
        }
    }
    false
}

/// Reaps one child that has exited, without blocking: `Ok(None)` when none
/// has (or none is left, `ECHILD`).
pub(crate) fn reap_any() -> io::Result<Option<(u32, ExitStatus)>> {
    let mut raw_status = 0;
    // SAFETY: `raw_status` is a valid place for `waitpid` to write to.
    let pid = unsafe { libc::waitpid(-1, &mut raw_status, libc::WNOHANG) };
    match pid {
        0 => Ok(None),
        -1 => {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ECHILD) {
                Ok(None)
            } else {
                Err(e)
            }
        }
        pid => Ok(Some((pid as u32, ExitStatus::from_raw(raw_status)))),
    }
}

/// Makes this process the one its orphaned descendants are handed to
/// (`PR_SET_CHILD_SUBREAPER`), as PID 1 is to every orphan.
pub(crate) fn become_subreaper() -> io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
