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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use crate::test_util::{drained, eventually, fail, serve, Logs};
    use crate::{After, AfterLayer};

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
            after.run_blocking(|_| fail("blocking bug"));
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
}
