//! How one callback runs: type-erased in a single allocation, started on its first poll once it
//! has a place under the concurrency limit, polled inside its span with panics caught, and
//! counted in the `running` and `queued` gauges while it lives.

use std::any::Any;
use std::future::Future;
use std::mem;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};
use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tracing::Span;

use crate::scope::{Scope, Work};
use crate::tasks::Gauge;
use crate::{After, AfterContext};

pub(crate) type BoxCallback = Pin<Box<dyn Callback>>;
pub(crate) type BoxBlocking = Box<dyn FnOnce(AfterContext) + Send>;
type BoxAcquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// An async callback, type-erased in a single allocation: a plain future, or a `run_with`
/// closure that becomes its future in place when it starts.
pub(crate) trait Callback: Send {
    /// Polls the callback; a `run_with` closure is called with the context of `scope` when it
    /// starts, so a context exists only for the callbacks that read one.
    fn poll_run(self: Pin<&mut Self>, scope: &Arc<Scope>, cx: &mut Context<'_>) -> Poll<()>;
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
    fn poll_run(self: Pin<&mut Self>, _scope: &Arc<Scope>, cx: &mut Context<'_>) -> Poll<()> {
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
    fn poll_run(mut self: Pin<&mut Self>, scope: &Arc<Scope>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.as_mut().project() {
                WithContextProjection::Start { callback } => {
                    // Such callbacks start only once the response finished (`Start::AfterResponse`).
                    let Some(callback) = callback.take() else {
                        return Poll::Ready(());
                    };
                    let future = callback(AfterContext::new(scope.clone()));
                    self.set(Self::Run { future });
                }
                WithContextProjection::Run { future } => return future.poll(cx),
            }
        }
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

    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.as_ref().map_or(0, |rest| rest.len())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next callback to end, `None` when none is left, or pending.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Exit>> {
        if let Some(first) = &mut self.first {
            if let Poll::Ready(exit) = Pin::new(first).poll(cx) {
                self.first = None;
                return Poll::Ready(Some(exit));
            }
        }
        if let Some(rest) = &mut self.rest {
            if let Poll::Ready(Some(exit)) = rest.poll_next_unpin(cx) {
                return Poll::Ready(Some(exit));
            }
        }
        if self.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

/// How a callback ended, as far as its driver can tell.
pub(crate) enum Exit {
    Completed,
    Panicked(Box<dyn Any + Send>),
    /// The runtime dropped a blocking callback before it started.
    Cancelled,
}

enum Stage {
    /// Not started: waiting for its first poll, or for a place under the concurrency limit.
    Waiting {
        work: Work,
        acquire: Option<BoxAcquire>,
    },
    Async {
        callback: BoxCallback,
        _slot: Slot,
    },
    /// Handed to the blocking pool, which holds its slot.
    Blocking(JoinHandle<()>),
    Done,
}

/// A callback's place among the running ones: counted in the `running` gauge, and holding its
/// concurrency permit, until dropped.
struct Slot {
    scope: Arc<Scope>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Slot {
    fn new(scope: &Arc<Scope>, permit: Option<OwnedSemaphorePermit>) -> Self {
        scope.shared.gauge(Gauge::Running, true);
        Self {
            scope: scope.clone(),
            _permit: permit,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.scope.shared.gauge(Gauge::Running, false);
    }
}

/// One callback being run: started on its first poll (once it has a place under the
/// concurrency limit), inside its span, with panics caught.
pub(crate) struct Running {
    stage: Stage,
    span: Span,
    scope: Arc<Scope>,
}

impl Running {
    pub(crate) fn new(scope: &Arc<Scope>, work: Work, span: Span) -> Self {
        Self {
            stage: Stage::Waiting {
                work,
                acquire: None,
            },
            span,
            scope: scope.clone(),
        }
    }
}

impl Future for Running {
    type Output = Exit;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Exit> {
        let Running { stage, span, scope } = self.get_mut();
        let _entered = span.enter();
        match catch_unwind(AssertUnwindSafe(|| advance(stage, span, scope, cx))) {
            Ok(poll) => poll,
            Err(panic) => {
                // Leaving `Done` behind drops the callback.
                *stage = Stage::Done;
                Poll::Ready(Exit::Panicked(panic))
            }
        }
    }
}

fn advance(stage: &mut Stage, span: &Span, scope: &Arc<Scope>, cx: &mut Context<'_>) -> Poll<Exit> {
    let shared = &scope.shared;
    loop {
        *stage = match mem::replace(stage, Stage::Done) {
            Stage::Waiting { work, mut acquire } => {
                let permit = match &scope.limit {
                    None => None,
                    Some(limit) => {
                        let waiting = acquire.get_or_insert_with(|| {
                            shared.gauge(Gauge::Queued, true);
                            Box::pin(limit.clone().acquire_owned())
                        });
                        let Poll::Ready(permit) = waiting.as_mut().poll(cx) else {
                            *stage = Stage::Waiting { work, acquire };
                            return Poll::Pending;
                        };
                        shared.gauge(Gauge::Queued, false);
                        // The semaphore is never closed, so this is always a permit.
                        permit.ok()
                    }
                };
                let slot = Slot::new(scope, permit);
                match work {
                    Work::Async(callback) => Stage::Async {
                        callback,
                        _slot: slot,
                    },
                    Work::Blocking(callback) => {
                        let ctx = AfterContext::new(scope.clone());
                        let (span, after) = (span.clone(), After::from_scope(scope.clone()));
                        Stage::Blocking(tokio::task::spawn_blocking(move || {
                            let _slot = slot;
                            let _entered = span.enter();
                            crate::after::sync_scoped(after, || callback(ctx));
                        }))
                    }
                }
            }
            Stage::Async {
                mut callback,
                _slot,
            } => {
                if callback.as_mut().poll_run(scope, cx).is_ready() {
                    return Poll::Ready(Exit::Completed);
                }
                *stage = Stage::Async { callback, _slot };
                return Poll::Pending;
            }
            Stage::Blocking(mut handle) => {
                return match Pin::new(&mut handle).poll(cx) {
                    Poll::Pending => {
                        *stage = Stage::Blocking(handle);
                        Poll::Pending
                    }
                    Poll::Ready(Ok(())) => Poll::Ready(Exit::Completed),
                    Poll::Ready(Err(error)) => Poll::Ready(match error.try_into_panic() {
                        Ok(panic) => Exit::Panicked(panic),
                        Err(_) => Exit::Cancelled,
                    }),
                }
            }
            Stage::Done => return Poll::Ready(Exit::Completed),
        };
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        match &self.stage {
            Stage::Waiting {
                acquire: Some(_), ..
            } => self.scope.shared.gauge(Gauge::Queued, false),
            // A blocking callback that has not started yet never will; one that has runs on.
            Stage::Blocking(handle) => handle.abort(),
            _ => {}
        }
    }
}
