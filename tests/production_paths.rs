//! Paths a production server takes that the happy path does not: a panic inside a synchronous
//! `Service::call`, shutdowns that must keep their deadline whatever the callbacks do, and
//! handles carried to other tasks and runtimes.
//!
//! Each test bounds a wait the crate promises (a shutdown's grace), so it measures elapsed time,
//! with a margin far above any scheduling noise: the callbacks involved block for seconds.

mod support;

use std::convert::Infallible;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use tower::{Layer, Service, ServiceExt};
use tower_after::{After, AfterLayer, AfterTasks, Completion};

/// How long a blocking callback blocks: far longer than any grace given here.
const BLOCKED: Duration = Duration::from_millis(2500);
const GRACE: Duration = Duration::from_millis(200);
/// What a shutdown may take beyond its grace in these tests (the crate aims for far less).
const MARGIN: Duration = Duration::from_millis(900);

/// A Tower service that registers work in its synchronous `call`, then panics there.
#[derive(Clone)]
struct PanicsInCall {
    seen: Arc<Mutex<Vec<Completion>>>,
}

impl Service<Request<()>> for PanicsInCall {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<()>) -> Self::Future {
        let after = request.extensions().get::<After>().unwrap();
        let seen = self.seen.clone();
        after.run_with(move |ctx| async move {
            seen.lock().unwrap().push(ctx.outcome().completion());
        });
        panic!("bug in a synchronous middleware");
    }
}

#[tokio::test]
async fn a_panic_in_a_synchronous_call_still_runs_the_work_as_failed() {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut service = layer.layer(PanicsInCall { seen: seen.clone() });
    let called = catch_unwind(AssertUnwindSafe(|| service.call(Request::new(()))));
    assert!(called.is_err(), "the panic must reach the caller");
    wait_idle(&tasks).await;
    assert_eq!(*seen.lock().unwrap(), [Completion::Failed]);
    assert_eq!(tasks.stats().completed(), 1);
}

/// Serves one request through `layer` whose handler registers work with `register`, and reads
/// its response to the end, so that the work starts.
async fn serve(layer: &AfterLayer, register: impl FnOnce(&After) + Send + 'static) {
    let register = Mutex::new(Some(register));
    let service = layer.layer(tower::service_fn(move |request: Request<()>| {
        let after = request.extensions().get::<After>().unwrap().clone();
        (register.lock().unwrap().take().unwrap())(&after);
        async { Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())) }
    }));
    let response = service.oneshot(Request::new(())).await.unwrap();
    response.into_body().collect().await.unwrap();
}

async fn wait_idle(tasks: &AfterTasks) {
    tokio::time::timeout(Duration::from_secs(20), tasks.idle())
        .await
        .expect("pending callbacks never ended");
}

/// Waits until `check` holds, for at most 20 s.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Serves one request whose callback blocks its thread for `BLOCKED`; returns a flag set once
/// the callback started.
async fn serve_a_blocking_callback(layer: &AfterLayer) -> Arc<AtomicBool> {
    let started = Arc::new(AtomicBool::new(false));
    let flag = started.clone();
    serve(layer, move |after| {
        after.run(async move {
            flag.store(true, Ordering::SeqCst);
            // A blocking call where an `.await` belongs: the driver cannot stop it.
            std::thread::sleep(BLOCKED);
        });
    })
    .await;
    started
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_its_grace_when_a_callback_blocks_inside_its_poll() {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let started = serve_a_blocking_callback(&layer).await;
    eventually("the callback to start", || started.load(Ordering::SeqCst)).await;

    let begun = Instant::now();
    let report = tasks.shutdown(GRACE).await;
    let took = begun.elapsed();
    assert!(took < GRACE + MARGIN, "shutdown took {took:?}");
    assert_eq!((report.completed(), report.cancelled()), (0, 1));

    // It ends later by itself; no later drain counts it again.
    let later = tasks.shutdown(Duration::from_secs(20)).await;
    assert_eq!((later.completed(), later.cancelled()), (0, 0));
    assert_eq!(tasks.pending(), 0);
    // The report called it cancelled; so do the stats, even once it ended by itself.
    eventually("the blocked callback to end", || {
        tasks.stats().running() == 0
    })
    .await;
    let stats = tasks.stats();
    assert_eq!((stats.completed(), stats.cancelled()), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_its_grace_with_blocking_work_and_callbacks_waiting_for_a_place() {
    let layer = AfterLayer::new().concurrency_limit(1);
    let tasks = layer.tasks();
    let started = Arc::new(AtomicBool::new(false));
    let flag = started.clone();
    serve(&layer, move |after| {
        after.run_blocking(move |_| {
            flag.store(true, Ordering::SeqCst);
            std::thread::sleep(BLOCKED);
        });
        // Waits for the blocking one's place.
        after.run(async {});
    })
    .await;
    eventually("the blocking callback to start", || {
        started.load(Ordering::SeqCst) && tasks.stats().queued() == 1
    })
    .await;

    let begun = Instant::now();
    let report = tasks.shutdown(GRACE).await;
    let took = begun.elapsed();
    assert!(took < GRACE + MARGIN, "shutdown took {took:?}");
    assert_eq!((report.completed(), report.cancelled()), (0, 2));
}

#[test]
fn shutdown_keeps_its_grace_when_the_callbacks_runtime_is_not_driven() {
    // The callbacks' runtime stops being driven (its thread is busy elsewhere, or it is simply
    // never polled again); the shutdown runs on another one.
    let serving = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    serving.block_on(serve(&layer, |after| {
        after.run(std::future::pending::<()>());
    }));
    assert_eq!(tasks.pending(), 1);

    let draining = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let begun = Instant::now();
    let report = draining.block_on(tasks.shutdown(GRACE));
    let took = begun.elapsed();
    assert!(took < GRACE + MARGIN, "shutdown took {took:?}");
    assert_eq!((report.completed(), report.cancelled()), (0, 1));
    drop(serving);
    assert_eq!(
        tasks.pending(),
        0,
        "dropping the runtime dropped the callback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shutdowns_never_count_a_callback_twice() {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    // Each in a request of its own, so that the blocking one holds up only its own driver.
    // Ends by itself within both graces:
    serve(&layer, |after| {
        after.run(tokio::time::sleep(Duration::from_millis(50)))
    })
    .await;
    // Blocks past the shorter grace:
    serve(&layer, |after| {
        after.run(async { std::thread::sleep(Duration::from_millis(1200)) })
    })
    .await;
    // Never ends by itself:
    serve(&layer, |after| after.run(std::future::pending::<()>())).await;
    let (short, long) = tokio::join!(
        tasks.shutdown(GRACE),
        tasks.shutdown(Duration::from_secs(20)),
    );
    let total = short.completed() + short.cancelled() + long.completed() + long.cancelled();
    assert_eq!(total, 3, "short: {short:?}, long: {long:?}");
    assert_eq!(
        short.completed() + long.completed(),
        1,
        "short: {short:?}, long: {long:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn shutdown_keeps_its_grace_when_every_worker_is_blocked() {
    // Tokio's timers are driven by its workers: with the only one blocked, only a deadline kept
    // outside the runtime can end the wait.
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let started = serve_a_blocking_callback(&layer).await;
    // Not a Tokio timer: the worker is about to be blocked.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !started.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the callback never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let begun = Instant::now();
    let report = tasks.shutdown(GRACE).await;
    let took = begun.elapsed();
    assert!(took < GRACE + MARGIN, "shutdown took {took:?}");
    assert_eq!((report.completed(), report.cancelled()), (0, 1));
}

/// How each response ended, and its body bytes, as an `after_each` hook saw them.
type Endings = Arc<Mutex<Vec<(Completion, u64)>>>;

/// `layer`, with an `after_each` hook that records how each response ended.
fn recording(layer: AfterLayer) -> (AfterLayer, Endings) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let layer = layer.after_each(move |ctx| {
        let log = log.clone();
        async move {
            let outcome = ctx.outcome();
            log.lock()
                .unwrap()
                .push((outcome.completion(), outcome.body_bytes()));
        }
    });
    (layer, seen)
}

#[tokio::test]
async fn a_streamed_body_with_a_content_length_is_complete_over_http1() {
    // As tower-http's `ServeFile` answers: a stream, and its length in a header. hyper stops
    // polling once that many bytes are out, and drops the body.
    let (layer, seen) = recording(AfterLayer::new());
    let tasks = layer.tasks();
    let app = axum::Router::new()
        .route(
            "/file",
            axum::routing::get(|| async {
                let chunks = futures_util::stream::iter([
                    Ok::<_, Infallible>(Bytes::from_static(b"123")),
                    Ok(Bytes::from_static(b"45")),
                ]);
                (
                    [(http::header::CONTENT_LENGTH, "5")],
                    axum::body::Body::from_stream(chunks),
                )
            }),
        )
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let response = client
        .get(format!("http://{address}/file").parse().unwrap())
        .await
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"12345");
    wait_idle(&tasks).await;
    assert_eq!(*seen.lock().unwrap(), [(Completion::Complete, 5)]);
}

/// A response body with a bug: it panics when polled.
struct PanickingBody;

impl http_body::Body for PanickingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        panic!("bug in a streaming body")
    }
}

#[tokio::test]
async fn a_panicking_body_is_a_body_error_not_a_client_that_left() {
    let (layer, seen) = recording(AfterLayer::new());
    let tasks = layer.tasks();
    let service = layer.layer(tower::service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(PanickingBody))
    }));
    let body = service.oneshot(Request::new(())).await.unwrap().into_body();
    let read = tokio::spawn(async move { body.collect().await }).await;
    assert!(read.unwrap_err().is_panic());
    wait_idle(&tasks).await;
    assert_eq!(*seen.lock().unwrap(), [(Completion::BodyError, 0)]);
}

/// A panic payload whose own `Drop` panics.
struct PanicsWhenDropped;

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("the payload's drop");
        }
    }
}

/// Panics with `payload`; typed `()`, so that a callback made of it returns `()` rather than `!`.
fn panic_with(payload: PanicsWhenDropped) {
    std::panic::panic_any(payload)
}

#[tokio::test]
async fn a_panic_whose_payload_panics_on_drop_is_one_panicked_callback() {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    serve(&layer, |after| {
        after.run(async { panic_with(PanicsWhenDropped) });
        // Its sibling must not pay for it.
        after.run(tokio::task::yield_now());
    })
    .await;
    wait_idle(&tasks).await;
    let stats = tasks.stats();
    assert_eq!(
        (stats.panicked(), stats.completed(), stats.cancelled()),
        (1, 1, 0)
    );
}

/// Middleware that runs the rest of the request in a task of its own (to finish handlers whose
/// client left, or to isolate their panics) must not cut the handler off from its `After`.
#[cfg(feature = "axum")]
#[tokio::test]
async fn the_extractor_works_when_middleware_spawns_the_rest_of_the_request() {
    use axum::middleware::{self, Next};
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move |later: After| async move {
                later.run(async move { flag.store(true, Ordering::SeqCst) });
                "ok"
            }),
        )
        .layer(middleware::from_fn(
            |request: axum::extract::Request, next: Next| async move {
                tokio::spawn(next.run(request)).await.expect("no panic")
            },
        ))
        .layer(layer);
    let response = app
        .oneshot(Request::new(axum::body::Body::empty()))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    wait_idle(&tasks).await;
    assert!(ran.load(Ordering::SeqCst), "{:?}", tasks.stats());
}

/// Serves one request whose handler hands its `After` to `register`, which registers a
/// callback from somewhere else than the request's task; returns whether the callback ran.
async fn registered_elsewhere(register: fn(After, Arc<AtomicBool>)) -> bool {
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let service = layer.layer(tower::service_fn(move |request: Request<()>| {
        let later = request.extensions().get::<After>().unwrap().clone();
        let flag = flag.clone();
        async move {
            tokio::task::spawn_blocking(move || register(later, flag))
                .await
                .unwrap();
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }
    }));
    let response = service.oneshot(Request::new(())).await.unwrap();
    response.into_body().collect().await.unwrap();
    wait_idle(&tasks).await;
    ran.load(Ordering::SeqCst)
}

/// A helper that registers from a short-lived runtime of its own: the callback must outlive it,
/// on the runtime that serves the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_registered_inside_a_temporary_runtime_runs_on_the_serving_one() {
    let ran = registered_elsewhere(|later, flag| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            later.run(async move { flag.store(true, Ordering::SeqCst) });
        });
    })
    .await;
    assert!(ran);
}

/// A helper on a second runtime built without timers (a CPU pool, say): the callback must not
/// depend on that runtime's drivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_registered_on_a_runtime_without_timers_still_runs() {
    let ran = registered_elsewhere(|later, flag| {
        let cpu = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        cpu.block_on(async move {
            later.run(async move {
                // Pending once, so that its driver arms the budget's timer.
                tokio::task::yield_now().await;
                flag.store(true, Ordering::SeqCst);
            });
        });
        drop(cpu);
    })
    .await;
    assert!(ran);
}

/// A fresh layer, and the `After` of its only request, which registered nothing, handed out:
/// the layer knows the runtime that serves it from taking that request.
async fn served_with_a_handle_out() -> (AfterLayer, After) {
    let layer = AfterLayer::new();
    let (send, receive) = std::sync::mpsc::channel();
    serve(&layer, move |after| send.send(after.clone()).unwrap()).await;
    (layer, receive.recv().unwrap())
}

/// Late work that sleeps, then sets the flag it returns.
fn late_work() -> (
    impl std::future::Future<Output = ()> + Send + 'static,
    Arc<AtomicBool>,
) {
    let ran = Arc::new(AtomicBool::new(false));
    let flag = ran.clone();
    let work = async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        flag.store(true, Ordering::SeqCst);
    };
    (work, ran)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_work_from_a_plain_thread_runs_on_the_serving_runtime() {
    let (layer, after) = served_with_a_handle_out().await;
    let (work, ran) = late_work();
    std::thread::spawn(move || after.run(work)).join().unwrap();
    wait_idle(&layer.tasks()).await;
    assert!(ran.load(Ordering::SeqCst));
    assert_eq!(layer.tasks().stats().cancelled(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_work_from_a_temporary_runtime_outlives_it() {
    let (layer, after) = served_with_a_handle_out().await;
    let (work, ran) = late_work();
    tokio::task::spawn_blocking(move || {
        let helper = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        helper.block_on(async move { after.run(work) });
        // The helper's runtime ends here, before the work does.
    })
    .await
    .unwrap();
    wait_idle(&layer.tasks()).await;
    assert!(ran.load(Ordering::SeqCst));
    assert_eq!(layer.tasks().stats().cancelled(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_idle_announces_the_gauges_already_say() {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    for round in 0..300 {
        serve(&layer, |after| {
            after.run(async { tokio::task::yield_now().await });
        })
        .await;
        wait_idle(&tasks).await;
        let stats = tasks.stats();
        assert_eq!(
            (stats.running(), stats.queued(), stats.completed()),
            (0, 0, round + 1),
            "round {round}"
        );
    }
}

/// Threads of this process whose name starts with `prefix` (Linux only: `None` elsewhere).
fn threads_named(prefix: &str) -> Option<usize> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    let count = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count();
    Some(count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_are_kept_by_one_thread_however_many_waits() {
    let Some(before) = threads_named("tower-after") else {
        eprintln!("skipped: /proc/self/task is Linux's");
        return;
    };
    // Another test of this process may have started it already.
    assert!(before <= 1, "{before} deadline threads");
    // Five drains wait at once, each on a layer with a callback that outlives its grace.
    let mut drains = Vec::new();
    for _ in 0..5 {
        let layer = AfterLayer::new();
        serve(&layer, |after| {
            after.run(tokio::time::sleep(Duration::from_secs(30)));
        })
        .await;
        let tasks = layer.tasks();
        drains.push(tokio::spawn(async move {
            tasks.shutdown(Duration::from_millis(500)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = threads_named("tower-after");
    for drain in drains {
        assert_eq!(drain.await.unwrap().cancelled(), 1);
    }
    assert_eq!(during, Some(1), "one thread keeps every deadline");
}

/// `AfterLayer::max_held_bytes`: a request's snapshot counts from its first callback until its
/// last one ended, not for as long as a clone of its `After` lives (kept by a long-lived task: a
/// WebSocket, a subscription, a job that may register more later). Otherwise the layer would
/// shed new work with nothing pending.
#[tokio::test]
async fn a_kept_handle_does_not_keep_the_snapshot_counted_once_the_work_ended() {
    // Room for about one snapshot of 1 KiB of headers.
    let layer = AfterLayer::new().max_held_bytes(1_500);
    let tasks = layer.tasks();
    let kept = Arc::new(std::sync::Mutex::new(Vec::<After>::new()));
    let keep = kept.clone();
    let service = layer.layer(tower::service_fn(move |request: Request<()>| {
        let after = request.extensions().get::<After>().unwrap().clone();
        let accepted = after.try_run(async {}).is_ok();
        keep.lock().unwrap().push(after);
        async move {
            let mut response = Response::new(Empty::<Bytes>::new());
            response.extensions_mut().insert(accepted);
            Ok::<_, Infallible>(response)
        }
    }));
    for round in 0..2 {
        let request = Request::builder()
            .header("x-data", "d".repeat(1_000))
            .body(())
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        let accepted = *response.extensions().get::<bool>().unwrap();
        response.into_body().collect().await.unwrap();
        wait_idle(&tasks).await;
        assert!(
            accepted,
            "round {round}: work refused with nothing pending: {:?}",
            tasks.stats()
        );
        // Released as the request's driver retires, a moment after its last callback ended.
        eventually("the snapshot's bytes released", || {
            tasks.stats().held_bytes() == 0
        })
        .await;
    }
}

/// `idle()` promises every gauge back at zero when it resolves, and so does a drain that ended
/// in time: `held_bytes` too, though a request's snapshot is let go as its driver retires, after
/// its last callback left the pending count. Many requests at once through a real server, each
/// with a callback, some with early work too, on two workers: right after `idle()`, a driver
/// still retiring held its snapshot.
#[cfg(feature = "axum")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_a_drain_in_time_leave_every_gauge_at_zero() {
    const ROUNDS: usize = 150;
    const REQUESTS: usize = 16;
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(|later: After| async move {
                later.run(tokio::task::yield_now());
                "ok"
            }),
        )
        .route(
            "/early",
            axum::routing::get(|later: After| async move {
                later.wait_until(tokio::task::yield_now());
                later.run(async {});
                "ok"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    let client = support::client();
    let batch = || async {
        let mut requests = tokio::task::JoinSet::new();
        for request in 0..REQUESTS {
            let path = if request % 3 == 0 { "/early" } else { "/" };
            let uri = format!("http://{address}{path}").parse().unwrap();
            let client = client.clone();
            requests.spawn(async move {
                let response = client.get(uri).await.unwrap();
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.unwrap();
            });
        }
        while let Some(request) = requests.join_next().await {
            request.unwrap();
        }
    };
    let gauges = |tasks: &AfterTasks| {
        let stats = tasks.stats();
        ((stats.held_bytes(), stats.running(), stats.queued()), stats)
    };
    let begun = Instant::now();
    for round in 0..ROUNDS {
        batch().await;
        wait_idle(&tasks).await;
        let (gauges, stats) = gauges(&tasks);
        assert_eq!(gauges, (0, 0, 0), "round {round}, after idle(): {stats:?}");
        // Bounded in time on a slow machine: enough rounds to catch it, not all of them.
        if begun.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    for round in 0..20 {
        batch().await;
        let report = tasks.shutdown(Duration::from_secs(20)).await;
        assert_eq!(report.cancelled(), 0, "{report:?}");
        let (gauges, stats) = gauges(&tasks);
        assert_eq!(gauges, (0, 0, 0), "round {round}, after a drain: {stats:?}");
    }
}

/// `idle()` waits for the held bytes too, but not for a response still being sent whose work is
/// over: early work that ended, and a named callback forgotten before the end, let go of the
/// snapshot at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_does_not_wait_for_a_response_still_streaming_whose_work_is_over() {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let service = layer.layer(tower::service_fn(|request: Request<()>| {
        let after = request.extensions().get::<After>().unwrap().clone();
        async move {
            after.wait_until(tokio::task::yield_now());
            after.run_named("audit", |_| async {});
            assert!(after.forget("audit"));
            // A stream that is still being sent.
            let stream =
                futures_util::stream::pending::<Result<http_body::Frame<Bytes>, Infallible>>();
            Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(stream)))
        }
    }));
    let response = service.oneshot(Request::new(())).await.unwrap();
    wait_idle(&tasks).await;
    let stats = tasks.stats();
    assert_eq!(
        (stats.completed(), stats.forgotten(), stats.held_bytes()),
        (1, 1, 0),
        "{stats:?}"
    );
    drop(response);
    wait_idle(&tasks).await;
    assert_eq!(tasks.stats().held_bytes(), 0);
}
