//! Asking a server on its control socket: [`upgrade`] and [`status`].

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{LastUpgrade, Status, Upgraded};
use crate::error::Error;

/// The longest reply a client reads.
const MAX_REPLY: u64 = 64 * 1024;

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
        took: duration_ms(&reply, "took_ms")?,
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
    // Believed only if the server runs as this user or as root: in a
    // directory others can write, whoever binds the path while the server
    // is down could answer `result=ok`.
    trusted(&stream).map_err(|e| Error::io(context(), e))?;
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

/// Checks that the process that bound the socket at the other end of
/// `stream` runs as this process's user, or as root.
fn trusted(stream: &UnixStream) -> io::Result<()> {
    use std::os::fd::AsFd;
    let ours = crate::sys::effective_uid();
    let theirs = crate::sys::peer_uid(stream.as_fd())?;
    if theirs == ours || theirs == 0 {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "the server runs as uid {theirs}, neither this user (uid {ours}) nor root: not believed"
        ),
    ))
}

/// The `key` of a reply, in milliseconds: a finite, non-negative number.
fn duration_ms(reply: &Reply, key: &str) -> Result<Duration, Error> {
    let ms: f64 = reply.number(key)?;
    Duration::try_from_secs_f64(ms / 1e3).map_err(|_| {
        Error::io(
            "reading the control socket's reply",
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{key}={ms} is not a duration"),
            ),
        )
    })
}

fn unix_time(seconds: f64) -> SystemTime {
    UNIX_EPOCH + Duration::try_from_secs_f64(seconds).unwrap_or_default()
}

/// A reply's `key=value` lines.
pub(super) struct Reply(Vec<(String, String)>);

impl Reply {
    pub(super) fn parse(text: &str) -> Self {
        Reply(
            text.lines()
                .filter_map(|line| line.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    pub(super) fn get(&self, key: &str) -> io::Result<&str> {
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

    pub(super) fn number<T: std::str::FromStr>(&self, key: &str) -> Result<T, Error> {
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
