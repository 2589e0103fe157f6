//! [`AfterTasks`]: the view on every callback a layer has scheduled, for draining at shutdown.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// State shared by every clone of one [`AfterLayer`](crate::AfterLayer) and by the requests it
/// serves.
#[derive(Default)]
pub(crate) struct Shared {
    /// The per-request driver tasks, so that shutdown can wait for them to settle.
    pub(crate) drivers: TaskTracker,
    /// Cancelled when a shutdown's grace period runs out.
    pub(crate) shutdown: CancellationToken,
    /// Callbacks registered and not yet ended, whether they have started or not.
    pending: AtomicUsize,
    /// Woken whenever `pending` drops to zero.
    idle: Notify,
    /// Callbacks that ran to their end or panicked.
    finished: AtomicU64,
    /// Callbacks dropped before their end: by a budget, a shutdown or a missing runtime.
    cancelled: AtomicU64,
}

/// How a callback ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It ran to its end, or panicked (which ends it too).
    Finished,
    /// It was dropped before its end.
    Cancelled,
}

impl Shared {
    pub(crate) fn registered(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    /// Accounts for `count` callbacks that ended the same way.
    pub(crate) fn ended(&self, how: Ended, count: usize) {
        if count == 0 {
            return;
        }
        let counter = match how {
            Ended::Finished => &self.finished,
            Ended::Cancelled => &self.cancelled,
        };
        counter.fetch_add(count as u64, Ordering::Relaxed);
        // AcqRel: whoever sees zero also sees the counters above.
        if self.pending.fetch_sub(count, Ordering::AcqRel) == count {
            self.idle.notify_waiters();
        }
    }

    fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    fn totals(&self) -> (u64, u64) {
        (
            self.finished.load(Ordering::Acquire),
            self.cancelled.load(Ordering::Acquire),
        )
    }

    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Register before reading, so a drop to zero in between is not missed.
            notified.as_mut().enable();
            if self.pending() == 0 {
                return;
            }
            notified.await;
        }
    }
}

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
    shared: Arc<Shared>,
}

impl AfterTasks {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The number of callbacks and [`wait_until`](crate::After::wait_until) futures registered
    /// and not yet ended: queued behind a response that is still being sent, or running.
    #[must_use]
    pub fn pending(&self) -> usize {
        self.shared.pending()
    }

    /// Waits for every pending callback, then reports what happened to them.
    ///
    /// Callbacks registered while it waits (by a callback, a late [`wait_until`] future or a
    /// request still finishing) are waited for too. If `grace` runs out first, everything still
    /// pending is cancelled: running callbacks are dropped at their next `.await`, queued ones
    /// never start, and each affected request logs a warning naming its method, path and count.
    /// After that moment the layer cancels every further callback at once, since the process is
    /// going away; a drain that ends within its grace leaves the layer working as before.
    ///
    /// Run it after `axum::serve(..).with_graceful_shutdown(..)` returns, when no request is in
    /// flight. Callbacks queued behind a response that is still being sent when the grace runs out
    /// are counted as cancelled and are dropped as soon as that response ends.
    ///
    /// # Cancel safety
    ///
    /// Dropping this future stops the waiting; it cancels nothing unless the grace period had
    /// already run out.
    ///
    /// [`wait_until`]: crate::After::wait_until
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let shared = &self.shared;
        let (finished_before, cancelled_before) = shared.totals();
        let drained = tokio::time::timeout(grace, shared.idle()).await.is_ok();
        let mut left_queued = 0;
        if !drained {
            shared.shutdown.cancel();
            // Every driver reacts to the cancellation at once; wait for them to settle. Callbacks
            // still queued behind an unfinished response are not in a driver yet.
            shared.drivers.close();
            shared.drivers.wait().await;
            shared.drivers.reopen();
            left_queued = shared.pending();
        }
        let (finished, cancelled) = shared.totals();
        let report = ShutdownReport {
            completed: (finished - finished_before) as usize,
            cancelled: (cancelled - cancelled_before) as usize + left_queued,
        };
        if report.cancelled > 0 {
            tracing::warn!(
                completed = report.completed,
                cancelled = report.cancelled,
                "after callbacks drained: grace period of {grace:?} ran out"
            );
        } else {
            tracing::info!(completed = report.completed, "after callbacks drained");
        }
        report
    }
}

impl fmt::Debug for AfterTasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AfterTasks")
            .field("pending", &self.pending())
            .finish()
    }
}

/// What [`AfterTasks::shutdown`] did: how many callbacks ended while it waited, and how many it
/// had to cancel.
///
/// Every callback pending when the drain started, or registered during it, is counted exactly
/// once: `completed() + cancelled()` is their total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    completed: usize,
    cancelled: usize,
}

impl ShutdownReport {
    /// Callbacks that ended by themselves during the drain (including any that panicked).
    #[must_use]
    pub fn completed(&self) -> usize {
        self.completed
    }

    /// Callbacks dropped before their end: by the grace deadline, or by their own request's
    /// budget while the drain was under way.
    #[must_use]
    pub fn cancelled(&self) -> usize {
        self.cancelled
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

    use crate::test_util::Logs;
    use crate::{After, AfterLayer};

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
        assert_eq!(tasks.pending(), 0);
        assert_eq!(done.load(Ordering::SeqCst), 0);
        let per_request = logs.lines_with("shutdown grace period ran out");
        assert_eq!(per_request.len(), 4, "{per_request:?}");
        assert!(per_request
            .iter()
            .all(|line| line.contains("WARN") && line.contains("cancelled=1")));
        let summary = logs.lines_with("after callbacks drained");
        assert_eq!(summary.len(), 1);
        assert!(summary[0].contains("cancelled=4"), "{summary:?}");

        // Past the deadline, new work is cancelled at once rather than left to the exiting process.
        serve_sleepers(&layer, 1, Duration::from_secs(1), &done).await;
        assert_eq!(tasks.shutdown(Duration::from_secs(1)).await.cancelled(), 1);
    }

    #[tokio::test]
    async fn shutdown_with_nothing_pending_returns_at_once() {
        let report = AfterLayer::new()
            .tasks()
            .shutdown(Duration::from_secs(3600))
            .await;
        assert_eq!((report.completed(), report.cancelled()), (0, 0));
    }
}
