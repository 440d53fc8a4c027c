//! The one-call API: inherit or bind, serve, upgrade on a signal, drain.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::net::ToSocketAddrs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::control::{CONTROL_NAME, Controls, LastUpgrade, Status, Upgraded};
use crate::error::Error;
use crate::graceful::{DEFAULT_CLOSE_GRACE, DrainReport, Graceful};
use crate::layer::GracefulLayer;
use crate::listener::{DEFAULT_MAX_STATE_SIZE, Listeners};
use crate::notify;
use crate::serve::{Accept, DEFAULT_DRAIN_TIMEOUT, DEFAULT_IDLE_GRACE, DefaultAcceptor, Listener};
use crate::standby::STANDBY_DELAY;
use crate::upgrade::{Snapshot, Upgrader};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Default for [`Builder::ready_timeout`].
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

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
///     let handover = Handover::builder().pid_file("/tmp/app.pid").from_env()?;
///     tokio::runtime::Runtime::new()?.block_on(async {
///         let listener = handover.tcp("http", "127.0.0.1:3000")?;
///         let app = Router::new().route("/", get(|| async { "hello" }));
///         match handover.serve(listener, app).await? {
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
    drain_timeout: Duration,
    idle_grace: Duration,
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
}

/// Takes the snapshot of state that the next generation receives.
type StateSource = Arc<dyn Fn() -> Result<Vec<u8>, BoxError> + Send + Sync>;

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

/// Configures a [`Handover`]; made by [`Handover::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct Builder {
    pid_file: Option<PathBuf>,
    ready_timeout: Duration,
    drain_timeout: Duration,
    idle_grace: Duration,
    close_grace: Duration,
    upgrade_signals: Vec<SignalKind>,
    shutdown_signals: Vec<SignalKind>,
    auto_ready: bool,
    stable_parent: bool,
    standby: bool,
    control_socket: Option<PathBuf>,
    max_state_size: usize,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            pid_file: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            idle_grace: DEFAULT_IDLE_GRACE,
            close_grace: DEFAULT_CLOSE_GRACE,
            upgrade_signals: vec![SignalKind::hangup(), SignalKind::user_defined2()],
            shutdown_signals: vec![
                SignalKind::terminate(),
                SignalKind::interrupt(),
                SignalKind::quit(),
            ],
            auto_ready: true,
            stable_parent: false,
            standby: false,
            control_socket: None,
            max_state_size: DEFAULT_MAX_STATE_SIZE,
        }
    }
}

impl Builder {
    /// Writes this process's pid to `path` (atomically) once it is ready,
    /// and removes it on the final shutdown if it still holds our pid.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// How long a new generation may take to become ready before it is
    /// killed (30 s by default).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The longest a drain may take (30 s by default).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How long an idle HTTP/1 connection is kept once draining (500 ms by
    /// default); see [`Serve::idle_grace`](crate::Serve::idle_grace).
    pub fn idle_grace(mut self, grace: Duration) -> Self {
        self.idle_grace = grace;
        self
    }

    /// How long upgraded connections (WebSocket) and event or gRPC streams
    /// have to say goodbye once draining, before they are forced (2 s by
    /// default); see [`Graceful::set_close_grace`].
    pub fn close_grace(mut self, grace: Duration) -> Self {
        self.close_grace = grace;
        self
    }

    /// The signals that start an upgrade (`SIGHUP` and `SIGUSR2` by
    /// default); an empty list handles none.
    pub fn upgrade_signals(mut self, signals: impl IntoIterator<Item = SignalKind>) -> Self {
        self.upgrade_signals = signals.into_iter().collect();
        self
    }

    /// The signals that drain and exit (`SIGTERM`, `SIGINT` and `SIGQUIT`
    /// by default); an empty list handles none.
    pub fn shutdown_signals(mut self, signals: impl IntoIterator<Item = SignalKind>) -> Self {
        self.shutdown_signals = signals.into_iter().collect();
        self
    }

    /// Whether [`Handover::serve`] reports readiness by itself when it
    /// starts accepting (the default). Turn it off for an application that
    /// must warm up first, and call [`Handover::ready`] when it is.
    pub fn auto_ready(mut self, auto: bool) -> Self {
        self.auto_ready = auto;
        self
    }

    /// Whether to keep one process as the stable parent of every
    /// generation where this process's exit would end its container (off
    /// by default; Linux only).
    ///
    /// There (the process is PID 1, or its parent is an init that exits
    /// with it: see [`Error::Pid1`] and [`Error::InitParent`]), upgrades are
    /// refused. With this on, [`from_env`](Builder::from_env) does not
    /// return in that process: it starts the binary again as the first
    /// generation, and stays, as its parent and its successors', until
    /// none is left; then it exits with the newest one's exit status (a
    /// signal's is 128 plus its number; 1 if the newest died while its
    /// predecessor still drained, which reaped it). Meanwhile it passes the upgrade
    /// signals to the current generation and the shutdown signals to every
    /// running one, reaps every child, and passes `READY=1` on to a
    /// `NOTIFY_SOCKET` of its own. The generations, under it, upgrade as
    /// anywhere else. Everywhere else this setting does nothing.
    ///
    /// What runs before `from_env` runs in both processes: set up logging
    /// there, and do the rest after it.
    pub fn stable_parent(mut self, stable: bool) -> Self {
        self.stable_parent = stable;
        self
    }

    /// Whether to keep the next generation started and waiting, so that an
    /// upgrade need not start a process (off by default).
    ///
    /// Starting a process is most of an upgrade's time: on the development
    /// machine, under the restart benchmark's load, the new generation
    /// answered in a median of 3.5 to 4.7 ms after the signal with a
    /// standby, and of 5.7 to 7.7 ms without (see the README). With
    /// this on, 100 ms after this generation is ready it starts its binary
    /// again as a *standby*, which runs `main` up to
    /// [`from_env`](Builder::from_env) and waits there. An upgrade hands it
    /// the listeners instead of starting a process; from there on nothing
    /// differs: the standby must say it is ready within the ready timeout,
    /// or it is killed and reaped and this generation goes on serving. One
    /// that died or hung before it took the listeners is replaced by a
    /// fresh start within the same upgrade.
    ///
    /// An upgrade starts the binary afresh instead when the standby would
    /// not be what a fresh start runs: the binary at this process's path
    /// has been replaced, or the working directory it starts in has
    /// changed (a deploy that points a symlink at a new release), or (on
    /// Linux) a shared library it loaded has been replaced since (a package
    /// upgrade of `libssl`), or the standby has exited. A shutdown kills
    /// the standby; if this process dies, the standby exits by itself.
    ///
    /// What runs before `from_env` runs in the standby ahead of time, and
    /// again whenever a standby is started, used or not: read configuration
    /// (whatever a reload must pick up) after `from_env`, and keep the work
    /// before it small and free of side effects. The standby holds one
    /// idle process's memory meanwhile.
    pub fn standby(mut self, standby: bool) -> Self {
        self.standby = standby;
        self
    }

    /// Listens on a control socket at `path`, where a deploy script or
    /// `systemctl reload` asks for an upgrade and hears its outcome, or
    /// asks how the server is (see [`control`](crate::control)).
    ///
    /// A Unix stream socket, mode 0600, created by the first generation
    /// when it becomes ready and handed to every next generation like a
    /// listener, so its path stays valid across upgrades. A socket file
    /// left by a server that is gone is replaced; one that a live server
    /// accepts on is an error ([`serve`](Handover::serve) fails with it).
    /// Only a peer with this process's uid, or root, is answered.
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.control_socket = Some(path.into());
        self
    }

    /// The most state, in bytes, this generation hands to the next one or
    /// takes from the previous one ([`DEFAULT_MAX_STATE_SIZE`], 1 MiB,
    /// unless set): a bigger snapshot fails the upgrade (see
    /// [`Handover::hand_over_state`]).
    pub fn max_state_size(mut self, bytes: usize) -> Self {
        self.max_state_size = bytes;
        self
    }

    /// Reads the inherited listeners from the environment (see
    /// [`Listeners::from_env`]) and resolves what an upgrade starts: this
    /// binary's path, arguments and working directory, now.
    ///
    /// Call it early in `main`, before other threads use the environment.
    /// With [`stable_parent`](Builder::stable_parent) on, in a process
    /// whose exit would end its container, it does not return unless the
    /// first generation could not be started.
    pub fn from_env(self) -> Result<Handover, Error> {
        #[cfg(target_os = "linux")]
        if self.stable_parent && crate::upgrade::check_parent().is_err() {
            let never = crate::keeper::run(self.upgrade_signals, self.shutdown_signals)?;
            match never {}
        }
        let listeners = Listeners::from_env_with(self.max_state_size)?;
        let upgrader = Upgrader::from_current_process(self.ready_timeout, self.standby)?;
        let graceful = Graceful::new();
        graceful.set_close_grace(self.close_grace);
        Ok(Handover {
            inner: Arc::new(Inner {
                listeners,
                graceful,
                upgrader,
                pid_file: self.pid_file,
                drain_timeout: self.drain_timeout,
                idle_grace: self.idle_grace,
                upgrade_signals: self.upgrade_signals,
                shutdown_signals: self.shutdown_signals,
                auto_ready: self.auto_ready,
                ready: AtomicBool::new(false),
                driver_started: AtomicBool::new(false),
                outcome: Mutex::new(None),
                shutting_down: CancellationToken::new(),
                control_socket: self.control_socket,
                control_tasks: TaskTracker::new(),
                started_at: SystemTime::now(),
                last_upgrade: Mutex::new(None),
                state_source: Mutex::new(None),
                max_state_size: self.max_state_size,
                upgrade_took: Mutex::new(None),
            }),
        })
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

    /// A [`GracefulLayer`] on this generation's drain.
    pub fn layer(&self) -> GracefulLayer {
        self.inner.graceful.layer()
    }

    /// This generation's [`Graceful`] handle.
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
        *self
            .inner
            .state_source
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(snapshot));
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
            last_upgrade: inner
                .last_upgrade
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
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
    /// The pid file could not be written, or the previous generation could
    /// not be told. The other steps are still taken; serving goes on.
    pub fn ready(&self) -> Result<(), Error> {
        if self.inner.ready.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut first_error = None;
        // Handle the upgrade and shutdown signals before anyone can learn
        // this process is ready (pid file, previous generation, systemd):
        // a SIGHUP sent the moment the pid file appears must upgrade, not
        // meet the default disposition, which terminates the process.
        if tokio::runtime::Handle::try_current().is_ok()
            && let Err(e) = self.start_signal_driver()
        {
            log!(error, error = %e, "while becoming ready");
            first_error = Some(e);
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
        note(self.inner.listeners.ready());
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
        let source = inner
            .state_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let max = inner.max_state_size;
        let snapshot = source.map(|source| move || take_snapshot(&source, max));
        let snapshot: Option<Snapshot<'_>> = snapshot.as_ref().map(|take| take as Snapshot<'_>);
        let result = inner
            .upgrader
            .upgrade(&inner.listeners, &inner.shutting_down, snapshot)
            .await;
        match &result {
            // The new generation counts its own success (this process
            // ends, and its metrics with it).
            Ok(_) => {
                *inner.upgrade_took.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(started.elapsed());
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
            *inner.last_upgrade.lock().unwrap_or_else(|e| e.into_inner()) = Some(last);
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
        log!(info, new_pid = pid, "handed over; draining this generation");
        inner.graceful.start_drain();
        Ok(pid)
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
            let mut reader = tokio::io::AsyncReadExt::take(channel, 1024);
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut line).await;
            let Some((took, report)) = std::str::from_utf8(&line).ok().and_then(parse_drain_report)
            else {
                return;
            };
            log!(
                info,
                upgrade_ms = took.as_secs_f64() * 1e3,
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
        let outcome = *self.inner.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let for_good = !matches!(outcome, Some(Outcome::HandedOver(_)));
        if for_good {
            self.inner.listeners.close_bound();
        }
        for_good
    }

    /// Records how this generation ends, unless that is already decided;
    /// returns whether this call decided it.
    fn settle(&self, outcome: Outcome) -> bool {
        let mut settled = self.inner.outcome.lock().unwrap_or_else(|e| e.into_inner());
        let first = settled.is_none();
        if first {
            *settled = Some(outcome);
        }
        first
    }

    /// Serves `service` on `listener` (see [`serve`](crate::serve)) until
    /// this generation hands over or shuts down, then drains; `.await` it.
    ///
    /// The first call starts the signal driver and, unless
    /// [`Builder::auto_ready`] is off, reports readiness. Serve several
    /// listeners by calling it once per listener and awaiting them together:
    /// they share one drain. An axum `Router` without state is best passed
    /// as `app.with_state(())` (see [`serve`](crate::serve#performance)).
    pub fn serve<L, S, B>(&self, listener: L, service: S) -> HandoverServe<L, S>
    where
        L: Listener,
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let handover = self.clone();
        HandoverServe {
            handover: self.clone(),
            serve: crate::serve(listener, service, &self.inner.graceful)
                .idle_grace(self.inner.idle_grace)
                .drain_timeout(self.inner.drain_timeout)
                // After a hand-over, the next generation accepts from the
                // same socket.
                .closes_for_good_if(move || handover.stops_for_good()),
        }
    }

    fn start_signal_driver(&self) -> Result<(), Error> {
        if self.inner.driver_started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Err(e) = self.start_control_socket() {
            // Tried again (and failed again, with the error) by `serve`.
            self.inner.driver_started.store(false, Ordering::SeqCst);
            return Err(e);
        }
        let mut rx = signal_channel(&self.inner.upgrade_signals, &self.inner.shutdown_signals)?;
        let handover = self.clone();
        tokio::spawn(async move {
            while let Some((kind, upgrade)) = rx.recv().await {
                let signal = kind.as_raw_value();
                if upgrade {
                    log!(info, signal, "upgrade requested");
                    let handover = handover.clone();
                    // Its own task, so that a shutdown signal is heard
                    // while the upgrade waits for the child.
                    tokio::spawn(async move {
                        if let Err(e) = handover.upgrade().await {
                            log!(error, error = %e, "upgrade refused or failed");
                        }
                    });
                } else {
                    log!(info, signal, "shutdown requested");
                    handover.shutdown();
                }
            }
        });
        Ok(())
    }

    /// Takes the control socket (inherited, or bound afresh with mode 0600)
    /// and answers on it until this generation drains, if there is one.
    fn start_control_socket(&self) -> Result<(), Error> {
        let Some(path) = &self.inner.control_socket else {
            return Ok(());
        };
        let listener = self.inner.listeners.unix(CONTROL_NAME, path)?;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            log!(warn, path = %path.display(), error = %e, "could not make the control socket 0600");
        }
        let upgrading = self.clone();
        let status = self.clone();
        let controls = Controls {
            upgrade: Box::new(move || {
                let handover = upgrading.clone();
                Box::pin(async move {
                    let started = std::time::Instant::now();
                    let pid = handover.upgrade().await?;
                    Ok(Upgraded {
                        pid,
                        previous_pid: std::process::id(),
                        generation: handover.generation() + 1,
                        took: started.elapsed(),
                    })
                })
            }),
            status: Box::new(move || status.status()),
        };
        let stop = self.inner.graceful.signal().draining();
        tokio::spawn(crate::control::serve(
            listener,
            Arc::new(controls),
            stop,
            self.inner.control_tasks.clone(),
        ));
        log!(info, path = %path.display(), "control socket ready");
        Ok(())
    }

    /// After a hand-over, tells the new generation how this one drained,
    /// on its readiness channel (which closes with it).
    fn tell_the_next_generation(&self, exit: &Exit) {
        let Exit::HandedOver { report, .. } = exit else {
            return;
        };
        let Some(mut channel) = self.inner.upgrader.take_report_channel() else {
            return;
        };
        let took = self
            .inner
            .upgrade_took
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_default();
        let line = drain_report_line(took, report);
        let _ = channel.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = std::io::Write::write_all(&mut channel, line.as_bytes());
    }

    fn finish(&self, report: DrainReport) -> Exit {
        let outcome = *self.inner.outcome.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Some(Outcome::HandedOver(pid)) => Exit::HandedOver { pid, report },
            Some(Outcome::Shutdown) | None => {
                // A next generation that became ready as the shutdown came
                // serves on these files' sockets.
                if !self.inner.upgrader.has_handed_over() {
                    self.inner.listeners.remove_socket_files();
                }
                if let Some(path) = &self.inner.pid_file
                    && let Err(e) = notify::remove_pid_file_if_ours(path)
                {
                    log!(warn, error = %e, "could not remove the pid file");
                }
                Exit::Shutdown { report }
            }
        }
    }
}

/// What a generation that handed over tells the new one once drained:
/// how long the upgrade took, and its drain report.
fn drain_report_line(took: Duration, report: &DrainReport) -> String {
    format!(
        "DRAINED upgrade_ms={:.3} drain_ms={:.3} requests_finished={} requests_forced={} \
         connections_finished={} connections_forced={} upgraded_finished={} upgraded_forced={}\n",
        took.as_secs_f64() * 1e3,
        report.elapsed.as_secs_f64() * 1e3,
        report.requests_finished,
        report.requests_forced,
        report.connections_finished,
        report.connections_forced,
        report.upgraded_finished,
        report.upgraded_forced,
    )
}

/// The other side of [`drain_report_line`]; `None` if it is not one.
fn parse_drain_report(line: &str) -> Option<(Duration, DrainReport)> {
    let fields = line.trim_end().strip_prefix("DRAINED ")?;
    let mut report = DrainReport::default();
    let mut took = Duration::ZERO;
    let ms = |value: &str| {
        value
            .parse::<f64>()
            .ok()
            .and_then(|ms| Duration::try_from_secs_f64(ms / 1e3).ok())
    };
    for field in fields.split(' ') {
        let (key, value) = field.split_once('=')?;
        let count = || value.parse::<usize>().ok();
        match key {
            "upgrade_ms" => took = ms(value)?,
            "drain_ms" => report.elapsed = ms(value)?,
            "requests_finished" => report.requests_finished = count()?,
            "requests_forced" => report.requests_forced = count()?,
            "connections_finished" => report.connections_finished = count()?,
            "connections_forced" => report.connections_forced = count()?,
            "upgraded_finished" => report.upgraded_finished = count()?,
            "upgraded_forced" => report.upgraded_forced = count()?,
            // A newer generation's: not ours to read.
            _ => {}
        }
    }
    Some((took, report))
}

/// Runs `source` for the next generation's state: its bytes, or why the
/// upgrade cannot hand them over.
fn take_snapshot(source: &StateSource, max: usize) -> Result<Vec<u8>, Error> {
    let reason = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| source())) {
        Ok(Ok(bytes)) if bytes.len() <= max => return Ok(bytes),
        Ok(Ok(bytes)) => format!(
            "the snapshot is {} bytes, more than the limit of {max} (Builder::max_state_size)",
            bytes.len()
        ),
        Ok(Err(e)) => format!("the snapshot failed: {e}"),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            format!("the snapshot panicked: {what}")
        }
    };
    Err(Error::State { reason })
}

/// Starts handling `upgrade` and `shutdown` signals (within the current
/// runtime); each one received comes out of the channel with whether it is
/// an upgrade signal.
pub(crate) fn signal_channel(
    upgrade: &[SignalKind],
    shutdown: &[SignalKind],
) -> Result<tokio::sync::mpsc::UnboundedReceiver<(SignalKind, bool)>, Error> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let kinds = upgrade
        .iter()
        .map(|k| (*k, true))
        .chain(shutdown.iter().map(|k| (*k, false)));
    for (kind, is_upgrade) in kinds {
        let mut stream = signal(kind)
            .map_err(|e| Error::io(format!("listening for signal {}", kind.as_raw_value()), e))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send((kind, is_upgrade)).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
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

/// The future-to-be of [`Handover::serve`]; `.await` it.
#[must_use = "a server does nothing until it is `.await`ed"]
pub struct HandoverServe<L: Listener, S, A: Accept<L::Io> = DefaultAcceptor> {
    handover: Handover,
    serve: crate::Serve<L, S, A>,
}

impl<L: Listener, S, A: Accept<L::Io>> HandoverServe<L, S, A> {
    /// Whether accepted TCP connections get `TCP_NODELAY` (on by default).
    pub fn tcp_nodelay(mut self, nodelay: bool) -> Self {
        self.serve = self.serve.tcp_nodelay(nodelay);
        self
    }

    /// Gives every request what `make` says of its connection, such as
    /// axum's `ConnectInfo`; see [`Serve::connect_info`](crate::Serve::connect_info).
    ///
    /// ```no_run
    /// use std::net::SocketAddr;
    /// use axum::{Router, extract::ConnectInfo, routing::get};
    ///
    /// # async fn run() -> Result<(), handover::Error> {
    /// let handover = handover::Handover::from_env()?;
    /// let listener = handover.tcp("http", "127.0.0.1:3000")?;
    /// let app = Router::new().route(
    ///     "/",
    ///     get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("hello {peer}") }),
    /// );
    /// handover
    ///     .serve(listener, app)
    ///     .connect_info(|_, peer: &SocketAddr| ConnectInfo(*peer))
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn connect_info<T, F>(mut self, make: F) -> Self
    where
        F: Fn(&L::Io, &L::Addr) -> T + Send + Sync + 'static,
        T: Clone + Send + Sync + 'static,
    {
        self.serve = self.serve.connect_info(make);
        self
    }

    /// Adjusts hyper-util's HTTP/1 and HTTP/2 server settings (HTTP/2
    /// keep-alive pings, stream limits); see
    /// [`Serve::http_builder`](crate::Serve::http_builder).
    pub fn http_builder<F>(mut self, configure: F) -> Self
    where
        F: FnOnce(&mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>)
            + Send
            + 'static,
    {
        self.serve = self.serve.http_builder(configure);
        self
    }

    /// Whether every request gets a [`ShutdownSignal`](crate::ShutdownSignal)
    /// in its extensions (off by default: add [`Handover::layer`] to the
    /// routes whose handlers read it); see
    /// [`Serve::signal_extension`](crate::Serve::signal_extension).
    pub fn signal_extension(mut self, enabled: bool) -> Self {
        self.serve = self.serve.signal_extension(enabled);
        self
    }

    /// How long an HTTP/1 connection may take to send a whole request head
    /// (30 s by default); see
    /// [`Serve::header_read_timeout`](crate::Serve::header_read_timeout).
    pub fn header_read_timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.serve = self.serve.header_read_timeout(timeout);
        self
    }

    /// The longest an acceptor's handshake may take (10 s by default); see
    /// [`Serve::handshake_timeout`](crate::Serve::handshake_timeout).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.serve = self.serve.handshake_timeout(timeout);
        self
    }

    /// Gives every request what `make` says of its connection as the
    /// acceptor returned it (a TLS client's certificate, say); see
    /// [`Serve::accepted_info`](crate::Serve::accepted_info).
    pub fn accepted_info<T, F>(mut self, make: F) -> Self
    where
        F: Fn(&A::Io) -> T + Send + Sync + 'static,
        T: Clone + Send + Sync + 'static,
    {
        self.serve = self.serve.accepted_info(make);
        self
    }
}

impl<L: Listener, S> HandoverServe<L, S> {
    /// Runs `acceptor` (a TLS handshake, say) on each accepted connection
    /// and serves HTTP on what it returns; see
    /// [`Serve::acceptor`](crate::Serve::acceptor).
    ///
    /// Each generation builds its acceptor at start-up, so a `SIGHUP` after
    /// a certificate renewal is all it takes to serve the new certificate.
    pub fn acceptor<A>(self, acceptor: A) -> HandoverServe<L, S, A>
    where
        A: Accept<L::Io>,
    {
        HandoverServe {
            handover: self.handover,
            serve: self.serve.acceptor(acceptor),
        }
    }
}

impl<L: Listener, S, A: Accept<L::Io>> fmt::Debug for HandoverServe<L, S, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandoverServe")
            .field("serve", &self.serve)
            .finish_non_exhaustive()
    }
}

impl<L, S, B, A> IntoFuture for HandoverServe<L, S, A>
where
    L: Listener,
    A: Accept<L::Io>,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = Result<Exit, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        let HandoverServe { handover, serve } = self;
        Box::pin(async move {
            handover.start_signal_driver()?;
            // The listener accepts from the moment `serve` is first polled,
            // and connections wait in its backlog until then: ready now.
            if handover.inner.auto_ready {
                let _ = handover.ready();
            }
            let report = serve.await.map_err(|e| Error::io("serving", e))?;
            // A shutdown during an upgrade has cancelled it: let it kill and
            // reap its child before this process exits, or the child would
            // be left running.
            let upgrader = &handover.inner.upgrader;
            if upgrader.is_running()
                && tokio::time::timeout(Duration::from_secs(10), upgrader.wait_ended())
                    .await
                    .is_err()
            {
                log!(
                    error,
                    "a pending upgrade did not end in 10 s; exiting anyway"
                );
            }
            if let Some(mut standby) = upgrader.discard_standby() {
                let _ = tokio::time::timeout(Duration::from_secs(5), standby.wait()).await;
            }
            // The answer to the `upgrade` that ended this generation.
            let control = &handover.inner.control_tasks;
            control.close();
            let _ = tokio::time::timeout(Duration::from_secs(5), control.wait()).await;
            let exit = handover.finish(report);
            handover.tell_the_next_generation(&exit);
            Ok(exit)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_report_reads_back_and_a_line_that_is_not_one_does_not() {
        let report = DrainReport {
            requests_finished: 7,
            requests_forced: 1,
            connections_finished: 5,
            connections_forced: 2,
            upgraded_finished: 3,
            upgraded_forced: 4,
            elapsed: Duration::from_millis(1500),
        };
        let took = Duration::from_micros(3_210);
        let line = drain_report_line(took, &report);
        assert_eq!(parse_drain_report(&line), Some((took, report)));
        // A newer generation's extra keys are passed over.
        let newer = line.replace("DRAINED ", "DRAINED extra=1 ");
        assert_eq!(parse_drain_report(&newer), Some((took, report)));
        assert_eq!(parse_drain_report("READY=12\n"), None);
        assert_eq!(parse_drain_report("DRAINED drain_ms=x"), None);
        assert_eq!(parse_drain_report("DRAINED requests_finished"), None);
    }
}
