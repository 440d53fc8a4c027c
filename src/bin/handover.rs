//! `handover`: ask a server that uses the handover crate, on its control
//! socket, to upgrade, or how it is.
//!
//! ```text
//! handover upgrade PATH [--timeout SECONDS]   exits 0 once the new generation serves
//! handover status PATH [--timeout SECONDS]
//! ```
//!
//! The answer goes to standard output as `key=value` lines (see the
//! library's `control` module); an error also goes to standard error, and
//! the exit status is 1 (2 for a command line that makes no sense).

use std::process::ExitCode;
use std::time::Duration;

use handover::control::{self, LastUpgrade};

const USAGE: &str = "\
usage: handover upgrade PATH [--timeout SECONDS]
       handover status PATH [--timeout SECONDS]

Asks the server whose control socket is at PATH (Builder::control_socket)
to upgrade, waiting for the outcome, or how it is. The answer is printed as
key=value lines. The exit status is 0 only when the request succeeded: for
upgrade, once the new generation serves.

  --timeout SECONDS  how long to wait for the answer (default: 120 for
                     upgrade, 10 for status)
  -h, --help         print this help
  -V, --version      print the version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "-V" || a == "--version") {
        println!("handover {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let (command, path, timeout) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("handover: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match command.as_str() {
        "upgrade" => {
            control::upgrade(&path, timeout.unwrap_or(Duration::from_secs(120))).map(|up| {
                println!("result=ok");
                println!("pid={}", up.pid);
                println!("previous_pid={}", up.previous_pid);
                println!("generation={}", up.generation);
                println!("took_ms={:.3}", up.took.as_secs_f64() * 1e3);
            })
        }
        _ => control::status(&path, timeout.unwrap_or(Duration::from_secs(10))).map(|status| {
            println!("result=ok");
            println!("pid={}", status.pid);
            println!("generation={}", status.generation);
            let started = status
                .started_at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            println!("started_unix={:.3}", started.as_secs_f64());
            println!("in_flight={}", status.in_flight);
            println!("connections={}", status.connections);
            println!("upgraded={}", status.upgraded);
            println!("draining={}", status.draining);
            match status.last_upgrade {
                None => println!("last_upgrade=none"),
                Some(LastUpgrade::Succeeded { pid, .. }) => {
                    println!("last_upgrade=ok");
                    println!("last_upgrade_pid={pid}");
                }
                Some(LastUpgrade::Failed {
                    reason, message, ..
                }) => {
                    println!("last_upgrade={reason}");
                    println!("last_upgrade_message={message}");
                }
                Some(_) => println!("last_upgrade=unknown"),
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("result=error");
            println!("reason={}", e.reason());
            println!("message={}", e.to_string().replace('\n', " "));
            eprintln!("handover: {command} failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The command, the socket's path and the timeout, if given.
fn parse(args: &[String]) -> Result<(String, String, Option<Duration>), String> {
    let mut positional = Vec::new();
    let mut timeout = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--timeout" {
            let value = it.next().ok_or("--timeout needs a number of seconds")?;
            let secs: f64 = value
                .parse()
                .map_err(|_| format!("--timeout {value}: not a number of seconds"))?;
            timeout = Some(
                Duration::try_from_secs_f64(secs)
                    .map_err(|_| format!("--timeout {value}: not a number of seconds"))?,
            );
        } else if arg.starts_with('-') {
            let known = ["--timeout", "--help", "--version"];
            let close = known.iter().find(|k| {
                // `get`: byte 4 need not fall between two characters.
                arg.get(..4).is_some_and(|start| k.starts_with(start)) || arg.starts_with(&k[..4])
            });
            return Err(match close {
                Some(k) => format!("unknown option {arg} (did you mean {k}?)"),
                None => format!("unknown option {arg}"),
            });
        } else {
            positional.push(arg.clone());
        }
    }
    match positional.as_slice() {
        [command, path] if command == "upgrade" || command == "status" => {
            Ok((command.clone(), path.clone(), timeout))
        }
        [command, _] => Err(format!(
            "unknown command {command:?}: say upgrade or status"
        )),
        [] => Err("say upgrade or status, and the control socket's path".into()),
        _ => Err("one command and one path".into()),
    }
}
