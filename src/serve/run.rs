//! The accept loop: each connection in a task of its own, until the drain.

use std::ops::ControlFlow;
use std::pin::pin;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;

use super::accept::{BACKOFF_MAX, BACKOFF_MIN, accept_now, is_connection_error};
use super::connection::{ConnSettings, serve_connection};
use super::presized::Presized;
use super::watchdog::Watched;
use super::{Accept, Handshake, Host, HttpService, Serve, handshake, info};

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
    if let ControlFlow::Break(output) = host.start() {
        return output;
    }
    let graceful = host.graceful().clone();
    let mut builder = Builder::new(TokioExecutor::new());
    // Internal: hyper's own header read timeout arms a timer for every
    // request; the watchdog does its work for all of them. The timer stays
    // set, so that a `header_read_timeout` set through `http_builder`
    // works as in hyper.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    // Extended CONNECT (RFC 8441): WebSockets over HTTP/2, as
    // `axum::serve` offers them.
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol();
    for configure in options.configure {
        configure(&mut builder);
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
    let settings = Arc::new(ConnSettings {
        builder,
        idle_grace: options.idle_grace,
        watched,
        presized: presized.map(Arc::new),
    });
    // With metrics, the gauges of what is open, once a second.
    #[cfg(feature = "metrics")]
    let gauges = {
        let graceful = graceful.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                every.tick().await;
                sample_gauges(&graceful);
            }
        }))
    };
    let (tcp_nodelay, handshake_timeout) = (options.tcp_nodelay, options.handshake_timeout);
    // Each accepted connection runs in a task of its own.
    let counting = graceful.clone();
    let start = move |io: L::Io, peer: L::Addr| {
        if let Err(e) = L::set_nodelay(&io, tcp_nodelay) {
            log!(debug, error = %e, ?peer, "could not set TCP_NODELAY");
        }
        // Counted from now: a drain waits for the handshake too.
        let graceful = &counting;
        let token = graceful.connection_token();
        let handshake = handshake.clone();
        let service = service.clone();
        let settings = settings.clone();
        let graceful = graceful.clone();
        let connect_info = connect_info.clone();
        let handshake_info = handshake_info.clone();
        // In the connection's task, not here: the application's closures
        // cannot stall or end the accept loop.
        tokio::spawn(async move {
            let extend = connect_info.map(|make| make(&io, &peer));
            let shaking = handshake.handshake(io);
            let idle_grace = settings.idle_grace;
            let Some(io) =
                handshake::within(shaking, &graceful, handshake_timeout, idle_grace).await
            else {
                return;
            };
            let extend = info::both(extend, handshake_info.map(|make| make(&io)));
            serve_connection(io, service, extend, &settings, graceful, token).await;
        });
    };

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
                start(io, peer);
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
                Ok((io, peer)) => start(io, peer),
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
    host.finish(Ok(report)).await
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
