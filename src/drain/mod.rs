//! The drain: how much work this process still owes its clients, and the
//! wait until that work is done or its deadline has passed.
//!
//! Part of the drain half: it knows nothing of processes.

mod count;
mod registered;
mod report;
mod signal;
mod tokens;

use std::collections::HashMap;
use std::fmt;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::lock::lock;
use crate::log::Ms;
use count::Requests;

pub(crate) use registered::poll_registered;
pub use report::DrainReport;
pub use signal::{DrainSignal, Draining};
pub use tokens::{ConnectionToken, UpgradeToken};
pub(crate) use tokens::{Force, Hold, RequestGuard};

/// A handle on the work this process still owes its clients.
///
/// `Graceful` counts in-flight requests (from the moment a request reaches
/// [its layer](Graceful::layer) or [`serve`](crate::serve()) until its response body has
/// ended or been dropped), open connections (those [`serve`](crate::serve())
/// accepts, or your own accept loop's [`ConnectionToken`]s), and upgraded
/// connections such as WebSockets. It starts a drain, and
/// [`drain`](Graceful::drain) waits until that work is done or the drain
/// timeout has passed; long-lived work gets a shorter
/// [close grace](GracefulBuilder::close_grace) first.
///
/// Both times belong to the handle, set once when it is built: every serve
/// loop and layer on the same handle drains by them.
///
/// Cloning is cheap (one reference count): every clone sees and controls the
/// same counts.
///
/// # Compared with `TaskTracker` and `CancellationToken`
///
/// tokio-util's [`TaskTracker`](tokio_util::task::TaskTracker) counts tasks
/// and [`CancellationToken`] announces a shutdown; `Graceful` is the pair of
/// them specialised for a server. It keeps separate counts for requests and
/// connections, knows how many of them ended during the drain and how many
/// had to be forced, always has a deadline, and needs no `close()` call
/// before its wait can return. A request costs one atomic operation when it
/// starts and one when it ends.
///
/// # Examples
///
/// Drain a server on Ctrl-C, waiting at most 30 seconds:
///
/// ```no_run
/// use std::time::Duration;
/// use handover::Graceful;
///
/// # async fn run() -> std::io::Result<()> {
/// let graceful = Graceful::builder()
///     .drain_timeout(Duration::from_secs(30))
///     .build();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
///
/// let trigger = graceful.clone();
/// tokio::spawn(async move {
///     let _ = tokio::signal::ctrl_c().await;
///     trigger.start_drain();
/// });
///
/// let report = handover::serve(listener, app, &graceful).await?;
/// println!("{report}");
/// # Ok(())
/// # }
/// ```
///
/// Count and drain with only the layer, on time that is paused in tests:
///
/// ```
/// use std::time::Duration;
/// use handover::Graceful;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let graceful = Graceful::new();
/// assert_eq!(graceful.in_flight(), 0);
///
/// // Nothing in flight: the drain ends at once.
/// let report = graceful.drain().await;
/// assert!(report.is_clean());
/// assert_eq!(report.elapsed, Duration::ZERO);
/// # }
/// ```
#[derive(Clone)]
pub struct Graceful {
    shared: Arc<Shared>,
}

/// Builds a [`Graceful`] with its drain timeout and close grace; made by
/// [`Graceful::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct GracefulBuilder {
    drain_timeout: Duration,
    close_grace: Duration,
}

impl GracefulBuilder {
    /// The longest a drain may take, from its start
    /// ([`Graceful::DEFAULT_DRAIN_TIMEOUT`], 30 s, unless set). After it,
    /// what is left is closed and counted as forced in the [`DrainReport`].
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// How long, once the drain has started, upgraded connections and
    /// event or gRPC streams have to say goodbye before they are forced
    /// ([`Graceful::DEFAULT_CLOSE_GRACE`], 2 s, unless set). It is capped by
    /// the drain timeout.
    ///
    /// When the close grace passes:
    /// - every upgraded connection still open is forced: its reads and
    ///   writes fail from then on (when [`serve`](crate::serve()) owns its
    ///   IO), and it counts as forced in the [`DrainReport`], so the drain
    ///   no longer waits for it;
    /// - under [`serve`](crate::serve()), an HTTP/2 connection that still
    ///   carries a WebSocket (RFC 8441) is closed once its other requests
    ///   are answered, and counts the same way;
    /// - a server-sent event stream (`text/event-stream`) that is waiting
    ///   for its next event ends there, cleanly, after its last whole event;
    /// - a gRPC response stream (`application/grpc`) that is waiting for its
    ///   next message ends there with status `UNAVAILABLE` (14), which
    ///   clients and retry policies treat as "try again".
    ///
    /// Other response bodies (downloads) keep going until the drain timeout.
    /// Handlers that watch the [`DrainSignal`] say goodbye long before.
    pub fn close_grace(mut self, grace: Duration) -> Self {
        self.close_grace = grace;
        self
    }

    /// The handle, with nothing in flight and no drain started.
    pub fn build(self) -> Graceful {
        Graceful {
            shared: Arc::new(Shared {
                requests: Requests::new(),
                connections: Counter::default(),
                upgraded: Counter::default(),
                upgraded_forced: AtomicUsize::new(0),
                handed_over: AtomicUsize::new(0),
                holds: AtomicUsize::new(0),
                upgrades: Mutex::default(),
                drain_timeout: self.drain_timeout,
                close_grace: self.close_grace.min(self.drain_timeout),
                draining: AtomicBool::new(false),
                drain_started: CancellationToken::new(),
                force: CancellationToken::new(),
                started_at: OnceLock::new(),
                signal_layers: AtomicBool::new(false),
            }),
        }
    }
}

impl Default for GracefulBuilder {
    fn default() -> Self {
        Self {
            drain_timeout: Graceful::DEFAULT_DRAIN_TIMEOUT,
            close_grace: Graceful::DEFAULT_CLOSE_GRACE,
        }
    }
}

/// The state every clone of a [`Graceful`], every signal and every token
/// points to (a request's guard holds only a reference to the count's
/// slot).
pub(crate) struct Shared {
    /// In-flight requests, and the drain flag in the same word (see
    /// `count`); also what a drain waits on ([`Requests::idle`]) and the
    /// close grace's token ([`Requests::close`]).
    requests: Requests,
    connections: Counter,
    upgraded: Counter,
    /// Upgraded connections forced at the close grace.
    upgraded_forced: AtomicUsize,
    /// Connections given up to the next generation in the drain.
    handed_over: AtomicUsize,
    /// What keeps the drain from ending besides the counts (see [`Hold`]).
    holds: AtomicUsize,
    /// Every live [`UpgradeToken`], so the close grace can force them all.
    upgrades: Mutex<Upgrades>,
    drain_timeout: Duration,
    close_grace: Duration,
    /// Set once, when the drain starts. Read on every connection release,
    /// so it is a plain atomic rather than the token (whose `is_cancelled`
    /// locks).
    draining: AtomicBool,
    /// Fires when the drain starts (what `DrainSignal` waits on).
    drain_started: CancellationToken,
    /// Fires when the drain deadline has passed: the serve loop aborts what is left.
    force: CancellationToken,
    /// When the drain started.
    started_at: OnceLock<Instant>,
    /// A layer that puts the [`DrainSignal`] in has wrapped a service: the serve loop makes room for it in each request's
    /// extensions (see `serve::presized`).
    signal_layers: AtomicBool,
}

/// Connections or upgraded connections open, and how many ended in the
/// drain.
#[derive(Default)]
struct Counter {
    active: AtomicUsize,
    finished_in_drain: AtomicUsize,
}

#[derive(Default)]
struct Upgrades {
    next_id: u64,
    live: HashMap<u64, Option<Weak<dyn Force>>>,
    /// The close grace has passed: upgrades from now on are forced at once.
    closed: bool,
}

impl Default for Graceful {
    fn default() -> Self {
        Self::new()
    }
}

impl Graceful {
    /// The drain timeout unless [`GracefulBuilder::drain_timeout`] says
    /// otherwise: 30 s.
    pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    /// The close grace unless [`GracefulBuilder::close_grace`] says
    /// otherwise: 2 s.
    pub const DEFAULT_CLOSE_GRACE: Duration = Duration::from_secs(2);

    /// A handle with the default drain timeout and close grace.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder, to set the drain timeout and the close grace.
    pub fn builder() -> GracefulBuilder {
        GracefulBuilder::default()
    }

    /// Notes that a layer putting the signal in each request wraps a
    /// service (see `Shared::signal_layers`).
    pub(crate) fn note_signal_layer(&self) {
        self.shared.signal_layers.store(true, Ordering::Relaxed);
    }

    /// Whether a layer putting the signal in each request has wrapped a
    /// service.
    pub(crate) fn has_signal_layer(&self) -> bool {
        self.shared.signal_layers.load(Ordering::Relaxed)
    }

    /// A [`DrainSignal`] that resolves when this handle starts draining.
    pub fn signal(&self) -> DrainSignal {
        self.signal_with(false)
    }

    /// A signal whose [`track_upgrade`](DrainSignal::track_upgrade) counts
    /// nothing when `upgrades_tracked` (the serve loop tracks them itself).
    #[inline]
    pub(crate) fn signal_with(&self, upgrades_tracked: bool) -> DrainSignal {
        DrainSignal::new(self.shared.clone(), upgrades_tracked)
    }

    /// Requests in flight now: counted from the layer's (or the serve
    /// loop's) `call` until the response body ends, or until the response
    /// future or body is dropped.
    pub fn in_flight(&self) -> usize {
        self.shared.requests.count()
    }

    /// Connections open now, as tracked by [`serve`](crate::serve()) or by
    /// [`ConnectionToken`]s of your own accept loop.
    pub fn connections(&self) -> usize {
        self.shared.connections.active.load(Ordering::SeqCst)
    }

    /// Upgraded connections (WebSocket, say) open now, as tracked by
    /// [`serve`](crate::serve()) or by [`UpgradeToken`]s.
    pub fn upgraded(&self) -> usize {
        self.shared.upgraded.active.load(Ordering::SeqCst)
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared.is_draining()
    }

    /// The drain timeout: see [`GracefulBuilder::drain_timeout`].
    pub fn drain_timeout(&self) -> Duration {
        self.shared.drain_timeout
    }

    /// The close grace: see [`GracefulBuilder::close_grace`].
    pub fn close_grace(&self) -> Duration {
        self.shared.close_grace
    }

    /// Starts the drain without waiting for it: every [`DrainSignal`]
    /// fires, [`serve`](crate::serve()) stops accepting, and HTTP/1 responses
    /// carry `Connection: close` from now on.
    ///
    /// Calling it again does nothing.
    pub fn start_drain(&self) {
        let shared = &*self.shared;
        let _ = shared.started_at.set(Instant::now());
        if !shared.draining.swap(true, Ordering::SeqCst) {
            shared.requests.start_draining();
            log!(
                info,
                in_flight = self.in_flight(),
                connections = self.connections(),
                "drain started"
            );
            shared.drain_started.cancel();
        }
    }

    /// Starts a drain that gives plaintext HTTP/1 connections up to the
    /// next generation, which takes them over, instead of closing them
    /// (see `serve::connection`): what a hand-over starts. Calling it once
    /// the drain has started does not change how it drains.
    pub(crate) fn start_drain_giving_up(&self) {
        if !self.is_draining() {
            self.shared.requests.give_up_connections();
        }
        self.start_drain();
    }

    /// Whether the drain gives connections up to the next generation (it
    /// was started by [`start_drain_giving_up`](Self::start_drain_giving_up)).
    pub(crate) fn gives_up_connections(&self) -> bool {
        self.shared.requests.gives_up()
    }

    /// Keeps the drain from ending until the returned hold is dropped,
    /// without counting anything in its report: what takes connections
    /// over from the previous generation holds one while that generation
    /// may still send some.
    pub(crate) fn hold(&self) -> Hold {
        Hold::new(&self.shared)
    }

    /// Starts the drain if it has not started, then waits until no request,
    /// no connection and no upgraded connection is left, or until the drain
    /// timeout has passed since the drain started.
    ///
    /// It returns the moment the last count reaches zero (it is woken by
    /// that release, not by a polling tick). When the deadline passes first,
    /// what is left is counted as forced in the [`DrainReport`], and the
    /// connections that [`serve`](crate::serve()) still holds are closed.
    ///
    /// Requests that arrive during the drain are still counted, so the drain
    /// also waits for them. Every serve loop on this handle calls it once
    /// it stops accepting: they all wait for the same deadline.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the wait, not the drain: the drain stays
    /// started, and calling `drain` again waits for the same deadline.
    pub async fn drain(&self) -> DrainReport {
        self.start_drain();
        let shared = &*self.shared;
        let started = *shared.started_at.get_or_init(Instant::now);
        let deadline = started + shared.drain_timeout;
        let close_at = started + shared.close_grace;

        let mut idle = pin!(shared.wait_idle());
        let mut closed = shared.requests.close().is_cancelled();
        let finished_in_time = loop {
            tokio::select! {
                biased;
                () = &mut idle => break true,
                () = tokio::time::sleep_until(close_at), if !closed => {
                    closed = true;
                    shared.close_long_lived();
                }
                () = tokio::time::sleep_until(deadline) => break false,
            }
        };
        let (requests_forced, connections_forced) = if finished_in_time {
            (0, 0)
        } else {
            let left = (self.in_flight(), self.connections());
            log!(
                warn,
                requests = left.0,
                connections = left.1,
                "drain deadline passed; forcing what is left"
            );
            shared.close_long_lived();
            shared.force.cancel();
            left
        };
        let report = DrainReport {
            requests_finished: shared.requests.finished_in_drain(),
            requests_forced,
            connections_finished: shared.connections.finished_in_drain.load(Ordering::SeqCst),
            connections_forced,
            upgraded_finished: shared.upgraded.finished_in_drain.load(Ordering::SeqCst),
            upgraded_forced: shared.upgraded_forced.load(Ordering::SeqCst),
            connections_handed_over: shared.handed_over.load(Ordering::SeqCst),
            elapsed: Instant::now().saturating_duration_since(started),
        };
        crate::metrics::drained(report.counts(), report.elapsed);
        log!(
            info,
            requests_finished = report.requests_finished,
            requests_forced = report.requests_forced,
            connections_finished = report.connections_finished,
            connections_forced = report.connections_forced,
            upgraded_finished = report.upgraded_finished,
            upgraded_forced = report.upgraded_forced,
            connections_handed_over = report.connections_handed_over,
            elapsed_ms = %Ms(report.elapsed),
            "drain finished"
        );
        report
    }

    /// Counts one connection until the returned token is dropped.
    ///
    /// [`serve`](crate::serve()) does this for you; use it when you run your
    /// own accept loop and want [`drain`](Graceful::drain) to wait for the
    /// connections too.
    pub fn connection_token(&self) -> ConnectionToken {
        ConnectionToken::new(&self.shared)
    }

    /// Counts one upgraded connection (a WebSocket, say) until the returned
    /// token is dropped.
    ///
    /// [`serve`](crate::serve()) does this for you; use it with another
    /// server (`axum::serve`, your own accept loop) and move the token into
    /// the task that serves the upgraded connection. In a handler,
    /// [`DrainSignal::track_upgrade`] is the same, and counts nothing
    /// extra when the serve loop tracks upgrades already.
    pub fn upgrade_token(&self) -> UpgradeToken {
        UpgradeToken::new(&self.shared, None)
    }

    /// Counts an upgraded connection that the close grace can force.
    pub(crate) fn upgrade_token_forcing(&self, force: Weak<dyn Force>) -> UpgradeToken {
        UpgradeToken::new(&self.shared, Some(force))
    }

    /// This handle's identity: the same for every clone, and unlike any
    /// other handle's while this one lives. Never 0.
    #[inline]
    pub(crate) fn id(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    #[inline]
    pub(crate) fn request_guard(&self) -> RequestGuard {
        RequestGuard::new(self.shared.requests.count_one())
    }

    /// Resolves once the drain deadline has passed and what is left must be
    /// closed.
    pub(crate) fn forced(&self) -> WaitForCancellationFutureOwned {
        self.shared.force.clone().cancelled_owned()
    }

    /// Resolves once the close grace has passed (or the deadline, if that
    /// comes first).
    pub(crate) fn closing(&self) -> WaitForCancellationFutureOwned {
        self.shared.requests.close().cancelled_owned()
    }
}

impl fmt::Debug for Graceful {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Graceful")
            .field("in_flight", &self.in_flight())
            .field("connections", &self.connections())
            .field("draining", &self.is_draining())
            .finish_non_exhaustive()
    }
}

impl Shared {
    #[inline]
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    #[inline]
    fn release(&self, counter: &Counter) {
        self.settle(counter, true);
    }

    /// Takes one off `counter`, counting it as finished when `finished` and
    /// a drain runs.
    #[inline]
    fn settle(&self, counter: &Counter, finished: bool) {
        // Decrement first, then read the flag: a drain that set the flag
        // before this read also sees the decrement when it reads the counts,
        // so a release that makes them zero can never be missed.
        let previous = counter.active.fetch_sub(1, Ordering::SeqCst);
        if self.draining.load(Ordering::SeqCst) {
            self.settle_in_drain(counter, finished, previous);
        }
    }

    /// The rest of [`settle`](Self::settle) once draining: kept out of the
    /// hot path.
    #[cold]
    #[inline(never)]
    fn settle_in_drain(&self, counter: &Counter, finished: bool, previous: usize) {
        if finished {
            counter.finished_in_drain.fetch_add(1, Ordering::SeqCst);
        }
        if previous == 1 {
            self.requests.idle().notify_waiters();
        }
    }

    fn upgrades(&self) -> MutexGuard<'_, Upgrades> {
        lock(&self.upgrades)
    }

    /// The close grace has passed: end long-lived responses and force every
    /// upgraded connection still open (and every one upgraded from now on).
    fn close_long_lived(&self) {
        self.requests.close().cancel();
        let live = {
            let mut upgrades = self.upgrades();
            upgrades.closed = true;
            std::mem::take(&mut upgrades.live)
        };
        if !live.is_empty() {
            log!(
                info,
                upgraded = live.len(),
                "close grace passed; forcing upgraded connections"
            );
        }
        for force in live.into_values() {
            self.force_upgraded(force);
            self.settle(&self.upgraded, false);
        }
    }

    /// Counts one upgraded connection as forced, and forces its IO when
    /// the serve loop owns it.
    fn force_upgraded(&self, force: Option<Weak<dyn Force>>) {
        self.upgraded_forced.fetch_add(1, Ordering::SeqCst);
        if let Some(force) = force.and_then(|weak| weak.upgrade()) {
            force.force();
        }
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.requests.idle().notified();
            tokio::pin!(notified);
            // Register before reading the counts, so a release between the
            // read and the await still wakes us.
            notified.as_mut().enable();
            if self.requests.count() == 0
                && self.connections.active.load(Ordering::SeqCst) == 0
                && self.upgraded.active.load(Ordering::SeqCst) == 0
                && self.holds.load(Ordering::SeqCst) == 0
            {
                return;
            }
            notified.await;
        }
    }
}
