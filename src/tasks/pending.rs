//! How many callbacks of a layer are pending, in one atomic word that every request of the layer
//! shares: registering is one compare-and-swap, ending one or two additions, and no lock.
//!
//! Two promises rest on it, and `loom/` checks both over every interleaving:
//! - whoever sees nothing pending also sees every ending counted: an ending is counted (by the
//!   caller's closure) *before* it leaves the pending count;
//! - a shutdown that closes the layer and writes off what is pending counts each callback once:
//!   either the callback counts its own ending, or the shutdown writes it off, never both. A
//!   callback counting its ending at the very moment of the close (`COUNTING`) is left to
//!   finish; one that ends after the close counts nothing.
//!
//! It knows nothing of Tokio or of what a callback is, so that it can be read on its own and
//! model-checked.

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};

/// One pending callback.
const ONE: u64 = 1;
/// Pending callbacks: the low 40 bits.
const PENDING: u64 = (1 << 40) - 1;
/// One callback counting its ending right now: bits 40 to 62.
const COUNTING: u64 = 1 << 40;
/// The layer was shut down and its pending work written off.
const CLOSED: u64 = 1 << 63;

/// The pending callbacks of one layer.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    state: AtomicU64,
}

/// Why [`Pending::register`] refused a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// `bound` callbacks are pending already.
    Bound,
    /// The layer was closed.
    Closed,
}

impl Pending {
    /// Counts one more pending callback, unless `bound` are pending or the layer is closed.
    pub(crate) fn register(&self, bound: usize) -> Result<(), Full> {
        let bound = u64::try_from(bound).unwrap_or(u64::MAX).min(PENDING);
        // Relaxed: only a first guess at the state; the compare-and-swap below checks it.
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            if state & CLOSED != 0 {
                return Err(Full::Closed);
            }
            if state & PENDING >= bound {
                return Err(Full::Bound);
            }
            // Release: what the caller did before (`Ledger::ticket` counts it scheduled) is seen
            // by whoever acquires a later count (`get`); nothing to acquire. A failure retries.
            match self.state.compare_exchange_weak(
                state,
                state + ONE,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => state = now,
            }
        }
    }

    /// Ends one pending callback: calls `count` to count how it ended, then takes it out of the
    /// pending count. Returns how many are still pending, or `None` if a shutdown wrote it off
    /// (and `count` was not called).
    pub(crate) fn end(&self, count: impl FnOnce()) -> Option<u64> {
        // Relaxed: whether `close` came first is settled by the order of the read-modify-writes
        // of this one word, whatever their ordering; and nothing is published yet.
        let state = self.state.fetch_add(COUNTING, Ordering::Relaxed);
        if state & CLOSED != 0 {
            // Relaxed: only withdraws the mark; no one waits for a written-off callback.
            self.state.fetch_sub(COUNTING, Ordering::Relaxed);
            return None;
        }
        count();
        // Release, so that whoever acquires the count without this callback (`get`) sees what
        // `count` counted; SeqCst, as the store of `Ledger::idle`'s handshake (`wake_idle`).
        let state = self.state.fetch_sub(COUNTING + ONE, Ordering::SeqCst);
        Some((state - (COUNTING + ONE)) & PENDING)
    }

    /// Closes the layer: from now on, [`Pending::register`] refuses. Every callback pending and
    /// not counting its ending right now is written off, and no longer pending. Returns how many
    /// it wrote off: none if it was closed already.
    pub(crate) fn close(&self) -> u64 {
        // Relaxed: only a first guess at the state; the compare-and-swap below checks it.
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            if state & CLOSED != 0 {
                return 0;
            }
            let counting = (state & !CLOSED) / COUNTING;
            let written_off = (state & PENDING) - counting;
            let closed = (state | CLOSED) - written_off * ONE;
            // SeqCst: the store of `Ledger::idle`'s handshake, as in `end`: `Ledger::write_off`
            // reads the waiters after it. Once a shutdown, so it costs nothing.
            match self.state.compare_exchange_weak(
                state,
                closed,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => return written_off,
                Err(now) => state = now,
            }
        }
    }

    /// How many callbacks are pending.
    pub(crate) fn get(&self) -> u64 {
        // Acquire, pairing with the Release in `end`: a count without a callback comes with its
        // ending counted. SeqCst: the load of `Ledger::idle`'s handshake with `wake_idle`.
        self.state.load(Ordering::SeqCst) & PENDING
    }

    /// Whether [`Pending::close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        // SeqCst, as `get`: the load of `Ledger::idle`'s handshake with `Ledger::write_off`,
        // which closes, then reads the waiters.
        self.state.load(Ordering::SeqCst) & CLOSED != 0
    }
}
