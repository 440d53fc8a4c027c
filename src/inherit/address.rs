//! Where a listener is bound, and binding one: what decides which
//! inherited listener an application's `tcp` or `unix` call gets when no
//! name matches, and what it gets when none is inherited.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::sys::{Family, FileId};

/// Listen backlog of the sockets bound here.
pub(crate) const BACKLOG: u32 = 1024;

/// What the application asks a listener to be bound to.
#[derive(Clone, Copy)]
pub(super) enum Want<'a> {
    Tcp(&'a [SocketAddr]),
    Unix(&'a Path),
}

impl Want<'_> {
    /// Whether a listener bound at `address` is the one asked for. A TCP
    /// port of 0 asks for no address in particular, so nothing is.
    pub(super) fn is(&self, address: &Address) -> bool {
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
pub(super) enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// Unnamed or abstract Unix sockets, and what could not be read.
    Unknown,
}

impl Address {
    pub(super) fn of(socket: &OwnedFd, family: Family) -> Self {
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

pub(super) fn bind_tcp(addrs: &[SocketAddr]) -> std::io::Result<tokio::net::TcpListener> {
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
pub(super) fn same_socket_path(local: &Path, asked: &Path) -> bool {
    local == asked || FileId::of(local).is_some_and(|id| FileId::of(asked) == Some(id))
}

/// Binds a Unix listener at `path` (a stale socket file there, which no
/// live process accepts on, is removed first). With `mode`, the socket file
/// has that mode from its creation (see [`sys::fchmod`](crate::sys::fchmod);
/// elsewhere than on Linux it is set just after).
pub(super) fn bind_unix(
    path: &Path,
    mode: Option<u32>,
) -> std::io::Result<tokio::net::UnixListener> {
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
    let socket = tokio::net::UnixSocket::new_stream()?;
    if let Some(mode) = mode {
        crate::sys::fchmod(std::os::fd::AsFd::as_fd(&socket), mode)?;
    }
    socket.bind(path)?;
    #[cfg(not(target_os = "linux"))]
    if let Some(mode) = mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
