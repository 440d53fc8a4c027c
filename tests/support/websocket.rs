//! WebSocket assertions shared by the tests, over HTTP/1.1 or HTTP/2.

use futures_util::StreamExt;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The next message is the server's Close 1001 (going away).
pub async fn expect_going_away<S>(ws: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Away, "{frame:?}")
        }
        other => panic!("expected the server's Close 1001, got {other:?}"),
    }
}
