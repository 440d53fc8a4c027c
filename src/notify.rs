//! Telling the outside world: the pid file and systemd's `sd_notify`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::inherit::env::NOTIFY_SOCKET;

/// Writes our pid to `path` atomically: a temporary file in the same
/// directory, then a rename over `path`.
///
/// Not flushed to disk: a pid file means nothing after a reboot (it
/// usually lives on a tmpfs such as `/run`), and an `fsync` here would
/// delay, by as long as the disk takes, the moment this generation starts
/// accepting, while the previous one has already stopped.
///
/// For the same reason the file being replaced is kept open across the
/// rename and closed on a thread of its own: when the rename drops its last
/// link, the file system frees its blocks there and then, and on ext4
/// mounted with `discard` that waits for the disk (1-2 ms measured here).
pub(crate) fn write_pid_file(path: &Path) -> Result<(), Error> {
    let pid = std::process::id();
    let tmp = temp_path(path, pid);
    let replaced = std::fs::File::open(path).ok();
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        writeln!(file, "{pid}")?;
        std::fs::rename(&tmp, path)
    };
    let written = write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(format!("writing pid file {}", path.display()), e)
    });
    if let Some(replaced) = replaced {
        // If the thread cannot start, the file is closed here instead.
        let _ = std::thread::Builder::new()
            .name("handover-pidfile".into())
            .spawn(move || drop(replaced));
    }
    written
}

fn temp_path(path: &Path, pid: u32) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{pid}.tmp"));
    path.with_file_name(name)
}

/// Removes the pid file if it still holds our pid (a newer generation may
/// have written its own).
pub(crate) fn remove_pid_file_if_ours(path: &Path) -> Result<bool, Error> {
    let ours = match std::fs::read_to_string(path) {
        Ok(content) => content.trim().parse::<u32>().ok() == Some(std::process::id()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(format!("reading pid file {}", path.display()), e)),
    };
    if ours {
        std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing pid file {}", path.display()), e))?;
    }
    Ok(ours)
}

/// Sends `state` (such as `READY=1`) to systemd when `NOTIFY_SOCKET` is
/// set; does nothing otherwise.
pub(crate) fn sd_notify(state: &str) -> Result<(), Error> {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(());
    };
    let context = || format!("notifying systemd at {NOTIFY_SOCKET}={socket:?}");
    let dgram = std::os::unix::net::UnixDatagram::unbound().map_err(|e| Error::io(context(), e))?;
    let bytes = socket.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        send_abstract(&dgram, name, state)
    } else {
        dgram.send_to(state.as_bytes(), Path::new(&socket))
    };
    sent.map(drop).map_err(|e| Error::io(context(), e))
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(
    dgram: &std::os::unix::net::UnixDatagram,
    name: &[u8],
    state: &str,
) -> std::io::Result<usize> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    dgram.send_to_addr(state.as_bytes(), &addr)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(
    _dgram: &std::os::unix::net::UnixDatagram,
    _name: &[u8],
    _state: &str,
) -> std::io::Result<usize> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract socket addresses exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_is_written_whole_and_removed_only_while_ours() {
        let dir = std::env::temp_dir().join(format!("handover-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.pid");
        write_pid_file(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        assert!(!temp_path(&path, std::process::id()).exists());
        // A newer generation wrote its pid: ours must leave it alone.
        std::fs::write(&path, "999999999\n").unwrap();
        assert!(!remove_pid_file_if_ours(&path).unwrap());
        assert!(path.exists());
        // Replacing it (the replaced file is closed on another thread).
        write_pid_file(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        assert!(remove_pid_file_if_ours(&path).unwrap());
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pid_file_in_a_missing_directory_is_a_clear_error() {
        let err = write_pid_file(Path::new("/nonexistent-handover-dir/app.pid")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("writing pid file /nonexistent-handover-dir/app.pid:"),
            "{err}"
        );
    }
}
