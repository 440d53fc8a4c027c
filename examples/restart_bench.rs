//! The graceful-aware restart benchmark: what a restart costs the clients.
//!
//! ```text
//! cargo run --release --example restart_bench -- [--seconds 10] [--every-ms 500]
//!     [--h1 16] [--h2 4] [--streams 8] [--rounds 5] [--no-nagle-phase] [--hello PATH]
//!     [--standby]
//! ```
//!
//! It starts `examples/hello` (built in release mode first; `--hello` runs
//! a `hello` built some other way instead, such as statically linked;
//! `--standby` runs it with `--standby on`: see `Builder::standby`),
//! drives it with a keep-alive load from its own client (`--h1` HTTP/1.1
//! connections and `--h2` HTTP/2 connections carrying `--streams`
//! concurrent streams each), and runs two phases of `--seconds` each in one
//! run: steady (no restart), and a `SIGHUP` every `--every-ms`. The phases
//! are interleaved, in `--rounds` windows of each (steady, restarts,
//! steady, …) under one continuous load, so that the machine's drift
//! weighs on both alike; each response counts in the window it arrived in.
//! Within a restart window the first `SIGHUP` goes at its start and the
//! last at least `--every-ms` before its end. For each
//! it prints requests, requests/s, failed requests (any error or non-2xx),
//! latency percentiles, and for the restart phase: restarts achieved, time
//! from the signal to the new generation answering (and how long its first
//! response took, against every response's median: a fresh process runs its
//! first request cold), and time from an old generation's last response to
//! its exit; the HTTP/1.1 connections the clients opened during the
//! restarts (none, when every connection moves to each new generation), and
//! the connections the old generations handed over and drained, from their
//! `drain finished` lines. Then the ratio of the two throughputs, and the ratio of each
//! to what users run instead: the same load, steady, on `hello`'s `GET /`
//! served by `axum::serve` in a process of its own (half the phase's
//! length before the first two phases, half after, so that drift weighs
//! on both sides). Last, a further phase: steady again, on a second
//! `hello` with `--tcp-nodelay off` (Nagle), to show what that trade-off
//! costs and buys (`--no-nagle-phase` skips it).
//!
//! "The signal" is the moment just before the benchmark's own `kill(2)`
//! call sends `SIGHUP`; "the new generation" is the pid that then appears
//! in the pid file, and it counts as answering when the load client first
//! gets a response from that pid. Between a signal and the hand-over it
//! starts, only the load runs: the thread that watches the old generation's
//! exit is started before the signal, and the pid file is read after the
//! hand-over, just before the next signal.
//!
//! A request that an HTTP/2 GOAWAY refused (RFC 9113 6.8 guarantees it was
//! not processed) is sent again, as a conforming client may, and counted
//! apart: `refused+retried`.
//!
//! hyper's HTTP/2 client (1.x, with h2 0.4) sometimes leaves a request
//! pending forever when a GOAWAY ends its connection under load, even
//! after the connection has closed cleanly and been dropped (see
//! `bench_support/client.rs` and `goaway_race`). Such a request is also
//! sent again, once the connection it went out on has been dropped for
//! half a second, and counted apart as `lost by the client`. A request
//! still unanswered on a live connection after 10 s is a failure.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

mod bench_support;
use bench_support::client::{self, Outcome, Sender};
use bench_support::{Hello, drained_count, kill, ms, watch_exit};

#[derive(Clone)]
struct Options {
    seconds: f64,
    every: Duration,
    h1: usize,
    h2: usize,
    streams: usize,
    nagle_phase: bool,
    hello: Option<PathBuf>,
    standby: bool,
    rounds: usize,
}

/// The graceful-aware restart benchmark: what a restart costs the clients.
#[derive(clap::Parser)]
#[command(name = "restart_bench", version)]
struct Cli {
    /// Seconds of each phase (steady, restarts).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// A SIGHUP every this many milliseconds in the restart phase.
    #[arg(long, value_name = "MS", default_value_t = 500.0)]
    every_ms: f64,
    /// HTTP/1.1 connections of the load.
    #[arg(long, default_value_t = 16)]
    h1: usize,
    /// HTTP/2 connections of the load.
    #[arg(long, default_value_t = 4)]
    h2: usize,
    /// Concurrent streams on each HTTP/2 connection.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Windows of each phase, interleaved (1: the phases one after the other).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Skip the last phase, steady with TCP_NODELAY off.
    #[arg(long)]
    no_nagle_phase: bool,
    /// Run this `hello` instead of building examples/hello in release mode.
    #[arg(long, value_name = "PATH")]
    hello: Option<PathBuf>,
    /// Run hello with a standby (`--standby on`).
    #[arg(long)]
    standby: bool,
}

fn parse() -> Result<Options, String> {
    let cli = <Cli as clap::Parser>::parse();
    Ok(Options {
        seconds: cli.seconds,
        every: Duration::try_from_secs_f64(cli.every_ms / 1e3)
            .map_err(|e| format!("--every-ms {}: {e}", cli.every_ms))?,
        h1: cli.h1,
        h2: cli.h2,
        streams: cli.streams,
        nagle_phase: !cli.no_nagle_phase,
        hello: cli.hello,
        standby: cli.standby,
        rounds: cli.rounds,
    })
}

/// What each response told us: when, from which pid, how long it took.
#[derive(Default)]
struct Record {
    latencies_us: Vec<u32>,
    failed: Vec<String>,
    retried: usize,
    lost_by_client: usize,
    /// HTTP/1.1 connections opened.
    opened: usize,
    seen: HashMap<u32, Seen>,
}

/// The responses from one pid.
#[derive(Clone, Copy)]
struct Seen {
    /// When the first arrived, and how long that request took.
    first: Instant,
    first_latency_us: u32,
    last: Instant,
}

impl Record {
    fn answered(&mut self, pid: u32, at: Instant, latency_us: u32) {
        self.latencies_us.push(latency_us);
        let seen = self.seen.entry(pid).or_insert(Seen {
            first: at,
            first_latency_us: latency_us,
            last: at,
        });
        seen.last = at;
    }

    fn merge(&mut self, other: Record) {
        self.latencies_us.extend(other.latencies_us);
        self.failed.extend(other.failed);
        self.retried += other.retried;
        self.lost_by_client += other.lost_by_client;
        self.opened += other.opened;
        for (pid, theirs) in other.seen {
            let ours = self.seen.entry(pid).or_insert(theirs);
            if theirs.first < ours.first {
                ours.first = theirs.first;
                ours.first_latency_us = theirs.first_latency_us;
            }
            ours.last = ours.last.max(theirs.last);
        }
    }
}

/// Which window the load is in: each response counts in the window it
/// arrived in (`STEADY` or `RESTARTS`).
const STEADY: usize = 0;
const RESTARTS: usize = 1;

/// One client: a connection (or an HTTP/2 stream on a shared connection)
/// sending requests back to back until `stop`, reconnecting when the server
/// closes the connection gracefully. Returns what it saw in each window
/// (see `STEADY`, `RESTARTS`), as `window` said when each answer came.
async fn client(
    addr: std::net::SocketAddr,
    shared: Option<Arc<tokio::sync::Mutex<Option<Sender>>>>,
    window: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> [Record; 2] {
    let mut records = [Record::default(), Record::default()];
    let h2 = shared.is_some();
    let mut own: Option<Sender> = None;
    // Which generation this client last heard from: a failure says so.
    let mut last_pid: Option<u32> = None;
    let failure = |what: String, started: Instant, last_pid: Option<u32>| {
        let sent = SystemTime::now() - started.elapsed();
        let last = last_pid.map_or("none yet".into(), |pid| format!("pid {pid}"));
        format!(
            "{} client, started {} UTC, last answer from {last}: {what}",
            if h2 { "HTTP/2" } else { "HTTP/1.1" },
            time_of_day(sent),
        )
    };
    while !stop.load(Ordering::Relaxed) {
        let record = &mut records[window.load(Ordering::Relaxed)];
        let connecting = Instant::now();
        let fresh = !h2 && own.is_none();
        // Our own HTTP/1 connection, or a stream of the shared HTTP/2 one.
        let mut sender = match client::next_sender(addr, &mut own, shared.as_deref(), h2).await {
            Ok(s) => {
                if fresh {
                    record.opened += 1;
                }
                s
            }
            Err(e) => {
                record.failed.push(failure(e, connecting, last_pid));
                continue;
            }
        };
        let started = Instant::now();
        match client::get(&mut sender, "/").await {
            Outcome::Answered(body) => {
                let Some(pid) = client::pid_of(&body) else {
                    record
                        .failed
                        .push(failure("unexpected body".into(), started, last_pid));
                    continue;
                };
                let now = Instant::now();
                let latency_us = now
                    .duration_since(started)
                    .as_micros()
                    .min(u32::MAX as u128) as u32;
                record.answered(pid, now, latency_us);
                last_pid = Some(pid);
                if !h2 {
                    own = Some(sender);
                }
            }
            Outcome::NotSent { .. } => {
                if h2 {
                    record.retried += 1;
                }
            }
            Outcome::LostByClient => record.lost_by_client += 1,
            Outcome::Failed(e) => record.failed.push(failure(e, started, last_pid)),
        }
    }
    records
}

/// `t`'s time of day in UTC, as `hello`'s log lines give it.
fn time_of_day(t: SystemTime) -> String {
    let since_epoch = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        since_epoch.subsec_micros()
    )
}

/// Starts the load's clients; each counts what it sees in the window
/// `window` says, until `stop`.
fn load(
    addr: std::net::SocketAddr,
    o: &Options,
    window: &Arc<AtomicUsize>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<[Record; 2]>> {
    let mut tasks = Vec::new();
    let mut start = |shared| {
        tasks.push(tokio::spawn(client(
            addr,
            shared,
            window.clone(),
            stop.clone(),
        )))
    };
    for _ in 0..o.h1 {
        start(None);
    }
    for _ in 0..o.h2 {
        let slot = Arc::new(tokio::sync::Mutex::new(None));
        for _ in 0..o.streams {
            start(Some(slot.clone()));
        }
    }
    tasks
}

/// Stops the load and merges what its clients saw, per window.
async fn collect(
    tasks: Vec<tokio::task::JoinHandle<[Record; 2]>>,
    stop: &AtomicBool,
) -> Result<[Record; 2], Box<dyn std::error::Error>> {
    stop.store(true, Ordering::Relaxed);
    let mut merged = [Record::default(), Record::default()];
    for t in tasks {
        let [steady, restarts] = t.await?;
        merged[STEADY].merge(steady);
        merged[RESTARTS].merge(restarts);
    }
    Ok(merged)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e3
}

fn summary(name: &str, record: &mut Record, elapsed: Duration) -> f64 {
    record.latencies_us.sort_unstable();
    let n = record.latencies_us.len();
    let rps = n as f64 / elapsed.as_secs_f64();
    println!(
        "{name:<9} requests {n:>8}  req/s {rps:>9.0}  failed {:>4}  refused+retried {:>3}  latency ms p50 {:.2} p99 {:.2} max {:.2}",
        record.failed.len(),
        record.retried,
        percentile(&record.latencies_us, 0.50),
        percentile(&record.latencies_us, 0.99),
        percentile(&record.latencies_us, 1.0),
    );
    if record.lost_by_client > 0 {
        println!(
            "          lost by the client and sent again: {} (hyper's client left them pending after their connection had closed; see restart_bench.rs)",
            record.lost_by_client
        );
    }
    for failure in record.failed.iter().take(5) {
        println!("          failure: {failure}");
    }
    rps
}

/// Runs the load on `addr` for one phase, without restarts.
async fn steady_load(
    addr: std::net::SocketAddr,
    o: &Options,
) -> Result<(Record, Duration), Box<dyn std::error::Error>> {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(addr, o, &Arc::new(AtomicUsize::new(STEADY)), &stop);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(o.seconds)).await;
    let elapsed = started.elapsed();
    let [record, _] = collect(tasks, &stop).await?;
    Ok((record, elapsed))
}

/// The new generation of a `SIGHUP` sent to `old`: the pid the pid file
/// names once it differs (within 10 s, else none).
async fn new_generation(old: u32, read_pid: impl Fn() -> Option<u32>) -> Option<u32> {
    let wait_from = Instant::now();
    loop {
        match read_pid() {
            Some(pid) if pid != old => return Some(pid),
            _ if wait_from.elapsed() > Duration::from_secs(10) => return None,
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Set in the child that serves the `axum::serve` baseline.
const AXUM_BASELINE: &str = "HANDOVER_RESTART_BENCH_AXUM_BASELINE";

/// The baseline: `hello`'s `GET /` (`hello from <pid>`) on a plain
/// `axum::serve` with `TCP_NODELAY` on, in a child process of this
/// benchmark, which prints its address and serves until its stdin closes.
fn axum_baseline() -> Result<(), Box<dyn std::error::Error>> {
    use axum::serve::ListenerExt;
    use std::io::{Read, Write};
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "listening addr={}", listener.local_addr()?)?;
        stdout.flush()?;
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(|| async { format!("hello from {}", std::process::id()) }),
        );
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).await?;
        Ok(())
    })
}

/// A running [`axum_baseline`].
struct Baseline {
    addr: std::net::SocketAddr,
    child: tokio::process::Child,
}

impl Baseline {
    async fn start() -> Result<Baseline, Box<dyn std::error::Error>> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .env(AXUM_BASELINE, "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("stdout")?;
        let line = tokio::io::BufReader::new(stdout)
            .lines()
            .next_line()
            .await?
            .ok_or("the baseline exited before listening")?;
        let addr = line
            .strip_prefix("listening addr=")
            .ok_or("the baseline said no address")?
            .parse()?;
        Ok(Baseline { addr, child })
    }

    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait().await;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os(AXUM_BASELINE).is_some() {
        return axum_baseline();
    }
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let o = parse()?;
    let hello = bench_support::chosen_hello(o.hello.as_deref())?;
    let dir = std::env::temp_dir().join(format!("handover-restart-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let standby: &[&str] = if o.standby { &["--standby", "on"] } else { &[] };
    let server = Hello::start(&hello, &dir, standby).await?;
    let addr = server.addr;
    let read_pid = || server.pid();
    let phase = Duration::from_secs_f64(o.seconds);
    println!(
        "hello at {addr}; {} HTTP/1.1 connections + {} HTTP/2 connections x {} streams; {:.0} s per phase, in {} windows each",
        o.h1,
        o.h2,
        o.streams,
        o.seconds,
        o.rounds.max(1)
    );

    // What users run instead: half before phases 1 and 2, half after.
    let baseline = Baseline::start().await?;
    let half = Options {
        seconds: o.seconds / 2.0,
        ..o.clone()
    };
    let (mut axum_steady, axum_first_half) = steady_load(baseline.addr, &half).await?;

    // Phases 1 and 2, interleaved: `rounds` windows of each, one steady
    // (no restart), one with a SIGHUP every `every`, from one continuous
    // load, so that the machine's drift weighs on both alike.
    let rounds = o.rounds.max(1);
    let window_len = phase / rounds as u32;
    let window = Arc::new(AtomicUsize::new(STEADY));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(addr, &o, &window, &stop);
    let mut elapsed = [Duration::ZERO; 2];
    let exits: Arc<Mutex<HashMap<u32, Instant>>> = Arc::default();
    // (old pid, new pid once the pid file names it, when the signal left)
    let mut signals: Vec<(u32, Option<u32>, Instant)> = Vec::new();
    for _ in 0..rounds {
        window.store(STEADY, Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(window_len).await;
        elapsed[STEADY] += started.elapsed();

        // A SIGHUP every `every` from the window's start, the last one at
        // least `every` before its end, so that every new generation serves.
        window.store(RESTARTS, Ordering::Relaxed);
        let started = Instant::now();
        // The signal whose new generation is read just before the next
        // signal (see the module's doc: nothing of ours runs during a
        // hand-over).
        let mut pending: Option<(u32, Instant)> = None;
        let mut next = started;
        while next + o.every <= started + window_len {
            if let Some((old, sent)) = pending.take() {
                signals.push((old, new_generation(old, read_pid).await, sent));
            }
            let Some(old) = read_pid() else {
                tokio::time::sleep_until(next.into()).await;
                next += o.every;
                continue;
            };
            let exit = watch_exit(old, Duration::from_secs(60));
            tokio::time::sleep_until(next.into()).await;
            next += o.every;
            let sent = Instant::now();
            if !kill(old, libc::SIGHUP)? {
                continue;
            }
            let exits = exits.clone();
            tokio::spawn(async move {
                let exit = exit.exited().await;
                exits.lock().expect("exits").insert(old, exit);
            });
            pending = Some((old, sent));
        }
        if let Some((old, sent)) = pending.take() {
            signals.push((old, new_generation(old, read_pid).await, sent));
        }
        tokio::time::sleep_until((started + window_len).into()).await;
        elapsed[RESTARTS] += started.elapsed();
    }
    let [mut steady, mut restarts] = collect(tasks, &stop).await?;
    let (second_half, axum_second_half) = steady_load(baseline.addr, &half).await?;
    axum_steady.merge(second_half);
    baseline.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let steady_rps = summary("steady", &mut steady, elapsed[STEADY]);
    let restart_rps = summary("restarts", &mut restarts, elapsed[RESTARTS]);
    let axum_rps = summary("axum", &mut axum_steady, axum_first_half + axum_second_half);
    // Who answered when, whichever window it was in.
    let mut seen = Record::default();
    seen.seen = steady.seen.clone();
    seen.merge(Record {
        seen: restarts.seen.clone(),
        ..Record::default()
    });
    let seen = seen.seen;

    // Signal -> first answer from a new pid; old's last answer -> its exit.
    let mut to_new = Vec::new();
    let mut first_latency = Vec::new();
    let mut to_exit = Vec::new();
    let exits = exits.lock().expect("exits").clone();
    let mut never_answered = 0;
    for (old, new, sent) in &signals {
        match new.and_then(|new| seen.get(&new)) {
            Some(seen) => {
                to_new.push(ms(seen.first.saturating_duration_since(*sent)));
                first_latency.push(f64::from(seen.first_latency_us) / 1000.0);
            }
            None => never_answered += 1,
        }
        if let (Some(exit), Some(last)) = (exits.get(old), seen.get(old)) {
            to_exit.push(ms(exit.saturating_duration_since(last.last)));
        }
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return "n/a".to_string();
        }
        format!(
            "median {:.2} ms, max {:.2} ms",
            v[v.len() / 2],
            v[v.len() - 1]
        )
    };
    println!(
        "restarts achieved: {} (one every {:?})",
        signals.len(),
        o.every
    );
    println!("signal -> new generation answering: {}", stats(&mut to_new));
    println!(
        "  its first response's latency: {} (every response's p50: {:.2} ms)",
        stats(&mut first_latency),
        percentile(&restarts.latencies_us, 0.50)
    );
    if never_answered > 0 {
        println!("new generations that never answered: {never_answered}");
    }
    println!(
        "old generation's last response -> its exit: {}",
        stats(&mut to_exit)
    );
    // Each HTTP/1.1 client opens one connection at the start; every other
    // was opened because a generation closed one.
    let (handed_over, drained) = {
        let logs = server.logs.lock().expect("logs");
        (
            drained_count(&logs, "connections_handed_over"),
            drained_count(&logs, "connections_finished")
                + drained_count(&logs, "connections_forced"),
        )
    };
    println!(
        "HTTP/1.1 connections opened during restarts: {} for {} clients; connections the old generations handed over: {handed_over}, drained: {drained}",
        restarts.opened, o.h1,
    );
    println!(
        "throughput during restarts / steady = {:.3}",
        restart_rps / steady_rps
    );
    println!(
        "against axum::serve steady (the same GET /, its own process): handover steady {:.3}, during restarts {:.3}",
        steady_rps / axum_rps,
        restart_rps / axum_rps
    );

    // Kept, with the temporary directory, to tell what went wrong: written
    // once the last generation has drained, so that its end is in it too.
    let keep_log =
        !steady.failed.is_empty() || !restarts.failed.is_empty() || !axum_steady.failed.is_empty();
    let logs = server.logs.clone();
    server.stop().await;
    if keep_log {
        let log = dir.join("hello.log");
        std::fs::write(&log, logs.lock().expect("logs").join("\n"))?;
        println!("hello's log (all generations): {}", log.display());
    }

    // Phase 3: steady, with Nagle's algorithm (TCP_NODELAY off).
    let mut nagle_failed = false;
    if o.nagle_phase {
        let nagle = Hello::start(&hello, &dir, &["--tcp-nodelay", "off"]).await?;
        let (mut record, elapsed) = steady_load(nagle.addr, &o).await?;
        let nagle_rps = summary("nagle", &mut record, elapsed);
        println!(
            "steady with TCP_NODELAY off / on (the default) = {:.3}",
            nagle_rps / steady_rps
        );
        nagle_failed = !record.failed.is_empty();
        nagle.stop().await;
    }
    if !keep_log {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if keep_log || nagle_failed {
        return Err("some requests failed".into());
    }
    Ok(())
}
