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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::tasks::pending::{Full, Pending};
use crate::tasks::refusal::{Refusal, Refused};
use crate::tasks::serving::Serving;
use crate::tasks::signals::{Draining, StopSignal};
#[cfg(feature = "metrics")]
use crate::tasks::stats::names;
use crate::tasks::stats::{AfterStats, Ended, Gauge, Totals};
use crate::tasks::warnings::Warnings;
#[cfg(feature = "metrics")]
use crate::unwind::drop_caught;

/// State shared by every clone of one [`AfterLayer`](crate::AfterLayer) and by the requests it
/// serves.
#[derive(Default)]
pub(crate) struct Ledger {
    pending: Pending,
    totals: Totals,
    /// Callers of `idle()` that wait: reaching zero (pending callbacks, held bytes) wakes them,
    /// and costs nothing without.
    idle_waiters: AtomicUsize,
    /// Woken whenever nothing is pending or no bytes are held any more, and someone waits.
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
    /// Panics of the metrics recorder, likewise.
    #[cfg(feature = "metrics")]
    recorder_panics: Warnings,
    /// Bytes of request snapshots that pending work holds.
    held_bytes: AtomicUsize,
}

/// A callback's line in the ledger, from its registration: it ends exactly once, as told with
/// [`Ticket::close`], or as cancelled when dropped without that.
pub(crate) struct Ticket {
    ledger: Arc<Ledger>,
    open: bool,
}

impl Ticket {
    /// Ends the line as `how`, unless it has ended already.
    pub(crate) fn close(&mut self, how: Ended) {
        if self.open {
            self.open = false;
            self.ledger.ended(how);
        }
    }

    pub(crate) fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
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

/// Pending accounting: a ticket per callback, its ending, `idle`, and the write-off.
impl Ledger {
    /// Counts a newly registered callback, until its ticket ends. When the layer already holds
    /// `bound` pending callbacks, the callback is refused and counted as shed instead; when it
    /// was shut down, it is refused and not counted.
    pub(crate) fn ticket(self: &Arc<Self>, bound: usize) -> Result<Ticket, Refused> {
        // Counted before it is pending, so that no reader sees it end before it was scheduled.
        // Relaxed: the Release of `Pending::register`'s compare-and-swap publishes it with the
        // pending place; a reader of the stats alone sees each total exact on its own.
        self.totals.scheduled.fetch_add(1, Ordering::Relaxed);
        match self.pending.register(bound) {
            Ok(()) => {}
            Err(Full::Closed) => {
                // Relaxed: a plain correction of the total; nothing else depends on it.
                self.totals.scheduled.fetch_sub(1, Ordering::Relaxed);
                let warn = self.refusals.event();
                return Err(Refused {
                    why: Refusal::ShutDown,
                    warn,
                });
            }
            Err(Full::Bound) => {
                // Relaxed: a refused callback never was pending, so no reader of the pending
                // count waits for this total; it is exact on its own.
                self.totals.shed.fetch_add(1, Ordering::Relaxed);
                #[cfg(feature = "metrics")]
                {
                    let scheduled =
                        self.publish(|| metrics::counter!(names::SCHEDULED).increment(1));
                    let shed = self.publish(|| metrics::counter!(names::SHED).increment(1));
                    recorder_panicked(scheduled.or(shed));
                }
                let warn = self.refusals.event();
                return Err(Refused {
                    why: Refusal::Overloaded,
                    warn,
                });
            }
        }
        let ticket = Ticket {
            ledger: self.clone(),
            open: true,
        };
        #[cfg(feature = "metrics")]
        recorder_panicked(self.publish(|| metrics::counter!(names::SCHEDULED).increment(1)));
        Ok(ticket)
    }

    /// Accounts for the end of a pending callback: its totals first (ours and the published
    /// one), then the pending count, so that whoever sees the pending count at zero also sees
    /// the totals. No lock is held meanwhile; a shutdown writing work off waits for it, at most
    /// a moment.
    fn ended(&self, how: Ended) {
        #[cfg(feature = "metrics")]
        let mut warn = None;
        let left = self.pending.end(|| {
            // Relaxed: `Pending::end` releases it with the pending place it gives back, and
            // whoever sees the count at zero (`idle`) acquires it there.
            self.totals.of(how).fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            {
                warn = self.publish(|| metrics::counter!(names::ended(how)).increment(1));
            }
        });
        // `None`: written off, the shutdown counted it as cancelled already.
        if left == Some(0) {
            self.wake_idle();
        }
        // Said once the callback left the pending count: a subscriber is user code too.
        #[cfg(feature = "metrics")]
        recorder_panicked(warn);
    }

    /// Wakes the callers of `idle()`, if there are any. After the pending count, or the held
    /// bytes, reached zero: they count themselves before they read both, so one of the two sees
    /// the other.
    fn wake_idle(&self) {
        // SeqCst, as the waiters' count in `idle`: a store-load handshake on two locations (the
        // pending count and this one), which only a single total order makes one side see the
        // other.
        if self.idle_waiters.load(Ordering::SeqCst) > 0 {
            self.idle.notify_waiters();
        }
    }

    pub(crate) fn pending(&self) -> u64 {
        self.pending.get()
    }

    /// Closes the layer, writes off every pending callback as cancelled, and tells every driver
    /// to stop. Returns how many it wrote off: none if the layer was closed already.
    pub(crate) fn write_off(&self) -> u64 {
        let written_off = self.pending.close();
        // Relaxed: read by the drain that wrote them off, on this thread, and by `stats` as a
        // total exact on its own.
        self.totals
            .written_off
            .fetch_add(written_off, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        let warn = self.publish(|| {
            metrics::counter!(names::ended(Ended::Cancelled)).increment(written_off);
        });
        self.shutdown.fire();
        if self.pending.get() == 0 {
            self.wake_idle();
        }
        // Said once the drivers were told to stop: a subscriber is user code too.
        #[cfg(feature = "metrics")]
        recorder_panicked(warn);
        written_off
    }

    /// Whether nothing is pending, and no snapshot held: the gauges are at zero. Held bytes are
    /// not waited for once a shutdown wrote work off: a written-off callback that is still alive
    /// holds its snapshot until it is dropped, maybe never.
    fn is_idle(&self) -> bool {
        // SeqCst: the load side of the handshake with `release_bytes` (see there).
        self.pending.get() == 0
            && (self.held_bytes.load(Ordering::SeqCst) == 0 || self.pending.is_closed())
    }

    /// Resolves as soon as nothing is pending, and no snapshot held (see [`Ledger::is_idle`]).
    pub(crate) async fn idle(&self) {
        /// Counts its caller among the waiters while it lives, however the wait ends.
        struct Waiting<'a>(&'a Ledger);

        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                // SeqCst, as every access to the waiters' count (see `wake_idle`).
                self.0.idle_waiters.fetch_sub(1, Ordering::SeqCst);
            }
        }

        let mut waiting = None;
        loop {
            // A `Notified` hears every `notify_waiters` from its creation on, even before it is
            // polled: created before the check, it cannot miss the drop to zero. The waiter is
            // counted before the check, and the last callback to end counts its end (the last
            // snapshot let go, its release) before it reads the waiters: one of the two sees the
            // other.
            let notified = self.idle.notified();
            if waiting.is_none() {
                // SeqCst: counted before the pending count is read below, in the single total
                // order that `wake_idle`'s load shares (see there).
                self.idle_waiters.fetch_add(1, Ordering::SeqCst);
                waiting = Some(Waiting(self));
            }
            if self.is_idle() {
                return;
            }
            notified.await;
        }
    }
}

/// What pending work holds, and the readings of the totals and gauges.
impl Ledger {
    /// Counts `bytes` of a snapshot that pending work now holds, unless the layer would hold
    /// more than `max` (the caller then sheds its work).
    pub(crate) fn hold_bytes(&self, bytes: usize, max: usize) -> Result<(), Refused> {
        // Relaxed here and in the compare-and-swap: the bytes are a bound, not a guard of other
        // memory, and read-modify-writes of one atomic are totally ordered, so the bound holds.
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

    /// The snapshot's bytes are no longer held. The last ones wake the callers of `idle()`,
    /// which waits for them too: a request lets go of its snapshot as its driver retires, after
    /// its last callback left the pending count.
    pub(crate) fn release_bytes(&self, bytes: usize) {
        // SeqCst: the drop to zero is the store of a store-load handshake with `idle` (its
        // waiters' count, then `is_idle`), which only a single total order makes one side see.
        if self.held_bytes.fetch_sub(bytes, Ordering::SeqCst) == bytes {
            self.wake_idle();
        }
    }

    /// Bytes of request snapshots that pending work holds now.
    pub(crate) fn held_bytes(&self) -> usize {
        // Relaxed: a reading of the gauge, exact on its own.
        self.held_bytes.load(Ordering::Relaxed)
    }

    /// Counts a snapshot cut by its cap; `Some(cut since the last warning)` when a warning is
    /// due now.
    pub(crate) fn truncated(&self) -> Option<u64> {
        // Relaxed: a total read on its own; no callback's ending depends on it.
        self.totals.truncated.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        recorder_panicked(self.publish(|| metrics::counter!(names::TRUNCATED).increment(1)));
        self.truncations.event()
    }

    pub(crate) fn gauge(&self, gauge: Gauge, up: bool) {
        let value = match gauge {
            Gauge::Running => &self.totals.running,
            Gauge::Queued => &self.totals.queued,
        };
        // Relaxed: a callback leaves its gauge before its ticket closes (`Running`), so the
        // Release of `Pending::end` publishes the decrement to whoever sees nothing pending.
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
            recorder_panicked(self.publish(|| {
                let gauge = metrics::gauge!(name);
                if up {
                    gauge.increment(1.0);
                } else {
                    gauge.decrement(1.0);
                }
            }));
        }
    }

    pub(crate) fn stats(&self) -> AfterStats {
        let totals = &self.totals;
        // Relaxed: each total is exact on its own; they agree with each other once a reader has
        // acquired a pending count of zero (`idle`), which orders every ending before it.
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
    pub(crate) fn report_totals(&self) -> AfterStats {
        let mut stats = self.stats();
        // Not `stats.cancelled - written_off`: a write-off landing between two reads of it
        // would underflow.
        // Relaxed, as in `stats`.
        stats.cancelled = self.totals.cancelled.load(Ordering::Relaxed);
        stats
    }
}

/// The signals, the serving runtime, and the metrics recorder.
impl Ledger {
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

    /// Publishes through the metrics recorder, the only way the ledger calls it: the recorder
    /// is user code, at every call, and a panic in it must not cost a request, a callback or a
    /// pending place, nor abort the process (a gauge is published from `Drop`, maybe while
    /// unwinding). The panic is caught and counted; `Some(panics since the last warning)` when
    /// a warning is due now, for [`recorder_panicked`] to give once the caller's accounting is
    /// done. Costs nothing more than the call when the recorder does not panic.
    #[cfg(feature = "metrics")]
    fn publish(&self, publish: impl FnOnce()) -> Option<u64> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(publish)) {
            Ok(()) => None,
            Err(panic) => self.recorder_caught(panic),
        }
    }

    /// Drops a panic of the recorder, and counts it.
    #[cfg(feature = "metrics")]
    #[cold]
    #[inline(never)]
    fn recorder_caught(&self, panic: Box<dyn std::any::Any + Send>) -> Option<u64> {
        drop_caught(panic);
        self.recorder_panics.event()
    }
}

/// Says that the metrics recorder panicked, `count` times since the last warning, if a warning
/// is due (see [`Ledger::publish`]).
#[cfg(feature = "metrics")]
fn recorder_panicked(count: Option<u64>) {
    if let Some(count) = count {
        tracing::error!(
            panicked = count,
            "the metrics recorder panicked (caught: `AfterTasks::stats` counts right all the \
             same, and no work was lost; fix the recorder)"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::Ledger;

    /// `report_totals()` reads the written-off total twice (once inside `stats()`): a write-off
    /// landing between the two reads makes `cancelled -= written_off` underflow (a panic in
    /// debug builds, a report of ~2^64 cancelled callbacks in release ones). Two drains at the
    /// same time, one reading its totals while the other writes off, hit it.
    #[test]
    fn report_totals_never_underflow_while_a_write_off_lands() {
        let barrier = Arc::new(Barrier::new(2));
        for _ in 0..20_000 {
            let ledger = Arc::new(Ledger::default());
            let tickets: Vec<_> = (0..64)
                .map(|_| ledger.ticket(usize::MAX).unwrap())
                .collect();
            let writer = {
                let (ledger, barrier) = (ledger.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    ledger.write_off()
                })
            };
            barrier.wait();
            while !writer.is_finished() {
                let _ = ledger.report_totals();
            }
            let _ = ledger.report_totals();
            assert_eq!(writer.join().unwrap(), 64);
            drop(tickets);
        }
    }
}
