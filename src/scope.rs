//! One request's callbacks: where they wait for the response to finish, and the driver task that
//! runs them afterwards.
//!
//! Each request that registers work gets at most one *driver* at a time: a Tokio task that starts
//! the callbacks in registration order, polls them concurrently, and enforces the request's budget
//! and the shutdown deadline. The driver is spawned when there is something to run (the response
//! finished with callbacks queued, or a `wait_until` future arrived) and retires as soon as it has
//! nothing left, so requests without callbacks never spawn anything. Work that arrives after it
//! retired spawns a new one.
//!
//! Nothing here runs user code while holding the state lock, and nothing runs it inside the
//! response's `poll` or `Drop`: finishing a response only moves callbacks to the driver.

use std::any::Any;
use std::future::Future;
use std::mem;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::Span;

use crate::tasks::{Ended, Shared};
use crate::{After, AfterContext, Outcome, RequestSnapshot};

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type BoxCallback = Box<dyn FnOnce(AfterContext) -> BoxFuture + Send>;

/// One request, from the moment it entered the layer until its last callback ended.
pub(crate) struct Scope {
    pub(crate) snapshot: RequestSnapshot,
    pub(crate) entered: Instant,
    pub(crate) shared: Arc<Shared>,
    state: Mutex<State>,
}

struct State {
    /// Max duration of this request's callbacks, counted from the end of the response.
    budget: Duration,
    /// Set once, when the response finished.
    finished: Option<Finished>,
    /// Before the response finished: `run` and `run_with` callbacks waiting for it.
    /// After: anything registered, waiting for the driver to pick it up.
    queue: Vec<Job>,
    /// `wait_until` futures registered before the response finished: they start at once.
    early: Vec<Task>,
    driver: Driver,
}

#[derive(Clone, Copy)]
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

/// Work registered with [`After`].
pub(crate) struct Job {
    work: Work,
    span: Span,
}

enum Work {
    Future(BoxFuture),
    WithContext(BoxCallback),
}

/// A future that starts now, without a context.
pub(crate) struct Task {
    future: BoxFuture,
    span: Span,
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
    pub(crate) fn future(future: BoxFuture) -> Self {
        Self {
            work: Work::Future(future),
            span: callback_span(),
        }
    }

    pub(crate) fn with_context(callback: BoxCallback) -> Self {
        Self {
            work: Work::WithContext(callback),
            span: callback_span(),
        }
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

impl Scope {
    pub(crate) fn new(snapshot: RequestSnapshot, shared: Arc<Shared>, budget: Duration) -> Self {
        Self {
            snapshot,
            entered: Instant::now(),
            shared,
            state: Mutex::new(State {
                budget,
                finished: None,
                queue: Vec::new(),
                early: Vec::new(),
                driver: Driver::Absent,
            }),
        }
    }

    /// Locks the state. A panic never happens while it is held (no user code runs under it), but
    /// a poisoned lock is recovered rather than turned into a second panic.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_budget(&self, budget: Duration) {
        let mut state = self.state();
        if state.finished.is_none() {
            state.budget = budget;
        }
    }

    pub(crate) fn register(self: &Arc<Self>, job: Job, start: Start) {
        self.shared.registered();
        let mut state = self.state();
        match (&state.finished, start, job.work) {
            (None, Start::Now, Work::Future(future)) => state.early.push(Task {
                future,
                span: job.span,
            }),
            (None, _, work) => {
                state.queue.push(Job {
                    work,
                    span: job.span,
                });
                return;
            }
            (Some(_), _, work) => state.queue.push(Job {
                work,
                span: job.span,
            }),
        }
        self.wake_driver(state);
    }

    /// Marks the response as finished and hands its callbacks to a driver. Called exactly once,
    /// from the response future or body, so it must stay cheap and must not run user code.
    pub(crate) fn finish(self: &Arc<Self>, outcome: Outcome, now: Instant) {
        let mut state = self.state();
        let deadline = now.checked_add(state.budget);
        state.finished = Some(Finished { outcome, deadline });
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
                let count = cancel(self, &mut FuturesUnordered::new());
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
        let finished = match state.finished {
            Some(finished) => Some((finished, mem::take(&mut state.queue))),
            None => None,
        };
        let nothing_new = early.is_empty() && finished.as_ref().is_none_or(|(_, q)| q.is_empty());
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
    fn abandon(&self) -> (Vec<Task>, Vec<Job>) {
        let mut state = self.state();
        state.driver = Driver::Absent;
        let early = mem::take(&mut state.early);
        let queue = if state.finished.is_some() {
            mem::take(&mut state.queue)
        } else {
            Vec::new()
        };
        (early, queue)
    }
}

struct Intake {
    /// `wait_until` futures from before the response finished.
    early: Vec<Task>,
    /// Once the response finished: how, and the work to start now.
    finished: Option<(Finished, Vec<Job>)>,
}

/// Why a driver stopped its callbacks before their end.
#[derive(Clone, Copy)]
enum Stop {
    Budget,
    Shutdown,
}

pin_project! {
    /// The task that runs one request's callbacks.
    struct DriverTask {
        scope: Arc<Scope>,
        running: FuturesUnordered<Running>,
        deadline: Option<Instant>,
        #[pin]
        shutdown: WaitForCancellationFutureOwned,
        #[pin]
        budget: Option<Sleep>,
        done: bool,
    }

    impl PinnedDrop for DriverTask {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its work was done: the runtime is shutting down, or there was none.
            let this = this.project();
            if !*this.done {
                let count = cancel(this.scope, this.running);
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
        let shutdown = scope.shared.shutdown.clone().cancelled_owned();
        Self {
            scope,
            running: FuturesUnordered::new(),
            deadline: None,
            shutdown,
            budget: None,
            done: false,
        }
    }
}

/// Drops every callback of the request that has not ended, and counts them.
fn cancel(scope: &Arc<Scope>, running: &mut FuturesUnordered<Running>) -> usize {
    let (early, queue) = scope.abandon();
    let count = running.len() + early.len() + queue.len();
    // Dropped outside the lock: a callback's `Drop` may register more work.
    running.clear();
    drop((early, queue));
    scope.shared.ended(Ended::Cancelled, count);
    count
}

impl Future for DriverTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let scope = &*this.scope;
        loop {
            let Some(intake) = scope.intake(cx.waker(), this.running.is_empty()) else {
                *this.done = true;
                return Poll::Ready(());
            };
            let mut arrived = !intake.early.is_empty();
            for task in intake.early {
                this.running
                    .push(Running::new(Stage::Run(task.future), task.span));
            }
            if let Some((finished, jobs)) = intake.finished {
                *this.deadline = finished.deadline;
                arrived |= !jobs.is_empty();
                for job in jobs {
                    let stage = match job.work {
                        Work::Future(future) => Stage::Run(future),
                        Work::WithContext(callback) => Stage::Start(
                            callback,
                            AfterContext::new(scope.clone(), finished.outcome),
                        ),
                    };
                    this.running.push(Running::new(stage, job.span));
                }
            }
            // Nothing has been polled yet: work arriving too late never starts.
            if arrived {
                if scope.shared.shutdown.is_cancelled() {
                    return stop(this.scope, this.running, this.done, Stop::Shutdown);
                }
                if this.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    return stop(this.scope, this.running, this.done, Stop::Budget);
                }
            }
            match this.running.poll_next_unpin(cx) {
                Poll::Ready(Some(result)) => {
                    if let Err(panic) = result {
                        log_panic(scope, &*panic);
                    }
                    scope.shared.ended(Ended::Finished, 1);
                }
                // Nothing runs: the next intake retires the driver unless work arrived.
                Poll::Ready(None) => {}
                Poll::Pending => break,
            }
        }

        // Something is still running: watch the shutdown deadline and the request's budget.
        if this.shutdown.poll(cx).is_ready() {
            return stop(this.scope, this.running, this.done, Stop::Shutdown);
        }
        if let Some(deadline) = *this.deadline {
            if this.budget.is_none() {
                this.budget
                    .set(Some(tokio::time::sleep_until(deadline.into())));
            }
            if let Some(budget) = this.budget.as_mut().as_pin_mut() {
                if budget.poll(cx).is_ready() {
                    return stop(this.scope, this.running, this.done, Stop::Budget);
                }
            }
        }
        Poll::Pending
    }
}

fn stop(
    scope: &Arc<Scope>,
    running: &mut FuturesUnordered<Running>,
    done: &mut bool,
    why: Stop,
) -> Poll<()> {
    *done = true;
    let count = cancel(scope, running);
    let (method, path) = (scope.snapshot.method(), scope.snapshot.uri().path());
    match why {
        Stop::Budget => tracing::warn!(
            %method, path, cancelled = count,
            "after callbacks cancelled: the request's max duration ran out \
             (raise it with `MaxDuration` on the route or `AfterLayer::max_duration`)"
        ),
        Stop::Shutdown => tracing::warn!(
            %method, path, cancelled = count,
            "after callbacks cancelled: the shutdown grace period ran out"
        ),
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

enum Stage {
    Start(BoxCallback, AfterContext),
    Run(BoxFuture),
    Done,
}

/// One callback being run: started on its first poll, inside its span, with panics caught.
struct Running {
    stage: Stage,
    span: Span,
}

impl Running {
    fn new(stage: Stage, span: Span) -> Self {
        Self { stage, span }
    }
}

impl Future for Running {
    type Output = Result<(), Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let _entered = this.span.enter();
        let stage = &mut this.stage;
        // A panic leaves `Done` behind, dropping the callback.
        let polled = catch_unwind(AssertUnwindSafe(|| loop {
            match mem::replace(stage, Stage::Done) {
                Stage::Start(callback, ctx) => *stage = Stage::Run(callback(ctx)),
                Stage::Run(mut future) => {
                    let poll = future.as_mut().poll(cx);
                    *stage = Stage::Run(future);
                    return poll;
                }
                Stage::Done => return Poll::Ready(()),
            }
        }));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(())) => {
                this.stage = Stage::Done;
                Poll::Ready(Ok(()))
            }
            Err(panic) => {
                this.stage = Stage::Done;
                Poll::Ready(Err(panic))
            }
        }
    }
}
