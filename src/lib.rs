//! Zero-downtime restarts for [tower] and [hyper] servers (axum, tonic).
//!
//! A server that uses `handover` knows, at every instant, how much work it
//! still owes its clients (requests in flight, response bodies still
//! streaming, connections open) and can stop taking new work and wait for
//! that work to end, with a deadline. That drain is what lets a new
//! generation of the server take over without a client noticing.
//!
//! ```
//! use std::future::IntoFuture;
//! use std::time::Duration;
//! use axum::{Router, routing::get};
//! use handover::Graceful;
//! # use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let graceful = Graceful::builder()
//!     .drain_timeout(Duration::from_secs(5))
//!     .build();
//! let app = Router::new().route("/", get(|| async { "hello" })).with_state(());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let addr = listener.local_addr()?;
//! let server = tokio::spawn(handover::serve(listener, app, &graceful).into_future());
//!
//! // A client, then a drain (on SIGTERM, say).
//! let mut stream = tokio::net::TcpStream::connect(addr).await?;
//! stream.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
//! let mut response = vec![0; 1024];
//! let n = stream.read(&mut response).await?;
//! assert!(response[..n].starts_with(b"HTTP/1.1 200 OK"));
//!
//! graceful.start_drain();
//! let report = server.await??;
//! assert!(report.is_clean(), "{report}");
//! # Ok(())
//! # }
//! ```
//!
//! The example above is the drain alone. With [`Handover`], the same server
//! also restarts without downtime: `SIGHUP` starts a fresh copy of the
//! binary, hands it the listening sockets, and drains this copy once the new
//! one is ready; `SIGTERM` drains and exits. See [`Handover`] for the
//! one-call path and `examples/hello.rs` for a server to try it on.
//!
//! # Two halves
//!
//! The drain half knows nothing of processes, and serves any server:
//!
//! - [`Graceful`]: the counts of in-flight requests and open connections,
//!   the drain with its deadline, and its [`DrainReport`]; [`DrainSignal`]
//!   for handlers that end long-lived work when the drain starts.
//! - [`layer`]: [`GracefulLayer`](layer::GracefulLayer), a tower layer that
//!   counts each request until its response body has ended, for a Router
//!   under `axum::serve` or a tonic `Server` (`.layer(graceful.layer())`).
//! - [`serve`](mod@serve): an accept loop on hyper's HTTP/1 and HTTP/2
//!   connections that tracks every connection and drains each protocol the
//!   way its clients take without an error, with TLS through
//!   [`Serve::handshake`](serve::Serve::handshake); it gives idle HTTP/1
//!   connections up when the hand-over half carries them to the next
//!   generation.
//!
//! The hand-over half knows nothing of HTTP beyond calling the serve loop:
//!
//! - [`Handover`]: inherit or bind listeners, serve, upgrade on a signal or
//!   on the [`control`] socket, drain, write the pid file, notify systemd;
//!   returns how this generation ended ([`Exit`]). [`Builder`] has its
//!   settings: the stable parent for containers, the standby.
//! - [`Listeners`]: listeners inherited from a previous generation or from
//!   systemd socket activation (each fd checked), or bound; [`env`](mod@env) names
//!   the variables they come by.
//!
//! # What a client sees during a drain
//!
//! - No new connection is accepted once the drain starts.
//! - A request already received runs to the end of its response body.
//! - An HTTP/1 keep-alive client gets `Connection: close` on its next
//!   response and leaves; one that stays idle is closed after the idle
//!   grace. After a hand-over under [`Handover::serve`], its plaintext
//!   connection moves to the next generation instead, idle or once its
//!   response is written, and it sees nothing at all.
//! - An HTTP/2 client gets GOAWAY at once; its open streams finish.
//! - WebSocket, event-stream and gRPC-stream handlers learn of the drain
//!   through [`DrainSignal`] and say goodbye; after the close grace
//!   ([`GracefulBuilder::close_grace`]) upgraded connections are forced, and
//!   event and gRPC streams waiting for their next frame end there.
//! - After the drain timeout, whatever is left is closed and counted as
//!   forced.
//!
//! [tower]: https://docs.rs/tower
//! [hyper]: https://docs.rs/hyper
#![cfg(unix)]
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod log;

// The drain half: knows nothing of processes.
mod drain;
pub mod layer;
pub mod serve;

// The hand-over half: knows nothing of HTTP beyond calling `serve`.
pub mod control;
mod handover;
mod inherit;
#[cfg(target_os = "linux")]
mod keeper;
mod notify;
mod signals;
mod upgrade;

// Under both.
mod error;
mod lock;
pub mod metrics;
mod sys;

pub use drain::{
    ConnectionToken, DrainReport, DrainSignal, Draining, Graceful, GracefulBuilder, UpgradeToken,
};
pub use error::Error;
pub use handover::{Builder, Exit, Handover};
pub use inherit::{Listeners, env};
pub use serve::serve;

/// The README's code, compiled with the doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
