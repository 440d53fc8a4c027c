//! [`Handover`]: the one-call path that ties the hand-over half to the
//! drain half: listeners inherited or bound, the serve loop, upgrades on a
//! signal or the control socket, the drain, the pid file and systemd's
//! notifications.

mod builder;
mod connections;
mod driver;
mod serve;
mod state;

use std::fmt;
use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::SignalKind;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::{LastUpgrade, Status};
use crate::drain::DrainReport;
use crate::drain::Graceful;
use crate::error::BoxError;
use crate::error::Error;
use crate::inherit::Listeners;
use crate::inherit::channel;
use crate::lock::lock;
use crate::log::Ms;
use crate::notify;
use crate::upgrade::{STANDBY_DELAY, Snapshot, Upgrader};
pub use builder::Builder;
use state::{StateSource, take_snapshot};

/// Zero-downtime restarts in one value: the listeners (inherited or bound),
/// the drain, the upgrade, the signals, the pid file and systemd's
/// notifications.
///
/// ```no_run
/// use axum::{Router, routing::get};
/// use handover::{Exit, Handover};
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     // Before the runtime starts: this reads and clears the environment.
///     let handover = Handover::builder().pid_file("/run/app/app.pid").from_env()?;
///     tokio::runtime::Runtime::new()?.block_on(async {
///         let listener = handover.tcp("http", "127.0.0.1:3000")?;
///         let app = Router::new().route("/", get(|| async { "hello" }));
///         match handover.serve(listener, app.with_state(())).await? {
///             Exit::HandedOver { pid, report } => println!("handed over to {pid}: {report}"),
///             Exit::Shutdown { report } => println!("shut down: {report}"),
///             _ => {}
///         }
///         Ok(())
///     })
/// }
/// ```
///
/// `SIGHUP` or `SIGUSR2` starts the binary at the path this process was
/// started by, symlinks unresolved (a deploy that renamed a new file over
/// it, or pointed a symlink on it at a new release, runs the new one), with
/// the same arguments and environment, in the same working directory (by
/// `$PWD`'s path when that names it, so a symlinked directory is followed
/// again), and the listeners at fds 3, 4, … (or hands the listeners to a
/// standby started so ahead of time: see [`Builder::standby`]). Once it
/// says it is ready, this process stops accepting, drains and `serve`
/// returns [`Exit::HandedOver`]. If it exits, crashes or is not ready
/// within the ready timeout, it is killed and reaped and this
/// process goes on serving as if nothing happened. `SIGTERM`, `SIGINT` and
/// `SIGQUIT` drain and return [`Exit::Shutdown`], killing a pending child
/// first; the sockets this process bound are closed as the drain starts
/// (a new connection is refused at once) and a Unix socket's file is
/// removed, while sockets systemd passed stay open.
///
/// Cloning is cheap; an admin endpoint can hold a clone and call
/// [`upgrade`](Handover::upgrade) itself.
#[derive(Clone)]
pub struct Handover {
    inner: Arc<Inner>,
}

struct Inner {
    listeners: Listeners,
    graceful: Graceful,
    upgrader: Upgrader,
    pid_file: Option<PathBuf>,
    upgrade_signals: Vec<SignalKind>,
    shutdown_signals: Vec<SignalKind>,
    auto_ready: bool,
    ready: AtomicBool,
    driver_started: AtomicBool,
    /// Set once: how this generation ends.
    outcome: Mutex<Option<Outcome>>,
    /// Fires on shutdown: a pending upgrade is called off.
    shutting_down: CancellationToken,
    /// Where the control socket is, if there is one.
    control_socket: Option<PathBuf>,
    /// The control socket's connections: waited for (briefly) before
    /// `serve` returns, so that the answer to the `upgrade` that ended this
    /// generation gets out.
    control_tasks: TaskTracker,
    /// When this generation started.
    started_at: SystemTime,
    /// How the last upgrade went.
    last_upgrade: Mutex<Option<LastUpgrade>>,
    /// What to hand the next generation (see `hand_over_state`).
    state_source: Mutex<Option<StateSource>>,
    max_state_size: usize,
    /// How long the upgrade that handed over took.
    upgrade_took: Mutex<Option<Duration>>,
    /// Whether idle connections move between generations (see
    /// [`Builder::hand_over_connections`]).
    hand_over_connections: bool,
    /// Where this generation's idle connections go, once it hands over.
    outgoing: Arc<connections::Outgoing>,
    /// Where the previous generation's arrive.
    incoming: Arc<connections::Incoming>,
}

/// Takes the snapshot of state that the next generation receives.

#[derive(Debug, Clone, Copy)]
enum Outcome {
    HandedOver(u32),
    Shutdown,
}

/// How this generation ended; returned by [`Handover::serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// The next generation (pid `pid`) is serving; this one has drained.
    HandedOver {
        /// The new generation's pid.
        pid: u32,
        /// How the drain went.
        report: DrainReport,
    },
    /// Shut down (by a signal or [`Handover::shutdown`]); drained.
    Shutdown {
        /// How the drain went.
        report: DrainReport,
    },
}

impl Exit {
    /// The drain report, whichever way this generation ended.
    pub fn report(&self) -> &DrainReport {
        match self {
            Exit::HandedOver { report, .. } | Exit::Shutdown { report } => report,
        }
    }
}

impl Handover {
    /// A [`Builder`] with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// [`Handover::builder().from_env()`](Builder::from_env).
    pub fn from_env() -> Result<Self, Error> {
        Self::builder().from_env()
    }

    /// The TCP listener named `name`: inherited if a previous generation or
    /// systemd passed one, else bound to `addr`. See [`Listeners::tcp`].
    pub fn tcp(
        &self,
        name: &str,
        addr: impl ToSocketAddrs,
    ) -> Result<tokio::net::TcpListener, Error> {
        self.inner.listeners.tcp(name, addr)
    }

    /// The Unix listener named `name`: inherited, or bound at `path`. See
    /// [`Listeners::unix`].
    pub fn unix(
        &self,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<tokio::net::UnixListener, Error> {
        self.inner.listeners.unix(name, path)
    }

    /// This generation's [`Graceful`] handle: its counts, its drain, and the
    /// layer (`handover.graceful().layer()`) for routes whose handlers
    /// read the [`DrainSignal`](crate::DrainSignal).
    pub fn graceful(&self) -> &Graceful {
        &self.inner.graceful
    }

    /// Whether this process was started by a previous generation.
    pub fn is_upgrade(&self) -> bool {
        self.inner.listeners.is_inherited_from_previous_generation()
    }

    /// This generation's number: 1 for a fresh start, one more than the
    /// previous generation's after each upgrade.
    pub fn generation(&self) -> u64 {
        self.inner.listeners.generation()
    }

    /// Hands state to the next generation: at each upgrade, `snapshot`
    /// runs once, and the bytes it returns are what the next generation
    /// reads with [`take_previous_state`](Handover::take_previous_state).
    /// Call it again to replace the closure.
    ///
    /// The bytes cross whole or not at all: they are written to a sealed
    /// file (a `memfd` on Linux) before the next generation is started or
    /// woken, and it reads them from there, so a generation that dies
    /// mid-snapshot starts nobody, and no half-written state is ever read.
    /// A snapshot that fails, panics, or is bigger than
    /// [`Builder::max_state_size`] fails the upgrade ([`Error::State`]), and
    /// this generation serves on. It works with a standby and under a
    /// stable parent or systemd alike.
    ///
    /// Hand over what makes the next generation better at once, not what
    /// it could not do without: TLS session-ticket keys (so clients resume
    /// their sessions across a restart), caches, counters. Version the
    /// format: the next generation may be a newer binary that reads it
    /// differently, and should take what it does not understand as none.
    ///
    /// ```no_run
    /// # fn run(handover: &handover::Handover) {
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU64, Ordering};
    ///
    /// // Version 1: the count, as 8 bytes.
    /// let from_previous = handover
    ///     .take_previous_state()
    ///     .and_then(|bytes| bytes.strip_prefix(&[1]).map(<[u8]>::to_vec))
    ///     .and_then(|count| Some(u64::from_be_bytes(count.try_into().ok()?)))
    ///     .unwrap_or(0);
    /// let served = Arc::new(AtomicU64::new(from_previous));
    /// let counted = served.clone();
    /// handover.hand_over_state(move || {
    ///     let mut bytes = vec![1];
    ///     bytes.extend(counted.load(Ordering::SeqCst).to_be_bytes());
    ///     Ok(bytes)
    /// });
    /// # }
    /// ```
    pub fn hand_over_state<F>(&self, snapshot: F)
    where
        F: Fn() -> Result<Vec<u8>, BoxError> + Send + Sync + 'static,
    {
        *lock(&self.inner.state_source) = Some(Arc::new(snapshot));
    }

    /// The state the previous generation handed over (see
    /// [`hand_over_state`](Handover::hand_over_state)), whole: `None` in a
    /// first generation, when the previous one handed over nothing, or
    /// once taken.
    pub fn take_previous_state(&self) -> Option<Vec<u8>> {
        self.inner.listeners.take_previous_state()
    }

    /// How this generation is: what the control socket's `status` reports.
    pub fn status(&self) -> Status {
        let inner = &*self.inner;
        let graceful = &inner.graceful;
        Status {
            pid: std::process::id(),
            generation: self.generation(),
            started_at: inner.started_at,
            in_flight: graceful.in_flight(),
            connections: graceful.connections(),
            upgraded: graceful.upgraded(),
            draining: graceful.is_draining(),
            last_upgrade: lock(&inner.last_upgrade).clone(),
        }
    }

    /// Says this generation is ready: starts handling the upgrade and
    /// shutdown signals (and the control socket), tells systemd or a
    /// stable parent (`READY=1`, `MAINPID=`), writes the pid file, tells
    /// the previous generation (which then stops accepting and drains), and
    /// closes inherited listeners the application did not take. Call it
    /// within the Tokio runtime.
    ///
    /// [`serve`](Handover::serve) calls it when it starts accepting, unless
    /// [`Builder::auto_ready`] is off. Calling it again does nothing.
    ///
    /// # Errors
    ///
    /// The signals could not be handled or the control socket could not be
    /// had: then nobody is told, the previous generation keeps serving (and
    /// kills this one at its ready timeout), and calling `ready` again
    /// tries again. Or the pid file could not be written, or the previous
    /// generation could not be told: the other steps are still taken, and
    /// serving goes on.
    pub fn ready(&self) -> Result<(), Error> {
        if self.inner.ready.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut first_error = None;
        // Handle the upgrade and shutdown signals before anyone can learn
        // this process is ready (pid file, previous generation, systemd):
        // a SIGHUP sent the moment the pid file appears must upgrade, not
        // meet the default disposition, which terminates the process. If
        // that fails (or the control socket cannot be had), nobody is told
        // anything: the previous generation serves on, and kills this one
        // at its ready timeout.
        if tokio::runtime::Handle::try_current().is_ok()
            && let Err(e) = self.start_signal_driver()
        {
            log!(error, error = %e, "cannot become ready; the previous generation serves on");
            self.inner.ready.store(false, Ordering::SeqCst);
            return Err(e);
        }
        let mut note = |result: Result<(), Error>| {
            if let Err(e) = result {
                log!(error, error = %e, "while becoming ready");
                first_error.get_or_insert(e);
            }
        };
        // systemd, or a stable parent, hears it first: the previous
        // generation exits once told, and what supervises both must know
        // the new one by then.
        note(notify::sd_notify(&format!(
            "READY=1\nMAINPID={}",
            std::process::id()
        )));
        // The pid file too: whoever hears that the upgrade succeeded (a
        // `handover upgrade` whose answer the previous generation sends
        // once told) reads the new pid there.
        if let Some(path) = &self.inner.pid_file {
            note(notify::write_pid_file(path));
        }
        // Taking the previous generation's idle connections from now on, if
        // it offered them: it hears so in the line that says ready.
        let taking = self.take_connections();
        note(self.inner.listeners.ready_taking_connections(taking));
        log!(
            info,
            pid = std::process::id(),
            upgraded = self.is_upgrade(),
            "ready"
        );
        // Described once, here rather than in `from_env`: by now the
        // application has most likely installed its recorder.
        crate::metrics::describe();
        crate::metrics::generation(self.generation());
        if self.is_upgrade() {
            crate::metrics::upgrade("ready");
        }
        self.hear_the_previous_drain();
        self.schedule_standby();
        first_error.map_or(Ok(()), Err)
    }

    /// Starts the next generation and, once it is ready, starts this one's
    /// drain. Resolves to the new generation's pid.
    ///
    /// # Errors
    ///
    /// Another upgrade is running ([`Error::UpgradeInProgress`]), the binary
    /// is missing or broken, the child exited or was not ready in time, the
    /// process is shutting down or draining, or its exit would end its
    /// container ([`Error::Pid1`], [`Error::InitParent`]). In every case
    /// this generation keeps serving, and the child, if one was started, has
    /// been killed and reaped.
    pub async fn upgrade(&self) -> Result<u32, Error> {
        let inner = &*self.inner;
        if inner.graceful.is_draining() {
            return Err(Error::Draining);
        }
        let at = SystemTime::now();
        let started = std::time::Instant::now();
        let source = lock(&inner.state_source).clone();
        let max = inner.max_state_size;
        let snapshot = source.map(|source| move || take_snapshot(&source, max));
        let snapshot: Option<Snapshot<'_>> = snapshot.as_ref().map(|take| take as Snapshot<'_>);
        let result = inner
            .upgrader
            .upgrade(
                &inner.listeners,
                &inner.shutting_down,
                snapshot,
                inner.hand_over_connections,
            )
            .await;
        match &result {
            // The new generation counts its own success (this process
            // ends, and its metrics with it).
            Ok(_) => {
                *lock(&inner.upgrade_took) = Some(started.elapsed());
            }
            Err(e) => crate::metrics::upgrade(e.reason()),
        }
        // A refusal because one runs already says nothing of how it goes.
        if !matches!(result, Err(Error::UpgradeInProgress)) {
            let last = match &result {
                Ok(pid) => LastUpgrade::Succeeded { pid: *pid, at },
                Err(e) => LastUpgrade::Failed {
                    reason: e.reason().to_owned(),
                    message: e.to_string(),
                    at,
                },
            };
            *lock(&inner.last_upgrade) = Some(last);
        }
        let pid = match result {
            Ok(pid) => pid,
            Err(e) => {
                // The standby may have been used up by the failed attempt.
                self.schedule_standby();
                return Err(e);
            }
        };
        self.settle(Outcome::HandedOver(pid));
        // Idle connections move to the new generation if it takes them;
        // the rest drain here.
        let gives_up = inner
            .upgrader
            .take_connections_channel()
            .is_some_and(|channel| match inner.outgoing.start(channel) {
                Ok(()) => true,
                Err(e) => {
                    log!(warn, error = %e, "could not hand connections to the next generation; draining them here");
                    false
                }
            });
        log!(
            info,
            new_pid = pid,
            connections_move = gives_up,
            "handed over; draining this generation"
        );
        if gives_up {
            inner.graceful.start_drain_giving_up();
        } else {
            inner.graceful.start_drain();
        }
        Ok(pid)
    }

    /// In `ready`: starts taking the previous generation's idle
    /// connections, if it offered them and this generation takes them;
    /// returns whether it does.
    fn take_connections(&self) -> bool {
        let inner = &*self.inner;
        let channel = inner.listeners.take_connections_channel();
        let started = match channel {
            Some(channel) if tokio::runtime::Handle::try_current().is_ok() => {
                match inner.incoming.start(channel, inner.listeners.names()) {
                    Ok(()) => true,
                    Err(e) => {
                        log!(warn, error = %e, "could not take the previous generation's connections; it drains them");
                        false
                    }
                }
            }
            _ => false,
        };
        if !started {
            inner.incoming.close();
        }
        started
    }

    /// Once ready as an upgrade: hears, in the background, how the previous
    /// generation's drain went (and how long the upgrade took), logs it and
    /// records it in the metrics.
    fn hear_the_previous_drain(&self) {
        let Some(channel) = self.inner.listeners.take_report_channel() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        tokio::spawn(async move {
            let channel = std::os::unix::net::UnixStream::from(channel);
            let Ok(channel) = channel
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(channel))
            else {
                return;
            };
            // One line, at the previous generation's exit (end of file if
            // it died first).
            let mut line = Vec::new();
            let mut reader = tokio::io::AsyncReadExt::take(channel, channel::MAX_LINE * 4);
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut line).await;
            let Some((took, report)) = std::str::from_utf8(&line)
                .ok()
                .and_then(channel::parse_drain_report)
            else {
                return;
            };
            log!(
                info,
                upgrade_ms = %Ms(took),
                %report,
                "the previous generation has drained"
            );
            crate::metrics::upgrade_took(took);
            crate::metrics::drained(report.counts(), report.elapsed);
        });
    }

    /// Starts a standby [`STANDBY_DELAY`] from now, if this process keeps
    /// one (see [`Builder::standby`]) and runs within a Tokio runtime.
    fn schedule_standby(&self) {
        if !self.inner.upgrader.keeps_standby() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let handover = self.clone();
        tokio::spawn(async move {
            let inner = &*handover.inner;
            tokio::select! {
                () = tokio::time::sleep(STANDBY_DELAY) => {}
                () = inner.shutting_down.cancelled() => return,
            }
            if inner.graceful.is_draining() {
                return;
            }
            if let Err(e) = inner.upgrader.start_standby() {
                log!(warn, error = %e, "could not start a standby; an upgrade will start the next generation afresh");
            }
        });
    }

    /// Drains this generation and ends [`serve`](Handover::serve) with
    /// [`Exit::Shutdown`]; a pending upgrade's child is killed first.
    ///
    /// Every socket this process (or an earlier generation) bound is closed
    /// as the drain starts, so that a new connection is refused at once,
    /// and a Unix socket's file is removed; the ones systemd passed stay
    /// open for its next start.
    pub fn shutdown(&self) {
        let inner = &*self.inner;
        inner.shutting_down.cancel();
        // Killed now, reaped before `serve` returns.
        inner.upgrader.retire();
        if self.settle(Outcome::Shutdown) {
            let _ = notify::sd_notify("STOPPING=1");
            // Nothing will accept from the sockets this process bound: they
            // close as the serve loop stops, so that a new connection is
            // refused at once (and its client tries elsewhere) instead of
            // waiting in a backlog that is reset at exit.
            inner.listeners.close_bound();
            if !inner.upgrader.is_running() && !inner.upgrader.has_handed_over() {
                inner.listeners.remove_socket_files();
            }
        }
        inner.graceful.start_drain();
    }

    /// Called as a serve loop stops accepting: whether its listener closes
    /// for good (no next generation accepts from it). If so, this
    /// process's other copies of the sockets it bound are closed too (the
    /// drain was started by [`Graceful::start_drain`], say, rather than by
    /// [`shutdown`](Handover::shutdown), which closes them itself).
    fn stops_for_good(&self) -> bool {
        let outcome = *lock(&self.inner.outcome);
        let for_good = !matches!(outcome, Some(Outcome::HandedOver(_)));
        if for_good {
            self.inner.listeners.close_bound();
        }
        for_good
    }

    /// Records how this generation ends, unless that is already decided;
    /// returns whether this call decided it.
    fn settle(&self, outcome: Outcome) -> bool {
        let mut settled = lock(&self.inner.outcome);
        let first = settled.is_none();
        if first {
            *settled = Some(outcome);
        }
        first
    }
}

impl fmt::Debug for Handover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handover")
            .field("listeners", &self.inner.listeners)
            .field("graceful", &self.inner.graceful)
            .field("exe", &self.inner.upgrader.exe())
            .field("pid_file", &self.inner.pid_file)
            .finish_non_exhaustive()
    }
}
