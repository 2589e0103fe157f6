//! [`AfterTasks`]: the view on every callback a layer has scheduled, for counting them and
//! draining them at shutdown. The counting itself is in `ledger.rs`.

pub(crate) mod deadline;
pub(crate) mod ledger;
pub(crate) mod pending;
pub(crate) mod refusal;
pub(crate) mod serving;
pub(crate) mod signals;
pub(crate) mod stats;
pub(crate) mod warnings;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::tasks::deadline::{until, SETTLE};
use crate::tasks::ledger::Ledger;
use crate::tasks::stats::AfterStats;

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
    ledger: Arc<Ledger>,
}

impl AfterTasks {
    pub(crate) fn new(ledger: Arc<Ledger>) -> Self {
        Self { ledger }
    }

    #[cfg(feature = "lambda")]
    pub(crate) fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The number of callbacks and [`wait_until`](crate::After::wait_until) futures registered
    /// and not yet ended: queued behind a response that is still being sent, or running.
    #[must_use]
    pub fn pending(&self) -> u64 {
        self.ledger.pending()
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
        self.ledger.stats()
    }

    /// Resolves as soon as nothing is pending: every callback registered so far has ended.
    ///
    /// When it resolves, every total of [`AfterTasks::stats`] already counts what ended, and the
    /// gauges (`running`, `queued` and `held_bytes`) are back at zero. One exception, after a
    /// shutdown's grace ran out: the callbacks it wrote off (reported as cancelled) are no longer
    /// pending, but one that is still alive (it blocks inside its poll, or waits for something
    /// that has not woken it yet) stays in the `running` or `queued` gauge, and its snapshot in
    /// the held bytes, until it is dropped: when next woken, or with the runtime.
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
        self.ledger.idle().await;
    }

    /// Waits for every pending callback, for at most `grace`, then reports what happened to them.
    ///
    /// Callbacks registered while it waits (by a callback, a late [`wait_until`] future or a
    /// request still finishing) are waited for too. If `grace` runs out first, it returns at once
    /// and reports everything still pending as cancelled, with one warning that says how many.
    /// Those callbacks are never polled again: each is dropped, unpolled, as soon as it is woken
    /// (by what it awaits, or by its budget), and at the latest when the runtime stops. Queued
    /// ones never start. From that moment the layer takes no more work, since the process is
    /// going away: registering is refused (logged at `WARN` once a second, with a count, and
    /// returned as an error by [`try_run`](crate::After::try_run)), and the stats stay
    /// as the report left them. A drain that ends within its grace leaves the layer working as
    /// before.
    ///
    /// It returns within `grace` plus a moment: also when a callback blocks inside its poll (even
    /// on every worker thread), waits for a place under the
    /// [concurrency limit](crate::AfterLayer::concurrency_limit), or runs a
    /// [`run_blocking`](crate::After::run_blocking) closure, and also when the runtime that runs
    /// the callbacks is no longer driven. One case it cannot help: on a current-thread runtime, a
    /// callback that blocks also blocks the thread that polls the shutdown, until it yields. The
    /// deadline is kept by Tokio's timer and by one thread for the whole process, started by the
    /// first call to `shutdown`.
    ///
    /// A callback it could not stop in time is counted as cancelled, in the report and in
    /// [`stats`](AfterTasks::stats), even if it ends later; it is no longer
    /// [pending](AfterTasks::pending). Two drains, one after the other or at the same time, never
    /// report the same callback twice. A second drain started meanwhile waits for the first to
    /// end, within its own grace; if that runs out first, it writes off what is still pending.
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
    pub fn shutdown(
        &self,
        grace: Duration,
    ) -> impl Future<Output = ShutdownReport> + Send + 'static {
        // Here, not in the future's poll: the thread that keeps the deadline when every worker
        // is blocked.
        deadline::start();
        let ledger = self.ledger.clone();
        async move {
            let deadline = Instant::now().checked_add(grace);
            let turn = until(deadline, ledger.drain.lock()).await;
            let before = ledger.report_totals();
            // Callbacks that watch `AfterContext::stopping` wrap up now, within the grace, and
            // until the drain ends: a drain that ends in time leaves the layer as before. Told
            // only once the totals are read, so that one that wraps up at once is in this
            // report. A drain waiting for another's turn needs not tell them: that one has.
            let _under_way = ledger.draining().start();
            let drained = turn.is_some() && until(deadline, ledger.idle()).await.is_some();
            let written_off = if drained { 0 } else { ledger.write_off() };
            if !drained {
                // Callbacks that were counting their own end as the layer closed finish that
                // now, in a moment.
                let _ = until(Instant::now().checked_add(SETTLE), ledger.idle()).await;
            }
            let after = ledger.report_totals();
            let report = match turn {
                Some(_) => ShutdownReport::between(&before, &after, written_off),
                None => ShutdownReport {
                    cancelled: written_off,
                    ..ShutdownReport::default()
                },
            };
            if drained {
                // Once per shutdown: the one line the crate logs at INFO.
                tracing::info!(
                    completed = report.completed,
                    failed = report.failed,
                    panicked = report.panicked,
                    timed_out = report.timed_out,
                    forgotten = report.forgotten,
                    ?grace,
                    "after callbacks drained at shutdown"
                );
            } else {
                tracing::warn!(
                    completed = report.completed,
                    failed = report.failed,
                    panicked = report.panicked,
                    timed_out = report.timed_out,
                    cancelled = report.cancelled,
                    "after callbacks cancelled: the shutdown grace period of {grace:?} ran out"
                );
            }
            report
        }
    }
}

impl fmt::Debug for AfterTasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AfterTasks")
            .field("pending", &self.pending())
            .finish()
    }
}

/// What [`AfterTasks::shutdown`] did: how each callback it drained ended, with the names and
/// meanings of [`AfterStats`].
///
/// Every callback pending when the drain started, or registered during it, is counted exactly
/// once, in this report or in that of a drain running at the same time, never in both. A
/// callback the drain had to give up on (its grace ran out) is `cancelled` here and in
/// [`AfterTasks::stats`], even if it ends later.
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
/// assert_eq!(report.total(), 0);
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    completed: u64,
    failed: u64,
    panicked: u64,
    timed_out: u64,
    cancelled: u64,
    forgotten: u64,
}

impl ShutdownReport {
    /// What ended between two readings of the totals, with `written_off` more cancelled.
    fn between(before: &AfterStats, after: &AfterStats, written_off: u64) -> Self {
        Self {
            completed: after.completed - before.completed,
            failed: after.failed - before.failed,
            panicked: after.panicked - before.panicked,
            timed_out: after.timed_out - before.timed_out,
            cancelled: after.cancelled - before.cancelled + written_off,
            forgotten: after.forgotten - before.forgotten,
        }
    }

    /// Callbacks that ran to their end during the drain.
    #[must_use]
    pub fn completed(&self) -> u64 {
        self.completed
    }

    /// Callbacks that returned an error during the drain.
    #[must_use]
    pub fn failed(&self) -> u64 {
        self.failed
    }

    /// Callbacks that panicked during the drain.
    #[must_use]
    pub fn panicked(&self) -> u64 {
        self.panicked
    }

    /// Callbacks cut by their own request's budget while the drain was under way.
    #[must_use]
    pub fn timed_out(&self) -> u64 {
        self.timed_out
    }

    /// Callbacks cancelled because the grace period ran out (or because their runtime went
    /// away meanwhile).
    #[must_use]
    pub fn cancelled(&self) -> u64 {
        self.cancelled
    }

    /// Named callbacks replaced or forgotten before they started, during the drain.
    #[must_use]
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Every callback the drain accounted for: the sum of the others.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.completed
            + self.failed
            + self.panicked
            + self.timed_out
            + self.cancelled
            + self.forgotten
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

    use crate::test_util::{eventually, fail, Logs};
    use crate::{After, AfterLayer};

    #[tokio::test]
    async fn a_drain_that_ends_in_time_says_what_it_drained() {
        let logs = Logs::capture();
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        crate::test_util::serve(&layer, |after| {
            after.run(tokio::time::sleep(Duration::from_millis(50)));
        })
        .await;
        let report = tasks.shutdown(Duration::from_secs(10)).await;
        assert_eq!(report.completed(), 1);
        let lines = logs.lines_with("after callbacks drained at shutdown");
        assert_eq!(lines.len(), 1, "{}", logs.text());
        assert!(
            lines[0].contains("INFO")
                && lines[0].contains("after callbacks drained at shutdown completed=1"),
            "{lines:?}"
        );
        assert!(logs.lines_with("WARN").is_empty(), "{}", logs.text());
    }

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
        // The drivers stop their callbacks as soon as they run, each with a line at DEBUG in its
        // span: the one warning above says it for all of them.
        eventually("the cancelled callbacks to be dropped", || {
            tasks.stats().running() == 0
        })
        .await;
        assert_eq!(tasks.pending(), 0);
        assert_eq!(done.load(Ordering::SeqCst), 0);
        let per_callback = logs.lines_with("after callback cancelled: the shutdown grace period");
        assert_eq!(per_callback.len(), 4, "{per_callback:?}");
        assert!(per_callback.iter().all(|line| line.contains("DEBUG")));
        assert_eq!(logs.lines_with("WARN").len(), 1, "{}", logs.text());
        // Written off once: they count in no later report.
        assert_eq!(tasks.stats().cancelled(), 4);

        // Past the deadline, the layer takes no more work: nothing is spawned and cancelled,
        // and the stats stay as the report left them.
        let before = tasks.stats();
        serve_sleepers(&layer, 1, Duration::from_secs(1), &done).await;
        assert_eq!(tasks.stats(), before);
        assert_eq!(tasks.pending(), 0);
        let refused = logs.lines_with("after callback refused: the layer was shut down");
        assert!(
            refused.len() == 1 && refused[0].contains("WARN") && refused[0].contains("refused=1"),
            "{refused:?}"
        );
        let report = tasks.shutdown(Duration::from_secs(1)).await;
        assert_eq!((report.completed(), report.cancelled()), (0, 0));
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
            after.run(async { fail("counted, not fatal") });
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
            fn published(&self, name: &str) -> bool {
                self.0.lock().unwrap().contains_key(name)
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
        // A gauge stores its f64 bits; back at zero, they are all zero. Published, it went up
        // and came down.
        assert!(totals.published("tower_after_callbacks_running"));
        assert_eq!(totals.get("tower_after_callbacks_running"), 0);
    }

    #[cfg(feature = "metrics")]
    #[test]
    fn a_recorder_that_reads_the_stats_does_not_block_registration() {
        use metrics::{Counter, Gauge, Key, KeyName, Metadata, Recorder, SharedString, Unit};
        use std::sync::atomic::AtomicU64;

        /// A recorder that calls back into the crate whenever a metric is touched.
        struct ReadsStats(crate::AfterTasks, AtomicU64);

        impl ReadsStats {
            fn read(&self) {
                let scheduled = self.0.stats().scheduled();
                self.1.fetch_max(scheduled, Ordering::SeqCst);
            }
        }

        impl Recorder for ReadsStats {
            fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
            fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
                self.read();
                Counter::noop()
            }
            fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
                self.read();
                Gauge::noop()
            }
            fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> metrics::Histogram {
                metrics::Histogram::noop()
            }
        }

        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let layer = AfterLayer::new();
            let recorder = ReadsStats(layer.tasks(), AtomicU64::new(0));
            metrics::with_local_recorder(&recorder, || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let done = Arc::new(AtomicUsize::new(0));
                    serve_sleepers(&layer, 1, Duration::from_millis(1), &done).await;
                    layer.tasks().idle().await;
                });
            });
            let _ = done.send(recorder.1.load(Ordering::SeqCst));
        });
        let seen = finished
            .recv_timeout(Duration::from_secs(20))
            .expect("registration blocked on a recorder that reads the stats");
        assert!(seen >= 1, "the recorder saw the work scheduled: {seen}");
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
        // Named as in the stats: timed out by their budget, not cancelled by the drain.
        let ended = (report.completed(), report.timed_out(), report.cancelled());
        assert_eq!(ended, (0, 2, 0));
        assert_eq!(report.total(), 2);
        assert!(
            logs.lines_with("grace period").is_empty(),
            "{}",
            logs.text()
        );
        // A drain that ended in time says what it drained, in one line, at INFO.
        let lines = logs.lines_with("tower_after::tasks");
        assert!(
            lines.len() == 1 && lines[0].contains(" INFO ") && lines[0].contains("timed_out=2"),
            "{}",
            logs.text()
        );
    }
}
