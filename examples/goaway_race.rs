//! Restarts in one process, every few milliseconds, under keep-alive load:
//! what the clients see, with `handover::serve` or with hyper-util's own
//! graceful shutdown.
//!
//! ```text
//! cargo run --release --example goaway_race -- [--seconds 45] [--every-ms 5]
//!     [--server handover|hyper-util]
//! ```
//!
//! One listening socket; every `--every-ms` a new "generation" starts
//! serving on a copy of it and the previous one drains, as processes do in
//! a hand-over, but without the cost of starting a process, so that a run
//! goes through thousands of drains. The load is the restart benchmark's:
//! 16 HTTP/1.1 connections and 4 HTTP/2 connections × 8 streams, hyper's
//! clients, each reconnecting when the server closes its connection.
//!
//! - `--server handover` (the default) drains with `handover::serve`.
//! - `--server hyper-util` serves with hyper-util's auto builder and drains
//!   with its `GracefulShutdown`: `graceful_shutdown` on every connection at
//!   once.
//!
//! It prints how many requests were answered, how many HTTP/2 streams a
//! GOAWAY refused unprocessed (sent again), how many requests hyper's
//! client left pending after their connection had closed and been dropped
//! (`lost by the client`, sent again; see the README's drain semantics),
//! and every other failure, grouped by error. It exits with an error if any
//! request failed.
//!
//! Not a benchmark of speed: the two servers share the two cores with the
//! clients, and a drain every few milliseconds is far from any deployment.
//! It shows which failures are the server's and which are the client's.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};

mod bench_support;
use bench_support::client::{self, Outcome, Sender};

#[derive(Clone, Copy, PartialEq)]
enum Server {
    Handover,
    HyperUtil,
}

struct Options {
    seconds: f64,
    every: Duration,
    server: Server,
}

/// Thousands of drains in one process, under load.
#[derive(clap::Parser)]
#[command(name = "goaway_race", version)]
struct Cli {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 45.0)]
    seconds: f64,
    /// A new "generation" every this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5.0)]
    every_ms: f64,
    /// The server that drains: handover's serve loop, or hyper-util's
    /// GracefulShutdown.
    #[arg(long, default_value = "handover", value_parser = ["handover", "hyper-util"])]
    server: String,
}

fn parse() -> Result<Options, String> {
    let cli = <Cli as clap::Parser>::parse();
    Ok(Options {
        seconds: cli.seconds,
        every: Duration::try_from_secs_f64(cli.every_ms / 1e3)
            .map_err(|e| format!("--every-ms {}: {e}", cli.every_ms))?,
        server: if cli.server == "hyper-util" {
            Server::HyperUtil
        } else {
            Server::Handover
        },
    })
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    answered: AtomicUsize,
    refused: AtomicUsize,
    lost_by_client: AtomicUsize,
    failures: Mutex<BTreeMap<String, usize>>,
}

/// One client: its own HTTP/1.1 connection, or a stream of a shared HTTP/2
/// one, sending requests back to back until `stop`.
async fn client(
    addr: std::net::SocketAddr,
    shared: Option<Arc<tokio::sync::Mutex<Option<Sender>>>>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let fail = |what: String| {
        *tally
            .failures
            .lock()
            .expect("tally")
            .entry(what)
            .or_default() += 1
    };
    let mut own: Option<Sender> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut sender =
            match client::next_sender(addr, &mut own, shared.as_deref(), shared.is_some()).await {
                Ok(s) => s,
                Err(e) => {
                    fail(e);
                    continue;
                }
            };
        match client::get(&mut sender, "/").await {
            Outcome::Answered(_) => {
                tally.answered.fetch_add(1, Ordering::Relaxed);
                if shared.is_none() {
                    own = Some(sender);
                }
            }
            Outcome::NotSent { refused } => {
                if refused {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            Outcome::LostByClient => {
                tally.lost_by_client.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Failed(e) => fail(e),
        }
    }
}

async fn hello(
    _: hyper::Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
}

/// Starts a generation serving on a copy of `listener`; returns what
/// drains it.
fn start_generation(
    runtime: &tokio::runtime::Runtime,
    listener: &std::net::TcpListener,
    server: Server,
) -> std::io::Result<Box<dyn FnOnce() + Send>> {
    let copy = listener.try_clone()?;
    let _entered = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(copy)?;
    match server {
        Server::Handover => {
            let graceful = handover::Graceful::new();
            let serve = handover::serve(listener, tower::service_fn(hello), &graceful);
            runtime.spawn(async move {
                match serve.await {
                    Ok(report) if !report.is_clean() => eprintln!("a drain forced: {report}"),
                    Ok(_) => {}
                    Err(e) => eprintln!("serve: {e}"),
                }
            });
            Ok(Box::new(move || graceful.start_drain()))
        }
        Server::HyperUtil => {
            let (drain, mut drained) = tokio::sync::oneshot::channel::<()>();
            runtime.spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let graceful = hyper_util::server::graceful::GracefulShutdown::new();
                loop {
                    let (io, _) = tokio::select! {
                        biased;
                        _ = &mut drained => break,
                        accepted = listener.accept() => match accepted {
                            Ok(accepted) => accepted,
                            Err(_) => continue,
                        },
                    };
                    let _ = io.set_nodelay(true);
                    let service = hyper::service::service_fn(hello);
                    let conn = builder.serve_connection(TokioIo::new(io), service);
                    tokio::spawn(graceful.watch(conn.into_owned()));
                }
                drop(listener);
                graceful.shutdown().await;
            });
            Ok(Box::new(move || {
                let _ = drain.send(());
            }))
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = parse()?;
    let runtime = |name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
    };
    let (servers, clients) = (runtime("server")?, runtime("client")?);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;

    let mut drain = start_generation(&servers, &listener, o.server)?;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        tasks.push(clients.spawn(client(addr, None, stop.clone(), tally.clone())));
    }
    for _ in 0..4 {
        let slot = Arc::new(tokio::sync::Mutex::new(None));
        for _ in 0..8 {
            tasks.push(clients.spawn(client(
                addr,
                Some(slot.clone()),
                stop.clone(),
                tally.clone(),
            )));
        }
    }

    let started = Instant::now();
    let mut restarts = 0;
    while started.elapsed().as_secs_f64() < o.seconds {
        std::thread::sleep(o.every);
        let next = start_generation(&servers, &listener, o.server)?;
        drain();
        drain = next;
        restarts += 1;
    }
    stop.store(true, Ordering::Relaxed);
    clients.block_on(async {
        for task in tasks {
            let _ = task.await;
        }
    });
    drain();

    let failures = tally.failures.lock().expect("tally");
    let failed: usize = failures.values().sum();
    println!(
        "{} server, a drain every {:?}: {restarts} restarts in {:.0} s",
        if o.server == Server::Handover {
            "handover::serve"
        } else {
            "hyper-util"
        },
        o.every,
        o.seconds
    );
    println!("answered: {}", tally.answered.load(Ordering::Relaxed));
    println!(
        "refused by GOAWAY, sent again: {}",
        tally.refused.load(Ordering::Relaxed)
    );
    println!(
        "lost by the client (pending after their connection was dropped), sent again: {}",
        tally.lost_by_client.load(Ordering::Relaxed)
    );
    println!("failed: {failed}");
    for (what, count) in failures.iter() {
        println!("  {count} x {what}");
    }
    if failed > 0 {
        return Err("some requests failed".into());
    }
    Ok(())
}
