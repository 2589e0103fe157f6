//! [`AfterLayer`], which opens a scope for every request: the layer's settings, and its
//! [`AfterTasks`].

use std::fmt;
use std::future::Future;
use std::panic::Location;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use tokio::sync::Semaphore;

use crate::handle::AfterWork;
use crate::middleware::service::AfterService;
use crate::record::snapshot_config::SnapshotConfig;
use crate::request::callback::{finished, RunResult};
use crate::request::config::Config;
use crate::request::context::AfterContext;
use crate::tasks::AfterTasks;

/// A [`Layer`] that lets every request it wraps schedule work for after its response: see
/// [`After`](crate::After).
///
/// Put it on the outside of the router, so that every route, fallback and inner middleware is
/// inside it:
///
/// ```
/// use axum::{routing::get, Router};
/// use tower_after::{after, AfterLayer};
///
/// let app: Router = Router::new()
///     .route("/", get(|| async {
///         after(async { tracing::info!("response sent") });
///         "hello"
///     }))
///     .layer(AfterLayer::new());
/// ```
///
/// Clones share their callbacks' bookkeeping: [`AfterLayer::tasks`] on any clone sees them all.
///
/// # Ordering
///
/// Layers added after `AfterLayer` wrap it, and its callbacks see the response as it leaves
/// `AfterLayer`: what the layers inside it did to the response, not what the layers outside do.
/// So put inside it every layer whose effect callbacks should see:
/// - a panic-catching layer (tower-http's `CatchPanicLayer`) goes inside, so callbacks see the
///   `500` it makes rather than a missing response;
/// - a timeout layer inside makes a timed-out request's callbacks see its `408`/`503`;
/// - compression inside makes [`Outcome::body_bytes`](crate::Outcome::body_bytes) count the
///   compressed bytes, outside the uncompressed ones.
#[derive(Clone)]
pub struct AfterLayer {
    config: Arc<Config>,
}

/// Making a layer: the budget, the concurrency limit and the hook for every response.
impl AfterLayer {
    /// The budget of a request's callbacks unless [`AfterLayer::max_duration`] or
    /// [`MaxDuration`](crate::MaxDuration) says otherwise: 60 seconds, counted from the end of the response.
    pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(60);

    /// How many callbacks a layer holds at most unless [`AfterLayer::max_pending`] says
    /// otherwise: 10,000. See there for why, and what it costs in memory.
    pub const DEFAULT_MAX_PENDING: usize = 10_000;

    /// How many bytes of request snapshots pending work holds at most unless
    /// [`AfterLayer::max_held_bytes`] says otherwise: 64 MiB.
    pub const DEFAULT_MAX_HELD_BYTES: usize = 64 * 1024 * 1024;

    /// A layer with the default budget of [`AfterLayer::DEFAULT_MAX_DURATION`].
    #[must_use]
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                ledger: Arc::default(),
                max_duration: Self::DEFAULT_MAX_DURATION,
                limit: None,
                after_each: None,
                max_pending: Self::DEFAULT_MAX_PENDING,
                snapshot: SnapshotConfig::new(),
                max_held_bytes: Self::DEFAULT_MAX_HELD_BYTES,
            }),
        }
    }

    /// Sets how long each request's callbacks may run, all together, counted from the moment its
    /// response finished. What still runs at the deadline is cancelled (dropped at its next
    /// `.await`), with a warning naming the request.
    ///
    /// [`Duration::MAX`] means no limit. A route can override it with [`MaxDuration`](crate::MaxDuration).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_after::AfterLayer;
    ///
    /// let layer = AfterLayer::new().max_duration(Duration::from_secs(10));
    /// let unbounded = AfterLayer::new().max_duration(Duration::MAX);
    /// ```
    #[must_use]
    pub fn max_duration(mut self, max_duration: Duration) -> Self {
        Arc::make_mut(&mut self.config).max_duration = max_duration;
        self
    }

    /// Lets at most `limit` callbacks run at once, across all requests of this layer and of the
    /// clones made from it afterwards. Without it, nothing waits.
    ///
    /// Callbacks beyond the limit wait in the order they reach it: a request's in the order they
    /// were registered, requests in the order their responses finished (on the multi-thread
    /// runtime, give or take Tokio starting a just-spawned task before an older one). A waiting callback is
    /// pending and counted as queued in [`AfterTasks::stats`]; it still belongs to its request's
    /// budget (cancelled, without running, if that runs out first) and to the shutdown drain.
    /// `wait_until` futures count too, once they start.
    ///
    /// Use it to bound the load that callbacks put on what they call (a database, an API). It
    /// bounds how many callbacks *run*, not how many *wait*: under sustained overload the waiting
    /// ones accumulate, each holding its request's snapshot, until their budget runs out or the
    /// layer's [`max_pending`](AfterLayer::max_pending) refuses more. Pair it with a
    /// [`max_duration`](AfterLayer::max_duration) that matches how long waiting is still useful.
    ///
    /// ```
    /// let layer = tower_after::AfterLayer::new().concurrency_limit(64);
    /// ```
    ///
    /// # Panics
    ///
    /// If `limit` is 0 (nothing could ever run) or larger than Tokio's semaphore allows.
    #[must_use]
    #[track_caller]
    pub fn concurrency_limit(mut self, limit: usize) -> Self {
        assert!(
            limit > 0,
            "`AfterLayer::concurrency_limit(0)` would never run a callback: give at least 1"
        );
        Arc::make_mut(&mut self.config).limit = Some(Arc::new(Semaphore::new(limit)));
        self
    }

    /// Runs `hook` after *every* response this layer serves, like a callback each request had
    /// registered first: with the same [`AfterContext`] (the request's snapshot and how its
    /// response ended), on the same terms (after the response, also when the client left or the
    /// handler failed; under the request's budget, the concurrency limit and the shutdown
    /// drain; counted in [`AfterTasks::stats`]).
    ///
    /// It is what an access log, an audit trail or a metrics exporter wants: it also sees the
    /// requests whose handler never ran or never registered anything, such as a `POST` whose
    /// JSON the `Json` extractor rejected with a `400`. It is tower-http's `on_eos`, made async
    /// and aware of clients that leave.
    ///
    /// ```
    /// use tower_after::{AfterContext, AfterLayer};
    ///
    /// async fn audit(ctx: AfterContext) {
    ///     let request = ctx.request();
    ///     let status = ctx.outcome().status().map(|status| status.as_u16());
    ///     tracing::info!(method = %request.method(), path = request.uri().path(), status,
    ///         completion = %ctx.outcome().completion(), "audit");
    /// }
    ///
    /// let layer = AfterLayer::new().after_each(audit);
    /// ```
    ///
    /// A hook that writes somewhere captures what it writes with (a database pool, a client).
    /// It is called once per response, so it clones what each call moves into its future; and
    /// since a flood of requests (even rejected ones) makes a flood of hooks, a
    /// [`concurrency_limit`](AfterLayer::concurrency_limit) keeps them from swamping the
    /// database, with [`max_pending`](AfterLayer::max_pending) shedding the excess:
    ///
    /// ```
    /// use tower_after::AfterLayer;
    ///
    /// #[derive(Clone)]
    /// struct Pool; // a database pool: cheap to clone
    ///
    /// impl Pool {
    ///     async fn insert_access_log(&self, path: &str, status: Option<u16>) -> Result<(), String> {
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let pool = Pool;
    /// let layer = AfterLayer::new()
    ///     .concurrency_limit(16)
    ///     .after_each(move |ctx| {
    ///         let pool = pool.clone(); // one per call: the future owns it
    ///         async move {
    ///             let status = ctx.outcome().status().map(|status| status.as_u16());
    ///             pool.insert_access_log(ctx.request().path(), status).await // `Err` is logged
    ///         }
    ///     });
    /// ```
    ///
    /// The hook starts before the request's other callbacks. It is counted from the end of its
    /// response, like them: a response still being sent (a stream, a long poll) holds no place
    /// under [`max_pending`](AfterLayer::max_pending). Calling `after_each` again replaces the
    /// hook. Each request then costs one more small allocation and a callback start, measured in
    /// `BENCHMARKS.md`.
    ///
    /// It is named after test frameworks' `afterEach`, not tower-http's
    /// `TraceLayer::on_response`: that one is called synchronously as soon as the response's
    /// *head* is ready, while this one runs once the whole response has ended.
    #[must_use]
    #[track_caller]
    pub fn after_each<C, F>(mut self, hook: C) -> Self
    where
        C: Fn(AfterContext) -> F + Send + Sync + 'static,
        F: AfterWork,
    {
        let hook = move |ctx| -> Pin<Box<dyn Future<Output = RunResult> + Send>> {
            let future = hook(ctx);
            Box::pin(async move { finished(future.await) })
        };
        Arc::make_mut(&mut self.config).after_each = Some((Arc::new(hook), Location::caller()));
        self
    }
}

/// Bounds on what pending work holds, and the handle on it.
impl AfterLayer {
    /// Sets how many callbacks this layer (and its clones) holds at most: waiting for their
    /// response to end, waiting for a place under the [concurrency
    /// limit](AfterLayer::concurrency_limit), or running. Beyond it, new work is refused and
    /// dropped (the oldest is kept): counted in [`AfterStats::shed`](crate::AfterStats::shed),
    /// logged at `WARN` at most once a second with the route and the count, and reported to
    /// [`After::try_run`](crate::After::try_run) callers, with the work.
    ///
    /// Callbacks live in memory: a burst of requests whose callbacks wait (for a slow database,
    /// for a place under the limit) must not grow the server until the kernel kills it. The
    /// default of [`DEFAULT_MAX_PENDING`](AfterLayer::DEFAULT_MAX_PENDING) (10,000) bounds
    /// that memory to a few tens of MiB (a pending callback holds its request's snapshot, its own
    /// future and about a kilobyte of bookkeeping; see `BENCHMARKS.md`), while no server that
    /// drains its callbacks as fast as it takes requests comes near it. `usize::MAX` means no
    /// bound.
    ///
    /// A request's [`after_each`](AfterLayer::after_each) hook takes its place when the
    /// response ends, so open streams and long polls hold none. A
    /// [`run_named`](crate::After::run_named) registration that replaces a queued callback takes
    /// its place and is never refused. Once a shutdown's grace ran out, new work is refused as
    /// well (see [`AfterTasks::shutdown`]).
    ///
    /// ```
    /// let layer = tower_after::AfterLayer::new().concurrency_limit(64).max_pending(50_000);
    /// ```
    #[must_use]
    pub fn max_pending(mut self, max_pending: usize) -> Self {
        Arc::make_mut(&mut self.config).max_pending = max_pending;
        self
    }

    /// Sets what the [`RequestSnapshot`](crate::RequestSnapshot) of each request keeps: which
    /// headers, and at most how many bytes (16 KiB by default). See [`SnapshotConfig`].
    ///
    /// Keeping only the headers callbacks read saves memory for every pending callback, and
    /// time for every request: the snapshot is taken as the request enters the layer.
    ///
    /// ```
    /// use http::header::{COOKIE, USER_AGENT};
    /// use tower_after::{AfterLayer, SnapshotConfig};
    ///
    /// // Keeps `x-request-id` too, always.
    /// let layer = AfterLayer::new().snapshot(SnapshotConfig::new().keep_headers([COOKIE, USER_AGENT]));
    /// ```
    #[must_use]
    pub fn snapshot(mut self, snapshot: SnapshotConfig) -> Self {
        Arc::make_mut(&mut self.config).snapshot = snapshot;
        self
    }

    /// Sets how many bytes of request snapshots the pending work of this layer (and its clones)
    /// holds at most: [`DEFAULT_MAX_HELD_BYTES`](AfterLayer::DEFAULT_MAX_HELD_BYTES) (64 MiB) by
    /// default, `usize::MAX` for no bound.
    ///
    /// A request's snapshot counts from its first callback until its last one ended (a clone of
    /// its [`After`](crate::After) kept longer, by a task or a socket, holds no place; work registered
    /// through it later takes one again). Beyond
    /// the bound, new work is refused like work beyond [`max_pending`](AfterLayer::max_pending):
    /// counted in [`AfterStats::shed`](crate::AfterStats::shed), logged at `WARN` once a second
    /// with the count, and reported to [`After::try_run`](crate::After::try_run) callers. With the default
    /// snapshot cap of 16 KiB, a client sending the largest headers hyper accepts pins at most
    /// this much, whatever it sends; [`AfterStats::held_bytes`](crate::AfterStats::held_bytes)
    /// says how much is held now.
    ///
    /// ```
    /// let layer = tower_after::AfterLayer::new().max_held_bytes(16 * 1024 * 1024);
    /// ```
    #[must_use]
    pub fn max_held_bytes(mut self, max_held_bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_held_bytes = max_held_bytes;
        self
    }

    /// A handle on the callbacks of this layer and all its clones, to count them and to drain
    /// them at shutdown.
    ///
    /// ```
    /// let layer = tower_after::AfterLayer::new();
    /// let tasks = layer.tasks();
    /// assert_eq!(tasks.pending(), 0);
    /// ```
    #[must_use]
    pub fn tasks(&self) -> AfterTasks {
        AfterTasks::new(self.config.ledger.clone())
    }
}

impl Default for AfterLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for AfterLayer {
    type Service = AfterService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AfterService::new(inner, self.config.clone())
    }
}

impl fmt::Debug for AfterLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AfterLayer")
            .field("max_duration", &self.config.max_duration)
            // The places free now: all of them while no callback runs.
            .field(
                "concurrency_limit",
                &(self.config.limit.as_ref()).map(|limit| limit.available_permits()),
            )
            .field("after_each", &self.config.after_each.is_some())
            .field("max_pending", &self.config.max_pending)
            .field("snapshot", &self.config.snapshot)
            .field("max_held_bytes", &self.config.max_held_bytes)
            .field("tasks", &self.tasks())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::AfterLayer;

    #[test]
    fn debug_shows_the_settings() {
        let layer = AfterLayer::new()
            .max_duration(Duration::from_secs(5))
            .concurrency_limit(64);
        let debug = format!("{layer:?}");
        assert!(debug.contains("concurrency_limit: Some(64)"), "{debug}");
        assert!(debug.contains("max_duration: 5s"), "{debug}");
    }
}
