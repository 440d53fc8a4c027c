//! The accept loop survives running out of file descriptors.
//!
//! The test starts this same test binary again as a child with a low fd
//! limit (`ulimit -n`), in which the server runs; the parent opens more
//! connections than the child can hold, waits for the child to report the
//! failed accept, lets the connections go, and checks the server answers
//! again.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http::header::HOST;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

const CHILD_ENV: &str = "HANDOVER_TEST_EMFILE_CHILD";
const FD_LIMIT: u32 = 64;
const CONNECTIONS: usize = 120;

#[tokio::test]
async fn accept_loop_survives_emfile_and_serves_again_once_fds_are_free() {
    timeout(Duration::from_secs(60), async {
        let exe = std::env::current_exe().unwrap();
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {FD_LIMIT} && exec \"$0\" \"$@\""))
            .arg(exe)
            .args(["--exact", "emfile_child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();

        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let port: u16 = loop {
            let line = stdout
                .next_line()
                .await
                .unwrap()
                .expect("child printed its port");
            if let Some(port) = line.strip_prefix("PORT ") {
                break port.parse().unwrap();
            }
        };
        let (saw_emfile_tx, saw_emfile) = tokio::sync::oneshot::channel();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let stderr_task = tokio::spawn(async move {
            let mut tx = Some(saw_emfile_tx);
            let mut all = String::new();
            while let Ok(Some(line)) = stderr.next_line().await {
                if line.contains("accept failed")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });

        // More connections than the child has descriptors for.
        let mut held = Vec::new();
        for _ in 0..CONNECTIONS {
            held.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }
        timeout(Duration::from_secs(20), saw_emfile)
            .await
            .expect("the child ran out of descriptors and said so")
            .unwrap();
        assert!(
            child.try_wait().unwrap().is_none(),
            "the server is still running"
        );

        // Free the descriptors: the loop accepts again, without a restart.
        drop(held);
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = Request::get("/")
            .header(HOST, "127.0.0.1")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = timeout(Duration::from_secs(20), sender.send_request(request))
            .await
            .expect("served again once fds were free")
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");

        // Closing its stdin drains the child; it exits 0.
        drop(child.stdin.take());
        let status = timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("the child drained and exited")
            .unwrap();
        let log = stderr_task.await.unwrap();
        assert!(status.success(), "child failed: {status}\n{log}");
    })
    .await
    .unwrap();
}

/// The server side of the test above; runs only as its child.
#[tokio::test]
#[ignore = "run by accept_loop_survives_emfile_and_serves_again_once_fds_are_free"]
async fn emfile_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter("handover=warn")
        .init();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("PORT {}", listener.local_addr().unwrap().port());

    let graceful = handover::Graceful::builder()
        .drain_timeout(Duration::from_secs(5))
        .build();
    let trigger = graceful.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 16];
        while !matches!(stdin.read(&mut buf).await, Ok(0) | Err(_)) {}
        trigger.start_drain();
    });
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let report = handover::serve(listener, app, &graceful)
        .idle_grace(Duration::from_millis(50))
        .await
        .unwrap();
    eprintln!("{report}");
}
