//! [`AfterTasks`]: the view on every callback a layer has scheduled, for counting them and
//! draining them at shutdown.
//!
//! Every callback is accounted for in one ledger, under one lock: registered, then ended exactly
//! once (completed, panicked, timed out, cancelled or forgotten). The lock is held for a few
//! additions, never across user code, so the counts are always consistent with each other.
//!
//! A shutdown whose grace runs out cannot wait for callbacks stuck inside a poll (a blocking call
//! where an `.await` should be), nor for a runtime that is no longer driven: it *writes them off*.
//! They are reported as cancelled at once, told to stop, and from then on belong to no report:
//! each callback appears in at most one [`ShutdownReport`]. The ledger tells them apart by
//! *epoch*: each write-off starts a new one, and a callback registered in an earlier epoch that
//! ends later was already reported.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// State shared by every clone of one [`AfterLayer`](crate::AfterLayer) and by the requests it
/// serves.
#[derive(Default)]
pub(crate) struct Shared {
    ledger: Mutex<Ledger>,
    /// Woken whenever nothing is pending any more.
    idle: Notify,
    /// Fired once a shutdown's grace ran out: every driver stops its work.
    shutdown: StopSignal,
    /// One drain at a time, so that two shutdowns never report the same callback.
    drain: tokio::sync::Mutex<()>,
    running: AtomicU64,
    queued: AtomicU64,
}

/// Tells work to stop at once: a flag that drivers read before each start of work, and a token
/// that waiting drivers wait on. The token's own `is_cancelled` takes a lock that every request of
/// the layer shares; the flag does not. The flag is set before the token is cancelled, so that a
/// driver woken by the token finds it set.
#[derive(Default)]
pub(crate) struct StopSignal {
    fired: AtomicBool,
    token: CancellationToken,
}

impl StopSignal {
    /// A signal of its own whose token is also cancelled when this one fires (its flag is not:
    /// whoever waits on the child asks both for the reason).
    #[cfg(feature = "lambda")]
    pub(crate) fn child(&self) -> Self {
        Self {
            fired: AtomicBool::new(false),
            token: self.token.child_token(),
        }
    }

    /// Tells the work to stop.
    pub(crate) fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether [`StopSignal::fire`] was called on this signal (not on its parent).
    pub(crate) fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Resolves once this signal, or its parent, fired.
    pub(crate) fn fired(&self) -> WaitForCancellationFutureOwned {
        self.token.clone().cancelled_owned()
    }
}

/// The ledger's epoch when a callback was registered: see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Epoch(u64);

/// A callback's line in the ledger, from its registration: it ends exactly once, as told with
/// [`Ticket::close`], or as cancelled when dropped without that.
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    epoch: Epoch,
    open: bool,
}

impl Ticket {
    /// Ends the line as `how`, unless it has ended already.
    pub(crate) fn close(&mut self, how: Ended) {
        if self.open {
            self.open = false;
            self.shared.ended(self.epoch, how);
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.close(Ended::Cancelled);
    }
}

#[derive(Default)]
struct Ledger {
    epoch: u64,
    /// Pending callbacks of the current epoch.
    pending: usize,
    /// Pending callbacks a shutdown already reported as cancelled.
    written_off: usize,
    totals: AfterStats,
    /// Callbacks that ended without having been written off, by how: what drains report.
    settled: Settled,
    /// Callers waiting in `idle()`: reaching zero wakes them, and costs nothing when there are
    /// none.
    idle_waiters: usize,
    /// Callbacks refused since the last warning about it, and when that was.
    shed_unreported: u64,
    last_shed_warning: Option<std::time::Instant>,
}

/// A callback refused because the layer held its maximum of pending callbacks.
#[derive(Debug)]
pub(crate) struct Shed {
    /// `Some(refused since the last warning)` when a warning is due now.
    pub(crate) warn: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Settled {
    completed: u64,
    dropped: u64,
}

/// Why [`After::try_run_with`](crate::After::try_run_with) refused work: the layer already
/// holds its [maximum of pending callbacks](crate::AfterLayer::max_pending).
///
/// ```
/// # fn example(error: tower_after::Overloaded) {
/// eprintln!("{error}"); // names the limit and `AfterLayer::max_pending`
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded {
    max_pending: usize,
}

impl Overloaded {
    pub(crate) fn new(max_pending: usize) -> Self {
        Self { max_pending }
    }

    /// The layer's maximum of pending callbacks, which was reached.
    #[must_use]
    pub fn max_pending(&self) -> usize {
        self.max_pending
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "after-response work refused: the layer holds its maximum of {} pending callbacks \
             (raise it with `AfterLayer::max_pending`)",
            self.max_pending
        )
    }
}

impl std::error::Error for Overloaded {}

/// How a callback ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It ran to its end.
    Completed,
    /// It panicked.
    Panicked,
    /// Its request's budget ran out first.
    TimedOut,
    /// A shutdown, or the lack of a runtime, dropped it.
    Cancelled,
    /// It was replaced by a callback of the same name, or forgotten, before it started.
    Forgotten,
}

/// The gauges, for [`Shared::gauge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gauge {
    Running,
    Queued,
}

impl Shared {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // No user code runs under the lock; recover rather than panic if it was ever poisoned.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a newly registered callback, until its ticket ends. When the layer already holds
    /// `bound` pending callbacks, the callback is refused and counted as shed instead.
    pub(crate) fn ticket(self: &Arc<Self>, bound: usize) -> Result<Ticket, Shed> {
        let mut ledger = self.ledger();
        ledger.totals.scheduled += 1;
        #[cfg(feature = "metrics")]
        metrics::counter!(names::SCHEDULED).increment(1);
        if ledger.pending + ledger.written_off >= bound {
            ledger.totals.shed += 1;
            ledger.shed_unreported += 1;
            #[cfg(feature = "metrics")]
            metrics::counter!(names::SHED).increment(1);
            // One warning a second at most, counting the refusals since the last one.
            let now = std::time::Instant::now();
            let due = ledger
                .last_shed_warning
                .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1));
            let warn = due.then(|| {
                ledger.last_shed_warning = Some(now);
                std::mem::take(&mut ledger.shed_unreported)
            });
            return Err(Shed { warn });
        }
        ledger.pending += 1;
        let epoch = Epoch(ledger.epoch);
        drop(ledger);
        Ok(Ticket {
            shared: self.clone(),
            epoch,
            open: true,
        })
    }

    /// Accounts for the end of a callback registered in `epoch`.
    fn ended(&self, epoch: Epoch, how: Ended) {
        let mut ledger = self.ledger();
        let totals = &mut ledger.totals;
        *match how {
            Ended::Completed => &mut totals.completed,
            Ended::Panicked => &mut totals.panicked,
            Ended::TimedOut => &mut totals.timed_out,
            Ended::Cancelled => &mut totals.cancelled,
            Ended::Forgotten => &mut totals.forgotten,
        } += 1;
        if epoch.0 == ledger.epoch {
            ledger.pending -= 1;
            match how {
                Ended::Completed | Ended::Panicked => ledger.settled.completed += 1,
                _ => ledger.settled.dropped += 1,
            }
        } else {
            ledger.written_off -= 1;
        }
        let idle = ledger.pending + ledger.written_off == 0 && ledger.idle_waiters > 0;
        drop(ledger);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::ended(how)).increment(1);
        if idle {
            self.idle.notify_waiters();
        }
    }

    pub(crate) fn gauge(&self, gauge: Gauge, up: bool) {
        let value = match gauge {
            Gauge::Running => &self.running,
            Gauge::Queued => &self.queued,
        };
        if up {
            value.fetch_add(1, Ordering::Relaxed);
        } else {
            value.fetch_sub(1, Ordering::Relaxed);
        }
        #[cfg(feature = "metrics")]
        {
            let name = match gauge {
                Gauge::Running => names::RUNNING,
                Gauge::Queued => names::QUEUED,
            };
            let gauge = metrics::gauge!(name);
            if up {
                gauge.increment(1.0);
            } else {
                gauge.decrement(1.0);
            }
        }
    }

    /// Fired once a shutdown's grace ran out.
    pub(crate) fn shutdown(&self) -> &StopSignal {
        &self.shutdown
    }

    fn pending(&self) -> usize {
        let ledger = self.ledger();
        ledger.pending + ledger.written_off
    }

    pub(crate) fn stats(&self) -> AfterStats {
        AfterStats {
            running: self.running.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            ..self.ledger().totals
        }
    }

    fn settled(&self) -> Settled {
        self.ledger().settled
    }

    /// Reports every pending callback of the current epoch as cancelled, starts a new epoch, and
    /// tells every driver to stop. Returns how many it wrote off.
    fn write_off(&self) -> usize {
        let mut ledger = self.ledger();
        let count = std::mem::take(&mut ledger.pending);
        ledger.written_off += count;
        ledger.epoch += 1;
        drop(ledger);
        self.shutdown.fire();
        count
    }

    async fn idle(&self) {
        /// Counts its caller among the waiters while it lives, however the wait ends.
        struct Waiting<'a>(&'a Shared);

        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.ledger().idle_waiters -= 1;
            }
        }

        let mut waiting = None;
        loop {
            // A `Notified` hears every `notify_waiters` from its creation on, even before it is
            // polled: created before the check, it cannot miss the drop to zero, which is
            // announced whenever a waiter is counted (under the same lock as the check).
            let notified = self.idle.notified();
            {
                let mut ledger = self.ledger();
                if ledger.pending + ledger.written_off == 0 {
                    return;
                }
                if waiting.is_none() {
                    ledger.idle_waiters += 1;
                }
            }
            waiting.get_or_insert(Waiting(self));
            notified.await;
        }
    }
}

/// How long a shutdown whose grace ran out lets cancelled callbacks stop before it returns.
const SETTLE: Duration = Duration::from_millis(50);

/// Awaits `future` until `deadline` (`None`: no deadline); `None` if the deadline came first.
///
/// Tokio's timer keeps the deadline, and a plain thread keeps it too: Tokio's timers are driven
/// by its worker threads, and callbacks that block every worker inside their poll would
/// otherwise hold the deadline back with them.
pub(crate) async fn until<F: Future>(deadline: Option<Instant>, future: F) -> Option<F::Output> {
    let Some(deadline) = deadline else {
        return Some(future.await);
    };
    let mut future = pin!(future);
    let mut timer = pin!(tokio::time::sleep_until(deadline));
    // Started only if the future does not end at once: most drains have nothing to wait for.
    let mut backstop: Option<Backstop> = None;
    poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        let backstop = backstop.get_or_insert_with(|| Backstop::start(deadline));
        if timer.as_mut().poll(cx).is_ready() || backstop.poll_fired(cx) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// A thread that wakes a waiting task at a deadline, unless dropped first.
struct Backstop {
    /// `None` once the thread is gone without firing (it could not be started).
    fired: Option<oneshot::Receiver<()>>,
    /// Dropping it ends the thread's wait early.
    _cancel: mpsc::Sender<()>,
}

impl Backstop {
    fn start(deadline: Instant) -> Self {
        let (fire, fired) = oneshot::channel();
        let (cancel, cancelled) = mpsc::channel::<()>();
        let wait = deadline.saturating_duration_since(Instant::now());
        let started = std::thread::Builder::new()
            .name("tower-after-deadline".into())
            .spawn(move || {
                if let Err(RecvTimeoutError::Timeout) = cancelled.recv_timeout(wait) {
                    let _ = fire.send(());
                }
            });
        Self {
            // Without the thread, Tokio's timer alone keeps the deadline.
            fired: started.is_ok().then_some(fired),
            _cancel: cancel,
        }
    }

    fn poll_fired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(fired) = &mut self.fired else {
            return false;
        };
        match Pin::new(fired).poll(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(_)) => {
                self.fired = None;
                false
            }
            Poll::Pending => false,
        }
    }
}

/// A handle on every callback scheduled through one [`AfterLayer`](crate::AfterLayer) and its
/// clones: how many are pending, and a way to drain them when the server stops.
///
/// Get it from [`AfterLayer::tasks`](crate::AfterLayer::tasks) before the layer is moved into the
/// router. Callbacks run in the background after their response went out, so when
/// `axum::serve(..).with_graceful_shutdown(..)` returns, some of them may still be running (or
/// not even started, if their response only just finished). Without a drain they are lost when the
/// runtime stops, exactly like a bare `tokio::spawn`.
///
/// This plays the part of tokio-util's [`TaskTracker`] for after-response work: it counts each
/// callback from the moment it is *registered*, not from the moment it is spawned, so a drain also
/// waits for callbacks whose response has not finished yet.
///
/// [`TaskTracker`]: https://docs.rs/tokio-util/0.7/tokio_util/task/struct.TaskTracker.html
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use tower_after::AfterLayer;
///
/// # #[tokio::main]
/// # async fn main() -> std::io::Result<()> {
/// let layer = AfterLayer::new();
/// let tasks = layer.tasks();
/// let app = Router::new().route("/", get(|| async { "hi" })).layer(layer);
///
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// axum::serve(listener, app)
///     .with_graceful_shutdown(async { tokio::signal::ctrl_c().await.unwrap_or(()) })
///     .await?;
///
/// // The server has stopped; now let the callbacks finish, for at most 10 seconds.
/// let report = tasks.shutdown(Duration::from_secs(10)).await;
/// println!("{} callbacks completed, {} cancelled", report.completed(), report.cancelled());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct AfterTasks {
    shared: Arc<Shared>,
}

impl AfterTasks {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    #[cfg(feature = "lambda")]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The number of callbacks and [`wait_until`](crate::After::wait_until) futures registered
    /// and not yet ended: queued behind a response that is still being sent, or running.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.shared.pending()
    }

    /// Counters and gauges of every callback scheduled through this layer and its clones.
    ///
    /// ```
    /// let tasks = tower_after::AfterLayer::new().tasks();
    /// let stats = tasks.stats();
    /// assert_eq!(stats.scheduled(), 0);
    /// assert_eq!(stats.running() + stats.queued(), 0);
    /// ```
    #[must_use]
    pub fn stats(&self) -> AfterStats {
        self.shared.stats()
    }

    /// Resolves as soon as nothing is pending: every callback registered so far has ended.
    ///
    /// Callbacks a shutdown wrote off (reported as cancelled because they did not stop in time,
    /// such as one blocking inside its poll) count as pending until they actually end.
    ///
    /// Unlike [`AfterTasks::shutdown`] it cancels nothing and leaves the layer as it was, so it
    /// can be awaited again and again: in tests, or before a process that is about to be frozen
    /// lets it happen. On AWS Lambda, `lambda::DrainLayer` (feature `lambda`) does better: it
    /// waits for each invocation's own work only, within the invocation's deadline.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping it only stops the waiting.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let tasks = tower_after::AfterLayer::new().tasks();
    /// tasks.idle().await; // nothing pending: resolves at once
    /// # }
    /// ```
    pub async fn idle(&self) {
        self.shared.idle().await;
    }

    /// Waits for every pending callback, for at most `grace`, then reports what happened to them.
    ///
    /// Callbacks registered while it waits (by a callback, a late [`wait_until`] future or a
    /// request still finishing) are waited for too. If `grace` runs out first, it returns at once
    /// and reports everything still pending as cancelled: running callbacks are told to stop and
    /// are dropped at their next `.await`, queued ones never start, and a warning says how many.
    /// From that moment the layer cancels every further callback at once, since the process is
    /// going away; a drain that ends within its grace leaves the layer working as before.
    ///
    /// It returns within `grace` plus 50 ms (a moment for the cancelled callbacks to stop and
    /// log): also when a callback blocks inside its poll (even on every worker thread), waits
    /// for a place under the [concurrency limit](crate::AfterLayer::concurrency_limit), or runs a
    /// [`run_blocking`](crate::After::run_blocking) closure, and also when the runtime that runs
    /// the callbacks is no longer driven. One case it cannot help: on a current-thread runtime, a
    /// callback that blocks also blocks the thread that polls the shutdown, until it yields.
    ///
    /// A callback it could not stop in time is counted as cancelled even if it ends later, and
    /// never counts in another report: two drains, one after the other or at the same time, never
    /// report the same callback twice. A second drain started meanwhile waits for the first to
    /// end, within its own grace; if that runs out first, it writes off what is still pending.
    /// A written-off callback stays [pending](AfterTasks::pending) until it actually ends.
    ///
    /// Run it after `axum::serve(..).with_graceful_shutdown(..)` returns, when no request is in
    /// flight. It needs Tokio's time driver on the runtime that awaits it.
    ///
    /// # Cancel safety
    ///
    /// Dropping this future stops the waiting; it cancels nothing unless the grace period had
    /// already run out.
    ///
    /// [`wait_until`]: crate::After::wait_until
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let shared = &self.shared;
        let deadline = Instant::now().checked_add(grace);
        let turn = until(deadline, shared.drain.lock()).await;
        let before = shared.settled();
        let drained = turn.is_some() && until(deadline, shared.idle()).await.is_some();
        let written_off = if drained { 0 } else { shared.write_off() };
        let after = shared.settled();
        if !drained {
            // Callbacks that can still react stop at once: give them a moment to, so that their
            // warnings are logged before the process exits. Stuck ones are not waited for.
            let _ = until(Instant::now().checked_add(SETTLE), shared.idle()).await;
        }
        let (completed, dropped) = match turn {
            Some(_) => (
                after.completed - before.completed,
                after.dropped - before.dropped,
            ),
            None => (0, 0),
        };
        let report = ShutdownReport {
            completed: completed as usize,
            cancelled: dropped as usize + written_off,
        };
        if !drained {
            tracing::warn!(
                completed = report.completed,
                cancelled = report.cancelled,
                "after callbacks cancelled: the shutdown grace period of {grace:?} ran out"
            );
        }
        report
    }
}

impl fmt::Debug for AfterTasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AfterTasks")
            .field("pending", &self.pending())
            .finish()
    }
}

/// Counters and gauges of the callbacks of one [`AfterLayer`](crate::AfterLayer) and its clones,
/// from [`AfterTasks::stats`].
///
/// The totals only grow. Every callback scheduled is, at any moment, either pending (see
/// [`AfterTasks::pending`]: queued behind its response, waiting for a concurrency permit, or
/// running) or counted in exactly one of `completed`, `panicked`, `timed_out`, `cancelled`,
/// `forgotten` and `shed`.
///
/// With the `metrics` feature, the same numbers are published through the [`metrics`] facade:
///
/// | name | kind |
/// |---|---|
/// | `tower_after_callbacks_scheduled_total` | counter |
/// | `tower_after_callbacks_completed_total` | counter |
/// | `tower_after_callbacks_panicked_total` | counter |
/// | `tower_after_callbacks_timed_out_total` | counter |
/// | `tower_after_callbacks_cancelled_total` | counter |
/// | `tower_after_callbacks_forgotten_total` | counter |
/// | `tower_after_callbacks_shed_total` | counter |
/// | `tower_after_callbacks_running` | gauge |
/// | `tower_after_callbacks_queued` | gauge |
///
/// [`metrics`]: https://docs.rs/metrics
///
/// ```
/// let tasks = tower_after::AfterLayer::new().tasks();
/// let stats = tasks.stats();
/// let ended = stats.completed() + stats.panicked() + stats.timed_out() + stats.cancelled()
///     + stats.forgotten() + stats.shed();
/// assert_eq!(stats.scheduled(), ended + tasks.pending() as u64);
/// println!("{} running, {} waiting for a place", stats.running(), stats.queued());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AfterStats {
    scheduled: u64,
    completed: u64,
    panicked: u64,
    timed_out: u64,
    cancelled: u64,
    forgotten: u64,
    shed: u64,
    running: u64,
    queued: u64,
}

impl AfterStats {
    /// Callbacks and `wait_until` futures registered, in total.
    #[must_use]
    pub fn scheduled(&self) -> u64 {
        self.scheduled
    }

    /// Callbacks that ran to their end.
    #[must_use]
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Callbacks that panicked (each one logged as an error).
    #[must_use]
    pub fn panicked(&self) -> u64 {
        self.panicked
    }

    /// Callbacks cancelled because their request's max duration ran out, whether they had
    /// started or were still waiting; on AWS Lambda, also those cancelled because their
    /// invocation's deadline was near (`lambda::DrainLayer`, feature `lambda`).
    #[must_use]
    pub fn timed_out(&self) -> u64 {
        self.timed_out
    }

    /// Callbacks cancelled by a shutdown whose grace period ran out, or dropped because no Tokio
    /// runtime was there to run them.
    #[must_use]
    pub fn cancelled(&self) -> u64 {
        self.cancelled
    }

    /// Named callbacks replaced by a later one of the same name, or removed with
    /// [`After::forget`](crate::After::forget), before they started.
    #[must_use]
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Callbacks refused when registered, because the layer already held its
    /// [maximum of pending callbacks](crate::AfterLayer::max_pending). They never ran; each
    /// refusal is also logged (a `WARN` a second at most, with the count).
    #[must_use]
    pub fn shed(&self) -> u64 {
        self.shed
    }

    /// Callbacks running now.
    #[must_use]
    pub fn running(&self) -> u64 {
        self.running
    }

    /// Callbacks waiting now for a place under the concurrency limit.
    #[must_use]
    pub fn queued(&self) -> u64 {
        self.queued
    }
}

#[cfg(feature = "metrics")]
mod names {
    use super::Ended;

    pub(super) const SCHEDULED: &str = "tower_after_callbacks_scheduled_total";
    pub(super) const SHED: &str = "tower_after_callbacks_shed_total";
    pub(super) const RUNNING: &str = "tower_after_callbacks_running";
    pub(super) const QUEUED: &str = "tower_after_callbacks_queued";

    pub(super) fn ended(how: Ended) -> &'static str {
        match how {
            Ended::Completed => "tower_after_callbacks_completed_total",
            Ended::Panicked => "tower_after_callbacks_panicked_total",
            Ended::TimedOut => "tower_after_callbacks_timed_out_total",
            Ended::Cancelled => "tower_after_callbacks_cancelled_total",
            Ended::Forgotten => "tower_after_callbacks_forgotten_total",
        }
    }
}

/// What [`AfterTasks::shutdown`] did: how many callbacks ended while it waited, and how many it
/// had to cancel.
///
/// Every callback pending when the drain started, or registered during it, is counted at most
/// once, in this report or in that of a drain running at the same time, never in both.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
///
/// let tasks = tower_after::AfterLayer::new().tasks();
/// let report = tasks.shutdown(Duration::from_secs(5)).await;
/// if report.cancelled() > 0 {
///     eprintln!("{} callbacks did not finish in time", report.cancelled());
/// }
/// assert_eq!(report.completed() + report.cancelled(), 0);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    completed: usize,
    cancelled: usize,
}

impl ShutdownReport {
    /// Callbacks that ended by themselves during the drain (including any that panicked: to
    /// tell them apart, compare [`AfterTasks::stats`] before and after the drain).
    #[must_use]
    pub fn completed(&self) -> usize {
        self.completed
    }

    /// Callbacks dropped before their end: by the grace deadline, by their own request's budget
    /// while the drain was under way, or forgotten meanwhile.
    #[must_use]
    pub fn cancelled(&self) -> usize {
        self.cancelled
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use http::{Request, Response};
    use http_body_util::{BodyExt, Empty};
    use tower::{service_fn, Layer, ServiceExt};

    use crate::test_util::{eventually, Logs};
    use crate::{After, AfterLayer};

    /// Serves `count` requests whose callbacks each sleep for `sleep`, then, once all of them
    /// ended, register one more nested callback of the same length.
    async fn serve_sleepers(
        layer: &AfterLayer,
        count: usize,
        sleep: Duration,
        done: &Arc<AtomicUsize>,
    ) {
        for _ in 0..count {
            let done = done.clone();
            let service = layer.layer(service_fn(move |request: Request<()>| {
                let after = request.extensions().get::<After>().unwrap().clone();
                let done = done.clone();
                after.run(async move {
                    tokio::time::sleep(sleep).await;
                    let nested = done.clone();
                    After::current().run(async move {
                        tokio::time::sleep(sleep).await;
                        nested.fetch_add(1, Ordering::SeqCst);
                    });
                    done.fetch_add(1, Ordering::SeqCst);
                });
                async { Ok::<_, Infallible>(Response::new(Empty::<bytes::Bytes>::new())) }
            }));
            let response = service.oneshot(Request::new(())).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_everything_including_work_added_meanwhile() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let done = Arc::new(AtomicUsize::new(0));
        serve_sleepers(&layer, 3, Duration::from_secs(2), &done).await;
        assert_eq!(tasks.pending(), 3);

        let report = tasks.shutdown(Duration::from_secs(30)).await;
        assert_eq!(done.load(Ordering::SeqCst), 6);
        assert_eq!((report.completed(), report.cancelled()), (6, 0));
        assert_eq!(tasks.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_cancels_what_outlives_the_grace_period() {
        let logs = Logs::capture();
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let done = Arc::new(AtomicUsize::new(0));
        serve_sleepers(&layer, 4, Duration::from_secs(10), &done).await;

        let report = tasks.shutdown(Duration::from_secs(1)).await;
        assert_eq!((report.completed(), report.cancelled()), (0, 4));
        let summary = logs.lines_with("shutdown grace period of 1s ran out");
        assert_eq!(summary.len(), 1, "{}", logs.text());
        assert!(
            summary[0].contains("WARN") && summary[0].contains("cancelled=4"),
            "{summary:?}"
        );
        // The drivers stop their callbacks as soon as they run, each with a warning in its span.
        eventually("the cancelled callbacks to be dropped", || {
            tasks.pending() == 0
        })
        .await;
        assert_eq!(done.load(Ordering::SeqCst), 0);
        let per_callback = logs.lines_with("after callback cancelled: the shutdown grace period");
        assert_eq!(per_callback.len(), 4, "{per_callback:?}");
        assert!(per_callback.iter().all(|line| line.contains("WARN")));
        // Written off once: they count in no later report.
        assert_eq!(tasks.stats().cancelled(), 4);

        // Past the deadline, new work is cancelled at once rather than left to the exiting process.
        serve_sleepers(&layer, 1, Duration::from_secs(1), &done).await;
        assert_eq!(tasks.shutdown(Duration::from_secs(1)).await.cancelled(), 1);
    }

    #[tokio::test]
    async fn shutdown_with_nothing_pending_returns_at_once() {
        let report = AfterLayer::new()
            .tasks()
            .shutdown(Duration::from_secs(3600))
            .await;
        assert_eq!((report.completed(), report.cancelled()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn stats_count_each_ending_once() {
        let layer = AfterLayer::new().max_duration(Duration::from_secs(1));
        let tasks = layer.tasks();
        let service = layer.layer(service_fn(|request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            after.run(async {});
            after.run(async { panic!("counted, not fatal") });
            after.run(tokio::time::sleep(Duration::from_secs(10)));
            async { Ok::<_, Infallible>(Response::new(Empty::<bytes::Bytes>::new())) }
        }));
        let response = service.oneshot(Request::new(())).await.unwrap();
        assert_eq!(tasks.stats().scheduled(), 3);
        response.into_body().collect().await.unwrap();
        tasks.idle().await;
        let stats = tasks.stats();
        assert_eq!(
            (
                stats.scheduled(),
                stats.completed(),
                stats.panicked(),
                stats.timed_out()
            ),
            (3, 1, 1, 1)
        );
        assert_eq!(
            (stats.cancelled(), stats.running(), stats.queued()),
            (0, 0, 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_without_closing_anything() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let done = Arc::new(AtomicUsize::new(0));
        for round in 1..=2 {
            serve_sleepers(&layer, 2, Duration::from_secs(1), &done).await;
            assert_eq!(tasks.pending(), 2);
            tasks.idle().await;
            assert_eq!(tasks.pending(), 0);
            // Everything ran, nested work included; the second round runs just the same.
            assert_eq!(done.load(Ordering::SeqCst), 4 * round);
        }
        assert_eq!(tasks.stats().cancelled(), 0);
    }

    #[cfg(feature = "metrics")]
    #[test]
    fn the_counters_are_published_through_metrics() {
        use metrics::{Counter, Gauge, Key, KeyName, Metadata, Recorder, SharedString, Unit};
        use std::collections::BTreeMap;
        use std::sync::atomic::AtomicU64;
        use std::sync::Mutex;

        #[derive(Default)]
        struct Totals(Mutex<BTreeMap<String, Arc<AtomicU64>>>);

        impl Totals {
            fn get(&self, name: &str) -> u64 {
                let map = self.0.lock().unwrap();
                map.get(name)
                    .map_or(0, |value| value.load(Ordering::SeqCst))
            }
            fn slot(&self, key: &Key) -> Arc<AtomicU64> {
                let mut map = self.0.lock().unwrap();
                map.entry(key.name().to_owned()).or_default().clone()
            }
        }

        impl Recorder for Totals {
            fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
                Counter::from_arc(self.slot(key))
            }
            fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
                Gauge::from_arc(self.slot(key))
            }
            fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> metrics::Histogram {
                metrics::Histogram::noop()
            }
        }

        let totals = Totals::default();
        metrics::with_local_recorder(&totals, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let layer = AfterLayer::new();
                let done = Arc::new(AtomicUsize::new(0));
                serve_sleepers(&layer, 1, Duration::from_millis(1), &done).await;
                layer.tasks().idle().await;
            });
        });
        assert_eq!(totals.get("tower_after_callbacks_scheduled_total"), 2);
        assert_eq!(totals.get("tower_after_callbacks_completed_total"), 2);
        assert_eq!(totals.get("tower_after_callbacks_panicked_total"), 0);
        // A gauge stores its f64 bits; back at zero, they are all zero.
        assert_eq!(totals.get("tower_after_callbacks_running"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_shutdowns_both_return() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let done = Arc::new(AtomicUsize::new(0));
        serve_sleepers(&layer, 3, Duration::from_secs(10), &done).await;
        let (first, second) = tokio::join!(
            tasks.shutdown(Duration::from_secs(1)),
            tasks.shutdown(Duration::from_secs(2)),
        );
        assert_eq!(first.cancelled() + first.completed(), 3);
        assert_eq!(second.completed(), 0);
        assert_eq!(tasks.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_within_its_grace_does_not_say_the_grace_ran_out() {
        let logs = Logs::capture();
        // The request's own budget, not the grace, cancels the long callbacks.
        let layer = AfterLayer::new().max_duration(Duration::from_secs(1));
        let tasks = layer.tasks();
        let done = Arc::new(AtomicUsize::new(0));
        serve_sleepers(&layer, 2, Duration::from_secs(10), &done).await;
        let report = tasks.shutdown(Duration::from_secs(30)).await;
        assert_eq!((report.completed(), report.cancelled()), (0, 2));
        assert!(
            logs.lines_with("grace period").is_empty(),
            "{}",
            logs.text()
        );
        // The report says it all: a drain that ended in time logs nothing of its own.
        assert!(
            logs.lines_with("tower_after::tasks").is_empty(),
            "{}",
            logs.text()
        );
    }
}
