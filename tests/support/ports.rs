//! TCP ports a test can name before anything listens on them (for
//! `systemd-socket-activate --listen`, or a server started at a fixed
//! address), and that stay free until the test is done with them.
//!
//! A port taken from `bind(127.0.0.1:0)` and let go is free only until the
//! next `bind(:0)` of any process, the tests running in parallel among
//! them. These come from outside the kernel's range for `bind(:0)`
//! (`ip_local_port_range`), so no such bind takes them, and each is held by
//! a lock file that every test process respects, so no two tests get the
//! same one.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::proc::is_alive;

/// A port of this test's own, until dropped.
#[derive(Debug)]
pub struct Port {
    pub port: u16,
    lock: PathBuf,
}

impl Port {
    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// Where the locks are: one file per port held, holding its holder's pid.
fn lock_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("handover-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The ports `bind(:0)` never hands out: those below the kernel's
/// ephemeral range, from 20000 (clear of the well-known ones and of what
/// services on a developer's machine tend to use).
fn candidates() -> std::ops::Range<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_else(|_| "32768 60999".into());
    let low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|low| low.parse().ok())
        .unwrap_or(32768);
    assert!(
        low > 21000,
        "the ephemeral port range starts at {low}: no room below it for the tests' ports"
    );
    20000..low
}

/// A free TCP port on 127.0.0.1, this test's alone until the `Port` is
/// dropped.
pub fn reserve() -> Port {
    let range = candidates();
    let span = u32::from(range.end - range.start);
    let dir = lock_dir();
    // Start where this process's pid points, so that parallel tests rarely
    // try the same ports.
    let start = std::process::id().wrapping_mul(7919) % span;
    for i in 0..span {
        let port = range.start + ((start + i) % span) as u16;
        let lock = dir.join(port.to_string());
        let claimed = OpenOptions::new().write(true).create_new(true).open(&lock);
        let mut file = match claimed {
            Ok(file) => file,
            Err(_) => {
                // Held, or left by a test that died: take the latter's.
                let holder = std::fs::read_to_string(&lock)
                    .ok()
                    .and_then(|pid| pid.trim().parse::<u32>().ok());
                if holder.is_some_and(is_alive) || holder.is_none() {
                    continue;
                }
                let _ = std::fs::remove_file(&lock);
                match OpenOptions::new().write(true).create_new(true).open(&lock) {
                    Ok(file) => file,
                    Err(_) => continue,
                }
            }
        };
        write!(file, "{}", std::process::id()).unwrap();
        drop(file);
        // Nothing outside the tests listens there either.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Port { port, lock };
        }
        let _ = std::fs::remove_file(&lock);
    }
    panic!("no free port in {:?}", candidates());
}
