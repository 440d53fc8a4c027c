//! Zero-downtime restarts for [tower] and [hyper] servers (axum, tonic).
//!
//! A server that uses `handover` knows, at every instant, how much work it
//! still owes its clients — requests in flight, response bodies still
//! streaming, connections open — and can stop taking new work and wait for
//! that work to end, with a deadline. That drain is what lets a new
//! generation take over without a client noticing.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use handover::Graceful;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let graceful = Graceful::new();
//! let app = Router::new().route("/", get(|| async { "hello" }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let server = tokio::spawn(handover::serve(listener, app, &graceful).into_future());
//!
//! // A client, then a drain (on SIGTERM, say).
//! let mut stream = tokio::net::TcpStream::connect(addr).await?;
//! # use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
//! let mut response = vec![0; 1024];
//! let n = stream.read(&mut response).await?;
//! assert!(response[..n].starts_with(b"HTTP/1.1 200 OK"));
//!
//! let report = graceful.drain(Duration::from_secs(5)).await;
//! assert!(report.is_clean());
//! # server.await.unwrap()?;
//! # Ok(())
//! # }
//! # use std::future::IntoFuture;
//! ```
//!
//! The example above is the drain alone. With [`Handover`], the same server
//! also restarts without downtime: `SIGHUP` starts a fresh copy of the
//! binary, hands it the listening sockets, and drains this copy once the new
//! one is ready; `SIGTERM` drains and exits. See [`Handover`] for the
//! one-call path and `examples/hello.rs` for a server to try it on.
//!
//! # The parts
//!
//! - [`Handover`]: inherit or bind listeners, serve, upgrade on a signal,
//!   drain, write the pid file, notify systemd; returns how this generation
//!   ended ([`Exit`]). In a container, where the old generation's exit
//!   would end it, upgrades are refused unless
//!   [`Builder::stable_parent`] keeps one process as every generation's
//!   parent. [`Builder::standby`] keeps the next generation started and
//!   waiting, so that an upgrade need not start a process.
//! - [`Listeners`]: listeners inherited from a previous generation or from
//!   systemd socket activation (each fd validated), or bound.
//! - [`Graceful`]: the counts of in-flight requests and open connections,
//!   the drain, and its [`DrainReport`].
//! - [`GracefulLayer`]: a tower layer that counts each request until its
//!   response body has ended, adds `Connection: close` to HTTP/1 responses
//!   once draining, and hands handlers a [`ShutdownSignal`]. Use it on any
//!   axum router or tonic server, with any accept loop.
//! - [`serve`]: an accept loop on hyper-util's HTTP/1 + HTTP/2 builder that
//!   tracks every connection and drains each protocol the way its clients
//!   can take without an error. It terminates TLS through
//!   [`Serve::acceptor`], and gives requests their connection's peer
//!   through [`Serve::connect_info`].
//!
//! # What a client sees during a drain
//!
//! - No new connection is accepted once the drain starts.
//! - A request already received runs to the end of its response body.
//! - An HTTP/1 keep-alive client gets `Connection: close` on its next
//!   response and leaves; one that stays idle is closed after the idle
//!   grace.
//! - An HTTP/2 client gets GOAWAY at once; its open streams finish.
//! - WebSocket, event-stream and gRPC-stream handlers learn of the drain
//!   through [`ShutdownSignal`] and say goodbye; after the close grace
//!   ([`Graceful::set_close_grace`]) upgraded connections are forced, and
//!   event and gRPC streams waiting for their next frame end there.
//! - After the drain timeout, whatever is left is closed and counted as
//!   forced.
//!
//! [tower]: https://docs.rs/tower
//! [hyper]: https://docs.rs/hyper
#![cfg(unix)]
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// Emits a `tracing` event that cannot unwind into handover's own code.
///
/// A subscriber can panic: tracing-subscriber's `fmt` layer reports a
/// failed write with `eprintln!`, which panics when stderr is a broken pipe
/// as well (a log collector that died, the SSH session that started the
/// server gone). Such a panic in the task that handles signals would end
/// that task, and the process would ignore `SIGTERM` and `SIGHUP` from then
/// on; one in the middle of an upgrade could leave two generations serving.
/// Losing the log line is the lesser harm.
macro_rules! log {
    ($level:ident, $($arg:tt)+) => {{
        let _ = ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| {
            ::tracing::$level!($($arg)+);
        }));
    }};
}

pub mod control;
mod error;
mod graceful;
mod handover;
#[cfg(target_os = "linux")]
mod keeper;
mod layer;
mod listener;
pub mod metrics;
mod notify;
mod serve;
mod standby;
mod sys;
mod upgrade;

pub use error::Error;
pub use handover::{Builder, DEFAULT_READY_TIMEOUT, Exit, Handover, HandoverServe};
pub use listener::{
    BACKLOG, DEFAULT_MAX_STATE_SIZE, HANDOVER_BOUND_FDNAMES, HANDOVER_GENERATION,
    HANDOVER_READY_FD, HANDOVER_STANDBY_FD, HANDOVER_STATE_FD, LISTEN_FDNAMES, LISTEN_FDS,
    LISTEN_PID, Listeners,
};
pub use notify::NOTIFY_SOCKET;

pub use graceful::{
    ConnectionToken, DEFAULT_CLOSE_GRACE, DrainReport, Draining, Graceful, ShutdownSignal,
    UpgradeToken,
};
pub use layer::{GracefulLayer, GracefulService, ResponseFuture, TrackedBody};
pub use serve::{
    Accept, DEFAULT_DRAIN_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_IDLE_GRACE, DefaultAcceptor, Listener, Serve, serve,
};
