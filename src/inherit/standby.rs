//! The standby: the next generation, started ahead of the upgrade and
//! waiting in `from_env` until the upgrade hands it the listeners.
//!
//! With [`Builder::standby`](crate::Builder::standby) a generation starts
//! its successor a little after it is ready, with a Unix socket at
//! `HANDOVER_STANDBY_FD` and no listeners. The successor runs its `main` up
//! to [`Listeners::from_env`](crate::Listeners::from_env) and blocks there,
//! reading the socket. At the upgrade, the generation sends it, in one
//! message, what a freshly started successor would have found in its
//! environment and at fds 3, 4, …: the listeners' names, which of them a
//! generation bound, the listeners and the readiness pipe. From there on
//! it is an upgrade like any other: the standby takes the listeners, says
//! it is ready on the pipe, or is killed and reaped if it does not.
//!
//! This side of it, in the standby: the message, and the wait for it. The
//! generation's side (which standby to keep, when to use it) is the
//! upgrade's. End of file on the socket (its generation exited, or
//! discarded it) makes a standby exit quietly, with status 0.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use super::env::{
    Found, HANDOVER_BOUND_FDNAMES, HANDOVER_CONNECTIONS_FD, HANDOVER_GENERATION,
    HANDOVER_STANDBY_FD, HANDOVER_STATE_FD, Inheritance, LISTEN_FDNAMES, LISTEN_FDS,
};
use crate::error::Error;
use crate::sys;

/// What the message starts with: its format's name and version.
const MAGIC: &[u8] = b"HANDOVER-STANDBY/1\n";
/// The longest message: the names of `MAX_PASSED_FDS` listeners of 255
/// bytes, twice, with room to spare.
const MAX_MESSAGE: usize = 64 * 1024;

/// The keys a message may carry: the inheritance variables a fresh
/// successor would get, but the readiness channel's, which comes as an fd.
const MESSAGE_KEYS: [&str; 6] = [
    LISTEN_FDS,
    LISTEN_FDNAMES,
    HANDOVER_BOUND_FDNAMES,
    HANDOVER_GENERATION,
    HANDOVER_STATE_FD,
    HANDOVER_CONNECTIONS_FD,
];

/// The message that wakes a standby: `MAGIC`, then `KEY=VALUE` lines for
/// the inheritance variables a fresh successor would get
/// ([`MESSAGE_KEYS`]), after a 4-byte big-endian length of all that. The
/// listeners, the readiness channel, the state and the connections channel
/// go with it as fds, in that order.
fn message(vars: &[(&str, String)]) -> Vec<u8> {
    let mut body = MAGIC.to_vec();
    for (key, value) in vars {
        body.extend_from_slice(key.as_bytes());
        body.push(b'=');
        body.extend_from_slice(value.as_bytes());
        body.push(b'\n');
    }
    let mut message = (body.len() as u32).to_be_bytes().to_vec();
    message.extend(body);
    message
}

/// Sends the message and the fds to the standby at the other end of
/// `socket`.
pub(crate) fn wake(
    socket: BorrowedFd<'_>,
    vars: &[(&str, String)],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    sys::fdpass::send_with_fds(socket, &message(vars), fds)
}

/// What a standby writes back once it has received the listeners.
const TAKEN: &[u8] = b"T";

/// Whether the standby at the other end of `socket`, which has exited (or
/// been killed), said it had received the listeners. If it did not, they
/// died with it unused, and the upgrade can start the binary afresh.
pub(crate) fn took_listeners(mut socket: UnixStream) -> bool {
    let _ = socket.set_nonblocking(true);
    let mut byte = [0u8; 1];
    matches!(socket.read(&mut byte), Ok(1) if byte == TAKEN)
}

/// In a standby (`HANDOVER_STANDBY_FD` is `value`): waits until the
/// upgrade hands over, and returns what a fresh successor would have read
/// from its environment, with the fds received. Exits the process, with
/// status 0, if the socket reaches end of file first: no upgrade will come.
pub(crate) fn wait_for_upgrade(value: &str) -> Result<Inheritance, Error> {
    let env_error = |reason: String| Error::Env {
        var: HANDOVER_STANDBY_FD,
        value: value.to_owned(),
        reason,
    };
    let fd: i32 = value
        .trim()
        .parse()
        .map_err(|_| env_error("not an fd number".into()))?;
    let (socket, ()) = sys::adopt(fd, |fd| match sys::is_socket(fd) {
        Ok(true) => Ok(()),
        Ok(false) => Err("it is not a socket".into()),
        Err(e) => Err(format!("it could not be inspected: {e}")),
    })
    .map_err(env_error)?;
    let _ = sys::set_cloexec(socket.as_fd());
    // The socket stays open until everything has arrived, so no fd received
    // gets its number, which `sys::adopt` has seen already.
    let (bytes, fds) = match receive(socket) {
        Ok(Some(received)) => received,
        Ok(None) => std::process::exit(0),
        Err(e) => return Err(Error::io("receiving the listeners as a standby", e)),
    };
    let inheritance = parse_message(&bytes, fds.len()).map_err(|reason| {
        Error::io(
            "receiving the listeners as a standby",
            io::Error::new(io::ErrorKind::InvalidData, reason),
        )
    })?;
    Ok(place(inheritance, fds))
}

/// Reads one whole message and its fds; `None` at end of file before any
/// of it.
fn receive(socket: OwnedFd) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE + 4];
    let (mut read, fds) = sys::fdpass::recv_with_fds(socket.as_fd(), &mut buf)?;
    if read == 0 {
        return Ok(None);
    }
    let mut socket = std::fs::File::from(socket);
    while read < 4 {
        let n = socket.read(&mut buf[read..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        read += n;
    }
    let length = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if length > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {length} bytes"),
        ));
    }
    if read > 4 + length {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more than one message",
        ));
    }
    socket.read_exact(&mut buf[read..4 + length])?;
    // The fds are ours now: if this process dies from here on, the upgrade
    // fails; before, it starts afresh. Whether the generation heard it or
    // not, the upgrade goes on.
    let _ = socket.write_all(TAKEN);
    buf.truncate(4 + length);
    buf.drain(..4);
    Ok(Some((buf, fds)))
}

/// Parses a message's body (after its length) that came with `fd_count`
/// fds into what `Listeners` adopts, the fds still at 3, 4, …
fn parse_message(body: &[u8], fd_count: usize) -> Result<Inheritance, String> {
    let text = body
        .strip_prefix(MAGIC)
        .ok_or("not a hand-over message (another version of handover?)")?;
    let text = std::str::from_utf8(text).map_err(|_| "not UTF-8")?;
    let found = Found::from_lines(text, &MESSAGE_KEYS)?;
    if found.get(LISTEN_FDS).is_none() {
        return Err("no LISTEN_FDS".into());
    }
    let inheritance = Inheritance::parse(&found, std::process::id()).map_err(|e| e.to_string())?;
    // The listeners, then the readiness channel, the state, and the
    // connections channel.
    let with_state = inheritance.state_fd.is_some();
    let with_connections = inheritance.connections_fd.is_some();
    let expected =
        inheritance.fds.len() + 1 + usize::from(with_state) + usize::from(with_connections);
    if fd_count != expected {
        return Err(format!(
            "{fd_count} fds came with a message for {} listeners, the readiness channel{}{}",
            inheritance.fds.len(),
            if with_state { ", the state" } else { "" },
            if with_connections {
                ", the connections channel"
            } else {
                ""
            },
        ));
    }
    Ok(inheritance)
}

/// Puts the fds received in place of the numbers `inheritance` has (3, 4,
/// …), giving up their ownership to `Listeners`, which takes it back.
fn place(mut inheritance: Inheritance, fds: Vec<OwnedFd>) -> Inheritance {
    let mut fds = fds.into_iter().map(IntoRawFd::into_raw_fd);
    for (fd, _) in &mut inheritance.fds {
        *fd = fds.next().expect("counted in parse_message");
    }
    inheritance.ready_fd = fds.next();
    if inheritance.state_fd.is_some() {
        inheritance.state_fd = fds.next();
    }
    if inheritance.connections_fd.is_some() {
        inheritance.connections_fd = fds.next();
    }
    inheritance
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(vars: &[(&str, &str)]) -> Vec<u8> {
        let vars: Vec<(&str, String)> = vars.iter().map(|(k, v)| (*k, v.to_string())).collect();
        message(&vars)[4..].to_vec()
    }

    #[test]
    fn a_message_says_what_a_fresh_successor_would_read() {
        let message = body(&[
            (LISTEN_FDS, "2"),
            (LISTEN_FDNAMES, "http:admin"),
            (HANDOVER_BOUND_FDNAMES, "admin"),
        ]);
        let spec = parse_message(&message, 3).unwrap();
        assert_eq!(
            spec.fds,
            vec![(3, "http".to_owned()), (4, "admin".to_owned())]
        );
        assert_eq!(spec.bound, vec!["admin".to_owned()]);
        let spec = parse_message(&body(&[(LISTEN_FDS, "0")]), 1).unwrap();
        assert!(spec.fds.is_empty());
        // The state and the connections channel, after the readiness one.
        let message = body(&[
            (LISTEN_FDS, "1"),
            (HANDOVER_STATE_FD, "5"),
            (HANDOVER_CONNECTIONS_FD, "6"),
        ]);
        assert!(parse_message(&message, 3).is_err());
        let spec = parse_message(&message, 4).unwrap();
        assert_eq!((spec.state_fd, spec.connections_fd), (Some(5), Some(6)));
    }

    #[test]
    fn a_message_that_cannot_be_right_is_refused() {
        let good = [(LISTEN_FDS, "1"), (LISTEN_FDNAMES, "http")];
        // The listener and the pipe: two fds, not one or three.
        assert!(parse_message(&body(&good), 1).is_err());
        assert!(parse_message(&body(&good), 3).is_err());
        assert!(parse_message(&body(&good)[1..], 2).is_err());
        for bad in [
            vec![(LISTEN_FDNAMES, "http")],
            vec![(LISTEN_FDS, "1"), (LISTEN_FDNAMES, "a:b")],
            vec![(LISTEN_FDS, "x")],
            vec![(LISTEN_FDS, "1"), (LISTEN_FDS, "1")],
            vec![(LISTEN_FDS, "1"), ("LISTEN_PID", "1")],
            vec![(LISTEN_FDS, "1"), (HANDOVER_BOUND_FDNAMES, "other")],
        ] {
            assert!(parse_message(&body(&bad), 2).is_err(), "{bad:?}");
        }
    }
}
