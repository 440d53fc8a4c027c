//! A server on a fresh 127.0.0.1 port, run in a task of its own, for the
//! in-process tests (`serve`, `tls`).

use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use handover::{DrainReport, Graceful};
use http::Request;
use http::header::HOST;
use http_body_util::Empty;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct Served {
    pub addr: SocketAddr,
    pub graceful: Graceful,
    pub task: JoinHandle<io::Result<DrainReport>>,
}

impl Served {
    /// Binds 127.0.0.1:0 and runs what `serve` makes of the listener and a
    /// fresh [`Graceful`] (`handover::serve(listener, app, graceful)` with
    /// its settings).
    pub async fn start<S>(serve: impl FnOnce(TcpListener, &Graceful) -> S) -> Served
    where
        S: IntoFuture<Output = io::Result<DrainReport>>,
        S::IntoFuture: Send + 'static,
    {
        Self::start_with(Graceful::new(), serve).await
    }

    /// Like [`start`](Self::start), draining by `graceful`'s timeouts.
    pub async fn start_with<S>(
        graceful: Graceful,
        serve: impl FnOnce(TcpListener, &Graceful) -> S,
    ) -> Served
    where
        S: IntoFuture<Output = io::Result<DrainReport>>,
        S::IntoFuture: Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(listener, &graceful).into_future());
        Served {
            addr,
            graceful,
            task,
        }
    }

    /// The drain's report, once the server has drained.
    pub async fn report(self) -> DrainReport {
        self.task.await.unwrap().unwrap()
    }

    /// Starts the drain and returns its report, which must be clean.
    pub async fn drain_clean(self) -> DrainReport {
        self.graceful.start_drain();
        let report = self.report().await;
        assert!(report.is_clean(), "{report}");
        report
    }

    /// Waits (bounded by the test's timeout) until `n` requests are in flight.
    pub async fn wait_in_flight(&self, n: usize) {
        while self.graceful.in_flight() < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits (bounded by the test's timeout) until exactly `n` connections
    /// are open.
    pub async fn wait_connections(&self, n: usize) {
        while self.graceful.connections() != n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// `GET path`, with a `Host` header.
pub fn get_req(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header(HOST, "127.0.0.1")
        .body(Empty::new())
        .unwrap()
}
