//! What the layer counts: how each callback ended, the gauges, and the [`AfterStats`] users read.
//! With the `metrics` feature, the same numbers go to the `metrics` facade, under the names here.

use std::sync::atomic::AtomicU64;

/// The totals, each counted on its own: they agree with each other whenever nothing is pending
/// (see [`Ledger::ended`](crate::tasks::ledger::Ledger::ended)).
#[derive(Default)]
pub(crate) struct Totals {
    pub(crate) scheduled: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) forgotten: AtomicU64,
    pub(crate) shed: AtomicU64,
    /// Snapshots cut by their cap.
    pub(crate) truncated: AtomicU64,
    /// Written off by a shutdown: cancelled, but in the report of the drain that wrote them off
    /// only.
    pub(crate) written_off: AtomicU64,
    pub(crate) running: AtomicU64,
    pub(crate) queued: AtomicU64,
}

impl Totals {
    pub(crate) fn of(&self, how: Ended) -> &AtomicU64 {
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

/// The gauges, for [`Ledger::gauge`](crate::tasks::ledger::Ledger::gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gauge {
    Running,
    Queued,
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
