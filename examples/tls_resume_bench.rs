//! What handing the TLS session-ticket keys to the next generation saves:
//! handshakes across a restart of the HTTPS example.
//!
//! ```text
//! cargo run --release --example tls_resume_bench -- [--clients 100] [--rounds 5]
//!     [--axum PATH]
//! ```
//!
//! It starts `examples/axum` over HTTPS (a fresh self-signed certificate)
//! twice, with `--hand-over-tickets on` and `off`, and in each of
//! `--rounds` rounds, for each server in turn: `--clients` clients (rustls,
//! each with a session cache of its own) connect and make a request, the
//! server is restarted (`SIGHUP`), and every client reconnects at once and
//! makes a request. It counts the reconnections that were full handshakes
//! (the clients all had a session) and the new generation's CPU time over
//! the reconnections (`/proc/PID/task/*/schedstat`), and prints their
//! medians, with and without the hand-over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, HandshakeKind, RootCertStore};

mod bench_support;
use bench_support::{Hello, kill, watch_exit};

struct Options {
    clients: usize,
    rounds: usize,
    /// The axum example to run (built in release mode first if not given).
    axum: Option<std::path::PathBuf>,
}

/// TLS handshakes across a restart, with and without the session-ticket
/// keys handed over.
#[derive(clap::Parser)]
#[command(name = "tls_resume_bench", version)]
struct Cli {
    /// Clients, each with a session, that reconnect after the restart.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    clients: u64,
    /// Rounds for each server.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Run this axum example instead of building it in release mode.
    #[arg(long, value_name = "PATH")]
    axum: Option<std::path::PathBuf>,
}

fn parse() -> Result<Options, String> {
    let cli = <Cli as clap::Parser>::parse();
    Ok(Options {
        clients: cli.clients as usize,
        rounds: cli.rounds as usize,
        axum: cli.axum,
    })
}

/// CPU time of every thread of `pid` so far, in nanoseconds
/// (`/proc/PID/task/*/schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// One request over a new TLS connection: whether it resumed a session.
async fn request(addr: std::net::SocketAddr, connector: &TlsConnector) -> Result<bool, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
    tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    // To the end: the session tickets come after the handshake.
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    if !response.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "not answered: {}",
            String::from_utf8_lossy(&response)
        ));
    }
    Ok(resumed)
}

/// One round on `server`: the clients connect, the server restarts, they
/// reconnect. Returns (full handshakes on reconnection, the new
/// generation's CPU milliseconds over the reconnections).
async fn round(
    server: &Hello,
    config: &ClientConfig,
    clients: usize,
) -> Result<(usize, f64), Box<dyn std::error::Error>> {
    // Each client a session cache of its own (a clone of the config would
    // share one, which keeps only a few tickets per server).
    let connectors: Vec<TlsConnector> = (0..clients)
        .map(|_| {
            let mut config = config.clone();
            config.resumption = Resumption::in_memory_sessions(8);
            TlsConnector::from(Arc::new(config))
        })
        .collect();
    for connector in &connectors {
        request(server.addr, connector).await?;
    }
    let old = server.pid().ok_or("no pid file")?;
    let exit = watch_exit(old, Duration::from_secs(60));
    kill(old, libc::SIGHUP)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let new = loop {
        match server.pid() {
            Some(pid) if pid != old => break pid,
            _ if Instant::now() > deadline => return Err("no new generation".into()),
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    };
    exit.exited().await;
    let before = cpu_ns(new);
    let reconnects: Vec<_> = connectors
        .into_iter()
        .map(|connector| {
            let addr = server.addr;
            tokio::spawn(async move { request(addr, &connector).await })
        })
        .collect();
    let mut full = 0;
    for reconnect in reconnects {
        if !reconnect.await?? {
            full += 1;
        }
    }
    let used = cpu_ns(new).saturating_sub(before);
    Ok((full, used as f64 / 1e6))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut o = parse()?;
    let axum = match o.axum.take() {
        Some(path) => path,
        None => bench_support::example_binary("axum")?,
    };
    let dir = std::env::temp_dir().join(format!("handover-tls-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), signing_key.serialize_pem())?;
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(cert.der().to_vec()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();

    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    let mut servers = Vec::new();
    for hand_over in ["on", "off"] {
        let server_dir = dir.join(hand_over);
        std::fs::create_dir_all(&server_dir)?;
        let args = [
            "--tls-cert",
            cert_path.to_str().ok_or("path")?,
            "--tls-key",
            key_path.to_str().ok_or("path")?,
            "--hand-over-tickets",
            hand_over,
        ];
        servers.push((hand_over, Hello::start(&axum, &server_dir, &args).await?));
    }
    println!(
        "{} clients, each with a session, reconnect after a restart; {} rounds",
        o.clients, o.rounds
    );
    let mut figures: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); 2];
    for r in 0..o.rounds {
        // Alternate which server goes first.
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (full, cpu_ms) = round(&servers[i].1, &config, o.clients).await?;
            figures[i].0.push(full as f64);
            figures[i].1.push(cpu_ms);
        }
    }
    for (i, (hand_over, _)) in servers.iter().enumerate() {
        println!(
            "hand-over {hand_over:<3}: full handshakes on reconnection {:>5.0} of {} (median), new generation's CPU over the reconnections {:>6.1} ms (median; rounds: {})",
            median(figures[i].0.clone()),
            o.clients,
            median(figures[i].1.clone()),
            figures[i]
                .1
                .iter()
                .map(|ms| format!("{ms:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let (with, without) = (median(figures[0].1.clone()), median(figures[1].1.clone()));
    if without > 0.0 {
        println!("CPU with the hand-over / without = {:.2}", with / without);
    }
    for (_, server) in servers {
        server.stop().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
