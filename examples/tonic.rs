//! A tonic gRPC service with zero-downtime restarts.
//!
//! ```text
//! cargo run --release --example tonic -- [--addr 127.0.0.1:50051] [--pid-file PATH]
//! ```
//!
//! The service (`examples/tonic/ticker.proto`) has a unary `Hello` and a
//! server-streaming `Ticks`. On `SIGHUP` the next generation takes the
//! socket; this one sends HTTP/2 GOAWAY, lets unary calls in flight finish,
//! and ends every open `Ticks` stream at a message boundary with status
//! `UNAVAILABLE`, which gRPC retry policies treat as retryable: a client
//! calls again with `from_seq` = the last seq + 1 and continues on the new
//! generation, without a gap.
//!
//! It also serves the standard gRPC health service (`grpc.health.v1`,
//! tonic-health), which answers `NOT_SERVING` from the moment this
//! generation drains, for the server (`""`) and for `ticker.Ticker`: a
//! Kubernetes gRPC probe stops routing to a pod that drains, and a
//! `Watch` stream opened before the drain hears it at once.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt, stream};
use handover::{DrainSignal, Handover};
use tokio::net::TcpStream;
use tokio_stream::wrappers::IntervalStream;
use tonic::transport::server::TcpConnectInfo;
use tonic::{Request, Response, Status};

#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod ticker {
    include!("tonic/ticker.rs");
}

use ticker::ticker_server::{Ticker, TickerServer};
use ticker::{HelloReply, HelloRequest, Tick, TicksRequest};

struct TickerService {
    shutdown: DrainSignal,
}

type TickStream = Pin<Box<dyn Stream<Item = Result<Tick, Status>> + Send>>;

#[tonic::async_trait]
impl Ticker for TickerService {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let pid = std::process::id();
        let HelloRequest { name, delay_ms } = request.into_inner();
        // A unary call in flight when the drain starts finishes.
        tokio::time::sleep(Duration::from_millis(delay_ms.min(60_000))).await;
        Ok(Response::new(HelloReply {
            message: format!("hello {name} from {pid}"),
            pid,
        }))
    }

    type TicksStream = TickStream;

    async fn ticks(&self, request: Request<TicksRequest>) -> Result<Response<TickStream>, Status> {
        // Filled in by `connect_info` below, as tonic's own server does.
        let client = request.remote_addr();
        let TicksRequest {
            interval_ms,
            from_seq,
        } = request.into_inner();
        tracing::info!(?client, from_seq, "ticks stream opened");
        let interval = Duration::from_millis(interval_ms.clamp(1, 60_000));
        let pid = std::process::id();
        let ticks = IntervalStream::new(tokio::time::interval(interval))
            .zip(stream::iter(from_seq..))
            .map(move |(_, seq)| Ok(Tick { seq, pid }))
            // Stop at a message boundary when the drain starts...
            .take_until(self.shutdown.draining());
        // ...and end with a status the client can act on.
        let goodbye = stream::once(async {
            Err(Status::unavailable(
                "server restarting: call again with from_seq = last seq + 1",
            ))
        });
        Ok(Response::new(Box::pin(ticks.chain(goodbye))))
    }
}

fn main() -> std::process::ExitCode {
    common::main_with_logs("tonic example", run)
}

/// A tonic gRPC service with zero-downtime restarts.
#[derive(clap::Parser)]
#[command(name = "tonic", version)]
struct Args {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    /// Write the serving generation's pid here.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let Args { addr, pid_file } = clap::Parser::parse();
    let mut builder = Handover::builder().drain_timeout(Duration::from_secs(10));
    if let Some(path) = pid_file {
        builder = builder.pid_file(path);
    }
    let handover = builder.from_env()?;

    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = handover.tcp("grpc", addr)?;
        tracing::info!(pid = std::process::id(), addr = %listener.local_addr()?, "listening");
        let shutdown = handover.graceful().signal();
        let ticker = TickerServer::new(TickerService {
            shutdown: shutdown.clone(),
        });
        // The standard health service: NOT_SERVING once this generation
        // drains, so that probes send new calls elsewhere.
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<TickerServer<TickerService>>().await;
        tokio::spawn(async move {
            shutdown.draining().await;
            health
                .set_not_serving::<TickerServer<TickerService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            tracing::info!("health: NOT_SERVING");
        });
        let service = tonic::service::Routes::new(ticker)
            .add_service(health_service)
            .prepare();
        // tonic's generated servers are tower services: handover serves
        // them over HTTP/2 (h2c) and counts every call and stream.
        let exit = handover
            .serve(listener, service)
            // What tonic's `Request::remote_addr` reads.
            .connect_info(|io: &TcpStream, client: &SocketAddr| TcpConnectInfo {
                local_addr: io.local_addr().ok(),
                remote_addr: Some(*client),
            })
            .await?;
        tracing::info!(report = %exit.report(), ?exit, "exiting");
        Ok(())
    })
}
