//! [`Builder`]: how a [`Handover`] is configured.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::SignalKind;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Handover, Inner};
use crate::drain::Graceful;
use crate::error::Error;
use crate::inherit::Listeners;
use crate::upgrade::Upgrader;

/// Configures a [`Handover`]; made by [`Handover::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct Builder {
    pid_file: Option<PathBuf>,
    ready_timeout: Duration,
    drain_timeout: Duration,
    close_grace: Duration,
    upgrade_signals: Vec<SignalKind>,
    shutdown_signals: Vec<SignalKind>,
    auto_ready: bool,
    stable_parent: bool,
    standby: bool,
    control_socket: Option<PathBuf>,
    max_state_size: usize,
    hand_over_connections: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            pid_file: None,
            ready_timeout: Self::DEFAULT_READY_TIMEOUT,
            drain_timeout: Graceful::DEFAULT_DRAIN_TIMEOUT,
            close_grace: Graceful::DEFAULT_CLOSE_GRACE,
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
            max_state_size: Self::DEFAULT_MAX_STATE_SIZE,
            hand_over_connections: true,
        }
    }
}

impl Builder {
    /// The ready timeout unless [`ready_timeout`](Self::ready_timeout) says
    /// otherwise: 30 s.
    pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
    /// The most state a generation hands over or takes unless
    /// [`max_state_size`](Self::max_state_size) says otherwise: 1 MiB.
    pub const DEFAULT_MAX_STATE_SIZE: usize = crate::inherit::DEFAULT_MAX_STATE_SIZE;

    /// Writes this process's pid to `path` (atomically) once it is ready,
    /// and removes it on the final shutdown if it still holds our pid.
    ///
    /// Put it in a directory only this user can write (`/run/<app>`,
    /// `$XDG_RUNTIME_DIR`): in one anyone can write, such as `/tmp`,
    /// another user who creates the file first owns it, and an operator's
    /// `kill $(cat …)` then signals whatever they wrote there. Links and
    /// FIFOs planted at its paths are never followed or waited on.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = Some(path.into());
        self
    }

    /// How long a new generation may take to become ready before it is
    /// killed ([`DEFAULT_READY_TIMEOUT`](Self::DEFAULT_READY_TIMEOUT), 30 s,
    /// unless set).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The longest a drain may take: the drain timeout of this
    /// generation's [`Graceful`] (see
    /// [`GracefulBuilder::drain_timeout`](crate::GracefulBuilder::drain_timeout)).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How long upgraded connections (WebSocket) and event or gRPC streams
    /// have to say goodbye once draining, before they are forced: the close
    /// grace of this generation's [`Graceful`] (see
    /// [`GracefulBuilder::close_grace`](crate::GracefulBuilder::close_grace)).
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
    /// predecessor still drained, which reaped it). Meanwhile it passes the
    /// upgrade signals to the current generation and the shutdown signals
    /// to every running one, reaps every child, and passes `READY=1` on to
    /// a `NOTIFY_SOCKET` of its own. The generations, under it, upgrade as
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
    /// Starting a process is most of an upgrade's time. With this on,
    /// shortly after this generation is ready it starts its binary again as
    /// a *standby*, which runs `main` up to [`from_env`](Builder::from_env)
    /// and waits there. An upgrade hands it the listeners instead of
    /// starting a process; from there on nothing differs: the standby must
    /// say it is ready within the ready timeout, or it is killed and reaped
    /// and this generation goes on serving. One that died or hung before it
    /// took the listeners is replaced by a fresh start within the same
    /// upgrade.
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
    /// Only a peer with this process's uid, or root, is answered, and the
    /// mode is set before the socket exists at the path. Put it in a
    /// directory only this user can write, as the pid file.
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.control_socket = Some(path.into());
        self
    }

    /// The most state, in bytes, this generation hands to the next one or
    /// takes from the previous one
    /// ([`DEFAULT_MAX_STATE_SIZE`](Self::DEFAULT_MAX_STATE_SIZE), 1 MiB,
    /// unless set): a bigger snapshot fails the upgrade (see
    /// [`Handover::hand_over_state`]).
    pub fn max_state_size(mut self, bytes: usize) -> Self {
        self.max_state_size = bytes;
        self
    }

    /// Whether idle HTTP/1 connections move to the next generation at an
    /// upgrade (on unless turned off), instead of being closed.
    ///
    /// When the next generation is ready, each plaintext HTTP/1 connection
    /// that [`Handover::serve`] serves here is handed to it as soon as it
    /// is idle (at once if it is, after the response in flight if not),
    /// with whatever the client had sent of its next request: the client
    /// goes on using the same TCP connection, and never sees a close. A
    /// connection the next generation does not take (it is an older
    /// version, or this is off in it, or it does not serve that listener)
    /// is drained here as before. HTTP/2, TLS, upgraded connections
    /// (WebSocket) and those of [`serve`](crate::serve()) and other servers
    /// are always drained.
    ///
    /// Off, connections are drained: an idle one is closed after the idle
    /// grace, a busy one after its response.
    pub fn hand_over_connections(mut self, on: bool) -> Self {
        self.hand_over_connections = on;
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
        // Off here: the previous generation hears it does not take them.
        if !self.hand_over_connections {
            drop(listeners.take_connections_channel());
        }
        let incoming = super::connections::Incoming::new(listeners.has_connections_channel());
        let upgrader = Upgrader::from_current_process(self.ready_timeout, self.standby)?;
        let graceful = Graceful::builder()
            .drain_timeout(self.drain_timeout)
            .close_grace(self.close_grace)
            .build();
        Ok(Handover {
            inner: Arc::new(Inner {
                listeners,
                graceful,
                upgrader,
                pid_file: self.pid_file,
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
                hand_over_connections: self.hand_over_connections,
                outgoing: Arc::default(),
                incoming: Arc::new(incoming),
            }),
        })
    }
}
