//! The example server of the README.
//!
//! ```text
//! cargo run --release --example hello -- [--addr 127.0.0.1:3000] [--drain-timeout SECS]
//! ```
//!
//! `GET /` answers `hello from <pid>`; `GET /sleep/{ms}` sleeps, then answers
//! `slept <ms> in <pid>`. `SIGTERM` or `SIGINT` (Ctrl-C) drains: requests in
//! flight finish, then the process exits and logs its drain report.

use std::net::SocketAddr;
use std::time::Duration;

use axum::{Router, extract::Path, routing::get};
use handover::Graceful;
use tokio::signal::unix::{SignalKind, signal};

struct Args {
    addr: SocketAddr,
    drain_timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
        drain_timeout: Duration::from_secs(30),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => {
                let v = value()?;
                args.addr = v.parse().map_err(|e| format!("--addr {v}: {e}"))?;
            }
            "--drain-timeout" => {
                let v = value()?;
                let secs: f64 = v.parse().map_err(|e| format!("--drain-timeout {v}: {e}"))?;
                args.drain_timeout = Duration::try_from_secs_f64(secs)
                    .map_err(|e| format!("--drain-timeout {v}: {e}"))?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

async fn hello() -> String {
    format!("hello from {}", std::process::id())
}

async fn sleep(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} in {}", std::process::id())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = parse_args().map_err(|e| format!("hello: {e}"))?;

    let graceful = Graceful::new();
    let app = Router::new()
        .route("/", get(hello))
        .route("/sleep/{ms}", get(sleep));
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    tracing::info!(pid = std::process::id(), addr = %listener.local_addr()?, "ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let trigger = graceful.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        trigger.start_drain();
    });

    let report = handover::serve(listener, app, &graceful)
        .drain_timeout(args.drain_timeout)
        .await?;
    tracing::info!(%report, "exiting");
    Ok(())
}
