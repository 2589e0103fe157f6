//! The driver: the Tokio task that runs one request's work once the response has finished.
//!
//! Each request that registers work gets at most one driver at a time: it starts the callbacks
//! in registration order, polls them concurrently, and stops them when the request's budget, its
//! host's deadline or a shutdown's grace runs out. The common case, one callback registered by
//! the handler, costs one task and nothing else: that callback rides inline in the driver
//! (`Driver<C>`, generic over it), spawned at once and held until the response has finished.
//! Other work is boxed and queued in the request's scope, and the driver takes it from there.
//! A driver retires as soon as it has nothing left; work that arrives later spawns a new one.
//!
//! A driver arms its timers only once it actually has to wait: a Tokio `Sleep` for the budget,
//! and a waiter on its host's stop (on Lambda). Callbacks that end on their first poll (a log
//! line, a counter) never touch a timer. A shutdown whose grace ran out wakes no driver: each
//! reads the flag whenever it is woken, before it polls anything.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;
use tokio::time::Sleep;

use crate::request::callback::{BoxCallback, Callback, Callbacks, Running};
use crate::request::scope::Start;
use crate::request::stop::Stop;
use crate::request::Inflight;
use crate::tasks::stats::Ended;

pin_project! {
    /// The task that runs one request's work: the callback it was spawned with, if any, inline,
    /// and whatever it takes from the request's queue.
    pub(super) struct Driver<C> {
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
            } else if this.inflight.ledger().shutdown().is_fired() {
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
};

impl<C> Driver<C> {
    pub(super) fn new(inflight: Arc<Inflight>, first: Option<Running<C>>, start: Start) -> Self {
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
                this.first.is_some() && (*this.start == Start::Now || taken.response_finished());
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
            if let Some(why) = inflight.must_stop() {
                return stop_all(inflight, this.first, this.rest, this.done, why);
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
                Some(why) => stop_all(inflight, this.first, this.rest, this.done, why),
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
            let (host_stop, shutdown) = (host.stop_fired(), inflight.ledger().shutdown().fired());
            let either: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
                futures_util::future::select(host_stop, std::pin::pin!(shutdown)).await;
            });
            Box::new(either)
        });
        if host.is_none() && inflight.budget_deadline().is_none() {
            // Nothing to arm: early work before the end, or no budget.
            return inflight.stop_signalled();
        }
        *waits = Some(Box::pin(Waits { budget: None, host }));
    }
    let mut waits = waits.as_mut()?.as_mut().project();
    if let Some(host) = waits.host.as_mut() {
        let _ = host.as_mut().as_mut().poll(cx);
    }
    // The host's waiter was made before this check: a stop that comes after it wakes us.
    if let Some(why) = inflight.stop_signalled() {
        return Some(why);
    }
    // The deadline is known once the response finished; until then only early work runs.
    let deadline = inflight.budget_deadline()?;
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
fn stop_all<C: Callback>(
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

    use crate::test_util::{drained, eventually, serve, settle, Logs, TestBody, Then};
    use crate::{After, AfterLayer, MaxDuration};

    type Body = Empty<bytes::Bytes>;

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
