//! Answering on the control socket.

use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::task::TaskTracker;

use super::{LastUpgrade, Status, Upgraded};
use crate::error::Error;

/// The longest request line.
const MAX_REQUEST: usize = 256;
/// How long a peer has to send its request, and a reply to be written.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The most control connections served at once.
const MAX_CONNECTIONS: usize = 16;

/// An answer: `key=value` lines.
#[derive(Default)]
pub(crate) struct Answer(pub(super) String);

impl Answer {
    fn ok() -> Self {
        let mut answer = Answer::default();
        answer.add("result", "ok");
        answer
    }

    pub(super) fn error(reason: &str, message: impl fmt::Display) -> Self {
        let mut answer = Answer::default();
        answer.add("result", "error");
        answer.add("reason", reason);
        answer.add("message", message);
        answer
    }

    pub(super) fn add(&mut self, key: &str, value: impl fmt::Display) {
        use fmt::Write as _;
        let value = value.to_string().replace(['\n', '\r'], " ");
        let _ = writeln!(self.0, "{key}={value}");
    }

    fn time(&mut self, key: &str, at: SystemTime) {
        let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.add(&format!("{key}_at"), rfc3339(since));
        self.add(
            &format!("{key}_unix"),
            format_args!("{:.3}", since.as_secs_f64()),
        );
    }
}

/// `since` the epoch as an RFC 3339 time in UTC, to the second.
fn rfc3339(since: Duration) -> String {
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3_600,
        rest / 60 % 60,
        rest % 60
    )
}

/// An upgrade under way, as the server side runs it.
pub(crate) type Upgrading = Pin<Box<dyn Future<Output = Result<Upgraded, Error>> + Send>>;

/// What the server side answers with: the crate's `Handover` gives these.
pub(crate) struct Controls {
    /// Runs an upgrade; resolves to the new generation, or the error.
    pub(crate) upgrade: Box<dyn Fn() -> Upgrading + Send + Sync>,
    /// The status, now.
    pub(crate) status: Box<dyn Fn() -> Status + Send + Sync>,
}

/// Answers on `listener` until `stop` resolves, each connection in a task
/// of `tasks`; connections already accepted then still get their answer.
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    controls: Arc<Controls>,
    stop: impl Future<Output = ()>,
    tasks: TaskTracker,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let busy = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let ours = crate::sys::effective_uid();
    let mut stop = pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                log!(warn, error = %e, "accept failed");
                // EMFILE and the like: let it pass.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Told why, as long as few are being told; past that, closed
            // at once: a flood costs a bounded number of tasks.
            let Ok(telling) = busy.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            tasks.spawn(async move {
                let answer = Answer::error(
                    "busy",
                    format!("{MAX_CONNECTIONS} control connections are open; try again"),
                );
                finish(stream, &answer).await;
                drop(telling);
            });
            continue;
        };
        let controls = controls.clone();
        tasks.spawn(async move {
            let answer = answer(&mut stream, &controls, ours).await;
            finish(stream, &answer).await;
            drop(slot);
        });
    }
}

/// Writes `answer` and closes the connection. What the peer sent and was
/// not read (a refused peer's request, the rest of an oversized one) is
/// read first, briefly: a Unix socket closed with unread data resets the
/// connection, and the peer would lose the answer.
async fn finish(mut stream: tokio::net::UnixStream, answer: &Answer) {
    let _ = tokio::time::timeout(IO_TIMEOUT, stream.write_all(answer.0.as_bytes())).await;
    let _ = stream.shutdown().await;
    let mut rest = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_millis(100), async {
        let mut left: usize = 16 * 1024;
        while left > 0 {
            match stream.read(&mut rest).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Reads one request from `stream`, whose peer must run as `ours` (or
/// root), and answers it.
async fn answer(stream: &mut tokio::net::UnixStream, controls: &Controls, ours: u32) -> Answer {
    match stream.peer_cred() {
        Ok(peer) if peer.uid() == ours || peer.uid() == 0 => {}
        Ok(peer) => {
            log!(
                warn,
                peer_uid = peer.uid(),
                peer_pid = ?peer.pid(),
                "refused a peer that runs as another user"
            );
            return Answer::error(
                "refused",
                format!(
                    "uid {} may not use this socket: only uid {ours} and root may",
                    peer.uid()
                ),
            );
        }
        Err(e) => return Answer::error("refused", format!("the peer's credentials: {e}")),
    }
    let line = match tokio::time::timeout(IO_TIMEOUT, read_line(stream)).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => return Answer::error("bad_request", e),
        Err(_) => {
            return Answer::error(
                "bad_request",
                format!("no whole request line within {IO_TIMEOUT:?}"),
            );
        }
    };
    match line.trim() {
        "upgrade" => {
            log!(info, "upgrade requested on the control socket");
            match (controls.upgrade)().await {
                Ok(upgraded) => {
                    let mut answer = Answer::ok();
                    answer.add("pid", upgraded.pid);
                    answer.add("previous_pid", upgraded.previous_pid);
                    answer.add("generation", upgraded.generation);
                    answer.add(
                        "took_ms",
                        format_args!("{:.3}", upgraded.took.as_secs_f64() * 1e3),
                    );
                    answer
                }
                Err(e) => Answer::error(e.reason(), &e),
            }
        }
        "status" => {
            let status = (controls.status)();
            let mut answer = Answer::ok();
            answer.add("pid", status.pid);
            answer.add("generation", status.generation);
            answer.time("started", status.started_at);
            answer.add("in_flight", status.in_flight);
            answer.add("connections", status.connections);
            answer.add("upgraded", status.upgraded);
            answer.add("draining", status.draining);
            match &status.last_upgrade {
                None => answer.add("last_upgrade", "none"),
                Some(LastUpgrade::Succeeded { pid, at }) => {
                    answer.add("last_upgrade", "ok");
                    answer.time("last_upgrade", *at);
                    answer.add("last_upgrade_pid", pid);
                }
                Some(LastUpgrade::Failed {
                    reason,
                    message,
                    at,
                }) => {
                    answer.add("last_upgrade", reason);
                    answer.time("last_upgrade", *at);
                    answer.add("last_upgrade_message", message);
                }
            }
            answer
        }
        other => Answer::error(
            "bad_request",
            format!(
                "unknown request {:?}: say upgrade or status",
                other.chars().take(40).collect::<String>()
            ),
        ),
    }
}

/// One line of at most `MAX_REQUEST` bytes, without its newline.
async fn read_line(stream: &mut tokio::net::UnixStream) -> Result<String, String> {
    let mut line = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("the request ended without a newline".into());
        }
        if let Some(end) = buf[..n].iter().position(|b| *b == b'\n') {
            line.extend_from_slice(&buf[..end]);
            break;
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > MAX_REQUEST {
            return Err(format!("a request line is at most {MAX_REQUEST} bytes"));
        }
    }
    if line.len() > MAX_REQUEST {
        return Err(format!("a request line is at most {MAX_REQUEST} bytes"));
    }
    String::from_utf8(line).map_err(|_| "the request is not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_rfc_3339_in_utc() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(Duration::from_secs(1_764_979_200 + 3_723)),
            "2025-12-06T01:02:03Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
