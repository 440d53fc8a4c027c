//! The examples, started and restarted under load as real processes, so
//! none of them can rot.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http::header::HOST;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::{Deploy, Load, Server, wait_until};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(120);

/// Opens `GET /events` and returns the body to read frames from.
async fn open_events(addr: std::net::SocketAddr) -> hyper::body::Incoming {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::get("/events")
                .header(HOST, "127.0.0.1")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    response.into_body()
}

/// Reads SSE text until `until` appears; returns everything read.
async fn read_until(body: &mut hyper::body::Incoming, until: &str) -> String {
    let mut text = String::new();
    while !text.contains(until) {
        let frame = body.frame().await.expect("the stream goes on").unwrap();
        if let Ok(data) = frame.into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_example_restarts_under_load_and_its_event_stream_ends_cleanly() {
    timeout(BOUND, async {
        let server = Server::start_with(Deploy::of("axum", "axum"), &[], &[]).await;
        let load = Load::start(server.addr, 3, "/");
        load.wait_answers(50).await;

        for _ in 0..3 {
            let old = server.current_pid();
            let mut events = open_events(server.addr).await;
            let first = read_until(&mut events, "\n\n").await;
            assert!(
                first.contains(&format!("event: tick\ndata: 0 from {old}")),
                "{first}"
            );

            let new = server.restart().await;
            // The stream says goodbye, with a retry hint, and ends cleanly:
            // the chunked body completes, no error.
            let mut rest = String::new();
            while let Some(frame) = events.frame().await {
                let frame = frame.expect("the event stream ends cleanly, not with an error");
                if let Ok(data) = frame.into_data() {
                    rest.push_str(std::str::from_utf8(&data).unwrap());
                }
            }
            assert!(
                rest.ends_with(&format!(
                    "event: bye\ndata: {old} is restarting\nretry: 100\n\n"
                )),
                "the last event says goodbye, whole: {rest:?}"
            );

            // A client that reconnects reaches the new generation.
            let mut events = open_events(server.addr).await;
            let again = read_until(&mut events, "\n\n").await;
            assert!(again.contains(&format!("data: 0 from {new}")), "{again}");
            wait_until("the new pid answers", Duration::from_secs(20), || {
                load.pids.lock().unwrap().contains(&new)
            })
            .await;
        }
        let (ok, failed, _) = load.stop().await;
        assert!(
            failed.is_empty(),
            "{} of {ok} requests failed: {failed:?}",
            failed.len()
        );
        server.stop().await;
    })
    .await
    .unwrap();
}
