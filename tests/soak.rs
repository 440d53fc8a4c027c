//! Soak: many restarts under continuous HTTP/1 and HTTP/2 load. CI runs a
//! short version (20 restarts); the long one is
//! `HANDOVER_SOAK_RESTARTS=200 cargo nextest run --test soak`.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{Deploy, Load, Server, fd_count, rss_kib, wait_until};
use tokio::time::timeout;

/// Newest generation's RSS may exceed the first's by this fraction plus
/// [`RSS_SLACK_KIB`]: two fresh processes under the same load differ a
/// little by allocator state, a leak grows with every generation.
const RSS_MARGIN: f64 = 0.25;
const RSS_SLACK_KIB: u64 = 2048;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_under_http1_and_http2_load_lose_nothing_and_leak_nothing() {
    let restarts: usize = std::env::var("HANDOVER_SOAK_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    timeout(Duration::from_secs(60 + restarts as u64 * 3), async {
        let server = Server::start(Deploy::new("soak"), &[]).await;
        let first = server.current_pid();
        let idle_fds = fd_count(first);
        let h1 = Load::start(server.addr, 3, "/");
        let h2 = Load::start_with(server.addr, 1, "/", true);
        h1.wait_answers(500).await;
        h2.wait_answers(200).await;
        let first_rss = rss_kib(first);

        let mut newest = first;
        for _ in 0..restarts {
            newest = server.restart().await;
            h1.wait_pid(newest).await;
        }
        h1.wait_answers(500).await;
        h2.wait_answers(200).await;
        let newest_rss = rss_kib(newest);
        let (ok1, failed1, _) = h1.stop().await;
        let (ok2, failed2, _) = h2.stop().await;
        eprintln!(
            "{restarts} restarts: HTTP/1 {ok1} answered, HTTP/2 {ok2}; RSS first {first_rss} KiB, newest {newest_rss} KiB"
        );
        assert!(failed1.is_empty(), "HTTP/1: {} of {ok1} failed: {failed1:?}", failed1.len());
        assert!(failed2.is_empty(), "HTTP/2: {} of {ok2} failed: {failed2:?}", failed2.len());
        assert!(
            newest_rss as f64 <= first_rss as f64 * (1.0 + RSS_MARGIN) + RSS_SLACK_KIB as f64,
            "RSS grew: first {first_rss} KiB, newest {newest_rss} KiB"
        );
        // Once the clients have gone, the newest holds what the first did.
        wait_until("the newest generation's fds settle", Duration::from_secs(20), || {
            fd_count(newest) == idle_fds
        })
        .await;
        server.stop().await;
    })
    .await
    .unwrap();
}
