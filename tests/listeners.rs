//! `Listeners` in process: binding, taking by name, Unix socket files.
#![allow(clippy::unwrap_used)]

mod support;

use support::tools;

use handover::Listeners;

fn temp_socket(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("handover-listeners-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("app.sock")
}

#[tokio::test]
async fn a_stale_unix_socket_is_replaced_and_a_live_one_is_an_error() {
    let path = temp_socket("stale");
    let first = Listeners::empty().unix("api", &path).unwrap();
    // A live listener owns the path: binding again must not steal it.
    let err = Listeners::empty()
        .unix("api", &path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a live process accepts on this socket"),
        "{err}"
    );
    // Its process is gone (the listener dropped, the file left behind).
    drop(first);
    assert!(path.exists());
    let second = Listeners::empty().unix("api", &path).unwrap();
    let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (_conn, _) = second.accept().await.unwrap();
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[tokio::test]
async fn a_path_that_is_not_a_socket_is_left_alone() {
    let path = temp_socket("file");
    std::fs::write(&path, "data").unwrap();
    let err = Listeners::empty()
        .unix("api", &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the path exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[tokio::test]
async fn a_name_is_taken_once_and_must_be_valid() {
    let listeners = Listeners::empty();
    let _http = listeners.tcp("http", "127.0.0.1:0").unwrap();
    let err = listeners
        .tcp("http", "127.0.0.1:0")
        .unwrap_err()
        .to_string();
    assert!(err.contains("taken twice"), "{err}");
    let err = listeners.tcp("a:b", "127.0.0.1:0").unwrap_err().to_string();
    assert!(err.contains("without ':'"), "{err}");
}

/// Not a test by itself: the process that
/// `a_unix_listener_follows_a_new_path_only_if_a_generation_bound_it` starts
/// under `systemd-socket-activate`. It takes the Unix listener `api` at the
/// path in `HANDOVER_TEST_ASK`, says it is ready, and answers one
/// connection with the path it accepted it on.
#[test]
#[ignore = "run as a child process by the test below"]
fn unix_listener_child() {
    let Some(ask) = std::env::var_os("HANDOVER_TEST_ASK") else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listeners = Listeners::from_env().unwrap();
        let listener = listeners.unix("api", &ask).unwrap();
        listeners.ready().unwrap();
        let (mut conn, _) = listener.accept().await.unwrap();
        let local = listener.local_addr().unwrap();
        let path = local.as_pathname().unwrap().display().to_string();
        tokio::io::AsyncWriteExt::write_all(&mut conn, path.as_bytes())
            .await
            .unwrap();
    });
}

/// Connects to `path` until something accepts there (bounded).
async fn connect_when_listening(path: &std::path::Path) -> tokio::net::UnixStream {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(stream) => return stream,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never listened: {e}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    }
}

async fn read_all(mut stream: tokio::net::UnixStream) -> String {
    let mut text = String::new();
    let _ = tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut text).await;
    text
}

/// A Unix listener passed with the name of one a previous generation bound
/// (`HANDOVER_BOUND_FDNAMES`) moves to the path the application asks for
/// now; one passed by systemd stays at its own path.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_unix_listener_follows_a_new_path_only_if_a_generation_bound_it() {
    let activate = tools::tool("systemd-socket-activate");
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        for bound in [true, false] {
            let dir = temp_socket(if bound { "moved" } else { "activated" });
            let dir = dir.parent().unwrap().to_path_buf();
            let (old, new) = (dir.join("old.sock"), dir.join("new.sock"));
            let mut command = tokio::process::Command::new(&activate);
            command.arg("-l").arg(&old).arg("--fdname=api");
            if bound {
                command.args(["-E", "HANDOVER_BOUND_FDNAMES=api"]);
            }
            let mut activator = command
                .arg("-E")
                .arg(format!("HANDOVER_TEST_ASK={}", new.display()))
                .arg(std::env::current_exe().unwrap())
                .args(["--ignored", "--exact", "unix_listener_child", "--nocapture"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            // The first connection starts the child.
            let trigger = connect_when_listening(&old).await;
            if bound {
                let served_at = read_all(connect_when_listening(&new).await).await;
                assert_eq!(served_at, new.display().to_string());
                // The old socket was closed: its file stays, nobody accepts.
                let refused = tokio::net::UnixStream::connect(&old).await;
                assert!(refused.is_err(), "{refused:?}");
                drop(trigger);
            } else {
                assert_eq!(read_all(trigger).await, old.display().to_string());
                assert!(!new.exists(), "nothing was bound at the new path");
            }
            let status = tokio::time::timeout(std::time::Duration::from_secs(20), activator.wait())
                .await
                .unwrap()
                .unwrap();
            assert!(status.success(), "{status}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    })
    .await
    .unwrap();
}
