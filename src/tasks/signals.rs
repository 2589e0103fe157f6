//! The two signals a layer sends its callbacks: *wrap up* while a shutdown drains
//! ([`Draining`], heard through `AfterContext::stopping`), and *stop now* once a shutdown's grace
//! ran out or a platform's deadline came ([`StopSignal`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

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
        // Relaxed: Notify orders it before any `Notified` made after the wake-up (`started`).
        self.drains.fetch_add(1, Ordering::Relaxed);
        self.waiters.notify_waiters();
        DrainUnderWay(self)
    }

    /// Whether a drain is under way.
    pub(crate) fn is_under_way(&self) -> bool {
        // Acquire, pairing with the Release in `DrainUnderWay::drop`: who finds the drains over
        // also finds a write-off's `StopSignal::fire` (`AfterContext::stopping` reads it next).
        self.drains.load(Ordering::Acquire) > 0
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
        // Release, pairing with the Acquire in `is_under_way`: publishes the drain's write-off
        // (`StopSignal::fire`), if it had one, with the drain's end.
        self.0.drains.fetch_sub(1, Ordering::Release);
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
        // Release, pairing with the Acquire in `is_fired`: who finds it set sees what came before
        // (a write-off's `Pending::close`). Set before the wake-up, which Notify orders after it.
        self.fired.store(true, Ordering::Release);
        self.waiters.notify_waiters();
    }

    /// Whether [`StopSignal::fire`] was called.
    pub(crate) fn is_fired(&self) -> bool {
        // Acquire, pairing with the Release in `fire`. No SeqCst: a waiter makes its `Notified`
        // before this read, and Notify orders `fire`'s wake-up before a `Notified` made after it.
        self.fired.load(Ordering::Acquire)
    }

    /// Resolves once the signal fired after its creation. Check [`StopSignal::is_fired`] after
    /// creating it, not before: it hears every firing from its creation on.
    pub(crate) fn fired(&self) -> OwnedNotified {
        self.waiters.clone().notified_owned()
    }
}
