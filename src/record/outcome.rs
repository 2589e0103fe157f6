//! How a response ended: [`Outcome`] and [`Completion`].

use std::fmt;
use std::time::{Duration, Instant};

use http::StatusCode;

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
