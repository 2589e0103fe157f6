//! How a request's work reaches a driver: registered work is queued in the request's scope (or
//! carried by a driver spawned for it at once), and handed over when the response finishes.
//!
//! The scope decides, under its lock, what must happen next ([`Next`]); this module does it,
//! outside the lock: spawn a driver on the runtime that serves the request, or wake the one that
//! waits.

use std::borrow::Cow;
use std::panic::Location;
use std::sync::Arc;

use http::StatusCode;
use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::record::outcome::{Completion, Outcome};
use crate::request::callback::{callback_span, BoxCallback, Callback, Job, Running, WithContext};
use crate::request::driver::Driver;
use crate::request::scope::{Next, Start};
use crate::request::{Inflight, REQUEST};
use crate::tasks::ledger::Ticket;
use crate::tasks::refusal::Overloaded;
use crate::tasks::stats::Ended;

impl Inflight {
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
                    runtime.spawn(REQUEST.scope(self.clone(), driver));
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
            // It may have been the request's only work.
            self.let_go_if_done();
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
    pub(super) fn hand_over(self: &Arc<Self>, hook: Option<Job>) {
        let next = self.scope.finish(hook);
        // Done already (nothing registered, or only early work that ended): let go now.
        // Otherwise the driver lets go when it retires.
        let done = matches!(next, Next::Done);
        self.act(next, true);
        if done {
            self.let_go();
        }
    }

    /// Does what the scope asks. `serving`: called where the request is served (its response's
    /// future or body, or its own task), whose runtime is the request's.
    pub(super) fn act(self: &Arc<Self>, next: Next, serving: bool) {
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
    pub(super) fn spawn(self: &Arc<Self>, serving: bool) {
        let current = Handle::try_current().ok();
        let runtime = if serving {
            current.or_else(|| self.ledger().serving().handle())
        } else {
            self.ledger().serving().handle().or(current)
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
            self.ledger().serving().remember(&runtime);
        }
        let driver = Driver::<BoxCallback>::new(self.clone(), None, Start::Now);
        runtime.spawn(REQUEST.scope(self.clone(), driver));
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
    use tower::{service_fn, Layer, ServiceExt};

    use crate::test_util::{drained, serve};
    use crate::{After, AfterLayer};

    type Body = Empty<bytes::Bytes>;

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
}
