//! Taking ownership of what the environment passed: each fd checked first
//! (a listening stream socket, a readiness channel, a sealed state file, a
//! connections channel), then made close-on-exec again.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd, RawFd};

use super::address::Address;
use super::env::{HANDOVER_CONNECTIONS_FD, HANDOVER_READY_FD, HANDOVER_STATE_FD, Inheritance};
use crate::error::Error;
use crate::sys::{self, Family};

/// An inherited listener, checked, until the application takes it.
pub(crate) struct Inherited {
    pub(super) fd: RawFd,
    pub(super) name: String,
    pub(super) socket: OwnedFd,
    pub(super) family: Family,
    /// Where it is bound: what decides when no name matches.
    pub(super) address: Address,
    /// Bound by a previous generation, not passed by systemd: it follows a
    /// changed address.
    pub(super) bound: bool,
}

/// Everything the environment passed, owned and checked.
pub(super) struct Adopted {
    pub(super) generation: u64,
    pub(super) previous_state: Option<Vec<u8>>,
    pub(super) inherited: Vec<Inherited>,
    pub(super) ready_channel: Option<File>,
    /// Where the previous generation hands over its idle connections.
    pub(super) connections: Option<OwnedFd>,
}

/// Checks and owns every fd `inheritance` names; the state file is read
/// (at most `max_state` bytes).
pub(super) fn adopt(inheritance: Inheritance, max_state: usize) -> Result<Adopted, Error> {
    // The state first: an error below must not leave its fd behind.
    let previous_state = match inheritance.state_fd {
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
    let connections = match inheritance.connections_fd {
        None => None,
        Some(fd) => Some(connections_channel(fd)?),
    };
    let mut inherited = Vec::with_capacity(inheritance.fds.len());
    for (fd, name) in inheritance.fds {
        let fd_error = |reason: String| Error::Fd {
            fd,
            name: name.clone(),
            reason,
        };
        let socket = sys::adopt(fd).map_err(|e| fd_error(e.to_string()))?;
        let family =
            sys::listening_stream_socket(socket.as_fd()).map_err(|e| fd_error(e.to_string()))?;
        sys::set_cloexec(socket.as_fd())
            .map_err(|e| fd_error(format!("cannot set FD_CLOEXEC: {e}")))?;
        if inherited.iter().any(|i: &Inherited| i.name == name) && name != "unknown" {
            return Err(fd_error("the name is given to two fds".into()));
        }
        let address = Address::of(&socket, family);
        inherited.push(Inherited {
            fd,
            bound: inheritance.bound.contains(&name),
            name,
            socket,
            family,
            address,
        });
    }
    let ready_channel = match inheritance.ready_fd {
        None => None,
        Some(fd) => Some(ready_channel(fd)?),
    };
    if !inherited.is_empty() {
        log!(info,
            listeners = %inherited.iter().map(|i| format!("{}=fd {}", i.name, i.fd)).collect::<Vec<_>>().join(", "),
            from_previous_generation = ready_channel.is_some(),
            "inherited listeners"
        );
    }
    Ok(Adopted {
        generation: inheritance.generation,
        previous_state,
        inherited,
        ready_channel,
        connections,
    })
}

/// The connections channel at `fd`: a `SOCK_SEQPACKET` Unix socket.
fn connections_channel(fd: RawFd) -> Result<OwnedFd, Error> {
    let fd_error = |reason: String| Error::Fd {
        fd,
        name: HANDOVER_CONNECTIONS_FD.into(),
        reason,
    };
    let channel = sys::adopt(fd).map_err(|e| fd_error(e.to_string()))?;
    match sys::is_seqpacket(channel.as_fd()) {
        Ok(true) => {}
        Ok(false) => {
            return Err(fd_error(
                "it is not a SOCK_SEQPACKET Unix socket".to_owned(),
            ));
        }
        Err(e) => return Err(fd_error(format!("it could not be inspected: {e}"))),
    }
    sys::set_cloexec(channel.as_fd())
        .and_then(|()| sys::set_nonblocking(channel.as_fd()))
        .map_err(|e| fd_error(format!("cannot set FD_CLOEXEC and O_NONBLOCK: {e}")))?;
    Ok(channel)
}

/// The readiness channel at `fd`: a Unix socket (which carries the drain
/// report back), or a pipe (from a generation of an older version).
fn ready_channel(fd: RawFd) -> Result<File, Error> {
    let fd_error = |reason: String| Error::Fd {
        fd,
        name: HANDOVER_READY_FD.into(),
        reason,
    };
    let channel = sys::adopt(fd).map_err(|e| fd_error(e.to_string()))?;
    let kind = sys::is_socket(channel.as_fd())
        .and_then(|socket| Ok(socket || sys::is_pipe(channel.as_fd())?));
    match kind {
        Ok(true) => {}
        Ok(false) => return Err(fd_error("it is not a socket or a pipe".to_owned())),
        Err(e) => return Err(fd_error(format!("it could not be inspected: {e}"))),
    }
    let _ = sys::set_cloexec(channel.as_fd());
    Ok(File::from(channel))
}
