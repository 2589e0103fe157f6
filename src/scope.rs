//! One request's callbacks: where they wait for the response to finish, and the driver task that
//! runs them afterwards.
//!
//! Each request that registers work gets at most one *driver* at a time: a Tokio task that starts
//! the callbacks in registration order, polls them concurrently, and stops them when the request's
//! budget or the shutdown deadline runs out (the layer's watch, in `watch.rs`, tells it when).
//! The driver is spawned when there is something to run (the response finished with callbacks
//! queued, or a `wait_until` future arrived) and retires as soon as it has nothing left, so
//! requests without callbacks never spawn anything. Work that arrives after it retired spawns a
//! new one.
//!
//! Nothing here runs user code while holding the state lock, and nothing runs it inside the
//! response's `poll` or `Drop`: finishing a response only moves callbacks to the driver. How one
//! callback runs, once the driver has it, is in `callback.rs`.

use std::any::Any;
use std::borrow::Cow;
use std::future::Future;
use std::mem;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use smallvec::SmallVec;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Span;

use crate::callback::{BoxBlocking, BoxCallback, Callbacks, Exit, Running};
use crate::tasks::{Ended, Shared};
use crate::watch::{Stop, Ticket};
use crate::{After, Outcome, RequestSnapshot};

/// What a layer decides for each of its requests.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) max_duration: Duration,
    pub(crate) limit: Option<Arc<Semaphore>>,
}

/// One request, from the moment it entered the layer until its last callback ended.
pub(crate) struct Scope {
    pub(crate) snapshot: RequestSnapshot,
    pub(crate) entered: Instant,
    pub(crate) shared: Arc<Shared>,
    pub(crate) limit: Option<Arc<Semaphore>>,
    /// Set once, with the state locked, when the response finished; read without the lock.
    finished: OnceLock<Finished>,
    state: Mutex<State>,
}

struct State {
    /// Max duration of this request's callbacks, counted from the end of the response.
    budget: Duration,
    /// Before the response finished: callbacks waiting for it.
    /// After: anything registered, waiting for the driver to pick it up.
    /// Most requests register one callback, if any: it is kept without an allocation.
    queue: Jobs,
    /// `wait_until` futures registered before the response finished: they start at once.
    early: Vec<(BoxCallback, Span)>,
    driver: Driver,
}

struct Finished {
    outcome: Outcome,
    deadline: Option<Instant>,
}

enum Driver {
    /// No driver task: the next work to arrive spawns one.
    Absent,
    /// A driver task is alive; wake it when work arrives.
    Active(Option<Waker>),
}

type Jobs = SmallVec<[Job; 1]>;

/// Work registered with [`After`].
pub(crate) struct Job {
    work: Work,
    span: Span,
    name: Option<Cow<'static, str>>,
}

pub(crate) enum Work {
    Async(BoxCallback),
    Blocking(BoxBlocking),
}

/// When registered work may start.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// Once the response has finished.
    AfterResponse,
    /// At once (`wait_until`).
    Now,
}

impl Job {
    pub(crate) fn new(work: Work) -> Self {
        Self {
            work,
            span: callback_span(),
            name: None,
        }
    }

    pub(crate) fn named(mut self, name: Cow<'static, str>) -> Self {
        self.name = Some(name);
        self
    }
}

/// The span a callback runs in: an `after` span inside the span current where it was registered,
/// or that span itself when `after` spans are filtered out, so its logs carry the request's
/// context either way.
fn callback_span() -> Span {
    let span = tracing::info_span!("after");
    if span.is_disabled() {
        Span::current()
    } else {
        span
    }
}

impl State {
    /// Removes the queued job called `name`, if there is one.
    fn take_named(&mut self, name: &str) -> Option<Job> {
        let position = self
            .queue
            .iter()
            .position(|job| job.name.as_deref() == Some(name))?;
        Some(self.queue.remove(position))
    }
}

impl Scope {
    pub(crate) fn new(snapshot: RequestSnapshot, shared: Arc<Shared>, config: &Config) -> Self {
        Self {
            snapshot,
            entered: Instant::now(),
            shared,
            limit: config.limit.clone(),
            finished: OnceLock::new(),
            state: Mutex::new(State {
                budget: config.max_duration,
                queue: Jobs::new(),
                early: Vec::new(),
                driver: Driver::Absent,
            }),
        }
    }

    /// How the response ended. Only for a scope whose response has finished.
    pub(crate) fn outcome(&self) -> &Outcome {
        &self
            .finished
            .get()
            .expect("an AfterContext is made only once its response finished")
            .outcome
    }

    /// When the callbacks' budget runs out: known once the response finished.
    fn deadline(&self) -> Option<Instant> {
        self.finished.get()?.deadline
    }

    /// Locks the state. A panic never happens while it is held (no user code runs under it), but
    /// a poisoned lock is recovered rather than turned into a second panic.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_budget(&self, budget: Duration) {
        let mut state = self.state();
        if self.finished.get().is_none() {
            state.budget = budget;
        }
    }

    pub(crate) fn register(self: &Arc<Self>, job: Job, start: Start) {
        self.shared.registered();
        let mut state = self.state();
        let replaced = job.name.as_deref().and_then(|name| state.take_named(name));
        let wake = match (self.finished.get().is_some(), start, job) {
            (
                false,
                Start::Now,
                Job {
                    work: Work::Async(callback),
                    span,
                    ..
                },
            ) => {
                state.early.push((callback, span));
                true
            }
            (finished, _, job) => {
                state.queue.push(job);
                finished
            }
        };
        if wake {
            self.wake_driver(state);
        } else {
            drop(state);
        }
        self.drop_forgotten(replaced);
    }

    pub(crate) fn forget(&self, name: &str) -> bool {
        let forgotten = self.state().take_named(name);
        let found = forgotten.is_some();
        self.drop_forgotten(forgotten);
        found
    }

    /// Drops a forgotten or replaced job outside the lock, then counts it.
    fn drop_forgotten(&self, job: Option<Job>) {
        if let Some(job) = job {
            drop_quietly(self, job);
            self.shared.ended(Ended::Forgotten, 1);
        }
    }

    /// Marks the response as finished and hands its callbacks to a driver. Called exactly once,
    /// from the response future or body, so it must stay cheap and must not run user code.
    pub(crate) fn finish(self: &Arc<Self>, outcome: Outcome, now: Instant) {
        let state = self.state();
        let deadline = now.checked_add(state.budget);
        // Under the lock, so that a registration sees either the queue or the finished mark.
        let first = self.finished.set(Finished { outcome, deadline }).is_ok();
        debug_assert!(first, "a response finishes once");
        // A running driver (for `wait_until` futures) must learn the deadline.
        if state.queue.is_empty() && matches!(state.driver, Driver::Absent) {
            return;
        }
        self.wake_driver(state);
    }

    /// Wakes the driver, or spawns one if there is none.
    fn wake_driver(self: &Arc<Self>, mut state: MutexGuard<'_, State>) {
        match &mut state.driver {
            Driver::Active(waker) => {
                let waker = waker.take();
                drop(state);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            Driver::Absent => {
                state.driver = Driver::Active(None);
                drop(state);
                self.spawn_driver();
            }
        }
    }

    fn spawn_driver(self: &Arc<Self>) {
        match Handle::try_current() {
            Ok(runtime) => {
                let driver = DriverTask::new(self.clone());
                let after = After::from_scope(self.clone());
                self.shared
                    .drivers
                    .spawn_on(crate::after::scoped(after, driver), &runtime);
            }
            Err(_) => {
                let count = cancel(self, &mut Callbacks::default(), Ended::Cancelled);
                tracing::error!(
                    method = %self.snapshot.method(),
                    path = self.snapshot.uri().path(),
                    cancelled = count,
                    "after callbacks dropped: no Tokio runtime is running on this thread \
                     (poll and drop the response inside the runtime that serves it)"
                );
            }
        }
    }

    /// Takes the work a driver should start now, and remembers its waker. When there is none and
    /// the driver has nothing running, the driver retires (`None`).
    fn intake(&self, waker: &Waker, idle: bool) -> Option<Intake> {
        let mut state = self.state();
        let early = mem::take(&mut state.early);
        let finished = self.finished.get().map(|_| mem::take(&mut state.queue));
        let nothing_new = early.is_empty() && finished.as_ref().is_none_or(|jobs| jobs.is_empty());
        if idle && nothing_new {
            state.driver = Driver::Absent;
            return None;
        }
        match &mut state.driver {
            Driver::Active(Some(current)) if current.will_wake(waker) => {}
            driver => *driver = Driver::Active(Some(waker.clone())),
        }
        Some(Intake { early, finished })
    }

    /// Takes everything not yet handed to a driver, and lets the next work spawn a new driver.
    fn abandon(&self) -> (Vec<(BoxCallback, Span)>, Jobs) {
        let mut state = self.state();
        state.driver = Driver::Absent;
        let early = mem::take(&mut state.early);
        let queue = if self.finished.get().is_some() {
            mem::take(&mut state.queue)
        } else {
            Jobs::new()
        };
        (early, queue)
    }
}

struct Intake {
    /// `wait_until` futures from before the response finished.
    early: Vec<(BoxCallback, Span)>,
    /// Once the response finished: the work to start now.
    finished: Option<Jobs>,
}

pin_project! {
    /// The task that runs one request's callbacks.
    ///
    /// Its size matters: with the task-local and tracker wrappers it stays at most 152 bytes,
    /// the most a future can have for Tokio to hold its task in 256 bytes rather than 384.
    struct DriverTask {
        scope: Arc<Scope>,
        running: Callbacks,
        // Taken only once a callback is still pending after its first poll: callbacks that end
        // at once (a log line, a counter) never enter the layer's watch.
        ticket: Option<Ticket>,
        done: bool,
    }

    impl PinnedDrop for DriverTask {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its work was done: the runtime is shutting down.
            let this = this.project();
            if let Some(ticket) = this.ticket.take() {
                this.scope.shared.watch.leave(ticket);
            }
            if !*this.done {
                let count = cancel(this.scope, this.running, Ended::Cancelled);
                if count > 0 {
                    tracing::warn!(
                        method = %this.scope.snapshot.method(),
                        path = this.scope.snapshot.uri().path(),
                        cancelled = count,
                        "after callbacks dropped: the runtime shut down before they ended"
                    );
                }
            }
        }
    }
}

impl DriverTask {
    fn new(scope: Arc<Scope>) -> Self {
        Self {
            scope,
            running: Callbacks::default(),
            ticket: None,
            done: false,
        }
    }
}

/// Drops every callback of the request that has not ended, and counts them.
fn cancel(scope: &Arc<Scope>, running: &mut Callbacks, how: Ended) -> usize {
    let (early, queue) = scope.abandon();
    let count = running.len() + early.len() + queue.len();
    let dropped = mem::take(running);
    // Outside the lock (a callback's `Drop` may register more work), before counting (so that
    // `idle()` cannot see zero while such work is on its way), and with a panicking `Drop` caught
    // (so that the count is never skipped).
    drop_quietly(scope, (dropped, early, queue));
    scope.shared.ended(how, count);
    count
}

/// Drops `value`, catching and logging a panic in a user's `Drop`.
fn drop_quietly<T>(scope: &Scope, value: T) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| drop(value))) {
        log_panic(scope, &*panic);
    }
}

impl Future for DriverTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let scope = &*this.scope;
        // A callback that keeps registering work that ends at once would keep this loop busy:
        // hand the thread back now and then.
        let mut turns = 0_u32;
        loop {
            turns += 1;
            if turns > 128 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let Some(intake) = scope.intake(cx.waker(), this.running.is_empty()) else {
                *this.done = true;
                return Poll::Ready(());
            };
            let mut arrived = !intake.early.is_empty();
            for (callback, span) in intake.early {
                this.running
                    .push(Running::new(scope, Work::Async(callback), span));
            }
            if let Some(jobs) = intake.finished {
                arrived |= !jobs.is_empty();
                for job in jobs {
                    this.running.push(Running::new(scope, job.work, job.span));
                }
            }
            // Nothing has been polled yet: work arriving too late never starts.
            if arrived {
                if scope.shared.watch.is_shut_down() {
                    return stop(this.scope, this.running, this.done, Stop::Shutdown);
                }
                if scope
                    .deadline()
                    .is_some_and(|deadline| Instant::now() >= deadline)
                {
                    return stop(this.scope, this.running, this.done, Stop::Budget);
                }
            }
            match this.running.poll_next(cx) {
                Poll::Ready(Some(exit)) => {
                    let how = match exit {
                        Exit::Completed => Ended::Completed,
                        Exit::Panicked(panic) => {
                            log_panic(scope, &*panic);
                            Ended::Panicked
                        }
                        Exit::Cancelled => Ended::Cancelled,
                    };
                    scope.shared.ended(how, 1);
                }
                // Nothing runs: the next intake retires the driver unless work arrived.
                Poll::Ready(None) => {}
                Poll::Pending => break,
            }
        }

        // Something is still running: the layer's watch wakes this driver when the request's
        // budget or a shutdown's grace runs out.
        match scope.shared.watch.wait(this.ticket, scope.deadline(), cx) {
            Some(why) => stop(this.scope, this.running, this.done, why),
            None => Poll::Pending,
        }
    }
}

fn stop(scope: &Arc<Scope>, running: &mut Callbacks, done: &mut bool, why: Stop) -> Poll<()> {
    *done = true;
    let (method, path) = (scope.snapshot.method(), scope.snapshot.uri().path());
    match why {
        Stop::Budget => {
            let count = cancel(scope, running, Ended::TimedOut);
            tracing::warn!(
                %method, path, cancelled = count,
                "after callbacks cancelled: the request's max duration ran out \
                 (raise it with `MaxDuration` on the route or `AfterLayer::max_duration`)"
            );
        }
        Stop::Shutdown => {
            let count = cancel(scope, running, Ended::Cancelled);
            tracing::warn!(
                %method, path, cancelled = count,
                "after callbacks cancelled: the shutdown grace period ran out"
            );
        }
    }
    Poll::Ready(())
}

fn log_panic(scope: &Scope, panic: &(dyn Any + Send)) {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)");
    tracing::error!(
        method = %scope.snapshot.method(),
        path = scope.snapshot.uri().path(),
        panic = message,
        "after callback panicked"
    );
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use http::{Request, Response};
    use http_body_util::{BodyExt, Empty};
    use tokio::sync::oneshot;
    use tower::{service_fn, Layer, Service, ServiceExt};

    use crate::test_util::{eventually, settle, Logs, TestBody, Then};
    use crate::{After, AfterLayer, AfterTasks, MaxDuration};

    type Body = Empty<bytes::Bytes>;

    /// Serves one request through `layer` with a handler that registers work with `register`,
    /// and reads the response to its end.
    async fn serve(layer: &AfterLayer, register: impl FnOnce(After) + Send + 'static) {
        let register = Mutex::new(Some(register));
        let service = layer.layer(service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            (register.lock().unwrap().take().unwrap())(after);
            async { Ok::<_, Infallible>(Response::new(Body::new())) }
        }));
        let path = Request::builder().uri("/orders/7").body(()).unwrap();
        let response = service.oneshot(path).await.unwrap();
        response.into_body().collect().await.unwrap();
    }

    async fn drained(tasks: &AfterTasks) {
        eventually("no pending callbacks", || tasks.pending() == 0).await;
    }

    #[tokio::test]
    async fn callbacks_start_in_registration_order_and_run_concurrently() {
        let layer = AfterLayer::new();
        let started = Arc::new(Mutex::new(Vec::new()));
        let (release, released) = oneshot::channel::<()>();
        let log = started.clone();
        serve(&layer, move |after| {
            let first = log.clone();
            // Waits for the third: run one after the other, this would never end.
            after.run(async move {
                first.lock().unwrap().push(1);
                released.await.unwrap();
            });
            let second = log.clone();
            after.run(async move { second.lock().unwrap().push(2) });
            let third = log.clone();
            after.run(async move {
                third.lock().unwrap().push(3);
                release.send(()).unwrap();
            });
        })
        .await;
        drained(&layer.tasks()).await;
        assert_eq!(*started.lock().unwrap(), [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_panicking_callback_is_logged_and_the_others_still_run() {
        let logs = Logs::capture();
        let layer = AfterLayer::new();
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        serve(&layer, move |after| {
            let before = counter.clone();
            after.run(async move {
                before.fetch_add(1, Ordering::SeqCst);
            });
            after.run_with(|_| async { panic!("callback bug") });
            after.run(async { panic!("a second bug") });
            after.run(async move {
                counter.fetch_add(1, Ordering::SeqCst);
            });
        })
        .await;
        drained(&layer.tasks()).await;
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        let errors = logs.lines_with("after callback panicked");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("ERROR"), "{errors:?}");
        assert!(errors[0].contains("method=GET"), "{errors:?}");
        assert!(errors[0].contains("path=\"/orders/7\""), "{errors:?}");
        assert!(errors[0].contains("callback bug"), "{errors:?}");
    }

    #[tokio::test]
    async fn nested_work_runs_later_and_is_tracked() {
        let layer = AfterLayer::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        let log = order.clone();
        serve(&layer, move |after| {
            after.run(async move {
                let inner = log.clone();
                // Both ways of reaching the request work inside a callback.
                After::current().run(async move { inner.lock().unwrap().push("nested") });
                let inner = log.clone();
                crate::after(async move { inner.lock().unwrap().push("nested by after()") });
                // Not inline: the nested ones have not run yet.
                log.lock().unwrap().push("outer");
            });
        })
        .await;
        drained(&layer.tasks()).await;
        assert_eq!(
            *order.lock().unwrap(),
            ["outer", "nested", "nested by after()"]
        );
    }

    #[tokio::test]
    async fn work_registered_after_everything_finished_still_runs() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let (late_tx, late_rx) = oneshot::channel::<After>();
        serve(&layer, move |after| {
            late_tx.send(after.clone()).unwrap();
            after.run(async {});
        })
        .await;
        drained(&tasks).await;
        // The driver has retired; a late registration must start a new one.
        let after = late_rx.await.unwrap();
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        after.run_with(move |ctx| async move {
            assert_eq!(ctx.request().uri().path(), "/orders/7");
            flag.store(true, Ordering::SeqCst);
        });
        assert_eq!(tasks.pending(), 1);
        eventually("the late callback", || ran.load(Ordering::SeqCst)).await;
        drained(&tasks).await;
    }

    #[tokio::test]
    async fn wait_until_starts_at_once_and_run_waits_for_the_response() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let early = Arc::new(AtomicBool::new(false));
        let late = Arc::new(AtomicBool::new(false));
        let (early_flag, late_flag) = (early.clone(), late.clone());
        let service = layer.layer(service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            let (early_flag, late_flag) = (early_flag.clone(), late_flag.clone());
            after.wait_until(async move { early_flag.store(true, Ordering::SeqCst) });
            after.run(async move { late_flag.store(true, Ordering::SeqCst) });
            async { Ok::<_, Infallible>(Response::new(TestBody::new(&["a"], Then::End))) }
        }));
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        eventually("the wait_until future", || early.load(Ordering::SeqCst)).await;
        settle().await;
        assert!(
            !late.load(Ordering::SeqCst),
            "`run` started before the response ended"
        );
        while body.frame().await.is_some() {}
        eventually("the run callback", || late.load(Ordering::SeqCst)).await;
        drained(&tasks).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_cancels_what_still_runs_and_says_so() {
        let logs = Logs::capture();
        let layer = AfterLayer::new().max_duration(Duration::from_secs(5));
        let finished = Arc::new(AtomicUsize::new(0));
        let count = finished.clone();
        serve(&layer, move |after| {
            let quick = count.clone();
            after.run(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                quick.fetch_add(1, Ordering::SeqCst);
            });
            for _ in 0..2 {
                let slow = count.clone();
                after.run(async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    slow.fetch_add(1, Ordering::SeqCst);
                });
            }
        })
        .await;
        drained(&layer.tasks()).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        let warnings = logs.lines_with("max duration ran out");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("WARN") && warnings[0].contains("cancelled=2"));
        assert!(warnings[0].contains("path=\"/orders/7\""), "{warnings:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_counts_from_the_end_of_the_response_and_covers_wait_until() {
        let layer = AfterLayer::new().max_duration(Duration::from_secs(10));
        let tasks = layer.tasks();
        let done = Arc::new(AtomicUsize::new(0));
        let (in_time, too_long) = (done.clone(), done.clone());
        let service = layer.layer(service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            let (in_time, too_long) = (in_time.clone(), too_long.clone());
            // 14 s after the start, 9 s after the end of the response: within budget.
            after.wait_until(async move {
                tokio::time::sleep(Duration::from_secs(14)).await;
                in_time.fetch_add(1, Ordering::SeqCst);
            });
            // 16 s after the start, 11 s after the end: over budget.
            after.wait_until(async move {
                tokio::time::sleep(Duration::from_secs(16)).await;
                too_long.fetch_add(10, Ordering::SeqCst);
            });
            async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, Infallible>(Response::new(Body::new()))
            }
        }));
        let response = service.oneshot(Request::new(())).await.unwrap();
        response.into_body().collect().await.unwrap();
        drained(&tasks).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_budget_overrides_the_layer_and_max_means_unbounded() {
        let layer = AfterLayer::new().max_duration(Duration::from_secs(1));
        let tasks = layer.tasks();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let route =
            MaxDuration::new(Duration::MAX).layer(service_fn(move |request: Request<()>| {
                let after = request.extensions().get::<After>().unwrap().clone();
                let flag = flag.clone();
                after.run(async move {
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    flag.store(true, Ordering::SeqCst);
                });
                async { Ok::<_, Infallible>(Response::new(Body::new())) }
            }));
        let mut service = layer.layer(route);
        let response = service.ready().await.unwrap().call(Request::new(())).await;
        response.unwrap().into_body().collect().await.unwrap();
        drained(&tasks).await;
        assert!(
            done.load(Ordering::SeqCst),
            "an unbounded callback was cancelled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn work_registered_after_the_deadline_never_starts() {
        let logs = Logs::capture();
        let layer = AfterLayer::new().max_duration(Duration::from_secs(1));
        let tasks = layer.tasks();
        let (tx, rx) = oneshot::channel::<After>();
        serve(&layer, move |after| tx.send(after).unwrap()).await;
        let after = rx.await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = Arc::new(AtomicBool::new(false));
        let flag = started.clone();
        after.run(async move { flag.store(true, Ordering::SeqCst) });
        drained(&tasks).await;
        assert!(!started.load(Ordering::SeqCst));
        assert_eq!(logs.lines_with("cancelled=1").len(), 1);
    }

    #[tokio::test]
    async fn callbacks_log_inside_the_span_where_they_were_registered() {
        let logs = Logs::capture();
        let layer = AfterLayer::new();
        let service = layer.layer(service_fn(|request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            let span = tracing::info_span!("request", id = 42);
            span.in_scope(|| after.run(async { tracing::info!("audit written") }));
            async { Ok::<_, Infallible>(Response::new(Body::new())) }
        }));
        drop(service.oneshot(Request::new(())).await.unwrap());
        drained(&layer.tasks()).await;
        let lines = logs.lines_with("audit written");
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("request{id=42}:after"), "{lines:?}");
    }

    #[tokio::test]
    async fn the_last_registration_of_a_name_wins_and_forget_removes_it() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let ran = Arc::new(Mutex::new(Vec::new()));
        let log = ran.clone();
        serve(&layer, move |after| {
            for (name, label) in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1")] {
                let log = log.clone();
                after.run_named(
                    name,
                    move |_| async move { log.lock().unwrap().push(label) },
                );
            }
            assert!(after.forget("c"));
            assert!(!after.forget("c"));
            assert!(!after.forget("never registered"));
        })
        .await;
        drained(&tasks).await;
        // The replacement takes the place of its latest registration.
        assert_eq!(*ran.lock().unwrap(), ["b1", "a2"]);
        let stats = tasks.stats();
        assert_eq!(
            (stats.scheduled(), stats.completed(), stats.forgotten()),
            (4, 2, 2)
        );
    }

    #[tokio::test]
    async fn names_belong_to_one_request() {
        let layer = AfterLayer::new();
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let count = ran.clone();
            serve(&layer, move |after| {
                after.run_named("audit", move |_| async move {
                    count.fetch_add(1, Ordering::SeqCst);
                });
            })
            .await;
        }
        drained(&layer.tasks()).await;
        assert_eq!(ran.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_limit_of_two_runs_six_callbacks_two_at_a_time_in_order() {
        let layer = AfterLayer::new().concurrency_limit(2);
        let tasks = layer.tasks();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        for request in 0..3 {
            let (running, most, order, gate) =
                (running.clone(), most.clone(), order.clone(), gate.clone());
            serve(&layer, move |after| {
                for callback in 0..2 {
                    let (running, most, order, gate) =
                        (running.clone(), most.clone(), order.clone(), gate.clone());
                    after.run(async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        order.lock().unwrap().push((request, callback));
                        gate.acquire().await.unwrap().forget();
                        running.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
            .await;
        }
        eventually("two callbacks to start", || {
            order.lock().unwrap().len() == 2
        })
        .await;
        let stats = tasks.stats();
        assert_eq!((stats.running(), stats.queued()), (2, 4));
        assert_eq!(tasks.pending(), 6);
        // Release them one by one; the limit must hold all along.
        for released in 1..=6 {
            gate.add_permits(1);
            eventually("a callback to end", || {
                tasks.stats().completed() == released
            })
            .await;
        }
        drained(&tasks).await;
        assert_eq!(most.load(Ordering::SeqCst), 2);
        let expected: Vec<_> = (0..3).flat_map(|r| (0..2).map(move |c| (r, c))).collect();
        assert_eq!(
            *order.lock().unwrap(),
            expected,
            "waiting callbacks start in FIFO order"
        );
        assert_eq!((tasks.stats().running(), tasks.stats().queued()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_callback_waiting_for_the_limit_is_cancelled_by_its_budget_without_running() {
        let layer = AfterLayer::new()
            .concurrency_limit(1)
            .max_duration(Duration::from_secs(5));
        let tasks = layer.tasks();
        let started = Arc::new(AtomicUsize::new(0));
        let count = started.clone();
        serve(&layer, move |after| {
            for _ in 0..2 {
                let count = count.clone();
                after.run(async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        })
        .await;
        drained(&tasks).await;
        assert_eq!(started.load(Ordering::SeqCst), 1);
        let stats = tasks.stats();
        assert_eq!(
            (stats.timed_out(), stats.running(), stats.queued()),
            (2, 0, 0)
        );
    }

    #[tokio::test]
    async fn blocking_work_runs_off_the_async_workers_with_its_context() {
        let logs = Logs::capture();
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let slow_done = Arc::new(AtomicBool::new(false));
        let seen_while_slow = Arc::new(Mutex::new(None));
        let flag = slow_done.clone();
        serve(&layer, move |after| {
            after.run_blocking(move |ctx| {
                assert_eq!(ctx.request().uri().path(), "/orders/7");
                // The request is reachable from the blocking closure too.
                assert!(After::try_current().is_some());
                std::thread::sleep(Duration::from_millis(600));
                flag.store(true, Ordering::SeqCst);
            });
            after.run_blocking(|_| panic!("blocking bug"));
        })
        .await;
        // Another request's callback runs while the blocking one sleeps.
        let (flag, seen) = (slow_done.clone(), seen_while_slow.clone());
        serve(&layer, move |after| {
            after.run(async move { *seen.lock().unwrap() = Some(flag.load(Ordering::SeqCst)) });
        })
        .await;
        eventually("the quick callback", || {
            seen_while_slow.lock().unwrap().is_some()
        })
        .await;
        assert_eq!(*seen_while_slow.lock().unwrap(), Some(false));
        drained(&tasks).await;
        assert!(slow_done.load(Ordering::SeqCst));
        let stats = tasks.stats();
        assert_eq!((stats.completed(), stats.panicked()), (2, 1));
        assert_eq!(logs.lines_with("blocking bug").len(), 1);
    }

    /// Panics when dropped: user code the layer must survive.
    struct PanicOnDrop;

    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                panic!("a user Drop that panics");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_drop_during_cancellation_is_still_counted() {
        let logs = Logs::capture();
        let layer = AfterLayer::new().max_duration(Duration::from_secs(1));
        let tasks = layer.tasks();
        serve(&layer, |after| {
            after.run(async {
                let _guard = PanicOnDrop;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        })
        .await;
        drained(&tasks).await;
        assert_eq!(tasks.stats().timed_out(), 1);
        assert_eq!(logs.lines_with("a user Drop that panics").len(), 1);
    }

    #[test]
    fn without_a_time_driver_callbacks_still_run_unbudgeted() {
        let logs = Logs::capture();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let layer = AfterLayer::new();
            let tasks = layer.tasks();
            let (release, released) = oneshot::channel::<()>();
            let done = Arc::new(AtomicBool::new(false));
            let flag = done.clone();
            serve(&layer, move |after| {
                after.run(async move {
                    released.await.unwrap();
                    flag.store(true, Ordering::SeqCst);
                });
            })
            .await;
            settle().await;
            release.send(()).unwrap();
            tasks.idle().await;
            assert!(done.load(Ordering::SeqCst));
        });
        assert_eq!(logs.lines_with("no time driver").len(), 1);
    }

    #[tokio::test]
    async fn a_callback_that_keeps_registering_work_does_not_starve_the_thread() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let other_ran = Arc::new(AtomicBool::new(false));
        let seen_other = Arc::new(AtomicBool::new(false));

        fn chain(left: u32, other_ran: Arc<AtomicBool>, seen_other: Arc<AtomicBool>) {
            After::current().run(async move {
                if left == 0 {
                    seen_other.store(other_ran.load(Ordering::SeqCst), Ordering::SeqCst);
                } else {
                    chain(left - 1, other_ran, seen_other);
                }
            });
        }

        let (other, seen) = (other_ran.clone(), seen_other.clone());
        serve(&layer, move |after| {
            after.run(async move {
                // Another task on this thread, which only runs if the driver yields.
                let flag = other.clone();
                tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
                chain(2_000, other, seen);
            });
        })
        .await;
        drained(&tasks).await;
        assert!(
            seen_other.load(Ordering::SeqCst),
            "the driver never yielded"
        );
        assert_eq!(tasks.stats().completed(), 2_002);
    }
}
