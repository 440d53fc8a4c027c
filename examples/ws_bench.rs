//! The long-lived connection benchmark: how long a drain takes with many
//! open WebSocket connections, and what each one costs in memory.
//!
//! ```text
//! cargo run --release --example ws_bench -- [--connections 1000] [--close-grace SECS]
//!     [--hello PATH]
//! ```
//!
//! It starts `examples/hello` (built in release mode first, or the `hello`
//! that `--hello` names) twice, opens `--connections` WebSocket
//! connections to `/ws` (each checked with one echo), and sends `SIGTERM`:
//!
//! - first with clients that behave (they read, and answer the server's
//!   Close 1001): the time from the signal to the last connection closed,
//!   and to the process's exit;
//! - then with clients that ignore the Close (they never read again): they
//!   are forced at the close grace; the time from the signal to the exit.
//!
//! Target for both: within the close grace + 50 ms. It also prints the
//! server's resident memory per open WebSocket connection (everything the
//! connection holds: socket buffers in user space, hyper, tungstenite, the
//! task, and handover's tracking).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

mod bench_support;
use bench_support::{Hello, kill, ms, rss_kib, watch_exit};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Options {
    connections: usize,
    close_grace: f64,
    hello: Option<PathBuf>,
}

/// Drain time and memory with open WebSockets.
#[derive(clap::Parser)]
#[command(name = "ws_bench", version)]
struct Cli {
    /// WebSockets to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// The server's close grace, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    close_grace: f64,
    /// Run this `hello` instead of building examples/hello in release mode.
    #[arg(long, value_name = "PATH")]
    hello: Option<PathBuf>,
}

fn parse() -> Result<Options, String> {
    let cli = <Cli as clap::Parser>::parse();
    Ok(Options {
        connections: cli.connections,
        close_grace: cli.close_grace,
        hello: cli.hello,
    })
}

/// Opens `n` WebSockets to `hello`, 50 at a time, each checked by an echo.
async fn open(addr: std::net::SocketAddr, n: usize) -> Result<Vec<Ws>, String> {
    let mut all = Vec::with_capacity(n);
    let url = format!("ws://{addr}/ws");
    while all.len() < n {
        let batch = (n - all.len()).min(50);
        let opened = futures_util::future::join_all((0..batch).map(|_| {
            let url = url.clone();
            async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(&url)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                ws.send(Message::text("hi"))
                    .await
                    .map_err(|e| e.to_string())?;
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t == "hi" => Ok(ws),
                    other => Err(format!("no echo: {other:?}")),
                }
            }
        }))
        .await;
        for ws in opened {
            all.push(ws?);
        }
    }
    Ok(all)
}

/// The server's drain time as it logged it (`elapsed_ms=`), in ms.
fn logged_drain_ms(server: &Hello) -> Option<f64> {
    let logs = server.logs.lock().expect("logs");
    let line = logs.iter().rev().find(|l| l.contains("drain finished"))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("elapsed_ms="))?
        .parse()
        .ok()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = parse()?;
    let hello = bench_support::chosen_hello(o.hello.as_deref())?;
    let dir = std::env::temp_dir().join(format!("handover-ws-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let grace = Duration::from_secs_f64(o.close_grace);
    let grace_arg = o.close_grace.to_string();
    let args = ["--close-grace", grace_arg.as_str(), "--drain-timeout", "30"];
    let target = grace + Duration::from_millis(50);
    println!(
        "{} WebSocket connections; close grace {:?}; target: drained within {:?}",
        o.connections, grace, target
    );
    let mut within_target = true;

    // 1. Clients that behave.
    let server = Hello::start(&hello, &dir, &args).await?;
    let pid = server.pid().ok_or("no pid")?;
    let idle_rss = rss_kib(pid);
    let sockets = open(server.addr, o.connections).await?;
    let busy_rss = rss_kib(pid);
    let per_connection = (busy_rss.saturating_sub(idle_rss)) as f64 * 1024.0 / o.connections as f64;
    println!(
        "server RSS: {idle_rss} KiB idle, {busy_rss} KiB with {} open: {per_connection:.0} bytes per connection",
        o.connections
    );
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut away = false;
                while let Some(message) = ws.next().await {
                    if let Ok(Message::Close(Some(frame))) = message {
                        away = frame.code == CloseCode::Away;
                    }
                }
                (away, Instant::now())
            })
        })
        .collect();
    let exit = watch_exit(pid, Duration::from_secs(60));
    let signalled = Instant::now();
    kill(pid, libc::SIGTERM)?;
    let mut last_closed = signalled;
    let mut away = 0;
    for reader in readers {
        let (was_away, at) = reader.await?;
        away += usize::from(was_away);
        last_closed = last_closed.max(at);
    }
    let exited = exit.exited().await;
    let drained = last_closed - signalled;
    println!(
        "behaving clients: {away}/{} got Close 1001; signal -> last connection closed {:.1} ms, -> exit {:.1} ms (server's drain: {:.1} ms)",
        o.connections,
        ms(drained),
        ms(exited - signalled),
        logged_drain_ms(&server).unwrap_or(f64::NAN),
    );
    within_target &= drained <= target && away == o.connections;
    server.stop().await;

    // 2. Clients that ignore the Close.
    let server = Hello::start(&hello, &dir, &args).await?;
    let pid = server.pid().ok_or("no pid")?;
    let deaf = open(server.addr, o.connections).await?;
    let exit = watch_exit(pid, Duration::from_secs(60));
    let signalled = Instant::now();
    kill(pid, libc::SIGTERM)?;
    let exited = exit.exited().await;
    let took = exited - signalled;
    println!(
        "clients ignoring Close: forced; signal -> exit {:.1} ms (close grace + {:.1} ms; server's drain: {:.1} ms)",
        ms(took),
        ms(took.saturating_sub(grace)),
        logged_drain_ms(&server).unwrap_or(f64::NAN),
    );
    within_target &= took <= target;
    drop(deaf);
    server.stop().await;

    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        if within_target {
            "within target"
        } else {
            "TARGET MISSED"
        }
    );
    Ok(())
}
