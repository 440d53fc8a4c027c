//! The example server of the README: restart it with `kill -HUP`.
//!
//! ```text
//! cargo run --release --example hello -- [--addr 127.0.0.1:3000] [--pid-file PATH]
//!     [--drain-timeout SECS] [--ready-timeout SECS] [--close-grace SECS] [--warmup-ms MS]
//!     [--warmup-until PATH] [--tcp-nodelay on|off] [--stable-parent on|off]
//!     [--standby on|off] [--control-socket PATH] [--idle-grace SECS]
//!     [--hand-over-connections on|off]
//! ```
//!
//! - `GET /` answers `hello from <pid>`;
//! - `GET /sleep/{ms}` sleeps, then answers `slept <ms> in <pid>`;
//! - `GET /ws` is a WebSocket echo: each text message comes back unchanged.
//!   When this generation drains it finishes the echoes it owes, sends
//!   Close 1001 (going away), and the client reconnects to the next one;
//! - `GET /events` is a server-sent event stream: one event every 100 ms,
//!   `id:` a sequence number that continues after the `Last-Event-ID` the
//!   client sends, `data: <id> from <pid>`. When this generation drains the
//!   stream ends after its last whole event, and an `EventSource` client
//!   reconnects (after `retry:` ms) and continues with no gap.
//!
//! `SIGHUP` or `SIGUSR2` starts a new generation of this binary, hands it the
//! listening socket, and drains this one once the new one is ready;
//! `SIGTERM` or `SIGINT` drains and exits. Each step is logged.
//!
//! `--stable-parent on` lets it upgrade in a container too, where it is
//! PID 1 or runs under tini or dumb-init: the first process stays as the
//! parent of every generation (see `Builder::stable_parent`).
//!
//! `--standby on` keeps the next generation started and waiting, so that
//! an upgrade hands it the listening socket without starting a process
//! (see `Builder::standby`).
//!
//! `--control-socket PATH` listens for `upgrade` and `status` requests
//! there (`handover upgrade PATH` waits for the upgrade's outcome; see
//! `Builder::control_socket`).
//!
//! At an upgrade, each idle keep-alive connection moves to the new
//! generation, whose client goes on using it as if nothing happened, and
//! each busy one moves once its response is written;
//! `--hand-over-connections off` closes them instead, an idle one after
//! `--idle-grace` (see `Builder::hand_over_connections`).
//!
//! `--warmup-ms` stands for an application that must warm up (fill caches,
//! connect to a database) before it can serve: it takes its listener, waits
//! that long, and only then says it is ready, so the previous generation
//! serves until then. `--warmup-until PATH` warms up until a file exists
//! at PATH instead: a warm-up that ends when something outside says so (a
//! database that comes up, or a test).
//!
//! Operators script against this behaviour: keep it stable.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::convert::Infallible;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::response::sse::{Event, Sse};
use axum::{Extension, Router, extract::Path, routing::get};
use futures_util::{Stream, StreamExt};
use handover::{DrainSignal, Exit, Handover};
use tokio_stream::wrappers::IntervalStream;

/// The example server of the README: restart it with `kill -HUP`.
#[derive(clap::Parser)]
#[command(name = "hello", version)]
struct Args {
    /// The address to listen on (kept across upgrades; a new one is bound
    /// afresh at the next upgrade).
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// Write the serving generation's pid here.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// The longest a drain may take, in seconds.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = common::seconds)]
    drain_timeout: Duration,
    /// How long a new generation has to be ready, in seconds.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = common::seconds)]
    ready_timeout: Duration,
    /// How long WebSockets and event streams have to say goodbye once
    /// draining, in seconds.
    #[arg(long, value_name = "SECS", default_value = "2", value_parser = common::seconds)]
    close_grace: Duration,
    /// Wait this long before saying ready (an application that warms up).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    warmup_ms: u64,
    /// Before saying ready, wait until a file exists at this path (checked
    /// every 10 ms).
    #[arg(long, value_name = "PATH")]
    warmup_until: Option<PathBuf>,
    /// TCP_NODELAY on accepted connections.
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = common::on_off)]
    tcp_nodelay: bool,
    /// Keep a stable parent where this process's exit would end its
    /// container (PID 1, under tini or dumb-init).
    #[arg(long, value_name = "on|off", default_value = "off", action = clap::ArgAction::Set, value_parser = common::on_off)]
    stable_parent: bool,
    /// Keep the next generation started and waiting.
    #[arg(long, value_name = "on|off", default_value = "off", action = clap::ArgAction::Set, value_parser = common::on_off)]
    standby: bool,
    /// Answer `upgrade` and `status` on a control socket here.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// How long an idle keep-alive connection is kept open once draining,
    /// in seconds, when it does not move to the next generation.
    #[arg(long, value_name = "SECS", default_value = "0.5", value_parser = common::seconds)]
    idle_grace: Duration,
    /// Hand idle keep-alive connections to the next generation at an
    /// upgrade (off: close them after the idle grace).
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = common::on_off)]
    hand_over_connections: bool,
}

async fn hello() -> String {
    format!("hello from {}", std::process::id())
}

async fn sleep(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} in {}", std::process::id())
}

async fn ws(upgrade: WebSocketUpgrade, Extension(shutdown): Extension<DrainSignal>) -> Response {
    // `serve` keeps the upgraded connection counted until the socket is
    // dropped, and forces it at the close grace.
    upgrade.on_upgrade(move |socket| echo(socket, shutdown))
}

async fn echo(mut socket: WebSocket, shutdown: DrainSignal) {
    loop {
        tokio::select! {
            // Messages already received are echoed before the goodbye.
            biased;
            message = socket.recv() => match message {
                Some(Ok(Message::Text(text))) => {
                    if socket.send(Message::Text(text)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            () = shutdown.draining() => break,
        }
    }
    let close = CloseFrame {
        code: close_code::AWAY,
        reason: format!("{} is restarting", std::process::id()).into(),
    };
    if socket.send(Message::Close(Some(close))).await.is_ok() {
        // Until the client's own Close (or the close grace).
        while let Some(Ok(_)) = socket.recv().await {}
    }
}

async fn events(
    headers: HeaderMap,
    Extension(shutdown): Extension<DrainSignal>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let pid = std::process::id();
    let first = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map_or(0, |last| last + 1);
    let events = IntervalStream::new(tokio::time::interval(Duration::from_millis(100)))
        .enumerate()
        .map(move |(i, _)| {
            let id = first + i as u64;
            let event = Event::default()
                .id(id.to_string())
                .data(format!("{id} from {pid}"));
            Ok(if i == 0 {
                event.retry(Duration::from_millis(100))
            } else {
                event
            })
        })
        // Ends between two events when the drain starts.
        .take_until(shutdown.draining());
    Sse::new(events)
}

fn main() -> std::process::ExitCode {
    common::main_with_logs("hello", run)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    let warmup = Duration::from_millis(args.warmup_ms);

    // Before the runtime's threads exist: reads and clears the inherited
    // listeners' environment.
    let mut builder = Handover::builder()
        .drain_timeout(args.drain_timeout)
        .ready_timeout(args.ready_timeout)
        .close_grace(args.close_grace)
        .stable_parent(args.stable_parent)
        .standby(args.standby)
        .hand_over_connections(args.hand_over_connections)
        // Readiness is said below, explicitly, after the warm-up.
        .auto_ready(false);
    if let Some(pid_file) = &args.pid_file {
        builder = builder.pid_file(pid_file);
    }
    if let Some(path) = &args.control_socket {
        builder = builder.control_socket(path);
    }
    let handover = builder.from_env()?;

    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = handover.tcp("http", args.addr)?;
        tracing::info!(pid = std::process::id(), addr = %listener.local_addr()?, "listening");
        // `serve` counts every request until its body ends. The layer, on
        // the routes whose handlers read the `DrainSignal`, puts it in
        // their requests (and counts nothing again).
        let signal = handover.graceful().layer().signal_extension(true);
        let app = Router::new()
            .route("/", get(hello))
            .route("/sleep/{ms}", get(sleep))
            .route("/ws", get(ws).layer(signal.clone()))
            .route("/events", get(events).layer(signal))
            // Turns every handler into a route once, as `axum::serve` does,
            // rather than on every request.
            .with_state(());
        if !warmup.is_zero() {
            tracing::info!(warmup_ms = args.warmup_ms, "warming up");
            tokio::time::sleep(warmup).await;
        }
        if let Some(until) = &args.warmup_until {
            tracing::info!(until = %until.display(), "warming up");
            while !until.exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Tells the previous generation (which then drains), writes the pid
        // file, notifies systemd. A failure here is logged; serving goes on.
        if let Err(e) = handover.ready() {
            tracing::error!(error = %e, "while becoming ready; serving anyway");
        }
        let serve = handover
            .serve(listener, app)
            .tcp_nodelay(args.tcp_nodelay)
            .idle_grace(args.idle_grace);
        match serve.await? {
            Exit::HandedOver { pid, report } => {
                tracing::info!(new_pid = pid, %report, "handed over; exiting")
            }
            Exit::Shutdown { report } => tracing::info!(%report, "shut down; exiting"),
            other => tracing::info!(?other, "exiting"),
        }
        Ok(())
    })
}
