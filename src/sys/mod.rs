//! The few system calls that the standard library does not wrap: adopting
//! inherited fds and checking what they are; in [`spawn`], starting the next
//! generation with its fds in place; in [`fdpass`], handing fds to a
//! standby over a Unix socket; and in `process` (Linux), what a stable
//! parent does to the generations under it.
//!
//! This is the only module of the crate with `unsafe` code; each block says
//! why it is sound.
#![allow(unsafe_code)]

pub(crate) mod fdpass;
#[cfg(target_os = "linux")]
pub(crate) mod process;
pub(crate) mod spawn;

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Socket families a listener can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Inet,
    Inet6,
    Unix,
    Other(i32),
}

impl Family {
    pub(crate) fn describe(self) -> String {
        match self {
            Family::Inet => "an IPv4 socket".into(),
            Family::Inet6 => "an IPv6 socket".into(),
            Family::Unix => "a Unix socket".into(),
            Family::Other(f) => format!("a socket of address family {f}"),
        }
    }
}

/// What an inherited fd turned out to be, when it is not a listener.
#[derive(Debug)]
pub(crate) enum NotListener {
    Closed,
    NotSocket,
    NotStream,
    NotListening,
    Io(io::Error),
}

impl std::fmt::Display for NotListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotListener::Closed => f.write_str("it is not open"),
            NotListener::NotSocket => f.write_str("it is not a socket"),
            NotListener::NotStream => f.write_str("it is not a stream socket"),
            NotListener::NotListening => f.write_str("it is a socket that is not listening"),
            NotListener::Io(e) => write!(f, "it could not be inspected: {e}"),
        }
    }
}

/// Fds already adopted by this process: each may be owned once only.
static ADOPTED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

pub(crate) fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor flags of `fd`; on a number
    // that is not an open fd it fails with EBADF and touches nothing.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Takes ownership of `fd`, which the environment says was passed to us,
/// once it is open, was not adopted before, and `check` (given it only
/// borrowed) has found it to be what it should be. An fd that fails is
/// neither owned nor closed: a wrong number in the environment may name an
/// fd this process opened for something else.
pub(crate) fn adopt<T>(
    fd: RawFd,
    check: impl FnOnce(BorrowedFd<'_>) -> Result<T, String>,
) -> Result<(OwnedFd, T), String> {
    if fd < 0 || !is_open(fd) {
        return Err(NotListener::Closed.to_string());
    }
    let mut adopted = crate::lock::lock(&ADOPTED);
    if adopted.contains(&fd) {
        return Err("it was already taken from the environment".into());
    }
    // SAFETY: `fd` is open (checked above) and stays open while borrowed:
    // the borrow ends with `check`, within this call, which runs early in
    // `main` by `from_env`'s contract, before the application has threads
    // that could close it.
    let checked = check(unsafe { BorrowedFd::borrow_raw(fd) })?;
    adopted.push(fd);
    // SAFETY: `fd` is open, nothing in this process owns it: it was passed
    // across `exec` by the contract of the variables that name it, which
    // are read once and then removed, it is what they say it is (checked
    // above), and the ADOPTED list makes sure no second `OwnedFd` is made
    // for it.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, checked))
}

/// Sets `FD_CLOEXEC` on the fd numbered `fd`, if it is open: what the
/// environment passed and was not taken, after an error, so that it does
/// not leak into the application's children.
pub(crate) fn set_cloexec_raw(fd: RawFd) {
    if fd >= 0 {
        let _ = set_cloexec_number(fd);
    }
}

fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` holds the
    // size of `value`; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { mem::zeroed() };
    // SAFETY: `st` is valid for writes of one `stat`.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn fstat_mode(fd: BorrowedFd<'_>) -> io::Result<libc::mode_t> {
    Ok(fstat(fd)?.st_mode)
}

/// The address family of a socket, from `getsockname`.
pub(crate) fn family(fd: BorrowedFd<'_>) -> io::Result<Family> {
    // SAFETY: an all-zero `sockaddr_storage` is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` is valid for writes of `len` bytes, the size of a
    // `sockaddr_storage`, which holds any socket address.
    let rc = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(match i32::from(addr.ss_family) {
        libc::AF_INET => Family::Inet,
        libc::AF_INET6 => Family::Inet6,
        libc::AF_UNIX => Family::Unix,
        other => Family::Other(other),
    })
}

/// Checks that `fd` is a listening stream socket and returns its family.
pub(crate) fn listening_stream_socket(fd: BorrowedFd<'_>) -> Result<Family, NotListener> {
    let mode = fstat_mode(fd).map_err(NotListener::Io)?;
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(NotListener::NotSocket);
    }
    let ty = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(NotListener::Io)?;
    if ty != libc::SOCK_STREAM {
        return Err(NotListener::NotStream);
    }
    let listening =
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).map_err(NotListener::Io)?;
    if listening == 0 {
        return Err(NotListener::NotListening);
    }
    family(fd).map_err(NotListener::Io)
}

/// Whether `fd` is a pipe (the readiness channel).
pub(crate) fn is_pipe(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(fstat_mode(fd)? & libc::S_IFMT == libc::S_IFIFO)
}

/// Whether `fd` is a socket (a standby's channel to its generation).
pub(crate) fn is_socket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(fstat_mode(fd)? & libc::S_IFMT == libc::S_IFSOCK)
}

/// Sets `FD_CLOEXEC`, so the fd does not leak into processes we `exec`.
pub(crate) fn set_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_cloexec_number(fd.as_raw_fd())
}

/// Sets `FD_CLOEXEC` on the fd numbered `fd`; `EBADF` if it is not open.
fn set_cloexec_number(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD only read and write the descriptor flags of
    // the fd numbered `fd`; on a number that is not open they fail with
    // EBADF and touch nothing.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags == -1 || libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets `O_NONBLOCK`, as Tokio wants of the fds it registers.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and write the status flags of an fd
    // that `BorrowedFd` guarantees is open.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags == -1 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == -1
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether `fd` is a `SOCK_SEQPACKET` Unix socket (the channel that carries
/// idle connections to the next generation).
pub(crate) fn is_seqpacket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    if fstat_mode(fd)? & libc::S_IFMT != libc::S_IFSOCK {
        return Ok(false);
    }
    Ok(
        getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)? == libc::SOCK_SEQPACKET
            && family(fd)? == Family::Unix,
    )
}

/// Checks that `fd`, handed over as a connection, is a stream socket of
/// `family` that does not listen: a connection and nothing else.
pub(crate) fn connected_stream_socket(fd: BorrowedFd<'_>, expected: Family) -> io::Result<()> {
    let bad = |what: String| Err(io::Error::new(io::ErrorKind::InvalidData, what));
    match listening_stream_socket(fd) {
        Err(NotListener::NotListening) => {}
        Ok(_) => return bad("it is a listening socket".into()),
        Err(NotListener::Io(e)) => return Err(e),
        Err(other) => return bad(other.to_string()),
    }
    let got = family(fd)?;
    if got != expected {
        return bad(format!(
            "it is {}, not {}",
            got.describe(),
            expected.describe()
        ));
    }
    Ok(())
}

/// The most fds one upgrade passes on (the listeners, the readiness
/// channel, the state and the connections channel).
pub(crate) const MAX_PASSED_FDS: usize = 64;

/// Removes an inheritance variable from the environment, so that the
/// application's own children do not see it.
pub(crate) fn remove_env(name: &str) {
    // SAFETY: `remove_var` is unsound while another thread reads or writes
    // the environment, and this crate cannot prove that none does: it is
    // reached from `Listeners::from_env` and `Builder::from_env`, safe
    // functions whose documentation requires that they run early in
    // `main`, before the application starts threads that use the
    // environment (a Tokio runtime's idle workers do not). A program that
    // breaks that requirement has a data race on the environment, as with
    // any other call of `remove_var` or `set_var` in such a program.
    unsafe { std::env::remove_var(name) }
}

/// `CLOCK_MONOTONIC` in microseconds: what systemd compares a
/// `RELOADING=1`'s `MONOTONIC_USEC=` with (`Type=notify-reload`).
pub(crate) fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` to the pointer, which
    // points at a live, writable one; CLOCK_MONOTONIC is always supported.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if result != 0 {
        return 0;
    }
    (now.tv_sec as u64) * 1_000_000 + (now.tv_nsec as u64) / 1_000
}

/// Sets the mode of the socket `fd` before it is bound: on Linux the file
/// `bind` makes has that mode (less the umask) from its creation, so there
/// is no moment when others may connect, and no path to follow.
pub(crate) fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: `fchmod` changes the mode of an fd that `BorrowedFd`
    // guarantees is open; it touches no memory of ours.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The uid of the process at the other end of the connected Unix socket
/// `fd`, as the kernel recorded it when the connection was made.
pub(crate) fn peer_uid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: an all-zero `ucred` is a valid value of this plain C
        // struct.
        let mut cred: libc::ucred = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes, and `len` holds
        // the size of `cred`; the kernel writes at most that.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(cred.uid)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let (mut uid, mut gid): (libc::uid_t, libc::gid_t) = (0, 0);
        // SAFETY: `getpeereid` writes one uid and one gid to the pointers,
        // which point at live, writable values.
        if unsafe { libc::getpeereid(fd.as_raw_fd(), &mut uid, &mut gid) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(uid)
    }
}

/// This process's effective uid: who may use its control socket.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: `geteuid` takes nothing, touches no memory of ours and
    // cannot fail.
    unsafe { libc::geteuid() }
}

/// The seals a state snapshot carries: nothing can write it, grow it,
/// shrink it, or take the seals off, once it is made.
#[cfg(target_os = "linux")]
const STATE_SEALS: libc::c_int =
    libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A read-only file holding `bytes`, to hand to the next generation: on
/// Linux a sealed `memfd` (no file on disk, and the receiver can check that
/// nobody can change it); elsewhere a temporary file, unlinked at once and
/// opened read-only.
pub(crate) fn sealed_file(bytes: &[u8]) -> io::Result<OwnedFd> {
    use std::io::Write;
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the name is a NUL-terminated string; the flags are valid.
        let fd = unsafe {
            libc::memfd_create(
                c"handover-state".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `memfd_create` just returned this fd, which nothing else
        // owns.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.write_all(bytes)?;
        // SAFETY: F_ADD_SEALS only changes the seals of an fd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, STATE_SEALS) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from(file))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let path = std::env::temp_dir().join(format!(
            "handover-state-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        use std::os::unix::fs::OpenOptionsExt;
        // 0600 from its creation: nobody else can open it before it is
        // unlinked (TLS ticket keys go through it).
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        let read = std::fs::File::open(&path);
        let _ = std::fs::remove_file(&path);
        file.write_all(bytes)?;
        Ok(OwnedFd::from(read?))
    }
}

/// Checks that `fd` is a file made by [`sealed_file`] of at most `limit`
/// bytes: on Linux it must be sealed as `sealed_file` seals it, so that
/// what is read is what the previous generation wrote, whole.
pub(crate) fn check_sealed(fd: BorrowedFd<'_>, limit: u64) -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: F_GET_SEALS only reads the seals of an fd that
        // `BorrowedFd` guarantees is open.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals == -1 {
            return Err(format!(
                "it is not a sealed memfd: {}",
                io::Error::last_os_error()
            ));
        }
        if seals & STATE_SEALS != STATE_SEALS {
            return Err("its memfd is not sealed against writes and resizing".into());
        }
    }
    let st = fstat(fd).map_err(|e| e.to_string())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err("it is not a file".into());
    }
    if st.st_size as u64 > limit {
        return Err(format!(
            "it holds {} bytes, more than the limit of {limit}",
            st.st_size
        ));
    }
    Ok(())
}

/// The contents of a file that [`check_sealed`] has checked.
pub(crate) fn read_sealed(fd: OwnedFd) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|e| e.to_string())?;
    let mut bytes = vec![0; meta.len() as usize];
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| format!("reading it: {e}"))?;
    Ok(bytes)
}

/// Whether the fd numbered `fd` is open with `FD_CLOEXEC` (tests).
#[cfg(test)]
pub(crate) fn has_cloexec(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor flags; EBADF otherwise.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    flags != -1 && flags & libc::FD_CLOEXEC != 0
}

/// Clears `FD_CLOEXEC` on `fd`, as an fd passed across `exec` has it
/// (tests).
#[cfg(test)]
pub(crate) fn clear_cloexec(fd: BorrowedFd<'_>) {
    // SAFETY: F_SETFD only writes the descriptor flags of an fd that
    // `BorrowedFd` guarantees is open.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0);
    }
}

/// Makes a FIFO at `path` (for tests that plant one).
#[cfg(test)]
pub(crate) fn make_fifo(path: &std::path::Path) -> io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: `mkfifo` reads the NUL-terminated string `path` owns, which
    // outlives the call.
    if unsafe { libc::mkfifo(path.as_ptr(), 0o600) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A file's identity: its device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of what `fd` refers to.
    pub(crate) fn of_fd(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let st = fstat(fd)?;
        Ok(Self {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
        })
    }

    /// The identity of what `path` names, following symlinks.
    pub(crate) fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|meta| Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}
