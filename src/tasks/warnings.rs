//! The rate of the layer's warnings: one line a second at most, with a count, for events that
//! come by the thousand (refused work, truncated snapshots, a panicking metrics recorder).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Events since the last warning about them, and when that was: one warning a second at most.
#[derive(Default)]
pub(crate) struct Warnings {
    /// Milliseconds since `since` at the last warning, plus one; 0 before the first.
    last_warning: AtomicU64,
    unreported: AtomicU64,
    since: OnceLock<Instant>,
}

impl Warnings {
    /// Counts one event; `Some(events since the last warning)` when a warning is due now.
    pub(crate) fn event(&self) -> Option<u64> {
        // Relaxed: a count that guards no memory; the `swap` below takes each event exactly once,
        // as read-modify-writes of one atomic are totally ordered.
        self.unreported.fetch_add(1, Ordering::Relaxed);
        let since = *self.since.get_or_init(Instant::now);
        let now = u64::try_from(since.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        // Relaxed: only a first guess; the compare-and-swap below checks it.
        let last = self.last_warning.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= 1_000;
        // Relaxed, the swap too: one caller wins the compare-and-swap of one atomic, and warns
        // with every event counted before its swap; the time and the count guard no memory.
        (due && (self.last_warning)
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok())
        .then(|| self.unreported.swap(0, Ordering::Relaxed))
    }
}
