//! What serving through handover costs against what users run today,
//! measured as they would: each server in a process of its own, the load
//! from `wrk` (HTTP/1.1 keep-alive) and `h2load` (HTTP/2, h2c), rounds
//! interleaved, medians and ratios printed.
//!
//! ```text
//! cargo bench --bench serve [-- --seconds 4 --rounds 5 --only h1|h2]
//! ```
//!
//! Three pairs, each the same application served two ways, and a
//! reference:
//!
//! - an axum `Router` under `Handover::serve` (which counts every request
//!   itself), against the same `Router` under `axum::serve` (`TCP_NODELAY`
//!   on, as handover sets it);
//! - the same, with `.layer(handover.graceful().layer())` on the `Router`, as code
//!   written for another server has it (under `Handover::serve` the layer
//!   counts nothing again, but axum boxes each layered route and its
//!   response body);
//! - a bare `tower::service_fn` under `Handover::serve`, against a bare
//!   hyper-util loop: the auto builder with hyper's defaults, one task per
//!   connection, `TCP_NODELAY` on, the same service through
//!   `TowerToHyperService`;
//! - for reference, the `Router` with a layer that does nothing (tower's
//!   `Identity`) under `axum::serve`, against the `Router` alone under
//!   `axum::serve`: what axum's layering of every route costs on its own,
//!   whatever the layer does. The second pair can do no better than the
//!   first times this one.
//!
//! Every server runs on tokio's default multi-threaded runtime. The six
//! run side by side for the whole benchmark (the idle ones sleep); in each
//! round, each is loaded once per protocol, the pair's order alternating
//! from round to round, so that the machine's drift weighs on both. The
//! figure that matters is the median of the rounds' ratios. Each server's
//! CPU time per request (`/proc/PID/stat`) is printed beside it.
//!
//! Needs `wrk` (Debian package `wrk`) and `h2load` (`nghttp2-client`).

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

/// Set in a child of this benchmark: which server to be.
const SERVE_AS: &str = "HANDOVER_BENCH_SERVE_AS";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    AxumHandover,
    AxumLayerHandover,
    AxumServe,
    AxumNoopLayerServe,
    BareHandover,
    BareHyper,
}

/// Each pair: ours, and what users run instead; the last, a reference:
/// what any layer on the whole `Router` costs under axum's own loop.
const PAIRS: [(Kind, Kind); 4] = [
    (Kind::AxumHandover, Kind::AxumServe),
    (Kind::AxumLayerHandover, Kind::AxumServe),
    (Kind::BareHandover, Kind::BareHyper),
    (Kind::AxumNoopLayerServe, Kind::AxumServe),
];

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::AxumHandover,
        Kind::AxumLayerHandover,
        Kind::AxumServe,
        Kind::AxumNoopLayerServe,
        Kind::BareHandover,
        Kind::BareHyper,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::AxumHandover => "axum-handover",
            Kind::AxumLayerHandover => "axum-layer-handover",
            Kind::AxumServe => "axum-serve",
            Kind::AxumNoopLayerServe => "axum-noop-layer-serve",
            Kind::BareHandover => "bare-handover",
            Kind::BareHyper => "bare-hyper",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::AxumHandover => "axum Router, Handover::serve",
            Kind::AxumLayerHandover => {
                "the Router + .layer(handover.graceful().layer()), Handover::serve"
            }
            Kind::AxumServe => "the same Router, axum::serve",
            Kind::AxumNoopLayerServe => "the Router + a layer that does nothing, axum::serve",
            Kind::BareHandover => "tower::service_fn, Handover::serve",
            Kind::BareHyper => "the same service, bare hyper-util loop",
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

fn main() {
    if let Ok(kind) = std::env::var(SERVE_AS) {
        let kind = Kind::from_name(&kind).expect("a server kind");
        server::run(kind);
        return;
    }
    let options = Options::parse();
    for (tool, package) in [("wrk", "wrk"), ("h2load", "nghttp2-client")] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("this benchmark needs `{tool}`: apt-get install {package}");
            std::process::exit(1);
        }
    }
    let servers: Vec<Server> = Kind::ALL.into_iter().map(Server::start).collect();
    println!(
        "{} rounds of {} s per server and protocol; {} cores",
        options.rounds,
        options.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let protocols: Vec<Protocol> = [Protocol::Http1, Protocol::Http2]
        .into_iter()
        .filter(|p| options.only.is_none_or(|only| only == *p))
        .collect();
    // Warm-up: each server once per protocol, not counted.
    for protocol in &protocols {
        for server in &servers {
            protocol.load(server.port, 1);
        }
    }
    let server = |kind: Kind| {
        servers
            .iter()
            .find(|s| s.kind == kind)
            .expect("every kind runs")
    };
    // Per protocol and pair: each round's measure of ours and of theirs.
    type Rounds = Vec<(Measure, Measure)>;
    let mut results: Vec<(Protocol, usize, Rounds)> = Vec::new();
    for round in 0..options.rounds {
        for protocol in &protocols {
            for (pair, (ours, theirs)) in PAIRS.into_iter().enumerate() {
                let (ours, theirs) = if round % 2 == 0 {
                    let ours = server(ours).measure(*protocol, options.seconds);
                    (ours, server(theirs).measure(*protocol, options.seconds))
                } else {
                    let theirs = server(theirs).measure(*protocol, options.seconds);
                    (server(ours).measure(*protocol, options.seconds), theirs)
                };
                match results
                    .iter_mut()
                    .find(|(p, i, _)| p == protocol && *i == pair)
                {
                    Some((_, _, rounds)) => rounds.push((ours, theirs)),
                    None => results.push((*protocol, pair, vec![(ours, theirs)])),
                }
            }
        }
        eprintln!("round {} of {} done", round + 1, options.rounds);
    }
    for protocol in &protocols {
        println!();
        println!("{}", protocol.describe());
        println!(
            "  {:<56} {:>10} {:>12} {:>8}",
            "server", "req/s", "CPU µs/req", "failed"
        );
        for (pair, (ours, theirs)) in PAIRS.into_iter().enumerate() {
            let rounds = &results
                .iter()
                .find(|(p, i, _)| p == protocol && *i == pair)
                .expect("measured")
                .2;
            for (kind, side) in [(ours, 0), (theirs, 1)] {
                let measures: Vec<&Measure> = rounds
                    .iter()
                    .map(|(a, b)| if side == 0 { a } else { b })
                    .collect();
                println!(
                    "  {:<56} {:>10.0} {:>12.2} {:>8}",
                    kind.describe(),
                    median(measures.iter().map(|m| m.per_second)),
                    median(measures.iter().map(|m| m.cpu_us_per_request)),
                    measures.iter().map(|m| m.failed).sum::<u64>()
                );
            }
            let ratios: Vec<f64> = rounds
                .iter()
                .map(|(a, b)| a.per_second / b.per_second)
                .collect();
            let (low, high) = ratios
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
            println!(
                "  ratio {} / {}: {:.3} (median of the rounds' ratios; {:.3} to {:.3})",
                ours.name(),
                theirs.name(),
                median(ratios.iter().copied()),
                low,
                high
            );
        }
    }
    drop(servers);
}

struct Options {
    seconds: u64,
    rounds: usize,
    only: Option<Protocol>,
}

impl Options {
    fn parse() -> Self {
        let mut options = Options {
            seconds: 4,
            rounds: 5,
            only: None,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
            match arg.as_str() {
                "--seconds" => options.seconds = value().parse().expect("--seconds N"),
                "--rounds" => options.rounds = value().parse().expect("--rounds N"),
                "--only" => {
                    options.only = Some(match value().as_str() {
                        "h1" => Protocol::Http1,
                        "h2" => Protocol::Http2,
                        other => panic!("--only h1|h2, not {other}"),
                    })
                }
                // What `cargo bench` passes.
                "--bench" => {}
                other => panic!("unknown argument {other}"),
            }
        }
        options
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// One load run against one server.
struct Measure {
    per_second: f64,
    cpu_us_per_request: f64,
    failed: u64,
}

impl Protocol {
    fn describe(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP/1.1 keep-alive (wrk -t2 -c64)",
            Protocol::Http2 => "HTTP/2 h2c (h2load -c8 -m16)",
        }
    }

    /// Loads `port` for `seconds`; requests per second, requests done and
    /// failed.
    fn load(self, port: u16, seconds: u64) -> (f64, u64, u64) {
        let url = format!("http://127.0.0.1:{port}/");
        let output = match self {
            Protocol::Http1 => Command::new("wrk")
                .args(["-t2", "-c64", &format!("-d{seconds}s"), &url])
                .output(),
            Protocol::Http2 => Command::new("h2load")
                .args(["-c8", "-m16", "-D", &seconds.to_string(), &url])
                .output(),
        }
        .expect("the load generator runs");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let number_after = |label: &str| -> Option<f64> {
            let rest = &text[text.find(label)? + label.len()..];
            rest.split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .find(|s| !s.is_empty())?
                .parse()
                .ok()
        };
        // The number before `suffix` in the line that contains `within`.
        let count = |within: &str, suffix: &str| -> u64 {
            text.lines()
                .find(|line| line.contains(within))
                .and_then(|line| {
                    let words: Vec<&str> =
                        line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
                    let at = words.iter().position(|w| *w == suffix)?;
                    words.get(at.checked_sub(1)?)?.parse().ok()
                })
                .unwrap_or(0)
        };
        match self {
            Protocol::Http1 => {
                let per_second = number_after("Requests/sec:").unwrap_or_else(|| panic!("{text}"));
                let done = count("requests in", "requests");
                let failed = number_after("Non-2xx or 3xx responses:").unwrap_or(0.0) as u64
                    + text
                        .lines()
                        .find(|l| l.contains("Socket errors"))
                        .map_or(0, |l| {
                            l.split(|c: char| !c.is_ascii_digit())
                                .filter_map(|n| n.parse::<u64>().ok())
                                .sum()
                        });
                (per_second, done, failed)
            }
            Protocol::Http2 => {
                let per_second = number_after("s, ").unwrap_or_else(|| panic!("{text}"));
                let done = count("requests:", "succeeded");
                let failed = ["failed", "errored", "timeout"]
                    .into_iter()
                    .map(|what| count("requests:", what))
                    .sum();
                (per_second, done, failed)
            }
        }
    }
}

/// A server in a process of its own.
struct Server {
    kind: Kind,
    port: u16,
    child: Child,
}

impl Server {
    fn start(kind: Kind) -> Server {
        let mut child = Command::new(std::env::current_exe().expect("this binary"))
            .env(SERVE_AS, kind.name())
            // It exits when this process closes its stdin, however this
            // process ends.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the server starts");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("the server says its port");
        let port = line.trim().parse().expect("a port");
        Server { kind, port, child }
    }

    fn measure(&self, protocol: Protocol, seconds: u64) -> Measure {
        let before = cpu_ticks(self.child.id());
        let (per_second, done, failed) = protocol.load(self.port, seconds);
        let ticks = cpu_ticks(self.child.id()) - before;
        // `/proc/PID/stat` counts in clock ticks of 10 ms.
        let cpu_us = ticks as f64 * 10_000.0;
        Measure {
            per_second,
            cpu_us_per_request: if done > 0 { cpu_us / done as f64 } else { 0.0 },
            failed,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User and system time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // After the command: state is field 3, utime 14 and stime 15.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The six servers, each run in a child process of the benchmark.
mod server {
    use super::*;

    async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
    }

    fn router() -> Router {
        Router::new().route("/", get(|| async { "hello" }))
    }

    pub(super) fn run(kind: Kind) {
        // Ends with the benchmark: its end of stdin closes.
        std::thread::spawn(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            std::process::exit(0);
        });
        let handover = matches!(
            kind,
            Kind::AxumHandover | Kind::AxumLayerHandover | Kind::BareHandover
        )
        .then(|| {
            handover::Handover::builder()
                .upgrade_signals([])
                .from_env()
                .expect("handover")
        });
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            let listener = match &handover {
                Some(handover) => handover.tcp("http", "127.0.0.1:0").expect("listener"),
                None => tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("listener"),
            };
            let port = listener.local_addr().expect("address").port();
            let mut stdout = std::io::stdout();
            writeln!(stdout, "{port}").expect("stdout");
            stdout.flush().expect("stdout");
            match (kind, handover) {
                (Kind::AxumHandover, Some(handover)) => {
                    handover.serve(listener, router()).await.expect("serve");
                }
                (Kind::AxumLayerHandover, Some(handover)) => {
                    let app = router().layer(handover.graceful().layer());
                    handover.serve(listener, app).await.expect("serve");
                }
                (Kind::BareHandover, Some(handover)) => {
                    let app = tower::service_fn(hello);
                    handover.serve(listener, app).await.expect("serve");
                }
                (Kind::AxumServe, _) => {
                    use axum::serve::ListenerExt;
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    axum::serve(listener, router()).await.expect("serve");
                }
                (Kind::AxumNoopLayerServe, _) => {
                    use axum::serve::ListenerExt;
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    let app = router().layer(tower::layer::util::Identity::new());
                    axum::serve(listener, app).await.expect("serve");
                }
                (Kind::BareHyper, _) => bare_hyper(listener).await,
                _ => unreachable!("a handover server has its Handover"),
            }
        });
    }

    /// hyper-util's auto builder with hyper's defaults, one task per
    /// connection, nothing tracked: what a user writes with hyper alone.
    async fn bare_hyper(listener: tokio::net::TcpListener) {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use hyper_util::server::conn::auto::Builder;
        use hyper_util::service::TowerToHyperService;
        let builder = std::sync::Arc::new(Builder::new(TokioExecutor::new()));
        loop {
            let Ok((io, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let _ = io.set_nodelay(true);
            let builder = builder.clone();
            tokio::spawn(async move {
                let service = TowerToHyperService::new(tower::service_fn(hello));
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(io), service)
                    .await;
            });
        }
    }
}
