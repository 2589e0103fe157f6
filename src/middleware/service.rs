//! [`AfterService`]: where a request's scope is opened.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::handle::After;
use crate::middleware::body::{AfterBody, Finisher};
use crate::middleware::future::ResponseFuture;
use crate::middleware::max_duration::RouteBudget;
use crate::record::outcome::Completion;
use crate::record::snapshot::RequestSnapshot;
use crate::request::config::Config;
use crate::request::{Inflight, REQUEST};

/// Middleware that lets the requests it serves schedule work for after their response.
///
/// Made by [`AfterLayer`](crate::AfterLayer); see there and [`After`] for how to use it. With
/// plain Tower:
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use tower::{service_fn, ServiceBuilder};
/// use tower_after::{After, AfterLayer};
///
/// let service = ServiceBuilder::new()
///     .layer(AfterLayer::new())
///     .service(service_fn(|request: Request<String>| async move {
///         if let Some(later) = request.extensions().get::<After>() {
///             later.run(async { /* after the response */ });
///         }
///         Ok::<_, Infallible>(Response::new(String::from("hello")))
///     }));
/// # let _ = service;
/// ```
#[derive(Clone)]
pub struct AfterService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> AfterService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
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
        // Where work registered off the runtime (a plain thread, a helper's runtime) will run.
        self.config.ledger.serving().remember_current();
        let snapshot = RequestSnapshot::new(&request, &self.config.snapshot);
        if snapshot.truncated() {
            if let Some(count) = self.config.ledger.truncated() {
                tracing::warn!(
                    method = %snapshot.method(),
                    path = snapshot.path(),
                    request_id = snapshot.request_id(),
                    truncated = count,
                    "request snapshot truncated: the request is larger than the snapshot's cap of \
                     {} bytes (callbacks see it as `truncated()`; raise \
                     `SnapshotConfig::max_bytes`, or keep only the headers callbacks read)",
                    self.config.snapshot.max_bytes_value()
                );
            }
        }
        let inflight = Inflight::open(snapshot, &self.config);
        // A `MaxDuration` outside the layer left the route's budget.
        if let Some(RouteBudget(budget)) = request.extensions().get() {
            inflight.set_budget(*budget);
        }
        request
            .extensions_mut()
            .insert(After::new(inflight.clone()));
        // Before the inner call: if it panics, unwinding drops the finisher, which fails the
        // request, so that work registered in `call` still runs.
        let mut finisher = Finisher::new(inflight.clone());
        let inner = self.inner.call(request);
        finisher.on_drop(Completion::Aborted);
        ResponseFuture::new(REQUEST.scope(inflight, inner), finisher)
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for AfterService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AfterService")
            .field("inner", &self.inner)
            .field("max_duration", &self.config.max_duration)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::pending;
    use std::io;

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use http::{Request, Response};
    use http_body_util::Empty;
    use tower::{service_fn, Layer, ServiceExt};

    use crate::test_util::{settle, Seen};
    use crate::{after, After, AfterLayer, Completion};

    type Body = Empty<bytes::Bytes>;

    fn record_current(seen: &Seen) {
        let seen = seen.clone();
        After::current().run_with(move |ctx| async move { seen.record(*ctx.outcome()) });
    }

    /// A service whose handler registers a recording callback, then ends with `end`.
    fn ending_with<E, F>(
        seen: &Seen,
        end: fn() -> F,
    ) -> impl tower::Service<
        Request<()>,
        Response = Response<crate::AfterBody<Body>>,
        Error = E,
        Future: Send,
    >
    where
        F: std::future::Future<Output = Result<Response<Body>, E>> + Send + 'static,
        E: Send + 'static,
    {
        let recorder = seen.clone();
        AfterLayer::new().layer(service_fn(move |_: Request<()>| {
            let recorder = recorder.clone();
            async move {
                record_current(&recorder);
                end().await
            }
        }))
    }

    #[tokio::test]
    async fn an_inner_error_fails_the_request() {
        let seen = Seen::default();
        let service = ending_with(&seen, || async { Err(io::Error::other("backend down")) });
        let error = service.oneshot(Request::new(())).await.unwrap_err();
        assert_eq!(error.to_string(), "backend down");
        let outcome = seen.one().await;
        assert_eq!(outcome.completion(), Completion::Failed);
        assert_eq!(outcome.status(), None);
    }

    #[tokio::test]
    async fn a_panicking_handler_fails_the_request_and_still_panics() {
        let seen = Seen::default();
        let service = ending_with::<Infallible, _>(&seen, || async { panic!("handler bug") });
        let joined = tokio::spawn(service.oneshot(Request::new(()))).await;
        assert!(
            joined.unwrap_err().is_panic(),
            "the panic must reach the server"
        );
        let outcome = seen.one().await;
        assert_eq!(outcome.completion(), Completion::Failed);
        assert_eq!(outcome.status(), None);
    }

    #[tokio::test]
    async fn a_request_dropped_before_its_response_is_aborted() {
        let seen = Seen::default();
        let service = ending_with::<Infallible, _>(&seen, pending);
        let mut future = Box::pin(service.oneshot(Request::new(())));
        assert!(futures_util::poll!(future.as_mut()).is_pending());
        settle().await;
        assert!(
            seen.all().is_empty(),
            "ran while the handler was still working"
        );
        drop(future);
        let outcome = seen.one().await;
        assert_eq!(outcome.completion(), Completion::Aborted);
        assert_eq!(outcome.status(), None);
    }

    #[tokio::test]
    async fn the_handle_reaches_extensions_and_the_whole_handler_future() {
        let layer = AfterLayer::new();
        let deep = Arc::new(AtomicBool::new(false));
        let flag = deep.clone();
        let service = layer.layer(service_fn(move |request: Request<()>| {
            // In `call` itself, synchronous middleware reads the extension.
            let extension = request.extensions().get::<After>().unwrap().clone();
            let flag = flag.clone();
            async move {
                // In the future, the task-local is the same request.
                assert!(After::current().same_request(&extension));
                deep_in_the_call_tree(flag).await;
                Ok::<_, Infallible>(Response::new(Body::new()))
            }
        }));
        drop(service.oneshot(Request::new(())).await.unwrap());
        crate::test_util::eventually("the callback", || deep.load(Ordering::SeqCst)).await;
        assert!(After::try_current().is_none());
    }

    async fn deep_in_the_call_tree(flag: Arc<AtomicBool>) {
        tokio::task::yield_now().await;
        after(async move { flag.store(true, Ordering::SeqCst) });
    }

    #[test]
    #[should_panic(expected = "AfterLayer")]
    fn current_outside_a_request_names_the_layer() {
        let _ = After::current();
    }
}
