//! [`Accept`]: where a serve loop's connections come from.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// A source of connections for [`serve`](crate::serve()): a TCP or Unix
/// listener, or your own.
///
/// Unlike axum's `Listener`, whose `accept` cannot fail, an error here is
/// the loop's to handle: errors that concern one connection (reset,
/// aborted) are skipped, and others (out of file descriptors) are logged
/// and retried with a backoff.
///
/// `accept` must be cancel safe (as tokio's listeners are): the serve loop
/// drops its future the moment a drain starts.
pub trait Accept: Send + 'static {
    /// The connection type.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The peer address type.
    type Addr: fmt::Debug + Send + 'static;

    /// Accepts the next connection.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;

    /// The address this listener is bound to.
    fn local_addr(&self) -> io::Result<Self::Addr>;

    /// Sets `TCP_NODELAY` on an accepted connection, where that means
    /// something. The default does nothing.
    fn set_nodelay(io: &Self::Io, nodelay: bool) -> io::Result<()> {
        let _ = (io, nodelay);
        Ok(())
    }

    /// Whether a connection accepted here can be given up to the next
    /// generation as a socket (TCP and Unix connections can).
    #[doc(hidden)]
    const MOVES: bool = false;

    /// The listening socket, which a [`Handover`](crate::Handover) knows by
    /// its name.
    #[doc(hidden)]
    fn listener_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// The socket of a connection accepted here, taken from the runtime.
    #[doc(hidden)]
    fn into_fd(io: Self::Io) -> Option<OwnedFd> {
        drop(io);
        None
    }

    /// A connection of this listener's kind from its socket, and its
    /// peer's address, as if accepted here.
    #[doc(hidden)]
    fn from_fd(fd: OwnedFd) -> io::Result<(Self::Io, Self::Addr)> {
        drop(fd);
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        tokio::net::TcpListener::accept(self)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        tokio::net::TcpListener::local_addr(self)
    }

    fn set_nodelay(io: &Self::Io, nodelay: bool) -> io::Result<()> {
        io.set_nodelay(nodelay)
    }

    const MOVES: bool = true;

    fn listener_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }

    fn into_fd(io: Self::Io) -> Option<OwnedFd> {
        io.into_std().ok().map(OwnedFd::from)
    }

    fn from_fd(fd: OwnedFd) -> io::Result<(Self::Io, Self::Addr)> {
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(true)?;
        let peer = std.peer_addr()?;
        Ok((tokio::net::TcpStream::from_std(std)?, peer))
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        tokio::net::UnixListener::accept(self)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        tokio::net::UnixListener::local_addr(self)
    }

    const MOVES: bool = true;

    fn listener_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }

    fn into_fd(io: Self::Io) -> Option<OwnedFd> {
        io.into_std().ok().map(OwnedFd::from)
    }

    fn from_fd(fd: OwnedFd) -> io::Result<(Self::Io, Self::Addr)> {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true)?;
        let io = tokio::net::UnixStream::from_std(std)?;
        let peer = io.peer_addr()?;
        Ok((io, peer))
    }
}

/// A connection already waiting in `listener`'s backlog, if there is one:
/// its `accept` polled once, never waiting.
pub(super) fn accept_now<L: Accept>(listener: &mut L) -> Option<io::Result<(L::Io, L::Addr)>> {
    let accept = pin!(listener.accept());
    match accept.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => Some(result),
        Poll::Pending => None,
    }
}

/// The first wait after an accept error; it doubles on each error in a
/// row, up to [`BACKOFF_MAX`].
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(5);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Errors that concern one connection only: skip it and accept the next.
pub(super) fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
