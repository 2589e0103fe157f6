//! AWS Lambda: [`DrainLayer`] runs each invocation's callbacks after its response is posted and
//! before the runtime asks for the next event, the way Vercel's `waitUntil` extends a function.
//!
//! Lambda freezes the execution environment as soon as the runtime asks for the next event.
//! [`DrainLayer`] goes on `lambda_runtime`'s [`Runtime::layer`](lambda_runtime::Runtime::layer),
//! around each invocation up to and including the post of its response; it keeps the callbacks
//! of the invocation's request from starting before that post, then waits for them, within
//! their budgets and never past the invocation's deadline, and only then lets the runtime go on.
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{routing::post, Router};
//! use tower_after::{After, AfterLayer};
//!
//! async fn handler(after: After) -> &'static str {
//!     after.run(async { /* runs after the response is posted, before the next event */ });
//!     "ok"
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), lambda_runtime::Error> {
//! let layer = AfterLayer::new();
//! let tasks = layer.tasks();
//! let app = Router::new().route("/", post(handler)).layer(layer);
//!
//! // On SIGTERM, Lambda leaves the process about 500 ms.
//! tower_after::lambda::graceful_shutdown(tasks.clone(), Duration::from_millis(300)).await;
//! lambda_runtime::Runtime::new(lambda_http::Adapter::from(app))
//!     .layer(tower_after::lambda::DrainLayer::new(tasks))
//!     .run()
//!     .await
//! # }
//! ```
//!
//! The crate documentation (*Serverless: AWS Lambda*) says what this guarantees and what not.
//! A whole function, with the commands to run it under `cargo lambda watch` and to deploy it, is
//! the example package `examples/lambda-function`.

mod hold;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use lambda_runtime::LambdaInvocation;
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::lambda::hold::{Hold, Invocation};
use crate::request::host::HostRef;
use crate::tasks::deadline::{self, until, SETTLE};
use crate::tasks::ledger::Ledger;
use crate::tasks::AfterTasks;

/// A layer for `lambda_runtime`'s [`Runtime::layer`](lambda_runtime::Runtime::layer): each
/// invocation's after-work runs once its response is posted, and the runtime asks for the next
/// event only once that work is done.
///
/// For each invocation it
/// 1. holds back the callbacks of the requests that [`AfterLayer`](crate::AfterLayer) serves
///    within it: `lambda_http` reads the whole response body, which would start them, *before*
///    it posts the response;
/// 2. starts them once the response has been posted to the Runtime API;
/// 3. waits until they ended, each request's within its budget ([`MaxDuration`](crate::MaxDuration)
///    or [`AfterLayer::max_duration`](crate::AfterLayer::max_duration)), and in any case until
///    [`DrainLayer::DEADLINE_MARGIN`] before the invocation's deadline (the function's timeout).
///    A deadline that is no real one (already past as the invocation starts, or more than 15
///    minutes away, as local emulators such as `cargo lambda watch` send) is ignored, with one
///    warning: each request's budget alone then bounds the wait.
///    What still runs then is cancelled, with one `WARN` for the invocation. A request's budget
///    counts from the end of its response body, which `lambda_http` reads before it posts the
///    response: the post's time counts against it;
/// 4. returns, and the runtime asks for the next event.
///
/// The cap holds even when a callback blocks the only worker thread (it is kept outside Tokio's
/// timers), except on a current-thread runtime, whose one thread such a callback blocks.
///
/// An invocation whose requests registered nothing returns as soon as its response is posted,
/// without a timer.
///
/// It waits for its own invocation's work only, which matters with concurrent invocations
/// (`lambda_http`'s `concurrency-tokio` feature and `run_concurrent`): each worker waits for
/// the work of the invocation it served, and the others go on taking events meanwhile. Work
/// registered outside an invocation, and work that a callback registers for another request,
/// is not waited for.
///
/// Make it from the [`AfterTasks`] of the `AfterLayer` on the router. That layer must see the
/// request in the task that runs the invocation: a layer that moves requests to another task
/// (`tower::buffer`) between the two loses the hold, and callbacks start at once.
///
/// It holds and waits for the work of every `AfterLayer` inside it, a route's own layer
/// included. A layer's shutdown drains and reports that layer's callbacks only. When the grace of
/// a shutdown of the layer it was made from runs out, the work still running in its invocations
/// stops too, whichever layer registered it. With a route that has a layer of its own, shut that
/// layer down as well (see [`graceful_shutdown`]).
///
/// # Example
///
/// ```no_run
/// use axum::{routing::get, Router};
/// use tower_after::{lambda::DrainLayer, AfterLayer};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), lambda_runtime::Error> {
/// let layer = AfterLayer::new();
/// let app = Router::new().route("/", get(|| async { "hi" })).layer(layer.clone());
/// lambda_runtime::Runtime::new(lambda_http::Adapter::from(app))
///     .layer(DrainLayer::new(layer.tasks()))
///     .run()
///     .await
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "lambda")))]
#[derive(Clone)]
pub struct DrainLayer {
    ledger: Arc<Ledger>,
}

impl DrainLayer {
    /// How long before an invocation's deadline the layer stops waiting, cancels what still
    /// runs and lets the runtime go on: 100 ms, for the cancelled callbacks to stop and for
    /// the runtime to reach the Runtime API before Lambda times the invocation out (which resets
    /// the execution environment).
    pub const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

    /// A layer that waits for the callbacks of the [`AfterLayer`](crate::AfterLayer) whose
    /// `tasks` these are.
    #[must_use]
    pub fn new(tasks: AfterTasks) -> Self {
        // The thread that keeps invocations' deadlines when every worker is blocked.
        deadline::start();
        Self {
            ledger: tasks.ledger().clone(),
        }
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drain<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Drain {
            inner,
            ledger: self.ledger.clone(),
        }
    }
}

impl fmt::Debug for DrainLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainLayer").finish_non_exhaustive()
    }
}

/// The service made by [`DrainLayer`]: see there.
#[cfg_attr(docsrs, doc(cfg(feature = "lambda")))]
#[derive(Clone)]
pub struct Drain<S> {
    inner: S,
    ledger: Arc<Ledger>,
}

impl<S> Drain<S> {
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

impl<S: fmt::Debug> fmt::Debug for Drain<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Drain")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Service<LambdaInvocation> for Drain<S>
where
    S: Service<LambdaInvocation>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = DrainFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, invocation: LambdaInvocation) -> Self::Future {
        let cap = cap(invocation.context.deadline());
        // A shutdown of the layer whose grace ran out stops this invocation's work too.
        let hold = Hold::new(self.ledger.clone(), cap);
        // `lambda_http` calls the router within this call, and axum calls `AfterLayer` when
        // the future is polled: both see the invocation.
        let inner = hold.sync_scope(|| self.inner.call(invocation));
        DrainFuture {
            inner: hold.scope(inner),
            hold: Some(hold),
            cap,
            drivers_done: None,
        }
    }
}

/// Lambda's longest function timeout: a deadline further away is no real one.
const LONGEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// When to stop waiting for an invocation whose deadline is `deadline`; `None`: only the
/// requests' own budgets bound the wait.
///
/// A deadline already past as the invocation starts, or further away than Lambda's longest
/// timeout, is no real deadline: local emulators send one (`cargo lambda watch` sends 600,000 ms
/// after the epoch, a date in 1970). Cutting every callback at once for it would be wrong, so
/// the drain says so once and falls back on the budgets.
fn cap(deadline: SystemTime) -> Option<Instant> {
    match deadline.duration_since(SystemTime::now()) {
        Ok(left) if left <= LONGEST_TIMEOUT => {
            Instant::now().checked_add(left.saturating_sub(DrainLayer::DEADLINE_MARGIN))
        }
        _ => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    deadline = ?deadline,
                    "the Lambda invocation's deadline is not a real one (already past, or more \
                     than 15 minutes away, as a local emulator such as `cargo lambda watch` \
                     sends): after-work is bounded by each request's `MaxDuration` only"
                );
            });
            None
        }
    }
}

/// The wait for an invocation's after-work, once its response is posted.
type DriversDone = Pin<Box<dyn Future<Output = ()> + Send>>;

pin_project! {
    /// Response future of [`Drain`]: the invocation, up to the post of its response,
    /// then its after-work.
    #[cfg_attr(docsrs, doc(cfg(feature = "lambda")))]
    pub struct DrainFuture<F>
    where
        F: Future,
    {
        #[pin]
        inner: TaskLocalFuture<HostRef, F>,
        // `Some` until the response is posted.
        hold: Option<Hold>,
        cap: Option<Instant>,
        // Once the response is posted, while work runs: the invocation's outcome, and the wait.
        drivers_done: Option<(F::Output, DriversDone)>,
    }
}

impl<F: Future> Future for DrainFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if this.hold.is_some() {
            let output = ready!(this.inner.poll(cx));
            // The response is posted, or could not be: the work held back starts now.
            let invocation = this.hold.take().map(Hold::release);
            match invocation {
                Some(invocation) if invocation.busy() > 0 => {
                    *this.drivers_done = Some((output, Box::pin(drain(invocation, *this.cap))));
                }
                _ => return Poll::Ready(output),
            }
        }
        if let Some((_, wait)) = this.drivers_done.as_mut() {
            ready!(wait.as_mut().poll(cx));
        }
        match this.drivers_done.take() {
            Some((output, _)) => Poll::Ready(output),
            None => panic!("`DrainFuture` polled after completion"),
        }
    }
}

impl<F: Future> fmt::Debug for DrainFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainFuture")
            .field("posted", &self.hold.is_none())
            .finish_non_exhaustive()
    }
}

/// Waits until no driver of the invocation is at work, or until `cap`, then cancels the rest.
async fn drain(invocation: Arc<Invocation>, cap: Option<Instant>) {
    // `until` keeps the cap even when callbacks block every worker thread, which would hold
    // Tokio's timers back.
    if until(cap, invocation.drivers_done()).await.is_some() {
        return;
    }
    let requests = invocation.busy();
    invocation.stop();
    tracing::warn!(
        requests,
        "after callbacks cancelled: the Lambda invocation's deadline is {:?} away",
        DrainLayer::DEADLINE_MARGIN
    );
    // Callbacks that can still react stop at once, each with a warning; stuck ones are left.
    let _ = until(
        Instant::now().checked_add(SETTLE),
        invocation.drivers_done(),
    )
    .await;
}

/// Drains the callbacks of `tasks` when Lambda shuts the execution environment down: wires
/// `lambda_runtime`'s SIGTERM handler to [`AfterTasks::shutdown`] with `grace`, after which
/// the process exits.
///
/// Lambda sends SIGTERM only to a runtime with an extension registered; this registers an
/// internal one that subscribes to no event, which costs no time per invocation. It then leaves
/// the runtime about **500 ms** before it kills the process (300 ms when an external extension
/// is installed too), so keep `grace` well below that: 300 ms is a sound choice.
///
/// With [`DrainLayer`], each invocation has waited for its own work already, so there is
/// usually nothing left when SIGTERM comes. What the drain catches is work registered outside
/// the invocations' hold (tasks spawned by handlers that register later, or requests served
/// outside `lambda_runtime`).
///
/// Call it once, before `Runtime::run`, in the Tokio runtime that serves the invocations: the
/// extension's name is fixed, and a function may register it once. To drain several layers,
/// call `lambda_runtime::spawn_graceful_shutdown_handler` with a closure that shuts each down.
///
/// # Panics
///
/// If the extension cannot be registered with the Runtime API (outside Lambda, where
/// `AWS_LAMBDA_RUNTIME_API` is not set, for one).
#[cfg(unix)]
#[cfg_attr(docsrs, doc(cfg(all(feature = "lambda", unix))))]
pub async fn graceful_shutdown(tasks: AfterTasks, grace: Duration) {
    lambda_runtime::spawn_graceful_shutdown_handler(move || async move {
        // The drain says what it did: at INFO in time, at WARN when its grace ran out.
        tasks.shutdown(grace).await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use http::{Request, Response};
    use http_body_util::Empty;
    use lambda_runtime::{Context, LambdaInvocation};
    use tower::{service_fn, Layer, Service, ServiceExt};

    use super::DrainLayer;
    use crate::test_util::{eventually, settle, Logs};
    use crate::{After, AfterLayer};

    /// An invocation due in `due`.
    fn invocation(due: Duration) -> LambdaInvocation {
        let mut context = Context::default();
        let deadline = SystemTime::now() + due;
        context.deadline = deadline.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let (parts, ()) = Response::new(()).into_parts();
        LambdaInvocation {
            parts,
            body: bytes::Bytes::new(),
            context,
        }
    }

    /// A function serving one request through `layer`, whose handler registers `callback`;
    /// the invocation then ends, or never does when `posts` is false.
    fn function<F>(
        layer: &AfterLayer,
        callback: impl Fn() -> F + Clone + Send + 'static,
        posts: bool,
    ) -> impl Service<LambdaInvocation, Response = (), Error = Infallible, Future: Send>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let app = layer.layer(service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            after.run(callback());
            async { Ok::<_, Infallible>(Response::new(Empty::<bytes::Bytes>::new())) }
        }));
        service_fn(move |_: LambdaInvocation| {
            let app = app.clone();
            async move {
                // `lambda_http` drops the body once it has read it, before the post.
                drop(app.oneshot(Request::new(())).await?);
                if !posts {
                    std::future::pending::<()>().await;
                }
                Ok(())
            }
        })
    }

    #[tokio::test]
    async fn an_abandoned_invocation_still_runs_its_work() {
        let layer = AfterLayer::new();
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let callback = move || {
            let flag = flag.clone();
            async move { flag.store(true, Ordering::SeqCst) }
        };
        let mut service = DrainLayer::new(layer.tasks()).layer(function(&layer, callback, false));
        let mut future = Box::pin(service.call(invocation(Duration::from_secs(60))));
        assert!(futures_util::poll!(future.as_mut()).is_pending());
        settle().await;
        assert!(
            !ran.load(Ordering::SeqCst),
            "ran before the response was posted"
        );
        drop(future);
        eventually("the held callback to run", || ran.load(Ordering::SeqCst)).await;
        assert_eq!(layer.tasks().pending(), 0);
    }

    #[tokio::test]
    async fn a_shutdown_stops_an_invocation_s_work_as_a_shutdown() {
        let logs = Logs::capture();
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let started = Arc::new(AtomicBool::new(false));
        let flag = started.clone();
        let callback = move || {
            let flag = flag.clone();
            async move {
                flag.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        };
        let service = DrainLayer::new(tasks.clone()).layer(function(&layer, callback, true));
        let drain = tokio::spawn(service.oneshot(invocation(Duration::from_secs(600))));
        eventually("the callback to start", || started.load(Ordering::SeqCst)).await;

        let report = tasks.shutdown(Duration::from_millis(50)).await;
        assert_eq!(report.cancelled(), 1);
        drain.await.unwrap().unwrap();
        assert_eq!(tasks.stats().cancelled(), 1);
        let stopped = logs.lines_with("after callback cancelled");
        assert_eq!(stopped.len(), 1, "{}", logs.text());
        assert!(stopped[0].contains("shutdown grace period"), "{stopped:?}");
        assert!(logs.lines_with("invocation's deadline").is_empty());
    }

    struct SetOnDrop(Arc<AtomicBool>);

    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A layer with one callback that never ends: a shutdown's grace runs out on it.
    async fn with_stuck_work() -> AfterLayer {
        let layer = AfterLayer::new();
        let never = function(&layer, std::future::pending::<()>, true);
        never
            .oneshot(invocation(Duration::from_secs(600)))
            .await
            .unwrap();
        layer
    }

    /// A function drained by a `DrainLayer` made from `drain`'s tasks, whose request `inner`
    /// serves with a callback that sleeps for an hour, and that callback's flags: started,
    /// dropped.
    fn sleeping_in_an_invocation(
        drain: &AfterLayer,
        inner: &AfterLayer,
    ) -> (
        Arc<AtomicBool>,
        Arc<AtomicBool>,
        impl Service<LambdaInvocation, Response = (), Error = Infallible, Future: Send>,
    ) {
        let (started, dropped) = (Arc::<AtomicBool>::default(), Arc::<AtomicBool>::default());
        let (on_start, on_drop) = (started.clone(), dropped.clone());
        let sleeper = move || {
            let (started, dropped) = (on_start.clone(), on_drop.clone());
            async move {
                let _dropped = SetOnDrop(dropped);
                started.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        };
        let function = function(inner, sleeper, true);
        let service = DrainLayer::new(drain.tasks()).layer(function);
        (started, dropped, service)
    }

    #[tokio::test]
    async fn an_emulator_s_deadline_in_1970_does_not_cancel_the_work() {
        let layer = AfterLayer::new();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let service = DrainLayer::new(layer.tasks()).layer(function(
            &layer,
            move || {
                let flag = flag.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    flag.store(true, Ordering::SeqCst);
                }
            },
            true,
        ));
        // What `cargo lambda watch` sends: 600,000 ms after the epoch.
        let mut emulated = invocation(Duration::ZERO);
        emulated.context.deadline = 600_000;
        service.oneshot(emulated).await.unwrap();
        assert!(done.load(Ordering::SeqCst), "the drain waited for the work");
        assert_eq!(layer.tasks().stats().timed_out(), 0);
    }

    /// What the callback of [`committing`] did: started listening to `stopping`, saw a deadline,
    /// committed.
    #[derive(Default)]
    struct Commits {
        started: AtomicBool,
        knew_its_deadline: AtomicBool,
        committed: AtomicBool,
    }

    /// A function serving one request through `layer`, whose callback listens to `stopping`
    /// from its start, and commits once told.
    fn committing(
        layer: &AfterLayer,
    ) -> (
        Arc<Commits>,
        impl Service<LambdaInvocation, Response = (), Error = Infallible, Future: Send>,
    ) {
        let commits = Arc::new(Commits::default());
        let seen = commits.clone();
        let app = layer.layer(service_fn(move |request: Request<()>| {
            let seen = seen.clone();
            let after = request.extensions().get::<After>().unwrap().clone();
            after.run_with(move |ctx| async move {
                // Listening from here on: a drain that starts later is heard.
                let stopping = ctx.stopping();
                let knew = ctx.deadline().is_some();
                seen.knew_its_deadline.store(knew, Ordering::SeqCst);
                seen.started.store(true, Ordering::SeqCst);
                stopping.await;
                seen.committed.store(true, Ordering::SeqCst);
            });
            async { Ok::<_, Infallible>(Response::new(Empty::<bytes::Bytes>::new())) }
        }));
        let function = service_fn(move |_: LambdaInvocation| {
            let app = app.clone();
            async move {
                drop(app.oneshot(Request::new(())).await?);
                Ok::<_, Infallible>(())
            }
        });
        (commits, function)
    }

    /// A callback that watches `stopping` is told before the invocation's deadline cuts it, and
    /// commits in time: `DrainLayer`'s cap, not only the budget, counts.
    #[tokio::test]
    async fn a_callback_is_told_to_wrap_up_before_the_invocation_s_deadline() {
        let layer = AfterLayer::new().max_duration(Duration::MAX);
        let (commits, function) = committing(&layer);
        let service = DrainLayer::new(layer.tasks()).layer(function);
        service
            .oneshot(invocation(Duration::from_millis(1_500)))
            .await
            .unwrap();
        assert!(commits.knew_its_deadline.load(Ordering::SeqCst));
        assert!(
            commits.committed.load(Ordering::SeqCst),
            "told before the deadline"
        );
        let stats = layer.tasks().stats();
        assert_eq!((stats.completed(), stats.timed_out()), (1, 0));
    }

    /// A route's own layer inside the invocation: a shutdown of the layer the drain was made for
    /// (SIGTERM's `graceful_shutdown`) stops its work too, so it tells it to wrap up as well.
    #[tokio::test]
    async fn a_drain_of_the_drain_s_layer_tells_another_layer_s_callbacks_to_wrap_up() {
        let outer = AfterLayer::new();
        let inner = AfterLayer::new();
        let (commits, function) = committing(&inner);
        let service = DrainLayer::new(outer.tasks()).layer(function);
        let drain = tokio::spawn(service.oneshot(invocation(Duration::from_secs(600))));
        eventually("the callback to start", || {
            commits.started.load(Ordering::SeqCst)
        })
        .await;

        outer.tasks().shutdown(Duration::from_secs(20)).await;
        eventually("the callback to commit", || {
            commits.committed.load(Ordering::SeqCst)
        })
        .await;
        drain.await.unwrap().unwrap();
        let stats = inner.tasks().stats();
        assert_eq!((stats.completed(), stats.cancelled()), (1, 0));
    }

    #[tokio::test]
    async fn a_second_layer_s_shutdown_stops_its_work_inside_an_invocation() {
        // The drain is made from the outer layer's tasks; a route has a layer of its own.
        let outer = AfterLayer::new();
        let inner = AfterLayer::new();
        let (started, dropped, service) = sleeping_in_an_invocation(&outer, &inner);
        let drain = tokio::spawn(service.oneshot(invocation(Duration::from_secs(600))));
        eventually("the callback to start", || started.load(Ordering::SeqCst)).await;

        let report = inner.tasks().shutdown(Duration::from_millis(50)).await;
        assert_eq!(report.cancelled(), 1);
        eventually("the cancelled callback to be dropped", || {
            dropped.load(Ordering::SeqCst)
        })
        .await;
        drain.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_shutdown_of_the_drain_s_tasks_stops_every_layer_s_work_before_it_starts() {
        let outer = with_stuck_work().await;
        let report = outer.tasks().shutdown(Duration::from_millis(10)).await;
        assert_eq!(report.cancelled(), 1);
        let logs = Logs::capture();
        let inner = AfterLayer::new();
        let (started, _, service) = sleeping_in_an_invocation(&outer, &inner);
        service
            .oneshot(invocation(Duration::from_secs(600)))
            .await
            .unwrap();

        eventually("nothing pending", || inner.tasks().pending() == 0).await;
        assert!(
            !started.load(Ordering::SeqCst),
            "started after the shutdown"
        );
        let stats = inner.tasks().stats();
        assert_eq!((stats.cancelled(), stats.timed_out()), (1, 0), "{stats:?}");
        let stopped = logs.lines_with("after callback cancelled");
        assert_eq!(stopped.len(), 1, "{}", logs.text());
        assert!(stopped[0].contains("shutdown grace period"), "{stopped:?}");
    }

    #[tokio::test]
    async fn a_shutdown_of_the_drain_s_tasks_stops_another_layer_s_running_work() {
        let outer = with_stuck_work().await;
        let inner = AfterLayer::new();
        let (started, dropped, service) = sleeping_in_an_invocation(&outer, &inner);
        let drain = tokio::spawn(service.oneshot(invocation(Duration::from_secs(600))));
        eventually("the callback to start", || started.load(Ordering::SeqCst)).await;

        // Its grace runs out on its own stuck callback: the invocation's work stops too.
        outer.tasks().shutdown(Duration::from_millis(10)).await;
        eventually("the inner layer's callback to be dropped", || {
            dropped.load(Ordering::SeqCst)
        })
        .await;
        drain.await.unwrap().unwrap();
        let stats = inner.tasks().stats();
        assert_eq!((stats.cancelled(), stats.timed_out()), (1, 0), "{stats:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_callback_blocking_the_only_worker_does_not_hold_the_drain_past_its_cap() {
        // Tokio's timers wait for a free worker; the drain's cap must not.
        let layer = AfterLayer::new();
        let callback = || async { std::thread::sleep(Duration::from_millis(2500)) };
        let service = DrainLayer::new(layer.tasks()).layer(function(&layer, callback, true));
        let started = std::time::Instant::now();
        service
            .oneshot(invocation(Duration::from_millis(600)))
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "the drain took {took:?}"
        );
    }
}
