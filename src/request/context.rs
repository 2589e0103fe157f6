//! What a callback learns about its request: [`AfterContext`], a view on the request's state
//! once its response finished: the snapshot taken when it entered the layer, the outcome of its
//! response, its deadline, and what the handler left for it.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use crate::record::outcome::Outcome;
use crate::record::snapshot::RequestSnapshot;
use crate::request::Inflight;

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
    request: Arc<Inflight>,
}

impl AfterContext {
    /// Made by the driver only once the response has finished.
    pub(crate) fn new(request: Arc<Inflight>) -> Self {
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
        &self.request.snapshot
    }

    /// How the response ended: status, [`Completion`](crate::Completion), bytes sent and time taken.
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
    /// [`Duration::MAX`](std::time::Duration::MAX) with no such deadline.
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
        self.request.end_of_work_std()
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
        self.request.data.get()
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
