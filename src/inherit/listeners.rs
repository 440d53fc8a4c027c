//! [`Listeners`]: listeners inherited from the environment (a previous
//! generation or systemd socket activation), or bound here.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::address::{BACKLOG, Want, bind_tcp, bind_unix, same_socket_path};
use super::adopt::{self, Inherited};
use super::env::{self, HANDOVER_STANDBY_FD, Inheritance, is_valid_name};
use super::{channel, standby};
use crate::error::Error;
use crate::lock::lock;
use crate::sys::{self, Family, FileId};

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
    ready_channel: Option<File>,
    /// Where the previous generation hands over its idle connections,
    /// until taken.
    connections_from: Option<OwnedFd>,
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
/// The variables read are [`env`](crate::env)'s (systemd-compatible, so
/// the same code path serves socket activation, a previous generation, and
/// tools such as `systemfd`).
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
        Self::from_env_with(super::DEFAULT_MAX_STATE_SIZE)
    }

    /// [`from_env`](Self::from_env), taking at most `max_state` bytes of
    /// state from the previous generation.
    pub(crate) fn from_env_with(max_state: usize) -> Result<Self, Error> {
        let found = env::take();
        let inheritance = match found.get(HANDOVER_STANDBY_FD) {
            // A standby's environment has none of the others: all of it
            // comes on the socket.
            Some(standby) => standby::wait_for_upgrade(standby)?,
            None => Inheritance::parse(&found, std::process::id())?,
        };
        let adopted = adopt::adopt(inheritance, max_state)?;
        Ok(Self {
            state: Mutex::new(State {
                from_previous_generation: adopted.ready_channel.is_some(),
                generation: adopted.generation,
                previous_state: adopted.previous_state,
                report_from: None,
                inherited: adopted.inherited,
                active: Vec::new(),
                socket_files: Vec::new(),
                ready_channel: adopted.ready_channel,
                connections_from: adopted.connections,
            }),
        })
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
                ready_channel: None,
                connections_from: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
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

    /// The backlog of the sockets bound here.
    pub const BACKLOG: u32 = BACKLOG;

    /// The TCP listener named `name`: the inherited one, or a new one bound
    /// to `addr` (with `SO_REUSEADDR` and a backlog of
    /// [`BACKLOG`](Self::BACKLOG)).
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
        self.unix_with_mode(name, path.as_ref(), None)
    }

    /// [`unix`](Self::unix), a socket bound here having `mode` from its
    /// creation (the control socket's 0600).
    pub(crate) fn unix_with_mode(
        &self,
        name: &str,
        path: &Path,
        mode: Option<u32>,
    ) -> Result<tokio::net::UnixListener, Error> {
        let bind = || {
            bind_unix(path, mode).map_err(|e| {
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
        // Alone, nothing takes the previous generation's connections: it
        // drains them itself.
        drop(self.take_connections_channel());
        self.ready_taking_connections(false)
    }

    /// [`ready`](Self::ready), saying whether this generation takes the
    /// previous one's idle connections (see
    /// [`take_connections_channel`](Self::take_connections_channel)).
    pub(crate) fn ready_taking_connections(&self, connections: bool) -> Result<(), Error> {
        let mut state = self.lock();
        for unused in state.inherited.drain(..) {
            log!(
                warn,
                name = unused.name,
                fd = unused.fd,
                "inherited listener was not taken by the application; closing it"
            );
        }
        if let Some(mut channel) = state.ready_channel.take() {
            channel
                .write_all(channel::ready_line(std::process::id(), connections).as_bytes())
                .map_err(|e| Error::io("telling the previous generation we are ready", e))?;
            // A socket: the previous generation says on it how its drain
            // went.
            if sys::is_socket(channel.as_fd()).unwrap_or(false) {
                state.report_from = Some(OwnedFd::from(channel));
            }
        }
        Ok(())
    }

    /// The channel on which the previous generation hands over its idle
    /// connections, if it passed one; once.
    pub(crate) fn take_connections_channel(&self) -> Option<OwnedFd> {
        self.lock().connections_from.take()
    }

    /// Whether the previous generation passed a connections channel that
    /// has not been taken yet.
    pub(crate) fn has_connections_channel(&self) -> bool {
        self.lock().connections_from.is_some()
    }

    /// The names of the listeners taken so far.
    pub(crate) fn names(&self) -> Vec<String> {
        self.lock()
            .active
            .iter()
            .map(|active| active.name.clone())
            .collect()
    }

    /// The name and family of the listener served on `fd` (a copy of one
    /// taken through [`tcp`](Self::tcp) or [`unix`](Self::unix)): the same
    /// socket, not merely the same address.
    pub(crate) fn name_of(&self, fd: std::os::fd::BorrowedFd<'_>) -> Option<(String, Family)> {
        let id = FileId::of_fd(fd).ok()?;
        let state = self.lock();
        let active = state
            .active
            .iter()
            .find(|active| FileId::of_fd(active.socket.as_fd()).ok() == Some(id))?;
        let family = sys::family(active.socket.as_fd()).ok()?;
        Some((active.name.clone(), family))
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
            .field("from_previous_generation", &state.ready_channel.is_some())
            .finish()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inherit::address::Address;

    /// Listeners as if `sockets` had been inherited under those names.
    fn inherited(sockets: Vec<(&str, OwnedFd)>) -> Listeners {
        let inherited = sockets
            .into_iter()
            .enumerate()
            .map(|(i, (name, socket))| {
                let family = sys::listening_stream_socket(socket.as_fd()).unwrap();
                Inherited {
                    fd: super::env::LISTEN_FDS_START + i as std::os::fd::RawFd,
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
                ready_channel: None,
                connections_from: None,
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
}
