//! How one callback runs: type-erased in a single allocation, started once it has a place under
//! the concurrency limit, polled inside its own span with panics caught, and accounted for in the
//! layer's ledger exactly once, however it ends.

use std::any::Any;
use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe, Location};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};
use pin_project_lite::pin_project;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tracing::Span;

use crate::record::snapshot::RequestSnapshot;
use crate::request::context::AfterContext;
use crate::request::scope::Named;
use crate::request::stop::Stop;
use crate::tasks::ledger::Ticket;
use crate::tasks::stats::{Ended, Gauge};
use crate::unwind::drop_caught;

pub(crate) type BoxCallback = Pin<Box<dyn Callback>>;

/// Why a callback failed: the error it returned, to log and count.
pub(crate) type Failure = Box<dyn Error + Send + Sync>;

/// What a callback may return: `()`, or `Result<(), E>` with an error that converts into
/// `Box<dyn Error + Send + Sync>` (any `std` error that is `Send + Sync`, such as
/// `std::io::Error`; `anyhow::Error`; `Box<dyn Error + Send + Sync>`; a `String` or a
/// `&'static str`), so that `?` works inside it.
///
/// A callback that returns `Err` is logged at `ERROR` inside its span, naming the error and every
/// cause beneath it (`outer: cause: root`, from `std`'s `source()`, which also carries an
/// `anyhow` context chain), and counted as [`failed`](crate::AfterStats::failed): apart from
/// those that completed, and from those that panicked.
///
/// An async block that never returns (it ends in `panic!`, or is an endless `loop`) has the
/// type `!`, which is neither: move its body into an `async fn` that returns `()`.
///
/// ```
/// # async fn save(_: &str) -> std::io::Result<()> { Ok(()) }
/// # fn example(later: tower_after::After) {
/// later.run_with(|ctx| async move {
///     save(ctx.request().path()).await?; // logged and counted as failed if it fails
///     Ok::<_, std::io::Error>(())
/// });
/// # }
/// ```
#[diagnostic::on_unimplemented(
    message = "a callback must return `()` or `Result<(), E>` with an error `E` that converts \
               into `Box<dyn Error + Send + Sync>`, not `{Self}`",
    label = "returned here",
    note = "return `Ok(())` at the end of an `async move` block that uses `?`, and name the \
            error type if it cannot be inferred: `Ok::<_, MyError>(())`"
)]
pub trait AfterOutput: sealed::Output + Send + 'static {}

impl<T: sealed::Output + Send + 'static> AfterOutput for T {}

// The sealed-trait idiom: `Output` is public, so that it can bound a public trait, in a module
// no other crate can name.
#[allow(unreachable_pub)]
pub(crate) mod sealed {
    use super::Failure;

    /// The crate's side of [`AfterOutput`](super::AfterOutput): not for implementing elsewhere.
    pub trait Output {
        /// The failure to log and count, if the callback failed.
        fn into_failure(self) -> Option<Failure>;
    }

    impl Output for () {
        fn into_failure(self) -> Option<Failure> {
            None
        }
    }

    impl<E> Output for Result<(), E>
    where
        E: Into<Failure> + Send + 'static,
    {
        fn into_failure(self) -> Option<Failure> {
            self.err().map(Into::into)
        }
    }
}
type BoxAcquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// An async callback, type-erased: a plain future, or a `run_with` closure that becomes its
/// future in place when it starts.
pub(crate) trait Callback: Send {
    /// Polls the callback; a `run_with` closure is first called with `ctx`, so that a context is
    /// only ever made for the callbacks that read one. `Err`: it returned an error.
    fn poll_run(self: Pin<&mut Self>, ctx: &AfterContext, cx: &mut Context<'_>) -> Poll<RunResult>;
}

/// How a callback's run ended, when it did not panic.
pub(crate) type RunResult = Result<(), Failure>;

impl Callback for BoxCallback {
    fn poll_run(self: Pin<&mut Self>, ctx: &AfterContext, cx: &mut Context<'_>) -> Poll<RunResult> {
        self.get_mut().as_mut().poll_run(ctx, cx)
    }
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

impl<F> Callback for Plain<F>
where
    F: Future + Send,
    F::Output: AfterOutput,
{
    fn poll_run(
        self: Pin<&mut Self>,
        _ctx: &AfterContext,
        cx: &mut Context<'_>,
    ) -> Poll<RunResult> {
        self.project().future.poll(cx).map(finished)
    }
}

/// A callback's output, as a run's outcome.
pub(crate) fn finished(output: impl AfterOutput) -> RunResult {
    output.into_failure().map_or(Ok(()), Err)
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
    F: Future + Send,
    F::Output: AfterOutput,
{
    fn poll_run(
        mut self: Pin<&mut Self>,
        ctx: &AfterContext,
        cx: &mut Context<'_>,
    ) -> Poll<RunResult> {
        loop {
            match self.as_mut().project() {
                WithContextProjection::Start { callback } => {
                    let Some(callback) = callback.take() else {
                        return Poll::Ready(Ok(()));
                    };
                    let future = callback(ctx.clone());
                    self.set(Self::Run { future });
                }
                WithContextProjection::Run { future } => return future.poll(cx).map(finished),
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
        drop_quietly(|| drop(callback), request, name.as_deref());
        ticket.close(how);
    }
}

impl Named for Job {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

pin_project! {
    /// One callback started by its driver: waiting for a place under the concurrency limit,
    /// then running inside its span, with panics caught. Counted in the `queued` or `running`
    /// gauge while it lives, and in the ledger once it ends, stops, or is dropped.
    ///
    /// Generic so that a request's first callback lives inline in its driver's task; the
    /// others are boxed (`Running<BoxCallback>`).
    pub(crate) struct Running<C> {
        // `None` once it ended.
        #[pin]
        callback: Option<C>,
        span: Span,
        name: Option<Cow<'static, str>>,
        ticket: Ticket,
        ctx: AfterContext,
        // Where it stands under the limit, and so in which gauge it counts.
        place: Place,
    }

    impl<C> PinnedDrop for Running<C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            leave(this.place, this.ticket);
            // Dropped before its end (the runtime is shutting down): counted as cancelled.
            end(this.callback, this.ticket, this.ctx, this.name, Ended::Cancelled);
        }
    }
}

impl Running<BoxCallback> {
    /// A queued job, started.
    pub(crate) fn from_job(job: Job, ctx: AfterContext, limit: Option<&Arc<Semaphore>>) -> Self {
        let Job {
            callback,
            span,
            name,
            ticket,
        } = job;
        let mut running = Self::new(callback, span, name, ticket, ctx);
        Pin::new(&mut running).start(limit);
        running
    }
}

impl<C: Callback> Running<C> {
    /// A callback that its driver has yet to start.
    pub(crate) fn new(
        callback: C,
        span: Span,
        name: Option<Cow<'static, str>>,
        ticket: Ticket,
        ctx: AfterContext,
    ) -> Self {
        Self {
            callback: Some(callback),
            span,
            name,
            ticket,
            ctx,
            place: Place::NotStarted,
        }
    }

    /// Lets it run from now on: it waits for a place under `limit`, if any, then runs.
    pub(crate) fn start(self: Pin<&mut Self>, limit: Option<&Arc<Semaphore>>) {
        let this = self.project();
        if let Place::NotStarted = this.place {
            *this.place = match limit {
                Some(limit) => Place::Waiting(Box::pin(limit.clone().acquire_owned())),
                None => Place::Running { _permit: None },
            };
            if let Some(gauge) = this.place.gauge() {
                this.ticket.ledger().gauge(gauge, true);
            }
        }
    }

    /// Stops the callback before its end. Its driver, or whoever stopped it, says so once for
    /// all it stopped; the details go to `DEBUG`, in its span.
    pub(crate) fn stop(self: Pin<&mut Self>, why: Stop) {
        let this = self.project();
        let _entered = this.span.enter();
        let request = this.ctx.request();
        tracing::debug!(
            method = %request.method(),
            path = request.path(),
            name = this.name.as_deref(),
            "after callback cancelled: {why}"
        );
        leave(this.place, this.ticket);
        end(this.callback, this.ticket, this.ctx, this.name, why.ended());
    }
}

/// Where a callback stands under the concurrency limit.
enum Place {
    /// Its driver has not started it yet: counted in no gauge.
    NotStarted,
    /// Waiting for a place: counted as queued.
    Waiting(BoxAcquire),
    /// Running, in its place if there is a limit (given back when dropped): counted as
    /// running.
    Running {
        _permit: Option<OwnedSemaphorePermit>,
    },
    /// Ended: out of the gauges, its place given back.
    Left,
}

impl Place {
    fn gauge(&self) -> Option<Gauge> {
        match self {
            Self::Waiting(_) => Some(Gauge::Queued),
            Self::Running { .. } => Some(Gauge::Running),
            Self::NotStarted | Self::Left => None,
        }
    }
}

/// Takes a callback out of its gauge and gives its place back: before its ticket closes, so that
/// whoever sees nothing pending sees the gauges at zero too.
fn leave(place: &mut Place, ticket: &Ticket) {
    if let Some(gauge) = std::mem::replace(place, Place::Left).gauge() {
        ticket.ledger().gauge(gauge, false);
    }
}

/// Drops the callback in place, if it has not ended, and accounts for it as `how`.
fn end<C>(
    mut callback: Pin<&mut Option<C>>,
    ticket: &mut Ticket,
    ctx: &AfterContext,
    name: &Option<Cow<'static, str>>,
    how: Ended,
) {
    if callback.is_some() {
        drop_quietly(|| callback.set(None), ctx.request(), name.as_deref());
    }
    ticket.close(how);
}

impl<C: Callback> Future for Running<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if let Place::Waiting(acquire) = this.place {
            let Poll::Ready(permit) = acquire.as_mut().poll(cx) else {
                return Poll::Pending;
            };
            // The semaphore is never closed, so this is always a permit.
            *this.place = Place::Running {
                _permit: permit.ok(),
            };
            let ledger = this.ticket.ledger();
            ledger.gauge(Gauge::Queued, false);
            ledger.gauge(Gauge::Running, true);
        }
        let Some(callback) = this.callback.as_mut().as_pin_mut() else {
            return Poll::Ready(());
        };
        let entered = this.span.enter();
        let ctx = &*this.ctx;
        let polled = catch_unwind(AssertUnwindSafe(|| callback.poll_run(ctx, cx)));
        let how = match polled {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(Ok(()))) => Ended::Completed,
            Ok(Poll::Ready(Err(failure))) => {
                log_failure(this.ctx.request(), this.name.as_deref(), failure);
                Ended::Failed
            }
            Err(panic) => {
                log_panic(this.ctx.request(), this.name.as_deref(), panic);
                Ended::Panicked
            }
        };
        drop(entered);
        leave(this.place, this.ticket);
        end(this.callback, this.ticket, this.ctx, this.name, how);
        Poll::Ready(())
    }
}

/// The callbacks a driver took from its request's queue, beyond the one it was spawned with:
/// rarer, so the `FuturesUnordered` that polls them concurrently is only made when needed. It
/// polls new ones in the order they were pushed, which keeps the registration order.
#[derive(Default)]
pub(crate) struct Callbacks(Option<Box<FuturesUnordered<Running<BoxCallback>>>>);

impl Callbacks {
    pub(crate) fn push(&mut self, running: Running<BoxCallback>) {
        self.0.get_or_insert_default().push(running);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Polls until a callback ends: `None` when none is left, or pending.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<()>> {
        match &mut self.0 {
            Some(running) => running.poll_next_unpin(cx),
            None => Poll::Ready(None),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |running| running.len())
    }

    /// Stops every callback still running.
    pub(crate) fn stop(&mut self, why: Stop) {
        for mut running in self.0.take().map(|running| *running).unwrap_or_default() {
            Pin::new(&mut running).stop(why);
        }
    }
}

/// Logs the error a callback returned, in its span, then drops it; both are user code, whose
/// panics are caught and logged too.
fn log_failure(request: &RequestSnapshot, name: Option<&str>, failure: Failure) {
    drop_quietly(
        || {
            tracing::error!(
                method = %request.method(),
                path = request.path(),
                request_id = request.request_id(),
                name,
                error = %Causes(&*failure),
                "after callback failed"
            );
            drop(failure);
        },
        request,
        name,
    );
}

/// An error and its causes, outermost first, as `outer: cause: root`: `std`'s `source()` chain,
/// which is also how `anyhow` exposes its contexts.
struct Causes<'a>(&'a (dyn Error + 'static));

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        // Bounded, for a chain that loops back on itself.
        for _ in 0..32 {
            let Some(error) = cause else { break };
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

/// Drops a user's callback with `drop`, catching and logging a panic in its `Drop`.
fn drop_quietly(drop: impl FnOnce(), request: &RequestSnapshot, name: Option<&str>) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(drop)) {
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
        request_id = request.request_id(),
        name,
        panic = message,
        "after callback panicked"
    );
    // A payload whose own `Drop` panics would escape here, through the driver.
    drop_caught(panic);
}

/// The span a callback runs in: its own, with no parent, so that a pending callback never keeps
/// the request's span open. It *follows from* the span current where it was registered (a link,
/// in OpenTelemetry's terms), and names the request, so its lines can be traced back to it.
/// Created only if a subscriber is interested in it: without one, even a disabled span costs
/// hundreds of instructions (tracing's `log` fallback, the link, its drop), for every callback.
pub(crate) fn callback_span(
    request: &RequestSnapshot,
    name: Option<&str>,
    site: Option<&'static Location<'static>>,
) -> Span {
    if !tracing::level_enabled!(tracing::Level::INFO) {
        return Span::none();
    }
    let span = tracing::info_span!(
        parent: None,
        "after",
        method = %request.method(),
        path = request.path(),
        request_id = request.request_id(),
        name,
        site = site.map(tracing::field::display),
    );
    span.follows_from(Span::current());
    span
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use http::{Request, Response};
    use http_body_util::{BodyExt, Empty};
    use tokio::sync::oneshot;
    use tower::{service_fn, Layer, ServiceExt};

    use crate::test_util::{drained, eventually, fail, serve, Logs};
    use crate::{After, AfterLayer};

    type Body = Empty<bytes::Bytes>;

    #[tokio::test]
    async fn a_panicking_callback_is_logged_and_the_others_still_run() {
        let logs = Logs::capture();
        let layer = AfterLayer::new();
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        serve(&layer, move |after| {
            let before = counter.clone();
            after.run(async move {
                before.fetch_add(1, Ordering::SeqCst);
            });
            after.run_with(|_| async { fail("callback bug") });
            after.run(async { fail("a second bug") });
            after.run(async move {
                counter.fetch_add(1, Ordering::SeqCst);
            });
        })
        .await;
        drained(&layer.tasks()).await;
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        let errors = logs.lines_with("after callback panicked");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("ERROR"), "{errors:?}");
        assert!(errors[0].contains("method=GET"), "{errors:?}");
        assert!(errors[0].contains("path=\"/orders/7\""), "{errors:?}");
        assert!(errors[0].contains("callback bug"), "{errors:?}");
    }

    /// An error wrapping another, as HTTP clients' errors wrap the I/O error beneath.
    #[derive(Debug)]
    struct Sending(std::io::Error);

    impl std::fmt::Display for Sending {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("error sending request for url (http://127.0.0.1:3930/hook)")
        }
    }

    impl std::error::Error for Sending {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[tokio::test]
    async fn a_failure_is_logged_with_every_cause_in_its_chain() {
        let logs = Logs::capture();
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        serve(&layer, |after| {
            after.run(async {
                let refused = std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "connection refused",
                );
                Err::<(), _>(std::io::Error::other(Sending(refused)))
            });
            after.run(async {
                use anyhow::Context;
                Err::<(), _>(anyhow::anyhow!("the disk is full"))
                    .context("writing the audit row")
                    .context("auditing order 7")
            });
            after.run(async {
                Err::<(), Box<dyn std::error::Error + Send + Sync>>(Box::new(Sending(
                    std::io::Error::other("timed out"),
                )))
            });
        })
        .await;
        drained(&tasks).await;
        assert_eq!(tasks.stats().failed(), 3);
        let failures = logs.lines_with("after callback failed");
        for chain in [
            "error sending request for url (http://127.0.0.1:3930/hook): connection refused",
            "auditing order 7: writing the audit row: the disk is full",
            "error sending request for url (http://127.0.0.1:3930/hook): timed out",
        ] {
            assert!(
                failures.iter().any(|line| line.contains(chain)),
                "{chain}: {failures:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_callback_that_returns_an_error_is_logged_and_counted_as_failed() {
        let logs = Logs::capture();
        let layer = AfterLayer::new().after_each(|ctx| async move {
            // A hook can fail too, and `?` works in it.
            let path = ctx.request().path().to_owned();
            std::fs::metadata(format!("/nonexistent/{path}"))?;
            Ok::<_, std::io::Error>(())
        });
        let tasks = layer.tasks();
        serve(&layer, |after| {
            after.run(async { Err::<(), _>("the audit table is locked") });
            after.run_with(|_| async {
                let count: u32 = "not a number".parse()?;
                let _ = count;
                Ok::<_, std::num::ParseIntError>(())
            });
            after.wait_until(async { Ok::<_, String>(()) });
            after.run_blocking(|_| Err::<(), _>(String::from("the disk is full")));
            after.run(async { fail("a panic is not a failure") });
        })
        .await;
        drained(&tasks).await;
        let stats = tasks.stats();
        assert_eq!(
            (stats.completed(), stats.failed(), stats.panicked()),
            (1, 4, 1),
            "{stats:?}"
        );
        let failures = logs.lines_with("after callback failed");
        assert_eq!(failures.len(), 4, "{}", logs.text());
        assert!(failures.iter().all(|line| line.contains("ERROR")));
        for error in [
            "the audit table is locked",
            "invalid digit found in string",
            "the disk is full",
            "No such file or directory",
        ] {
            assert!(
                failures.iter().any(|line| line.contains(error)),
                "{error}: {failures:?}"
            );
        }
        assert!(failures[0].contains("path=\"/orders/7\""), "{failures:?}");
    }

    #[derive(Clone, Default)]
    struct Spans(Arc<Mutex<SpanLog>>);

    #[derive(Default)]
    struct SpanLog {
        roots: Vec<&'static str>,
        follows: Vec<(&'static str, &'static str)>,
        closed: Vec<&'static str>,
        events: Vec<(String, Option<&'static str>)>,
    }

    impl<S> tracing_subscriber::Layer<S> for Spans
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _id: &tracing::span::Id,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if attrs.is_root() {
                self.0.lock().unwrap().roots.push(attrs.metadata().name());
            }
        }

        fn on_follows_from(
            &self,
            span: &tracing::span::Id,
            follows: &tracing::span::Id,
            ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let name = |id| ctx.span(id).map_or("?", |span| span.name());
            let pair = (name(span), name(follows));
            self.0.lock().unwrap().follows.push(pair);
        }

        fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
            let name = ctx.span(&id).map_or("?", |span| span.name());
            self.0.lock().unwrap().closed.push(name);
        }

        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let span = ctx.event_span(event).map(|span| span.name());
            let message = format!("{:?}", event.metadata().fields());
            self.0.lock().unwrap().events.push((message, span));
        }
    }

    #[tokio::test]
    async fn a_pending_callback_does_not_hold_the_request_span_open() {
        use tracing::Instrument;
        use tracing_subscriber::layer::SubscriberExt;

        let spans = Spans::default();
        crate::test_util::ask_every_subscriber();
        let _guard =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let (release, released) = oneshot::channel::<()>();
        let released = Mutex::new(Some(released));
        let service = layer.layer(service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            let released = released.lock().unwrap().take().unwrap();
            // As `TraceLayer` would: the request's span covers the handler.
            let span = tracing::info_span!("request");
            span.in_scope(|| {
                after.run(async move {
                    released.await.unwrap();
                    tracing::info!("audit written");
                })
            });
            async { Ok::<_, Infallible>(Response::new(Body::new())) }.instrument(span)
        }));
        let response = service.oneshot(Request::new(())).await.unwrap();
        response.into_body().collect().await.unwrap();

        // The request's span closed with its response, while its callback still waits.
        eventually("the request span to close", || {
            spans.0.lock().unwrap().closed.contains(&"request")
        })
        .await;
        assert_eq!(tasks.pending(), 1);
        release.send(()).unwrap();
        drained(&tasks).await;

        let log = spans.0.lock().unwrap();
        // The callback ran in its own root span, linked to the request's.
        assert!(log.roots.contains(&"after"), "{:?}", log.roots);
        assert_eq!(log.follows, [("after", "request")]);
        let audit = log.events.iter().find(|(_, span)| *span == Some("after"));
        assert!(audit.is_some(), "{:?}", log.events);
        assert_eq!(log.closed, ["request", "after"]);
    }

    /// Panics when dropped: user code the layer must survive.
    struct PanicOnDrop;

    impl Drop for PanicOnDrop {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                panic!("a user Drop that panics");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_drop_during_cancellation_is_still_counted() {
        let logs = Logs::capture();
        let layer = AfterLayer::new().max_duration(Duration::from_secs(1));
        let tasks = layer.tasks();
        serve(&layer, |after| {
            after.run(async {
                let _guard = PanicOnDrop;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        })
        .await;
        drained(&tasks).await;
        assert_eq!(tasks.stats().timed_out(), 1);
        assert_eq!(logs.lines_with("a user Drop that panics").len(), 1);
    }
}
