//! `Listeners` in process: binding, taking by name, Unix socket files.
#![allow(clippy::unwrap_used)]

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
