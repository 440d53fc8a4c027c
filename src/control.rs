//! The control socket: ask a running server to upgrade and hear how it
//! went, or ask how it is.
//!
//! `kill -HUP` is fire and forget: whoever sends it cannot tell an upgrade
//! that worked from one that failed. With
//! [`Builder::control_socket`](crate::Builder::control_socket), the server
//! listens on a Unix socket (mode 0600, handed to every next generation
//! like a listener, so its path stays valid across restarts), and answers
//! two requests:
//!
//! - `upgrade`: runs the same upgrade a signal would, waits for its outcome
//!   and answers with the new generation's pid and how long it took, or
//!   with why it failed;
//! - `status`: this generation's pid and number, when it started, the
//!   requests in flight and connections open, whether it drains, and how
//!   the last upgrade went.
//!
//! [`upgrade`] and [`status`] ask from Rust; the `handover` command-line
//! tool shipped with the crate asks from a shell (`handover upgrade PATH`
//! exits 0 only once the new generation serves), as does anything that
//! can write a line to a Unix socket:
//!
//! ```text
//! $ echo status | socat - UNIX-CONNECT:/run/app/control.sock
//! result=ok
//! pid=4242
//! generation=3
//! …
//! ```
//!
//! # The protocol
//!
//! One request per connection: a line (`upgrade` or `status`, at most 256
//! bytes, within 5 seconds). The answer is `key=value` lines, the first
//! one `result=ok` or `result=error`, and the connection is closed after
//! it. An error carries `reason=` (a short fixed name: see
//! [`Error::reason`]) and `message=` (the server's words). Values never
//! contain a newline. Times are given twice: `…_at=` in RFC 3339 (UTC) and
//! `…_unix=` in seconds since the epoch.
//!
//! | request | keys of `result=ok` |
//! |---|---|
//! | `upgrade` | `pid` (the new generation's), `previous_pid`, `generation`, `took_ms` |
//! | `status` | `pid`, `generation`, `started_at`, `started_unix`, `in_flight`, `connections`, `upgraded`, `draining` (`true`/`false`), `last_upgrade` (`none`, `ok` or the failure's reason), and if there was one `last_upgrade_at`, `last_upgrade_unix`, then `last_upgrade_pid` or `last_upgrade_message` |
//!
//! Only a peer with the server's own uid, or root, is answered
//! (`SO_PEERCRED`); anyone else gets `reason=refused`, and the refusal is
//! logged. At most 16 control connections are served at once (more get
//! `reason=busy`); a request that is too long, malformed or late gets
//! `reason=bad_request`. A second `upgrade` while one runs gets
//! `reason=in_progress`, as a second signal is refused.

use std::fmt;
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::task::TaskTracker;

use crate::error::Error;

/// The name the control socket is handed to the next generation under.
pub(crate) const CONTROL_NAME: &str = "handover-control";
/// The longest request line.
const MAX_REQUEST: usize = 256;
/// How long a peer has to send its request, and a reply to be written.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The most control connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// The longest reply a client reads.
const MAX_REPLY: u64 = 64 * 1024;

/// A new generation, as an `upgrade` request reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Upgraded {
    /// The new generation's pid.
    pub pid: u32,
    /// The pid of the generation that started it (and now drains).
    pub previous_pid: u32,
    /// The new generation's number.
    pub generation: u64,
    /// From the request to the new generation being ready.
    pub took: Duration,
}

/// How a server is, as a `status` request reports it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Status {
    /// The pid of the generation that answered.
    pub pid: u32,
    /// Its number: 1 for a fresh start, one more after each upgrade.
    pub generation: u64,
    /// When it started.
    pub started_at: SystemTime,
    /// Requests in flight.
    pub in_flight: usize,
    /// Connections open.
    pub connections: usize,
    /// Upgraded connections (WebSockets) open.
    pub upgraded: usize,
    /// Whether it drains (it has handed over, or is shutting down).
    pub draining: bool,
    /// How its last upgrade went, if it tried one.
    pub last_upgrade: Option<LastUpgrade>,
}

/// How a generation's last upgrade went.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LastUpgrade {
    /// The new generation (`pid`) became ready.
    Succeeded {
        /// Its pid.
        pid: u32,
        /// When the upgrade started.
        at: SystemTime,
    },
    /// It failed; this generation served on.
    Failed {
        /// Why, by name (see [`Error::reason`]).
        reason: String,
        /// The error, in words.
        message: String,
        /// When the upgrade started.
        at: SystemTime,
    },
}

/// Asks the server listening on the control socket at `path` to upgrade,
/// and waits (at most `timeout`) for the outcome: the new generation, once
/// it is ready.
///
/// Blocking; from async code, call it in `spawn_blocking`.
///
/// # Errors
///
/// The socket cannot be reached ([`Error::Io`]), the server refused the
/// request or the upgrade failed ([`Error::Control`], with the server's
/// reason and message), or no answer came in time.
pub fn upgrade(path: impl AsRef<Path>, timeout: Duration) -> Result<Upgraded, Error> {
    let reply = request(path.as_ref(), "upgrade", timeout)?;
    Ok(Upgraded {
        pid: reply.number("pid")?,
        previous_pid: reply.number("previous_pid")?,
        generation: reply.number("generation")?,
        took: Duration::from_secs_f64(reply.number::<f64>("took_ms")?.max(0.0) / 1e3),
    })
}

/// Asks the server listening on the control socket at `path` how it is
/// (answered at once; `timeout` bounds the wait).
///
/// # Errors
///
/// As for [`upgrade`].
pub fn status(path: impl AsRef<Path>, timeout: Duration) -> Result<Status, Error> {
    let reply = request(path.as_ref(), "status", timeout)?;
    let last_upgrade = match reply.text("last_upgrade")? {
        "none" => None,
        outcome => {
            let at = unix_time(reply.number("last_upgrade_unix")?);
            Some(if outcome == "ok" {
                LastUpgrade::Succeeded {
                    pid: reply.number("last_upgrade_pid")?,
                    at,
                }
            } else {
                LastUpgrade::Failed {
                    reason: outcome.to_owned(),
                    message: reply.text("last_upgrade_message")?.to_owned(),
                    at,
                }
            })
        }
    };
    Ok(Status {
        pid: reply.number("pid")?,
        generation: reply.number("generation")?,
        started_at: unix_time(reply.number("started_unix")?),
        in_flight: reply.number("in_flight")?,
        connections: reply.number("connections")?,
        upgraded: reply.number("upgraded")?,
        draining: reply.number("draining")?,
        last_upgrade,
    })
}

/// Sends `command` and reads the reply, which must say `result=ok`.
fn request(path: &Path, command: &str, timeout: Duration) -> Result<Reply, Error> {
    let context = || format!("asking the server at {} to {command}", path.display());
    let mut stream = UnixStream::connect(path).map_err(|e| Error::io(context(), e))?;
    let timeout = timeout.max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| Error::io(context(), e))?;
    // A server that refuses the peer answers before it reads the request,
    // and may have closed its end already: its answer is still there.
    let sent = stream.write_all(format!("{command}\n").as_bytes());
    let mut text = String::new();
    stream
        .take(MAX_REPLY)
        .read_to_string(&mut text)
        .map_err(|e| {
            let e = if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                )
            } else {
                e
            };
            Error::io(context(), e)
        })?;
    if let Err(e) = sent
        && text.is_empty()
    {
        return Err(Error::io(context(), e));
    }
    let reply = Reply::parse(&text);
    match reply.get("result").map_err(|e| Error::io(context(), e))? {
        "ok" => Ok(reply),
        _ => Err(Error::Control {
            reason: reply.get("reason").unwrap_or("unknown").to_owned(),
            message: reply.get("message").unwrap_or("").to_owned(),
        }),
    }
}

fn unix_time(seconds: f64) -> SystemTime {
    UNIX_EPOCH + Duration::try_from_secs_f64(seconds).unwrap_or_default()
}

/// A reply's `key=value` lines.
struct Reply(Vec<(String, String)>);

impl Reply {
    fn parse(text: &str) -> Self {
        Reply(
            text.lines()
                .filter_map(|line| line.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> io::Result<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the reply has no {key}="),
                )
            })
    }

    fn text(&self, key: &str) -> Result<&str, Error> {
        self.get(key)
            .map_err(|e| Error::io("reading the control socket's reply", e))
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<T, Error> {
        let value = self.text(key)?;
        value.parse().map_err(|_| {
            Error::io(
                "reading the control socket's reply",
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{key}={value:?} is not what it should be"),
                ),
            )
        })
    }
}

/// An answer: `key=value` lines.
#[derive(Default)]
pub(crate) struct Answer(String);

impl Answer {
    fn ok() -> Self {
        let mut answer = Answer::default();
        answer.add("result", "ok");
        answer
    }

    fn error(reason: &str, message: impl fmt::Display) -> Self {
        let mut answer = Answer::default();
        answer.add("result", "error");
        answer.add("reason", reason);
        answer.add("message", message);
        answer
    }

    fn add(&mut self, key: &str, value: impl fmt::Display) {
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
                log!(warn, error = %e, "control socket: accept failed");
                // EMFILE and the like: let it pass.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tasks.spawn(async move {
                let answer = Answer::error(
                    "busy",
                    format!("{MAX_CONNECTIONS} control connections are open; try again"),
                );
                finish(stream, &answer).await;
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
                "control socket: refused a peer that runs as another user"
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

    #[test]
    fn an_answer_is_lines_of_key_and_value_that_a_client_reads_back() {
        let mut answer = Answer::error("child_exited", "exited\nwith 1");
        answer.add("extra", 3);
        assert_eq!(
            answer.0,
            "result=error\nreason=child_exited\nmessage=exited with 1\nextra=3\n"
        );
        let reply = Reply::parse(&answer.0);
        assert_eq!(reply.get("reason").unwrap(), "child_exited");
        assert_eq!(reply.number::<u32>("extra").unwrap(), 3);
        assert!(reply.get("missing").is_err());
        assert!(reply.number::<u32>("message").is_err());
    }
}
