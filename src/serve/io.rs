//! [`ConnIo`]: one connection's IO, which replays what was read of it
//! before hyper reads (the bytes that told HTTP/2 from HTTP/1, and those a
//! previous generation read and did not parse), fails once the close grace
//! forces it, and does not shut the socket down when the connection is
//! given up to the next generation.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::drain::Force;
use crate::drain::UpgradeToken;
use crate::lock::lock;

/// The HTTP/2 connection preface that an h2c client with prior knowledge
/// sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    H1,
    H2,
}

/// What the serve loop and one connection's IO share.
pub(super) struct ConnState {
    /// The connection is being given up to the next generation: shutting
    /// its IO down would end the socket for the next generation too, so
    /// `poll_shutdown` leaves it open.
    pub(super) giving_up: AtomicBool,
    /// The close grace forced this (upgraded) connection: IO fails.
    pub(super) forced: AtomicBool,
    /// A request on it asked to upgrade (HTTP/1.1 `Upgrade`, `CONNECT`):
    /// its IO may go to a handler's task, which the force must wake. Until
    /// then no waker is kept, and a pending read costs no lock.
    pub(super) may_upgrade: AtomicBool,
    /// Who to wake when forced: the tasks blocked reading and writing
    /// (the two halves of a split WebSocket may be in different tasks).
    pub(super) read_waker: Mutex<Option<Waker>>,
    pub(super) write_waker: Mutex<Option<Waker>>,
    /// Counts the connection once upgraded; dropped with the last owner
    /// of this state, that is with the upgraded IO.
    pub(super) upgrade: OnceLock<UpgradeToken>,
}

impl Default for ConnState {
    fn default() -> Self {
        Self {
            giving_up: AtomicBool::new(false),
            forced: AtomicBool::new(false),
            may_upgrade: AtomicBool::new(false),
            read_waker: Mutex::new(None),
            write_waker: Mutex::new(None),
            upgrade: OnceLock::new(),
        }
    }
}

impl ConnState {
    fn is_forced(&self) -> bool {
        self.forced.load(Ordering::SeqCst)
    }

    /// Wakes `slot`'s owner on `force`; then says whether forced already,
    /// so a force between the caller's check and this call is not missed.
    ///
    /// Only once a request has asked to upgrade: before that the IO is
    /// polled by the connection's own task alone, which polls it again
    /// after forcing it.
    #[inline]
    fn park(&self, slot: &Mutex<Option<Waker>>, waker: &Waker) -> bool {
        if !self.may_upgrade.load(Ordering::SeqCst) {
            return false;
        }
        self.park_waker(slot, waker)
    }

    #[cold]
    fn park_waker(&self, slot: &Mutex<Option<Waker>>, waker: &Waker) -> bool {
        let mut slot = lock(slot);
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
        drop(slot);
        self.is_forced()
    }
}

impl Force for ConnState {
    fn force(&self) {
        self.forced.store(true, Ordering::SeqCst);
        for slot in [&self.read_waker, &self.write_waker] {
            let waker = lock(slot).take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

fn forced_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "upgraded connection forced closed: the drain's close grace passed",
    )
}

/// Polls `$poll`; once forced, or when forced while it waits, fails with
/// [`forced_error`] instead.
macro_rules! unless_forced {
    ($state:expr, $slot:ident, $cx:expr, $poll:expr) => {{
        if $state.is_forced() {
            return Poll::Ready(Err(forced_error()));
        }
        match $poll {
            Poll::Pending if $state.park(&$state.$slot, $cx.waker()) => {
                Poll::Ready(Err(forced_error()))
            }
            other => other,
        }
    }};
}

pin_project! {
    /// One connection's IO: what was read of it already (`prefix`) comes
    /// first, then the socket's; it fails once the close grace forces it
    /// (after an upgrade).
    pub(super) struct ConnIo<I> {
        #[pin]
        inner: I,
        state: Arc<ConnState>,
        prefix: Bytes,
    }
}

impl<I> ConnIo<I> {
    /// `inner`, whose first bytes are `prefix`, read from it already.
    pub(super) fn new(inner: I, state: Arc<ConnState>, prefix: Bytes) -> Self {
        Self {
            inner,
            state,
            prefix,
        }
    }

    /// The stream, and what was read of it that nothing has read from here
    /// yet.
    pub(super) fn into_parts(self) -> (I, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<I: AsyncRead + Unpin> ConnIo<I> {
    /// Reads (into the prefix, to be read again) until the first bytes say
    /// which protocol the peer speaks: HTTP/2 with prior knowledge sends
    /// its 24-byte preface first, anything else is HTTP/1 (as soon as a byte
    /// differs, or at end of file).
    ///
    /// Cancel safe: each read is kept in the prefix as soon as it is made,
    /// so dropping the future while it waits for more (the serve loop does
    /// when the drain starts) loses nothing.
    pub(super) async fn read_version(&mut self) -> io::Result<Version> {
        loop {
            let len = self.prefix.len().min(H2_PREFACE.len());
            if self.prefix[..len] != H2_PREFACE[..len] {
                return Ok(Version::H1);
            }
            if len == H2_PREFACE.len() {
                return Ok(Version::H2);
            }
            let mut seen = BytesMut::with_capacity(H2_PREFACE.len());
            seen.extend_from_slice(&self.prefix);
            let read = tokio::io::AsyncReadExt::read_buf(&mut Pin::new(&mut self.inner), &mut seen)
                .await?;
            self.prefix = seen.freeze();
            if read == 0 {
                return Ok(Version::H1);
            }
        }
    }
}

impl<I: AsyncRead> AsyncRead for ConnIo<I> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let state = &**this.state;
        unless_forced!(state, read_waker, cx, this.inner.poll_read(cx, buf))
    }
}

impl<I: AsyncWrite> AsyncWrite for ConnIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let state = &**this.state;
        unless_forced!(state, write_waker, cx, this.inner.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let state = &**this.state;
        unless_forced!(state, write_waker, cx, this.inner.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.state.is_forced() || this.state.giving_up.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let state = &**this.state;
        unless_forced!(
            state,
            write_waker,
            cx,
            this.inner.poll_write_vectored(cx, bufs)
        )
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The version `chunks` tell, written one at a time, and that every
    /// byte read to tell it is read again.
    async fn sniff(prefix: &[u8], chunks: &[&[u8]]) -> Version {
        let (mut client, server) = tokio::io::duplex(64);
        let state = Arc::new(ConnState::default());
        let mut io = ConnIo::new(server, state, Bytes::copy_from_slice(prefix));
        let written: Vec<u8> = chunks.concat();
        let writer = {
            let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
            tokio::spawn(async move {
                for chunk in chunks {
                    client.write_all(&chunk).await.unwrap();
                    tokio::task::yield_now().await;
                }
                // End of file: what the version is told by, without bytes.
            })
        };
        let version = io.read_version().await.unwrap();
        writer.await.unwrap();
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(
            all,
            [prefix, &written[..]].concat(),
            "bytes pass through unchanged"
        );
        version
    }

    /// The serve loop drops the sniffing future when the drain starts, and
    /// sniffs again: what it had read by then is still read first.
    #[tokio::test]
    async fn sniffing_again_after_a_drop_loses_no_byte() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = ConnIo::new(server, Arc::new(ConnState::default()), Bytes::new());
        client.write_all(b"P").await.unwrap();
        {
            let sniffing = std::pin::pin!(io.read_version());
            // Reads the "P" (the preface's first byte too), then waits.
            assert!(futures_util::poll!(sniffing).is_pending());
        }
        client.write_all(b"OST / HTTP/1.1\r\n").await.unwrap();
        drop(client);
        assert_eq!(io.read_version().await.unwrap(), Version::H1);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"POST / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn the_http2_preface_is_told_from_http1_and_every_byte_read_again() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(sniff(b"", &[preface]).await, Version::H2);
        assert_eq!(
            sniff(b"", &[b"PR", b"I * HTTP/2.0", b"\r\n\r\nSM\r\n\r\n"]).await,
            Version::H2
        );
        assert_eq!(
            sniff(b"PRI * ", &[b"HTTP/2.0\r\n\r\nSM\r\n\r\n"]).await,
            Version::H2
        );
        assert_eq!(sniff(b"", &[b"GET / HTTP/1.1\r\n"]).await, Version::H1);
        assert_eq!(
            sniff(b"", &[b"P", b"OST / HTTP/1.1\r\n"]).await,
            Version::H1
        );
        assert_eq!(sniff(b"", &[b"PRIX"]).await, Version::H1);
        assert_eq!(sniff(b"GET /", &[]).await, Version::H1);
        // End of file before anything: HTTP/1, which then sees it.
        assert_eq!(sniff(b"", &[]).await, Version::H1);
    }

    #[tokio::test]
    async fn a_connection_given_up_is_not_shut_down() {
        let (mut client, server) = tokio::io::duplex(64);
        let state = Arc::new(ConnState::default());
        let mut io = ConnIo::new(server, state.clone(), Bytes::new());
        state.giving_up.store(true, Ordering::SeqCst);
        io.shutdown().await.unwrap();
        let (mut server, rest) = io.into_parts();
        assert!(rest.is_empty());
        server.write_all(b"still open").await.unwrap();
        let mut buf = [0u8; 10];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"still open");
    }

    #[test]
    fn tracking_an_upgraded_connection_costs_under_200_bytes() {
        // Per connection: the shared state (with the upgrade's token) in an
        // `Arc`, and one entry in the close grace's map of live upgrades.
        let state = std::mem::size_of::<ConnState>() + 2 * std::mem::size_of::<usize>();
        let entry = std::mem::size_of::<(u64, Option<std::sync::Weak<dyn Force>>)>() + 1;
        assert!(state + entry < 200, "{state} + {entry}");
    }
}
