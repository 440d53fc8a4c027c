//! [`Handshake`]: what turns an accepted connection into the stream HTTP is
//! served on (TLS, a PROXY protocol header).

use std::future::Future;
use std::io;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::drain::Graceful;

/// Makes the stream that HTTP is served on from an accepted connection: a
/// TLS handshake, or reading a PROXY protocol header (with
/// [`Serve::handshake_info`](super::Serve::handshake_info) to hand on the
/// client's address). Set with [`Serve::handshake`](super::Serve::handshake).
///
/// Any `Fn(I) -> impl Future<Output = io::Result<Io>>` is one, such as
/// `move |tcp| tls.accept(tcp)` with tokio-rustls's `TlsAcceptor`.
///
/// The future runs in the connection's own task, so a slow handshake holds
/// up no other connection, and the connection counts from the moment it is
/// accepted, so a drain waits for a handshake in progress (see
/// [`Serve::handshake`](super::Serve::handshake) for how long).
pub trait Handshake<I>: Send + Sync + 'static {
    /// The stream HTTP is served on.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The handshake.
    type Future: Future<Output = io::Result<Self::Io>> + Send + 'static;

    /// Starts the handshake on an accepted connection.
    fn handshake(&self, io: I) -> Self::Future;

    /// Whether [`give_up`](Handshake::give_up) gives connections up (false
    /// unless implemented): only then does an idle HTTP/1 connection move
    /// to the next generation on an upgrade, rather than close.
    fn gives_up(&self) -> bool {
        false
    }

    /// Gives a connection up for the next generation: the accepted stream
    /// back (whose socket then moves), and what the handshake learned that
    /// the socket does not tell (a PROXY protocol header's client address,
    /// say), which [`take_over`](Handshake::take_over) gets in the next
    /// generation. A TLS stream cannot be given up: its session lives in
    /// this process. The default gives nothing up.
    fn give_up(&self, io: Self::Io) -> Result<(I, Vec<u8>), Self::Io> {
        Err(io)
    }

    /// Takes over a connection the previous generation gave up, whose
    /// handshake learned `learned` (see [`give_up`](Handshake::give_up)):
    /// the stream HTTP goes on on, as the handshake would have made it.
    /// `None`: this handshake cannot (the connection is closed). The
    /// default cannot.
    fn take_over(&self, io: I, learned: &[u8]) -> Option<Self::Future> {
        let _ = (io, learned);
        None
    }
}

/// The [`Handshake`] that serves HTTP on each connection as it was
/// accepted: what a serve loop does unless
/// [`Serve::handshake`](super::Serve::handshake) says otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHandshake;

impl<I> Handshake<I> for NoHandshake
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = I;
    type Future = std::future::Ready<io::Result<I>>;

    fn handshake(&self, io: I) -> Self::Future {
        std::future::ready(Ok(io))
    }

    fn gives_up(&self) -> bool {
        true
    }

    fn give_up(&self, io: I) -> Result<(I, Vec<u8>), I> {
        Ok((io, Vec::new()))
    }

    fn take_over(&self, io: I, _learned: &[u8]) -> Option<Self::Future> {
        Some(std::future::ready(Ok(io)))
    }
}

impl<I, F, Fut, Io> Handshake<I> for F
where
    F: Fn(I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = io::Result<Io>> + Send + 'static,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Io = Io;
    type Future = Fut;

    fn handshake(&self, io: I) -> Self::Future {
        self(io)
    }
}

/// Runs a handshake: `None` when it failed, took longer than `timeout`, or
/// was still running `idle_grace` after the drain started (or at the
/// drain's deadline).
pub(super) async fn within<F, Io>(
    handshake: F,
    graceful: &Graceful,
    timeout: Duration,
    idle_grace: Duration,
) -> Option<Io>
where
    F: Future<Output = io::Result<Io>>,
{
    let mut handshake = pin!(handshake);
    // Without a handshake (or with one that needs no round trip) it is
    // done at once: no timer, no drain watch.
    let now = std::future::poll_fn(|cx| Poll::Ready(handshake.as_mut().poll(cx))).await;
    let result = match now {
        Poll::Ready(result) => result,
        Poll::Pending => {
            let mut handshake = pin!(tokio::time::timeout(timeout, handshake));
            let mut drain = pin!(graceful.signal().draining());
            let result = tokio::select! {
                result = handshake.as_mut() => result,
                () = &mut drain => tokio::select! {
                    result = handshake.as_mut() => result,
                    () = tokio::time::sleep(idle_grace) => {
                        log!(debug, "handshake still running at the drain's idle grace; closed");
                        return None;
                    }
                    _ = graceful.forced() => return None,
                },
            };
            let Ok(result) = result else {
                log!(
                    debug,
                    timeout_ms = timeout.as_millis() as u64,
                    "handshake timed out"
                );
                return None;
            };
            result
        }
    };
    match result {
        Ok(io) => Some(io),
        Err(e) => {
            log!(debug, error = %e, "handshake failed");
            None
        }
    }
}
