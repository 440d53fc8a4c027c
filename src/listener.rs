//! Listeners: inherited from the environment (a previous generation or
//! systemd socket activation), or bound here.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::Error;
use crate::sys::{self, Family};
use crate::upgrade::FileId;

/// Number of inherited listeners (systemd's socket-activation protocol).
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// `:`-separated names of the inherited listeners.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The pid the inherited listeners are meant for, when set.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// The readiness channel, set by a previous generation: the new generation
/// writes `READY=<pid>` on it; the previous one, once drained, says how
/// its drain went.
pub const HANDOVER_READY_FD: &str = "HANDOVER_READY_FD";
/// `:`-separated names of the inherited listeners that a previous
/// generation bound itself (not systemd's): those follow a changed address.
pub const HANDOVER_BOUND_FDNAMES: &str = "HANDOVER_BOUND_FDNAMES";
/// Set in a standby (see [`Builder::standby`](crate::Builder::standby)):
/// the Unix socket on which the previous generation will send the
/// listeners and the readiness pipe.
pub const HANDOVER_STANDBY_FD: &str = "HANDOVER_STANDBY_FD";

/// This generation's number, set by the previous generation to its own
/// plus one (absent: 1).
pub const HANDOVER_GENERATION: &str = "HANDOVER_GENERATION";

/// The state the previous generation handed over: an fd holding a sealed
/// snapshot (see [`Handover::hand_over_state`](crate::Handover::hand_over_state)).
pub const HANDOVER_STATE_FD: &str = "HANDOVER_STATE_FD";

/// The most state a generation hands over or takes, unless
/// [`Builder::max_state_size`](crate::Builder::max_state_size) says
/// otherwise: 1 MiB.
pub const DEFAULT_MAX_STATE_SIZE: usize = 1 << 20;

/// Every variable of the inheritance protocol: removed from the environment
/// once read, and never passed on as they were to the next generation.
pub(crate) const INHERITANCE_VARS: [&str; 8] = [
    LISTEN_FDS,
    LISTEN_FDNAMES,
    LISTEN_PID,
    HANDOVER_READY_FD,
    HANDOVER_BOUND_FDNAMES,
    HANDOVER_STANDBY_FD,
    HANDOVER_GENERATION,
    HANDOVER_STATE_FD,
];

/// The first inherited fd.
pub(crate) const LISTEN_FDS_START: RawFd = 3;
/// Listen backlog of the sockets bound here.
pub const BACKLOG: u32 = 1024;
/// More inherited listeners than this is taken as a malformed environment.
const MAX_LISTEN_FDS: usize = sys::MAX_PASSED_FDS - 1;

/// The inheritance variables, parsed and checked against each other, before
/// any fd is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EnvSpec {
    /// (fd, name) of each inherited listener.
    pub(crate) fds: Vec<(RawFd, String)>,
    /// The readiness pipe's write end.
    pub(crate) ready_fd: Option<RawFd>,
    /// This generation's number (see [`HANDOVER_GENERATION`]).
    pub(crate) generation: u64,
    /// The state snapshot's fd (see [`HANDOVER_STATE_FD`]).
    pub(crate) state_fd: Option<RawFd>,
}

/// A listener name: 1 to 255 characters, no `:` (the separator of
/// `LISTEN_FDNAMES`) and no control characters.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.contains(':')
        && !name.chars().any(char::is_control)
}

fn env_error(var: &'static str, value: &str, reason: impl Into<String>) -> Error {
    Error::Env {
        var,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Parses the inheritance variables. Pure: it reads no environment and
/// touches no fd, so it can be tested (and fuzzed) on any input.
pub(crate) fn parse_env(
    listen_fds: Option<&str>,
    listen_fdnames: Option<&str>,
    listen_pid: Option<&str>,
    ready_fd: Option<&str>,
    our_pid: u32,
) -> Result<EnvSpec, Error> {
    if let Some(pid) = listen_pid {
        let parsed: u32 = pid
            .trim()
            .parse()
            .map_err(|_| env_error("LISTEN_PID", pid, "not a process id"))?;
        if parsed != our_pid {
            return Err(env_error(
                "LISTEN_PID",
                pid,
                format!("the listeners are meant for pid {parsed}, and this is pid {our_pid}"),
            ));
        }
    }
    let count = match listen_fds {
        None => {
            if let Some(names) = listen_fdnames {
                return Err(env_error(LISTEN_FDNAMES, names, "set without LISTEN_FDS"));
            }
            0
        }
        Some(value) => {
            let n: usize = value
                .trim()
                .parse()
                .map_err(|_| env_error("LISTEN_FDS", value, "not a number of fds"))?;
            if n > MAX_LISTEN_FDS {
                return Err(env_error(
                    "LISTEN_FDS",
                    value,
                    format!("more than {MAX_LISTEN_FDS} listeners"),
                ));
            }
            n
        }
    };
    let names: Vec<String> = match listen_fdnames {
        None => vec!["unknown".to_owned(); count],
        Some(value) => {
            let names: Vec<&str> = if value.is_empty() && count == 0 {
                Vec::new()
            } else {
                value.split(':').collect()
            };
            if names.len() != count {
                return Err(env_error(
                    "LISTEN_FDNAMES",
                    value,
                    format!("{} names for {count} fds", names.len()),
                ));
            }
            for name in &names {
                if !is_valid_name(name) {
                    return Err(env_error(
                        "LISTEN_FDNAMES",
                        value,
                        format!("{name:?} is not a valid fd name"),
                    ));
                }
            }
            names.into_iter().map(str::to_owned).collect()
        }
    };
    let fds = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| (LISTEN_FDS_START + i as RawFd, name))
        .collect();
    let ready_fd = match ready_fd {
        None => None,
        Some(value) => {
            let fd: RawFd = value
                .trim()
                .parse()
                .map_err(|_| env_error("HANDOVER_READY_FD", value, "not an fd number"))?;
            let listeners_end = LISTEN_FDS_START + count as RawFd;
            if fd < LISTEN_FDS_START || (LISTEN_FDS_START..listeners_end).contains(&fd) {
                return Err(env_error(
                    "HANDOVER_READY_FD",
                    value,
                    format!(
                        "must be an fd of its own, not 0-2 or a listener's (3..{listeners_end})"
                    ),
                ));
            }
            Some(fd)
        }
    };
    Ok(EnvSpec {
        fds,
        ready_fd,
        generation: 1,
        state_fd: None,
    })
}

/// Parses `HANDOVER_GENERATION`: absent, 1 (a first generation); else a
/// number from 2 on, which only a previous generation sets.
pub(crate) fn parse_generation(value: Option<&str>) -> Result<u64, Error> {
    let Some(value) = value else {
        return Ok(1);
    };
    match value.trim().parse::<u64>() {
        Ok(n) if n >= 2 => Ok(n),
        _ => Err(env_error(
            HANDOVER_GENERATION,
            value,
            "not a generation number (2 or more)",
        )),
    }
}

/// Parses `HANDOVER_STATE_FD`: an fd of its own, after the listeners and
/// the readiness pipe.
pub(crate) fn parse_state_fd(value: Option<&str>, spec: &EnvSpec) -> Result<Option<RawFd>, Error> {
    let Some(value) = value else {
        return Ok(None);
    };
    let fd: RawFd = value
        .trim()
        .parse()
        .map_err(|_| env_error(HANDOVER_STATE_FD, value, "not an fd number"))?;
    let taken = spec.fds.iter().any(|(listener, _)| *listener == fd) || spec.ready_fd == Some(fd);
    if fd < LISTEN_FDS_START || taken {
        return Err(env_error(
            HANDOVER_STATE_FD,
            value,
            "must be an fd of its own, not 0-2, a listener's or the readiness pipe's",
        ));
    }
    Ok(Some(fd))
}

/// Parses `HANDOVER_BOUND_FDNAMES`: names that must each be an inherited
/// listener's. Absent (systemd, `systemfd`, or a generation of a handover
/// that did not say): none.
pub(crate) fn parse_bound(value: Option<&str>, spec: &EnvSpec) -> Result<Vec<String>, Error> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    if value.is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(':')
        .map(|name| {
            if spec.fds.iter().any(|(_, inherited)| inherited == name) {
                Ok(name.to_owned())
            } else {
                Err(env_error(
                    HANDOVER_BOUND_FDNAMES,
                    value,
                    format!("{name:?} is not among the inherited listeners' names"),
                ))
            }
        })
        .collect()
}

struct Inherited {
    fd: RawFd,
    name: String,
    socket: OwnedFd,
    family: Family,
    /// Where it is bound: what decides when no name matches.
    address: Address,
    /// Bound by a previous generation, not passed by systemd: it follows a
    /// changed address.
    bound: bool,
}

/// A listener this generation serves, as the next generation receives it.
struct Active {
    name: String,
    socket: OwnedFd,
    /// Bound by this generation or an earlier one (not systemd's).
    bound: bool,
}

struct State {
    from_previous_generation: bool,
    generation: u64,
    /// What the previous generation handed over, until taken.
    previous_state: Option<Vec<u8>>,
    /// Where the previous generation's drain report comes, once ready.
    report_from: Option<OwnedFd>,
    inherited: Vec<Inherited>,
    /// The Unix socket files of the listeners a generation bound (not
    /// systemd's), with their identity: removed on the final shutdown if
    /// they still name those sockets.
    socket_files: Vec<(PathBuf, FileId)>,
    /// Every listener this generation serves, by name: what the next
    /// generation receives.
    active: Vec<Active>,
    ready_pipe: Option<File>,
}

/// The listener source: listeners inherited from the environment, or bound.
///
/// [`from_env`](Listeners::from_env) reads the inheritance variables once,
/// checks every inherited fd (an open, listening stream socket), sets
/// `FD_CLOEXEC` on it again, and removes the variables from the environment
/// so that the application's own children do not see them. Then
/// [`tcp`](Listeners::tcp) and [`unix`](Listeners::unix) give the inherited
/// listener of a name, or bind a new one.
///
/// Variables read (systemd-compatible, so the same code path serves socket
/// activation, a previous generation, and tools such as `systemfd`):
///
/// | variable | meaning |
/// |---|---|
/// | `LISTEN_FDS` | how many listeners, at fds 3, 4, … |
/// | `LISTEN_FDNAMES` | their names, `:`-separated (default: `unknown`) |
/// | `LISTEN_PID` | when set, must be this process's pid |
/// | `HANDOVER_READY_FD` | the readiness pipe of a previous generation |
/// | `HANDOVER_BOUND_FDNAMES` | which of them a previous generation bound itself |
/// | `HANDOVER_GENERATION` | this generation's number, from 2 on (absent: 1) |
/// | `HANDOVER_STATE_FD` | a sealed snapshot of the previous generation's state |
/// | `HANDOVER_STANDBY_FD` | in a standby ([`Builder::standby`](crate::Builder::standby)): the socket that all of the above will come on |
///
/// In a standby, `from_env` waits, blocking, until the previous generation
/// hands over, and exits the process (status 0) if it never does.
///
/// A listener that systemd passed stays where its `.socket` unit put it,
/// whatever address the application asks for (a warning says so). One
/// that a generation bound itself follows the address asked for: if that
/// has changed since (a reload with a new port), it is bound afresh there,
/// and the old socket is closed once this generation is ready.
pub struct Listeners {
    state: Mutex<State>,
}

impl Listeners {
    /// Reads, checks and adopts what the environment passes, then removes
    /// the variables from the environment.
    ///
    /// Call it once, early in `main`, before other threads read the
    /// environment (removing a variable while another thread reads the
    /// environment is undefined behaviour in C libraries). A second call
    /// finds nothing to inherit.
    ///
    /// # Errors
    ///
    /// A malformed variable, or an inherited fd that is not an open,
    /// listening stream socket: the error names the variable or the fd and
    /// says what is wrong. Nothing is bound in its place.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_env_with(DEFAULT_MAX_STATE_SIZE)
    }

    /// [`from_env`](Self::from_env), taking at most `max_state` bytes of
    /// state from the previous generation.
    pub(crate) fn from_env_with(max_state: usize) -> Result<Self, Error> {
        let var = |name: &str| std::env::var(name).ok();
        let standby = var(HANDOVER_STANDBY_FD);
        let spec = parse_env(
            var(LISTEN_FDS).as_deref(),
            var(LISTEN_FDNAMES).as_deref(),
            var(LISTEN_PID).as_deref(),
            var(HANDOVER_READY_FD).as_deref(),
            std::process::id(),
        );
        let bound = var(HANDOVER_BOUND_FDNAMES);
        let generation = var(HANDOVER_GENERATION);
        let state = var(HANDOVER_STATE_FD);
        for name in INHERITANCE_VARS {
            sys::remove_env(name);
        }
        if let Some(standby) = standby {
            // A standby's environment has none of the others: all of it
            // comes on the socket.
            let (spec, bound) = crate::standby::wait_for_upgrade(&standby)?;
            return Self::adopt(spec, &bound, max_state);
        }
        let mut spec = spec?;
        spec.generation = parse_generation(generation.as_deref())?;
        spec.state_fd = parse_state_fd(state.as_deref(), &spec)?;
        let bound = parse_bound(bound.as_deref(), &spec)?;
        Self::adopt(spec, &bound, max_state)
    }

    /// No inherited listeners: every `tcp`/`unix` call binds.
    pub fn empty() -> Self {
        Self {
            state: Mutex::new(State {
                from_previous_generation: false,
                generation: 1,
                previous_state: None,
                report_from: None,
                inherited: Vec::new(),
                active: Vec::new(),
                socket_files: Vec::new(),
                ready_pipe: None,
            }),
        }
    }

    fn adopt(spec: EnvSpec, bound: &[String], max_state: usize) -> Result<Self, Error> {
        // The state first: an error below must not leave its fd behind.
        let previous_state = match spec.state_fd {
            None => None,
            Some(fd) => {
                let state_error = |reason: String| Error::Fd {
                    fd,
                    name: HANDOVER_STATE_FD.into(),
                    reason,
                };
                let file = sys::adopt(fd).map_err(|e| state_error(e.to_string()))?;
                Some(sys::read_sealed(file, max_state as u64).map_err(state_error)?)
            }
        };
        let mut inherited = Vec::with_capacity(spec.fds.len());
        for (fd, name) in spec.fds {
            let fd_error = |reason: String| Error::Fd {
                fd,
                name: name.clone(),
                reason,
            };
            let socket = sys::adopt(fd).map_err(|e| fd_error(e.to_string()))?;
            let family = sys::listening_stream_socket(socket.as_fd())
                .map_err(|e| fd_error(e.to_string()))?;
            sys::set_cloexec(socket.as_fd())
                .map_err(|e| fd_error(format!("cannot set FD_CLOEXEC: {e}")))?;
            if inherited.iter().any(|i: &Inherited| i.name == name) && name != "unknown" {
                return Err(fd_error("the name is given to two fds".into()));
            }
            let address = Address::of(&socket, family);
            inherited.push(Inherited {
                fd,
                bound: bound.contains(&name),
                name,
                socket,
                family,
                address,
            });
        }
        let ready_pipe = match spec.ready_fd {
            None => None,
            Some(fd) => {
                let pipe = sys::adopt(fd).map_err(|e| Error::Fd {
                    fd,
                    name: HANDOVER_READY_FD.into(),
                    reason: e.to_string(),
                })?;
                // A Unix socket (which carries the drain report back), or
                // a pipe (from a generation of an older version).
                let kind = sys::is_socket(pipe.as_fd())
                    .and_then(|socket| Ok(socket || sys::is_pipe(pipe.as_fd())?));
                let reason = match kind {
                    Ok(true) => None,
                    Ok(false) => Some("it is not a socket or a pipe".to_owned()),
                    Err(e) => Some(format!("it could not be inspected: {e}")),
                };
                if let Some(reason) = reason {
                    return Err(Error::Fd {
                        fd,
                        name: HANDOVER_READY_FD.into(),
                        reason,
                    });
                }
                let _ = sys::set_cloexec(pipe.as_fd());
                Some(File::from(pipe))
            }
        };
        if !inherited.is_empty() {
            log!(info,
                listeners = %inherited.iter().map(|i| format!("{}=fd {}", i.name, i.fd)).collect::<Vec<_>>().join(", "),
                from_previous_generation = ready_pipe.is_some(),
                "inherited listeners"
            );
        }
        Ok(Self {
            state: Mutex::new(State {
                from_previous_generation: ready_pipe.is_some(),
                generation: spec.generation,
                previous_state,
                report_from: None,
                inherited,
                active: Vec::new(),
                socket_files: Vec::new(),
                ready_pipe,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a previous generation is waiting for this one to be ready.
    pub fn is_inherited_from_previous_generation(&self) -> bool {
        self.lock().from_previous_generation
    }

    /// This generation's number: 1 for a fresh start, and one more than
    /// the previous generation's after each upgrade.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The state the previous generation handed over, whole (see
    /// [`Handover::hand_over_state`](crate::Handover::hand_over_state)):
    /// `None` in a first generation, when the previous one handed over
    /// none, or once taken.
    pub fn take_previous_state(&self) -> Option<Vec<u8>> {
        self.lock().previous_state.take()
    }

    /// Takes the inherited listener for `name`, if there is one, and
    /// whether a previous generation bound it: the one passed under that
    /// name; else the one bound where `want` asks (systemd passed it
    /// unnamed, or named after its unit), with a log line that says so.
    fn take_inherited(&self, name: &str, want: Want<'_>) -> Result<Option<(OwnedFd, bool)>, Error> {
        if !is_valid_name(name) {
            return Err(Error::io(
                format!("listener name {name:?}"),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a name is 1 to 255 characters, without ':' or control characters",
                ),
            ));
        }
        let mut state = self.lock();
        if state.active.iter().any(|active| active.name == name) {
            return Err(Error::io(
                format!("listener {name:?}"),
                std::io::Error::new(std::io::ErrorKind::AlreadyExists, "taken twice"),
            ));
        }
        let unix = matches!(want, Want::Unix(_));
        let Some(pos) = state.inherited.iter().position(|i| i.name == name) else {
            return take_by_address(&mut state.inherited, name, want);
        };
        let inherited = state.inherited.remove(pos);
        let fits = match inherited.family {
            Family::Inet | Family::Inet6 => !unix,
            Family::Unix => unix,
            Family::Other(_) => false,
        };
        if !fits {
            let (fd, family) = (inherited.fd, inherited.family);
            // Put it back: it is reported (and closed) with the unused ones.
            state.inherited.insert(pos, inherited);
            return Err(Error::Fd {
                fd,
                name: name.into(),
                reason: format!(
                    "asked for a {} listener, and it is {}",
                    if unix { "Unix" } else { "TCP" },
                    family.describe()
                ),
            });
        }
        Ok(Some((inherited.socket, inherited.bound)))
    }

    /// Keeps a copy of a listener taken, for the next generation; and, if a
    /// generation bound it at the Unix socket path `file`, that file.
    fn register(
        &self,
        name: &str,
        fd: &impl AsFd,
        bound: bool,
        file: Option<&Path>,
    ) -> Result<(), Error> {
        let socket = fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io(format!("duplicating listener {name:?}"), e))?;
        let mut state = self.lock();
        if let Some(path) = file.filter(|_| bound) {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
            if let Some(id) = FileId::of(&path) {
                state.socket_files.push((path, id));
            }
        }
        state.active.push(Active {
            name: name.to_owned(),
            socket,
            bound,
        });
        Ok(())
    }

    /// Every inherited listener not taken yet, with its fd, name and
    /// address, for an error that says why none of them was used.
    fn inherited_names(&self) -> String {
        describe(&self.lock().inherited)
    }

    /// The TCP listener named `name`: the inherited one, or a new one bound
    /// to `addr` (with `SO_REUSEADDR` and a backlog of [`BACKLOG`]).
    ///
    /// An inherited listener bound elsewhere than `addr` is kept if systemd
    /// passed it, and replaced by one bound to `addr` if a previous
    /// generation bound it (see [`Listeners`]). A port of 0 in `addr`
    /// matches any inherited listener.
    ///
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    ///
    /// The inherited fd of that name is not a TCP listener, or binding
    /// failed (the error names the address and the listeners that were
    /// inherited, which helps when a name does not match).
    pub fn tcp(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
    ) -> Result<tokio::net::TcpListener, Error> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| Error::io(format!("resolving the address of listener {name:?}"), e))?
            .collect();
        let bind = || {
            bind_tcp(&addrs).map_err(|e| {
                Error::io(
                    format!(
                        "binding listener {name:?} to {addrs:?} (inherited: {})",
                        self.inherited_names()
                    ),
                    e,
                )
            })
        };
        let (listener, bound) = match self.take_inherited(name, Want::Tcp(&addrs))? {
            Some((fd, bound)) => {
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true)
                    .map_err(|e| Error::io(format!("listener {name:?}"), e))?;
                let moved = std.local_addr().ok().filter(|local| {
                    !addrs.is_empty() && !addrs.iter().any(|a| a == local || a.port() == 0)
                });
                match moved {
                    Some(local) if bound => {
                        let listener = bind()?;
                        log!(info, name, was = %local, now = ?listener.local_addr().ok(), "listener moved to the address asked for; the old socket closes when this generation is ready");
                        (listener, true)
                    }
                    moved => {
                        if let Some(local) = moved {
                            log!(warn, name, %local, asked = ?addrs, "listener passed by systemd is bound elsewhere than asked; keeping it");
                        }
                        let listener = tokio::net::TcpListener::from_std(std)
                            .map_err(|e| Error::io(format!("listener {name:?}"), e))?;
                        (listener, bound)
                    }
                }
            }
            None => (bind()?, true),
        };
        self.register(name, &listener, bound, None)?;
        Ok(listener)
    }

    /// The Unix listener named `name`: the inherited one, or a new one bound
    /// at `path`. A socket file left at `path` by a process that is gone is
    /// removed first; one that a live process still accepts on is an error.
    ///
    /// An inherited listener at another path follows `path` as a TCP one
    /// follows its address (see [`tcp`](Self::tcp)).
    ///
    /// Must be called within a Tokio runtime.
    ///
    /// # Errors
    ///
    /// As for [`tcp`](Self::tcp), and when `path` is taken by a live
    /// listener or by something that is not a socket.
    pub fn unix(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<tokio::net::UnixListener, Error> {
        let path = path.as_ref();
        let bind = || {
            bind_unix(path).map_err(|e| {
                Error::io(
                    format!(
                        "binding listener {name:?} at {} (inherited: {})",
                        path.display(),
                        self.inherited_names()
                    ),
                    e,
                )
            })
        };
        let (listener, bound) = match self.take_inherited(name, Want::Unix(path))? {
            Some((fd, bound)) => {
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true)
                    .map_err(|e| Error::io(format!("listener {name:?}"), e))?;
                let local = std.local_addr().ok();
                let local = local.as_ref().and_then(|a| a.as_pathname());
                let moved = local.filter(|local| !same_socket_path(local, path));
                match moved {
                    Some(local) if bound => {
                        let was = local.display().to_string();
                        let listener = bind()?;
                        log!(info, name, was, now = %path.display(), "listener moved to the path asked for; the old socket closes when this generation is ready");
                        (listener, true)
                    }
                    moved => {
                        if let Some(local) = moved {
                            log!(warn, name, local = %local.display(), asked = %path.display(), "listener passed by systemd is bound elsewhere than asked; keeping it");
                        }
                        let listener = tokio::net::UnixListener::from_std(std)
                            .map_err(|e| Error::io(format!("listener {name:?}"), e))?;
                        (listener, bound)
                    }
                }
            }
            None => (bind()?, true),
        };
        self.register(name, &listener, bound, Some(path))?;
        Ok(listener)
    }

    /// Tells a waiting previous generation that this one is ready, and
    /// closes the inherited listeners that were not taken (each is logged).
    ///
    /// [`Handover`](crate::Handover) calls it for you when serving starts;
    /// call it yourself only when you use `Listeners` alone. Calling it
    /// again does nothing.
    pub fn ready(&self) -> Result<(), Error> {
        let mut state = self.lock();
        for unused in state.inherited.drain(..) {
            log!(
                warn,
                name = unused.name,
                fd = unused.fd,
                "inherited listener was not taken by the application; closing it"
            );
        }
        if let Some(mut pipe) = state.ready_pipe.take() {
            let message = format!("READY={}\n", std::process::id());
            pipe.write_all(message.as_bytes())
                .map_err(|e| Error::io("telling the previous generation we are ready", e))?;
            // A socket: the previous generation says on it how its drain
            // went.
            if sys::is_socket(pipe.as_fd()).unwrap_or(false) {
                state.report_from = Some(OwnedFd::from(pipe));
            }
        }
        Ok(())
    }

    /// The channel on which the previous generation says how its drain
    /// went, once this generation is ready (see
    /// [`ready`](Self::ready)); `None` in a first generation.
    pub(crate) fn take_report_channel(&self) -> Option<OwnedFd> {
        self.lock().report_from.take()
    }

    /// On the final shutdown: closes this process's copies of every
    /// listener a generation bound (the ones kept for the next generation,
    /// and inherited ones not taken), so that each socket closes the moment
    /// the serve loop drops its own, and a new connection is refused
    /// instead of waiting in a backlog nobody will read. The ones systemd
    /// passed stay open: systemd keeps them for the next start.
    pub(crate) fn close_bound(&self) {
        let mut state = self.lock();
        let closed = state.active.iter().filter(|a| a.bound).count()
            + state.inherited.iter().filter(|i| i.bound).count();
        state.active.retain(|active| !active.bound);
        state.inherited.retain(|inherited| !inherited.bound);
        if closed > 0 {
            log!(debug, closed, "closed the listeners kept for an upgrade");
        }
    }

    /// Removes the Unix socket files of the listeners a generation bound,
    /// each only if it still names the socket bound there (a new server
    /// may have bound the path since). Calling it again does nothing.
    pub(crate) fn remove_socket_files(&self) {
        let files = std::mem::take(&mut self.lock().socket_files);
        for (path, id) in files {
            if FileId::of(&path) != Some(id) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => log!(info, path = %path.display(), "removed the socket file"),
                Err(e) => {
                    log!(warn, path = %path.display(), error = %e, "could not remove the socket file")
                }
            }
        }
    }

    /// Duplicates of every listener taken so far, with their names and
    /// whether a generation bound them: what the next generation receives.
    pub(crate) fn for_next_generation(&self) -> Result<Vec<(String, OwnedFd, bool)>, Error> {
        self.lock()
            .active
            .iter()
            .map(|active| {
                let name = &active.name;
                active
                    .socket
                    .try_clone()
                    .map(|fd| (name.clone(), fd, active.bound))
                    .map_err(|e| Error::io(format!("duplicating listener {name:?}"), e))
            })
            .collect()
    }
}

impl fmt::Debug for Listeners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Listeners")
            .field(
                "inherited",
                &state
                    .inherited
                    .iter()
                    .map(|i| (&i.name, i.fd))
                    .collect::<Vec<_>>(),
            )
            .field(
                "active",
                &state.active.iter().map(|a| &a.name).collect::<Vec<_>>(),
            )
            .field("from_previous_generation", &state.ready_pipe.is_some())
            .finish()
    }
}

/// What the application asks a listener to be bound to.
#[derive(Clone, Copy)]
enum Want<'a> {
    Tcp(&'a [SocketAddr]),
    Unix(&'a Path),
}

impl Want<'_> {
    /// Whether a listener bound at `address` is the one asked for. A TCP
    /// port of 0 asks for no address in particular, so nothing is.
    fn is(&self, address: &Address) -> bool {
        match (self, address) {
            (Want::Tcp(addrs), Address::Tcp(local)) => {
                addrs.iter().any(|a| a.port() != 0 && a == local)
            }
            (Want::Unix(path), Address::Unix(local)) => same_socket_path(local, path),
            _ => false,
        }
    }
}

/// Where an inherited listener is bound, read once when it is adopted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// Unnamed or abstract Unix sockets, and what could not be read.
    Unknown,
}

impl Address {
    fn of(socket: &OwnedFd, family: Family) -> Self {
        // A duplicate, so that the std types can read it and close only it.
        let Ok(fd) = socket.try_clone() else {
            return Address::Unknown;
        };
        match family {
            Family::Inet | Family::Inet6 => std::net::TcpListener::from(fd)
                .local_addr()
                .map_or(Address::Unknown, Address::Tcp),
            Family::Unix => std::os::unix::net::UnixListener::from(fd)
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                .map_or(Address::Unknown, Address::Unix),
            Family::Other(_) => Address::Unknown,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(addr) => write!(f, "{addr}"),
            Address::Unix(path) => write!(f, "{}", path.display()),
            Address::Unknown => f.write_str("no address"),
        }
    }
}

/// `fd 3 "unknown" on 127.0.0.1:3000, fd 4 …`, or `none`.
fn describe<'a>(inherited: impl IntoIterator<Item = &'a Inherited>) -> String {
    let listed: Vec<String> = inherited
        .into_iter()
        .map(|i| format!("fd {} {:?} on {}", i.fd, i.name, i.address))
        .collect();
    if listed.is_empty() {
        "none".into()
    } else {
        listed.join(", ")
    }
}

/// No inherited listener has the name `name`: takes the one bound where
/// `want` asks, if exactly one is.
fn take_by_address(
    inherited: &mut Vec<Inherited>,
    name: &str,
    want: Want<'_>,
) -> Result<Option<(OwnedFd, bool)>, Error> {
    let fits: Vec<usize> = (0..inherited.len())
        .filter(|&i| want.is(&inherited[i].address))
        .collect();
    match fits[..] {
        [] => Ok(None),
        [pos] => {
            let taken = inherited.remove(pos);
            log!(
                info,
                fd = taken.fd,
                passed_as = taken.name,
                name,
                address = %taken.address,
                "adopting an inherited listener passed under another name: it is bound where this one is asked to be"
            );
            Ok(Some((taken.socket, taken.bound)))
        }
        _ => {
            let listed = describe(fits.iter().map(|&i| &inherited[i]));
            Err(Error::Listener {
                name: name.to_owned(),
                reason: format!(
                    "no inherited listener has this name, and {} are bound where it is asked to be \
                     ({}); name the one to use {name:?} (systemd: FileDescriptorName=, \
                     systemd-socket-activate: --fdname=)",
                    fits.len(),
                    listed
                ),
            })
        }
    }
}

fn bind_tcp(addrs: &[SocketAddr]) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for addr in addrs {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let result = socket.and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(*addr)?;
            socket.listen(BACKLOG)
        });
        match result {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    }))
}

/// Whether the socket bound at `local` is the one at `asked`: the same path,
/// or the same file by another path (relative, through a symlink).
fn same_socket_path(local: &Path, asked: &Path) -> bool {
    local == asked || FileId::of(local).is_some_and(|id| FileId::of(asked) == Some(id))
}

fn bind_unix(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "a live process accepts on this socket",
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    log!(info, path = %path.display(), "removing stale socket");
                    std::fs::remove_file(path)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let std = std::os::unix::net::UnixListener::bind(path)?;
    std.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(std)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(
        fds: Option<&str>,
        names: Option<&str>,
        pid: Option<&str>,
        ready: Option<&str>,
    ) -> Result<EnvSpec, Error> {
        parse_env(fds, names, pid, ready, 4242)
    }

    #[test]
    fn bound_names_must_be_inherited_ones() {
        let spec = parse(Some("2"), Some("http:admin"), None, None).unwrap();
        assert_eq!(parse_bound(None, &spec).unwrap(), Vec::<String>::new());
        assert_eq!(parse_bound(Some(""), &spec).unwrap(), Vec::<String>::new());
        assert_eq!(parse_bound(Some("admin"), &spec).unwrap(), vec!["admin"]);
        assert_eq!(
            parse_bound(Some("http:admin"), &spec).unwrap(),
            vec!["http", "admin"]
        );
        let err = parse_bound(Some("http:other"), &spec)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"other\" is not among the inherited"),
            "{err}"
        );
        let none = parse(None, None, None, None).unwrap();
        assert!(parse_bound(Some("http"), &none).is_err());
    }

    #[test]
    fn a_socket_path_is_the_same_by_any_name_of_its_file() {
        let dir = std::env::temp_dir().join(format!("handover-same-path-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::os::unix::fs::symlink(&path, dir.join("link.sock")).unwrap();
        assert!(same_socket_path(&path, &path));
        assert!(same_socket_path(&path, &dir.join("link.sock")));
        assert!(same_socket_path(&path, &dir.join(".").join("api.sock")));
        assert!(!same_socket_path(&path, &dir.join("other.sock")));
        let _other = std::os::unix::net::UnixListener::bind(dir.join("other.sock")).unwrap();
        assert!(!same_socket_path(&path, &dir.join("other.sock")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Listeners as if `sockets` had been inherited under those names.
    fn inherited(sockets: Vec<(&str, OwnedFd)>) -> Listeners {
        let inherited = sockets
            .into_iter()
            .enumerate()
            .map(|(i, (name, socket))| {
                let family = sys::listening_stream_socket(socket.as_fd()).unwrap();
                Inherited {
                    fd: LISTEN_FDS_START + i as RawFd,
                    name: name.to_owned(),
                    address: Address::of(&socket, family),
                    socket,
                    family,
                    bound: false,
                }
            })
            .collect();
        Listeners {
            state: Mutex::new(State {
                from_previous_generation: false,
                generation: 1,
                previous_state: None,
                report_from: None,
                inherited,
                socket_files: Vec::new(),
                active: Vec::new(),
                ready_pipe: None,
            }),
        }
    }

    /// A TCP listener on `addr` that another may share (`SO_REUSEPORT`).
    fn shared_port(addr: SocketAddr) -> OwnedFd {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseport(true).unwrap();
        socket.bind(addr).unwrap();
        OwnedFd::from(socket.listen(8).unwrap().into_std().unwrap())
    }

    #[tokio::test]
    async fn two_unnamed_listeners_at_the_address_asked_for_is_an_error_naming_both() {
        let first = shared_port("127.0.0.1:0".parse().unwrap());
        let addr = std::net::TcpListener::from(first.try_clone().unwrap())
            .local_addr()
            .unwrap();
        let listeners = inherited(vec![
            ("unknown", first),
            ("api.socket", shared_port(addr)),
            ("admin", shared_port("127.0.0.1:0".parse().unwrap())),
        ]);
        let err = listeners.tcp("http", addr).unwrap_err().to_string();
        assert!(
            err.starts_with("listener \"http\": no inherited listener has this name, and 2 are bound where it is asked to be"),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "fd 3 \"unknown\" on {addr}, fd 4 \"api.socket\" on {addr}"
            )),
            "{err}"
        );
        // Nothing was taken: a name still decides, and then one fits.
        let named = listeners.tcp("api.socket", addr).unwrap();
        assert_eq!(named.local_addr().unwrap(), addr);
        let adopted = listeners.tcp("http", addr).unwrap();
        assert_eq!(adopted.local_addr().unwrap(), addr);
        // A port of 0 is no address in particular: `admin` is not adopted.
        let fresh = listeners.tcp("other", "127.0.0.1:0").unwrap();
        assert_ne!(fresh.local_addr().unwrap().port(), addr.port());
        assert_eq!(listeners.inherited_names().matches("\"admin\"").count(), 1);
    }

    #[tokio::test]
    async fn an_unnamed_unix_listener_is_adopted_by_its_path() {
        let dir =
            std::env::temp_dir().join(format!("handover-unix-by-path-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let socket = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let listeners = inherited(vec![("unknown", OwnedFd::from(socket))]);
        // Through a symlink on the directory, it is the same file.
        std::os::unix::fs::symlink(&dir, dir.with_extension("link")).unwrap();
        let asked = dir.with_extension("link").join("api.sock");
        let listener = listeners.unix("api", &asked).unwrap();
        assert_eq!(
            listener.local_addr().unwrap().as_pathname(),
            Some(path.as_path())
        );
        assert_eq!(listeners.inherited_names(), "none");
        std::fs::remove_file(dir.with_extension("link")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_set_means_nothing_inherited() {
        let spec = parse(None, None, None, None).unwrap();
        assert!(spec.fds.is_empty());
        assert_eq!(spec.ready_fd, None);
    }

    #[test]
    fn names_and_pid_are_honoured() {
        let spec = parse(Some("2"), Some("http:admin"), Some("4242"), Some("5")).unwrap();
        assert_eq!(spec.fds, vec![(3, "http".into()), (4, "admin".into())]);
        assert_eq!(spec.ready_fd, Some(5));
        let spec = parse(Some("1"), None, None, None).unwrap();
        assert_eq!(spec.fds, vec![(3, "unknown".into())]);
    }

    proptest::proptest! {
        /// Any environment at all: no panic, and whatever is accepted keeps
        /// the protocol's invariants. A short run in CI; a long one with
        /// `PROPTEST_CASES=1000000 cargo nextest run parse_env_`.
        #[test]
        fn parse_env_never_panics_and_what_it_accepts_is_well_formed(
            fds in proptest::option::of("[0-9]{0,3}|-?[0-9a-z :]{0,24}|[0-9]{20}"),
            names in proptest::option::of("([a-z]{1,8}(:[a-z]{0,8}){0,4})|\\PC{0,40}|.{0,40}"),
            pid in proptest::option::of("4242|[0-9]{0,12}|.{0,8}"),
            ready in proptest::option::of("[0-9]{1,3}|-?[0-9]{0,12}|.{0,6}"),
        ) {
            let parsed = parse_env(fds.as_deref(), names.as_deref(), pid.as_deref(), ready.as_deref(), 4242);
            if let Ok(spec) = parsed {
                proptest::prop_assert!(spec.fds.len() <= MAX_LISTEN_FDS);
                for (i, (fd, name)) in spec.fds.iter().enumerate() {
                    proptest::prop_assert_eq!(*fd, LISTEN_FDS_START + i as RawFd);
                    proptest::prop_assert!(!name.is_empty() && name.len() <= 255);
                    proptest::prop_assert!(!name.contains(':') && !name.chars().any(char::is_control));
                }
                if let Some(ready) = spec.ready_fd {
                    proptest::prop_assert!(ready >= LISTEN_FDS_START + spec.fds.len() as RawFd);
                }
                if let Some(pid) = &pid {
                    proptest::prop_assert_eq!(pid.trim(), "4242");
                }
                if fds.is_none() {
                    proptest::prop_assert!(spec.fds.is_empty());
                }
            }
        }
    }

    #[test]
    fn malformed_values_are_clear_errors() {
        let cases = [
            (
                Some("abc"),
                None,
                None,
                None,
                "LISTEN_FDS=\"abc\": not a number of fds",
            ),
            (
                Some("-1"),
                None,
                None,
                None,
                "LISTEN_FDS=\"-1\": not a number of fds",
            ),
            (
                Some("99999999999999999999"),
                None,
                None,
                None,
                "not a number",
            ),
            (Some("1000"), None, None, None, "more than"),
            (Some("2"), Some("http"), None, None, "1 names for 2 fds"),
            (Some("1"), Some("a:b"), None, None, "2 names for 1 fds"),
            (
                Some("1"),
                Some(""),
                None,
                None,
                "\"\" is not a valid fd name",
            ),
            (None, Some("http"), None, None, "set without LISTEN_FDS"),
            (
                Some("1"),
                None,
                Some("1"),
                None,
                "meant for pid 1, and this is pid 4242",
            ),
            (Some("1"), None, Some("x"), None, "not a process id"),
            (Some("1"), None, None, Some("3"), "must be an fd of its own"),
            (Some("1"), None, None, Some("1"), "must be an fd of its own"),
            (Some("1"), None, None, Some("fd"), "not an fd number"),
        ];
        for (fds, names, pid, ready, expected) in cases {
            let err = parse(fds, names, pid, ready).unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{fds:?} {names:?} {pid:?} {ready:?}: {err}"
            );
        }
    }
}
