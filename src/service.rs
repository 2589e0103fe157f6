//! [`AfterService`] and its [`ResponseFuture`]: where a request's scope is opened and where a
//! response that never came is noticed.

use std::future::Future;
use std::mem;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tower_service::Service;

use crate::after::{scoped, sync_scoped};
use crate::body::Finisher;
use crate::scope::Scope;
use crate::tasks::Shared;
use crate::{After, AfterBody, Completion, RequestSnapshot};

/// Middleware that lets the requests it serves schedule work for after their response.
///
/// Made by [`AfterLayer`](crate::AfterLayer); see there and [`After`] for how to use it.
#[derive(Clone)]
pub struct AfterService<S> {
    inner: S,
    shared: Arc<Shared>,
    max_duration: Duration,
}

impl<S> AfterService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>, max_duration: Duration) -> Self {
        Self {
            inner,
            shared,
            max_duration,
        }
    }

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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AfterService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<AfterBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let snapshot = RequestSnapshot::new(&request);
        let scope = Arc::new(Scope::new(snapshot, self.shared.clone(), self.max_duration));
        let after = After::from_scope(scope.clone());
        request.extensions_mut().insert(after.clone());
        // Middleware may do its work in `call` rather than in the future: scope both.
        let inner = sync_scoped(after.clone(), || self.inner.call(request));
        ResponseFuture {
            inner: scoped(after, inner),
            finisher: Finisher::new(scope),
        }
    }
}

pin_project! {
    /// Response future of [`AfterService`].
    ///
    /// If it ends without a response (the inner service failed or panicked) or is dropped before
    /// one (the client left while the handler ran), the request's callbacks start right away.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: TaskLocalFuture<After, F>,
        finisher: Finisher,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Body,
{
    type Output = Result<Response<AfterBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let polled = catch_unwind(AssertUnwindSafe(|| this.inner.as_mut().poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(Ok(response))) => {
                let status = response.status();
                let finisher = mem::take(this.finisher).responded(status);
                Poll::Ready(Ok(response.map(|body| AfterBody::new(body, finisher))))
            }
            Ok(Poll::Ready(Err(error))) => {
                this.finisher.finish(Completion::Failed);
                Poll::Ready(Err(error))
            }
            Err(panic) => {
                this.finisher.finish(Completion::Failed);
                resume_unwind(panic)
            }
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for AfterService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfterService")
            .field("inner", &self.inner)
            .field("max_duration", &self.max_duration)
            .finish_non_exhaustive()
    }
}
