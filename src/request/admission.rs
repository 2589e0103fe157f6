//! Whether a request may take one more callback, and the bytes its snapshot holds meanwhile: the
//! one home of held bytes on the request's side (the layer's total is `tasks::ledger`'s).
//!
//! A callback is admitted with a `Ticket`: a place among the layer's pending callbacks
//! (`AfterLayer::max_pending`) and, with the request's first work, its snapshot counted in the
//! layer's held bytes (`AfterLayer::max_held_bytes`). A refusal is logged here, at most once a
//! second with a count. The snapshot's bytes are let go once the request's work is done (its
//! scope says so), or when the request is dropped with them still counted.

use std::sync::atomic::Ordering;

use crate::request::{Inflight, Terms, HELD};
use crate::tasks::ledger::Ticket;
use crate::tasks::refusal::{Overloaded, Refused};
use crate::tasks::stats::Ended;

impl Inflight {
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

    /// Lets go of what the request held for its work, as far as that work is over: after a
    /// driver retired, work was abandoned or forgotten, or the handler left a value too late.
    /// The scope says, since the response may have finished without its work being handed over
    /// yet (on Lambda, until the invocation's response is posted), or new work may have been
    /// queued meanwhile. With nothing running or waiting, the snapshot's place in the held bytes
    /// goes at once, even before the response finished (early work that ended): `idle()` waits
    /// for the held bytes too. What the handler left goes once the response finished as well:
    /// callbacks registered until then may read it.
    pub(crate) fn let_go_if_done(&self) {
        // The flags first: a request that holds neither needs no lock.
        let (held, used) = (self.terms.is_held(), self.data.is_used());
        if !(held || used) {
            return;
        }
        let Some(finished) = self.scope.at_rest() else {
            return;
        };
        if held {
            self.release_bytes();
        }
        if finished && used {
            self.data.clear();
        }
    }

    /// Lets go of what the request held for its work, now done: its snapshot's place in the
    /// held bytes (a handle kept after the work, by a task or a socket, holds none under
    /// `max_held_bytes`; work registered through it later takes one again), and what the
    /// handler left (`After::insert`), so that a value holding the request's own handle cannot
    /// keep the request alive for good.
    pub(super) fn let_go(&self) {
        self.release_bytes();
        if self.data.is_used() {
            self.data.clear();
        }
    }

    pub(super) fn release_bytes(&self) {
        // A load first: a request that registered no work never counted its snapshot.
        // Work registered elsewhere while this runs may find the snapshot still counted and
        // then run uncounted; it is never released twice.
        if self.terms.is_held() && self.terms.release() {
            self.ledger().release_bytes(self.snapshot.held_bytes());
        }
    }

    /// A place in the ledger for a callback, or why not (logged, at most once a second).
    pub(super) fn ticket(&self, name: Option<&str>, bound: usize) -> Result<Ticket, Overloaded> {
        let max_pending = self.config.max_pending;
        let max_held_bytes = self.config.max_held_bytes;
        self.ledger()
            .ticket(bound)
            .and_then(|mut ticket| match self.hold_snapshot() {
                Ok(()) => Ok(ticket),
                Err(refused) => {
                    ticket.close(Ended::Shed);
                    Err(refused)
                }
            })
            .map_err(|refused| {
                let overloaded = Overloaded::new(refused.why, max_pending, max_held_bytes);
                if let Some(count) = refused.warn {
                    tracing::warn!(
                        method = %self.snapshot.method(),
                        path = self.snapshot.path(),
                        request_id = self.snapshot.request_id(),
                        name,
                        refused = count,
                        "after callback refused: {}",
                        overloaded.cause()
                    );
                }
                overloaded
            })
    }

    /// Counts the snapshot's bytes in the layer's total, once, when the request's first work
    /// comes: a request without work holds its snapshot only while it is served.
    pub(super) fn hold_snapshot(&self) -> Result<(), Refused> {
        if self.terms.is_held() {
            return Ok(());
        }
        let bytes = self.snapshot.held_bytes();
        self.ledger()
            .hold_bytes(bytes, self.config.max_held_bytes)?;
        if !self.terms.hold() {
            // Another thread counted it meanwhile.
            self.ledger().release_bytes(bytes);
        }
        Ok(())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        // Work that never ended (its runtime went away) still held its place.
        if self.terms.is_held() {
            self.config.ledger.release_bytes(self.snapshot.held_bytes());
        }
    }
}

/// The request's side of the held bytes: whether its snapshot is counted, in the top bit of
/// its terms.
impl Terms {
    pub(super) fn is_held(&self) -> bool {
        // Relaxed: a hint, stale at worst (see `Inflight::release_bytes`); `hold` and `release`
        // decide. In `Drop`, dropping the last `Arc` orders every `hold` before it.
        self.0.load(Ordering::Relaxed) & HELD != 0
    }

    /// Marks the snapshot counted: `false` if it already was.
    pub(super) fn hold(&self) -> bool {
        // Release, pairing with the Acquire in `release`: the bytes counted before this
        // (`Ledger::hold_bytes`) come before their uncounting, so the total never wraps below 0.
        self.0.fetch_or(HELD, Ordering::Release) & HELD == 0
    }

    /// Marks the snapshot no longer counted: `true` if it was, for whoever then uncounts it.
    pub(super) fn release(&self) -> bool {
        // Acquire, pairing with the Release in `hold`; nothing for a later `hold` to acquire.
        // Exactly once needs no ordering: one atomic's read-modify-writes are totally ordered.
        self.0.fetch_and(!HELD, Ordering::Acquire) & HELD != 0
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

    use crate::test_util::{drained, eventually, fail, serve, settle, Logs, TestBody, Then};
    use crate::{After, AfterLayer};

    type Body = Empty<bytes::Bytes>;

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
}
