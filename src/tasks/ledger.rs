//! The state that every request of a layer shares: how many callbacks are pending, how each one
//! ended, and the signal that stops them all.
//!
//! Every request with work touches it, from every worker thread, so it holds no lock. Pending
//! callbacks are counted in one atomic word (`pending.rs`, as tokio-util's `TaskTracker` counts
//! its tasks), and the totals are relaxed atomic counters. A callback's ending is counted
//! *before* it leaves the pending count, so that whoever sees nothing pending (`idle()`, a drain)
//! also sees every total settled.
//!
//! A shutdown whose grace runs out cannot wait for callbacks stuck inside a poll (a blocking call
//! where an `.await` should be), nor for a runtime that is no longer driven: it *closes* the
//! layer and *writes off* what is still pending, in one step, so that each callback is counted
//! once: by its own ending, or as written off. A closed layer takes no more work: the process is
//! going away.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use crate::tasks::pending::{Full, Pending};
use crate::tasks::serving::Serving;
#[cfg(feature = "metrics")]
use crate::unwind::drop_caught;

/// State shared by every clone of one [`AfterLayer`](crate::AfterLayer) and by the requests it
/// serves.
#[derive(Default)]
pub(crate) struct Shared {
    pending: Pending,
    totals: Totals,
    /// Callers of `idle()` that wait: reaching zero wakes them, and costs nothing without.
    idle_waiters: AtomicUsize,
    /// Woken whenever nothing is pending any more and someone waits.
    idle: Notify,
    /// Fired once a shutdown's grace ran out: every driver stops its work.
    shutdown: StopSignal,
    /// Raised while a shutdown drains: callbacks that asked (`AfterContext::stopping`) wrap up.
    draining: Draining,
    /// One drain at a time, so that two shutdowns never report the same callback.
    pub(crate) drain: tokio::sync::Mutex<()>,
    /// The runtime that serves the layer: where work registered off it runs.
    serving: Serving,
    /// Refused work, for one warning a second at most.
    refusals: Warnings,
    /// Truncated snapshots, likewise.
    truncations: Warnings,
    /// Panics of the metrics recorder while it counted an ending, likewise.
    #[cfg(feature = "metrics")]
    recorder_panics: Warnings,
    /// Bytes of request snapshots that pending work holds.
    held_bytes: AtomicUsize,
}

/// The totals, each counted on its own: they agree with each other whenever nothing is pending
/// (see [`Shared::ended`]).
#[derive(Default)]
struct Totals {
    scheduled: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    timed_out: AtomicU64,
    cancelled: AtomicU64,
    forgotten: AtomicU64,
    shed: AtomicU64,
    /// Snapshots cut by their cap.
    truncated: AtomicU64,
    /// Written off by a shutdown: cancelled, but in the report of the drain that wrote them off
    /// only.
    written_off: AtomicU64,
    running: AtomicU64,
    queued: AtomicU64,
}

impl Totals {
    fn of(&self, how: Ended) -> &AtomicU64 {
        match how {
            Ended::Completed => &self.completed,
            Ended::Failed => &self.failed,
            Ended::Panicked => &self.panicked,
            Ended::TimedOut => &self.timed_out,
            Ended::Cancelled => &self.cancelled,
            Ended::Forgotten => &self.forgotten,
            Ended::Shed => &self.shed,
        }
    }
}

/// How a callback ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It ran to its end.
    Completed,
    /// It returned an error.
    Failed,
    /// It panicked.
    Panicked,
    /// Its request's budget, or its platform's time, ran out first.
    TimedOut,
    /// A shutdown, or the lack of a runtime, dropped it.
    Cancelled,
    /// It was replaced by a callback of the same name, or forgotten, before it started.
    Forgotten,
    /// It was refused when registered.
    Shed,
}

/// The gauges, for [`Shared::gauge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gauge {
    Running,
    Queued,
}

/// Why new work was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The layer holds its maximum of pending callbacks: counted as shed.
    Overloaded,
    /// Pending work holds the layer's maximum of snapshot bytes: counted as shed.
    HeldBytes,
    /// The layer was shut down: not counted, the shutdown's report is final.
    ShutDown,
}

/// Events since the last warning about them, and when that was: one warning a second at most.
#[derive(Default)]
struct Warnings {
    /// Milliseconds since `since` at the last warning, plus one; 0 before the first.
    last_warning: AtomicU64,
    unreported: AtomicU64,
    since: OnceLock<Instant>,
}

impl Warnings {
    /// Counts one event; `Some(events since the last warning)` when a warning is due now.
    fn event(&self) -> Option<u64> {
        self.unreported.fetch_add(1, Ordering::Relaxed);
        let since = *self.since.get_or_init(Instant::now);
        let now = u64::try_from(since.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let last = self.last_warning.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= 1_000;
        (due && (self.last_warning)
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok())
        .then(|| self.unreported.swap(0, Ordering::Relaxed))
    }
}

/// A callback's line in the ledger, from its registration: it ends exactly once, as told with
/// [`Ticket::close`], or as cancelled when dropped without that.
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    open: bool,
}

impl Ticket {
    /// Ends the line as `how`, unless it has ended already.
    pub(crate) fn close(&mut self, how: Ended) {
        if self.open {
            self.open = false;
            self.shared.ended(how);
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

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket").field("open", &self.open).finish()
    }
}

/// A refused registration, with the warning to log when one is due.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) why: Refusal,
    /// `Some(refused since the last warning)` when a warning is due now.
    pub(crate) warn: Option<u64>,
}

impl Shared {
    /// Counts a newly registered callback, until its ticket ends. When the layer already holds
    /// `bound` pending callbacks, the callback is refused and counted as shed instead; when it
    /// was shut down, it is refused and not counted.
    pub(crate) fn ticket(self: &Arc<Self>, bound: usize) -> Result<Ticket, Refused> {
        // Counted before it is pending, so that no reader sees it end before it was scheduled.
        self.totals.scheduled.fetch_add(1, Ordering::Relaxed);
        match self.pending.register(bound) {
            Ok(()) => {}
            Err(Full::Closed) => {
                self.totals.scheduled.fetch_sub(1, Ordering::Relaxed);
                let warn = self.refusals.event();
                return Err(Refused {
                    why: Refusal::ShutDown,
                    warn,
                });
            }
            Err(Full::Bound) => {
                self.totals.shed.fetch_add(1, Ordering::Relaxed);
                #[cfg(feature = "metrics")]
                {
                    metrics::counter!(names::SCHEDULED).increment(1);
                    metrics::counter!(names::SHED).increment(1);
                }
                let warn = self.refusals.event();
                return Err(Refused {
                    why: Refusal::Overloaded,
                    warn,
                });
            }
        }
        #[cfg(feature = "metrics")]
        metrics::counter!(names::SCHEDULED).increment(1);
        Ok(Ticket {
            shared: self.clone(),
            open: true,
        })
    }

    /// Accounts for the end of a pending callback: its totals first (ours and the published
    /// one), then the pending count, so that whoever sees the pending count at zero also sees
    /// the totals. No lock is held meanwhile; a shutdown writing work off waits for it, at most
    /// a moment.
    fn ended(&self, how: Ended) {
        #[cfg(feature = "metrics")]
        let mut recorder_panicked = false;
        let left = self.pending.end(|| {
            self.totals.of(how).fetch_add(1, Ordering::Relaxed);
            // The recorder is user code: a panic in it must not keep the callback pending.
            #[cfg(feature = "metrics")]
            if let Err(panic) = std::panic::catch_unwind(|| {
                metrics::counter!(names::ended(how)).increment(1);
            }) {
                drop_caught(panic);
                recorder_panicked = true;
            }
        });
        // Said once the callback left the pending count: a subscriber is user code too.
        #[cfg(feature = "metrics")]
        if let Some(count) = recorder_panicked
            .then(|| self.recorder_panics.event())
            .flatten()
        {
            tracing::error!(
                panicked = count,
                "the metrics recorder panicked counting an ended after callback (the callback is \
                 counted in `AfterTasks::stats` all the same; fix the recorder)"
            );
        }
        // `None`: written off, the shutdown counted it as cancelled already.
        if left == Some(0) {
            self.wake_idle();
        }
    }

    /// Wakes the callers of `idle()`, if there are any. After the pending count reached zero:
    /// they count themselves before they read it, so one of the two sees the other.
    fn wake_idle(&self) {
        if self.idle_waiters.load(Ordering::SeqCst) > 0 {
            self.idle.notify_waiters();
        }
    }

    /// Counts `bytes` of a snapshot that pending work now holds, unless the layer would hold
    /// more than `max` (the caller then sheds its work).
    pub(crate) fn hold_bytes(&self, bytes: usize, max: usize) -> Result<(), Refused> {
        let mut held = self.held_bytes.load(Ordering::Relaxed);
        loop {
            let total = held.saturating_add(bytes);
            if total > max {
                let warn = self.refusals.event();
                return Err(Refused {
                    why: Refusal::HeldBytes,
                    warn,
                });
            }
            match self.held_bytes.compare_exchange_weak(
                held,
                total,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => held = now,
            }
        }
    }

    /// Counts a snapshot cut by its cap; `Some(cut since the last warning)` when a warning is
    /// due now.
    pub(crate) fn truncated(&self) -> Option<u64> {
        self.totals.truncated.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::TRUNCATED).increment(1);
        self.truncations.event()
    }

    /// The snapshot's bytes are no longer held.
    pub(crate) fn release_bytes(&self, bytes: usize) {
        self.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes of request snapshots that pending work holds now.
    pub(crate) fn held_bytes(&self) -> usize {
        self.held_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn gauge(&self, gauge: Gauge, up: bool) {
        let value = match gauge {
            Gauge::Running => &self.totals.running,
            Gauge::Queued => &self.totals.queued,
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

    /// Raised while a shutdown drains.
    pub(crate) fn draining(&self) -> &Draining {
        &self.draining
    }

    /// The runtime that serves the layer.
    pub(crate) fn serving(&self) -> &Serving {
        &self.serving
    }

    pub(crate) fn pending(&self) -> u64 {
        self.pending.get()
    }

    pub(crate) fn stats(&self) -> AfterStats {
        let totals = &self.totals;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        AfterStats {
            scheduled: load(&totals.scheduled),
            completed: load(&totals.completed),
            failed: load(&totals.failed),
            panicked: load(&totals.panicked),
            timed_out: load(&totals.timed_out),
            cancelled: load(&totals.cancelled) + load(&totals.written_off),
            forgotten: load(&totals.forgotten),
            shed: load(&totals.shed),
            truncated: load(&totals.truncated),
            held_bytes: self.held_bytes() as u64,
            running: load(&totals.running),
            queued: load(&totals.queued),
        }
    }

    /// The totals a drain reports the difference of: written-off callbacks are left out, they
    /// count in the report of the drain that wrote them off.
    pub(crate) fn settled(&self) -> AfterStats {
        let mut stats = self.stats();
        // Not `stats.cancelled - written_off`: a write-off landing between two reads of it
        // would underflow.
        stats.cancelled = self.totals.cancelled.load(Ordering::Relaxed);
        stats
    }

    /// Closes the layer, writes off every pending callback as cancelled, and tells every driver
    /// to stop. Returns how many it wrote off: none if the layer was closed already.
    pub(crate) fn write_off(&self) -> u64 {
        let written_off = self.pending.close();
        self.totals
            .written_off
            .fetch_add(written_off, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!(names::ended(Ended::Cancelled)).increment(written_off);
        self.shutdown.fire();
        if self.pending.get() == 0 {
            self.wake_idle();
        }
        written_off
    }

    /// Resolves as soon as nothing is pending.
    pub(crate) async fn idle(&self) {
        /// Counts its caller among the waiters while it lives, however the wait ends.
        struct Waiting<'a>(&'a Shared);

        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.idle_waiters.fetch_sub(1, Ordering::SeqCst);
            }
        }

        let mut waiting = None;
        loop {
            // A `Notified` hears every `notify_waiters` from its creation on, even before it is
            // polled: created before the check, it cannot miss the drop to zero. The waiter is
            // counted before the check, and the last callback to end counts its end before it
            // reads the waiters: one of the two sees the other.
            let notified = self.idle.notified();
            if waiting.is_none() {
                self.idle_waiters.fetch_add(1, Ordering::SeqCst);
                waiting = Some(Waiting(self));
            }
            if self.pending() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Tells the callbacks that asked (`AfterContext::stopping`) to wrap up: raised while a shutdown
/// drains, and lowered once no drain is under way, so that a drain that ended within its grace
/// leaves the layer working as before. A count, not a flag: two drains may overlap.
#[derive(Default)]
pub(crate) struct Draining {
    /// Drains under way.
    drains: AtomicUsize,
    waiters: Arc<Notify>,
}

impl Draining {
    /// A drain starts: wakes every waiter. It is under way until the guard is dropped.
    pub(crate) fn start(&self) -> DrainUnderWay<'_> {
        // Counted before the waiters are woken, so that a woken waiter finds it under way.
        self.drains.fetch_add(1, Ordering::SeqCst);
        self.waiters.notify_waiters();
        DrainUnderWay(self)
    }

    /// Whether a drain is under way.
    pub(crate) fn is_under_way(&self) -> bool {
        self.drains.load(Ordering::SeqCst) > 0
    }

    /// Resolves once a drain started after its creation. Check [`Draining::is_under_way`] after
    /// creating it, not before: it hears every start from its creation on.
    pub(crate) fn started(&self) -> OwnedNotified {
        self.waiters.clone().notified_owned()
    }
}

/// A drain under way, until dropped: when it ends, or when its future is dropped.
pub(crate) struct DrainUnderWay<'a>(&'a Draining);

impl Drop for DrainUnderWay<'_> {
    fn drop(&mut self) {
        self.0.drains.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Tells work to stop at once: a flag that drivers read whenever they are woken, before they
/// poll anything, and a `Notify` for the few that wait for it (the drivers a Lambda invocation
/// waits for).
#[derive(Default)]
pub(crate) struct StopSignal {
    fired: AtomicBool,
    waiters: Arc<Notify>,
}

impl StopSignal {
    /// Tells the work to stop.
    pub(crate) fn fire(&self) {
        // Set before the waiters are woken, so that a woken driver finds it set.
        self.fired.store(true, Ordering::SeqCst);
        self.waiters.notify_waiters();
    }

    /// Whether [`StopSignal::fire`] was called.
    pub(crate) fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Resolves once the signal fired after its creation. Check [`StopSignal::is_fired`] after
    /// creating it, not before: it hears every firing from its creation on.
    pub(crate) fn fired(&self) -> OwnedNotified {
        self.waiters.clone().notified_owned()
    }
}

#[cfg(feature = "metrics")]
pub(crate) mod names {
    use super::Ended;

    pub(crate) const SCHEDULED: &str = "tower_after_callbacks_scheduled_total";
    pub(crate) const SHED: &str = "tower_after_callbacks_shed_total";
    pub(crate) const TRUNCATED: &str = "tower_after_snapshots_truncated_total";
    pub(crate) const RUNNING: &str = "tower_after_callbacks_running";
    pub(crate) const QUEUED: &str = "tower_after_callbacks_queued";

    pub(crate) fn ended(how: Ended) -> &'static str {
        match how {
            Ended::Completed => "tower_after_callbacks_completed_total",
            Ended::Failed => "tower_after_callbacks_failed_total",
            Ended::Panicked => "tower_after_callbacks_panicked_total",
            Ended::TimedOut => "tower_after_callbacks_timed_out_total",
            Ended::Cancelled => "tower_after_callbacks_cancelled_total",
            Ended::Forgotten => "tower_after_callbacks_forgotten_total",
            Ended::Shed => SHED,
        }
    }
}

/// Counters and gauges of the callbacks of one [`AfterLayer`](crate::AfterLayer) and its clones,
/// from [`AfterTasks::stats`](crate::AfterTasks::stats).
///
/// The totals only grow. Every callback scheduled is either pending (see
/// [`AfterTasks::pending`](crate::AfterTasks::pending): queued behind its response, waiting for
/// a concurrency permit, or running) or counted in exactly one of `completed`, `failed`,
/// `panicked`, `timed_out`, `cancelled`, `forgotten` and `shed`. Each total is exact, and read on
/// its own: while callbacks end, a reading may see one ending's total before the pending count
/// drops. Whenever [`AfterTasks::idle`](crate::AfterTasks::idle) or a shutdown report says
/// nothing is pending, they all agree.
///
/// With the `metrics` feature, the same numbers are published through the [`metrics`] facade:
///
/// | name | kind |
/// |---|---|
/// | `tower_after_callbacks_scheduled_total` | counter |
/// | `tower_after_callbacks_completed_total` | counter |
/// | `tower_after_callbacks_failed_total` | counter |
/// | `tower_after_callbacks_panicked_total` | counter |
/// | `tower_after_callbacks_timed_out_total` | counter |
/// | `tower_after_callbacks_cancelled_total` | counter |
/// | `tower_after_callbacks_forgotten_total` | counter |
/// | `tower_after_callbacks_shed_total` | counter |
/// | `tower_after_snapshots_truncated_total` | counter |
/// | `tower_after_callbacks_running` | gauge |
/// | `tower_after_callbacks_queued` | gauge |
///
/// [`metrics`]: https://docs.rs/metrics
///
/// ```
/// let tasks = tower_after::AfterLayer::new().tasks();
/// let stats = tasks.stats();
/// let ended = stats.completed() + stats.failed() + stats.panicked() + stats.timed_out()
///     + stats.cancelled() + stats.forgotten() + stats.shed();
/// assert_eq!(stats.scheduled(), ended + tasks.pending());
/// println!("{} running, {} waiting for a place", stats.running(), stats.queued());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AfterStats {
    pub(crate) scheduled: u64,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) panicked: u64,
    pub(crate) timed_out: u64,
    pub(crate) cancelled: u64,
    pub(crate) forgotten: u64,
    pub(crate) shed: u64,
    pub(crate) truncated: u64,
    pub(crate) held_bytes: u64,
    pub(crate) running: u64,
    pub(crate) queued: u64,
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

    /// Callbacks that returned an error (each one logged at `ERROR`, naming it): see
    /// [`AfterOutput`](crate::AfterOutput).
    #[must_use]
    pub fn failed(&self) -> u64 {
        self.failed
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
    /// [maximum of pending callbacks](crate::AfterLayer::max_pending), or pending work already
    /// held its [maximum of snapshot bytes](crate::AfterLayer::max_held_bytes). They never ran;
    /// each refusal is also logged (a `WARN` a second at most, with the count).
    #[must_use]
    pub fn shed(&self) -> u64 {
        self.shed
    }

    /// Request snapshots cut by their cap ([`SnapshotConfig::max_bytes`](crate::SnapshotConfig::max_bytes)):
    /// headers, or the request target, left out because the request was larger. Each is also
    /// logged (a `WARN` a second at most, with the count), and marked
    /// [`truncated`](crate::RequestSnapshot::truncated) for its callbacks.
    #[must_use]
    pub fn truncated(&self) -> u64 {
        self.truncated
    }

    /// Bytes of request snapshots that pending callbacks hold now, bounded by
    /// [`AfterLayer::max_held_bytes`](crate::AfterLayer::max_held_bytes).
    #[must_use]
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
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

/// How long a shutdown whose grace ran out waits for callbacks counting their own ending.
pub(crate) const SETTLE: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::Shared;

    /// `settled()` reads the written-off total twice (once inside `stats()`): a write-off
    /// landing between the two reads makes `cancelled -= written_off` underflow (a panic in
    /// debug builds, a report of ~2^64 cancelled callbacks in release ones). Two drains at the
    /// same time, one reading its totals while the other writes off, hit it.
    #[test]
    fn settled_totals_never_underflow_while_a_write_off_lands() {
        let barrier = Arc::new(Barrier::new(2));
        for _ in 0..20_000 {
            let shared = Arc::new(Shared::default());
            let tickets: Vec<_> = (0..64)
                .map(|_| shared.ticket(usize::MAX).unwrap())
                .collect();
            let writer = {
                let (shared, barrier) = (shared.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    shared.write_off()
                })
            };
            barrier.wait();
            while !writer.is_finished() {
                let _ = shared.settled();
            }
            let _ = shared.settled();
            assert_eq!(writer.join().unwrap(), 64);
            drop(tickets);
        }
    }
}
