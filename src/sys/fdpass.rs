//! Passing fds over a Unix socket (`SCM_RIGHTS`): how a generation hands
//! its listeners and readiness channel to a standby that is already
//! running (a stream socket), and its idle connections to the next
//! generation (a `SOCK_SEQPACKET` pair, whose messages stay whole).

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::MAX_PASSED_FDS;

/// The most fds one message carries: the kernel's `SCM_MAX_FD`.
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 253;

/// Room for the control messages of `MAX_FDS_PER_MESSAGE` fds and of a
/// sender's credentials, aligned as a `cmsghdr` must be.
#[repr(C)]
struct ControlBuffer {
    _align: [libc::cmsghdr; 0],
    bytes: [u8; 1088],
}

impl ControlBuffer {
    fn new() -> Self {
        Self {
            _align: [],
            bytes: [0; 1088],
        }
    }
}

fn control_space(count: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((count * mem::size_of::<RawFd>()) as u32) as usize }
}

#[cfg(target_os = "linux")]
const NO_SIGPIPE: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const NO_SIGPIPE: libc::c_int = 0;

/// One `sendmsg` of `payload` (at least one byte) with `fds` attached to
/// its first byte; returns how many bytes of `payload` the socket took.
fn send_message(
    socket: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: libc::c_int,
) -> io::Result<usize> {
    if payload.is_empty() || fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an empty payload, or too many fds",
        ));
    }
    let space = control_space(fds.len());
    let mut control = ControlBuffer::new();
    assert!(space <= control.bytes.len(), "MAX_FDS_PER_MESSAGE fits");
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: an all-zero `msghdr` is a valid value (null pointers, zero
    // lengths); the fields that matter are set below.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.bytes.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg_control` points at `space` zeroed, suitably aligned
        // bytes, room for one header and `fds.len()` fds, so CMSG_FIRSTHDR
        // is non-null and CMSG_DATA has room for the fds; the header and
        // data are written within that buffer.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN((fds.len() * mem::size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(header).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (valid for reads of the payload)
        // and at `control` (its control message built above), both alive
        // for the call.
        let rc = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, flags | NO_SIGPIPE) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What one `recvmsg` read.
pub(super) struct Received {
    pub(super) read: usize,
    pub(super) fds: Vec<OwnedFd>,
    /// The message was longer than the buffer (`MSG_TRUNC`).
    truncated: bool,
    /// Who sent it, if the socket passes credentials (`SO_PASSCRED`).
    #[cfg(target_os = "linux")]
    pub(super) sender: Option<super::process::Sender>,
}

/// One `recvmsg` into `buf`, with the fds attached to what is read, each
/// owned here and with `FD_CLOEXEC` set. An error if the sender attached
/// more fds than fit (the kernel then closes the rest and says
/// `MSG_CTRUNC`): what arrived is closed.
pub(super) fn recv_message(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<Received> {
    let mut control = ControlBuffer::new();
    let space = control.bytes.len();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in `send_message`.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.bytes.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    #[cfg(target_os = "linux")]
    let flags = flags | libc::MSG_CMSG_CLOEXEC;
    let read = loop {
        // SAFETY: `msg` points at `iov` (valid for writes of `buf.len()`
        // bytes) and at `space` bytes of `control`, both alive for the
        // call; the kernel writes within them.
        let rc = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, flags) };
        if rc >= 0 {
            break rc as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    #[cfg(target_os = "linux")]
    let mut sender = None;
    // SAFETY: the kernel has filled `msg_control` with `msg_controllen`
    // bytes of control messages; CMSG_FIRSTHDR/CMSG_NXTHDR walk them within
    // that length. An SCM_RIGHTS message's data is `cmsg_len -
    // CMSG_LEN(0)` bytes of fds, each new in this process and owned by
    // nothing else yet; an SCM_CREDENTIALS one holds one `ucred`.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
            match ((*header).cmsg_level, (*header).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    let data = libc::CMSG_DATA(header).cast::<RawFd>();
                    for i in 0..bytes / mem::size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                #[cfg(target_os = "linux")]
                (libc::SOL_SOCKET, libc::SCM_CREDENTIALS)
                    if bytes >= mem::size_of::<libc::ucred>() =>
                {
                    let cred = libc::CMSG_DATA(header)
                        .cast::<libc::ucred>()
                        .read_unaligned();
                    sender = Some(super::process::Sender {
                        pid: cred.pid as u32,
                        uid: cred.uid,
                    });
                }
                _ => {}
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    for fd in &fds {
        // `MSG_CMSG_CLOEXEC` did it where it exists.
        super::set_cloexec(fd.as_fd())?;
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("more fds were sent than can be received"));
    }
    Ok(Received {
        read,
        fds,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        #[cfg(target_os = "linux")]
        sender,
    })
}

/// Sends `payload` (at least one byte) with `fds` attached to its first
/// byte, on a stream socket, blocking; the rest of `payload`, if the socket
/// took only part of it, with plain writes.
pub(crate) fn send_with_fds(
    socket: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds"));
    }
    let sent = send_message(socket, payload, fds, 0)?;
    let mut rest = &payload[sent..];
    while !rest.is_empty() {
        // SAFETY: `rest` is valid for reads of its length.
        let rc = unsafe {
            libc::send(
                socket.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                NO_SIGPIPE,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        rest = &rest[rc as usize..];
    }
    Ok(())
}

/// Receives into `buf`, blocking, with the fds attached to what is read.
/// Returns how many bytes were read (0: end of file) and the fds, each
/// owned here and with `FD_CLOEXEC` set.
pub(crate) fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let received = recv_message(socket, buf, 0)?;
    Ok((received.read, received.fds))
}

/// A connected pair of `SOCK_SEQPACKET` Unix sockets, close-on-exec and
/// non-blocking: each message arrives whole, with its fds, or not at all.
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    #[cfg(target_os = "linux")]
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    #[cfg(not(target_os = "linux"))]
    let kind = libc::SOCK_SEQPACKET;
    // SAFETY: `fds` has room for the two fds `socketpair` writes.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `socketpair` just opened both, and nothing else owns them.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    #[cfg(not(target_os = "linux"))]
    for fd in [&pair.0, &pair.1] {
        super::set_cloexec(fd.as_fd())?;
        super::set_nonblocking(fd.as_fd())?;
    }
    Ok(pair)
}

/// Sends one whole message with `fds` on a `SOCK_SEQPACKET` socket,
/// without blocking (`WouldBlock` when its buffer is full).
pub(crate) fn send_packet(
    socket: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let sent = send_message(socket, payload, fds, libc::MSG_DONTWAIT)?;
    if sent != payload.len() {
        return Err(io::Error::other("a message was sent in part"));
    }
    Ok(())
}

/// Receives one whole message and its fds from a `SOCK_SEQPACKET` socket,
/// without blocking (`WouldBlock` when none has come): `None` at end of
/// file. A message longer than `buf` is an error (its fds are closed).
pub(crate) fn recv_packet(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let received = recv_message(socket, buf, libc::MSG_DONTWAIT)?;
    if received.truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a message longer than its limit",
        ));
    }
    if received.read == 0 && received.fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((received.read, received.fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_and_payload_arrive_together_and_work() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (reader, mut writer) = std::io::pipe().unwrap();
        send_with_fds(
            ours.as_fd(),
            b"hello standby",
            &[listener.as_fd(), reader.as_fd()],
        )
        .unwrap();
        drop((listener, reader));

        let mut buf = [0u8; 64];
        let (n, fds) = recv_with_fds(theirs.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello standby");
        assert_eq!(fds.len(), 2);
        let mut fds = fds.into_iter();
        // The listener still listens, at the same address.
        let listener = std::net::TcpListener::from(fds.next().unwrap());
        assert_eq!(listener.local_addr().unwrap(), addr);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        listener.accept().unwrap();
        // The pipe's read end reads what is written to its write end.
        let mut reader = std::fs::File::from(fds.next().unwrap());
        writer.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
    }

    #[test]
    fn end_of_file_reads_as_zero_bytes_and_no_fds() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(ours);
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds(theirs.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (0, 0));
    }

    #[test]
    fn packets_stay_whole_with_their_fds_up_to_the_kernels_limit() {
        let (ours, theirs) = seqpacket_pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fds: Vec<BorrowedFd<'_>> = (0..MAX_FDS_PER_MESSAGE).map(|_| listener.as_fd()).collect();
        send_packet(ours.as_fd(), b"first", &fds).unwrap();
        send_packet(ours.as_fd(), b"second", &[]).unwrap();
        let mut buf = [0u8; 64];
        let (n, received) = recv_packet(theirs.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(
            (&buf[..n], received.len()),
            (&b"first"[..], MAX_FDS_PER_MESSAGE)
        );
        let (n, received) = recv_packet(theirs.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!((&buf[..n], received.len()), (&b"second"[..], 0));
        // Nothing more: would block, not end of file.
        let none = recv_packet(theirs.as_fd(), &mut buf).unwrap_err();
        assert_eq!(none.kind(), io::ErrorKind::WouldBlock);
        // Too long for the buffer: an error, not half a message.
        send_packet(ours.as_fd(), &[7u8; 100], &[]).unwrap();
        assert!(recv_packet(theirs.as_fd(), &mut buf).is_err());
        drop(ours);
        assert!(recv_packet(theirs.as_fd(), &mut buf).unwrap().is_none());
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(send_with_fds(ours.as_fd(), b"x", &[listener.as_fd()]).is_err());
    }
}
