//! One-off HTTP requests and connections, for the tests that need one
//! answer rather than a load.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The whole response to `GET path` from the server at `addr`, on a
/// connection of its own that the server closes after it.
pub async fn get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// The body of `GET /` from the server at `addr`.
pub async fn get_body(addr: SocketAddr) -> String {
    get_path_body(addr, "/").await
}

/// The body of `GET path` from the server at `addr`.
pub async fn get_path_body(addr: SocketAddr, path: &str) -> String {
    let response = get(addr, path).await;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_else(|| panic!("no body in {response:?}"))
}

/// Connects to `addr` once something listens there (20 s at most): a
/// socket activator, or a server starting up.
pub async fn connect_when_listening(addr: SocketAddr) -> tokio::net::TcpStream {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => return stream,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "nothing listens on {addr} after 20 s: {e}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// Opens `GET /events` over HTTP/1.1, sending `Last-Event-ID` when given;
/// returns the event stream's body.
pub async fn open_events(addr: SocketAddr, last_event_id: Option<u64>) -> hyper::body::Incoming {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::get("/events").header(http::header::HOST, "127.0.0.1");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    response.into_body()
}

/// One keep-alive HTTP/1 connection from hyper's client, kept open: each
/// request goes on it, and on no other.
pub struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    conn: tokio::task::JoinHandle<hyper::Result<()>>,
    /// The client's end.
    pub local: SocketAddr,
    /// The server's.
    pub server: SocketAddr,
}

impl KeepAlive {
    pub async fn open(server: SocketAddr) -> KeepAlive {
        let stream = tokio::net::TcpStream::connect(server).await.unwrap();
        let local = stream.local_addr().unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        KeepAlive {
            sender,
            conn: tokio::spawn(conn),
            local,
            server,
        }
    }

    /// `GET path` on this connection: the response's head and body, or
    /// what went wrong.
    pub async fn try_get(&mut self, path: &str) -> Result<(http::response::Parts, Bytes), String> {
        use http_body_util::BodyExt;
        self.sender
            .ready()
            .await
            .map_err(|e| format!("not ready: {e}"))?;
        let request = http::Request::get(path)
            .header(http::header::HOST, "127.0.0.1")
            .body(Empty::new())
            .unwrap();
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (head, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e:?}"))?
            .to_bytes();
        Ok((head, body))
    }

    /// `GET path` on this connection, which must answer: the body, after
    /// checking the response keeps the connection open.
    pub async fn get(&mut self, path: &str) -> String {
        let (head, body) = self.try_get(path).await.unwrap();
        assert_eq!(head.headers.get(http::header::CONNECTION), None, "{head:?}");
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Whether the connection is still open: the client has seen neither
    /// an end of file nor an error on it.
    pub fn is_open(&self) -> bool {
        !self.conn.is_finished()
    }

    /// The server's end of it, as `/proc/net/tcp` shows it.
    pub fn server_socket(&self) -> Option<super::proc::TcpSocket> {
        super::proc::tcp_socket(self.server, self.local)
    }
}
