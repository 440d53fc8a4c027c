//! What the tests share, one file a topic: processes and `/proc`
//! ([`proc`]), waiting for conditions ([`wait`]), deploys and gates
//! ([`deploy`]), running servers ([`server`], [`kept`], [`served`]), load
//! and one-off requests ([`load`], [`http`]), ports ([`ports`]), outside
//! tools ([`tools`]), TLS and WebSockets.
#![allow(dead_code, unused_imports, unreachable_pub, clippy::unwrap_used)]

pub mod deploy;
pub mod h2_websocket;
pub mod http;
pub mod kept;
pub mod load;
pub mod ports;
pub mod proc;
pub mod served;
pub mod server;
pub mod tls;
pub mod tools;
pub mod wait;
pub mod websocket;

/// The benchmarks' load client: the HTTP/2 load uses it.
#[path = "../../examples/bench_support/client.rs"]
pub mod load_client;

pub use deploy::{Deploy, Gate, example_binary, hello_binary};
pub use http::{KeepAlive, connect_when_listening, get, get_body, get_path_body, open_events};
pub use kept::Kept;
pub use load::Load;
pub use proc::{
    TcpSocket, assert_fds_settle, children_of, fd_count, holds_socket, is_alive, is_reaped,
    kill_processes_from, namespace_pid, processes_from, rss_kib, send_signal, tcp_socket,
    unreaped_children_of, zombies_of,
};
pub use server::{Launch, Server};
pub use tools::tool;
pub use wait::{wait_exit, wait_reaped, wait_until};
