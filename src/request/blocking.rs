//! Blocking work (`After::run_blocking`) on Tokio's blocking pool, and the handle that aborts a
//! task when dropped.

use std::future::Future;
use std::panic::resume_unwind;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::task::JoinHandle;
use tracing::Span;

use crate::request::context::AfterContext;
use crate::request::REQUEST;

/// Runs `callback` on Tokio's blocking pool, inside the current callback's span and with its
/// request as the current one. A panic in it is raised again here, where the callback's poll
/// catches and reports it.
pub(crate) async fn run_blocking<C, R>(ctx: AfterContext, callback: C) -> R
where
    C: FnOnce(AfterContext) -> R + Send + 'static,
    R: Send + 'static,
{
    let inflight = REQUEST.try_with(Arc::clone).ok();
    let span = Span::current();
    let task = AbortOnDrop(tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        match inflight {
            Some(inflight) => REQUEST.sync_scope(inflight, || callback(ctx)),
            None => callback(ctx),
        }
    }));
    match task.await {
        Ok(output) => output,
        Err(error) => match error.try_into_panic() {
            Ok(panic) => resume_unwind(panic),
            // Only an abort cancels it, and that drops this future first.
            Err(error) => unreachable!("a blocking callback's task was cancelled: {error}"),
        },
    }
}

/// A task that is aborted when this handle is dropped: a blocking task that has not started yet
/// never starts; one that has started cannot be interrupted and runs to its end; an async task
/// is dropped at its next `.await`.
pub(crate) struct AbortOnDrop<R>(pub(crate) JoinHandle<R>);

impl<R> Future for AbortOnDrop<R> {
    type Output = Result<R, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<R> Drop for AbortOnDrop<R> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
