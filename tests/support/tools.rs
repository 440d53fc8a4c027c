//! The outside tools the tests run, from the one list `scripts/test` also
//! reads (`tests/tools.txt`): each test that needs one asks for it before it
//! starts anything, and fails at once with the tool's name and the package
//! that provides it; and what the sandbox may forbid, asked the same way.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// `tests/tools.txt`: `command package` a line.
const TOOLS: &str = include_str!("../tools.txt");

/// The Debian package of `name`, as the list says.
fn package_of(name: &str) -> Option<&'static str> {
    TOOLS
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(' '))
        .find(|(tool, _)| *tool == name)
        .map(|(_, package)| package.trim())
}

/// The path of the outside tool `name`, which must be on the list. A test
/// calls this before it starts anything, so that a missing tool fails it at
/// once, saying what to install, rather than as a timeout that looks like
/// a bug.
pub fn tool(name: &str) -> PathBuf {
    let package = package_of(name)
        .unwrap_or_else(|| panic!("`{name}` is not in tests/tools.txt: add it there"));
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::metadata(candidate)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    });
    found.unwrap_or_else(|| {
        panic!(
            "this test needs `{name}`, which is not installed: install the Debian package \
             `{package}` (apt-get install {package}), or run the tests with scripts/test, \
             which installs what is missing"
        )
    })
}

/// Checks that this sandbox lets `unshare` make a pid namespace (what the
/// container tests run the server in): panics at once, with what `unshare`
/// said, where it does not.
pub fn require_pid_namespaces() {
    let unshare = tool("unshare");
    let mut command = Command::new(&unshare);
    if !is_root() {
        command.args(["--user", "--map-root-user"]);
    }
    let output = command
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdin(Stdio::null())
        .output()
        .expect("unshare runs");
    assert!(
        output.status.success(),
        "this test runs the server in a pid namespace of its own, and this sandbox forbids \
         one: `unshare --pid --fork --mount-proc true` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// Whether this test runs as root.
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
