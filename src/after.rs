//! [`After`]: the handle a handler uses to schedule work for after its response.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::callback::{Plain, WithContext};
use crate::scope::{Job, Scope, Start, Work};
use crate::{AfterContext, RequestSnapshot};

tokio::task_local! {
    static CURRENT: After;
}

/// Runs `future` with `after` as the current request, for [`After::current`].
pub(crate) fn scoped<F: Future>(
    after: After,
    future: F,
) -> tokio::task::futures::TaskLocalFuture<After, F> {
    CURRENT.scope(after, future)
}

/// Calls `f` with `after` as the current request, for [`After::current`].
pub(crate) fn sync_scoped<R>(after: After, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(after, f)
}

/// Schedules work to run after the current request's response has been sent.
///
/// `After` is the handle of one request inside [`AfterLayer`](crate::AfterLayer). Get it as an
/// axum extractor, from the request extensions (plain Tower or hyper), or with
/// [`After::current`] wherever the request's response future is polled. It is cheap to clone, and
/// a clone can be moved into spawned tasks and callbacks: work registered through it always
/// belongs to its request, even when registered after the response is gone.
///
/// # When callbacks run
///
/// | the response…                                   | callbacks start once…                  |
/// |-------------------------------------------------|----------------------------------------|
/// | is sent in full                                 | its last byte was handed to the server |
/// | has no body (`HEAD`, `204`, `304`)              | it was handed to the server            |
/// | body fails mid-stream                           | the error was yielded                  |
/// | is abandoned by the client                      | the server drops it                    |
/// | was never made: handler failed, panicked, or the client left first | the failure is seen |
///
/// Callbacks of one request start in registration order and run concurrently on a Tokio task of
/// their own: never inside the server's poll of the response, so they delay neither this response
/// nor the next request on the same connection. A panicking callback is caught and logged; the
/// others still run. Each runs inside the [tracing span](tracing::Span) that was current where it
/// was registered.
///
/// All of a request's callbacks share one budget, its max duration (60 s unless
/// [`AfterLayer::max_duration`](crate::AfterLayer::max_duration) or
/// [`MaxDuration`](crate::MaxDuration) says otherwise), counted from the end of the response.
/// What is still running when it runs out is cancelled, with a warning in the logs.
///
/// # Example
///
/// ```
/// use axum::{routing::post, Router};
/// use tower_after::{After, AfterLayer};
///
/// async fn checkout(after: After) -> &'static str {
///     after.run_with(|ctx| async move {
///         let session = ctx.request().cookie("session-id").unwrap_or("anonymous");
///         tracing::info!(session, status = ?ctx.outcome().status(), "checkout done");
///     });
///     "ordered"
/// }
///
/// let app: Router = Router::new().route("/checkout", post(checkout)).layer(AfterLayer::new());
/// ```
///
/// Without axum, read it from the request extensions:
///
/// ```
/// use http::{Request, Response};
/// use tower_after::After;
///
/// async fn handle(request: Request<String>) -> Result<Response<String>, std::convert::Infallible> {
///     if let Some(after) = request.extensions().get::<After>() {
///         after.run(async { println!("response sent") });
///     }
///     Ok(Response::new("hello".to_owned()))
/// }
/// ```
#[derive(Clone)]
pub struct After {
    scope: Arc<Scope>,
}

const OUTSIDE_MESSAGE: &str = "`After::current()` (or `tower_after::after`) was called outside a \
    request handled by `AfterLayer`: add `.layer(AfterLayer::new())` to the router or service, \
    and call it from the request's own task (a task the handler spawns is outside that scope; \
    move a clone of `After` into it instead)";

impl After {
    pub(crate) fn from_scope(scope: Arc<Scope>) -> Self {
        Self { scope }
    }

    pub(crate) fn scope(&self) -> &Arc<Scope> {
        &self.scope
    }

    /// The current request's handle.
    ///
    /// Works anywhere the request's response future is being polled under
    /// [`AfterLayer`](crate::AfterLayer): in the handler and everything it calls or awaits, in
    /// middleware inside the layer (axum's `from_fn` and any future-based middleware), and in the
    /// request's callbacks themselves. Two places are outside that scope: a task the handler
    /// spawns with `tokio::spawn` (move a clone of the handle into it instead), and code that runs
    /// synchronously in an inner `Service::call` (read the handle from the request extensions
    /// there).
    ///
    /// # Panics
    ///
    /// Outside such a request, naming `AfterLayer` as the fix. Use [`After::try_current`] where
    /// the layer may be missing.
    ///
    /// ```
    /// # async fn deep_in_the_call_tree() {
    /// tower_after::After::current().run(async { /* ... */ });
    /// # }
    /// ```
    #[must_use]
    #[track_caller]
    pub fn current() -> Self {
        match Self::try_current() {
            Some(after) => after,
            None => panic!("{OUTSIDE_MESSAGE}"),
        }
    }

    /// The current request's handle, or `None` outside a request handled by
    /// [`AfterLayer`](crate::AfterLayer). See [`After::current`].
    ///
    /// ```
    /// assert!(tower_after::After::try_current().is_none());
    /// ```
    #[must_use]
    pub fn try_current() -> Option<Self> {
        CURRENT.try_with(Self::clone).ok()
    }

    /// The request as it entered the layer: the same snapshot its callbacks see.
    ///
    /// ```
    /// # fn example(after: tower_after::After) {
    /// let session = after.request().cookie("session-id").unwrap_or("anonymous");
    /// # }
    /// ```
    #[must_use]
    pub fn request(&self) -> &RequestSnapshot {
        &self.scope.snapshot
    }

    /// Runs `future` once the response has finished.
    ///
    /// The future is not polled before then. Registered after the response finished (from a
    /// callback or a late task), it starts on a later tick, right away.
    ///
    /// ```
    /// # async fn example(after: tower_after::After) {
    /// after.run(async {
    ///     // flush analytics, warm a cache, send a notification...
    /// });
    /// # }
    /// ```
    pub fn run<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.register(
            Work::Async(Box::pin(Plain::new(future))),
            Start::AfterResponse,
        );
    }

    /// Calls `callback` once the response has finished, with an [`AfterContext`] that tells
    /// about the request and how its response ended, and runs the future it returns.
    ///
    /// ```
    /// # async fn example(after: tower_after::After) {
    /// after.run_with(|ctx| async move {
    ///     let agent = ctx.request().headers().get("user-agent").cloned();
    ///     println!("{:?} answered {:?} to {agent:?}", ctx.outcome().completion(), ctx.outcome().status());
    /// });
    /// # }
    /// ```
    pub fn run_with<C, F>(&self, callback: C)
    where
        C: FnOnce(AfterContext) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let callback = Box::pin(WithContext::new(callback));
        self.register(Work::Async(callback), Start::AfterResponse);
    }

    /// Like [`After::run_with`], under a name: registering the same name again in the same
    /// request replaces the earlier callback if it has not started yet, so the last registration
    /// wins (like Laravel's `defer()->name()`). [`After::forget`] removes it.
    ///
    /// Names are per request. Once the response has finished and a named callback has started,
    /// a new registration under its name no longer replaces it: both run.
    ///
    /// ```
    /// # async fn example(after: tower_after::After) {
    /// // Called from several places while handling the request; the cache is warmed once,
    /// // with the last settings.
    /// after.run_named("warm-cache", |_ctx| async { /* first version */ });
    /// after.run_named("warm-cache", |_ctx| async { /* this one runs */ });
    /// # }
    /// ```
    pub fn run_named<C, F>(&self, name: impl Into<Cow<'static, str>>, callback: C)
    where
        C: FnOnce(AfterContext) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let job = Job::new(Work::Async(Box::pin(WithContext::new(callback)))).named(name.into());
        self.scope.register(job, Start::AfterResponse);
    }

    /// Removes the named callback registered with [`After::run_named`], if it has not started
    /// yet, and says whether there was one.
    ///
    /// ```
    /// # async fn example(after: tower_after::After) {
    /// after.run_named("notify", |_ctx| async { /* send an e-mail */ });
    /// // The request was rolled back: nothing to notify about.
    /// assert!(after.forget("notify"));
    /// assert!(!after.forget("notify"));
    /// # }
    /// ```
    pub fn forget(&self, name: &str) -> bool {
        self.scope.forget(name)
    }

    /// Calls `callback` once the response has finished, on Tokio's blocking thread pool, for
    /// work that is synchronous or CPU-bound: a blocking database client, image resizing,
    /// compression. It does not stall the async worker threads.
    ///
    /// It follows the same rules as [`After::run_with`] (runs once, counts under the
    /// concurrency limit, belongs to the request's budget and to the shutdown drain), with one
    /// limit: a blocking closure cannot be interrupted. One that has not started when its
    /// budget or the shutdown grace runs out never starts; one that has started runs to its end
    /// on the blocking pool (keeping its place under the concurrency limit), even though the
    /// request stops waiting for it and counts it as timed out or cancelled. The runtime waits
    /// for such closures when it shuts down, unless it is shut down with a timeout.
    ///
    /// ```
    /// # async fn example(after: tower_after::After) {
    /// after.run_blocking(|ctx| {
    ///     let path = ctx.request().uri().path().to_owned();
    ///     std::fs::write("/tmp/last-request", path).ok();
    /// });
    /// # }
    /// ```
    pub fn run_blocking<C>(&self, callback: C)
    where
        C: FnOnce(AfterContext) + Send + 'static,
    {
        self.register(Work::Blocking(Box::new(callback)), Start::AfterResponse);
    }

    /// Starts `future` now, in the background, and keeps it under the request's budget and the
    /// layer's shutdown drain, like Next.js's and Cloudflare's `waitUntil`.
    ///
    /// Unlike [`After::run`], the future does not wait for the response: use it for work already
    /// under way that must not be lost, such as a write that should finish even if the client
    /// goes away. Its budget starts counting when the response finishes.
    ///
    /// ```
    /// # async fn save(_: &str) {}
    /// # async fn example(after: tower_after::After) {
    /// after.wait_until(async { save("draft").await });
    /// # }
    /// ```
    pub fn wait_until<F>(&self, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.register(Work::Async(Box::pin(Plain::new(future))), Start::Now);
    }

    fn register(&self, work: Work, start: Start) {
        self.scope.register(Job::new(work), start);
    }
}

/// Runs `future` after the current request's response has been sent: shorthand for
/// `After::current().run(future)`, the counterpart of Next.js's `after()`.
///
/// # Panics
///
/// Outside a request handled by [`AfterLayer`](crate::AfterLayer); see [`After::current`].
///
/// ```
/// use tower_after::after;
///
/// async fn handler() -> &'static str {
///     after(async { println!("the response is out") });
///     "ok"
/// }
/// ```
#[track_caller]
pub fn after<F>(future: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    After::current().run(future);
}

impl fmt::Debug for After {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("After")
            .field("method", self.scope.snapshot.method())
            .field("uri", self.scope.snapshot.uri())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
    use axum_core::response::{IntoResponse, Response};
    use http::request::Parts;
    use http::StatusCode;
    use std::convert::Infallible;
    use std::fmt;

    use super::After;

    /// Extracts the request's [`After`] handle; rejects with [`MissingAfterLayer`] when the router
    /// lacks [`AfterLayer`](crate::AfterLayer). `Option<After>` never rejects.
    impl<S> FromRequestParts<S> for After
    where
        S: Send + Sync,
    {
        type Rejection = MissingAfterLayer;

        async fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<After>()
                .cloned()
                .ok_or(MissingAfterLayer)
        }
    }

    impl<S> OptionalFromRequestParts<S> for After
    where
        S: Send + Sync,
    {
        type Rejection = Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<After>().cloned())
        }
    }

    /// Rejection of the [`After`] extractor: the request did not pass through
    /// [`AfterLayer`](crate::AfterLayer).
    ///
    /// This is a server bug rather than a client error, so it answers `500 Internal Server
    /// Error`, with a body that names the fix.
    ///
    /// ```
    /// use tower_after::MissingAfterLayer;
    ///
    /// let rejection = MissingAfterLayer::default();
    /// assert_eq!(rejection.status(), 500);
    /// assert!(rejection.body_text().contains("AfterLayer"));
    /// ```
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    #[non_exhaustive]
    pub struct MissingAfterLayer;

    impl MissingAfterLayer {
        /// The status code of the rejection: `500 Internal Server Error`.
        #[must_use]
        pub fn status(&self) -> StatusCode {
            StatusCode::INTERNAL_SERVER_ERROR
        }

        /// The body text of the rejection.
        #[must_use]
        pub fn body_text(&self) -> String {
            self.to_string()
        }
    }

    impl fmt::Display for MissingAfterLayer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(
                "Missing request extension: `After` was not found. \
                 Is `AfterLayer` applied, outside this route? Add `.layer(AfterLayer::new())` \
                 to the router.",
            )
        }
    }

    impl std::error::Error for MissingAfterLayer {}

    impl IntoResponse for MissingAfterLayer {
        fn into_response(self) -> Response {
            tracing::error!("{self}");
            (self.status(), self.body_text()).into_response()
        }
    }
}

#[cfg(feature = "axum")]
pub use extract::MissingAfterLayer;

#[cfg(all(test, feature = "axum"))]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::After;
    use crate::AfterLayer;

    async fn call(app: Router) -> (StatusCode, String) {
        let response = app.oneshot(Request::new(Body::empty())).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn the_extractor_finds_the_handle_under_the_layer() {
        let app = Router::new()
            .route(
                "/",
                get(|after: After| async move { after.scope().snapshot.uri().to_string() }),
            )
            .layer(AfterLayer::new());
        assert_eq!(call(app).await, (StatusCode::OK, "/".to_owned()));
    }

    #[tokio::test]
    async fn without_the_layer_the_extractor_answers_500_naming_it() {
        let app = Router::new().route("/", get(|_: After| async { "unreachable" }));
        let (status, body) = call(app).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("AfterLayer"), "{body}");
    }

    #[tokio::test]
    async fn an_optional_handle_is_none_without_the_layer() {
        let handler = |after: Option<After>| async move { format!("{}", after.is_some()) };
        let bare = Router::new().route("/", get(handler));
        assert_eq!(call(bare).await.1, "false");
        let layered = Router::new()
            .route("/", get(handler))
            .layer(AfterLayer::new());
        assert_eq!(call(layered).await.1, "true");
    }
}
