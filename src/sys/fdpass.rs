//! Passing fds over a Unix socket (`SCM_RIGHTS`): how a generation hands
//! its listeners and readiness pipe to a standby that is already running.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::MAX_PASSED_FDS;

/// Room for the control message of `MAX_PASSED_FDS` fds, aligned as a
/// `cmsghdr` must be.
#[repr(C)]
struct ControlBuffer {
    _align: [libc::cmsghdr; 0],
    bytes: [u8; 512],
}

fn control_space(count: usize) -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((count * mem::size_of::<RawFd>()) as u32) as usize }
}

/// Sends `payload` (at least one byte) with `fds` attached to its first
/// byte, in one `sendmsg`; the rest of `payload`, if the socket took only
/// part of it, with plain writes.
pub(crate) fn send_with_fds(
    socket: BorrowedFd<'_>,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if payload.is_empty() || fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an empty payload, or too many fds",
        ));
    }
    let space = control_space(fds.len());
    let mut control = ControlBuffer {
        _align: [],
        bytes: [0; 512],
    };
    assert!(space <= control.bytes.len(), "MAX_PASSED_FDS fits");
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
    #[cfg(target_os = "linux")]
    let flags = libc::MSG_NOSIGNAL;
    #[cfg(not(target_os = "linux"))]
    let flags = 0;
    let sent = loop {
        // SAFETY: `msg` points at `iov` (valid for reads of the payload)
        // and at `control` (its control message built above), both alive
        // for the call.
        let rc = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, flags) };
        if rc >= 0 {
            break rc as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut rest = &payload[sent..];
    while !rest.is_empty() {
        // SAFETY: `rest` is valid for reads of its length.
        let rc = unsafe { libc::send(socket.as_raw_fd(), rest.as_ptr().cast(), rest.len(), flags) };
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
///
/// An error if the sender attached more fds than fit (the kernel then
/// closes the rest and says `MSG_CTRUNC`): what arrived is closed.
pub(crate) fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = ControlBuffer {
        _align: [],
        bytes: [0; 512],
    };
    let space = control_space(MAX_PASSED_FDS);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in `send_with_fds`.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.bytes.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    #[cfg(target_os = "linux")]
    let flags = libc::MSG_CMSG_CLOEXEC;
    #[cfg(not(target_os = "linux"))]
    let flags = 0;
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
    // SAFETY: the kernel has filled `msg_control` with `msg_controllen`
    // bytes of control messages; CMSG_FIRSTHDR/CMSG_NXTHDR walk them within
    // that length, and an SCM_RIGHTS message's data is `cmsg_len -
    // CMSG_LEN(0)` bytes of fds, each new in this process and owned by
    // nothing else yet.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(header).cast::<RawFd>();
                for i in 0..bytes / mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    for fd in &fds {
        // `MSG_CMSG_CLOEXEC` did it where it exists.
        super::set_cloexec(std::os::fd::AsFd::as_fd(fd))?;
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("more fds were sent than can be received"));
    }
    Ok((read, fds))
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
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(send_with_fds(ours.as_fd(), b"x", &[listener.as_fd()]).is_err());
    }
}
