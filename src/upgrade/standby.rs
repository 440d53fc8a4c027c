//! The standby this generation keeps ([`Builder::standby`](crate::Builder::standby)):
//! the next generation, started ahead of the upgrade and waiting in
//! `from_env` until the upgrade hands it the listeners.
//!
//! A standby is used only if it runs the binary that an upgrade would start
//! now, in the directory it would start in: a deploy that replaced the
//! binary, or pointed a symlink on its path or working directory at a new
//! release, gets a fresh start instead, and the stale standby is killed.
//! One that exited on its own is replaced by a fresh start too.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Upgrader;
use super::binary::replaced_mapping;
use super::container::check_parent;
use crate::error::Error;
use crate::inherit::env;
use crate::lock::lock;
use crate::sys::{self, FileId, spawn::Child};

/// How long after a generation is ready it starts its standby: after the
/// clients' reconnections to it, so that the standby's start-up does not
/// compete with them for the cores.
pub(crate) const STANDBY_DELAY: Duration = Duration::from_millis(100);

/// A standby this process started: the next generation, waiting in
/// `from_env` for the other end of `socket` to hand it the listeners.
#[derive(Debug)]
pub(super) struct Standby {
    pub(super) child: Child,
    pub(super) socket: UnixStream,
    /// The binary it runs.
    exe: Option<FileId>,
    /// The directory it runs in.
    dir: Option<FileId>,
}

impl Upgrader {
    /// Whether this process keeps a standby.
    pub(crate) fn keeps_standby(&self) -> bool {
        self.keep_standby
    }

    fn standby_slot(&self) -> MutexGuard<'_, Option<Standby>> {
        lock(&self.standby)
    }

    /// Starts a standby, unless this process keeps none, has one, is
    /// upgrading, has handed over or is shutting down, or could not
    /// upgrade at all (see [`check_parent`]). Returns its pid if it
    /// started one.
    pub(crate) fn start_standby(&self) -> Result<Option<u32>, Error> {
        let mut slot = self.standby_slot();
        if !self.keep_standby
            || slot.is_some()
            || self.is_running()
            || self.retired.load(Ordering::SeqCst)
            || check_parent().is_err()
        {
            return Ok(None);
        }
        self.check_binary()?;
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| Error::io("creating the standby's socket", e))?;
        let env = env::standby_env(env::process_env());
        let (dir, dir_id) = self.child_dir_and_id();
        let exe = FileId::of(&self.exe);
        let child = sys::spawn::spawn(&self.exe, &self.args, dir, &env, &[theirs.as_fd()])
            .map_err(|e| Error::Binary {
                path: self.exe.clone(),
                reason: e.to_string(),
            })?;
        let pid = child.id();
        // What it runs, if the binary was replaced while it started.
        #[cfg(target_os = "linux")]
        let exe = FileId::of(Path::new(&format!("/proc/{pid}/exe"))).or(exe);
        *slot = Some(Standby {
            child,
            socket: ours,
            exe,
            dir: dir_id,
        });
        log!(info, pid, "standby started");
        Ok(Some(pid))
    }

    /// Takes the standby for an upgrade, if it can serve as the next
    /// generation: still running, from the binary and in the directory an
    /// upgrade would start now. One that cannot is killed (and reaped once
    /// it has exited).
    pub(super) fn take_standby(&self) -> Option<Standby> {
        let standby = self.standby_slot().take()?;
        let pid = standby.child.id();
        let stale = if let Some(status) = standby.child.exit_status() {
            log!(warn, pid, %status, "the standby exited before the upgrade; starting the next generation afresh");
            return None;
        } else if standby.exe.is_none() || FileId::of(&self.exe) != standby.exe {
            "the binary has changed".to_owned()
        } else if self.child_dir_and_id().1 != standby.dir {
            "the working directory has changed".to_owned()
        } else if let Some(path) = replaced_mapping(pid) {
            format!("a file it has mapped, {path}, has been replaced or deleted")
        } else {
            return Some(standby);
        };
        log!(
            info,
            pid,
            reason = %stale,
            "standby discarded; starting the next generation afresh"
        );
        let _ = standby.child.kill();
        None
    }

    /// Keeps this process from starting a standby from now on, and kills
    /// the one it has (which [`discard_standby`](Self::discard_standby)
    /// then reaps).
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        if let Some(standby) = &*self.standby_slot() {
            let _ = standby.child.kill();
        }
    }

    /// Ends the standby, if there is one, and keeps this process from
    /// starting another; returns it to be waited for.
    pub(crate) fn discard_standby(&self) -> Option<Child> {
        self.retired.store(true, Ordering::SeqCst);
        let standby = self.standby_slot().take()?;
        let _ = standby.child.kill();
        log!(info, pid = standby.child.id(), "standby discarded");
        Some(standby.child)
    }
}
