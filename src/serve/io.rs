//! [`ConnIo`]: one connection's IO, which tells HTTP/2 from HTTP/1 by its
//! first bytes and fails once the close grace forces it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::drain::Force;
use crate::drain::UpgradeToken;
use crate::lock::lock;

/// Not known yet: too few bytes read.
const PROTOCOL_UNKNOWN: u8 = 0;
/// HTTP/1.x.
const PROTOCOL_H1: u8 = 1;
/// HTTP/2 with prior knowledge (its preface).
pub(super) const PROTOCOL_H2: u8 = 2;

/// The start of the HTTP/2 connection preface that an h2c client with
/// prior knowledge sends first.
const H2_PREFACE_START: &[u8; 4] = b"PRI ";

/// What the serve loop and one connection's IO share.
pub(super) struct ConnState {
    /// `PROTOCOL_*`, from the first bytes read.
    pub(super) protocol: AtomicU8,
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
            protocol: AtomicU8::new(PROTOCOL_UNKNOWN),
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
    /// One connection's IO: notes from the first bytes read whether the
    /// peer speaks HTTP/2 (hyper-util's auto builder does not tell), and
    /// fails once the close grace forces it (after an upgrade).
    pub(super) struct ConnIo<I> {
        #[pin]
        inner: I,
        state: Arc<ConnState>,
        seen: [u8; 4],
        seen_len: u8,
        decided: bool,
    }
}

impl<I> ConnIo<I> {
    pub(super) fn new(inner: I, state: Arc<ConnState>) -> Self {
        Self {
            inner,
            state,
            seen: [0; 4],
            seen_len: 0,
            decided: false,
        }
    }
}

impl<I: AsyncRead> AsyncRead for ConnIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let state = &**this.state;
        if *this.decided {
            return unless_forced!(state, read_waker, cx, this.inner.poll_read(cx, buf));
        }
        let before = buf.filled().len();
        let result = this.inner.poll_read(cx, buf);
        let new = &buf.filled()[before..];
        let have = usize::from(*this.seen_len);
        let take = new.len().min(4 - have);
        this.seen[have..have + take].copy_from_slice(&new[..take]);
        *this.seen_len += take as u8;
        let seen = &this.seen[..usize::from(*this.seen_len)];
        if seen.len() == 4 || !H2_PREFACE_START.starts_with(seen) {
            *this.decided = true;
            let protocol = if seen == H2_PREFACE_START {
                PROTOCOL_H2
            } else {
                PROTOCOL_H1
            };
            state.protocol.store(protocol, Ordering::Relaxed);
        }
        result
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
        if this.state.is_forced() {
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

    async fn sniff(chunks: &[&[u8]]) -> u8 {
        let (mut client, server) = tokio::io::duplex(64);
        let state = Arc::new(ConnState::default());
        let mut io = ConnIo::new(server, state.clone());
        let mut buf = [0u8; 64];
        for chunk in chunks {
            client.write_all(chunk).await.unwrap();
            let n = io.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], *chunk, "bytes pass through unchanged");
        }
        state.protocol.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn sniffs_the_http2_preface() {
        assert_eq!(
            sniff(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).await,
            PROTOCOL_H2
        );
        assert_eq!(sniff(&[b"PR", b"I * HTTP/2.0"]).await, PROTOCOL_H2);
        assert_eq!(sniff(&[b"P", b"R"]).await, PROTOCOL_UNKNOWN);
    }

    #[test]
    fn tracking_an_upgraded_connection_costs_under_200_bytes() {
        // Per connection: the shared state (with the upgrade's token) in an
        // `Arc`, and one entry in the close grace's map of live upgrades.
        let state = std::mem::size_of::<ConnState>() + 2 * std::mem::size_of::<usize>();
        let entry = std::mem::size_of::<(u64, Option<std::sync::Weak<dyn Force>>)>() + 1;
        assert!(state + entry < 200, "{state} + {entry}");
    }

    #[tokio::test]
    async fn sniffs_http1_methods() {
        assert_eq!(sniff(&[b"GET / HTTP/1.1\r\n"]).await, PROTOCOL_H1);
        assert_eq!(sniff(&[b"P", b"OST / HTTP/1.1\r\n"]).await, PROTOCOL_H1);
        assert_eq!(sniff(&[b"PRIX"]).await, PROTOCOL_H1);
    }
}
