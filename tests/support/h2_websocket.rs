//! WebSockets over HTTP/2 (RFC 8441): hyper's HTTP/2 client sends an
//! extended CONNECT, and tokio-tungstenite speaks WebSocket on the stream.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::HOST;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

pub type H2Ws = WebSocketStream<TokioIo<Upgraded>>;
pub type Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// The extended CONNECT that opens a WebSocket to `path`.
pub fn request(path: &str) -> Request<Empty<Bytes>> {
    Request::connect(path)
        .header(HOST, "127.0.0.1")
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(Empty::new())
        .unwrap()
}

/// An HTTP/2 connection to `addr`, checked (after a `GET /`, so that the
/// server's SETTINGS are in) to offer extended CONNECT, and a WebSocket to
/// `path` on it; with the sender for more requests on the connection, and
/// the connection's task.
pub async fn connect(
    addr: SocketAddr,
    path: &str,
) -> (H2Ws, Sender, JoinHandle<Result<(), hyper::Error>>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let mut conn = Box::pin(conn);
    let get = Request::get("/")
        .header(HOST, "127.0.0.1")
        .body(Empty::new())
        .unwrap();
    let response = tokio::select! {
        response = sender.send_request(get) => response.unwrap(),
        ended = conn.as_mut() => panic!("the connection ended first: {ended:?}"),
    };
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        conn.is_extended_connect_protocol_enabled(),
        "SETTINGS_ENABLE_CONNECT_PROTOCOL is offered"
    );
    let conn = tokio::spawn(conn);
    let ws = open(&mut sender, path).await;
    (ws, sender, conn)
}

/// Another WebSocket to `path` on the connection of `sender`.
pub async fn open(sender: &mut Sender, path: &str) -> H2Ws {
    let mut response = sender.send_request(request(path)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await
}
