//! End-to-end cost of `handover::serve`: requests per second of a
//! hello-world service over keep-alive HTTP/1, against a bare hyper-util
//! accept loop with the same builder and no tracking, in one run.
//!
//! ```text
//! cargo bench --bench serve [-- SECONDS_PER_ROUND ROUNDS CONNECTIONS]
//! ```
//!
//! The server runs on one runtime thread and the load client on another, so
//! the two cores of a small machine are split evenly. Rounds alternate
//! between the two servers, so drift in the machine's load hits both; the
//! medians and their ratio are printed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tower::service_fn;

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
}

/// The baseline: hyper-util's auto builder, one task per connection, nothing tracked.
async fn bare_server(listener: TcpListener) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    loop {
        let Ok((io, _)) = listener.accept().await else {
            continue;
        };
        let _ = io.set_nodelay(true);
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = TowerToHyperService::new(service_fn(hello));
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .await;
        });
    }
}

async fn handover_server(listener: TcpListener) {
    let graceful = handover::Graceful::new();
    let _ = handover::serve(listener, service_fn(hello), &graceful).await;
}

/// Keep-alive load from `connections` clients for `duration`; returns requests/s.
async fn load(addr: SocketAddr, connections: usize, duration: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..connections {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let (stop, count) = (stop.clone(), count.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let request = Request::get("/")
                    .header(HOST, "127.0.0.1")
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let response = sender.send_request(request).await.expect("response");
                response.into_body().collect().await.expect("body");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(duration / 5).await;
    let start_count = count.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    let done = count.load(Ordering::Relaxed) - start_count;
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    done as f64 / elapsed.as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; take only numbers.
    let numbers: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let seconds = numbers.first().copied().unwrap_or(2.0);
    let rounds = numbers.get(1).copied().unwrap_or(5.0) as usize;
    let connections = numbers.get(2).copied().unwrap_or(32.0) as usize;
    let round = Duration::from_secs_f64(seconds);

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("server runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("client runtime");

    let bind = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let listener = server_rt.block_on(async { TcpListener::from_std(listener) });
        (listener.expect("listener"), addr)
    };
    let (bare_listener, bare_addr) = bind();
    let (handover_listener, handover_addr) = bind();
    server_rt.spawn(bare_server(bare_listener));
    server_rt.spawn(handover_server(handover_listener));

    println!(
        "keep-alive HTTP/1, {connections} connections, {rounds} rounds of {seconds} s each, alternating"
    );
    let (mut bare, mut handover) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let b = client_rt.block_on(load(bare_addr, connections, round));
        let h = client_rt.block_on(load(handover_addr, connections, round));
        println!("round {i}: bare hyper-util {b:>9.0} req/s   handover::serve {h:>9.0} req/s");
        bare.push(b);
        handover.push(h);
    }
    let (b, h) = (median(&mut bare), median(&mut handover));
    println!("median: bare hyper-util {b:.0} req/s, handover::serve {h:.0} req/s");
    println!(
        "handover::serve / bare = {:.3} (cost {:+.1}% of throughput)",
        h / b,
        (1.0 - h / b) * 100.0
    );
}
