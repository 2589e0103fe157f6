//! [`After`]: the handle a handler uses to schedule work for after its response.

#[cfg(feature = "axum")]
pub(crate) mod extract;

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::panic::Location;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::futures::TaskLocalFuture;

use crate::record::snapshot::RequestSnapshot;
use crate::request::blocking::run_blocking;
use crate::request::callback::{AfterOutput, Callback, Plain, WithContext};
use crate::request::context::AfterContext;
use crate::request::scope::Start;
use crate::request::{Inflight, REQUEST};
use crate::tasks::refusal::Overloaded;

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
/// others still run. Each runs inside a [tracing span](tracing::Span) of its own, `after`, that
/// follows from the span current where it was registered (see the crate docs, *Tracing*).
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
/// async fn checkout(later: After) -> &'static str {
///     later.run_with(|ctx| async move {
///         let session = ctx.request().cookie("session-id").unwrap_or("anonymous");
///         let status = ctx.outcome().status().map(|status| status.as_u16());
///         tracing::info!(session, status, "checkout done");
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
///     if let Some(later) = request.extensions().get::<After>() {
///         later.run(async { println!("response sent") });
///     }
///     Ok(Response::new("hello".to_owned()))
/// }
/// ```
#[derive(Clone)]
pub struct After {
    inflight: Arc<Inflight>,
}

const OUTSIDE_MESSAGE: &str = "`After::current()` (or `tower_after::after`) was called outside a \
    request handled by `AfterLayer`: add `.layer(AfterLayer::new())` to the router or service, \
    and call it from the request's own task (a task the handler spawns is outside that scope; \
    move a clone of `After` into it instead)";

/// Finding the request, and what its handler leaves for the callbacks.
impl After {
    pub(crate) fn new(inflight: Arc<Inflight>) -> Self {
        Self { inflight }
    }

    /// `future`, polled with this request as the current one (for `After::current`).
    pub(crate) fn scope<F: Future>(&self, future: F) -> TaskLocalFuture<Arc<Inflight>, F> {
        REQUEST.scope(self.inflight.clone(), future)
    }

    pub(crate) fn set_budget(&self, budget: Duration) {
        self.inflight.set_budget(budget);
    }

    #[cfg(test)]
    pub(crate) fn same_request(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inflight, &other.inflight)
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
        REQUEST
            .try_with(|inflight| Self::new(inflight.clone()))
            .ok()
    }

    /// The request as it entered the layer: the same snapshot its callbacks see.
    ///
    /// ```
    /// # fn example(later: tower_after::After) {
    /// let session = later.request().cookie("session-id").unwrap_or("anonymous");
    /// # }
    /// ```
    #[must_use]
    pub fn request(&self) -> &RequestSnapshot {
        &self.inflight.snapshot
    }

    /// Leaves `value` for this request's callbacks and its
    /// [`after_each`](crate::AfterLayer::after_each) hook, which read it with
    /// [`AfterContext::get`]: typed data from the handler to the work after it, such as the user
    /// id for an access log. One value per type, like request extensions: inserting a second
    /// one of the same type replaces the first, which is handed back.
    ///
    /// The value is kept until the request's work is done: its response ended and its last
    /// callback ended (or, without callbacks, its response ended). Then it is dropped, even if
    /// the value holds this request's own `After`, which would otherwise keep the request alive
    /// for good. Work registered after that, from a task that kept a clone of the handle, sees
    /// no value, and a value inserted then is dropped at once.
    ///
    /// ```
    /// use tower_after::After;
    ///
    /// struct UserId(u64);
    ///
    /// async fn profile(later: After) -> &'static str {
    ///     let user = UserId(42); // from the session, a token...
    ///     later.insert(user);
    ///     "profile"
    /// }
    /// ```
    pub fn insert<T: Any + Send + Sync>(&self, value: T) -> Option<Arc<T>> {
        let replaced = self.inflight.data.insert(value);
        // Too late: the work it was for is done.
        self.inflight.let_go_if_done();
        replaced
    }
}

/// Registering work.
impl After {
    /// Runs `future` once the response has finished.
    ///
    /// The future is not polled before then. Registered after the response finished (from a
    /// callback or a late task), it starts on a later tick, right away.
    ///
    /// ```
    /// # async fn example(later: tower_after::After) {
    /// later.run(async {
    ///     // flush analytics, warm a cache, send a notification...
    /// });
    /// # }
    /// ```
    #[track_caller]
    pub fn run<F: AfterWork>(&self, future: F) {
        self.register(Plain::new(future), None, Start::AfterResponse);
    }

    /// Calls `callback` once the response has finished, with an [`AfterContext`] that tells
    /// about the request and how its response ended, and runs the future it returns.
    ///
    /// ```
    /// # async fn example(later: tower_after::After) {
    /// later.run_with(|ctx| async move {
    ///     let agent = ctx.request().headers().get("user-agent").cloned();
    ///     println!("{:?} answered {:?} to {agent:?}", ctx.outcome().completion(), ctx.outcome().status());
    /// });
    /// # }
    /// ```
    #[track_caller]
    pub fn run_with<C, F>(&self, callback: C)
    where
        C: FnOnce(AfterContext) -> F + Send + 'static,
        F: AfterWork,
    {
        let callback = WithContext::new(callback);
        self.register(callback, None, Start::AfterResponse);
    }

    /// Like [`After::run_with`], under a name: registering the same name again in the same
    /// request replaces the earlier callback if it has not started yet, so the last registration
    /// wins (like Laravel's `defer()->name()`). [`After::forget`] removes it.
    ///
    /// Names are per request. Once the response has finished and a named callback has started,
    /// a new registration under its name no longer replaces it: both run.
    ///
    /// ```
    /// # async fn example(later: tower_after::After) {
    /// // Called from several places while handling the request; the cache is warmed once,
    /// // with the last settings.
    /// later.run_named("warm-cache", |_ctx| async { /* first version */ });
    /// later.run_named("warm-cache", |_ctx| async { /* this one runs */ });
    /// # }
    /// ```
    #[track_caller]
    pub fn run_named<C, F>(&self, name: impl Into<Cow<'static, str>>, callback: C)
    where
        C: FnOnce(AfterContext) -> F + Send + 'static,
        F: AfterWork,
    {
        let callback = WithContext::new(callback);
        self.register(callback, Some(name.into()), Start::AfterResponse);
    }

    /// Removes the named callback registered with [`After::run_named`], if it has not started
    /// yet, and says whether there was one.
    ///
    /// ```
    /// # async fn example(later: tower_after::After) {
    /// later.run_named("notify", |_ctx| async { /* send an e-mail */ });
    /// // The request was rolled back: nothing to notify about.
    /// assert!(later.forget("notify"));
    /// assert!(!later.forget("notify"));
    /// # }
    /// ```
    pub fn forget(&self, name: &str) -> bool {
        self.inflight.forget(name)
    }

    /// Calls `callback` once the response has finished, on Tokio's blocking thread pool, for
    /// work that is synchronous or CPU-bound: a blocking database client, image resizing,
    /// compression. It does not stall the async worker threads.
    ///
    /// It follows the same rules as [`After::run_with`] (runs once, counts under the
    /// concurrency limit, belongs to the request's budget and to the shutdown drain), with one
    /// limit: a blocking closure cannot be interrupted. One that has not started when its
    /// budget or the shutdown grace runs out never starts; one that has started runs to its end
    /// on the blocking pool, even though the request stops waiting for it, counts it as timed out
    /// or cancelled, and gives its place under the concurrency limit to the next callback. The
    /// runtime waits for such closures when it shuts down, unless it is shut down with a timeout.
    ///
    /// ```
    /// # async fn example(later: tower_after::After) {
    /// later.run_blocking(|ctx| {
    ///     let path = ctx.request().uri().path().to_owned();
    ///     std::fs::write("/tmp/last-request", path).ok();
    /// });
    /// # }
    /// ```
    #[track_caller]
    pub fn run_blocking<C, R>(&self, callback: C)
    where
        C: FnOnce(AfterContext) -> R + Send + 'static,
        R: AfterOutput,
    {
        self.run_with(move |ctx| run_blocking(ctx, callback));
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
    /// # async fn example(later: tower_after::After) {
    /// later.wait_until(async { save("draft").await });
    /// # }
    /// ```
    #[track_caller]
    pub fn wait_until<F: AfterWork>(&self, future: F) {
        self.register(Plain::new(future), None, Start::Now);
    }
}

/// The fallible forms, which hand refused work back, and registration itself.
impl After {
    /// Like [`After::run`], and says whether the work was accepted. When the layer refuses it
    /// (it already holds its [maximum of pending callbacks](crate::AfterLayer::max_pending) or
    /// [of snapshot bytes](crate::AfterLayer::max_held_bytes), or it was shut down), the error
    /// hands the future back, unpolled, so the caller can run it now, answer `503`, or drop it.
    /// Every other way of registering work is refused the same way, counted in
    /// [`AfterStats::shed`](crate::AfterStats::shed) and logged, without telling the caller.
    ///
    /// ```
    /// # async fn send_receipt() {}
    /// # async fn example(later: tower_after::After) {
    /// if let Err(refused) = later.try_run(send_receipt()) {
    ///     // Overloaded: send it before answering instead.
    ///     refused.into_work().await;
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Overloaded`], carrying `future`, when the layer refuses new work.
    #[track_caller]
    pub fn try_run<F: AfterWork>(&self, future: F) -> Result<(), Overloaded<F>> {
        self.try_register(future, Plain::new)
    }

    /// Like [`After::run_with`], and says whether the work was accepted: see [`After::try_run`].
    /// When refused, the error hands the closure back, uncalled.
    ///
    /// ```
    /// # async fn example(later: tower_after::After) -> Result<&'static str, &'static str> {
    /// if later.try_run_with(|ctx| async move { /* send the receipt */ }).is_err() {
    ///     // Overloaded: answer 503 rather than accept an order without its receipt.
    ///     return Err("busy, try again");
    /// }
    /// # Ok("ok")
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Overloaded`], carrying `callback`, when the layer refuses new work.
    #[track_caller]
    pub fn try_run_with<C, F>(&self, callback: C) -> Result<(), Overloaded<C>>
    where
        C: FnOnce(AfterContext) -> F + Send + 'static,
        F: AfterWork,
    {
        self.try_register(callback, WithContext::new)
    }

    /// Registers `work`, made a callback by `callback`, for after the response, or hands it
    /// back, unused, when the layer refuses it.
    #[track_caller]
    fn try_register<W, C: Callback + 'static>(
        &self,
        work: W,
        callback: impl FnOnce(W) -> C,
    ) -> Result<(), Overloaded<W>> {
        match self.inflight.admit(None) {
            Ok(ticket) => {
                let site = Location::caller();
                self.inflight
                    .enqueue(ticket, callback(work), None, Start::AfterResponse, site);
                Ok(())
            }
            Err(refused) => Err(refused.with_work(work)),
        }
    }

    #[track_caller]
    fn register<C: Callback + 'static>(
        &self,
        callback: C,
        name: Option<Cow<'static, str>>,
        start: Start,
    ) {
        // Refused under overload: counted and logged; `try_run` and `try_run_with` tell their
        // caller.
        let _ = self
            .inflight
            .register(callback, name, start, Location::caller());
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
pub fn after<F: AfterWork>(future: F) {
    After::current().run(future);
}

/// Runs `future` after the current request's response has been sent, if there is a current
/// request: the counterpart of [`after()`] that never panics. Returns whether it was registered.
///
/// For helpers shared between request handlers and other code (a job runner, a CLI, a test):
/// inside a request handled by [`AfterLayer`](crate::AfterLayer) the work waits for the
/// response; elsewhere `try_after` hands the work back, and the helper decides what to do with
/// it.
///
/// ```
/// async fn record(event: &'static str) {
///     let work = async move { println!("recorded {event}") };
///     if let Err(work) = tower_after::try_after(work) {
///         // Not inside a request: nothing to wait for.
///         work.await;
///     }
/// }
/// ```
///
/// # Errors
///
/// The work itself, unregistered, when no request is in scope.
#[track_caller]
pub fn try_after<F: AfterWork>(future: F) -> Result<(), F> {
    match After::try_current() {
        Some(after) => {
            after.run(future);
            Ok(())
        }
        None => Err(future),
    }
}

/// After-response work: a future that returns `()` or `Result<(), E>` ([`AfterOutput`]), is
/// `Send` and owns what it uses (`'static`). Every such future is one.
///
/// [`After::run`], [`After::try_run`], [`After::wait_until`], [`after()`] and [`try_after()`]
/// take one; [`After::run_with`], [`After::try_run_with`], [`After::run_named`] and
/// [`AfterLayer::after_each`](crate::AfterLayer::after_each) take a closure that returns one.
/// The trait exists for the compiler's error message when something else is passed: a closure
/// where a future goes, as Next.js's `after(() => ..)` invites, or a closure that does its work
/// synchronously where it should return an `async move` block.
///
/// ```compile_fail
/// # fn example(later: tower_after::After) {
/// later.run(|ctx| async move { let _ = ctx; }); // a closure: use `run_with`
/// # }
/// ```
///
/// ```compile_fail
/// // Synchronous: the hook must return a future, `|ctx| async move { .. }`.
/// let layer = tower_after::AfterLayer::new().after_each(|ctx| println!("{ctx:?}"));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not after-response work: a future that returns `()` or `Result<(), E>`",
    label = "expected a future, such as `async move {{ .. }}`",
    note = "`run`, `wait_until` and `after()` take a future: `async move {{ .. }}`; `run_with`, \
            `run_named`, `try_run_with` and `AfterLayer::after_each` take a closure that returns \
            one: `|ctx| async move {{ .. }}`",
    note = "the future must be `Send` and own what it uses (`async move`)"
)]
pub trait AfterWork: Future<Output: AfterOutput> + Send + 'static {}

impl<F> AfterWork for F
where
    F: Future + Send + 'static,
    F::Output: AfterOutput,
{
}

impl fmt::Debug for After {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("After")
            .field("method", self.request().method())
            .field("uri", self.request().uri())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use http::{Request, Response};
    use http_body_util::{BodyExt, Empty};
    use tower::{service_fn, Layer, ServiceExt};

    use crate::AfterLayer;

    #[tokio::test]
    async fn try_after_hands_the_work_back_outside_a_request_and_registers_it_inside() {
        let ran = Arc::new(AtomicUsize::new(0));
        let count = ran.clone();
        let work = async move {
            count.fetch_add(1, Ordering::SeqCst);
        };
        // Outside a request: the work comes back, unregistered, and can be run by hand.
        let Err(work) = super::try_after(work) else {
            panic!("registered outside a request");
        };
        work.await;
        assert_eq!(ran.load(Ordering::SeqCst), 1);

        // Inside one: registered, it runs after the response.
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let count = ran.clone();
        let service = layer.layer(service_fn(move |_: Request<()>| {
            let count = count.clone();
            async move {
                let registered = super::try_after(async move {
                    count.fetch_add(1, Ordering::SeqCst);
                });
                assert!(registered.is_ok());
                Ok::<_, Infallible>(Response::new(Empty::<bytes::Bytes>::new()))
            }
        }));
        let response = service.oneshot(Request::new(())).await.unwrap();
        response.into_body().collect().await.unwrap();
        tasks.idle().await;
        assert_eq!(ran.load(Ordering::SeqCst), 2);
    }
}
