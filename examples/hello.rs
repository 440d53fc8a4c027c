//! The example server of the README: restart it with `kill -HUP`.
//!
//! ```text
//! cargo run --release --example hello -- [--addr 127.0.0.1:3000] [--pid-file PATH]
//!     [--drain-timeout SECS] [--ready-timeout SECS] [--warmup-ms MS]
//! ```
//!
//! - `GET /` answers `hello from <pid>`;
//! - `GET /sleep/{ms}` sleeps, then answers `slept <ms> in <pid>`.
//!
//! `SIGHUP` or `SIGUSR2` starts a new generation of this binary, hands it the
//! listening socket, and drains this one once the new one is ready;
//! `SIGTERM` or `SIGINT` drains and exits. Each step is logged.
//!
//! `--warmup-ms` stands for an application that must warm up (fill caches,
//! connect to a database) before it can serve: it takes its listener, waits
//! that long, and only then says it is ready, so the previous generation
//! serves until then.
//!
//! Operators script against this behaviour: keep it stable.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::{Router, extract::Path, routing::get};
use handover::{Exit, Handover};

struct Args {
    addr: SocketAddr,
    pid_file: Option<PathBuf>,
    drain_timeout: Duration,
    ready_timeout: Duration,
    warmup: Duration,
}

fn seconds(flag: &str, v: &str) -> Result<Duration, String> {
    let secs: f64 = v.parse().map_err(|e| format!("{flag} {v}: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{flag} {v}: {e}"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
        pid_file: None,
        drain_timeout: Duration::from_secs(30),
        ready_timeout: Duration::from_secs(30),
        warmup: Duration::ZERO,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => args.addr = value.parse().map_err(|e| format!("--addr {value}: {e}"))?,
            "--pid-file" => args.pid_file = Some(value.into()),
            "--drain-timeout" => args.drain_timeout = seconds(&flag, &value)?,
            "--ready-timeout" => args.ready_timeout = seconds(&flag, &value)?,
            "--warmup-ms" => {
                let ms: u64 = value
                    .parse()
                    .map_err(|e| format!("--warmup-ms {value}: {e}"))?;
                args.warmup = Duration::from_millis(ms);
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

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = parse_args()?;

    // Before the runtime's threads exist: reads and clears the inherited
    // listeners' environment.
    let mut builder = Handover::builder()
        .drain_timeout(args.drain_timeout)
        .ready_timeout(args.ready_timeout)
        // Readiness is said below, explicitly, after the warm-up.
        .auto_ready(false);
    if let Some(pid_file) = &args.pid_file {
        builder = builder.pid_file(pid_file);
    }
    let handover = builder.from_env()?;

    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = handover.tcp("http", args.addr)?;
        tracing::info!(pid = std::process::id(), addr = %listener.local_addr()?, "listening");
        let app = Router::new()
            .route("/", get(hello))
            .route("/sleep/{ms}", get(sleep))
            .layer(handover.layer());
        if !args.warmup.is_zero() {
            tracing::info!(warmup_ms = args.warmup.as_millis() as u64, "warming up");
            tokio::time::sleep(args.warmup).await;
        }
        // Tells the previous generation (which then drains), writes the pid
        // file, notifies systemd. A failure here is logged; serving goes on.
        if let Err(e) = handover.ready() {
            tracing::error!(error = %e, "while becoming ready; serving anyway");
        }
        match handover.serve(listener, app).await? {
            Exit::HandedOver { pid, report } => {
                tracing::info!(new_pid = pid, %report, "handed over; exiting")
            }
            Exit::Shutdown { report } => tracing::info!(%report, "shut down; exiting"),
            other => tracing::info!(?other, "exiting"),
        }
        Ok(())
    })
}
