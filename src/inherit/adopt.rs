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
/// (at most `max_state` bytes). On an error, what was owned is closed and
/// every other fd it names made close-on-exec.
pub(super) fn adopt(inheritance: Inheritance, max_state: usize) -> Result<Adopted, Error> {
    let named: Vec<RawFd> = inheritance
        .fds
        .iter()
        .map(|(fd, _)| *fd)
        .chain(inheritance.ready_fd)
        .chain(inheritance.state_fd)
        .chain(inheritance.connections_fd)
        .collect();
    let adopted = adopt_all(inheritance, max_state);
    if adopted.is_err() {
        for fd in named {
            sys::set_cloexec_raw(fd);
        }
    }
    adopted
}

fn adopt_all(inheritance: Inheritance, max_state: usize) -> Result<Adopted, Error> {
    let previous_state = match inheritance.state_fd {
        None => None,
        Some(fd) => {
            let state_error = |reason: String| Error::Fd {
                fd,
                name: HANDOVER_STATE_FD.into(),
                reason,
            };
            let (file, ()) = sys::adopt(fd, |fd| sys::check_sealed(fd, max_state as u64))
                .map_err(state_error)?;
            Some(sys::read_sealed(file).map_err(state_error)?)
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
        let (socket, family) = sys::adopt(fd, |fd| {
            sys::listening_stream_socket(fd).map_err(|e| e.to_string())
        })
        .map_err(fd_error)?;
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
    let (channel, ()) = sys::adopt(fd, |fd| match sys::is_seqpacket(fd) {
        Ok(true) => Ok(()),
        Ok(false) => Err("it is not a SOCK_SEQPACKET Unix socket".to_owned()),
        Err(e) => Err(format!("it could not be inspected: {e}")),
    })
    .map_err(fd_error)?;
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
    let (channel, ()) = sys::adopt(fd, |fd| {
        match sys::is_socket(fd).and_then(|socket| Ok(socket || sys::is_pipe(fd)?)) {
            Ok(true) => Ok(()),
            Ok(false) => Err("it is not a socket or a pipe".to_owned()),
            Err(e) => Err(format!("it could not be inspected: {e}")),
        }
    })
    .map_err(fd_error)?;
    let _ = sys::set_cloexec(channel.as_fd());
    Ok(File::from(channel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn inheritance(fds: Vec<(RawFd, &str)>) -> Inheritance {
        Inheritance {
            fds: fds
                .into_iter()
                .map(|(fd, name)| (fd, name.to_owned()))
                .collect(),
            bound: Vec::new(),
            ready_fd: None,
            generation: 1,
            state_fd: None,
            connections_fd: None,
        }
    }

    /// A number in the environment that names an fd this process opened
    /// for something else (a pipe, here) is refused, and the fd is left
    /// open, not closed under its owner.
    #[test]
    fn a_wrong_fd_number_is_refused_without_closing_the_fd_it_names() {
        let (reader, _writer) = std::io::pipe().unwrap();
        let fd = reader.as_raw_fd();
        for wrong in [
            Inheritance {
                state_fd: Some(fd),
                ..inheritance(Vec::new())
            },
            Inheritance {
                connections_fd: Some(fd),
                ..inheritance(Vec::new())
            },
            inheritance(vec![(fd, "http")]),
        ] {
            let err = adopt(wrong, 1024).err().expect("refused").to_string();
            assert!(err.contains(&format!("fd {fd}")), "{err}");
            assert!(sys::is_open(fd), "still open after: {err}");
        }
        drop(reader);
    }

    /// After an error, an inherited fd not reached yet does not leak into
    /// the application's children: it is made close-on-exec.
    #[test]
    fn fds_left_after_an_error_are_made_close_on_exec() {
        let (reader, _writer) = std::io::pipe().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        sys::clear_cloexec(listener.as_fd());
        assert!(!sys::has_cloexec(listener.as_raw_fd()));
        let wrong = inheritance(vec![
            (reader.as_raw_fd(), "http"),
            (listener.as_raw_fd(), "admin"),
        ]);
        assert!(adopt(wrong, 1024).is_err());
        assert!(sys::is_open(listener.as_raw_fd()));
        assert!(sys::has_cloexec(listener.as_raw_fd()));
    }
}
