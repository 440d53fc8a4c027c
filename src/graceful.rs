//! The drain core: how much work this process still owes its clients.

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::layer::GracefulLayer;
mod count;
use count::{Counted, Requests};

/// A handle on the work this process still owes its clients.
///
/// `Graceful` counts in-flight requests (from the moment a request reaches
/// [`GracefulLayer`] until its response body has ended or been dropped) and
/// open connections (when the accept loop is [`serve`](crate::serve) or one
/// of your own that holds a [`ConnectionToken`]), and upgraded connections
/// such as WebSockets (tracked by `serve`, or by an [`UpgradeToken`]). It
/// starts a drain, and [`drain`](Graceful::drain) waits until that work is
/// done or a deadline passes; long-lived work gets a shorter
/// [close grace](Graceful::set_close_grace) first.
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
/// had to be forced, and never needs a `close()` call before its wait can
/// return. Its per-request cost is half a `TaskTracker` token's: one atomic
/// operation when the request starts and one when it ends, and no `Arc`
/// cloned (a request refers to its count's state, which is never freed but
/// reused); the count and the drain flag share one word, so a release
/// learns in the same step whether the drain waits for it.
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
/// let graceful = Graceful::new();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
///
/// let trigger = graceful.clone();
/// tokio::spawn(async move {
///     let _ = tokio::signal::ctrl_c().await;
///     trigger.start_drain();
/// });
///
/// let report = handover::serve(listener, app, &graceful)
///     .drain_timeout(Duration::from_secs(30))
///     .await?;
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
/// let report = graceful.drain(Duration::from_secs(10)).await;
/// assert!(report.is_clean());
/// assert_eq!(report.elapsed, Duration::ZERO);
/// # }
/// ```
#[derive(Clone)]
pub struct Graceful {
    shared: Arc<Shared>,
}

/// How long upgraded connections (WebSocket) and event or gRPC streams are
/// given to say goodbye once the drain starts, before they are forced (2 s).
///
/// See [`Graceful::set_close_grace`].
pub const DEFAULT_CLOSE_GRACE: Duration = Duration::from_secs(2);

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
    /// Every live [`UpgradeToken`], so the close grace can force them all.
    upgrades: Mutex<Upgrades>,
    /// In nanoseconds.
    close_grace: AtomicU64,
    /// Set once, when the drain starts. Read on every connection release,
    /// so it is a plain atomic rather than the token (whose `is_cancelled`
    /// locks).
    draining: AtomicBool,
    /// Fires when the drain starts (what `ShutdownSignal` waits on).
    drain_started: CancellationToken,
    /// Fires when the drain deadline has passed: the serve loop aborts what is left.
    force: CancellationToken,
    /// When the drain started.
    started_at: OnceLock<Instant>,
    /// A [`GracefulLayer`] that puts the [`ShutdownSignal`] in has wrapped
    /// a service: the serve loop makes room for it in each request's
    /// extensions (see `serve::Presized`).
    signal_layers: AtomicBool,
}

#[derive(Default)]
struct Counter {
    active: AtomicUsize,
    finished_in_drain: AtomicUsize,
}

/// Something the close grace can force: an upgraded connection's IO.
pub(crate) trait Force: Send + Sync {
    /// Makes the connection fail from now on, waking whoever waits on it.
    fn force(&self);
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
    /// Creates a handle with nothing in flight and no drain started.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                requests: Requests::new(),
                connections: Counter::default(),
                upgraded: Counter::default(),
                upgraded_forced: AtomicUsize::new(0),
                upgrades: Mutex::default(),
                close_grace: AtomicU64::new(DEFAULT_CLOSE_GRACE.as_nanos() as u64),
                draining: AtomicBool::new(false),
                drain_started: CancellationToken::new(),
                force: CancellationToken::new(),
                started_at: OnceLock::new(),
                signal_layers: AtomicBool::new(false),
            }),
        }
    }

    /// A [`GracefulLayer`] that counts every request and its response body
    /// on this handle.
    pub fn layer(&self) -> GracefulLayer {
        GracefulLayer::new(self.clone())
    }

    /// Notes that a [`GracefulLayer`] putting the signal in each request
    /// wraps a service (see `Shared::signal_layers`).
    pub(crate) fn note_signal_layer(&self) {
        self.shared.signal_layers.store(true, Ordering::Relaxed);
    }

    /// Whether a [`GracefulLayer`] putting the signal in each request has
    /// wrapped a service.
    pub(crate) fn has_signal_layer(&self) -> bool {
        self.shared.signal_layers.load(Ordering::Relaxed)
    }

    /// A [`ShutdownSignal`] that resolves when this handle starts draining.
    pub fn signal(&self) -> ShutdownSignal {
        self.signal_with(false)
    }

    /// A signal whose [`track_upgrade`](ShutdownSignal::track_upgrade) counts
    /// nothing when `upgrades_tracked` (the serve loop tracks them itself).
    #[inline]
    pub(crate) fn signal_with(&self, upgrades_tracked: bool) -> ShutdownSignal {
        ShutdownSignal {
            shared: self.shared.clone(),
            upgrades_tracked,
        }
    }

    /// Requests in flight now: counted from the layer's `call` until the
    /// response body ends, or until the response future or body is dropped.
    pub fn in_flight(&self) -> usize {
        self.shared.requests.count()
    }

    /// Connections open now, as tracked by [`serve`](crate::serve) or by
    /// [`ConnectionToken`]s of your own accept loop.
    pub fn connections(&self) -> usize {
        self.shared.connections.active.load(Ordering::SeqCst)
    }

    /// Upgraded connections (WebSocket, say) open now, as tracked by
    /// [`serve`](crate::serve) or by [`UpgradeToken`]s.
    pub fn upgraded(&self) -> usize {
        self.shared.upgraded.active.load(Ordering::SeqCst)
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Sets how long, once the drain has started, upgraded connections and
    /// event or gRPC streams have to say goodbye before they are forced
    /// ([`DEFAULT_CLOSE_GRACE`] unless set). It applies to every clone, and
    /// is capped by the drain's own timeout.
    ///
    /// When the close grace passes:
    /// - every upgraded connection still open is forced: its reads and
    ///   writes fail from then on (when [`serve`](crate::serve) owns its
    ///   IO), and it counts as forced in the [`DrainReport`], so the drain
    ///   no longer waits for it;
    /// - under [`serve`](crate::serve), an HTTP/2 connection that still
    ///   carries a WebSocket (RFC 8441) is closed once its other requests
    ///   are answered, and counts the same way;
    /// - a server-sent event stream (`text/event-stream`) that is waiting
    ///   for its next event ends there, cleanly, after its last whole event;
    /// - a gRPC response stream (`application/grpc`) that is waiting for its
    ///   next message ends there with status `UNAVAILABLE` (14), which
    ///   clients and retry policies treat as "try again".
    ///
    /// Other response bodies (downloads) keep going until the drain timeout.
    /// Handlers that watch the [`ShutdownSignal`] say goodbye long before.
    pub fn set_close_grace(&self, grace: Duration) {
        let nanos = u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX);
        self.shared.close_grace.store(nanos, Ordering::SeqCst);
    }

    /// The close grace: see [`set_close_grace`](Graceful::set_close_grace).
    pub fn close_grace(&self) -> Duration {
        Duration::from_nanos(self.shared.close_grace.load(Ordering::SeqCst))
    }

    /// Starts the drain without waiting for it: every [`ShutdownSignal`]
    /// fires, [`serve`](crate::serve) stops accepting, and HTTP/1 responses
    /// passing through the layer carry `Connection: close` from now on.
    ///
    /// Calling it again does nothing.
    pub fn start_drain(&self) {
        let shared = &*self.shared;
        let now = Instant::now();
        let _ = shared.started_at.set(now);
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

    /// Starts the drain if it has not started, then waits until no request
    /// and no connection is left, or until `timeout` has passed since the
    /// drain started.
    ///
    /// It returns the moment the last count reaches zero (it is woken by
    /// that release, not by a polling tick). When the deadline passes first,
    /// what is left is counted as forced in the [`DrainReport`], and the
    /// connections that [`serve`](crate::serve) still holds are closed.
    ///
    /// Requests that arrive during the drain are still counted, so the drain
    /// also waits for them.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the wait, not the drain: the drain stays
    /// started, and calling `drain` again waits for the same deadline
    /// measured from the same start.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        self.start_drain();
        let started = self.drain_started_at();
        let deadline = started + timeout;
        let close_at = (started + self.close_grace()).min(deadline);
        let shared = &*self.shared;

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
            elapsed_ms = report.elapsed.as_secs_f64() * 1e3,
            "drain finished"
        );
        report
    }

    /// Counts one connection until the returned token is dropped.
    ///
    /// [`serve`](crate::serve) does this for you; use it when you run your
    /// own accept loop and want [`drain`](Graceful::drain) to wait for the
    /// connections too.
    pub fn connection_token(&self) -> ConnectionToken {
        ConnectionToken {
            shared: self.shared.clone(),
            finished: true,
        }
        .acquire()
    }

    /// Counts one upgraded connection (a WebSocket, say) until the returned
    /// token is dropped.
    ///
    /// [`serve`](crate::serve) does this for you; use it with another
    /// server (`axum::serve`, your own accept loop) and move the token into
    /// the task that serves the upgraded connection. In a handler,
    /// [`ShutdownSignal::track_upgrade`] is the same, and counts nothing
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
        RequestGuard {
            request: self.shared.requests.count_one(),
        }
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

    fn drain_started_at(&self) -> Instant {
        *self.shared.started_at.get_or_init(Instant::now)
    }
}

impl fmt::Debug for Graceful {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Graceful")
            .field("in_flight", &self.in_flight())
            .field("connections", &self.connections())
            .field("draining", &self.is_draining())
            .finish()
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
        // The map stays consistent whatever panicked while holding it.
        self.upgrades.lock().unwrap_or_else(PoisonError::into_inner)
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
            {
                return;
            }
            notified.await;
        }
    }
}

/// Holds one request in the count; released on drop (one pointer).
pub(crate) struct RequestGuard {
    request: Counted,
}

impl RequestGuard {
    #[inline]
    pub(crate) fn is_draining(&self) -> bool {
        self.request.is_draining()
    }

    /// Resolves when the close grace has passed.
    pub(crate) fn closing(&self) -> WaitForCancellationFutureOwned {
        self.request.closing()
    }
}

/// Counts one open connection on a [`Graceful`] until it is dropped.
///
/// Made by [`Graceful::connection_token`]. Move it into the task that serves
/// the connection, so that the count falls when the task ends, however it
/// ends.
pub struct ConnectionToken {
    shared: Arc<Shared>,
    /// Counts as finished when dropped (not when the close grace forced it).
    finished: bool,
}

impl ConnectionToken {
    fn acquire(self) -> Self {
        self.shared
            .connections
            .active
            .fetch_add(1, Ordering::SeqCst);
        self
    }

    /// Releases the connection as one the close grace forced for the
    /// WebSockets it carried (over HTTP/2): it counts as upgraded and
    /// forced in the report, not as a finished connection.
    pub(crate) fn forced_at_close_grace(mut self) {
        // Past the deadline, the drain has counted what was left itself.
        if self.shared.force.is_cancelled() {
            return;
        }
        // Counted before the release, which may end the drain.
        self.shared.upgraded_forced.fetch_add(1, Ordering::SeqCst);
        self.finished = false;
    }
}

impl Drop for ConnectionToken {
    fn drop(&mut self) {
        self.shared.settle(&self.shared.connections, self.finished);
    }
}

impl fmt::Debug for ConnectionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionToken").finish_non_exhaustive()
    }
}

/// Counts one upgraded connection (a WebSocket, say) on a [`Graceful`] until
/// it is dropped.
///
/// Made by [`ShutdownSignal::track_upgrade`] or [`Graceful::upgrade_token`].
/// Move it into the task that serves the upgraded connection. When the
/// close grace passes with the token still alive, the connection counts as
/// forced and the drain stops waiting for it.
///
/// [`serve`](crate::serve) tracks upgraded connections by itself, and can
/// also force their IO; tokens are for other servers.
pub struct UpgradeToken {
    shared: Arc<Shared>,
    /// `None` when this token counts nothing (tracked elsewhere, or forced
    /// at once because the close grace had passed).
    id: Option<u64>,
}

impl UpgradeToken {
    fn new(shared: &Arc<Shared>, force: Option<Weak<dyn Force>>) -> Self {
        let mut upgrades = shared.upgrades();
        let id = upgrades.next_id;
        upgrades.next_id += 1;
        if upgrades.closed {
            drop(upgrades);
            log!(debug, "upgraded after the close grace; forced at once");
            shared.force_upgraded(force);
            return Self::untracked(shared);
        }
        shared.upgraded.active.fetch_add(1, Ordering::SeqCst);
        upgrades.live.insert(id, force);
        Self {
            shared: shared.clone(),
            id: Some(id),
        }
    }

    fn untracked(shared: &Arc<Shared>) -> Self {
        Self {
            shared: shared.clone(),
            id: None,
        }
    }
}

impl Drop for UpgradeToken {
    fn drop(&mut self) {
        let Some(id) = self.id else { return };
        // Absent when the close grace took it (and counted it as forced).
        let live = self.shared.upgrades().live.remove(&id).is_some();
        if live {
            self.shared.release(&self.shared.upgraded);
        }
    }
}

impl fmt::Debug for UpgradeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpgradeToken")
            .field("tracked", &self.id.is_some())
            .finish_non_exhaustive()
    }
}

/// Resolves when the drain starts: what a handler watches to end a
/// long-poll, an event stream or a WebSocket on its own terms.
///
/// [`GracefulLayer`] puts one in every request's extensions, so an axum
/// handler can take it as `Extension<ShutdownSignal>`; [`Graceful::signal`]
/// makes one anywhere else. It is cheap to clone.
///
/// `.await` it (it implements [`IntoFuture`]) or call
/// [`draining`](ShutdownSignal::draining) for a future that borrows nothing,
/// to use in `tokio::select!` or a spawned task.
///
/// # Examples
///
/// ```
/// use axum::{Extension, Router, routing::get};
/// use handover::{Graceful, ShutdownSignal};
///
/// async fn long_poll(Extension(shutdown): Extension<ShutdownSignal>) -> &'static str {
///     tokio::select! {
///         _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => "nothing new",
///         _ = shutdown.draining() => "server restarting, poll again",
///     }
/// }
///
/// let graceful = Graceful::new();
/// let app: Router = Router::new()
///     .route("/poll", get(long_poll))
///     .layer(graceful.layer());
/// ```
#[derive(Clone)]
pub struct ShutdownSignal {
    shared: Arc<Shared>,
    /// The serve loop tracks this connection's upgrades itself.
    upgrades_tracked: bool,
}

impl ShutdownSignal {
    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared.is_draining()
    }

    /// Keeps the connection this request upgrades (a WebSocket, say) counted
    /// until the returned token is dropped: move it into the task that
    /// serves the upgraded connection.
    ///
    /// Under [`serve`](crate::serve) (and [`Handover`](crate::Handover))
    /// upgraded connections are tracked already, from the upgrade until the
    /// upgraded IO is dropped, and this token counts nothing extra; with
    /// another server (`axum::serve`) it is what makes the drain wait for
    /// the connection, up to the close grace.
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
    /// use axum::{Extension, Router, response::Response, routing::get};
    /// use handover::{Graceful, ShutdownSignal};
    ///
    /// async fn ws(upgrade: WebSocketUpgrade, Extension(shutdown): Extension<ShutdownSignal>) -> Response {
    ///     let token = shutdown.track_upgrade();
    ///     upgrade.on_upgrade(move |socket| async move {
    ///         echo(socket, shutdown).await;
    ///         drop(token);
    ///     })
    /// }
    ///
    /// async fn echo(mut socket: WebSocket, shutdown: ShutdownSignal) {
    ///     loop {
    ///         tokio::select! {
    ///             message = socket.recv() => match message {
    ///                 Some(Ok(Message::Text(text))) => {
    ///                     if socket.send(Message::Text(text)).await.is_err() { return }
    ///                 }
    ///                 Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
    ///                 Some(Ok(_)) => {}
    ///             },
    ///             () = shutdown.draining() => break,
    ///         }
    ///     }
    ///     // Going away: the client reconnects, to the next generation.
    ///     let close = CloseFrame { code: close_code::AWAY, reason: "restarting".into() };
    ///     let _ = socket.send(Message::Close(Some(close))).await;
    ///     // Wait for the client's Close (the close grace bounds this).
    ///     while let Some(Ok(_)) = socket.recv().await {}
    /// }
    ///
    /// let graceful = Graceful::new();
    /// let app: Router = Router::new().route("/ws", get(ws)).layer(graceful.layer());
    /// ```
    pub fn track_upgrade(&self) -> UpgradeToken {
        if self.upgrades_tracked {
            UpgradeToken::untracked(&self.shared)
        } else {
            UpgradeToken::new(&self.shared, None)
        }
    }

    pub(crate) fn is_from(&self, graceful: &Graceful) -> bool {
        Arc::ptr_eq(&self.shared, &graceful.shared)
    }

    /// A future that resolves when the drain starts (at once if it has).
    pub fn draining(&self) -> Draining {
        Draining {
            shared: self.shared.clone(),
            inner: self.shared.drain_started.clone().cancelled_owned(),
            registered: None,
        }
    }
}

impl IntoFuture for ShutdownSignal {
    type Output = ();
    type IntoFuture = Draining;

    fn into_future(self) -> Draining {
        self.draining()
    }
}

impl fmt::Debug for ShutdownSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownSignal")
            .field("draining", &self.is_draining())
            .finish()
    }
}

pin_project! {
    /// Future returned by [`ShutdownSignal::draining`]: resolves when the
    /// drain starts.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping it loses nothing, and a new one resolves at
    /// once if the drain has started meanwhile.
    #[must_use = "futures do nothing unless polled"]
    pub struct Draining {
        shared: Arc<Shared>,
        #[pin]
        inner: WaitForCancellationFutureOwned,
        // The waker `inner` has registered, once it has.
        registered: Option<Waker>,
    }
}

impl Future for Draining {
    type Output = ();

    /// A poll while the drain has not started costs one atomic load, so
    /// that a connection or a stream can poll it beside its own work on
    /// every wake-up. The notification it waits on (whose poll takes a
    /// lock that every waiter shares) is polled only on the first poll and
    /// when the task's waker has changed: a waker registered there stays
    /// registered, and is woken when the drain starts.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let shared = &**this.shared;
        let inner = this.inner;
        poll_registered(
            this.registered,
            cx,
            // Set before the notification fires.
            || shared.draining.load(Ordering::SeqCst),
            |cx| inner.poll(cx),
        )
    }
}

/// Polls a wait whose registration costs (a lock) only when it must: once
/// `done` says it is over (one atomic load), `Ready`; else `register` runs
/// on the first poll and whenever the task's waker has changed since,
/// and not otherwise, since a waker it registered stays registered until
/// it is woken. `registered` keeps the waker last registered.
#[inline]
pub(crate) fn poll_registered(
    registered: &mut Option<Waker>,
    cx: &mut Context<'_>,
    done: impl FnOnce() -> bool,
    register: impl FnOnce(&mut Context<'_>) -> Poll<()>,
) -> Poll<()> {
    if done() {
        return Poll::Ready(());
    }
    if registered
        .as_ref()
        .is_some_and(|waker| waker.will_wake(cx.waker()))
    {
        return Poll::Pending;
    }
    let poll = register(cx);
    if poll.is_pending() {
        *registered = Some(cx.waker().clone());
    }
    poll
}

impl fmt::Debug for Draining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Draining").finish_non_exhaustive()
    }
}

/// How a drain ended: what finished in time and what had to be forced.
///
/// "Finished" counts the requests and connections that ended after the drain
/// started, including ones that arrived during it; "forced" counts those
/// still running when the deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DrainReport {
    /// Requests (with their response bodies) that ended during the drain.
    pub requests_finished: usize,
    /// Requests still in flight when the deadline passed.
    pub requests_forced: usize,
    /// Connections that closed during the drain.
    pub connections_finished: usize,
    /// Connections still open when the deadline passed, closed by force.
    pub connections_forced: usize,
    /// Upgraded connections (WebSocket) that closed during the drain.
    pub upgraded_finished: usize,
    /// Upgraded connections still open when the close grace passed, forced
    /// (with, under [`serve`](crate::serve), HTTP/2 connections closed then
    /// for the WebSockets they carried).
    pub upgraded_forced: usize,
    /// Time from the start of the drain to its end.
    pub elapsed: Duration,
}

impl DrainReport {
    /// Requests, connections and upgraded connections, each (finished,
    /// forced).
    pub(crate) fn counts(&self) -> crate::metrics::Drained {
        [
            (self.requests_finished, self.requests_forced),
            (self.connections_finished, self.connections_forced),
            (self.upgraded_finished, self.upgraded_forced),
        ]
    }

    /// `true` when nothing had to be forced.
    pub fn is_clean(&self) -> bool {
        self.requests_forced == 0 && self.connections_forced == 0 && self.upgraded_forced == 0
    }
}

impl fmt::Display for DrainReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "drained in {:.1} ms: {} requests, {} connections and {} upgraded finished, {} requests, {} connections and {} upgraded forced",
            self.elapsed.as_secs_f64() * 1e3,
            self.requests_finished,
            self.connections_finished,
            self.upgraded_finished,
            self.requests_forced,
            self.connections_forced,
            self.upgraded_forced,
        )
    }
}
