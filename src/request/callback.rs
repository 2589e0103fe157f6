//! How one callback runs: type-erased in a single allocation, started once it has a place under
//! the concurrency limit, polled inside its own span with panics caught, and accounted for in the
//! layer's ledger exactly once, however it ends.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tracing::Span;

use crate::context::drop_caught;
use crate::request::scope::Named;
use crate::tasks::ledger::{Ended, Gauge, Ticket};
use crate::{AfterContext, RequestSnapshot};

pub(crate) type BoxCallback = Pin<Box<dyn Callback>>;

/// Why a callback failed: the error it returned, to log and count.
pub(crate) type Failure = Box<dyn fmt::Display + Send>;

/// What a callback may return: `()`, or `Result<(), E>` with an error that can be displayed
/// (`std::io::Error`, `anyhow::Error`, `Box<dyn Error + Send + Sync>`, a `String`...), so that `?`
/// works inside it.
///
/// A callback that returns `Err` is logged at `ERROR` inside its span, naming the error, and
/// counted as [`failed`](crate::AfterStats::failed): apart from those that completed, and from
/// those that panicked.
///
/// An async block that never returns (it ends in `panic!`, or is an endless `loop`) has the
/// type `!`, which is neither: move its body into an `async fn` that returns `()`.
///
/// ```
/// # async fn save(_: &str) -> std::io::Result<()> { Ok(()) }
/// # fn example(later: tower_after::After) {
/// later.run_with(|ctx| async move {
///     save(ctx.request().path()).await?; // logged and counted as failed if it fails
///     Ok::<_, std::io::Error>(())
/// });
/// # }
/// ```
#[diagnostic::on_unimplemented(
    message = "a callback must return `()` or `Result<(), E>` with `E: Display`, not `{Self}`",
    label = "returned here",
    note = "return `Ok(())` at the end of an `async move` block that uses `?`, and name the \
            error type if it cannot be inferred: `Ok::<_, MyError>(())`"
)]
pub trait AfterOutput: sealed::Output + Send + 'static {}

impl<T: sealed::Output + Send + 'static> AfterOutput for T {}

// The sealed-trait idiom: `Output` is public, so that it can bound a public trait, in a module
// no other crate can name.
#[allow(unreachable_pub)]
pub(crate) mod sealed {
    use std::fmt;

    use super::Failure;

    /// The crate's side of [`AfterOutput`](super::AfterOutput): not for implementing elsewhere.
    pub trait Output {
        /// The failure to log and count, if the callback failed.
        fn into_failure(self) -> Option<Failure>;
    }

    impl Output for () {
        fn into_failure(self) -> Option<Failure> {
            None
        }
    }

    impl<E: fmt::Display + Send + 'static> Output for Result<(), E> {
        fn into_failure(self) -> Option<Failure> {
            self.err().map(|error| Box::new(error) as Failure)
        }
    }
}
type BoxAcquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// An async callback, type-erased: a plain future, or a `run_with` closure that becomes its
/// future in place when it starts.
pub(crate) trait Callback: Send {
    /// Polls the callback; a `run_with` closure is first called with `ctx`, so that a context is
    /// only ever made for the callbacks that read one. `Err`: it returned an error.
    fn poll_run(self: Pin<&mut Self>, ctx: &AfterContext, cx: &mut Context<'_>) -> Poll<RunResult>;
}

/// How a callback's run ended, when it did not panic.
pub(crate) type RunResult = Result<(), Failure>;

impl Callback for BoxCallback {
    fn poll_run(self: Pin<&mut Self>, ctx: &AfterContext, cx: &mut Context<'_>) -> Poll<RunResult> {
        self.get_mut().as_mut().poll_run(ctx, cx)
    }
}

pin_project! {
    /// A future registered with `run` or `wait_until`.
    pub(crate) struct Plain<F> {
        #[pin]
        future: F,
    }
}

impl<F> Plain<F> {
    pub(crate) fn new(future: F) -> Self {
        Self { future }
    }
}

impl<F> Callback for Plain<F>
where
    F: Future + Send,
    F::Output: AfterOutput,
{
    fn poll_run(
        self: Pin<&mut Self>,
        _ctx: &AfterContext,
        cx: &mut Context<'_>,
    ) -> Poll<RunResult> {
        self.project().future.poll(cx).map(finished)
    }
}

/// A callback's output, as a run's outcome.
pub(crate) fn finished(output: impl AfterOutput) -> RunResult {
    output.into_failure().map_or(Ok(()), Err)
}

pin_project! {
    /// A closure registered with `run_with`, then the future it returned.
    #[project = WithContextProjection]
    pub(crate) enum WithContext<C, F> {
        Start { callback: Option<C> },
        Run { #[pin] future: F },
    }
}

impl<C, F> WithContext<C, F> {
    pub(crate) fn new(callback: C) -> Self {
        Self::Start {
            callback: Some(callback),
        }
    }
}

impl<C, F> Callback for WithContext<C, F>
where
    C: FnOnce(AfterContext) -> F + Send,
    F: Future + Send,
    F::Output: AfterOutput,
{
    fn poll_run(
        mut self: Pin<&mut Self>,
        ctx: &AfterContext,
        cx: &mut Context<'_>,
    ) -> Poll<RunResult> {
        loop {
            match self.as_mut().project() {
                WithContextProjection::Start { callback } => {
                    let Some(callback) = callback.take() else {
                        return Poll::Ready(Ok(()));
                    };
                    let future = callback(ctx.clone());
                    self.set(Self::Run { future });
                }
                WithContextProjection::Run { future } => return future.poll(cx).map(finished),
            }
        }
    }
}

/// Work registered with `After`, not started yet.
pub(crate) struct Job {
    callback: BoxCallback,
    span: Span,
    name: Option<Cow<'static, str>>,
    ticket: Ticket,
}

impl Job {
    pub(crate) fn new(
        callback: BoxCallback,
        span: Span,
        name: Option<Cow<'static, str>>,
        ticket: Ticket,
    ) -> Self {
        Self {
            callback,
            span,
            name,
            ticket,
        }
    }

    /// Drops the job before it started, counted as `how`.
    pub(crate) fn end(self, how: Ended, request: &RequestSnapshot) {
        let Self {
            callback,
            span,
            name,
            mut ticket,
        } = self;
        let _entered = span.enter();
        drop_quietly(|| drop(callback), request, name.as_deref());
        ticket.close(how);
    }
}

impl Named for Job {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

/// Why a driver stops its callbacks before their end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The request's budget, of this length, ran out.
    Budget(Duration),
    /// A shutdown's grace period ran out.
    Shutdown,
    /// The platform that served the request wants its work stopped, for this reason
    /// (`lambda::DrainLayer`: the invocation's deadline is near). Counted as timed out.
    #[cfg_attr(not(feature = "lambda"), allow(dead_code))]
    Host(&'static str),
}

impl Stop {
    fn ended(self) -> Ended {
        match self {
            Self::Budget(_) => Ended::TimedOut,
            Self::Shutdown => Ended::Cancelled,
            Self::Host(_) => Ended::TimedOut,
        }
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Budget(budget) => write!(
                f,
                "the request's max duration of {budget:?} ran out (raise it with `MaxDuration` \
                 on the route or `AfterLayer::max_duration`)"
            ),
            Self::Shutdown => f.write_str("the shutdown grace period ran out"),
            Self::Host(why) => f.write_str(why),
        }
    }
}

pin_project! {
    /// One callback started by its driver: waiting for a place under the concurrency limit,
    /// then running inside its span, with panics caught. Counted in the `queued` or `running`
    /// gauge while it lives, and in the ledger once it ends, stops, or is dropped.
    ///
    /// Generic so that a request's first callback lives inline in its driver's task; the
    /// others are boxed (`Running<BoxCallback>`).
    pub(crate) struct Running<C> {
        // `None` once it ended.
        #[pin]
        callback: Option<C>,
        span: Span,
        name: Option<Cow<'static, str>>,
        ticket: Ticket,
        ctx: AfterContext,
        // Where it stands under the limit, and so in which gauge it counts.
        place: Place,
    }

    impl<C> PinnedDrop for Running<C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            leave(this.place, this.ticket);
            // Dropped before its end (the runtime is shutting down): counted as cancelled.
            end(this.callback, this.ticket, this.ctx, this.name, Ended::Cancelled);
        }
    }
}

impl Running<BoxCallback> {
    /// A queued job, started.
    pub(crate) fn from_job(job: Job, ctx: AfterContext, limit: Option<&Arc<Semaphore>>) -> Self {
        let Job {
            callback,
            span,
            name,
            ticket,
        } = job;
        let mut running = Self::new(callback, span, name, ticket, ctx);
        Pin::new(&mut running).start(limit);
        running
    }
}

impl<C: Callback> Running<C> {
    /// A callback that its driver has yet to start.
    pub(crate) fn new(
        callback: C,
        span: Span,
        name: Option<Cow<'static, str>>,
        ticket: Ticket,
        ctx: AfterContext,
    ) -> Self {
        Self {
            callback: Some(callback),
            span,
            name,
            ticket,
            ctx,
            place: Place::NotStarted,
        }
    }

    /// Lets it run from now on: it waits for a place under `limit`, if any, then runs.
    pub(crate) fn start(self: Pin<&mut Self>, limit: Option<&Arc<Semaphore>>) {
        let this = self.project();
        if let Place::NotStarted = this.place {
            *this.place = match limit {
                Some(limit) => Place::Waiting(Box::pin(limit.clone().acquire_owned())),
                None => Place::Running { _permit: None },
            };
            if let Some(gauge) = this.place.gauge() {
                this.ticket.shared().gauge(gauge, true);
            }
        }
    }

    /// Stops the callback before its end. Its driver, or whoever stopped it, says so once for
    /// all it stopped; the details go to `DEBUG`, in its span.
    pub(crate) fn stop(self: Pin<&mut Self>, why: Stop) {
        let this = self.project();
        let _entered = this.span.enter();
        let request = this.ctx.request();
        tracing::debug!(
            method = %request.method(),
            path = request.path(),
            name = this.name.as_deref(),
            "after callback cancelled: {why}"
        );
        leave(this.place, this.ticket);
        end(this.callback, this.ticket, this.ctx, this.name, why.ended());
    }
}

/// Where a callback stands under the concurrency limit.
enum Place {
    /// Its driver has not started it yet: counted in no gauge.
    NotStarted,
    /// Waiting for a place: counted as queued.
    Waiting(BoxAcquire),
    /// Running, in its place if there is a limit (given back when dropped): counted as
    /// running.
    Running {
        _permit: Option<OwnedSemaphorePermit>,
    },
    /// Ended: out of the gauges, its place given back.
    Left,
}

impl Place {
    fn gauge(&self) -> Option<Gauge> {
        match self {
            Self::Waiting(_) => Some(Gauge::Queued),
            Self::Running { .. } => Some(Gauge::Running),
            Self::NotStarted | Self::Left => None,
        }
    }
}

/// Takes a callback out of its gauge and gives its place back: before its ticket closes, so that
/// whoever sees nothing pending sees the gauges at zero too.
fn leave(place: &mut Place, ticket: &Ticket) {
    if let Some(gauge) = std::mem::replace(place, Place::Left).gauge() {
        ticket.shared().gauge(gauge, false);
    }
}

/// Drops the callback in place, if it has not ended, and accounts for it as `how`.
fn end<C>(
    mut callback: Pin<&mut Option<C>>,
    ticket: &mut Ticket,
    ctx: &AfterContext,
    name: &Option<Cow<'static, str>>,
    how: Ended,
) {
    if callback.is_some() {
        drop_quietly(|| callback.set(None), ctx.request(), name.as_deref());
    }
    ticket.close(how);
}

impl<C: Callback> Future for Running<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if let Place::Waiting(acquire) = this.place {
            let Poll::Ready(permit) = acquire.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            // The semaphore is never closed, so this is always a permit.
            *this.place = Place::Running {
                _permit: permit.ok(),
            };
            let shared = this.ticket.shared();
            shared.gauge(Gauge::Queued, false);
            shared.gauge(Gauge::Running, true);
        }
        let Some(callback) = this.callback.as_mut().as_pin_mut() else {
            return Poll::Ready(());
        };
        let entered = this.span.enter();
        let ctx = &*this.ctx;
        let polled = catch_unwind(AssertUnwindSafe(|| callback.poll_run(ctx, cx)));
        let how = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => Ended::Completed,
            Ok(Poll::Ready(Err(failure))) => {
                log_failure(this.ctx.request(), this.name.as_deref(), failure);
                Ended::Failed
            }
            Err(panic) => {
                log_panic(this.ctx.request(), this.name.as_deref(), panic);
                Ended::Panicked
            }
        };
        drop(entered);
        leave(this.place, this.ticket);
        end(this.callback, this.ticket, this.ctx, this.name, how);
        Poll::Ready(())
    }
}

/// The callbacks a driver took from its request's queue, beyond the one it was spawned with:
/// rarer, so the `FuturesUnordered` that polls them concurrently is only made when needed. It
/// polls new ones in the order they were pushed, which keeps the registration order.
#[derive(Default)]
pub(crate) struct Callbacks(Option<Box<FuturesUnordered<Running<BoxCallback>>>>);

impl Callbacks {
    pub(crate) fn push(&mut self, running: Running<BoxCallback>) {
        self.0.get_or_insert_default().push(running);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Polls until a callback ends: `None` when none is left, or pending.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<()>> {
        match &mut self.0 {
            Some(running) => running.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |running| running.len())
    }

    /// Stops every callback still running.
    pub(crate) fn stop(&mut self, why: Stop) {
        for mut running in self.0.take().map(|running| *running).unwrap_or_default() {
            Pin::new(&mut running).stop(why);
        }
    }
}

/// Logs the error a callback returned, in its span, then drops it; both are user code, whose
/// panics are caught and logged too.
fn log_failure(request: &RequestSnapshot, name: Option<&str>, failure: Failure) {
    drop_quietly(
        || {
            tracing::error!(
                method = %request.method(),
                path = request.path(),
                request_id = request.request_id(),
                name,
                error = %failure,
                "after callback failed"
            );
            drop(failure);
        },
        request,
        name,
    );
}

/// Drops a user's callback with `drop`, catching and logging a panic in its `Drop`.
fn drop_quietly(drop: impl FnOnce(), request: &RequestSnapshot, name: Option<&str>) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(drop)) {
        log_panic(request, name, panic);
    }
}

/// Logs a caught panic, then drops its payload, which is user code too.
fn log_panic(request: &RequestSnapshot, name: Option<&str>, panic: Box<dyn Any + Send>) {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)");
    tracing::error!(
        method = %request.method(),
        path = request.path(),
        request_id = request.request_id(),
        name,
        panic = message,
        "after callback panicked"
    );
    // A payload whose own `Drop` panics would escape here, through the driver.
    drop_caught(panic);
}
