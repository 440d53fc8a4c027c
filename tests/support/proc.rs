//! What `/proc` says of processes, and signals sent to them by pid.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// One process as `/proc/PID/stat` has it.
struct Stat {
    pid: u32,
    /// `R`, `S`, `Z`, …
    state: char,
    ppid: u32,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...
    let mut fields = text.rsplit(')').next()?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(Stat { pid, state, ppid })
}

fn all() -> Vec<Stat> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .collect()
}

/// Whether `pid` is a live process: it exists and has not exited (a zombie,
/// or one being torn down, has).
pub fn is_alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| !matches!(s.state, 'Z' | 'X' | 'x'))
}

/// Whether `pid` is gone for good: exited and reaped, so that `/proc` no
/// longer has it (a zombie is not gone).
pub fn is_reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Live processes running a binary from `dir`.
pub fn processes_from(dir: &Path) -> Vec<u32> {
    all()
        .into_iter()
        .filter(|s| !matches!(s.state, 'Z' | 'X' | 'x'))
        .filter(|s| {
            std::fs::read_link(format!("/proc/{}/exe", s.pid)).is_ok_and(|exe| exe.starts_with(dir))
        })
        .map(|s| s.pid)
        .collect()
}

/// Live children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    all()
        .into_iter()
        .filter(|s| s.ppid == pid && !matches!(s.state, 'Z' | 'X' | 'x'))
        .map(|s| s.pid)
        .collect()
}

/// Children of `pid` that have exited and not been reaped.
pub fn zombies_of(pid: u32) -> Vec<u32> {
    all()
        .into_iter()
        .filter(|s| s.ppid == pid && s.state == 'Z')
        .map(|s| s.pid)
        .collect()
}

/// Every child of `pid` that `/proc` still has: alive, or exited and not
/// yet reaped.
pub fn unreaped_children_of(pid: u32) -> Vec<u32> {
    all()
        .into_iter()
        .filter(|s| s.ppid == pid)
        .map(|s| s.pid)
        .collect()
}

/// The numbers on the line `field:` of `/proc/PID/status`.
fn status_numbers(pid: u32, field: &str) -> Vec<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap();
    line.split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// Resident memory of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_numbers(pid, "VmRSS")[0]
}

/// The pid `pid` has in its own (innermost) pid namespace.
pub fn namespace_pid(pid: u32) -> u32 {
    let pids = status_numbers(pid, "NSpid");
    u32::try_from(*pids.last().unwrap()).unwrap()
}

/// The socket of a TCP connection, as `/proc/net/tcp` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub inode: u64,
    /// Bytes received and not read yet by whoever owns the socket.
    pub rx_queue: u64,
}

/// The socket whose local address is `local` and whose peer is `remote`
/// (the server's end of a client's connection: `local` the server's
/// address, `remote` the client's), from `/proc/net/tcp` or `tcp6`.
pub fn tcp_socket(local: SocketAddr, remote: SocketAddr) -> Option<TcpSocket> {
    fn hex(addr: SocketAddr) -> String {
        match addr {
            SocketAddr::V4(v4) => format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(v4.ip().octets()),
                v4.port()
            ),
            SocketAddr::V6(v6) => {
                let words: String = v6
                    .ip()
                    .octets()
                    .chunks(4)
                    .map(|w| format!("{:08X}", u32::from_le_bytes(w.try_into().unwrap())))
                    .collect();
                format!("{words}:{:04X}", v6.port())
            }
        }
    }
    let table = if local.is_ipv4() { "tcp" } else { "tcp6" };
    let text = std::fs::read_to_string(format!("/proc/net/{table}")).unwrap();
    let (local, remote) = (hex(local), hex(remote));
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (_, rx) = fields.get(4)?.split_once(':')?;
        Some(TcpSocket {
            inode: fields.get(9)?.parse().ok()?,
            rx_queue: u64::from_str_radix(rx, 16).ok()?,
        })
    })
}

/// Whether `pid` has the socket of inode `inode` open.
pub fn holds_socket(pid: u32, inode: u64) -> bool {
    let wanted = format!("socket:[{inode}]");
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == wanted.as_str())
    })
}

/// How many fds `pid` has open.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Waits (5 s at most) until `pid` has `expected` fds open, as generation
/// `generations` after the one that had them: the pid file a generation
/// replaces is closed on a short-lived thread of its own, so this allows it
/// a moment; a leak never settles.
pub async fn assert_fds_settle(pid: u32, expected: usize, generations: usize) {
    let settled = async {
        while fd_count(pid) != expected {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), settled)
            .await
            .is_ok(),
        "no fd leaks across {generations} hand-overs: {} fds, the first generation had {expected}",
        fd_count(pid)
    );
}

/// Sends the signal named `name` (`HUP`, `TERM`, `KILL`, …) to `pid`.
pub fn send_signal(pid: u32, name: &str) {
    let signal = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "TERM" => libc::SIGTERM,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "USR2" => libc::SIGUSR2,
        other => panic!("no signal named {other}"),
    };
    let target = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: `kill` takes two integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let sent = unsafe { libc::kill(target, signal) };
    assert_eq!(
        sent,
        0,
        "kill -{name} {pid}: {}",
        std::io::Error::last_os_error()
    );
}

/// SIGKILL, by pid, to every live process running a binary from `dir`.
pub fn kill_processes_from(dir: &Path) {
    for pid in processes_from(dir) {
        let target = libc::pid_t::try_from(pid).unwrap();
        // SAFETY: as in `send_signal`.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(target, libc::SIGKILL);
        }
    }
}
