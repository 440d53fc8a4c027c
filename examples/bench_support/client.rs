//! The load client of `restart_bench`, `goaway_race` and the process
//! tests' HTTP/2 load (`tests/support`): hyper's HTTP/1.1
//! and HTTP/2 clients, one request at a time per client, reconnecting when
//! the server closes a connection.
//!
//! hyper's HTTP/2 client (1.12, with h2 0.4.20) sometimes leaves a request
//! pending forever when a GOAWAY ends its connection under load, even
//! after the connection has closed cleanly and the client has dropped its
//! socket; `goaway_race` shows it with hyper-util's server as with
//! handover's. So each connection's socket says when it is dropped
//! ([`Gone`]), and a request still pending [`LOST_AFTER`] later is
//! [`Outcome::LostByClient`]: nothing can arrive for it any more, and it is
//! sent again, counted apart from failures.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http::header::HOST;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// The longest a connect, or a request until its whole response, may take:
/// past it, it counts as failed, so that a server that stops answering ends
/// the run with a report instead of hanging it.
pub const REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// How long a request may stay pending once the client has dropped its
/// connection, before it counts as lost by the client.
pub const LOST_AFTER: Duration = Duration::from_millis(500);

/// Set once the client has dropped a connection's socket: nothing can
/// arrive on it any more.
pub type Gone = Arc<AtomicBool>;

/// A connection's socket, which sets its [`Gone`] flag when dropped.
struct Tracked {
    stream: TcpStream,
    gone: Gone,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Release);
    }
}

impl tokio::io::AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A connection to send requests on, and its [`Gone`] flag.
pub enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>, Gone),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>, Gone),
}

impl Sender {
    pub fn gone(&self) -> &Gone {
        match self {
            Sender::H1(_, gone) | Sender::H2(_, gone) => gone,
        }
    }
}

/// A new connection to `addr`, HTTP/2 (prior knowledge) if `h2`, within
/// [`REQUEST_LIMIT`].
pub async fn connect(addr: std::net::SocketAddr, h2: bool) -> Result<Sender, String> {
    tokio::time::timeout(REQUEST_LIMIT, connect_now(addr, h2))
        .await
        .unwrap_or_else(|_| Err(format!("connect: nothing within {REQUEST_LIMIT:?}")))
}

async fn connect_now(addr: std::net::SocketAddr, h2: bool) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let gone = Gone::default();
    let io = TokioIo::new(Tracked {
        stream,
        gone: gone.clone(),
    });
    if h2 {
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H2(sender, gone))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("h1 handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Sender::H1(sender, gone))
    }
}

/// The sender for a client's next request: a stream of the HTTP/2
/// connection in `shared` (see [`shared_h2`]); else `kept`, the client's
/// own connection kept after its last answer, or a new one (HTTP/2 if
/// `h2`).
pub async fn next_sender(
    addr: std::net::SocketAddr,
    kept: &mut Option<Sender>,
    shared: Option<&tokio::sync::Mutex<Option<Sender>>>,
    h2: bool,
) -> Result<Sender, String> {
    match (shared, kept.take()) {
        (Some(slot), _) => shared_h2(slot, addr).await,
        (None, Some(sender)) => Ok(sender),
        (None, None) => connect(addr, h2).await,
    }
}

/// The pid `hello` ends each answer with (`hello from <pid>`).
pub fn pid_of(body: &[u8]) -> Option<u32> {
    std::str::from_utf8(body)
        .ok()?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

/// A stream of the HTTP/2 connection in `slot`, shared by several clients:
/// a new connection first if there is none, or if it is closed.
pub async fn shared_h2(
    slot: &tokio::sync::Mutex<Option<Sender>>,
    addr: std::net::SocketAddr,
) -> Result<Sender, String> {
    let mut slot = slot.lock().await;
    if !matches!(&*slot, Some(Sender::H2(s, _)) if !s.is_closed()) {
        *slot = Some(connect(addr, true).await?);
    }
    match slot.as_ref() {
        Some(Sender::H2(s, gone)) => Ok(Sender::H2(s.clone(), gone.clone())),
        _ => unreachable!("the slot holds an HTTP/2 sender"),
    }
}

/// How one request ended.
pub enum Outcome {
    /// A 2xx response, and its whole body.
    Answered(Bytes),
    /// Not sent: the connection was closing (HTTP/1 after `Connection:
    /// close`), or the stream was refused by GOAWAY (HTTP/2, `refused`):
    /// reconnect and send again.
    NotSent {
        refused: bool,
    },
    /// Still pending [`LOST_AFTER`] after the client dropped the
    /// connection: send again (see the module's doc).
    LostByClient,
    Failed(String),
}

/// `GET path` on `sender`, until its response body ends or it is lost
/// (see [`Outcome`]), within [`REQUEST_LIMIT`].
pub async fn get(sender: &mut Sender, path: &str) -> Outcome {
    let gone = sender.gone().clone();
    let request = async {
        let request = Request::get(path)
            .header(HOST, "127.0.0.1")
            .body(Empty::new())
            .expect("request");
        let response = match sender {
            Sender::H1(s, _) => {
                if s.ready().await.is_err() {
                    return Outcome::NotSent { refused: false };
                }
                s.send_request(request).await
            }
            Sender::H2(s, _) => {
                if s.ready().await.is_err() {
                    return Outcome::NotSent { refused: false };
                }
                s.send_request(request).await
            }
        };
        let response = match response {
            Ok(response) => response,
            Err(e) if e.is_canceled() => return Outcome::NotSent { refused: false },
            Err(e) => {
                let text = format!("{e:?}");
                // RFC 9113 6.8: refused by GOAWAY (NO_ERROR): not processed.
                if text.contains("GoAway(") && text.contains("NO_ERROR") {
                    return Outcome::NotSent { refused: true };
                }
                return Outcome::Failed(text);
            }
        };
        let status = response.status();
        match response.into_body().collect().await {
            Ok(body) if status.is_success() => Outcome::Answered(body.to_bytes()),
            Ok(_) => Outcome::Failed(format!("status {status}")),
            Err(e) => Outcome::Failed(format!("body: {e}")),
        }
    };
    outcome_of(request, &gone).await
}

/// Awaits `request` for at most [`REQUEST_LIMIT`], or until it has been
/// pending for [`LOST_AFTER`] since `gone` was set.
async fn outcome_of(request: impl Future<Output = Outcome>, gone: &AtomicBool) -> Outcome {
    let limit = Instant::now() + REQUEST_LIMIT;
    let mut request = std::pin::pin!(request);
    let mut gone_at = None;
    loop {
        // A request answered within the first step costs one timer, as a
        // plain timeout would.
        let step = limit.min(Instant::now() + LOST_AFTER / 5);
        if let Ok(outcome) = tokio::time::timeout_at(step.into(), request.as_mut()).await {
            return outcome;
        }
        if gone.load(Ordering::Acquire) {
            let gone_at = *gone_at.get_or_insert_with(Instant::now);
            if gone_at.elapsed() >= LOST_AFTER {
                return Outcome::LostByClient;
            }
        }
        if Instant::now() >= limit {
            return Outcome::Failed(format!("no response within {REQUEST_LIMIT:?}"));
        }
    }
}
