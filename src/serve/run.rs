//! The accept loop: each connection in a task of its own, until the drain;
//! and the connections the previous generation gave up, taken over.

use std::ops::ControlFlow;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::accept::{BACKOFF_MAX, BACKOFF_MIN, accept_now, is_connection_error};
use super::connection::{Conn, ConnSettings, Ended, serve_connection};
use super::http::HttpBuilder;
use super::info::{Extend, MakeExtend, MakeHandshakeExtend};
use super::moves::{Carried, GiveUp, Moved, Moves};
use super::presized::Presized;
use super::watchdog::Watched;
use super::{Accept, Handshake, Host, HttpService, Serve, handshake, info};
use crate::drain::{ConnectionToken, Graceful, Hold};

/// Serves until the drain starts, then drains; what `host` makes of it.
pub(super) async fn run<L, S, H, R>(serve: Serve<L, S, H, R>) -> R::Output
where
    L: Accept,
    S: HttpService,
    H: Handshake<L::Io>,
    R: Host,
{
    let Serve {
        mut listener,
        service,
        host,
        handshake,
        connect_info,
        handshake_info,
        options,
    } = serve;
    // Before the host can say this generation is ready: the previous one
    // starts giving up its connections then. Only plaintext HTTP/1 moves,
    // and only what the handshake can give up and take over.
    let movable = options.hand_over_connections && L::MOVES && handshake.gives_up();
    let Moves { incoming, give_up } = match movable {
        true => host.moves(listener.listener_fd()),
        false => Moves::none(),
    };
    if let ControlFlow::Break(output) = host.start() {
        return output;
    }
    let graceful = host.graceful().clone();
    let mut http = HttpBuilder::new();
    for configure in options.configure {
        configure(&mut http);
    }
    // Looks at every connection a few times per header read timeout,
    // until the drain starts.
    let mut watchdog = None;
    let watched = options.header_read_timeout.and_then(|timeout| {
        let watched = Arc::new(Watched::default());
        match watched.clone().start(timeout) {
            Ok(started) => watchdog = Some(started),
            Err(e) => {
                log!(error, error = %e, "could not start the header read timeout's watchdog; serving without it");
                return None;
            }
        }
        Some(watched)
    });
    // The service, layers and all, is built by now.
    let presized = if options.signal_extension {
        Some(Presized::new(Some(graceful.signal_with(true))))
    } else {
        graceful.has_signal_layer().then(|| Presized::new(None))
    };
    let ctx = Arc::new(Ctx::<L, H> {
        moves: movable && give_up.is_some(),
        give_up,
        handshake,
        settings: ConnSettings {
            http,
            idle_grace: options.idle_grace,
            watched,
            presized: presized.map(Arc::new),
        },
        graceful: graceful.clone(),
        connect_info,
        handshake_info,
        handshake_timeout: options.handshake_timeout,
        tcp_nodelay: options.tcp_nodelay,
    });
    // With metrics, the gauges of what is open: once before the first
    // connection (a scrape never finds them missing), then once a second.
    #[cfg(feature = "metrics")]
    let gauges = {
        sample_gauges(&graceful);
        let graceful = graceful.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                sample_gauges(&graceful);
            }
        }))
    };
    // What the previous generation gives up, taken over as it comes (the
    // drain waits for it to have given up the last).
    if let Some(incoming) = incoming {
        tokio::spawn(take_over(
            ctx.clone(),
            service.clone(),
            incoming,
            graceful.hold(),
        ));
    }

    let mut drain = pin!(graceful.signal().draining());
    let mut backoff = BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut drain => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((io, peer)) => {
                backoff = BACKOFF_MIN;
                ctx.start(service.clone(), io, peer, None);
            }
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                log!(error, error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::select! {
                    biased;
                    () = &mut drain => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    // The drain's idle grace and deadline take over from here.
    drop(watchdog);
    // Closing the socket resets every connection still waiting in its
    // backlog: when nothing else will accept them, they are accepted and
    // served through the drain first.
    if host.closes_for_good() {
        while let Some(accepted) = accept_now(&mut listener) {
            match accepted {
                Ok((io, peer)) => ctx.start(service.clone(), io, peer, None),
                Err(e) if is_connection_error(&e) => {}
                Err(_) => break,
            }
        }
    }
    drop(listener);
    log!(
        info,
        connections = graceful.connections(),
        in_flight = graceful.in_flight(),
        "stopped accepting; draining"
    );
    let report = graceful.drain().await;
    #[cfg(feature = "metrics")]
    {
        drop(gauges);
        sample_gauges(&graceful);
    }
    drop(ctx);
    host.finish(Ok(report)).await
}

/// What every connection of one serve loop is served with, but the
/// service (which need not be `Sync`: each connection has a clone).
struct Ctx<L: Accept, H: Handshake<L::Io>> {
    handshake: Arc<H>,
    settings: ConnSettings,
    graceful: Graceful,
    connect_info: Option<MakeExtend<L>>,
    handshake_info: Option<MakeHandshakeExtend<H::Io>>,
    handshake_timeout: Duration,
    tcp_nodelay: bool,
    /// Its plaintext HTTP/1 connections move to the next generation when
    /// the drain gives connections up.
    moves: bool,
    give_up: Option<GiveUp>,
}

/// What became of a connection given up.
enum HandedOver<Io> {
    /// The next generation owns it.
    Moved,
    /// The next generation could not take it: it is this generation's
    /// again, its stream and what was read of it.
    Back(Io, Bytes),
    /// Lost on the way (closed).
    Lost,
}

impl<L, H> Ctx<L, H>
where
    L: Accept,
    H: Handshake<L::Io>,
{
    /// Serves a connection in a task of its own: one accepted, or one the
    /// previous generation gave up (`moved`: what was read of it and not
    /// parsed, and what its handshake learned).
    fn start<S: HttpService>(
        self: &Arc<Self>,
        service: S,
        io: L::Io,
        peer: L::Addr,
        moved: Option<(Bytes, Vec<u8>)>,
    ) {
        if let Err(e) = L::set_nodelay(&io, self.tcp_nodelay) {
            log!(debug, error = %e, ?peer, "could not set TCP_NODELAY");
        }
        // Counted from now: a drain waits for the handshake too.
        let token = self.graceful.connection_token();
        let ctx = self.clone();
        // In the connection's task, not here: the application's closures
        // cannot stall or end the accept loop.
        tokio::spawn(async move {
            let extend = ctx.connect_info.as_ref().map(|make| make(&io, &peer));
            let (shaking, prefix) = match moved {
                None => (Some(ctx.handshake.handshake(io)), Bytes::new()),
                Some((unread, learned)) => (ctx.handshake.take_over(io, &learned), unread),
            };
            let Some(shaking) = shaking else {
                log!(
                    debug,
                    "a connection given up by the previous generation cannot be taken over by this handshake; closed"
                );
                return;
            };
            let Some(io) = ctx.shake(shaking).await else {
                return;
            };
            let extend = info::both(extend, ctx.handshake_info.as_ref().map(|make| make(&io)));
            ctx.serve(service, io, prefix, extend, token).await;
        });
    }

    /// Serves HTTP on `io` (whose first bytes are `prefix`) until it ends,
    /// and gives it up if the drain does: drained as any other if the next
    /// generation cannot take it.
    async fn serve<S: HttpService>(
        &self,
        service: S,
        io: H::Io,
        prefix: Bytes,
        extend: Option<Extend>,
        token: ConnectionToken,
    ) {
        let (mut io, mut prefix, mut token, mut moves) = (io, prefix, token, self.moves);
        loop {
            let conn = Conn {
                service: service.clone(),
                extend: extend.clone(),
                settings: &self.settings,
                graceful: self.graceful.clone(),
                token,
                moves,
            };
            let Ended::GivenUp {
                io: given,
                unread,
                token: held,
            } = serve_connection(io, prefix, conn).await
            else {
                return;
            };
            match self.hand_over(given, unread).await {
                HandedOver::Moved => {
                    held.handed_over();
                    return;
                }
                HandedOver::Back(back, unread) => {
                    (io, prefix, token, moves) = (back, unread, held, false);
                }
                HandedOver::Lost => return,
            }
        }
    }

    /// Runs a connection's handshake within this loop's bounds (see
    /// [`handshake::within`]).
    async fn shake(&self, shaking: H::Future) -> Option<H::Io> {
        handshake::within(
            shaking,
            &self.graceful,
            self.handshake_timeout,
            self.settings.idle_grace,
        )
        .await
    }

    /// Hands a connection to the next generation.
    async fn hand_over(&self, io: H::Io, unread: Bytes) -> HandedOver<H::Io> {
        let Some(give_up) = &self.give_up else {
            return HandedOver::Back(io, unread);
        };
        let (accepted, learned) = match self.handshake.give_up(io) {
            Ok(given) => given,
            Err(io) => return HandedOver::Back(io, unread),
        };
        let Some(fd) = L::into_fd(accepted) else {
            log!(
                debug,
                "a connection could not be taken from the runtime to give it up; closed"
            );
            return HandedOver::Lost;
        };
        let moved = Moved {
            fd,
            unread,
            learned,
        };
        let back = match give_up(moved).await {
            Carried::Taken => return HandedOver::Moved,
            Carried::Refused(back) => back,
            Carried::Lost => return HandedOver::Lost,
        };
        // Not taken: this generation's again.
        let Ok((io, _)) = L::from_fd(back.fd) else {
            return HandedOver::Lost;
        };
        let Some(shaking) = self.handshake.take_over(io, &back.learned) else {
            return HandedOver::Lost;
        };
        match self.shake(shaking).await {
            Some(io) => HandedOver::Back(io, back.unread),
            None => HandedOver::Lost,
        }
    }
}

/// Takes over what the previous generation gives up, until it has given up
/// the last; `hold` keeps this generation's drain from ending before then.
async fn take_over<L, S, H>(
    ctx: Arc<Ctx<L, H>>,
    service: S,
    mut incoming: mpsc::UnboundedReceiver<Moved>,
    hold: Hold,
) where
    L: Accept,
    S: HttpService,
    H: Handshake<L::Io>,
{
    let mut taken = 0usize;
    while let Some(moved) = incoming.recv().await {
        match L::from_fd(moved.fd) {
            Ok((io, peer)) => {
                taken += 1;
                ctx.start(
                    service.clone(),
                    io,
                    peer,
                    Some((moved.unread, moved.learned)),
                );
            }
            Err(e) => {
                log!(warn, error = %e, "a connection given up by the previous generation could not be taken over; closed")
            }
        }
    }
    if taken > 0 {
        log!(
            info,
            connections = taken,
            "took over the previous generation's connections"
        );
    }
    drop(hold);
}

/// Sets the metrics' gauges from `graceful`'s counts.
#[cfg(feature = "metrics")]
fn sample_gauges(graceful: &crate::drain::Graceful) {
    crate::metrics::gauges(
        graceful.in_flight(),
        graceful.connections(),
        graceful.upgraded(),
    );
}

#[cfg(test)]
mod tests {
    //! The drain half's side of moving connections, in one process: one
    //! serve loop gives its connections up, another takes them over, as two
    //! generations would (the hand-over half carries them between
    //! processes; see `tests/connections.rs`).

    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::BorrowedFd;
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    use axum::Router;
    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::drain::DrainReport;
    use crate::serve::host::sealed::Sealed;

    /// A serve loop's host that hands it the `Moves` it was made with.
    struct Generation {
        graceful: Graceful,
        moves: Mutex<Option<Moves>>,
    }

    impl Sealed for Generation {}

    impl Host for Generation {
        type Output = io::Result<DrainReport>;
        fn graceful(&self) -> &Graceful {
            &self.graceful
        }
        fn start(&self) -> ControlFlow<Self::Output> {
            ControlFlow::Continue(())
        }
        fn closes_for_good(&self) -> bool {
            false
        }
        fn moves(&self, _listener: Option<BorrowedFd<'_>>) -> Moves {
            self.moves.lock().unwrap().take().unwrap_or(Moves::none())
        }
        async fn finish(self, drained: io::Result<DrainReport>) -> Self::Output {
            drained
        }
    }

    /// A connection whose PROXY v1 header has been read: the client's
    /// address, which the socket does not tell.
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

    /// Reads `PROXY TCP4 <client> <server> <client port> <server port>\r\n`
    /// a byte at a time; gives up the client's address with the stream.
    struct ProxyProtocol;

    type Reading = Pin<Box<dyn Future<Output = io::Result<Proxied>> + Send>>;

    impl Handshake<TcpStream> for ProxyProtocol {
        type Io = Proxied;
        type Future = Reading;

        fn handshake(&self, mut stream: TcpStream) -> Reading {
            Box::pin(async move {
                let mut line = Vec::new();
                while !line.ends_with(b"\r\n") && line.len() < 107 {
                    line.push(stream.read_u8().await?);
                }
                let line = String::from_utf8_lossy(&line).into_owned();
                let fields: Vec<&str> = line.trim_end().split(' ').collect();
                let ["PROXY", "TCP4", client, _, port, _] = fields[..] else {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, line));
                };
                let client = format!("{client}:{port}")
                    .parse()
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
                Ok(Proxied { stream, client })
            })
        }

        fn gives_up(&self) -> bool {
            true
        }

        fn give_up(&self, io: Proxied) -> Result<(TcpStream, Vec<u8>), Proxied> {
            let learned = io.client.to_string().into_bytes();
            Ok((io.stream, learned))
        }

        fn take_over(&self, stream: TcpStream, learned: &[u8]) -> Option<Reading> {
            let client = std::str::from_utf8(learned).ok()?.parse().ok()?;
            Some(Box::pin(std::future::ready(Ok(Proxied { stream, client }))))
        }
    }

    /// A serve loop of generation `name`, answering `<name> <client>`.
    async fn generation(
        name: &'static str,
        moves: Moves,
    ) -> (
        SocketAddr,
        Graceful,
        tokio::task::JoinHandle<io::Result<DrainReport>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let graceful = Graceful::builder().build();
        let app = Router::new().route(
            "/",
            get(
                move |ConnectInfo(client): ConnectInfo<SocketAddr>| async move {
                    format!("{name} {client}")
                },
            ),
        );
        let host = Generation {
            graceful: graceful.clone(),
            moves: Mutex::new(Some(moves)),
        };
        let serve = Serve::new(listener, app, host)
            .handshake(ProxyProtocol)
            .handshake_info(|proxied: &Proxied| ConnectInfo(proxied.client));
        (addr, graceful, tokio::spawn(serve.into_future()))
    }

    /// One response, read whole (it has a `Content-Length`).
    async fn response(stream: &mut TcpStream) -> String {
        let mut bytes = Vec::new();
        loop {
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&bytes));
            bytes.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            if body.len() == length {
                return text;
            }
        }
    }

    #[tokio::test]
    async fn a_connection_given_up_is_served_on_with_what_its_handshake_learned_and_its_unread_bytes()
     {
        let (taken, incoming) = mpsc::unbounded_channel();
        let unread = Arc::new(Mutex::new(Vec::new()));
        let seen = unread.clone();
        let give_up: GiveUp = Arc::new(move |moved: Moved| {
            let taken = taken.clone();
            seen.lock().unwrap().push(moved.unread.clone());
            Box::pin(async move {
                match taken.send(moved) {
                    Ok(()) => Carried::Taken,
                    Err(back) => Carried::Refused(back.0),
                }
            })
        });
        let (old_addr, old, old_loop) = generation(
            "old",
            Moves {
                incoming: None,
                give_up: Some(give_up),
            },
        )
        .await;
        let (_, new, new_loop) = generation(
            "new",
            Moves {
                incoming: Some(incoming),
                give_up: None,
            },
        )
        .await;

        let mut stream = TcpStream::connect(old_addr).await.unwrap();
        // A request, and half the next head in the same write: read with
        // it, so in the old loop's buffer once the first is answered.
        stream
            .write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHo")
            .await
            .unwrap();
        let first = response(&mut stream).await;
        assert!(first.ends_with("old 203.0.113.7:51234"), "{first}");

        old.start_drain_giving_up();
        let report = old_loop.await.unwrap().unwrap();
        assert_eq!(
            (report.connections_handed_over, report.connections_finished),
            (1, 0)
        );
        assert_eq!(
            *unread.lock().unwrap(),
            [Bytes::from_static(b"GET / HTTP/1.1\r\nHo")]
        );
        stream.write_all(b"st: x\r\n\r\n").await.unwrap();
        let second = response(&mut stream).await;
        assert!(second.ends_with("new 203.0.113.7:51234"), "{second}");
        assert!(!second.contains("connection: close"), "{second}");

        drop(stream);
        new.start_drain();
        let report = new_loop.await.unwrap().unwrap();
        assert_eq!(report.connections_finished, 1);
    }
}
