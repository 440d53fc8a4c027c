//! The outside tools the tests run: each test that needs one checks for it
//! before it starts anything, and fails at once with the tool's name and
//! the package that provides it.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

/// The outside tools the tests run, each with the Debian package that
/// provides it.
const TOOLS: [(&str, &str); 9] = [
    ("curl", "curl"),
    ("systemd-socket-activate", "systemd"),
    ("unshare", "util-linux"),
    ("setpriv", "util-linux"),
    ("openssl", "openssl"),
    ("tini", "tini"),
    ("dumb-init", "dumb-init"),
    ("catatonit", "catatonit"),
    ("sh", "dash"),
];

/// The path of the outside tool `name`, which the Debian package `package`
/// provides. A test calls this before it starts anything, so that a
/// missing tool fails it at once, saying what to install, rather than as a
/// timeout that looks like a bug.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
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

/// [`require_tool`] for one of the tools the tests know the package of.
pub fn tool(name: &str) -> PathBuf {
    let package = TOOLS
        .iter()
        .find(|(tool, _)| *tool == name)
        .map_or(name, |(_, package)| package);
    require_tool(name, package)
}
