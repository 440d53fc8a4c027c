//! What the example servers share: their logging, and how `main` ends.

use std::io::IsTerminal;
use std::process::ExitCode;

/// Logs to stdout (`RUST_LOG`, `info` by default), colored on a terminal,
/// then runs `run`; on an error, says it as `name: error` and exits 1.
///
/// A log line that cannot be written is dropped. By default the subscriber
/// would report it with `eprintln!`, which panics when stderr is a broken
/// pipe too (the log collector died, the SSH session that started the
/// server ended): serving and upgrades must go on without logs.
pub(crate) fn main_with_logs(
    name: &str,
    run: impl FnOnce() -> Result<(), Box<dyn std::error::Error>>,
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .log_internal_errors(false)
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
