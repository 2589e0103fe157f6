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

use crate::scope::Named;
use crate::tasks::{Ended, Gauge, Ticket};
use crate::{AfterContext, RequestSnapshot};

pub(crate) type BoxCallback = Pin<Box<dyn Callback>>;
type BoxAcquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// An async callback, type-erased: a plain future, or a `run_with` closure that becomes its
/// future in place when it starts.
pub(crate) trait Callback: Send {
    /// Polls the callback; a `run_with` closure is first called with `ctx`, so that a context is
    /// only ever made for the callbacks that read one.
    fn poll_run(self: Pin<&mut Self>, ctx: &AfterContext, cx: &mut Context<'_>) -> Poll<()>;
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

impl<F: Future<Output = ()> + Send> Callback for Plain<F> {
    fn poll_run(self: Pin<&mut Self>, _ctx: &AfterContext, cx: &mut Context<'_>) -> Poll<()> {
        self.project().future.poll(cx)
    }
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
    F: Future<Output = ()> + Send,
{
    fn poll_run(mut self: Pin<&mut Self>, ctx: &AfterContext, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.as_mut().project() {
                WithContextProjection::Start { callback } => {
                    let Some(callback) = callback.take() else {
                        return Poll::Ready(());
                    };
                    let future = callback(ctx.clone());
                    self.set(Self::Run { future });
                }
                WithContextProjection::Run { future } => return future.poll(cx),
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
        drop_quietly(callback, request, name.as_deref());
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
    /// The invocation that served the request is about to run out of time
    /// (`lambda::DrainLayer`).
    #[cfg(feature = "lambda")]
    Invocation,
}

impl Stop {
    fn ended(self) -> Ended {
        match self {
            Self::Budget(_) => Ended::TimedOut,
            Self::Shutdown => Ended::Cancelled,
            #[cfg(feature = "lambda")]
            Self::Invocation => Ended::TimedOut,
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
            #[cfg(feature = "lambda")]
            Self::Invocation => f.write_str(
                "the Lambda invocation's deadline is near (raise the function's timeout, or \
                 lower the route's `MaxDuration`)",
            ),
        }
    }
}

/// One callback taken by its driver: waiting for a place under the concurrency limit, then
/// running inside its span, with panics caught. Counted in the `queued` or `running` gauge while
/// it lives, and in the ledger once it ends, stops, or is dropped.
pub(crate) struct Running {
    /// `None` once it ended.
    callback: Option<BoxCallback>,
    span: Span,
    name: Option<Cow<'static, str>>,
    ticket: Ticket,
    ctx: AfterContext,
    /// `Some` while it waits for a place under the limit.
    acquire: Option<BoxAcquire>,
    /// Its place under the limit, held until it ends.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Running {
    pub(crate) fn new(job: Job, ctx: AfterContext, limit: Option<&Arc<Semaphore>>) -> Self {
        let Job {
            callback,
            span,
            name,
            ticket,
        } = job;
        let acquire = limit.map(|limit| -> BoxAcquire { Box::pin(limit.clone().acquire_owned()) });
        let running = Self {
            callback: Some(callback),
            span,
            name,
            ticket,
            ctx,
            acquire,
            _permit: None,
        };
        running.ticket.shared().gauge(running.gauge(), true);
        running
    }

    fn gauge(&self) -> Gauge {
        if self.acquire.is_some() {
            Gauge::Queued
        } else {
            Gauge::Running
        }
    }

    /// Stops the callback before its end, with a warning in its span.
    pub(crate) fn stop(mut self, why: Stop) {
        let span = self.span.clone();
        let _entered = span.enter();
        let request = self.ctx.request();
        tracing::warn!(
            method = %request.method(),
            path = request.path(),
            name = self.name.as_deref(),
            "after callback cancelled: {why}"
        );
        self.end(why.ended());
    }

    /// Drops the callback and accounts for it as `how`.
    fn end(&mut self, how: Ended) {
        if let Some(callback) = self.callback.take() {
            drop_quietly(callback, self.ctx.request(), self.name.as_deref());
        }
        self.ticket.close(how);
    }
}

impl Future for Running {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let Some(acquire) = &mut this.acquire {
            let Poll::Ready(permit) = acquire.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            // The semaphore is never closed, so this is always a permit.
            this._permit = permit.ok();
            this.acquire = None;
            let shared = this.ticket.shared();
            shared.gauge(Gauge::Queued, false);
            shared.gauge(Gauge::Running, true);
        }
        let Some(callback) = &mut this.callback else {
            return Poll::Ready(());
        };
        let entered = this.span.enter();
        let polled = catch_unwind(AssertUnwindSafe(|| {
            callback.as_mut().poll_run(&this.ctx, cx)
        }));
        let how = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(())) => Ended::Completed,
            Err(panic) => {
                log_panic(this.ctx.request(), this.name.as_deref(), panic);
                Ended::Panicked
            }
        };
        drop(entered);
        this.end(how);
        Poll::Ready(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.ticket.shared().gauge(self.gauge(), false);
        // Dropped before its end (the runtime is shutting down): counted as cancelled.
        self.end(Ended::Cancelled);
    }
}

/// The callbacks a driver runs: the first inline, any more (rarer) in a `FuturesUnordered`
/// made when needed, so that the common single callback costs no extra allocation. The first
/// is always the oldest, so polling it first keeps the registration order.
#[derive(Default)]
pub(crate) struct Callbacks {
    first: Option<Running>,
    rest: Option<Box<FuturesUnordered<Running>>>,
}

impl Callbacks {
    pub(crate) fn push(&mut self, running: Running) {
        if self.is_empty() {
            self.first = Some(running);
        } else {
            self.rest.get_or_insert_default().push(running);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Polls until a callback ends: `None` when none is left, or pending.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<()>> {
        if let Some(first) = &mut self.first {
            if Pin::new(first).poll(cx).is_ready() {
                self.first = None;
                return Poll::Ready(Some(()));
            }
        }
        if let Some(rest) = &mut self.rest {
            if let Poll::Ready(Some(())) = rest.poll_next_unpin(cx) {
                return Poll::Ready(Some(()));
            }
        }
        if self.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }

    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.as_ref().map_or(0, |rest| rest.len())
    }

    /// Stops every callback still running.
    pub(crate) fn stop(&mut self, why: Stop) {
        let first = self.first.take();
        let rest = self.rest.take().map(|rest| *rest).unwrap_or_default();
        for running in first.into_iter().chain(rest) {
            running.stop(why);
        }
    }
}

/// Drops a user's callback, catching and logging a panic in its `Drop`.
fn drop_quietly(callback: BoxCallback, request: &RequestSnapshot, name: Option<&str>) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| drop(callback))) {
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
        name,
        panic = message,
        "after callback panicked"
    );
    // A payload whose own `Drop` panics would escape here: catch that, and leak what it threw
    // rather than unwind through the driver.
    if let Err(again) = catch_unwind(AssertUnwindSafe(|| drop(panic))) {
        #[allow(clippy::mem_forget)]
        std::mem::forget(again);
    }
}
