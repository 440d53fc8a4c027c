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
#[allow(dead_code)]
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

/// A switch's value on the examples' command lines: `on` or `off`.
#[allow(dead_code)]
pub(crate) fn on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("say on or off".into()),
    }
}

/// Seconds, fractions allowed: `30`, `0.5`.
#[allow(dead_code)]
pub(crate) fn seconds(value: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = value.parse().map_err(|e| format!("{e}"))?;
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}
