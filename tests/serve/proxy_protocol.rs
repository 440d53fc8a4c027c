//! Behind a load balancer that speaks the PROXY protocol (HAProxy, AWS NLB),
//! an acceptor reads the header and `handshake_info` gives handlers the real
//! client's address: the acceptor's stream carries it.

use super::*;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection whose PROXY v1 header has been read.
struct Proxied {
    stream: TcpStream,
    client: SocketAddr,
}

impl AsyncRead for Proxied {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Proxied {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Reads `PROXY TCP4|TCP6 <client> <server> <client port> <server
/// port>\r\n`, a byte at a time so that nothing after it is read.
async fn read_header(mut stream: TcpStream) -> io::Result<Proxied> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        if line.len() == 107 {
            return Err(invalid("PROXY header too long"));
        }
        line.push(stream.read_u8().await?);
    }
    let line = std::str::from_utf8(&line).map_err(|_| invalid("PROXY header not text"))?;
    let fields: Vec<&str> = line.trim_end().split(' ').collect();
    let ["PROXY", "TCP4" | "TCP6", client, _, port, _] = fields[..] else {
        return Err(invalid("not a PROXY v1 header"));
    };
    let ip = client.parse().map_err(|_| invalid("bad client address"))?;
    let port = port.parse().map_err(|_| invalid("bad client port"))?;
    Ok(Proxied {
        stream,
        client: SocketAddr::new(ip, port),
    })
}

#[tokio::test]
async fn an_acceptor_reads_the_header_and_handlers_see_the_real_client() {
    timeout(BOUND, async {
        let app = Router::new().route(
            "/",
            get(|ConnectInfo(client): ConnectInfo<SocketAddr>| async move { client.to_string() }),
        );
        let server = Served::start(|listener, graceful| {
            handover::serve(listener, app, graceful)
                .handshake(read_header)
                .handshake_info(|proxied: &Proxied| ConnectInfo(proxied.client))
        })
        .await;
        let addr = server.addr;

        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n")
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        for _ in 0..2 {
            let res = sender.send_request(get_req("/")).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, "203.0.113.7:51234");
        }

        // No header: that connection is closed, unanswered.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer).await;
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

        drop(sender);
        server.drain_clean().await;
    })
    .await
    .unwrap();
}
