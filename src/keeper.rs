//! The stable parent ([`Builder::stable_parent`](crate::Builder::stable_parent)):
//! where this process's exit would end its container (it is PID 1, or its
//! parent is an init that exits with it), it stays, as the parent of every
//! generation, and the generations come and go under it.
//!
//! It does for its generations what systemd does for a `Type=notify`
//! service with `NotifyAccess=all`, and no more: each generation tells it
//! `READY=1` and `MAINPID=` on its `NOTIFY_SOCKET` (handover's
//! [`Handover::ready`](crate::Handover::ready) does), so it knows the
//! current one; it passes the upgrade signals to the current generation,
//! and the shutdown signals to every generation still running (and to any
//! that becomes ready later); it reaps every child (an orphan's too, as
//! PID 1 must), is made the parent of orphaned generations
//! (`PR_SET_CHILD_SUBREAPER`), and exits, with the newest generation's exit
//! status, once no generation is left.

use std::convert::Infallible;
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitStatus;

use std::os::fd::AsFd;

use tokio::io::Interest;
use tokio::signal::unix::{SignalKind, signal};

use crate::error::Error;
use crate::inherit::env::{LISTEN_PID, NOTIFY_SOCKET, STABLE_PARENT_SOCKET};
use crate::notify;
use crate::signals::{self, Command};
use crate::sys::process::{self, Process, Sender};

/// Starts the first generation under this process, and stays its parent
/// and its successors' until none is left; then exits with the newest
/// one's status. Returns only if the first generation could not be started.
pub(crate) fn run(
    upgrade: Vec<SignalKind>,
    shutdown: Vec<SignalKind>,
) -> Result<Infallible, Error> {
    // A thread and a runtime of its own: `from_env` may be called inside
    // the application's runtime, or before it is built.
    let keeper = std::thread::Builder::new()
        .name("handover-keeper".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::io("building the stable parent's runtime", e))?;
            runtime.block_on(keep(upgrade, shutdown))
        })
        .map_err(|e| Error::io("starting the stable parent's thread", e))?;
    let status = keeper.join().unwrap_or_else(|_| {
        Err(Error::io(
            "the stable parent",
            std::io::Error::other("panicked"),
        ))
    })?;
    std::process::exit(exit_code(status))
}

/// The code a shell would report for `status`: the exit code, or 128 plus
/// the signal that ended the process.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// What the stable parent knows of its generations.
#[derive(Debug, Default)]
struct Generations {
    /// Those still running, oldest first: the last is the current one.
    running: Vec<Process>,
    /// The shutdown signal received, if one was: every generation that
    /// becomes ready from then on gets it too.
    stopping: Option<i32>,
    /// The newest generation: the container's outcome is its own.
    newest: Option<u32>,
    /// How it exited, if this process reaped it.
    newest_status: Option<ExitStatus>,
}

impl Generations {
    /// Watches `generation`, the newest from now on.
    fn add(&mut self, generation: Process) {
        self.newest = Some(generation.pid());
        self.newest_status = None;
        self.running.push(generation);
    }

    /// A generation said `READY=1` with `MAINPID=pid`.
    fn ready(&mut self, pid: u32) {
        if self.running.iter().any(|g| g.pid() == pid) {
            return;
        }
        match Process::open(pid) {
            Ok(generation) => {
                log!(info, pid, "a new generation is ready");
                if let Some(signal) = self.stopping {
                    let _ = generation.signal(signal);
                }
                self.add(generation);
            }
            Err(e) => {
                log!(warn, pid, error = %e, "a generation said it was ready but cannot be watched")
            }
        }
    }

    /// Passes an upgrade signal to the current generation.
    fn upgrade(&self, signal: i32) {
        if let Some(current) = self.running.last() {
            let _ = current.signal(signal);
        }
    }

    /// Passes a shutdown signal to every running generation.
    fn shut_down(&mut self, signal: i32) {
        self.stopping = Some(signal);
        for generation in &self.running {
            let _ = generation.signal(signal);
        }
    }

    /// Reaps every child that has exited, and forgets the generations that
    /// have; `Some(status)` once none is left: the newest generation's.
    ///
    /// An older generation that drained and exited 0 after the newest one
    /// died says nothing of how the service ended. If the newest was not
    /// this process's child when it exited (it died while its parent, the
    /// previous generation, was still draining), that parent reaped it and
    /// its status is lost: that counts as a failure, unless a shutdown
    /// signal had been passed on, which it was meant to end it.
    fn reap(&mut self) -> Option<ExitStatus> {
        loop {
            match process::reap_any() {
                Ok(Some((pid, status))) => {
                    if self.newest == Some(pid) {
                        self.newest_status = Some(status);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log!(warn, error = %e, "reaping children");
                    break;
                }
            }
        }
        // Also those that were not our children when they exited (a new
        // generation killed while its parent, the old one, was alive).
        self.running.retain(|g| !g.has_exited());
        if !self.running.is_empty() {
            return None;
        }
        Some(self.newest_status.unwrap_or_else(|| {
            let pid = self.newest;
            if self.stopping.is_some() {
                log!(info, ?pid, "the newest generation exited as another's child, after a shutdown signal");
                ExitStatus::from_raw(0)
            } else {
                log!(warn, ?pid, "the newest generation exited as another's child, its status unknown: exiting with 1");
                ExitStatus::from_raw(1 << 8)
            }
        }))
    }
}

/// The stable parent's life; resolves to the status to exit with.
async fn keep(upgrade: Vec<SignalKind>, shutdown: Vec<SignalKind>) -> Result<ExitStatus, Error> {
    // Signals are handled before the first generation exists, so none sent
    // from its start on is lost.
    let mut signals = signals::channel(&upgrade, &shutdown)?;
    let mut children =
        signal(SignalKind::child()).map_err(|e| Error::io("listening for SIGCHLD", e))?;
    let (socket, address) = notify_socket()?;
    if std::process::id() != 1 {
        process::become_subreaper()
            .map_err(|e| Error::io("becoming the generations' subreaper", e))?;
    }

    let first = start_first_generation(&address)?;
    let mut generations = Generations::default();
    generations.add(
        Process::open(first)
            .map_err(|e| Error::io("watching the first generation (pidfd_open)", e))?,
    );
    log!(info, pid = first, "started the first generation");

    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            Some((kind, command)) = signals.recv() => {
                let signal = kind.as_raw_value();
                if command == Command::Upgrade {
                    generations.upgrade(signal);
                } else {
                    log!(info, signal, "passing on a shutdown signal");
                    generations.shut_down(signal);
                }
            }
            received = socket.async_io(Interest::READABLE, || {
                process::recv_with_credentials(socket.as_fd(), &mut buf)
            }) => {
                if let Ok((n, sender)) = received {
                    message(&mut generations, &buf[..n], sender);
                }
            }
            _ = children.recv() => {
                // A generation tells this process it is ready before it tells
                // the previous one, whose exit comes after: every message
                // sent before the exit that woke us is read first.
                while let Ok((n, sender)) = socket.try_io(Interest::READABLE, || {
                    process::recv_with_credentials(socket.as_fd(), &mut buf)
                }) {
                    message(&mut generations, &buf[..n], sender);
                }
                if let Some(status) = generations.reap() {
                    log!(info, status = %status, "no generation left; exiting");
                    return Ok(status);
                }
            }
        }
    }
}

/// Handles one `sd_notify` message from a generation: learns a new ready
/// one, and passes the states on to the supervisor above, if there is one
/// (the pid it would see is this process's, so `MAINPID=` is dropped).
///
/// Believed only from a generation: a process of this user (or root) that
/// descends from this one, as the kernel says who sent it; and `READY=1`
/// only with `MAINPID=` the sender's own pid. Anyone else who can reach
/// the socket (it is an abstract address: any process in the network
/// namespace can) is ignored.
fn message(generations: &mut Generations, message: &[u8], sender: Option<Sender>) {
    let ours = crate::sys::effective_uid();
    let Some(sender) = sender.filter(|sender| {
        (sender.uid == ours || sender.uid == 0)
            && process::descends_from(sender.pid, std::process::id())
    }) else {
        log!(
            warn,
            ?sender,
            "ignored a notify message from a process that is not one of this stable parent's generations"
        );
        return;
    };
    let text = String::from_utf8_lossy(message);
    let mut ready = false;
    let mut main_pid = None;
    let mut upward = Vec::new();
    for line in text.lines() {
        match line.split_once('=') {
            Some(("READY", "1")) => {
                ready = true;
                upward.push(line);
            }
            Some(("MAINPID", pid)) => main_pid = pid.trim().parse::<u32>().ok(),
            Some(_) => upward.push(line),
            None => {}
        }
    }
    match (ready, main_pid) {
        (true, Some(pid)) if pid == sender.pid => generations.ready(pid),
        (true, Some(pid)) => {
            log!(
                warn,
                pid,
                sender = sender.pid,
                "ignored READY=1 for another process than its sender"
            );
            return;
        }
        _ => {}
    }
    if !upward.is_empty() {
        let _ = notify::sd_notify(&upward.join("\n"));
    }
}

/// A datagram socket for the generations' `sd_notify` messages, at an
/// abstract address unique to this process (nothing on the file system).
fn notify_socket() -> Result<(tokio::net::UnixDatagram, OsString), Error> {
    use std::os::linux::net::SocketAddrExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("{STABLE_PARENT_SOCKET}{}-{nanos}", std::process::id());
    let context = || format!("binding the stable parent's notify socket @{name}");
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| Error::io(context(), e))?;
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&address)
        .and_then(|s| {
            // Each message says who sent it: see `message`.
            process::pass_credentials(s.as_fd())?;
            s.set_nonblocking(true)?;
            tokio::net::UnixDatagram::from_std(s)
        })
        .map_err(|e| Error::io(context(), e))?;
    Ok((socket, format!("@{name}").into()))
}

/// Starts this binary again, with the same arguments, environment and
/// inherited fds (a socket-activated listener's too, without `LISTEN_PID`,
/// which named this process), as the first generation, in a process group
/// of its own.
fn start_first_generation(notify_address: &OsString) -> Result<u32, Error> {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    // The binary now running (by its own path, so that it keeps its name
    // in `ps`; `/proc/self/exe` if that cannot be read).
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let child = std::process::Command::new(exe)
        .arg0(&argv0)
        .args(args)
        .env(NOTIFY_SOCKET, notify_address)
        .env_remove(LISTEN_PID)
        // A process group of their own, which the generations' successors
        // inherit: an init that signals this process's group (dumb-init
        // does) then reaches the generations only through this process,
        // which passes each signal on once, to the right generation.
        .process_group(0)
        .spawn()
        .map_err(|e| Error::io("starting the first generation under the stable parent", e))?;
    Ok(child.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_a_shells() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
    }
}
