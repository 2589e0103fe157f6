//! What a callback learns about its request: [`AfterContext`], [`Outcome`] and [`Completion`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::RequestSnapshot;

/// A request whose response has finished, as its callbacks see it. Implemented by the request's
/// state in `driver.rs`; a trait here so that this module needs nothing from the driver.
pub(crate) trait Finished: Send + Sync {
    fn request(&self) -> &RequestSnapshot;
    /// Only called once the response has finished.
    fn outcome(&self) -> &Outcome;
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
