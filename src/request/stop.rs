//! When and why a request's work stops: its budget, counted from the end of the response; its
//! host's deadline (a Lambda invocation's); a shutdown whose grace ran out. And the notice a
//! callback gets before that (`AfterContext::stopping`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use crate::request::{Inflight, Terms, HELD, UNBOUNDED};
use crate::tasks::signals::Draining;
use crate::tasks::stats::Ended;

/// Why a driver stops its callbacks before their end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The request's budget, of this length, ran out.
    Budget(Duration),
    /// A shutdown's grace period ran out.
    Shutdown,
    /// The platform that served the request wants its work stopped, for this reason
    /// (`lambda::DrainLayer`: the invocation's deadline is near). Counted as timed out.
    #[cfg_attr(not(feature = "lambda"), allow(dead_code))]
    Host(&'static str),
}

impl Stop {
    pub(crate) fn ended(self) -> Ended {
        match self {
            Self::Budget(_) => Ended::TimedOut,
            Self::Shutdown => Ended::Cancelled,
            Self::Host(_) => Ended::TimedOut,
        }
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Budget(budget) => write!(
                f,
                "the request's max duration of {budget:?} ran out (raise it with `MaxDuration` \
                 on the route or `AfterLayer::max_duration`)"
            ),
            Self::Shutdown => f.write_str("the shutdown grace period ran out"),
            Self::Host(why) => f.write_str(why),
        }
    }
}

/// The budget, in the low bits of the request's terms.
impl Terms {
    pub(super) fn set_budget(&self, budget: Duration) {
        let nanos = u64::try_from(budget.as_nanos()).map_or(UNBOUNDED, |n| n.min(UNBOUNDED));
        // Relaxed: the budget guards no memory (read once the response finished, see `budget`),
        // and a read-modify-write keeps the HELD bit of a `hold` or `release` meanwhile.
        let _ = (self.0).fetch_update(Ordering::Relaxed, Ordering::Relaxed, |terms| {
            Some(terms & HELD | nanos)
        });
    }

    /// `None`: no budget.
    pub(super) fn budget(&self) -> Option<Duration> {
        // Relaxed: set while the request is handled, read once it finished: after the reader
        // found `Inflight::end` set (a `OnceLock`), which orders the setting before the read.
        let nanos = self.0.load(Ordering::Relaxed) & UNBOUNDED;
        (nanos != UNBOUNDED).then(|| Duration::from_nanos(nanos))
    }
}

impl Inflight {
    /// The callbacks' budget (`Duration::MAX` for none): fixed once the response finished.
    pub(super) fn budget(&self) -> Duration {
        self.terms.budget().unwrap_or(Duration::MAX)
    }

    /// When the callbacks' budget runs out, once the response finished; `None` before, or
    /// without a budget.
    pub(super) fn budget_deadline(&self) -> Option<Instant> {
        let finished = self.end.get()?.finished_at;
        Instant::from_std(finished).checked_add(self.terms.budget()?)
    }

    /// When the work is stopped, once the response finished: its budget's deadline, or its
    /// host's, whichever comes first.
    pub(super) fn end_of_work(&self) -> Option<Instant> {
        let host = self.host.as_ref().and_then(|host| host.deadline());
        match (self.budget_deadline(), host) {
            (Some(budget), Some(host)) => Some(budget.min(host)),
            (budget, host) => budget.or(host),
        }
    }

    /// Why work must stop at once, if it must: a shutdown's grace ran out, or the request's
    /// host wants its work stopped. Read from flags, set before their waiters are woken, so
    /// that a driver woken by one also gets an answer here.
    pub(super) fn stop_signalled(&self) -> Option<Stop> {
        if self.ledger().shutdown().is_fired() {
            return Some(Stop::Shutdown);
        }
        self.host.as_ref()?.must_stop()
    }

    /// Why work must stop now, if it must: a shutdown's grace, its invocation's time, or the
    /// budget, ran out.
    pub(super) fn must_stop(&self) -> Option<Stop> {
        if let Some(why) = self.stop_signalled() {
            return Some(why);
        }
        let deadline = self.budget_deadline()?;
        (Instant::now() >= deadline).then_some(Stop::Budget(self.budget()))
    }

    /// When the work is stopped, as `AfterContext::deadline` tells it.
    pub(crate) fn end_of_work_std(&self) -> Option<std::time::Instant> {
        self.end_of_work().map(Instant::into_std)
    }

    /// Resolves when the request's callbacks should wrap up: a drain started (its own layer's,
    /// or its host's), or its end of work is near. `AfterContext::stopping`.
    pub(crate) fn stopping(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        // Its own layer's drains, and its host's (a Lambda drain made for another layer).
        let own = self.ledger().draining();
        let host = self.host.as_ref().and_then(|host| host.draining());
        // Made before the counts are read: they hear every drain that starts from then on.
        let own_started = own.started();
        let host_started = host.map(Draining::started);
        // Under way, or over with the work stopped (the layer takes no more).
        let under_way = own.is_under_way() || host.is_some_and(Draining::is_under_way);
        if under_way || self.stop_signalled().is_some() {
            return Box::pin(std::future::ready(()));
        }
        // A tenth of the time the work had, at most `NOTICE`, before its end.
        let notice = self.end_of_work().map(|end| {
            let had = self.end.get().map_or(Duration::ZERO, |outcome| {
                end.saturating_duration_since(Instant::from_std(outcome.finished_at))
            });
            end - (had / 10).min(NOTICE)
        });
        Box::pin(async move {
            let host_started = async move {
                match host_started {
                    Some(started) => started.await,
                    None => std::future::pending().await,
                }
            };
            let (own_started, host_started) =
                (std::pin::pin!(own_started), std::pin::pin!(host_started));
            let drain = futures_util::future::select(own_started, host_started);
            match notice {
                Some(notice) => {
                    let sleep = std::pin::pin!(tokio::time::sleep_until(notice));
                    futures_util::future::select(drain, sleep).await;
                }
                None => {
                    drain.await;
                }
            }
        })
    }
}

/// How long before its deadline at most a callback is told to wrap up (`AfterContext::stopping`).
const NOTICE: Duration = Duration::from_secs(1);
