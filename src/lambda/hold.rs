//! An invocation of a platform that freezes the process between invocations (AWS Lambda): it
//! holds back the after-work of the requests it serves until its response is out, then counts
//! that work until it is done.
//!
//! On Lambda, `lambda_http` reads the response body to its end, then posts the response to the
//! Runtime API: a request's callbacks would start before that post. While its invocation is
//! *held*, a request that finishes leaves the start of its work here; [`Hold::release`] starts
//! it all once the response is posted. From then on, [`Invocation::drivers_done`] resolves whenever
//! no driver of those requests is at work. Its stop signal stops them when the invocation's time
//! runs out, and when a shutdown of the layer it was made for (the drain's) runs out of grace;
//! each request's own layer stops them too when its shutdown does.
//!
//! It reaches the core through the one seam for such platforms, [`Host`]: it knows nothing of
//! drivers, the held work is a closure, and the drivers count themselves in and out.

use std::future::Future;
use std::mem;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::future::select;
use tokio::sync::Notify;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::Instant;

use crate::request::host::{Host, HostRef, HOST};
use crate::request::stop::Stop;
use crate::tasks::ledger::Ledger;
use crate::tasks::signals::{Draining, StopSignal};

type Deferred = Box<dyn FnOnce() + Send>;

/// Why an invocation's work is stopped before its end.
const NEAR_DEADLINE: &str = "the Lambda invocation's deadline is near (raise the function's \
                             timeout, or lower the route's `MaxDuration`)";

/// One invocation, shared by the requests it serves.
pub(crate) struct Invocation {
    /// `None` once released: work arriving later starts at once.
    held: Mutex<Option<Vec<Deferred>>>,
    /// Drivers of its requests at work now.
    drivers: AtomicUsize,
    /// Woken whenever no driver is at work any more.
    drivers_done: Notify,
    /// Fired when its time runs out.
    stop_signal: StopSignal,
    /// When its time runs out, if it has a real deadline.
    cap: Option<Instant>,
    /// The layer it was made for: its shutdown stops the invocation's work, whichever layer
    /// registered it.
    drain: Arc<Ledger>,
}

impl Invocation {
    fn held(&self) -> MutexGuard<'_, Option<Vec<Deferred>>> {
        // No user code runs under the lock.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many drivers of its requests are at work.
    pub(crate) fn busy(&self) -> usize {
        // SeqCst, as every access to the count: `drivers_done` creates its `Notified`, then reads
        // this; a leaving driver decrements, then notifies. In one total order, either the read
        // sees zero or the notification finds the waiter.
        self.drivers.load(Ordering::SeqCst)
    }

    /// Resolves as soon as no driver of its requests is at work.
    pub(crate) async fn drivers_done(&self) {
        loop {
            // Created before the check, it hears a drop to zero that happens in between.
            let notified = self.drivers_done.notified();
            if self.busy() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Stops the work of its requests: its time ran out.
    pub(crate) fn stop(&self) {
        self.stop_signal.fire();
    }

    /// Starts the work held back so far, in the order it arrived; later work starts at once.
    fn release(&self) {
        let deferred = mem::take(&mut *self.held()).unwrap_or_default();
        for start in deferred {
            start();
        }
    }
}

/// The handle of the code that serves an invocation. Dropped without [`Hold::release`] (the
/// invocation was abandoned), it releases the work all the same, so that none is left behind.
pub(crate) struct Hold {
    invocation: Arc<Invocation>,
    /// The same invocation, as its requests' host.
    host: HostRef,
}

impl Hold {
    /// A new invocation, held, made for the layer whose state `drain` is, whose work stops at
    /// `cap`, if it has one.
    pub(crate) fn new(drain: Arc<Ledger>, cap: Option<Instant>) -> Self {
        let invocation = Arc::new(Invocation {
            cap,
            held: Mutex::new(Some(Vec::new())),
            drivers: AtomicUsize::new(0),
            drivers_done: Notify::new(),
            stop_signal: StopSignal::default(),
            drain,
        });
        let host: HostRef = Arc::new(Box::new(invocation.clone()));
        Self { invocation, host }
    }

    /// Calls `f` with the invocation as the current host.
    pub(crate) fn sync_scope<R>(&self, f: impl FnOnce() -> R) -> R {
        HOST.sync_scope(self.host.clone(), f)
    }

    /// `future`, polled with the invocation as the current host.
    pub(crate) fn scope<F: Future>(&self, future: F) -> TaskLocalFuture<HostRef, F> {
        HOST.scope(self.host.clone(), future)
    }

    /// Starts the work held back: the invocation's response is posted.
    pub(crate) fn release(self) -> Arc<Invocation> {
        self.invocation.release();
        self.invocation.clone()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        // A no-op after `release`.
        self.invocation.release();
    }
}

impl Host for Arc<Invocation> {
    fn after_response(&self, start: Box<dyn FnOnce() + Send>) {
        let mut held = self.held();
        match held.as_mut() {
            Some(deferred) => deferred.push(start),
            None => {
                drop(held);
                start();
            }
        }
    }

    fn enter(&self) {
        // SeqCst, as every access to the count (see `busy`).
        self.drivers.fetch_add(1, Ordering::SeqCst);
    }

    fn leave(&self) {
        // SeqCst, as every access to the count (see `busy`).
        if self.drivers.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.drivers_done.notify_waiters();
        }
    }

    /// A shutdown of the layer it was made for stops its work as a shutdown; its own time
    /// running out, as a timeout.
    fn must_stop(&self) -> Option<Stop> {
        if self.drain.shutdown().is_fired() {
            return Some(Stop::Shutdown);
        }
        self.stop_signal
            .is_fired()
            .then_some(Stop::Host(NEAR_DEADLINE))
    }

    fn deadline(&self) -> Option<Instant> {
        self.cap
    }

    fn draining(&self) -> Option<&Draining> {
        Some(self.drain.draining())
    }

    fn stop_fired(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let own = self.stop_signal.fired();
        let drain = self.drain.shutdown().fired();
        Box::pin(async move {
            select(pin!(own), pin!(drain)).await;
        })
    }
}
