//! [`HttpBuilder`]: hyper's HTTP/1 and HTTP/2 server settings, for
//! [`Serve::http_builder`](super::Serve::http_builder).

use std::fmt;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// hyper's HTTP/1 and HTTP/2 server builders, which every connection of a
/// serve loop is served with; [`Serve::http_builder`](super::Serve::http_builder)
/// adjusts them.
///
/// The loop tells the two protocols apart itself, by the HTTP/2 preface a
/// client with prior knowledge sends first (hyper-util's auto builder does
/// the same), so that it can give an idle HTTP/1 connection up to the next
/// generation, which the auto builder has no way to do.
pub struct HttpBuilder {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl HttpBuilder {
    /// hyper's defaults, and handover's own settings: tokio's timer for
    /// both protocols, no per-request header read timer (the serve loop's
    /// watchdog does that work), and extended CONNECT (WebSockets over
    /// HTTP/2), as `axum::serve` offers it.
    pub(super) fn new() -> Self {
        let mut http1 = http1::Builder::new();
        // Internal: hyper's own header read timeout arms a timer for every
        // request; the watchdog does its work for all of them. The timer
        // stays set, so that a `header_read_timeout` set through
        // `http_builder` works as in hyper.
        http1.timer(TokioTimer::new()).header_read_timeout(None);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new()).enable_connect_protocol();
        Self { http1, http2 }
    }

    /// The HTTP/1 settings (`max_buf_size`, `title_case_headers`,
    /// `header_read_timeout`, …).
    pub fn http1(&mut self) -> &mut http1::Builder {
        &mut self.http1
    }

    /// The HTTP/2 settings (`keep_alive_interval`, `max_concurrent_streams`,
    /// …).
    pub fn http2(&mut self) -> &mut http2::Builder<TokioExecutor> {
        &mut self.http2
    }

    pub(super) fn h1(&self) -> &http1::Builder {
        &self.http1
    }

    pub(super) fn h2(&self) -> &http2::Builder<TokioExecutor> {
        &self.http2
    }
}

impl fmt::Debug for HttpBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBuilder").finish_non_exhaustive()
    }
}
