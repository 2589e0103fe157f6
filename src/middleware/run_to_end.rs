//! [`RunToEndLayer`]: handlers that run to their end even when their client leaves, as Next.js
//! route handlers do.
//!
//! Under hyper, a request's handler is a future that the server drops when the client goes away.
//! A handler that inserted an order, awaited the insert, and then registered its audit write
//! loses the audit if the client leaves in between: the order exists, the audit never runs. This
//! layer runs the handler (and what the layers inside it do) as a Tokio task of its own. When
//! the client leaves, that task goes on, as pending work of its request: under the request's
//! budget, drained by [`AfterTasks::shutdown`](crate::AfterTasks::shutdown), counted in
//! [`AfterTasks::stats`](crate::AfterTasks::stats), and its late registrations run like any
//! other. The cost is one task per request, measured in `BENCHMARKS.md`.

use std::fmt;
use std::future::Future;
use std::panic::resume_unwind;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Request;
use pin_project_lite::pin_project;
use tokio::task::JoinHandle;
use tower_layer::Layer;
use tower_service::Service;

use crate::handle::After;
use crate::request::blocking::AbortOnDrop;

/// A [`Layer`] that lets handlers run to their end even when their client leaves.
///
/// Put it **inside** [`AfterLayer`](crate::AfterLayer), around what should run to its end
/// (the router, or the routes that change state), so that it finds the request's [`After`]:
///
/// ```
/// use axum::{routing::post, Router};
/// use tower_after::{After, AfterLayer, RunToEndLayer};
///
/// async fn create_order(later: After) -> &'static str {
///     // insert the order, then:
///     later.run(async { /* write the audit row */ });
///     "created"
/// }
///
/// let app: Router = Router::new()
///     .route("/orders", post(create_order))
///     .layer(RunToEndLayer::new())
///     .layer(AfterLayer::new());
/// ```
///
/// When the client leaves before the response is ready, the request's callbacks start as before
/// (with [`Completion::Aborted`](crate::Completion::Aborted)), and the rest of the handler goes
/// on as the request's [`wait_until`](After::wait_until) work: under its budget, which cancels
/// it at its next `.await` if it runs out, and waited for by a shutdown. Work the handler
/// registers afterwards runs as soon as it is registered. Outside `AfterLayer`, the rest of the
/// handler runs on, untracked.
///
/// A panic in the handler reaches the layers outside it, as without this layer; once its client
/// left, it is the work's panic: logged at `ERROR` and counted in
/// [`AfterStats::panicked`](crate::AfterStats::panicked). The handler's
/// future, response and error must be `Send + 'static`, as axum's are.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunToEndLayer {
    _private: (),
}

impl RunToEndLayer {
    /// The layer.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for RunToEndLayer {
    type Service = RunToEnd<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RunToEnd { inner }
    }
}

/// The service made by [`RunToEndLayer`]: see there.
#[derive(Debug, Clone)]
pub struct RunToEnd<S> {
    inner: S,
}

impl<S> RunToEnd<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for RunToEnd<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RunToEndFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let after = request.extensions().get::<After>().cloned();
        let handler = self.inner.call(request);
        // The task keeps the request current, so that `After::current` works in it.
        let task = match &after {
            Some(after) => tokio::spawn(after.scope(handler)),
            None => tokio::spawn(handler),
        };
        RunToEndFuture {
            task: Some(task),
            after,
        }
    }
}

pin_project! {
    /// Response future of [`RunToEnd`]: the handler's task. Dropped before it ended (the client
    /// left), it hands the task over to the request as pending work.
    pub struct RunToEndFuture<T>
    where
        T: Send,
        T: 'static,
    {
        task: Option<JoinHandle<T>>,
        after: Option<After>,
    }

    impl<T> PinnedDrop for RunToEndFuture<T>
    where
        T: Send,
        T: 'static,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let (Some(task), Some(after)) = (this.task.take(), this.after.take()) else {
                return;
            };
            if task.is_finished() {
                return;
            }
            // Refused (the layer is overloaded or shut down), the handler runs on untracked:
            // the task is only aborted once its tracking has begun.
            after.wait_until(async move {
                // A panic in the rest of the handler is this work's: counted and logged as such.
                // Cancelled, the task was aborted with this work, which is then gone too.
                if let Err(error) = AbortOnDrop(task).await {
                    if let Ok(panic) = error.try_into_panic() {
                        std::panic::resume_unwind(panic);
                    }
                }
            });
        }
    }
}

impl<T: Send + 'static> Future for RunToEndFuture<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.project();
        let Some(task) = this.task.as_mut() else {
            panic!("`RunToEndFuture` polled after completion");
        };
        let ended = ready!(Pin::new(task).poll(cx));
        *this.task = None;
        match ended {
            Ok(output) => Poll::Ready(output),
            Err(error) => match error.try_into_panic() {
                Ok(panic) => resume_unwind(panic),
                Err(error) => panic!(
                    "the handler's task was cancelled before it ended ({error}): its runtime is \
                     shutting down"
                ),
            },
        }
    }
}

impl<T: Send + 'static> fmt::Debug for RunToEndFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunToEndFuture")
            .field("ended", &self.task.is_none())
            .finish_non_exhaustive()
    }
}
