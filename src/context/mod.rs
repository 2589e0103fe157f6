//! What a callback learns about its request: [`AfterContext`], [`Outcome`] and [`Completion`].

pub(crate) mod snapshot;

use std::any::{Any, TypeId};
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::RequestSnapshot;

/// A request whose response has finished, as its callbacks see it. Implemented by the request's
/// state in `driver.rs`; a trait here so that this module needs nothing from the driver.
pub(crate) trait Finished: Send + Sync {
    fn request(&self) -> &RequestSnapshot;
    /// Only called once the response has finished.
    fn outcome(&self) -> &Outcome;
    /// When the request's budget runs out, if it has one.
    fn deadline(&self) -> Option<Instant>;
    /// Resolves when its callbacks should wrap up: see [`AfterContext::stopping`].
    fn stopping(&self) -> Pin<Box<dyn Future<Output = ()> + Send>>;
    /// What the handler left for its callbacks: see [`AfterContext::get`].
    fn data(&self) -> &Data;
}

/// Typed values that a request's handler leaves for its callbacks and its `after_each` hook
/// ([`After::insert`](crate::After::insert), [`AfterContext::get`]): one per type, like
/// `http::Extensions`. Values are shared, not cloned, so no user code runs under the lock.
#[derive(Default)]
pub(crate) struct Data {
    /// Made on the first `insert`, boxed: most requests leave nothing, and this is in every
    /// request's state. Whether it was made is read on every request's end, without a lock.
    values: OnceLock<Box<Mutex<Values>>>,
}

/// One value per type, in insertion order: a request leaves a handful at most.
#[derive(Default)]
struct Values(Vec<(TypeId, Value)>);

type Value = Arc<dyn Any + Send + Sync>;

impl Data {
    fn values(&self) -> Option<MutexGuard<'_, Values>> {
        let values = self.values.get()?;
        Some(values.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Stores `value`, and hands back the value of its type it replaces.
    pub(crate) fn insert<T: Any + Send + Sync>(&self, value: T) -> Option<Arc<T>> {
        let value: Value = Arc::new(value);
        let replaced = {
            let values = self.values.get_or_init(Box::default);
            let mut values = values.lock().unwrap_or_else(PoisonError::into_inner);
            match values.0.iter_mut().find(|(id, _)| *id == TypeId::of::<T>()) {
                Some((_, slot)) => Some(std::mem::replace(slot, value)),
                None => {
                    values.0.push((TypeId::of::<T>(), value));
                    None
                }
            }
        };
        // Dropped (if last) outside the lock: a `Drop` may call back into the crate.
        replaced.and_then(|value| value.downcast().ok())
    }

    /// Whether a value was ever left; cheap.
    pub(crate) fn is_used(&self) -> bool {
        self.values.get().is_some()
    }

    /// Lets go of every value, outside the lock; a panic in a value's `Drop` is caught.
    pub(crate) fn clear(&self) {
        let Some(values) = self.values().map(|mut values| std::mem::take(&mut *values)) else {
            return;
        };
        drop_caught(values);
    }

    pub(crate) fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let value = {
            let values = self.values()?;
            let (_, value) = values.0.iter().find(|(id, _)| *id == TypeId::of::<T>())?;
            value.clone()
        };
        value.downcast().ok()
    }
}

/// Drops `value` without unwinding: runs where a panic must not escape (a `Drop`, a driver, a
/// response's `poll`). A panic in its `Drop` is caught, and so is one in the `Drop` of that
/// panic's payload; what the second one threw is leaked.
pub(crate) fn drop_caught<T>(value: T) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(value))) {
        if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
            #[allow(clippy::mem_forget)]
            std::mem::forget(again);
        }
    }
}

/// What a [`run_with`](crate::After::run_with) callback receives: the request as it arrived and
/// how its response ended.
///
/// It holds only the snapshot and the outcome, never the response or its body, so a callback that
/// is still running does not keep the response's buffers alive.
///
/// ```
/// use tower_after::{After, AfterContext};
///
/// async fn audit(ctx: AfterContext) {
///     let request = ctx.request();
///     println!("{} {} -> {:?}", request.method(), request.uri(), ctx.outcome().status());
/// }
///
/// async fn handler(later: After) -> &'static str {
///     later.run_with(audit);
///     "ok"
/// }
/// ```
#[derive(Clone)]
pub struct AfterContext {
    request: Arc<dyn Finished>,
}

impl AfterContext {
    /// Made by the driver only once the response has finished.
    pub(crate) fn new(request: Arc<dyn Finished>) -> Self {
        Self { request }
    }

    /// The request as it was when it entered [`AfterLayer`](crate::AfterLayer): method, URI,
    /// version, headers and cookies.
    ///
    /// ```
    /// # use tower_after::AfterContext;
    /// async fn log(ctx: AfterContext) {
    ///     let session = ctx.request().cookie("session-id").unwrap_or("anonymous");
    ///     println!("{} {} by {session}", ctx.request().method(), ctx.request().uri());
    /// }
    /// ```
    #[must_use]
    pub fn request(&self) -> &RequestSnapshot {
        self.request.request()
    }

    /// How the response ended: status, [`Completion`], bytes sent and time taken.
    ///
    /// ```
    /// # use tower_after::{AfterContext, Completion};
    /// async fn log(ctx: AfterContext) {
    ///     let outcome = ctx.outcome();
    ///     if outcome.completion() != Completion::Complete {
    ///         println!("{:?} after {:?}", outcome.completion(), outcome.elapsed());
    ///     }
    /// }
    /// ```
    #[must_use]
    pub fn outcome(&self) -> &Outcome {
        self.request.outcome()
    }

    /// When this request's budget runs out and what still runs of its callbacks is dropped:
    /// the end of its response plus its max duration ([`AfterLayer::max_duration`] or
    /// [`MaxDuration`](crate::MaxDuration)), or, on AWS Lambda, its invocation's deadline less
    /// `lambda::DrainLayer`'s margin, if that comes first. `None` for a budget of
    /// [`Duration::MAX`] with no such deadline.
    ///
    /// A shutdown can stop callbacks earlier, at the end of its grace period:
    /// [`AfterContext::stopping`] tells when that starts.
    ///
    /// [`AfterLayer::max_duration`]: crate::AfterLayer::max_duration
    ///
    /// ```
    /// # use tower_after::AfterContext;
    /// async fn export(ctx: AfterContext) {
    ///     let left = ctx.deadline().map(|deadline| deadline.saturating_duration_since(std::time::Instant::now()));
    ///     println!("{left:?} left to export");
    /// }
    /// ```
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        self.request.deadline()
    }

    /// Resolves when this callback should wrap up, before it is dropped: as soon as a shutdown
    /// of its layer starts ([`AfterTasks::shutdown`](crate::AfterTasks::shutdown), or
    /// `lambda::graceful_shutdown` on SIGTERM), or when its [`deadline`](AfterContext::deadline)
    /// nears: a tenth of the time it had from the end of the response, at most one second,
    /// before it. Pending forever without either. Called while a shutdown drains, it is ready
    /// at once; a drain that ended within its grace leaves later callbacks untold, as it leaves
    /// the layer working as before.
    ///
    /// A callback is dropped, at its next `.await`, when its budget or a shutdown's grace runs
    /// out; it gets no other warning. One that batches, streams or holds a transaction can
    /// watch this future and flush or commit in time, as ASP.NET's `RequestAborted` or a
    /// `CancellationToken` lets it. It is the callback's choice: one that ignores it is stopped
    /// as before. Only callbacks that call it pay for it (one allocation and, with a budget, a
    /// timer).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_after::AfterContext;
    ///
    /// # struct Batch;
    /// # impl Batch { fn push(&mut self, _: u32) {} async fn commit(self) {} }
    /// # async fn next_row() -> u32 { tokio::time::sleep(Duration::from_millis(10)).await; 1 }
    /// async fn import(ctx: AfterContext, mut batch: Batch) {
    ///     let mut stopping = ctx.stopping();
    ///     for _ in 0..10_000 {
    ///         tokio::select! {
    ///             _ = &mut stopping => break, // commit what we have while we can
    ///             row = next_row() => batch.push(row),
    ///         }
    ///     }
    ///     batch.commit().await;
    /// }
    /// ```
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + Unpin + 'static {
        self.request.stopping()
    }

    /// The value of type `T` that the request's handler left with
    /// [`After::insert`](crate::After::insert), if it left one: typed data from the handler to
    /// its callbacks and to the [`after_each`](crate::AfterLayer::after_each) hook, such as the
    /// user id an access log wants, which the request's headers do not tell.
    ///
    /// ```
    /// use tower_after::{AfterContext, AfterLayer};
    ///
    /// #[derive(Debug)]
    /// struct UserId(u64);
    ///
    /// let layer = AfterLayer::new().after_each(|ctx: AfterContext| async move {
    ///     let user = ctx.get::<UserId>().map(|user| user.0);
    ///     tracing::info!(path = ctx.request().path(), user, "served");
    /// });
    /// ```
    #[must_use]
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.request.data().get()
    }
}

impl fmt::Debug for AfterContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AfterContext")
            .field("request", self.request())
            .field("outcome", self.outcome())
            .finish()
    }
}

/// How a response ended, as seen by the layer.
///
/// ```
/// use tower_after::{AfterContext, Completion};
///
/// async fn record(ctx: AfterContext) {
///     let outcome = ctx.outcome();
///     let status = outcome.status().map_or(0, |status| status.as_u16());
///     let waited = outcome.finished_at().elapsed();
///     println!(
///         "status {status}, {:?}, {} bytes in {:?}, callback started {waited:?} after the end",
///         outcome.completion(),
///         outcome.body_bytes(),
///         outcome.elapsed(),
///     );
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub(crate) status: Option<StatusCode>,
    pub(crate) completion: Completion,
    pub(crate) body_bytes: u64,
    pub(crate) elapsed: Duration,
    pub(crate) finished_at: Instant,
}

impl Outcome {
    /// The response's status, or `None` when no response was produced: the inner service failed
    /// or panicked, or the client left while the handler was still running.
    #[must_use]
    pub fn status(&self) -> Option<StatusCode> {
        self.status
    }

    /// How the response ended.
    #[must_use]
    pub fn completion(&self) -> Completion {
        self.completion
    }

    /// The number of body bytes handed to the server for sending.
    ///
    /// Content encoding applied *outside* `AfterLayer` (a compression layer wrapping it) is not
    /// reflected; one applied inside is.
    #[must_use]
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// Time from the request entering the layer to the end of its response.
    #[must_use]
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// When the response finished, which is when its callbacks were handed to the runtime.
    ///
    /// `finished_at().elapsed()` in a callback is how long it waited to start.
    #[must_use]
    pub fn finished_at(&self) -> Instant {
        self.finished_at
    }
}

/// How a response ended.
///
/// ```
/// use tower_after::{AfterContext, Completion};
///
/// async fn record(ctx: AfterContext) {
///     match ctx.outcome().completion() {
///         Completion::Complete => {}
///         Completion::Aborted => println!("the client left"),
///         other => println!("the response failed: {other:?}"),
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Completion {
    /// The body was sent to its end (for a `HEAD` request, a `204` or a `304`: the response was
    /// sent, since it has no body).
    Complete,
    /// The body yielded an error part-way; the server cut the response short.
    BodyError,
    /// The response was dropped before its end: the client went away mid-body, or before the
    /// handler had produced a response at all.
    Aborted,
    /// No response was produced: the inner service returned an error or panicked.
    Failed,
}

impl Completion {
    /// A stable, lowercase name for storing or logging: `"complete"`, `"body_error"`,
    /// `"aborted"` or `"failed"`. [`Display`](fmt::Display) writes the same.
    ///
    /// ```
    /// use tower_after::Completion;
    ///
    /// assert_eq!(Completion::Aborted.as_str(), "aborted");
    /// assert_eq!(Completion::BodyError.to_string(), "body_error");
    /// ```
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::BodyError => "body_error",
            Self::Aborted => "aborted",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
