//! A realistic axum application with zero-downtime restarts.
//!
//! ```text
//! cargo run --release --example axum -- [--addr 127.0.0.1:3001] [--pid-file PATH]
//!     [--tls-cert CERT.pem --tls-key KEY.pem] [--hand-over-tickets on|off]
//!     [--ticket-rotation SECS]
//! ```
//!
//! With `--tls-cert` and `--tls-key` it serves HTTPS (HTTP/2 and HTTP/1.1 by
//! ALPN) through tokio-rustls. Each generation reads the certificate when it
//! starts, so after a renewal `kill -HUP` puts the new one in service
//! without dropping a connection; a renewal that left a broken certificate
//! or key fails the new generation's start-up, and the old generation goes
//! on serving the old certificate.
//!
//! Over HTTPS, its session tickets are encrypted with keys of its own
//! (`axum/tickets.rs`), rotated every `--ticket-rotation` seconds (6 hours
//! by default), which each generation hands to the next one
//! (`Handover::hand_over_state`): a client that reconnects after a restart
//! resumes its TLS session instead of a full handshake.
//! `--hand-over-tickets off` makes each generation start with new keys, as
//! rustls's own ticketer does.
//!
//! - `GET /` answers `hello from <pid>`;
//! - `GET /visits` counts visits to this generation (application state);
//! - `GET /whoami` answers `you are <client address>, served by <pid>`
//!   (axum's `ConnectInfo`, filled in by `connect_info`);
//! - `POST /echo` sends the request body back;
//! - `GET /ready` is a readiness probe: 200 while serving, 503 once this
//!   generation drains (for Kubernetes-style rolling updates);
//! - `GET /metrics` is what Prometheus scrapes (metrics-exporter-prometheus):
//!   with handover's `metrics` feature on, the `handover_*` metrics (the
//!   generation, upgrades, drains: see the crate's `metrics` module);
//! - `GET /events` is a server-sent event stream (one `tick` a second, its
//!   `id:` continuing after the `Last-Event-ID` the client sends) that
//!   watches the [`DrainSignal`]: when this generation starts draining,
//!   it sends a last `bye` event, with `retry:` set so the browser's
//!   `EventSource` reconnects at once, to the next generation, and ends;
//! - `GET /ws` is a WebSocket echo, split into a reader and a writer half;
//!   when this generation drains, the writer sends Close 1001 (going away)
//!   and the client reconnects to the next generation. Over HTTP/2 the same
//!   WebSocket opens with `CONNECT` (RFC 8441; axum's `http2` feature), so
//!   the route takes any method.
//!
//! `kill -HUP <pid>` restarts it; `kill -TERM <pid>` drains and exits.

#[path = "common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{any, get, post};
use axum::{Extension, Router};
use futures_util::{SinkExt, Stream, StreamExt, stream};
use handover::{DrainSignal, Exit, Handover};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_stream::wrappers::IntervalStream;

#[allow(unreachable_pub)]
#[path = "axum/tickets.rs"]
mod tickets;
use tickets::TicketKeys;

#[derive(Default)]
struct AppState {
    visits: AtomicU64,
}

async fn hello() -> String {
    format!("hello from {}", std::process::id())
}

async fn visits(State(state): State<Arc<AppState>>) -> String {
    let n = state.visits.fetch_add(1, Ordering::Relaxed) + 1;
    format!("visit {n} to {}", std::process::id())
}

async fn whoami(ConnectInfo(client): ConnectInfo<SocketAddr>) -> String {
    format!("you are {client}, served by {}", std::process::id())
}

async fn echo(body: String) -> String {
    body
}

/// A readiness probe that turns 503 when the drain starts, so a load
/// balancer stops sending new work to this process.
async fn ready(Extension(shutdown): Extension<DrainSignal>) -> StatusCode {
    if shutdown.is_draining() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// Ticks until the drain starts, then says goodbye and ends: the response
/// body finishes cleanly, and the drain does not wait for a stream that
/// would otherwise run forever.
async fn events(
    headers: HeaderMap,
    Extension(shutdown): Extension<DrainSignal>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let pid = std::process::id();
    // A client that reconnects says where it was: carry on from there.
    let first = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map_or(0, |last| last + 1);
    let ticks = IntervalStream::new(tokio::time::interval(Duration::from_secs(1)))
        .enumerate()
        .map(move |(i, _)| {
            let id = first + i as u64;
            Ok(Event::default()
                .event("tick")
                .id(id.to_string())
                .data(format!("{id} from {pid}")))
        })
        .take_until(shutdown.draining());
    let bye = stream::once(async move {
        Ok(Event::default()
            .event("bye")
            .data(format!("{pid} is restarting"))
            .retry(Duration::from_millis(100)))
    });
    Sse::new(ticks.chain(bye)).keep_alive(KeepAlive::default())
}

/// A WebSocket echo whose halves run apart, as chat-like apps do. The
/// upgraded connection stays counted until both halves are gone
/// (`track_upgrade` makes that true under any server, not only
/// `handover`'s, which tracks it by itself).
async fn ws(upgrade: WebSocketUpgrade, Extension(shutdown): Extension<DrainSignal>) -> Response {
    let token = shutdown.track_upgrade();
    upgrade.on_upgrade(move |socket| async move {
        echo_split(socket, shutdown).await;
        drop(token);
    })
}

async fn echo_split(socket: WebSocket, shutdown: DrainSignal) {
    let (mut sink, mut stream) = socket.split();
    let (texts, mut to_send) = tokio::sync::mpsc::channel(16);
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let text = match message {
                Message::Text(text) => text,
                Message::Close(_) => break,
                _ => continue,
            };
            if texts.send(text).await.is_err() {
                break;
            }
        }
    });
    loop {
        tokio::select! {
            biased;
            text = to_send.recv() => {
                let Some(text) = text else { return };
                if sink.send(Message::Text(text)).await.is_err() {
                    return;
                }
            }
            () = shutdown.draining() => break,
        }
    }
    let close = CloseFrame {
        code: close_code::AWAY,
        reason: "restarting".into(),
    };
    let _ = sink.send(Message::Close(Some(close))).await;
    // The reader ends at the client's Close (the close grace bounds it).
    let _ = reader.await;
}

/// A TLS server for the PEM certificate chain and key at these paths,
/// offering HTTP/2 and HTTP/1.1 by ALPN, without session tickets yet.
fn tls_config(cert: &Path, key: &Path) -> Result<ServerConfig, Box<dyn std::error::Error>> {
    let read_error = |path: &Path, e| format!("reading {}: {e}", path.display());
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| read_error(cert, e))?;
    if chain.is_empty() {
        return Err(format!("reading {}: no certificate in it", cert.display()).into());
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| read_error(key, e))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Session tickets with keys of our own: the ones the previous generation
/// handed over, if `hand_over` (and it did), and handed to the next one.
fn session_tickets(
    handover: &Handover,
    config: &mut ServerConfig,
    hand_over: bool,
    rotate_every: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    let handed = handover.take_previous_state().filter(|_| hand_over);
    let (keys, kept) = TicketKeys::new(rotate_every, handed.as_deref())?;
    tracing::info!(kept, "session-ticket keys");
    let keys = Arc::new(keys);
    if hand_over {
        let written = keys.clone();
        handover.hand_over_state(move || Ok(written.write_down()));
    }
    config.ticketer = keys;
    Ok(())
}

fn app(handover: &Handover, prometheus: PrometheusHandle) -> Router {
    let signal = handover.graceful().layer().signal_extension(true);
    Router::new()
        .route("/", get(hello))
        .route("/metrics", get(move || async move { prometheus.render() }))
        .route("/visits", get(visits))
        .route("/whoami", get(whoami))
        .route("/echo", post(echo))
        // `serve` counts every request until its body ends; the layer, on
        // the routes whose handlers read the `DrainSignal`, puts it in
        // their requests (and counts nothing again).
        .route("/events", get(events).layer(signal.clone()))
        .route("/ws", any(ws).layer(signal.clone()))
        .route("/ready", get(ready).layer(signal))
        .with_state(Arc::new(AppState::default()))
}

fn main() -> std::process::ExitCode {
    common::main_with_logs("axum example", run)
}

/// A realistic axum application with zero-downtime restarts.
#[derive(clap::Parser)]
#[command(name = "axum", version)]
struct Args {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:3001")]
    addr: SocketAddr,
    /// Write the serving generation's pid here.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "CERT.pem", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "KEY.pem", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Hand the TLS session-ticket keys to the next generation, so that
    /// clients resume their sessions across a restart.
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = common::on_off)]
    hand_over_tickets: bool,
    /// Rotate the session-ticket keys every this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 6 * 3600)]
    ticket_rotation: u64,
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let Args {
        addr,
        pid_file,
        tls_cert,
        tls_key,
        hand_over_tickets,
        ticket_rotation,
    } = clap::Parser::parse();
    let ticket_rotation = Duration::from_secs(ticket_rotation);
    // Read before anything is served: a broken certificate stops this
    // generation's start-up, and the one before it keeps serving.
    let tls = match (tls_cert, tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(tls_config(&cert, &key)?),
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    // Installed before anything records: what `GET /metrics` renders.
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0],
        )?
        .install_recorder()?;
    let mut builder = Handover::builder().drain_timeout(Duration::from_secs(10));
    if let Some(path) = pid_file {
        builder = builder.pid_file(path);
    }
    let handover = builder.from_env()?;
    let tls = match tls {
        Some(mut config) => {
            session_tickets(&handover, &mut config, hand_over_tickets, ticket_rotation)?;
            Some(TlsAcceptor::from(Arc::new(config)))
        }
        None => None,
    };

    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = handover.tcp("http", addr)?;
        tracing::info!(
            pid = std::process::id(),
            addr = %listener.local_addr()?,
            tls = tls.is_some(),
            "listening"
        );
        let serve = handover
            .serve(listener, app(&handover, prometheus))
            // As `into_make_service_with_connect_info` does for `axum::serve`.
            .connect_info(|_, client: &SocketAddr| ConnectInfo(*client));
        let exit = match tls {
            Some(tls) => serve.handshake(move |tcp| tls.accept(tcp)).await?,
            None => serve.await?,
        };
        match exit {
            Exit::HandedOver { pid, report } => {
                tracing::info!(new_pid = pid, %report, "handed over")
            }
            other => tracing::info!(report = %other.report(), "shut down"),
        }
        Ok(())
    })
}
