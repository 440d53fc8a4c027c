//! The connection hand-over benchmark: what restarts cost pooled
//! keep-alive clients when idle connections move to the next generation,
//! and what they cost when they are closed instead.
//!
//! ```text
//! cargo run --release --example moves_bench -- [--clients 256] [--idle-ms 1000]
//!     [--seconds 20] [--every-ms 500] [--rounds 2] [--idle 10000] [--hello PATH]
//! ```
//!
//! Two parts, each against `examples/hello` (built in release mode first;
//! `--hello` runs another build), in processes of their own:
//!
//! 1. **Pooled clients.** `--clients` keep-alive HTTP/1.1 connections, each
//!    idle a random 0 to `--idle-ms` ms after every response (as a load
//!    balancer's upstream pool, or browsers, are), and a `SIGHUP` every
//!    `--every-ms` for `--seconds`. Run with connections handed over
//!    (hello's default) and with `--hand-over-connections off`, in
//!    alternating rounds (`--rounds` of each, each on a fresh `hello`). A
//!    client never sends a request again once it has written it: a request
//!    that fails (the connection closed under it) is a failure. A
//!    connection found closed before a request is written is replaced, and
//!    counted as opened. Printed for each mode: requests, failures,
//!    connections opened for the clients, restarts, and the connections
//!    the old generations handed over and drained (from their `drain
//!    finished` lines).
//! 2. **Idle connections.** `--idle` keep-alive connections, each after one
//!    request, and one `SIGHUP`: the time from the signal to the new
//!    generation's readiness, from its readiness to the old generation's
//!    drain having ended with every connection handed over, and from there
//!    to the old generation's exit; then each connection's next request,
//!    answered by the new generation on the same connection.
//!
//! Times come from `hello`'s log lines (UTC, to the microsecond, one
//! clock for every process) and from the pid's exit, watched by pidfd.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

mod bench_support;
use bench_support::client::{self, Outcome, Sender};
use bench_support::{Hello, chosen_hello, drained_count, kill, ms, watch_exit};

/// The connection hand-over benchmark.
#[derive(clap::Parser)]
#[command(name = "moves_bench", version)]
struct Cli {
    /// Pooled keep-alive clients (part 1).
    #[arg(long, default_value_t = 256)]
    clients: usize,
    /// Each client is idle a random 0 to this many ms after each response.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    idle_ms: u64,
    /// Seconds of restarts in each round of part 1.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// A SIGHUP every this many milliseconds in part 1.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    every_ms: u64,
    /// Rounds of each mode in part 1, alternating.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Idle connections handed over in part 2 (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Run this `hello` instead of building examples/hello in release mode.
    #[arg(long, value_name = "PATH")]
    hello: Option<PathBuf>,
}

/// What one mode's rounds of part 1 saw.
#[derive(Default)]
struct Pooled {
    requests: usize,
    failed: Vec<String>,
    opened: usize,
    restarts: usize,
    handed_over: usize,
    drained: usize,
}

/// A little generator of idle times, different for each client.
struct Idle(u64);

impl Idle {
    fn next(&mut self, max_ms: u64) -> Duration {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(self.0 % (max_ms + 1))
    }
}

/// One pooled client, until `stop`: a request, an idle time, again.
async fn pooled_client(
    addr: SocketAddr,
    seed: u64,
    idle_ms: u64,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    opened: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
) {
    let mut idle = Idle(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // Spread the first requests over the idle range too.
    tokio::time::sleep(idle.next(idle_ms)).await;
    let mut sender: Option<Sender> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut current = match sender.take() {
            Some(current) => current,
            None => match client::connect(addr, false).await {
                Ok(new) => {
                    opened.fetch_add(1, Ordering::Relaxed);
                    new
                }
                Err(e) => {
                    failed.lock().expect("failures").push(e);
                    continue;
                }
            },
        };
        match client::get(&mut current, "/").await {
            Outcome::Answered(_) => {
                requests.fetch_add(1, Ordering::Relaxed);
                sender = Some(current);
            }
            // Found closed before it was written: a new connection.
            Outcome::NotSent { .. } => continue,
            Outcome::LostByClient => failed.lock().expect("failures").push("lost".into()),
            Outcome::Failed(e) => failed.lock().expect("failures").push(e),
        }
        tokio::time::sleep(idle.next(idle_ms)).await;
    }
}

/// One round of part 1 on a fresh `hello` with `args`.
async fn pooled_round(
    hello: &std::path::Path,
    cli: &Cli,
    args: &[&str],
    into: &mut Pooled,
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("moves-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let server = Hello::start(hello, &dir, args).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..cli.clients)
        .map(|i| {
            tokio::spawn(pooled_client(
                server.addr,
                i as u64 + 1,
                cli.idle_ms,
                stop.clone(),
                requests.clone(),
                opened.clone(),
                failed.clone(),
            ))
        })
        .collect();
    // The pool fills first.
    tokio::time::sleep(Duration::from_millis(cli.idle_ms + 200)).await;
    let end = Instant::now() + Duration::from_secs_f64(cli.seconds);
    let every = Duration::from_millis(cli.every_ms);
    let mut next = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep_until(next.into()).await;
        next += every;
        let Some(pid) = server.pid() else { continue };
        kill(pid, libc::SIGHUP)?;
        into.restarts += 1;
        // The next signal goes to the new generation.
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.pid() == Some(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // The last generation's first requests, then the end.
    tokio::time::sleep(Duration::from_millis(cli.idle_ms + 200)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await?;
    }
    let logs = server.logs.clone();
    server.stop().await;
    let logs = logs.lock().expect("logs").clone();
    into.requests += requests.load(Ordering::Relaxed);
    into.opened += opened.load(Ordering::Relaxed);
    into.failed
        .extend(failed.lock().expect("failures").drain(..));
    // The drain lines of the generations that handed over (the last one
    // shut down: its drain is not a restart's).
    let drains: Vec<String> = logs
        .iter()
        .filter(|line| line.contains("drain finished"))
        .cloned()
        .collect();
    let restart_drains = &drains[..drains.len().saturating_sub(1)];
    into.handed_over += drained_count(restart_drains, "connections_handed_over");
    into.drained += drained_count(restart_drains, "connections_finished")
        + drained_count(restart_drains, "connections_forced");
    Ok(())
}

/// A log line's time: `2026-12-08T04:30:18.665295Z ...`.
fn logged_at(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.split('-').map(|n| n.parse::<i64>());
    let (y, m, d) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.split(':').map(|n| n.parse::<u64>());
    let (h, min, s) = (hms.next()?.ok()?, hms.next()?.ok()?, hms.next()?.ok()?);
    let micros: u64 = format!("{frac:0<6}")[..6].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let secs = days * 86_400 + h * 3600 + min * 60 + s;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros))
}

/// Part 2: `n` idle connections, one upgrade.
async fn idle_part(hello: &std::path::Path, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("moves-bench-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let server = Hello::start(hello, &dir, &["--idle-grace", "30"]).await?;
    let old = server.pid().ok_or("no pid")?;
    // Opened 200 at a time, each with one request.
    let mut senders = Vec::with_capacity(n);
    while senders.len() < n {
        let batch = (n - senders.len()).min(200);
        let opened = futures_util::future::join_all((0..batch).map(|_| async {
            let mut sender = client::connect(server.addr, false).await?;
            match client::get(&mut sender, "/").await {
                Outcome::Answered(_) => Ok(sender),
                _ => Err("the first request failed".to_owned()),
            }
        }))
        .await;
        for sender in opened {
            senders.push(sender?);
        }
    }
    let exit = watch_exit(old, Duration::from_secs(60));
    let signalled = SystemTime::now();
    kill(old, libc::SIGHUP)?;
    let exited = exit.exited().await;
    let exited = SystemTime::now() - exited.elapsed();
    let logs = server.logs.lock().expect("logs").clone();
    let ready = logs
        .iter()
        .find(|line| line.contains(" ready pid=") && !line.contains(&format!("pid={old} ")))
        .and_then(|line| logged_at(line))
        .ok_or("no ready line from the new generation")?;
    let drain = logs
        .iter()
        .find(|line| line.contains("drain finished"))
        .ok_or("no drain finished line")?;
    let drained = logged_at(drain).ok_or("no time on the drain line")?;
    let handed_over = drained_count(std::slice::from_ref(drain), "connections_handed_over");
    let since = |later: SystemTime, earlier: SystemTime| {
        ms(later.duration_since(earlier).unwrap_or_default())
    };
    println!(
        "idle      {n} connections: signal to ready {:.1} ms; ready to the last handed over {:.1} ms \
         ({handed_over} handed over); then to the old generation's exit {:.1} ms",
        since(ready, signalled),
        since(drained, ready),
        since(exited, drained),
    );
    // Each one's next request, on the same connection.
    let new = server.pid().ok_or("no pid")?;
    let mut failed = 0;
    let mut from_new = 0;
    for chunk in senders.chunks_mut(200) {
        let answers =
            futures_util::future::join_all(chunk.iter_mut().map(|s| client::get(s, "/"))).await;
        for answer in answers {
            match answer {
                Outcome::Answered(body) if client::pid_of(&body) == Some(new) => from_new += 1,
                _ => failed += 1,
            }
        }
    }
    println!(
        "          next request on each: {from_new} answered by the new generation, {failed} failed or elsewhere"
    );
    drop(senders);
    server.stop().await;
    Ok(())
}

fn print_pooled(name: &str, p: &Pooled, clients: usize, rounds: usize) {
    println!(
        "{name:<9} requests {:>7}  failed {:>4}  connections opened {:>6} for {clients} clients × {rounds} rounds  \
         restarts {:>3}  connections handed over {:>6}  drained {:>6}",
        p.requests,
        p.failed.len(),
        p.opened,
        p.restarts,
        p.handed_over,
        p.drained,
    );
    for failure in p.failed.iter().take(3) {
        println!("          failure: {failure}");
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = <Cli as clap::Parser>::parse();
    let hello = chosen_hello(cli.hello.as_deref())?;
    let mut moving = Pooled::default();
    let mut closing = Pooled::default();
    for _ in 0..cli.rounds {
        pooled_round(&hello, &cli, &[], &mut moving).await?;
        pooled_round(
            &hello,
            &cli,
            &["--hand-over-connections", "off"],
            &mut closing,
        )
        .await?;
    }
    if cli.rounds > 0 {
        println!(
            "pooled: {} clients idle 0-{} ms, SIGHUP every {} ms for {} s, {} rounds of each, alternating",
            cli.clients, cli.idle_ms, cli.every_ms, cli.seconds, cli.rounds
        );
        print_pooled("moving", &moving, cli.clients, cli.rounds);
        print_pooled("closing", &closing, cli.clients, cli.rounds);
    }
    if cli.idle > 0 {
        idle_part(&hello, cli.idle).await?;
    }
    Ok(())
}
