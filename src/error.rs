//! The crate's error type, and the one services and bodies may fail with.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// The error type services and bodies may fail with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong, said so that an operator can act on it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An inheritance variable (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`,
    /// `HANDOVER_READY_FD`, `HANDOVER_BOUND_FDNAMES`, `HANDOVER_STANDBY_FD`,
    /// `HANDOVER_GENERATION`)
    /// has a value that cannot be right.
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
    /// An inherited fd is not what the environment promised.
    Fd {
        /// The fd number.
        fd: i32,
        /// The name it was passed under.
        name: String,
        /// What it is instead.
        reason: String,
    },
    /// A listener could not be taken as asked (several inherited ones fit
    /// it, say).
    Listener {
        /// The name the application asked for.
        name: String,
        /// Why, with the inherited listeners concerned.
        reason: String,
    },
    /// A system call failed.
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
    /// The binary to start the next generation from is missing or cannot be
    /// run.
    Binary {
        /// The path resolved at start-up.
        path: PathBuf,
        /// Why it cannot be run.
        reason: String,
    },
    /// An upgrade is already under way; this one was refused.
    UpgradeInProgress,
    /// This process is PID 1 (a container's init): its exit would end the
    /// container and the new generation with it, so it does not upgrade.
    /// [`Builder::stable_parent`](crate::Builder::stable_parent) makes
    /// upgrades work there.
    Pid1,
    /// This process's parent is an init that exits when this process does:
    /// tini (Docker's `--init`), dumb-init, catatonit (Podman's `--init`),
    /// or a shell running a container's entry script as PID 1. The old
    /// generation's exit would end the container and the new generation
    /// with it, so it does not upgrade.
    /// [`Builder::stable_parent`](crate::Builder::stable_parent) makes
    /// upgrades work there.
    InitParent {
        /// The parent's pid.
        pid: u32,
        /// The parent's name (`/proc/PID/comm`).
        name: String,
    },
    /// The new generation exited before it was ready.
    ChildExited {
        /// Its pid.
        pid: u32,
        /// How it exited.
        status: ExitStatus,
    },
    /// The new generation was not ready in time; it was killed and reaped.
    ReadyTimeout {
        /// Its pid.
        pid: u32,
        /// How long it was given.
        timeout: Duration,
    },
    /// The new generation closed its readiness pipe without saying it was
    /// ready.
    NotReady {
        /// Its pid.
        pid: u32,
    },
    /// The upgrade was called off because this process is shutting down;
    /// the pending child was killed and reaped.
    Cancelled,
    /// The server is already draining: there is nothing left to upgrade.
    Draining,
    /// The state to hand to the next generation could not be taken (the
    /// snapshot failed, panicked, or is over the size limit) or read: the
    /// upgrade fails, and this generation serves on.
    State {
        /// What went wrong.
        reason: String,
    },
    /// What a server answered on its control socket (see
    /// [`control`](crate::control)): the request failed there.
    Control {
        /// Why, from a small fixed set (see [`Error::reason`]): `child_exited`,
        /// `ready_timeout`, `in_progress`, …, or `refused` (the peer may not
        /// ask), `bad_request`, `busy` (too many control connections).
        reason: String,
        /// The server's own words.
        message: String,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A short, fixed name for what went wrong, for scripts and dashboards
    /// (never free text): `in_progress`, `container` (an upgrade refused
    /// where the old generation's exit would end the container),
    /// `binary`, `child_exited`, `ready_timeout`, `not_ready`, `cancelled`,
    /// `draining`, `state`, `env`, `fd`, `listener`, `io`, or, for an error a
    /// server answered on its control socket, the reason it gave.
    pub fn reason(&self) -> &str {
        match self {
            Error::Env { .. } => "env",
            Error::Fd { .. } => "fd",
            Error::Listener { .. } => "listener",
            Error::Io { .. } => "io",
            Error::Binary { .. } => "binary",
            Error::UpgradeInProgress => "in_progress",
            Error::Pid1 | Error::InitParent { .. } => "container",
            Error::ChildExited { .. } => "child_exited",
            Error::ReadyTimeout { .. } => "ready_timeout",
            Error::NotReady { .. } => "not_ready",
            Error::Cancelled => "cancelled",
            Error::Draining => "draining",
            Error::State { .. } => "state",
            Error::Control { reason, .. } => reason,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Env { var, value, reason } => write!(f, "{var}={value:?}: {reason}"),
            Error::Fd { fd, name, reason } => {
                write!(f, "inherited fd {fd} named {name:?}: {reason}")
            }
            Error::Listener { name, reason } => write!(f, "listener {name:?}: {reason}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Binary { path, reason } => {
                write!(f, "cannot start {}: {reason}", path.display())
            }
            Error::UpgradeInProgress => f.write_str("an upgrade is already in progress"),
            Error::Pid1 => f.write_str(
                "refusing to upgrade as PID 1: the old generation's exit would end the container; \
                 turn on Builder::stable_parent, or use a rolling update or a supervisor such as \
                 systemd",
            ),
            Error::InitParent { pid, name } => write!(
                f,
                "refusing to upgrade: the parent process, {name} (pid {pid}), exits when this \
                 process does, and would end the container and the new generation with it; \
                 turn on Builder::stable_parent, or use a rolling update or a supervisor such as \
                 systemd"
            ),
            Error::ChildExited { pid, status } => {
                write!(
                    f,
                    "new generation (pid {pid}) exited before it was ready: {status}"
                )
            }
            Error::ReadyTimeout { pid, timeout } => write!(
                f,
                "new generation (pid {pid}) was not ready within {timeout:?}; it was killed"
            ),
            Error::NotReady { pid } => write!(
                f,
                "new generation (pid {pid}) closed its readiness pipe without being ready; it was killed"
            ),
            Error::Cancelled => {
                f.write_str("upgrade cancelled by shutdown; the new generation was killed")
            }
            Error::Draining => f.write_str("the server is draining; no upgrade"),
            Error::State { reason } => {
                write!(f, "handing state to the next generation: {reason}")
            }
            Error::Control { reason, message } => {
                write!(f, "the server answered {reason}: {message}")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { ref source, .. } => io::Error::new(source.kind(), e),
            e => io::Error::other(e),
        }
    }
}
