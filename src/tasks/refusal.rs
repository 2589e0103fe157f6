//! Refused work: why a layer refuses a callback, and the words that say so, in the log and in the
//! [`Overloaded`] error that hands the work back.

use std::fmt;

/// Why new work was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The layer holds its maximum of pending callbacks: counted as shed.
    Overloaded,
    /// Pending work holds the layer's maximum of snapshot bytes: counted as shed.
    HeldBytes,
    /// The layer was shut down: not counted, the shutdown's report is final.
    ShutDown,
}

/// A refused registration, with the warning to log when one is due.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) why: Refusal,
    /// `Some(refused since the last warning)` when a warning is due now.
    pub(crate) warn: Option<u64>,
}

/// Why [`After::try_run`](crate::After::try_run) or [`After::try_run_with`](crate::After::try_run_with)
/// refused work, with the work itself: the layer already holds its [maximum of pending
/// callbacks](crate::AfterLayer::max_pending) or [of snapshot bytes](crate::AfterLayer::max_held_bytes),
/// or it was shut down and takes no more work.
///
/// ```
/// # async fn example(later: tower_after::After) {
/// let receipt = async { /* send the receipt */ };
/// if let Err(refused) = later.try_run(receipt) {
///     eprintln!("{refused}"); // names the limit and how to raise it
///     refused.into_work().await; // do it now instead
/// }
/// # }
/// ```
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Overloaded<W = ()> {
    why: Refusal,
    max_pending: usize,
    max_held_bytes: usize,
    work: W,
}

impl Overloaded {
    pub(crate) fn new(why: Refusal, max_pending: usize, max_held_bytes: usize) -> Self {
        Self {
            why,
            max_pending,
            max_held_bytes,
            work: (),
        }
    }
}

impl<W> Overloaded<W> {
    /// The same refusal, carrying `work` instead.
    pub(crate) fn with_work<V>(self, work: V) -> Overloaded<V> {
        Overloaded {
            why: self.why,
            max_pending: self.max_pending,
            max_held_bytes: self.max_held_bytes,
            work,
        }
    }

    /// The layer's maximum of pending callbacks.
    #[must_use]
    pub fn max_pending(&self) -> usize {
        self.max_pending
    }

    /// Whether the work was refused because a shutdown of the layer had written off its work
    /// (its grace ran out), rather than because the layer was full.
    #[must_use]
    pub fn is_shut_down(&self) -> bool {
        self.why == Refusal::ShutDown
    }

    /// The work that was refused, unregistered and never polled: run it now, store it, or drop
    /// it.
    #[must_use]
    pub fn into_work(self) -> W {
        self.work
    }

    /// The refusal alone, its work dropped: for `?` into an error type that takes only
    /// `Send + Sync + 'static` errors (`Box<dyn Error + Send + Sync>`, `anyhow::Error`), which
    /// a refusal carrying a future usually is not, since most futures are not `Sync`.
    ///
    /// ```
    /// use tower_after::{After, Overloaded};
    ///
    /// fn schedule(later: &After) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    ///     later
    ///         .try_run(async { /* send the receipt */ })
    ///         .map_err(Overloaded::without_work)?;
    ///     Ok(())
    /// }
    /// ```
    #[must_use]
    pub fn without_work(self) -> Overloaded {
        self.with_work(())
    }
}

impl<W> fmt::Debug for Overloaded<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Overloaded")
            .field("why", &self.why)
            .field("max_pending", &self.max_pending)
            .field("max_held_bytes", &self.max_held_bytes)
            .finish_non_exhaustive()
    }
}

impl<W> Overloaded<W> {
    /// Why the work was refused, and what to change: the one wording of each refusal, for this
    /// error and for the layer's warning.
    pub(crate) fn cause(&self) -> impl fmt::Display + '_ {
        struct Cause<'a, W>(&'a Overloaded<W>);

        impl<W> fmt::Display for Cause<'_, W> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.0.why {
                    Refusal::Overloaded => write!(
                        f,
                        "the layer holds its maximum of {} pending callbacks (raise \
                         `AfterLayer::max_pending`, or lower the load or the callbacks' max \
                         duration)",
                        self.0.max_pending
                    ),
                    Refusal::HeldBytes => write!(
                        f,
                        "pending work holds the layer's maximum of {} bytes of request snapshots \
                         (keep fewer headers with `AfterLayer::snapshot`, or raise \
                         `AfterLayer::max_held_bytes`)",
                        self.0.max_held_bytes
                    ),
                    Refusal::ShutDown => f.write_str(
                        "the layer was shut down and its grace period ran out (register work \
                         before `AfterTasks::shutdown` gives up, or give it a longer grace)",
                    ),
                }
            }
        }

        Cause(self)
    }
}

impl<W> fmt::Display for Overloaded<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "after-response work refused: {}", self.cause())
    }
}

impl<W> std::error::Error for Overloaded<W> {}
