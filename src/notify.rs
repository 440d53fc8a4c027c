//! Telling the outside world: the pid file and systemd's `sd_notify`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::inherit::env::NOTIFY_SOCKET;

/// Writes our pid to `path` atomically: a temporary file in the same
/// directory, then a rename over `path`.
///
/// The temporary file is created afresh (`O_EXCL`) and never through a
/// link (`O_NOFOLLOW`): a link or a file planted at its name, in a
/// directory others can write, makes this try another name rather than
/// write where the link points or into a file someone else owns. Still,
/// keep the pid file in a directory only the server's user can write
/// (`/run/<app>`, `$XDG_RUNTIME_DIR`): in one that anyone can write, such
/// as `/tmp`, someone who creates the file first owns it, and the rename
/// over it fails.
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
/// It is opened only if it is a regular file, without following a link
/// and without blocking (a FIFO planted there holds nothing up).
pub(crate) fn write_pid_file(path: &Path) -> Result<(), Error> {
    let pid = std::process::id();
    let replaced = open_regular(path).ok();
    let written = create_temp(path, pid)
        .and_then(|(tmp, mut file)| {
            let written = writeln!(file, "{pid}").and_then(|()| std::fs::rename(&tmp, path));
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written
        })
        .map_err(|e| Error::io(format!("writing pid file {}", path.display()), e));
    if let Some(replaced) = replaced {
        // If the thread cannot start, the file is closed here instead.
        let _ = std::thread::Builder::new()
            .name("handover-pidfile".into())
            .spawn(move || drop(replaced));
    }
    written
}

/// Opens `path` for reading if it is a regular file: not through a link,
/// and without blocking on a FIFO.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Creates a new file beside `path`, named after it and `pid`, exclusively
/// and not through a link; tries a few names if one is taken.
fn create_temp(path: &Path, pid: u32) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = None;
    for attempt in 0..8u32 {
        let tmp = temp_path(path, pid, attempt);
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp);
        match created {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()))
}

/// `<path>.<pid>.tmp`, then `<path>.<pid>.<n>-<nanos>.tmp`.
fn temp_path(path: &Path, pid: u32, attempt: u32) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    if attempt == 0 {
        name.push(format!(".{pid}.tmp"));
    } else {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        name.push(format!(".{pid}.{attempt}-{nanos}.tmp"));
    }
    path.with_file_name(name)
}

/// Removes the pid file if it still holds our pid; a newer generation's
/// is left in place, even one written while this runs.
///
/// The file is first renamed aside (atomically: a new generation's rename
/// over `path` then either came before, and is what was moved, or comes
/// after, and stays), read there, and removed if it was ours; if it was
/// not, it is linked back, unless a newer one has taken its place since.
pub(crate) fn remove_pid_file_if_ours(path: &Path) -> Result<bool, Error> {
    let context = |what: &str| format!("{what} pid file {}", path.display());
    let pid = std::process::id();
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{pid}.removing"));
    let aside = path.with_file_name(name);
    match std::fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(context("moving aside"), e)),
    }
    let ours = open_regular(&aside)
        .and_then(|file| {
            let mut content = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(file, 64), &mut content)?;
            Ok(content.trim().parse::<u32>().ok() == Some(pid))
        })
        .unwrap_or(false);
    if !ours {
        // Another's: back where it was, unless a newer one is there now.
        match std::fs::hard_link(&aside, path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                let _ = std::fs::rename(&aside, path);
                return Err(Error::io(context("putting back"), e));
            }
        }
    }
    std::fs::remove_file(&aside).map_err(|e| Error::io(context("removing"), e))?;
    Ok(ours)
}

/// Sends `state` (such as `READY=1`) to systemd when `NOTIFY_SOCKET` is
/// set; does nothing otherwise.
pub(crate) fn sd_notify(state: &str) -> Result<(), Error> {
    let Some(socket) = crate::inherit::env::notify_socket() else {
        return Ok(());
    };
    let context = || format!("notifying systemd at {NOTIFY_SOCKET}={socket:?}");
    let dgram = std::os::unix::net::UnixDatagram::unbound().map_err(|e| Error::io(context(), e))?;
    let bytes = socket.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        send_abstract(&dgram, name, state)
    } else {
        dgram.send_to(state.as_bytes(), Path::new(socket))
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
        assert!(!temp_path(&path, std::process::id(), 0).exists());
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

    /// A link planted at the temporary file's name (in a directory others
    /// can write, the next pid is easy to guess) is not followed, and a
    /// FIFO planted at the pid file's own path does not block.
    #[test]
    fn planted_links_and_fifos_neither_redirect_nor_block_the_pid_file() {
        let dir = std::env::temp_dir().join(format!("handover-pid-planted-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.pid");
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let tmp = temp_path(&path, std::process::id(), 0);
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        crate::sys::make_fifo(&path).unwrap();

        let (done, wait) = std::sync::mpsc::channel();
        let writing = path.clone();
        std::thread::spawn(move || done.send(write_pid_file(&writing)).unwrap());
        let written = wait
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a FIFO at the path does not block the write");
        written.unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        // The link is left alone, and so is what it points to.
        assert!(
            std::fs::symlink_metadata(&tmp)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Removal moves the file aside first: one that another generation
    /// wrote is put back, and not removed.
    #[test]
    fn removal_leaves_another_generations_pid_file_in_place() {
        let dir = std::env::temp_dir().join(format!("handover-pid-other-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.pid");
        std::fs::write(&path, "999999999\n").unwrap();
        assert!(!remove_pid_file_if_ours(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "999999999\n");
        // Nothing left beside it.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert!(!remove_pid_file_if_ours(&dir.join("missing.pid")).unwrap());
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
