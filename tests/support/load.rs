//! Load from real clients, counting what was answered, by whom, and what
//! failed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;

use super::load_client;
use super::wait::wait_until;

/// Keep-alive HTTP/1 load from a pooled hyper client (which, like most
/// clients, re-sends a request that was never written to a closed
/// connection), or HTTP/2 load from the benchmarks' client
/// ([`load_client`]), one connection per client, reconnecting when a
/// GOAWAY has closed it.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicUsize>,
    pub failed: Arc<Mutex<Vec<String>>>,
    pub pids: Arc<Mutex<BTreeSet<u32>>>,
    /// HTTP/2 requests refused unprocessed by a GOAWAY (the server never
    /// saw them), and sent again.
    pub refused: Arc<AtomicUsize>,
    /// HTTP/2 requests hyper's client lost after their connection had
    /// closed (see [`load_client`]), and sent again.
    pub lost_by_client: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, clients: usize, path: &'static str) -> Load {
        Self::start_with(addr, clients, path, false)
    }

    /// Like [`start`](Self::start), over HTTP/2 (prior knowledge) when `http2`.
    pub fn start_with(addr: SocketAddr, clients: usize, path: &'static str, http2: bool) -> Load {
        let mut load = Self::not_started();
        load.tasks = if http2 {
            (0..clients)
                .map(|_| {
                    let (stop, ok, failed, pids) = (
                        load.stop.clone(),
                        load.ok.clone(),
                        load.failed.clone(),
                        load.pids.clone(),
                    );
                    let (refused, lost_by_client) =
                        (load.refused.clone(), load.lost_by_client.clone());
                    tokio::spawn(async move {
                        use load_client::Outcome;
                        let mut connection = None;
                        while !stop.load(Ordering::Relaxed) {
                            let next = load_client::next_sender(addr, &mut connection, None, true);
                            let mut sender = match next.await {
                                Ok(sender) => sender,
                                Err(e) => {
                                    failed.lock().unwrap().push(e);
                                    continue;
                                }
                            };
                            match load_client::get(&mut sender, path).await {
                                Outcome::Answered(body) => {
                                    match load_client::pid_of(&body) {
                                        Some(pid) => {
                                            ok.fetch_add(1, Ordering::Relaxed);
                                            pids.lock().unwrap().insert(pid);
                                        }
                                        None => failed
                                            .lock()
                                            .unwrap()
                                            .push(format!("unexpected body {body:?}")),
                                    }
                                    connection = Some(sender);
                                }
                                // Closing or closed: the next request
                                // goes on a new connection.
                                Outcome::NotSent { refused: false } => {}
                                Outcome::NotSent { refused: true } => {
                                    refused.fetch_add(1, Ordering::Relaxed);
                                }
                                Outcome::LostByClient => {
                                    lost_by_client.fetch_add(1, Ordering::Relaxed);
                                }
                                Outcome::Failed(e) => failed.lock().unwrap().push(e),
                            }
                        }
                    })
                })
                .collect()
        } else {
            let uri: http::Uri = format!("http://{addr}{path}").parse().unwrap();
            let client = || Client::builder(TokioExecutor::new()).build_http();
            load.pooled_clients(clients, client, uri)
        };
        load
    }

    /// Counts at zero, no client yet.
    fn not_started() -> Load {
        Load {
            stop: Arc::new(AtomicBool::new(false)),
            ok: Arc::new(AtomicUsize::new(0)),
            failed: Arc::new(Mutex::new(Vec::new())),
            pids: Arc::new(Mutex::new(BTreeSet::new())),
            refused: Arc::new(AtomicUsize::new(0)),
            lost_by_client: Arc::new(AtomicUsize::new(0)),
            tasks: Vec::new(),
        }
    }

    /// Like [`start`](Self::start), over HTTPS (HTTP/1.1): `tls` says which
    /// certificates the clients trust, and offers no ALPN protocol (the
    /// connector offers `http/1.1`).
    pub fn start_https(
        addr: SocketAddr,
        clients: usize,
        path: &'static str,
        tls: tokio_rustls::rustls::ClientConfig,
    ) -> Load {
        let mut load = Self::not_started();
        let uri: http::Uri = format!("https://{addr}{path}").parse().unwrap();
        let client = || {
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_only()
                .enable_http1()
                .build();
            Client::builder(TokioExecutor::new()).build(https)
        };
        load.tasks = load.pooled_clients(clients, client, uri);
        load
    }

    /// `clients` loops of requests, each on a pooled keep-alive client of
    /// its own.
    fn pooled_clients<C>(
        &self,
        clients: usize,
        client: impl Fn() -> Client<C, Empty<Bytes>>,
        uri: http::Uri,
    ) -> Vec<JoinHandle<()>>
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        (0..clients)
            .map(|_| {
                let client = client();
                let (stop, ok, failed, pids) = (
                    self.stop.clone(),
                    self.ok.clone(),
                    self.failed.clone(),
                    self.pids.clone(),
                );
                let uri = uri.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let result = Self::one(&client, uri.clone()).await;
                        match result {
                            Ok(pid) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                pids.lock().unwrap().insert(pid);
                            }
                            Err(e) => failed.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect()
    }

    async fn one<C>(client: &Client<C, Empty<Bytes>>, uri: http::Uri) -> Result<u32, String>
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        let response = client
            .get(uri)
            .await
            .map_err(|e| format!("request: {e:?}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e:?}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "status {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        load_client::pid_of(&body).ok_or_else(|| format!("unexpected body {body:?}"))
    }

    /// Waits until `n` more requests have been answered.
    pub async fn wait_answers(&self, n: usize) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        wait_until("load answered", Duration::from_secs(20), || {
            self.ok.load(Ordering::Relaxed) >= target
        })
        .await;
    }

    /// Waits until generation `pid` has answered this load.
    pub async fn wait_pid(&self, pid: u32) {
        wait_until(
            &format!("generation {pid} answers"),
            Duration::from_secs(20),
            || self.pids.lock().unwrap().contains(&pid),
        )
        .await;
    }

    pub async fn stop(self) -> (usize, Vec<String>, BTreeSet<u32>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        let pids = self.pids.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failed, pids)
    }

    /// Stops the load and asserts that every request was answered.
    pub async fn stop_all_answered(self) {
        let (ok, failed, _) = self.stop().await;
        assert!(
            failed.is_empty(),
            "{} of {ok} requests failed: {failed:?}",
            failed.len()
        );
    }
}
