//! State handed to the next generation: a count of requests that survives
//! restarts.
//!
//! ```text
//! cargo run --release --example state -- [--addr 127.0.0.1:3000] [--pid-file PATH]
//!     [--standby on|off] [--stable-parent on|off] [--max-state-size BYTES]
//!     [--pad BYTES] [--panic-in-snapshot on|off] [--snapshot-delay-ms MS]
//! ```
//!
//! `GET /` answers `generation G (pid P): request N, generations 1,2,…`:
//! the count of requests served by every generation so far, and the pids
//! of the generations before, both handed over at each upgrade
//! (`Handover::hand_over_state`) and read by the next generation
//! (`Handover::take_previous_state`). Send `SIGHUP` and the count goes on.
//!
//! The format is versioned (its first byte): a generation that finds a
//! version it does not know starts from nothing, as a newer binary reading
//! an older one's state, or the other way round, should.
//!
//! The other flags are for trying what can go wrong: `--pad` makes the
//! snapshot that much bigger (against `--max-state-size`),
//! `--panic-in-snapshot on` makes it panic, `--snapshot-delay-ms` makes it
//! slow. Each fails the upgrade, and the old generation serves on.

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::{Router, extract::State, routing::get};
use handover::Handover;

/// What this example hands over, version 1: the request count, then the
/// pids of the generations so far, each as 8 and 4 big-endian bytes.
const VERSION: u8 = 1;

#[derive(Default)]
struct Counts {
    requests: u64,
    pids: Vec<u32>,
}

impl Counts {
    fn encode(&self, pad: usize) -> Vec<u8> {
        let mut bytes = vec![VERSION];
        bytes.extend(self.requests.to_be_bytes());
        for pid in &self.pids {
            bytes.extend(pid.to_be_bytes());
        }
        // Zero pids: never a pid, so `decode` skips them.
        bytes.resize(bytes.len() + pad.next_multiple_of(4), 0);
        bytes
    }

    /// `None` for anything but a whole version 1 snapshot.
    fn decode(bytes: &[u8]) -> Option<Counts> {
        let rest = bytes.strip_prefix(&[VERSION])?;
        if rest.len() < 8 || (rest.len() - 8) % 4 != 0 {
            return None;
        }
        let (requests, pids) = rest.split_at(8);
        Some(Counts {
            requests: u64::from_be_bytes(requests.try_into().ok()?),
            pids: pids
                .chunks_exact(4)
                .filter_map(|pid| Some(u32::from_be_bytes(pid.try_into().ok()?)))
                .filter(|pid| *pid != 0)
                .collect(),
        })
    }
}

/// State handed to the next generation: a count of requests that
/// survives restarts.
#[derive(clap::Parser)]
#[command(name = "state", version)]
struct Args {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// Write the serving generation's pid here.
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Keep the next generation started and waiting.
    #[arg(long, value_name = "on|off", default_value = "off", action = clap::ArgAction::Set, value_parser = common::on_off)]
    standby: bool,
    /// Keep a stable parent where this process's exit would end its
    /// container.
    #[arg(long, value_name = "on|off", default_value = "off", action = clap::ArgAction::Set, value_parser = common::on_off)]
    stable_parent: bool,
    /// The most state to hand over or take, in bytes (1 MiB by default).
    #[arg(long, value_name = "BYTES")]
    max_state_size: Option<usize>,
    /// Make each snapshot this many bytes bigger.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pad: usize,
    /// Make the snapshot panic.
    #[arg(long, value_name = "on|off", default_value = "off", action = clap::ArgAction::Set, value_parser = common::on_off)]
    panic_in_snapshot: bool,
    /// Make the snapshot take this long.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    snapshot_delay_ms: u64,
}

async fn count(State(counts): State<Arc<Mutex<Counts>>>) -> String {
    let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
    counts.requests += 1;
    let pids: Vec<String> = counts.pids.iter().map(u32::to_string).collect();
    format!(
        "pid {}: request {}, generations {}",
        std::process::id(),
        counts.requests,
        pids.join(",")
    )
}

fn main() -> std::process::ExitCode {
    common::main_with_logs("state", run)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = <Args as clap::Parser>::parse();
    let mut builder = Handover::builder()
        .ready_timeout(Duration::from_secs(5))
        .standby(args.standby)
        .stable_parent(args.stable_parent);
    if let Some(path) = &args.pid_file {
        builder = builder.pid_file(path);
    }
    if let Some(max) = args.max_state_size {
        builder = builder.max_state_size(max);
    }
    let handover = builder.from_env()?;

    // What the previous generation handed over, if it is a version this
    // binary reads; and this generation's pid after the others'.
    let handed = handover.take_previous_state();
    let mut counts = match handed.as_deref().map(Counts::decode) {
        Some(Some(counts)) => counts,
        Some(None) => {
            tracing::warn!("state of a version this binary does not read; starting from nothing");
            Counts::default()
        }
        None => Counts::default(),
    };
    tracing::info!(
        generation = handover.generation(),
        requests = counts.requests,
        handed_bytes = handed.map_or(0, |b| b.len()),
        "state taken"
    );
    counts.pids.push(std::process::id());
    let counts = Arc::new(Mutex::new(counts));

    let snapshot = counts.clone();
    let (pad, panic) = (args.pad, args.panic_in_snapshot);
    let delay = Duration::from_millis(args.snapshot_delay_ms);
    handover.hand_over_state(move || {
        tracing::info!("taking the snapshot");
        if panic {
            panic!("the snapshot panics, as asked");
        }
        std::thread::sleep(delay);
        let counts = snapshot.lock().unwrap_or_else(|e| e.into_inner());
        Ok(counts.encode(pad))
    });

    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = handover.tcp("http", args.addr)?;
        tracing::info!(pid = std::process::id(), addr = %listener.local_addr()?, "listening");
        let app = Router::new().route("/", get(count)).with_state(counts);
        let exit = handover.serve(listener, app).await?;
        tracing::info!(?exit, "exiting");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_reads_back_and_anything_else_reads_as_none() {
        let counts = Counts {
            requests: 42,
            pids: vec![7, 9],
        };
        for pad in [0, 5, 1000] {
            let back = Counts::decode(&counts.encode(pad)).unwrap();
            assert_eq!((back.requests, back.pids), (42, vec![7, 9]));
        }
        assert!(Counts::decode(&[]).is_none());
        assert!(Counts::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 1]).is_none());
        assert!(Counts::decode(&[1, 0, 0]).is_none());
    }
}
