//! What an upgrade starts: the binary at the path this process was
//! started by, in the directory it was started in, and whether a process
//! already started still runs what a fresh start would.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use crate::sys::FileId;

/// A file that process `pid` has mapped (a shared library) and that has
/// since been replaced or deleted, as `/proc/PID/maps` says: a package
/// upgrade that renamed a new `libssl.so.3` over the old one, say. A fresh
/// start would load the new file. `None` if there is none, or where there
/// is no `/proc`.
///
/// Memory a process mapped from a `memfd` or SysV shared memory reads as
/// deleted too, and is not a file on a path: it does not count.
pub(super) fn replaced_mapping(pid: u32) -> Option<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    replaced_in_maps(&maps)
}

/// The first replaced or deleted file in the text of a `/proc/PID/maps`.
fn replaced_in_maps(maps: &str) -> Option<String> {
    maps.lines().find_map(|line| {
        // address perms offset dev inode path: the path is what follows the
        // fifth field, and may contain spaces.
        let mut rest = line;
        for _ in 0..5 {
            rest = rest.trim_start().split_once(' ')?.1;
        }
        let path = rest.trim_start().strip_suffix(" (deleted)")?;
        (path.starts_with('/') && !path.starts_with("/memfd:") && !path.starts_with("/SYSV"))
            .then(|| path.to_owned())
    })
}

/// The identity of the binary this process runs, even if it has been
/// deleted or replaced since.
pub(super) fn running_binary() -> Option<FileId> {
    if cfg!(target_os = "linux") {
        FileId::of(Path::new("/proc/self/exe"))
    } else {
        FileId::of(&std::env::current_exe().ok()?)
    }
}

/// `$PWD` if it is an absolute path to the directory `physical` (what
/// `getcwd` says, every symlink resolved), whose identity is
/// `physical_id`; else `physical`.
///
/// A shell started in `/srv/app/current` sets `PWD` to that, while
/// `getcwd` says `/srv/app/releases/v1`. Once a deploy points `current` at
/// `releases/v2`, the next generation must start there, as unicorn and
/// other re-executing servers have long done.
pub(super) fn logical_dir(
    physical: PathBuf,
    physical_id: Option<FileId>,
    pwd: Option<OsString>,
) -> PathBuf {
    match pwd.map(PathBuf::from) {
        Some(pwd)
            if pwd.is_absolute() && physical_id.is_some() && FileId::of(&pwd) == physical_id =>
        {
            pwd
        }
        _ => physical,
    }
}

/// The path this process was started by, `argv0`, made absolute (against
/// `cwd`, or searched in `path_var` as a shell does when it has no `/`),
/// if it names the `running` binary.
///
/// Not the running binary's own path (`/proc/self/exe`), in which the
/// kernel has resolved every symlink: started as `/srv/app/current/server`
/// with `current` pointing at `releases/v1`, this process's successor must
/// be started from whatever `current` points at by then. `None` when
/// `argv0` names another file (a launcher set it to something else, or the
/// file was replaced already): the running binary's path is used then.
pub(super) fn program(
    argv0: &OsStr,
    cwd: &Path,
    path_var: Option<&OsStr>,
    running: FileId,
) -> Option<PathBuf> {
    let is_running = |candidate: &Path| FileId::of(candidate) == Some(running);
    // `components` drops the `.` of `./server`.
    let tidy = |path: PathBuf| path.components().collect::<PathBuf>();
    if argv0.as_encoded_bytes().contains(&b'/') {
        let candidate = tidy(cwd.join(argv0));
        return is_running(&candidate).then_some(candidate);
    }
    std::env::split_paths(path_var?)
        .map(|dir| tidy(cwd.join(dir).join(argv0)))
        .find(|candidate| is_running(candidate))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_replaced_library_is_found_in_the_maps_and_memfds_are_not() {
        let maps = "\
5581c5e00000-5581c5e2a000 r--p 00000000 08:01 1319                       /srv/app/server
7f7a1c000000-7f7a1c021000 rw-p 00000000 00:00 0 
7f7a1d200000-7f7a1d228000 r--p 00000000 08:01 2290                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f7a1d400000-7f7a1d401000 rw-s 00000000 00:01 1035                       /memfd:pool (deleted)
7f7a1d402000-7f7a1d403000 rw-s 00000000 00:01 32770                      /SYSV00000000 (deleted)
7ffd6a1e5000-7ffd6a206000 rw-p 00000000 00:00 0                          [stack]
";
        assert_eq!(replaced_in_maps(maps), None);
        let upgraded = format!(
            "{maps}7f7a1d600000-7f7a1d690000 r-xp 00000000 08:01 4471                       /usr/lib/x86_64-linux-gnu/libssl.so.3 (deleted)\n"
        );
        assert_eq!(
            replaced_in_maps(&upgraded).as_deref(),
            Some("/usr/lib/x86_64-linux-gnu/libssl.so.3")
        );
        let spaced =
            "7f7a1d600000-7f7a1d690000 r-xp 00000000 08:01 4471   /opt/my app/lib.so (deleted)";
        assert_eq!(
            replaced_in_maps(spaced).as_deref(),
            Some("/opt/my app/lib.so")
        );
    }

    /// A fresh directory holding `bin/server` (the "running binary"),
    /// `link` → `bin/server`, `other` and `elsewhere/server` (other
    /// files), and `current` → `bin`.
    pub(in crate::upgrade) struct Layout {
        pub(in crate::upgrade) dir: PathBuf,
    }

    impl Layout {
        pub(in crate::upgrade) fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("handover-upgrade-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("bin")).expect("dir");
            std::fs::create_dir_all(dir.join("elsewhere")).expect("dir");
            std::fs::write(dir.join("elsewhere/server"), "another").expect("write");
            std::fs::write(dir.join("bin/server"), "server").expect("write");
            std::fs::write(dir.join("other"), "other").expect("write");
            symlink("bin/server", dir.join("link")).expect("symlink");
            symlink("bin", dir.join("current")).expect("symlink");
            Self { dir }
        }

        fn running(&self) -> FileId {
            FileId::of(&self.dir.join("bin/server")).expect("exists")
        }
    }

    impl Drop for Layout {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn the_program_is_the_path_this_process_was_started_by_symlinks_kept() {
        let l = Layout::new("program");
        let running = l.running();
        let program = |argv0: &str, path_var: Option<&str>| {
            program(OsStr::new(argv0), &l.dir, path_var.map(OsStr::new), running)
        };
        let absolute = l.dir.join("current/server");
        assert_eq!(
            program(absolute.to_str().expect("utf-8"), None),
            Some(absolute.clone())
        );
        // Relative to the working directory, `./` dropped.
        assert_eq!(program("./link", None), Some(l.dir.join("link")));
        assert_eq!(
            program("current/server", None),
            Some(l.dir.join("current/server"))
        );
        // No `/`: searched in PATH, in order, relative entries against the
        // working directory, an empty entry meaning the directory itself.
        let search = format!("/nonexistent:{}", l.dir.join("current").display());
        assert_eq!(
            program("server", Some(&search)),
            Some(l.dir.join("current/server"))
        );
        assert_eq!(
            program("server", Some("/nonexistent:bin")),
            Some(l.dir.join("bin/server"))
        );
        assert_eq!(
            program("link", Some("/nonexistent:")),
            Some(l.dir.join("link"))
        );
        // A name found first as another file is passed over.
        assert_eq!(
            program("server", Some("elsewhere:bin")),
            Some(l.dir.join("bin/server"))
        );
        // Not the running binary, or not found: `None` (the caller then
        // uses the running binary's own path).
        assert_eq!(program("./other", None), None);
        assert_eq!(program("./missing", None), None);
        assert_eq!(program("server", None), None);
        assert_eq!(program("other", Some(l.dir.to_str().expect("utf-8"))), None);
    }

    #[test]
    fn the_working_directory_is_pwd_only_when_it_names_the_same_directory() {
        let l = Layout::new("pwd");
        let physical = l.dir.join("bin");
        let physical_id = FileId::of(&physical);
        let logical =
            |pwd: Option<PathBuf>| logical_dir(physical.clone(), physical_id, pwd.map(Into::into));
        assert_eq!(logical(Some(l.dir.join("current"))), l.dir.join("current"));
        // Unset (systemd sets no PWD), stale, relative, or missing.
        assert_eq!(logical(None), physical);
        assert_eq!(logical(Some(l.dir.clone())), physical);
        assert_eq!(logical(Some("current".into())), physical);
        assert_eq!(logical(Some(l.dir.join("gone"))), physical);
    }
}
