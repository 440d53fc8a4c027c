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
//! [`Error::reason`](crate::Error::reason)) and `message=` (the server's words). Values never
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

mod client;
mod server;

use std::time::{Duration, SystemTime};

pub use client::{status, upgrade};
pub(crate) use server::{Controls, serve};

/// The name the control socket is handed to the next generation under.
pub(crate) const CONTROL_NAME: &str = "handover-control";

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
        /// Why, by name (see [`Error::reason`](crate::Error::reason)).
        reason: String,
        /// The error, in words.
        message: String,
        /// When the upgrade started.
        at: SystemTime,
    },
}

#[cfg(test)]
mod tests {
    use super::client::Reply;
    use super::server::Answer;

    /// A server (or what answers at the path) that says `took_ms=inf`, or
    /// another number that is no duration, gets an error, not a panic.
    #[test]
    fn an_answer_whose_numbers_are_not_durations_is_an_error() {
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("handover-took-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let answering = std::thread::spawn(move || {
            for took in ["inf", "-5", "NaN", "1e400"] {
                let (mut stream, _) = listener.accept().unwrap();
                let mut request = [0u8; 8];
                let _ = stream.read(&mut request).unwrap();
                let answer =
                    format!("result=ok\npid=2\nprevious_pid=1\ngeneration=2\ntook_ms={took}\n");
                stream.write_all(answer.as_bytes()).unwrap();
            }
        });
        for took in ["inf", "-5", "NaN", "1e400"] {
            let err = super::upgrade(&path, std::time::Duration::from_secs(10))
                .unwrap_err()
                .to_string();
            assert!(err.contains("took_ms="), "{took}: {err}");
        }
        answering.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
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
