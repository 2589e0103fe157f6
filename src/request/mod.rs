//! One request's engine, from the moment it enters the layer until its last callback ended.
//!
//! A request that enters `AfterLayer` opens an [`Inflight`]: its snapshot, its budget, its queue
//! of work (the [`scope`](scope::Scope), a small state machine under a lock that says what to
//! do next), and the callbacks' view of it. From there, in the order a request meets them:
//! - `admission`: a place for each callback under the layer's bounds, and the snapshot's bytes;
//! - `hand_over`: work queued, or carried by a driver spawned at once; handed over once the
//!   response finished (`finish`, called by the response's future or body);
//! - `driver`: the Tokio task that starts the callbacks in order and runs them concurrently;
//! - `callback`: one callback, with its span, its place under the concurrency limit and its
//!   line in the ledger, accounted for exactly once;
//! - `stop`: when and why the work stops (budget, host deadline, shutdown), and the notice a
//!   callback gets before;
//! - `blocking`: `run_blocking`'s closures on the blocking pool;
//! - `host`: the seam for platforms that freeze the process between invocations (Lambda).
//!
//! Requests without callbacks never spawn a driver. Nothing here runs user code while holding a
//! lock, and nothing runs it inside the response's `poll` or `Drop`: finishing a response only
//! hands its work to a driver.

mod admission;
pub(crate) mod blocking;
pub(crate) mod callback;
pub(crate) mod config;
pub(crate) mod context;
mod driver;
mod hand_over;
pub(crate) mod host;
pub(crate) mod scope;
pub(crate) mod stop;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::record::data::Data;
use crate::record::outcome::Outcome;
use crate::record::snapshot::RequestSnapshot;
use crate::request::config::Config;
use crate::request::context::AfterContext;
use crate::request::host::HostRef;
use crate::request::scope::Scope;
use crate::tasks::ledger::Ledger;

use self::callback::Job;

tokio::task_local! {
    /// The request whose response future, or callbacks, are being polled: for `After::current`.
    pub(crate) static REQUEST: Arc<Inflight>;
}

/// One request, from the moment it entered the layer until its last callback ended.
pub(crate) struct Inflight {
    pub(crate) snapshot: RequestSnapshot,
    /// The callbacks' max duration, counted from the end of the response (set by `MaxDuration`
    /// while the request is handled), and whether the snapshot is counted in the held bytes.
    terms: Terms,
    /// How and when the response finished.
    end: OnceLock<Outcome>,
    /// What the handler left for the callbacks (`After::insert`).
    pub(crate) data: Data,
    config: Arc<Config>,
    scope: Scope<Job>,
    /// The platform that served the request, if it freezes the process between invocations
    /// (`lambda::DrainLayer`): it holds the request's work back until its response is
    /// delivered, waits for its drivers, and stops them at its deadline.
    host: Option<HostRef>,
}

/// The callbacks' budget in nanoseconds, and in its top bit whether the request's snapshot is
/// counted in the layer's held bytes: two small facts every request carries, in one word. The
/// budget is read and set in `stop.rs`, the bit in `admission.rs`.
struct Terms(AtomicU64);

/// The top bit: the snapshot is counted (see `admission.rs`).
const HELD: u64 = 1 << 63;
/// The budget's bits at their highest: no budget (a budget of 292 years or more is none).
const UNBOUNDED: u64 = HELD - 1;

// The request's state, shared by its handle, its body and its drivers: one allocation per
// request, so a change that grows it must be a conscious one.
const _: () = assert!(std::mem::size_of::<Inflight>() <= 240);

impl Inflight {
    /// A request entering the layer.
    pub(crate) fn open(snapshot: RequestSnapshot, config: &Arc<Config>) -> Arc<Self> {
        let inflight = Arc::new(Self {
            snapshot,
            terms: Terms(AtomicU64::new(0)),
            end: OnceLock::new(),
            data: Data::default(),
            config: config.clone(),
            scope: Scope::new(),
            host: host::current(),
        });
        inflight.set_budget(config.max_duration);
        inflight
    }

    pub(super) fn ledger(&self) -> &Arc<Ledger> {
        &self.config.ledger
    }

    /// Sets the callbacks' budget: the layer's, then a route's `MaxDuration` while the request is
    /// handled.
    pub(crate) fn set_budget(&self, budget: Duration) {
        self.terms.set_budget(budget);
    }

    /// Whether this is the request whose task is being polled.
    pub(super) fn is_current(self: &Arc<Self>) -> bool {
        REQUEST
            .try_with(|current| Arc::ptr_eq(current, self))
            .unwrap_or(false)
    }

    pub(super) fn context(self: &Arc<Self>) -> AfterContext {
        AfterContext::new(self.clone())
    }

    /// How the response finished: read by callbacks, which start only after that.
    pub(crate) fn outcome(&self) -> &Outcome {
        self.end
            .get()
            .expect("an AfterContext reads its outcome only once the response finished")
    }
}
