//! The one seam for platforms that freeze the process between invocations.
//!
//! On AWS Lambda (`lambda::DrainLayer`), the environment is frozen as soon as the runtime asks
//! for the next event, so an invocation must hold its requests' work back until its response is
//! posted, then wait for it, and stop it before its deadline. Cloudflare's `waitUntil`, or an
//! executor that freezes, would need the same three things. A [`Host`] provides them; the
//! driver asks the host of the request, if it has one, and knows nothing of Lambda.
//!
//! A host is found the way `After::current` finds its request: through a task-local, set by the
//! platform's layer around the code that serves an invocation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::time::Instant;

use crate::request::stop::Stop;
use crate::tasks::signals::Draining;

/// A platform that runs a request's after-work on its own terms.
pub(crate) trait Host: Send + Sync {
    /// Runs `start` once the platform has delivered the response: at once if it has.
    fn after_response(&self, start: Box<dyn FnOnce() + Send>);

    /// A driver of one of its requests starts; the host waits for it until [`Host::leave`].
    fn enter(&self);

    /// A driver of one of its requests retires, or is dropped.
    fn leave(&self);

    /// Why its work must stop at once, if it must.
    fn must_stop(&self) -> Option<Stop>;

    /// Resolves whenever [`Host::must_stop`] may have an answer: made before asking it, it misses
    /// none.
    fn stop_fired(&self) -> Pin<Box<dyn Future<Output = ()> + Send>>;

    /// When it stops its requests' work, if it knows (a Lambda invocation's deadline, less its
    /// margin): what `AfterContext::deadline` and `stopping` count down to.
    fn deadline(&self) -> Option<Instant>;

    /// The drains that stop its requests' work besides their own layer's (the layer a Lambda
    /// drain was made for): `AfterContext::stopping` hears them start.
    fn draining(&self) -> Option<&Draining>;
}

/// A shared host, behind a thin pointer: every request that has one holds it, so it takes 8 bytes
/// of every request's state, not 16. Made once per invocation.
pub(crate) type HostRef = Arc<Box<dyn Host>>;

tokio::task_local! {
    /// The host serving the current task, if any: set by the platform's layer around the code
    /// that serves an invocation.
    pub(crate) static HOST: HostRef;
}

/// The host of the request entering the layer now, if it has one. Only a platform's feature
/// sets one: without, this costs nothing.
pub(crate) fn current() -> Option<HostRef> {
    if cfg!(feature = "lambda") {
        HOST.try_with(Arc::clone).ok()
    } else {
        None
    }
}
