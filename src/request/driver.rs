//! A request in flight, and the driver task that runs its work once the response has finished.
//!
//! Each request that registers work gets at most one *driver* at a time: a Tokio task that starts
//! the callbacks in registration order, polls them concurrently, and stops them when the
//! request's budget or a shutdown's grace runs out. Requests without callbacks never spawn one.
//!
//! The common case, one callback registered by the handler, costs one task and nothing else: the
//! first callback registered from the request's own task, with nothing queued before it, is
//! spawned at once as a driver that carries it inline (`Driver<C>`, generic over it) and holds it
//! until the response has finished. Other work is boxed and queued in the request's scope: a
//! driver that exists takes it, and otherwise one is spawned where the response finishes (or at
//! once, for `wait_until`). A driver retires as soon as it has nothing left; work that arrives
//! later spawns a new one. This is the only module that spawns.
//!
//! A driver arms its timers only once it actually has to wait: a Tokio `Sleep` for the budget,
//! and a waiter on the layer's shutdown token (and on its invocation's, on Lambda). Callbacks
//! that end on their first poll (a log line, a counter) never touch a timer.
//!
//! Nothing here runs user code while holding a lock, and nothing runs it inside the response's
//! `poll` or `Drop`: finishing a response only hands its work to a driver. On AWS Lambda
//! (`lambda::DrainLayer`), a request served within an invocation hands it over only once the
//! invocation's response is posted, and its drivers count themselves in the invocation, which
//! waits for them (`hold.rs`).

use std::borrow::Cow;
use std::future::Future;
use std::panic::{resume_unwind, Location};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::StatusCode;
use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::futures::TaskLocalFuture;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tracing::Span;

use crate::context::{Data, Finished};
use crate::request::callback::{
    BoxCallback, Callback, Callbacks, Job, RunResult, Running, Stop, WithContext,
};
use crate::request::host::{self, HostRef};
use crate::request::scope::{Next, Scope, Start};
use crate::tasks::ledger::{Draining, Ended, Refusal, Refused, Shared, Ticket};
use crate::tasks::Overloaded;
use crate::{AfterContext, Completion, Outcome, RequestSnapshot, SnapshotConfig};

tokio::task_local! {
    /// The request whose response future, or callbacks, are being polled: for `After::current`.
    pub(crate) static CURRENT: Arc<Inflight>;
}

/// What a layer decides for each of its requests, and the state they share: one reference per
/// request reaches it all.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) shared: Arc<Shared>,
    pub(crate) max_duration: Duration,
    pub(crate) limit: Option<Arc<Semaphore>>,
    /// The number of places under `limit`, for `Debug`.
    pub(crate) limit_size: Option<usize>,
    /// Work for after every response, and where it was set: `AfterLayer::after_each`.
    pub(crate) after_each: Option<(AfterEach, &'static Location<'static>)>,
    /// How many callbacks the layer holds at most: `AfterLayer::max_pending`.
    pub(crate) max_pending: usize,
    /// What a snapshot keeps: `AfterLayer::snapshot`.
    pub(crate) snapshot: SnapshotConfig,
    /// How many bytes of snapshots pending work holds at most: `AfterLayer::max_held_bytes`.
    pub(crate) max_held_bytes: usize,
}

/// The hook of `AfterLayer::after_each`, type-erased so that the layer's type stays the same.
pub(crate) type AfterEach =
    Arc<dyn Fn(AfterContext) -> Pin<Box<dyn Future<Output = RunResult> + Send>> + Send + Sync>;

/// One request, from the moment it entered the layer until its last callback ended.
pub(crate) struct Inflight {
    pub(crate) snapshot: RequestSnapshot,
    /// The callbacks' max duration, counted from the end of the response (set by `MaxDuration`
    /// while the request is handled), and whether the snapshot is counted in the held bytes.
    terms: Terms,
    /// How and when the response finished.
    end: OnceLock<Outcome>,
    /// What the handler left for the callbacks (`After::insert`).
    pub(crate) data: Data,
    config: Arc<Config>,
    scope: Scope<Job>,
    /// The platform that served the request, if it freezes the process between invocations
    /// (`lambda::DrainLayer`): it holds the request's work back until its response is
    /// delivered, waits for its drivers, and stops them at its deadline.
    host: Option<HostRef>,
}

/// The callbacks' budget in nanoseconds, and in its top bit whether the request's snapshot is
/// counted in the layer's held bytes: two small facts every request carries, in one word.
struct Terms(AtomicU64);

/// The top bit: the snapshot is counted.
const HELD: u64 = 1 << 63;
/// The budget's bits at their highest: no budget (a budget of 292 years or more is none).
const UNBOUNDED: u64 = HELD - 1;

impl Terms {
    fn set_budget(&self, budget: Duration) {
        let nanos = u64::try_from(budget.as_nanos()).map_or(UNBOUNDED, |n| n.min(UNBOUNDED));
        let _ = (self.0).fetch_update(Ordering::Relaxed, Ordering::Relaxed, |terms| {
            Some(terms & HELD | nanos)
        });
    }

    /// `None`: no budget.
    fn budget(&self) -> Option<Duration> {
        let nanos = self.0.load(Ordering::Relaxed) & UNBOUNDED;
        (nanos != UNBOUNDED).then(|| Duration::from_nanos(nanos))
    }

    fn is_held(&self) -> bool {
        self.0.load(Ordering::Relaxed) & HELD != 0
    }

    /// Marks the snapshot counted: `false` if it already was.
    fn hold(&self) -> bool {
        self.0.fetch_or(HELD, Ordering::AcqRel) & HELD == 0
    }

    /// Marks the snapshot no longer counted: `true` if it was, for whoever then uncounts it.
    fn release(&self) -> bool {
        self.0.fetch_and(!HELD, Ordering::AcqRel) & HELD != 0
    }
}

impl Inflight {
    /// A request entering the layer.
    pub(crate) fn open(snapshot: RequestSnapshot, config: &Arc<Config>) -> Arc<Self> {
        let inflight = Arc::new(Self {
            snapshot,
            terms: Terms(AtomicU64::new(0)),
            end: OnceLock::new(),
            data: Data::default(),
            config: config.clone(),
            scope: Scope::new(),
            host: host::current(),
        });
        inflight.set_budget(config.max_duration);
        inflight
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.config.shared
    }

    /// The callbacks' budget (`Duration::MAX` for none): fixed once the response finished.
    fn budget(&self) -> Duration {
        self.terms.budget().unwrap_or(Duration::MAX)
    }

    /// When the callbacks' budget runs out, once the response finished; `None` before, or
    /// without a budget.
    fn deadline(&self) -> Option<Instant> {
        let finished = self.end.get()?.finished_at;
        Instant::from_std(finished).checked_add(self.terms.budget()?)
    }

    pub(crate) fn set_budget(&self, budget: Duration) {
        self.terms.set_budget(budget);
    }

    /// When the work is stopped, once the response finished: its budget's deadline, or its
    /// host's, whichever comes first.
    fn end_of_work(&self) -> Option<Instant> {
        let host = self.host.as_ref().and_then(|host| host.deadline());
        match (self.deadline(), host) {
            (Some(budget), Some(host)) => Some(budget.min(host)),
            (budget, host) => budget.or(host),
        }
    }

    /// Registers `callback`, or refuses it when the layer holds its maximum of pending
    /// callbacks (`AfterLayer::max_pending`). `site`: the code that registered it.
    pub(crate) fn register<C: Callback + 'static>(
        self: &Arc<Self>,
        callback: C,
        name: Option<Cow<'static, str>>,
        start: Start,
        site: &'static Location<'static>,
    ) -> Result<(), Overloaded> {
        let ticket = self.admit(name.as_deref())?;
        self.enqueue(ticket, callback, name, start, site);
        Ok(())
    }

    /// A place for one more callback (under `name`, if it has one), or why not.
    pub(crate) fn admit(&self, name: Option<&str>) -> Result<Ticket, Overloaded> {
        // A replacement takes the place of the job it replaces: it never counts against the
        // bound (give or take the driver taking the old one meanwhile).
        let replacing = name.is_some_and(|name| self.scope.holds_named(name));
        let bound = self
            .config
            .max_pending
            .saturating_add(usize::from(replacing));
        self.ticket(name, bound)
    }

    /// Hands `callback`, admitted with `ticket`, to the request's driver.
    pub(crate) fn enqueue<C: Callback + 'static>(
        self: &Arc<Self>,
        ticket: Ticket,
        callback: C,
        name: Option<Cow<'static, str>>,
        start: Start,
        site: &'static Location<'static>,
    ) {
        let span = callback_span(&self.snapshot, name.as_deref(), Some(site));
        // A request's first callback rides in a driver of its own, spawned now: one task and no
        // other allocation. Only from the request's own task (its handler, or its callbacks),
        // so that the driver lives on the runtime that serves the request, not on a temporary or
        // timer-less one that some helper registered from. Named ones are queued, where a later
        // registration or `forget` can still reach them, and so is work registered elsewhere.
        // With an `after_each` hook, everything is queued: the hook, queued when the response
        // finishes, starts first.
        if name.is_none() && self.config.after_each.is_none() && self.is_current() {
            if let Ok(runtime) = Handle::try_current() {
                if self.scope.claim() {
                    let first = Running::new(callback, span, None, ticket, self.context());
                    let driver = Driver::new(self.clone(), Some(first), start);
                    runtime.spawn(CURRENT.scope(self.clone(), driver));
                    return;
                }
            }
        }
        let job = Job::new(Box::pin(callback), span, name, ticket);
        let (next, replaced) = self.scope.register(job, start);
        // On the request's own task (its handler, its callbacks), the current runtime serves it.
        self.act(next, self.is_current());
        if let Some(replaced) = replaced {
            replaced.end(Ended::Forgotten, &self.snapshot);
        }
    }

    pub(crate) fn forget(&self, name: &str) -> bool {
        let forgotten = self.scope.forget(name);
        let found = forgotten.is_some();
        if let Some(job) = forgotten {
            job.end(Ended::Forgotten, &self.snapshot);
        }
        found
    }

    /// Records how the response ended and hands its work to a driver. Called exactly once, from
    /// the response's future or body, so it stays cheap and runs no user code but one: the
    /// `Drop` of values the handler left (`After::insert`) when the request has no work, which
    /// the last clone of its handle would otherwise run there anyway.
    pub(crate) fn finish(
        self: &Arc<Self>,
        status: Option<StatusCode>,
        completion: Completion,
        body_bytes: u64,
        entered: Instant,
    ) {
        let now = Instant::now();
        let outcome = Outcome {
            status,
            completion,
            body_bytes,
            elapsed: now.saturating_duration_since(entered),
            finished_at: now.into_std(),
        };
        let first = self.end.set(outcome).is_ok();
        debug_assert!(first, "a request finishes once");
        // The hook counts from now, not from the request's start: responses still being sent
        // (streams, long polls) hold no place under `max_pending`.
        let hook = self.config.after_each.as_ref().and_then(|(hook, site)| {
            let ticket = self.ticket(None, self.config.max_pending).ok()?;
            let hook = hook.clone();
            let callback: BoxCallback = Box::pin(WithContext::new(move |ctx| hook(ctx)));
            let span = callback_span(&self.snapshot, None, Some(site));
            Some(Job::new(callback, span, None, ticket))
        });
        match &self.host {
            Some(host) => {
                // The response is finished but not delivered yet: its work waits for that.
                let inflight = self.clone();
                host.after_response(Box::new(move || inflight.hand_over(hook)));
            }
            None => self.hand_over(hook),
        }
    }

    /// Hands the request's work, `hook` first, to a driver now that the response finished.
    #[inline]
    fn hand_over(self: &Arc<Self>, hook: Option<Job>) {
        let next = self.scope.finish(hook);
        // Done already (nothing registered, or only early work that ended): let go now.
        // Otherwise the driver lets go when it retires.
        let done = matches!(next, Next::Done);
        self.act(next, true);
        if done {
            self.let_go();
        }
    }

    /// Lets go of what the request held for its work if that work is done: after a driver
    /// retired, work was abandoned, or the handler left a value too late. The scope says, since
    /// the response may have finished without its work being handed over yet (on Lambda, until
    /// the invocation's response is posted), or new work may have been queued meanwhile.
    pub(crate) fn let_go_if_done(&self) {
        // The flags first: a request that holds neither needs no lock.
        if (self.terms.is_held() || self.data.is_used()) && self.scope.is_done() {
            self.let_go();
        }
    }

    /// Lets go of what the request held for its work, now done: its snapshot's place in the
    /// held bytes (a handle kept after the work, by a task or a socket, holds none under
    /// `max_held_bytes`; work registered through it later takes one again), and what the
    /// handler left (`After::insert`), so that a value holding the request's own handle cannot
    /// keep the request alive for good.
    fn let_go(&self) {
        self.release_bytes();
        if self.data.is_used() {
            self.data.clear();
        }
    }

    fn release_bytes(&self) {
        // A load first: a request that registered no work never counted its snapshot.
        // Work registered elsewhere while this runs may find the snapshot still counted and
        // then run uncounted; it is never released twice.
        if self.terms.is_held() && self.terms.release() {
            self.shared().release_bytes(self.snapshot.held_bytes());
        }
    }

    /// A place in the ledger for a callback, or why not (logged, at most once a second).
    fn ticket(&self, name: Option<&str>, bound: usize) -> Result<Ticket, Overloaded> {
        let max_pending = self.config.max_pending;
        let max_held_bytes = self.config.max_held_bytes;
        self.shared()
            .ticket(bound)
            .and_then(|mut ticket| match self.hold_snapshot() {
                Ok(()) => Ok(ticket),
                Err(refused) => {
                    ticket.close(Ended::Shed);
                    Err(refused)
                }
            })
            .map_err(|refused| {
                if let Some(count) = refused.warn {
                    let (method, path) = (self.snapshot.method(), self.snapshot.path());
                    let request_id = self.snapshot.request_id();
                    match refused.why {
                        Refusal::Overloaded => tracing::warn!(
                            %method, path, request_id, name, refused = count,
                            "after callback refused: the layer holds its maximum of {max_pending} \
                             pending callbacks (raise `AfterLayer::max_pending`, or lower the load \
                             or the callbacks' max duration)"
                        ),
                        Refusal::HeldBytes => tracing::warn!(
                            %method, path, request_id, name, refused = count,
                            "after callback refused: pending work holds the layer's maximum of \
                             {max_held_bytes} bytes of request snapshots (keep fewer headers with \
                             `AfterLayer::snapshot`, or raise `AfterLayer::max_held_bytes`)"
                        ),
                        Refusal::ShutDown => tracing::warn!(
                            %method, path, request_id, name, refused = count,
                            "after callback refused: the layer was shut down and its grace period \
                             ran out"
                        ),
                    }
                }
                Overloaded::new(refused.why, max_pending, max_held_bytes)
            })
    }

    /// Counts the snapshot's bytes in the layer's total, once, when the request's first work
    /// comes: a request without work holds its snapshot only while it is served.
    fn hold_snapshot(&self) -> Result<(), Refused> {
        if self.terms.is_held() {
            return Ok(());
        }
        let bytes = self.snapshot.held_bytes();
        self.shared()
            .hold_bytes(bytes, self.config.max_held_bytes)?;
        if !self.terms.hold() {
            // Another thread counted it meanwhile.
            self.shared().release_bytes(bytes);
        }
        Ok(())
    }

    /// Does what the scope asks. `serving`: called where the request is served (its response's
    /// future or body, or its own task), whose runtime is the request's.
    fn act(self: &Arc<Self>, next: Next, serving: bool) {
        match next {
            Next::Nothing | Next::Done => {}
            Next::Wake(waker) => waker.wake(),
            Next::Spawn => self.spawn(serving),
        }
    }

    /// Spawns a driver on the runtime that serves the request: the current one where the
    /// request is served; otherwise (a plain thread, a task of its own, the blocking pool, a
    /// helper's temporary runtime) the live runtime that serves the layer, or else the current
    /// one.
    fn spawn(self: &Arc<Self>, serving: bool) {
        let current = Handle::try_current().ok();
        let runtime = if serving {
            current.or_else(|| self.shared().serving().handle())
        } else {
            self.shared().serving().handle().or(current)
        };
        let Some(runtime) = runtime else {
            let abandoned = self.scope.abandon();
            let count = abandoned.len();
            for job in abandoned {
                job.end(Ended::Cancelled, &self.snapshot);
            }
            self.let_go_if_done();
            tracing::error!(
                method = %self.snapshot.method(),
                path = self.snapshot.path(),
                request_id = self.snapshot.request_id(),
                cancelled = count,
                "after callbacks dropped: no Tokio runtime is running on this thread \
                 (poll and drop the response inside the runtime that serves it)"
            );
            return;
        };
        if serving {
            self.shared().serving().remember(&runtime);
        }
        let driver = Driver::<BoxCallback>::new(self.clone(), None, Start::Now);
        runtime.spawn(CURRENT.scope(self.clone(), driver));
    }

    /// Whether this is the request whose task is being polled.
    fn is_current(self: &Arc<Self>) -> bool {
        CURRENT
            .try_with(|current| Arc::ptr_eq(current, self))
            .unwrap_or(false)
    }

    fn context(self: &Arc<Self>) -> AfterContext {
        AfterContext::new(self.clone())
    }

    /// Why work must stop at once, if it must: a shutdown's grace ran out, or the request's
    /// host wants its work stopped. Read from flags, set before their waiters are woken, so
    /// that a driver woken by one also gets an answer here.
    fn cancelled(&self) -> Option<Stop> {
        if self.shared().shutdown().is_fired() {
            return Some(Stop::Shutdown);
        }
        self.host.as_ref()?.stop()
    }

    /// Why work must stop now, if it must: a shutdown's grace, its invocation's time, or the
    /// budget, ran out.
    fn stopped(&self) -> Option<Stop> {
        if let Some(why) = self.cancelled() {
            return Some(why);
        }
        let deadline = self.deadline()?;
        (Instant::now() >= deadline).then_some(Stop::Budget(self.budget()))
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        // Work that never ended (its runtime went away) still held its place.
        if *self.terms.0.get_mut() & HELD != 0 {
            self.config.shared.release_bytes(self.snapshot.held_bytes());
        }
    }
}

impl Finished for Inflight {
    fn request(&self) -> &RequestSnapshot {
        &self.snapshot
    }

    fn outcome(&self) -> &Outcome {
        self.end
            .get()
            .expect("an AfterContext reads its outcome only once the response finished")
    }

    fn deadline(&self) -> Option<std::time::Instant> {
        self.end_of_work().map(Instant::into_std)
    }

    fn data(&self) -> &Data {
        &self.data
    }

    fn stopping(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        // Its own layer's drains, and its host's (a Lambda drain made for another layer).
        let own = self.shared().draining();
        let host = self.host.as_ref().and_then(|host| host.draining());
        // Made before the counts are read: they hear every drain that starts from then on.
        let own_started = own.started();
        let host_started = host.map(Draining::started);
        // Under way, or over with the work stopped (the layer takes no more).
        let under_way = own.is_under_way() || host.is_some_and(Draining::is_under_way);
        if under_way || self.cancelled().is_some() {
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

/// The span a callback runs in: its own, with no parent, so that a pending callback never keeps
/// the request's span open. It *follows from* the span current where it was registered (a link,
/// in OpenTelemetry's terms), and names the request, so its lines can be traced back to it.
/// Created only if a subscriber is interested in it: without one, even a disabled span costs
/// hundreds of instructions (tracing's `log` fallback, the link, its drop), for every callback.
fn callback_span(
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

pin_project! {
    /// The task that runs one request's work: the callback it was spawned with, if any, inline,
    /// and whatever it takes from the request's queue.
    struct Driver<C> {
        inflight: Arc<Inflight>,
        // The callback it was spawned with, until it ended.
        #[pin]
        first: Option<Running<C>>,
        // When `first` may start.
        start: Start,
        // Work taken from the queue.
        rest: Callbacks,
        // Armed only once a callback is still pending after its first poll: boxed, so that a
        // driver whose callbacks end at once is spawned smaller.
        waits: Option<Pin<Box<Waits>>>,
        // Set while Tokio arms the budget's timer, which panics without a time driver.
        arming: bool,
        done: bool,
    }

    impl<C> PinnedDrop for Driver<C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Its host no longer waits for it: done, it runs nothing any more; dropped before,
            // its callbacks are dropped with it.
            if let Some(host) = &this.inflight.host {
                host.leave();
            }
            // Dropped before its work was done: the runtime is shutting down. Running callbacks
            // count themselves as cancelled when dropped; work not taken yet is dropped here.
            if *this.done {
                this.inflight.let_go_if_done();
                return;
            }
            let abandoned = this.inflight.scope.abandon();
            let count = abandoned.len() + this.rest.len() + usize::from(this.first.is_some());
            for job in abandoned {
                job.end(Ended::Cancelled, &this.inflight.snapshot);
            }
            let (method, path) = (this.inflight.snapshot.method(), this.inflight.snapshot.path());
            let request_id = this.inflight.snapshot.request_id();
            if *this.arming {
                // Tokio panicked arming the timer: the runtime has no time driver.
                tracing::error!(
                    %method, path, request_id, cancelled = count,
                    "after callbacks dropped: they need Tokio's time driver \
                     (call `enable_time` or `enable_all` on the runtime builder)"
                );
            } else if this.inflight.shared().shutdown().is_fired() {
                // Written off by a shutdown, which said so for all of them.
                tracing::debug!(
                    %method, path, request_id, cancelled = count,
                    "after callbacks dropped with their runtime, after the shutdown wrote them off"
                );
            } else if count > 0 {
                tracing::warn!(
                    %method, path, request_id, cancelled = count,
                    "after callbacks dropped: the runtime shut down before they ended"
                );
            }
            this.inflight.let_go_if_done();
        }
    }
}

// Every request with work spawns a driver, and a waiting one holds it for as long as its
// callbacks run: its size is part of what each pending callback costs, and Tokio allocates task
// cells in steps of 128 bytes, so a change that grows it must be a conscious one. Carrying a
// one-byte callback, it takes 176 bytes; spawned for queued work only, 184.
const _: () = {
    type Carrying = Driver<crate::request::callback::Plain<std::future::Ready<()>>>;
    assert!(std::mem::size_of::<TaskLocalFuture<Arc<Inflight>, Carrying>>() <= 176);
    assert!(std::mem::size_of::<TaskLocalFuture<Arc<Inflight>, Driver<BoxCallback>>>() <= 184);
    // The request's state, shared by its handle, its body and its drivers.
    assert!(std::mem::size_of::<Inflight>() <= 240);
};

impl<C> Driver<C> {
    fn new(inflight: Arc<Inflight>, first: Option<Running<C>>, start: Start) -> Self {
        if let Some(host) = &inflight.host {
            host.enter();
        }
        Self {
            inflight,
            first,
            start,
            rest: Callbacks::default(),
            waits: None,
            arming: false,
            done: false,
        }
    }
}

impl<C: Callback> Future for Driver<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let inflight: &Arc<Inflight> = this.inflight;
        // A callback that keeps registering work that ends at once would keep this loop busy:
        // hand the thread back now and then.
        for _ in 0..128 {
            let idle = this.first.is_none() && this.rest.is_empty();
            let Some(taken) = inflight.scope.take(cx.waker(), idle) else {
                *this.done = true;
                return Poll::Ready(());
            };
            // The first callback waits for the end of the response, unless it is early work.
            let first_runs =
                this.first.is_some() && (*this.start == Start::Now || taken.finished());
            for job in taken {
                let running =
                    Running::from_job(job, inflight.context(), inflight.config.limit.as_ref());
                this.rest.push(running);
            }
            if !first_runs && this.rest.is_empty() {
                if this.first.is_some() {
                    // Held until the response finishes, which wakes this task.
                    return Poll::Pending;
                }
                continue;
            }
            // Before any callback is polled: work arriving too late never starts, and a callback
            // whose timer fired as its budget or a shutdown's grace ran out does not finish late.
            if let Some(why) = inflight.stopped() {
                return stop(inflight, this.first, this.rest, this.done, why);
            }
            let mut ended = false;
            if first_runs {
                if let Some(mut first) = this.first.as_mut().as_pin_mut() {
                    first.as_mut().start(inflight.config.limit.as_ref());
                    if first.poll(cx).is_ready() {
                        this.first.set(None);
                        ended = true;
                    }
                }
            }
            if let Poll::Ready(Some(())) = this.rest.poll_next(cx) {
                ended = true;
            }
            if ended || (!first_runs && this.rest.is_empty()) {
                continue;
            }
            // Something still runs: wait for it, the budget, or a shutdown.
            return match wait(inflight, this.waits, this.arming, cx) {
                Some(why) => stop(inflight, this.first, this.rest, this.done, why),
                None => Poll::Pending,
            };
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

pin_project! {
    /// What a waiting driver waits for, besides its callbacks: the request's budget, and its
    /// host's wish to stop. Boxed and armed on first wait, so that a driver whose callbacks end
    /// at once is spawned smaller and arms nothing.
    ///
    /// Not a shutdown of its own layer, unless a host waits for it: a shutdown whose grace ran
    /// out has already written its work off, and wakes nobody. A driver learns of it from the
    /// flag it reads whenever it is woken (by its callbacks or its budget), before it polls
    /// anything, and drops its work then, unpolled; at the latest, the runtime drops it as the
    /// process ends. Waking every waiting driver would take a waiter per driver, on memory every
    /// request shares.
    struct Waits {
        #[pin]
        budget: Option<Sleep>,
        // Boxed twice, to keep this box small for the drivers without a host.
        host: Option<Box<Pin<Box<dyn Future<Output = ()> + Send>>>>,
    }
}

/// Polls the budget's timer and the host's stop, arming them on first use; why to stop, if the
/// driver must.
fn wait(
    inflight: &Inflight,
    waits: &mut Option<Pin<Box<Waits>>>,
    arming: &mut bool,
    cx: &mut Context<'_>,
) -> Option<Stop> {
    if waits.is_none() {
        // A host waits for its drivers (a Lambda invocation, before it takes the next event):
        // they stop at once when their own layer's grace runs out too.
        let host = inflight.host.as_ref().map(|host| {
            let (stopping, shutdown) = (host.stopping(), inflight.shared().shutdown().fired());
            let either: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
                futures_util::future::select(stopping, std::pin::pin!(shutdown)).await;
            });
            Box::new(either)
        });
        if host.is_none() && inflight.deadline().is_none() {
            // Nothing to arm: early work before the end, or no budget.
            return inflight.cancelled();
        }
        *waits = Some(Box::pin(Waits { budget: None, host }));
    }
    let mut waits = waits.as_mut()?.as_mut().project();
    if let Some(host) = waits.host.as_mut() {
        let _ = host.as_mut().as_mut().poll(cx);
    }
    // The host's waiter was made before this check: a stop that comes after it wakes us.
    if let Some(why) = inflight.cancelled() {
        return Some(why);
    }
    // The deadline is known once the response finished; until then only early work runs.
    let deadline = inflight.deadline()?;
    if waits.budget.is_none() {
        *arming = true;
        waits.budget.set(Some(tokio::time::sleep_until(deadline)));
        *arming = false;
    }
    let sleep = waits.budget.as_pin_mut()?;
    sleep
        .poll(cx)
        .is_ready()
        .then(|| Stop::Budget(inflight.budget()))
}

/// Stops every callback of the request that has not ended.
fn stop<C: Callback>(
    inflight: &Arc<Inflight>,
    mut first: Pin<&mut Option<Running<C>>>,
    rest: &mut Callbacks,
    done: &mut bool,
    why: Stop,
) -> Poll<()> {
    *done = true;
    let mut count = rest.len();
    if let Some(first) = first.as_mut().as_pin_mut() {
        first.stop(why);
        count += 1;
    }
    first.set(None);
    rest.stop(why);
    for job in inflight.scope.abandon() {
        // Through `Running`, so that it logs like the others.
        let mut running = Running::from_job(job, inflight.context(), None);
        Pin::new(&mut running).stop(why);
        count += 1;
    }
    // One line per event: a request's budget is its own; a shutdown, or a platform's deadline,
    // says once for all how many it stopped.
    if let Stop::Budget(_) = why {
        tracing::warn!(
            method = %inflight.snapshot.method(),
            path = inflight.snapshot.path(),
            request_id = inflight.snapshot.request_id(),
            cancelled = count,
            "after callbacks cancelled: {why}"
        );
    }
    Poll::Ready(())
}

/// Runs `callback` on Tokio's blocking pool, inside the current callback's span and with its
/// request as the current one. A panic in it is raised again here, where the callback's poll
/// catches and reports it.
pub(crate) async fn run_blocking<C, R>(ctx: AfterContext, callback: C) -> R
where
    C: FnOnce(AfterContext) -> R + Send + 'static,
    R: Send + 'static,
{
    let inflight = CURRENT.try_with(Arc::clone).ok();
    let span = Span::current();
    let task = AbortOnDrop(tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        match inflight {
            Some(inflight) => CURRENT.sync_scope(inflight, || callback(ctx)),
            None => callback(ctx),
        }
    }));
    match task.await {
        Ok(output) => output,
        Err(error) => match error.try_into_panic() {
            Ok(panic) => resume_unwind(panic),
            // Only an abort cancels it, and that drops this future first.
            Err(error) => unreachable!("a blocking callback's task was cancelled: {error}"),
        },
    }
}

/// A task that is aborted when this handle is dropped: a blocking task that has not started yet
/// never starts; one that has started cannot be interrupted and runs to its end; an async task
/// is dropped at its next `.await`.
pub(crate) struct AbortOnDrop<R>(pub(crate) JoinHandle<R>);

impl<R> Future for AbortOnDrop<R> {
    type Output = Result<R, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<R> Drop for AbortOnDrop<R> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use http::{Request, Response};
    use http_body_util::{BodyExt, Empty};
    use tokio::sync::oneshot;
    use tower::{service_fn, Layer, Service, ServiceExt};

    use crate::test_util::{eventually, fail, settle, Logs, TestBody, Then};
    use crate::{After, AfterLayer, AfterTasks, MaxDuration};

    type Body = Empty<bytes::Bytes>;

    /// Serves one request through `layer` with a handler that registers work with `register`,
    /// and reads the response to its end.
    async fn serve(layer: &AfterLayer, register: impl FnOnce(After) + Send + 'static) {
        let register = Mutex::new(Some(register));
        let service = layer.layer(service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            (register.lock().unwrap().take().unwrap())(after);
            async { Ok::<_, Infallible>(Response::new(Body::new())) }
        }));
        let path = Request::builder().uri("/orders/7").body(()).unwrap();
        let response = service.oneshot(path).await.unwrap();
        response.into_body().collect().await.unwrap();
    }

    async fn drained(tasks: &AfterTasks) {
        eventually("no pending callbacks", || tasks.pending() == 0).await;
    }

    #[tokio::test]
    async fn callbacks_start_in_registration_order_and_run_concurrently() {
        let layer = AfterLayer::new();
        let started = Arc::new(Mutex::new(Vec::new()));
        let (release, released) = oneshot::channel::<()>();
        let log = started.clone();
        serve(&layer, move |after| {
            let first = log.clone();
            // Waits for the third: run one after the other, this would never end.
            after.run(async move {
                first.lock().unwrap().push(1);
                released.await.unwrap();
            });
            let second = log.clone();
            after.run(async move { second.lock().unwrap().push(2) });
            let third = log.clone();
            after.run(async move {
                third.lock().unwrap().push(3);
                release.send(()).unwrap();
            });
        })
        .await;
        drained(&layer.tasks()).await;
        assert_eq!(*started.lock().unwrap(), [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_named_callback_still_starts_before_a_later_unnamed_one() {
        let layer = AfterLayer::new();
        let started = Arc::new(Mutex::new(Vec::new()));
        let log = started.clone();
        let service = layer.layer(service_fn(move |_: Request<()>| {
            let log = log.clone();
            // From the request's own task, where an unnamed callback may ride in a driver.
            async move {
                let after = After::current();
                let first = log.clone();
                after.run_named("audit", move |_| async move {
                    first.lock().unwrap().push(1);
                });
                after.run(async move { log.lock().unwrap().push(2) });
                Ok::<_, Infallible>(Response::new(Body::new()))
            }
        }));
        let response = service.oneshot(Request::new(())).await.unwrap();
        response.into_body().collect().await.unwrap();
        drained(&layer.tasks()).await;
        assert_eq!(*started.lock().unwrap(), [1, 2]);
    }

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

    #[tokio::test]
    async fn nested_work_runs_later_and_is_tracked() {
        let layer = AfterLayer::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        let log = order.clone();
        serve(&layer, move |after| {
            after.run(async move {
                let inner = log.clone();
                // Both ways of reaching the request work inside a callback.
                After::current().run(async move { inner.lock().unwrap().push("nested") });
                let inner = log.clone();
                crate::after(async move { inner.lock().unwrap().push("nested by after()") });
                // Not inline: the nested ones have not run yet.
                log.lock().unwrap().push("outer");
            });
        })
        .await;
        drained(&layer.tasks()).await;
        assert_eq!(
            *order.lock().unwrap(),
            ["outer", "nested", "nested by after()"]
        );
    }

    #[tokio::test]
    async fn work_registered_after_everything_finished_still_runs() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let (late_tx, late_rx) = oneshot::channel::<After>();
        serve(&layer, move |after| {
            late_tx.send(after.clone()).unwrap();
            after.run(async {});
        })
        .await;
        drained(&tasks).await;
        // The driver has retired; a late registration must start a new one.
        let after = late_rx.await.unwrap();
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        after.run_with(move |ctx| async move {
            assert_eq!(ctx.request().uri().path(), "/orders/7");
            flag.store(true, Ordering::SeqCst);
        });
        assert_eq!(tasks.pending(), 1);
        eventually("the late callback", || ran.load(Ordering::SeqCst)).await;
        drained(&tasks).await;
    }

    #[tokio::test]
    async fn wait_until_starts_at_once_and_run_waits_for_the_response() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let early = Arc::new(AtomicBool::new(false));
        let late = Arc::new(AtomicBool::new(false));
        let (early_flag, late_flag) = (early.clone(), late.clone());
        let service = layer.layer(service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            let (early_flag, late_flag) = (early_flag.clone(), late_flag.clone());
            after.wait_until(async move { early_flag.store(true, Ordering::SeqCst) });
            after.run(async move { late_flag.store(true, Ordering::SeqCst) });
            async { Ok::<_, Infallible>(Response::new(TestBody::new(&["a"], Then::End))) }
        }));
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        eventually("the wait_until future", || early.load(Ordering::SeqCst)).await;
        settle().await;
        assert!(
            !late.load(Ordering::SeqCst),
            "`run` started before the response ended"
        );
        while body.frame().await.is_some() {}
        eventually("the run callback", || late.load(Ordering::SeqCst)).await;
        drained(&tasks).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_cancels_what_still_runs_and_says_so() {
        let logs = Logs::capture();
        let layer = AfterLayer::new().max_duration(Duration::from_secs(5));
        let finished = Arc::new(AtomicUsize::new(0));
        let count = finished.clone();
        serve(&layer, move |after| {
            let quick = count.clone();
            after.run(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                quick.fetch_add(1, Ordering::SeqCst);
            });
            let slow = count.clone();
            after.run(async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                slow.fetch_add(1, Ordering::SeqCst);
            });
            let slow = count.clone();
            after.run_named("audit", move |_| async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                slow.fetch_add(1, Ordering::SeqCst);
            });
        })
        .await;
        drained(&layer.tasks()).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        // One warning for the request, naming it, the budget and how many it cancelled; each
        // callback's own line is at DEBUG inside its span, with its name if it has one.
        let warnings = logs.lines_with("max duration of 5s ran out");
        let warn: Vec<_> = warnings.iter().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warn.len(), 1, "{warnings:?}");
        assert!(warn[0].contains("path=\"/orders/7\"") && warn[0].contains("cancelled=2"));
        let debug: Vec<_> = warnings.iter().filter(|l| l.contains("DEBUG")).collect();
        assert_eq!(debug.len(), 2, "{warnings:?}");
        for line in &debug {
            assert!(
                line.contains("after{method=GET path=\"/orders/7\""),
                "{line}"
            );
        }
        let named = debug.iter().filter(|line| line.contains("name=\"audit\""));
        assert_eq!(named.count(), 1, "{warnings:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_counts_from_the_end_of_the_response_and_covers_wait_until() {
        let layer = AfterLayer::new().max_duration(Duration::from_secs(10));
        let tasks = layer.tasks();
        let done = Arc::new(AtomicUsize::new(0));
        let (in_time, too_long) = (done.clone(), done.clone());
        let service = layer.layer(service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            let (in_time, too_long) = (in_time.clone(), too_long.clone());
            // 14 s after the start, 9 s after the end of the response: within budget.
            after.wait_until(async move {
                tokio::time::sleep(Duration::from_secs(14)).await;
                in_time.fetch_add(1, Ordering::SeqCst);
            });
            // 16 s after the start, 11 s after the end: over budget.
            after.wait_until(async move {
                tokio::time::sleep(Duration::from_secs(16)).await;
                too_long.fetch_add(10, Ordering::SeqCst);
            });
            async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, Infallible>(Response::new(Body::new()))
            }
        }));
        let response = service.oneshot(Request::new(())).await.unwrap();
        response.into_body().collect().await.unwrap();
        drained(&tasks).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_budget_overrides_the_layer_and_max_means_unbounded() {
        let layer = AfterLayer::new().max_duration(Duration::from_secs(1));
        let tasks = layer.tasks();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let route =
            MaxDuration::new(Duration::MAX).layer(service_fn(move |request: Request<()>| {
                let after = request.extensions().get::<After>().unwrap().clone();
                let flag = flag.clone();
                after.run(async move {
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    flag.store(true, Ordering::SeqCst);
                });
                async { Ok::<_, Infallible>(Response::new(Body::new())) }
            }));
        let mut service = layer.layer(route);
        let response = service.ready().await.unwrap().call(Request::new(())).await;
        response.unwrap().into_body().collect().await.unwrap();
        drained(&tasks).await;
        assert!(
            done.load(Ordering::SeqCst),
            "an unbounded callback was cancelled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_callback_whose_timer_fires_with_its_budget_does_not_finish_late() {
        // The callback's own timer and its budget's fire at the same instant: the driver, woken
        // for both, must stop the callback rather than poll it to its end past the deadline.
        let layer = AfterLayer::new().max_duration(Duration::from_secs(1));
        let tasks = layer.tasks();
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        serve(&layer, move |after| {
            after.run(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                flag.store(true, Ordering::SeqCst);
            });
        })
        .await;
        drained(&tasks).await;
        assert!(!finished.load(Ordering::SeqCst), "finished at its deadline");
        assert_eq!(tasks.stats().timed_out(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn work_registered_after_the_deadline_never_starts() {
        let logs = Logs::capture();
        let layer = AfterLayer::new().max_duration(Duration::from_secs(1));
        let tasks = layer.tasks();
        let (tx, rx) = oneshot::channel::<After>();
        serve(&layer, move |after| tx.send(after).unwrap()).await;
        let after = rx.await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = Arc::new(AtomicBool::new(false));
        let flag = started.clone();
        after.run(async move { flag.store(true, Ordering::SeqCst) });
        drained(&tasks).await;
        assert!(!started.load(Ordering::SeqCst));
        let warnings = logs.lines_with("max duration of 1s ran out");
        assert_eq!(warnings.iter().filter(|l| l.contains("WARN")).count(), 1);
        assert_eq!(tasks.stats().timed_out(), 1);
    }

    /// Records what a tracing subscriber is told about spans, by span name.
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

    #[tokio::test]
    async fn the_last_registration_of_a_name_wins_and_forget_removes_it() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let ran = Arc::new(Mutex::new(Vec::new()));
        let log = ran.clone();
        serve(&layer, move |after| {
            for (name, label) in [("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1")] {
                let log = log.clone();
                after.run_named(
                    name,
                    move |_| async move { log.lock().unwrap().push(label) },
                );
            }
            assert!(after.forget("c"));
            assert!(!after.forget("c"));
            assert!(!after.forget("never registered"));
        })
        .await;
        drained(&tasks).await;
        // The replacement takes the place of its latest registration.
        assert_eq!(*ran.lock().unwrap(), ["b1", "a2"]);
        let stats = tasks.stats();
        assert_eq!(
            (stats.scheduled(), stats.completed(), stats.forgotten()),
            (4, 2, 2)
        );
    }

    #[tokio::test]
    async fn names_belong_to_one_request() {
        let layer = AfterLayer::new();
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let count = ran.clone();
            serve(&layer, move |after| {
                after.run_named("audit", move |_| async move {
                    count.fetch_add(1, Ordering::SeqCst);
                });
            })
            .await;
        }
        drained(&layer.tasks()).await;
        assert_eq!(ran.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_limit_of_two_runs_six_callbacks_two_at_a_time_in_order() {
        limit_of_two(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_limit_of_two_holds_on_the_multi_thread_runtime() {
        // Tokio may run a newly spawned driver before an older one (its LIFO slot): requests
        // can reach the limit out of order, each request's callbacks still in theirs.
        limit_of_two(false).await;
    }

    /// Six callbacks, two per request, under a limit of two; `across_requests`: also check
    /// that requests reach the limit in the order their responses finished.
    async fn limit_of_two(across_requests: bool) {
        let layer = AfterLayer::new().concurrency_limit(2);
        let tasks = layer.tasks();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        for request in 0..3 {
            let (running, most, order, gate) =
                (running.clone(), most.clone(), order.clone(), gate.clone());
            serve(&layer, move |after| {
                for callback in 0..2 {
                    let (running, most, order, gate) =
                        (running.clone(), most.clone(), order.clone(), gate.clone());
                    after.run(async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        order.lock().unwrap().push((request, callback));
                        gate.acquire().await.unwrap().forget();
                        running.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
            .await;
        }
        eventually("two callbacks to run and four to wait", || {
            let stats = tasks.stats();
            order.lock().unwrap().len() == 2 && (stats.running(), stats.queued()) == (2, 4)
        })
        .await;
        assert_eq!(tasks.pending(), 6);
        // Release them one by one; the limit must hold all along.
        for released in 1..=6 {
            gate.add_permits(1);
            eventually("a callback to end", || {
                tasks.stats().completed() == released
            })
            .await;
        }
        drained(&tasks).await;
        assert_eq!(most.load(Ordering::SeqCst), 2);
        let order = order.lock().unwrap().clone();
        if across_requests {
            let expected: Vec<_> = (0..3).flat_map(|r| (0..2).map(move |c| (r, c))).collect();
            assert_eq!(order, expected, "waiting callbacks start in FIFO order");
        } else {
            for request in 0..3 {
                let of_request: Vec<_> = order.iter().filter(|(r, _)| *r == request).collect();
                assert_eq!(of_request, [&(request, 0), &(request, 1)], "{order:?}");
            }
        }
        assert_eq!((tasks.stats().running(), tasks.stats().queued()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_callback_waiting_for_the_limit_is_cancelled_by_its_budget_without_running() {
        let layer = AfterLayer::new()
            .concurrency_limit(1)
            .max_duration(Duration::from_secs(5));
        let tasks = layer.tasks();
        let started = Arc::new(AtomicUsize::new(0));
        let count = started.clone();
        serve(&layer, move |after| {
            for _ in 0..2 {
                let count = count.clone();
                after.run(async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        })
        .await;
        drained(&tasks).await;
        assert_eq!(started.load(Ordering::SeqCst), 1);
        let stats = tasks.stats();
        assert_eq!(
            (stats.timed_out(), stats.running(), stats.queued()),
            (2, 0, 0)
        );
    }

    #[tokio::test]
    async fn blocking_work_runs_off_the_async_workers_with_its_context() {
        let logs = Logs::capture();
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let slow_done = Arc::new(AtomicBool::new(false));
        let seen_while_slow = Arc::new(Mutex::new(None));
        let flag = slow_done.clone();
        serve(&layer, move |after| {
            after.run_blocking(move |ctx| {
                assert_eq!(ctx.request().uri().path(), "/orders/7");
                // The request is reachable from the blocking closure too.
                assert!(After::try_current().is_some());
                std::thread::sleep(Duration::from_millis(600));
                flag.store(true, Ordering::SeqCst);
            });
            after.run_blocking(|_| fail("blocking bug"));
        })
        .await;
        // Another request's callback runs while the blocking one sleeps.
        let (flag, seen) = (slow_done.clone(), seen_while_slow.clone());
        serve(&layer, move |after| {
            after.run(async move { *seen.lock().unwrap() = Some(flag.load(Ordering::SeqCst)) });
        })
        .await;
        eventually("the quick callback", || {
            seen_while_slow.lock().unwrap().is_some()
        })
        .await;
        assert_eq!(*seen_while_slow.lock().unwrap(), Some(false));
        drained(&tasks).await;
        assert!(slow_done.load(Ordering::SeqCst));
        let stats = tasks.stats();
        assert_eq!((stats.completed(), stats.panicked()), (2, 1));
        assert_eq!(logs.lines_with("blocking bug").len(), 1);
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

    #[test]
    fn without_a_time_driver_waiting_callbacks_fail_naming_enable_time() {
        let logs = Logs::capture();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        runtime.block_on(async {
            let (_release, released) = oneshot::channel::<()>();
            serve(&layer, move |after| {
                // Ends at once: needs no timer.
                after.run(async {});
                // Waits: its budget needs Tokio's timer, which this runtime lacks.
                after.run(async move {
                    let _ = released.await;
                });
            })
            .await;
            // `eventually` needs a timer too: yield instead.
            for _ in 0..100 {
                if tasks.pending() == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        });
        assert_eq!(tasks.pending(), 0);
        let stats = tasks.stats();
        assert_eq!((stats.completed(), stats.cancelled()), (1, 1));
        let errors = logs.lines_with("enable_time");
        assert_eq!(errors.len(), 1, "{}", logs.text());
        assert!(
            errors[0].contains("ERROR") && errors[0].contains("cancelled=1"),
            "{errors:?}"
        );
    }

    #[test]
    fn an_unrelated_panic_is_not_blamed_on_the_time_driver() {
        let logs = Logs::capture();
        let layer = AfterLayer::new();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                serve(&layer, |after| after.run(std::future::pending::<()>())).await;
                settle().await;
                panic!("an unrelated bug");
            });
        }));
        assert!(unwound.is_err());
        // The runtime dropped the waiting driver while the panic unwound.
        assert_eq!(layer.tasks().pending(), 0);
        assert!(logs.lines_with("enable_time").is_empty(), "{}", logs.text());
    }

    #[tokio::test]
    async fn beyond_max_pending_new_work_is_refused_counted_and_logged() {
        let logs = Logs::capture();
        let layer = AfterLayer::new().max_pending(2);
        let tasks = layer.tasks();
        let (release, released) = oneshot::channel::<()>();
        let ran = Arc::new(AtomicUsize::new(0));
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let (count, refused) = (ran.clone(), refusals.clone());
        serve(&layer, move |after| {
            let first = count.clone();
            after.run(async move {
                released.await.unwrap();
                first.fetch_add(1, Ordering::SeqCst);
            });
            let second = count.clone();
            after.run(async move {
                second.fetch_add(1, Ordering::SeqCst);
            });
            // The layer holds two: these are refused, the oldest are kept.
            after.run(async { fail("refused work never runs") });
            let refusal = after.try_run_with(|_| async { fail("refused") });
            refused.lock().unwrap().push(refusal);
        })
        .await;
        let refusal = refusals.lock().unwrap()[0];
        let error = refusal.unwrap_err();
        assert_eq!(error.max_pending(), 2);
        assert!(
            error.to_string().contains("AfterLayer::max_pending"),
            "{error}"
        );
        eventually("the quick callback", || ran.load(Ordering::SeqCst) == 1).await;
        release.send(()).unwrap();
        drained(&tasks).await;
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        let stats = tasks.stats();
        assert_eq!(
            (stats.scheduled(), stats.completed(), stats.shed()),
            (4, 2, 2)
        );
        // One warning for the burst, naming the route and the count so far.
        let warnings = logs.lines_with("after callback refused");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("WARN") && warnings[0].contains("path=\"/orders/7\""));
        assert!(warnings[0].contains("refused=1"), "{warnings:?}");

        // Room again: work is accepted.
        let accepted = Arc::new(AtomicBool::new(false));
        let flag = accepted.clone();
        serve(&layer, move |after| {
            after.run(async move { flag.store(true, Ordering::SeqCst) });
        })
        .await;
        drained(&tasks).await;
        assert!(accepted.load(Ordering::SeqCst));
    }

    /// Serves one request with `headers` whose handler registers one callback that waits for
    /// `release`; returns whether the callback was taken.
    async fn serve_with_headers(
        layer: &AfterLayer,
        headers: &[(&'static str, String)],
        release: Arc<tokio::sync::Semaphore>,
    ) -> bool {
        let taken = Arc::new(AtomicBool::new(false));
        let flag = taken.clone();
        let service = layer.layer(service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            let release = release.clone();
            let taken = after
                .try_run_with(move |_| async move {
                    let _ = release.acquire().await;
                })
                .is_ok();
            flag.store(taken, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Body::new())) }
        }));
        let mut request = Request::builder().uri("/upload");
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let response = service.oneshot(request.body(()).unwrap()).await.unwrap();
        response.into_body().collect().await.unwrap();
        taken.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn pending_work_holds_its_snapshots_bytes_until_it_ends() {
        let logs = Logs::capture();
        // Room for about two snapshots of 1 KiB of headers.
        let layer = AfterLayer::new().max_held_bytes(2_500);
        let tasks = layer.tasks();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let header = [("x-data", "d".repeat(1_000))];
        assert!(serve_with_headers(&layer, &header, gate.clone()).await);
        let one = tasks.stats().held_bytes();
        assert!((1_000..1_300).contains(&one), "{one}");
        assert!(serve_with_headers(&layer, &header, gate.clone()).await);
        assert_eq!(tasks.stats().held_bytes(), 2 * one);
        // A third would pass the bound: refused, counted and logged.
        assert!(!serve_with_headers(&layer, &header, gate.clone()).await);
        assert!(!serve_with_headers(&layer, &header, gate.clone()).await);
        let stats = tasks.stats();
        assert_eq!((stats.shed(), stats.held_bytes()), (2, 2 * one));
        let warnings = logs.lines_with("bytes of request snapshots");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("WARN") && warnings[0].contains("refused=1"));
        // Released as the work ends: room again.
        gate.add_permits(2);
        drained(&tasks).await;
        eventually("the snapshots to be released", || {
            tasks.stats().held_bytes() == 0
        })
        .await;
        gate.add_permits(1);
        assert!(serve_with_headers(&layer, &header, gate).await);
        drained(&tasks).await;
    }

    /// Serves one request carrying 1 KiB of headers whose handler tries to register work that
    /// waits forever; returns the refusal, if any, and the response, whose body never ends (a
    /// stream still being sent).
    async fn serve_streaming(
        layer: &AfterLayer,
    ) -> (
        Result<(), crate::Overloaded>,
        Response<crate::AfterBody<TestBody>>,
    ) {
        let refusal = Arc::new(Mutex::new(None));
        let record = refusal.clone();
        let service = layer.layer(service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            let result = after.try_run(std::future::pending::<()>());
            *record.lock().unwrap() = Some(result.map_err(|refused| refused.with_work(())));
            async { Ok::<_, Infallible>(Response::new(TestBody::new(&["chunk"], Then::Pending))) }
        }));
        let request = Request::builder()
            .uri("/stream")
            .header("x-data", "d".repeat(1_000))
            .body(())
            .unwrap();
        let response = service.oneshot(request).await.unwrap();
        let result = refusal.lock().unwrap().take().unwrap();
        (result, response)
    }

    #[tokio::test]
    async fn work_refused_by_max_pending_holds_no_snapshot_bytes() {
        let layer = AfterLayer::new().max_pending(1);
        let tasks = layer.tasks();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let header = [("x-data", "d".repeat(1_000))];
        assert!(serve_with_headers(&layer, &header, gate.clone()).await);
        let one = tasks.stats().held_bytes();
        assert!(one > 1_000, "{one}");
        // A second request, its response still streaming: its work is refused, it holds none.
        let (refused, _streaming) = serve_streaming(&layer).await;
        assert!(refused.is_err());
        // `held_bytes`: "bytes of request snapshots that pending callbacks hold now".
        assert_eq!(
            tasks.stats().held_bytes(),
            one,
            "a refused request holds bytes"
        );
        gate.add_permits(1);
        drained(&tasks).await;
        settle().await;
        assert_eq!(
            tasks.stats().held_bytes(),
            0,
            "nothing is pending, yet a refused request still holds its snapshot"
        );
    }

    #[tokio::test]
    async fn a_shut_down_layer_refuses_work_as_shut_down_even_when_its_bytes_are_full() {
        // Room for one snapshot of 1 KiB of headers.
        let layer = AfterLayer::new().max_held_bytes(1_500);
        let tasks = layer.tasks();
        let (taken, _streaming) = serve_streaming(&layer).await;
        assert!(taken.is_ok());
        let report = tasks.shutdown(Duration::from_millis(10)).await;
        assert_eq!(report.cancelled(), 1);
        let stats = tasks.stats();
        // The first request still streams, and holds its snapshot: the bytes are full.
        let (refused, _second) = serve_streaming(&layer).await;
        let error = refused.unwrap_err();
        assert!(error.is_shut_down(), "refused for another reason: {error}");
        // "the stats stay as the report left them"
        assert_eq!(tasks.stats(), stats);
    }

    /// A current-thread runtime of its own, with timers.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn work_from_a_spawned_task_runs_once_the_first_serving_runtime_is_gone() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        // A first runtime serves the layer (a warm-up, a previous test, a restarted server
        // loop), then is dropped.
        runtime().block_on(async {
            serve(&layer, |after| after.run(async {})).await;
            drained(&tasks).await;
        });
        // Another runtime serves it now. A task spawned on it (not the request's own task)
        // registers work for one of its requests once its response is out: before the shared
        // runtime handle, it ran on the current runtime; now it goes to the first one, gone.
        let ran = Arc::new(AtomicBool::new(false));
        runtime().block_on(async {
            let (send, handle) = oneshot::channel::<After>();
            serve(&layer, move |after| send.send(after).unwrap()).await;
            let after = handle.await.unwrap();
            let flag = ran.clone();
            tokio::spawn(
                async move { after.run(async move { flag.store(true, Ordering::SeqCst) }) },
            )
            .await
            .unwrap();
            drained(&tasks).await;
        });
        let stats = tasks.stats();
        assert_eq!(
            (stats.completed(), stats.cancelled()),
            (2, 0),
            "the work went to the dead runtime"
        );
        assert!(ran.load(Ordering::SeqCst));
    }

    #[test]
    fn early_work_the_handler_registers_runs_on_the_runtime_that_serves_its_request() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        // A first runtime serves the layer, then is kept but no longer driven (another
        // server's, one of several per-core runtimes between turns, one kept for later).
        let first = runtime();
        first.block_on(async {
            serve(&layer, |after| after.run(async {})).await;
            drained(&tasks).await;
        });
        // Another runtime serves a request whose handler, on the request's own task, queues a
        // named callback and then early work: the early work must run where the request is
        // served, not on the first runtime, which nobody polls.
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let service = layer.layer(service_fn(move |_: Request<()>| {
            let flag = flag.clone();
            async move {
                let after = After::current();
                after.run_named("later", |_| async {});
                after.wait_until(async move { flag.store(true, Ordering::SeqCst) });
                Ok::<_, Infallible>(Response::new(Body::new()))
            }
        }));
        let idle = runtime().block_on(async {
            let response = service.oneshot(Request::new(())).await.unwrap();
            response.into_body().collect().await.unwrap();
            tokio::time::timeout(Duration::from_secs(2), tasks.idle()).await
        });
        assert!(
            ran.load(Ordering::SeqCst) && idle.is_ok(),
            "the early work went to the first runtime, which nobody drives ({:?})",
            tasks.stats()
        );
        drop(first);
    }

    #[tokio::test]
    async fn a_request_without_work_holds_no_bytes_and_one_with_many_counts_once() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        serve(&layer, |_| {}).await;
        assert_eq!(tasks.stats().held_bytes(), 0);
        let (release, released) = oneshot::channel::<()>();
        serve(&layer, move |after| {
            after.run(async move {
                let _ = released.await;
            });
            for _ in 0..10 {
                after.run(async {});
            }
        })
        .await;
        let held = tasks.stats().held_bytes();
        assert!(held > 0 && held < 512, "one snapshot, counted once: {held}");
        release.send(()).unwrap();
        drained(&tasks).await;
        eventually("the snapshot to be released", || {
            tasks.stats().held_bytes() == 0
        })
        .await;
    }

    #[tokio::test]
    async fn a_snapshot_cut_by_its_cap_is_counted_logged_and_marked() {
        let logs = Logs::capture();
        let layer = AfterLayer::new().snapshot(crate::SnapshotConfig::new().max_bytes(1_024));
        let tasks = layer.tasks();
        let seen = Arc::new(Mutex::new(None));
        let record = seen.clone();
        let service = layer.layer(service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            let record = record.clone();
            after.run_with(move |ctx| async move {
                let request = ctx.request();
                *record.lock().unwrap() = Some((
                    request.truncated(),
                    request.header("x-small").map(str::to_owned),
                ));
            });
            async { Ok::<_, Infallible>(Response::new(Body::new())) }
        }));
        for _ in 0..2 {
            let request = Request::builder()
                .uri("/upload")
                .header("x-small", "kept")
                .header("x-large", "l".repeat(4_096))
                .body(())
                .unwrap();
            let response = service.clone().oneshot(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
        drained(&tasks).await;
        assert_eq!(*seen.lock().unwrap(), Some((true, Some("kept".to_owned()))));
        assert_eq!(tasks.stats().truncated(), 2);
        let warnings = logs.lines_with("request snapshot truncated");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("WARN") && warnings[0].contains("cap of 1024 bytes"));
    }

    #[tokio::test]
    async fn a_replacement_at_the_bound_still_wins() {
        let layer = AfterLayer::new().max_pending(1);
        let tasks = layer.tasks();
        let ran = Arc::new(Mutex::new(Vec::new()));
        let log = ran.clone();
        serve(&layer, move |after| {
            for label in ["v1", "v2"] {
                let log = log.clone();
                after.run_named(
                    "save",
                    move |_| async move { log.lock().unwrap().push(label) },
                );
            }
        })
        .await;
        drained(&tasks).await;
        assert_eq!(*ran.lock().unwrap(), ["v2"]);
        let stats = tasks.stats();
        assert_eq!((stats.forgotten(), stats.shed()), (1, 0));
    }

    #[tokio::test]
    async fn a_callback_that_keeps_registering_work_does_not_starve_the_thread() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let other_ran = Arc::new(AtomicBool::new(false));
        let seen_other = Arc::new(AtomicBool::new(false));

        fn chain(left: u32, other_ran: Arc<AtomicBool>, seen_other: Arc<AtomicBool>) {
            After::current().run(async move {
                if left == 0 {
                    seen_other.store(other_ran.load(Ordering::SeqCst), Ordering::SeqCst);
                } else {
                    chain(left - 1, other_ran, seen_other);
                }
            });
        }

        let (other, seen) = (other_ran.clone(), seen_other.clone());
        serve(&layer, move |after| {
            after.run(async move {
                // Another task on this thread, which only runs if the driver yields.
                let flag = other.clone();
                tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
                chain(2_000, other, seen);
            });
        })
        .await;
        drained(&tasks).await;
        assert!(
            seen_other.load(Ordering::SeqCst),
            "the driver never yielded"
        );
        assert_eq!(tasks.stats().completed(), 2_002);
    }
}
