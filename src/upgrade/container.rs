//! Where an upgrade would end the container: this process is PID 1, or
//! its parent is an init that exits with it.

use crate::error::Error;

/// Refuses an upgrade whose hand-over would end this process's container:
/// this process is PID 1, or its parent is an init that exits with it.
pub(crate) fn check_parent() -> Result<(), Error> {
    if std::process::id() == 1 {
        return Err(Error::Pid1);
    }
    let parent = std::os::unix::process::parent_id();
    // Only Linux has `/proc` (and containers); elsewhere nothing is read.
    let Ok(comm) = std::fs::read_to_string(format!("/proc/{parent}/comm")) else {
        return Ok(());
    };
    let name = comm.trim_end_matches('\n');
    if exits_with_its_child(parent, name) {
        return Err(Error::InitParent {
            pid: parent,
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Whether a parent process called `name` (its `comm`), with pid `pid` as
/// this process sees it, exits when its child does, ending the container.
///
/// tini (also installed as Docker's `docker-init`), dumb-init and catatonit
/// (Podman's `podman-init`) each run one child and exit with it, whatever
/// their pid. A shell that is PID 1 runs a container's entry script that
/// started the server without `exec`: the script goes on, and ends, once the
/// server exits. A shell that is not PID 1 is left alone: an operator's
/// interactive shell, say, outlives its children.
fn exits_with_its_child(pid: u32, name: &str) -> bool {
    const INITS: [&str; 5] = [
        "tini",
        "docker-init",
        "dumb-init",
        "catatonit",
        "podman-init",
    ];
    const SHELLS: [&str; 8] = ["sh", "bash", "dash", "ash", "zsh", "ksh", "mksh", "busybox"];
    INITS.contains(&name) || name.starts_with("tini-") || (pid == 1 && SHELLS.contains(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inits_that_exit_with_their_child_are_told_from_supervisors_that_stay() {
        for (pid, name) in [
            (1, "tini"),
            (1, "docker-init"),
            (1, "tini-static"),
            (1, "tini-static-amd"),
            (1, "dumb-init"),
            (1, "catatonit"),
            (1, "podman-init"),
            (712, "tini"),
            (1, "sh"),
            (1, "bash"),
            (1, "busybox"),
        ] {
            assert!(exits_with_its_child(pid, name), "{name} as pid {pid}");
        }
        for (pid, name) in [
            (1, "systemd"),
            (1, "s6-svscan"),
            (1, "runit"),
            (712, "systemd"),
            (712, "bash"),
            (712, "sh"),
            (712, "cargo"),
            (712, "tinyproxy"),
        ] {
            assert!(!exits_with_its_child(pid, name), "{name} as pid {pid}");
        }
    }
}
