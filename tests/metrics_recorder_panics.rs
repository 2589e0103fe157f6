//! A metrics recorder is user code at every call the layer makes to it: one whose counters and
//! gauges all panic must lose no request, no callback and no pending place, and must never abort
//! the process (a gauge that panics while a callback is dropped during unwinding would). Its own
//! test binary: it installs the process's global recorder.
#![cfg(all(feature = "metrics", feature = "axum"))]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use tower::{Layer, ServiceExt};
use tower_after::{After, AfterLayer, AfterTasks, SnapshotConfig};

/// What the recorder panics with.
const FAILED: &str = "the recorder failed";

/// A counter and a gauge that panic whatever they are told.
struct Panics;

impl CounterFn for Panics {
    fn increment(&self, _: u64) {
        std::panic::panic_any(FAILED);
    }
    fn absolute(&self, _: u64) {
        std::panic::panic_any(FAILED);
    }
}

impl GaugeFn for Panics {
    fn increment(&self, _: f64) {
        std::panic::panic_any(FAILED);
    }
    fn decrement(&self, _: f64) {
        std::panic::panic_any(FAILED);
    }
    fn set(&self, _: f64) {
        std::panic::panic_any(FAILED);
    }
}

/// A recorder whose gauges panic, and its counters too unless `counters_panic` is false.
struct Record {
    counters_panic: bool,
}

impl Recorder for Record {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        if self.counters_panic {
            Counter::from_arc(Arc::new(Panics))
        } else {
            Counter::noop()
        }
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::new(Panics))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Installs the recorder whose counters and gauges all panic, for the whole process, and keeps
/// its (caught) panics out of the test output.
fn install() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&FAILED) {
                default(info);
            }
        }));
        metrics::set_global_recorder(Record {
            counters_panic: true,
        })
        .unwrap();
    });
}

/// A bug in a callback; typed `()`, so that a callback made of it returns `()` rather than `!`.
fn bug() {
    std::panic::panic_any("a bug in the callback")
}

/// Sends `GET path` with `headers` and reads the whole body; the status and the body.
async fn get_with(
    address: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (http::StatusCode, Bytes) {
    let mut request = Request::builder().uri(format!("http://{address}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = support::client()
        .request(request.body(Empty::new()).unwrap())
        .await
        .expect("the server answers");
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// Every total and gauge settled, with `completed` completed and nothing else ended.
fn assert_settled(tasks: &AfterTasks, completed: u64) {
    let stats = tasks.stats();
    assert_eq!(tasks.pending(), 0, "{stats:?}");
    assert_eq!(
        (stats.scheduled(), stats.completed()),
        (completed, completed),
        "{stats:?}"
    );
    let others = stats.failed() + stats.panicked() + stats.timed_out() + stats.cancelled();
    assert_eq!(others + stats.forgotten() + stats.shed(), 0, "{stats:?}");
    assert_eq!((stats.running(), stats.queued()), (0, 0), "{stats:?}");
}

/// Work of every kind, from many requests at once, queued under a concurrency limit: each
/// registration, start, wait, ending and drain calls the recorder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_work_runs_and_is_counted_when_every_recorder_call_panics() {
    install();
    const REQUESTS: u64 = 20;
    const PER_REQUEST: u64 = 5;
    let layer = AfterLayer::new().concurrency_limit(2);
    let tasks = layer.tasks();
    let ran = Arc::new(AtomicU64::new(0));
    let count = ran.clone();
    let app = Router::new()
        .route(
            "/",
            get(move |later: After| {
                let count = count.clone();
                async move {
                    let add = |count: &Arc<AtomicU64>| {
                        let count = count.clone();
                        move || {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                    };
                    let (run, with, early, named, blocking) = (
                        add(&count),
                        add(&count),
                        add(&count),
                        add(&count),
                        add(&count),
                    );
                    later.run(async move {
                        tokio::task::yield_now().await;
                        run();
                    });
                    later.run_with(move |_| async move { with() });
                    later.wait_until(async move { early() });
                    later.run_named("audit", move |_| async move { named() });
                    later.run_blocking(move |_| blocking());
                    "ok"
                }
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    let batch = || async {
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..REQUESTS {
            requests.spawn(async move { get_with(address, "/", &[]).await });
        }
        while let Some(answer) = requests.join_next().await {
            let (status, body) = answer.expect("a request panicked");
            assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..]));
        }
    };

    batch().await;
    support::within("idle", tasks.idle()).await;
    assert_eq!(ran.load(Ordering::SeqCst), REQUESTS * PER_REQUEST);
    assert_settled(&tasks, REQUESTS * PER_REQUEST);

    // A drain that ends in time: nothing cancelled, nothing written off.
    batch().await;
    let report = support::within("the shutdown", tasks.shutdown(Duration::from_secs(20))).await;
    assert_eq!(report.cancelled(), 0, "{report:?}");
    assert_eq!(ran.load(Ordering::SeqCst), 2 * REQUESTS * PER_REQUEST);
    assert_settled(&tasks, 2 * REQUESTS * PER_REQUEST);

    // And the layer works as before.
    batch().await;
    support::within("idle", tasks.idle()).await;
    assert_settled(&tasks, 3 * REQUESTS * PER_REQUEST);
}

/// A callback that panics, one cut by its budget, one that completes: each leaves its gauge and
/// the pending count, through a recorder that panics, without aborting the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_callback_and_one_cut_by_its_budget_are_counted() {
    install();
    let layer = AfterLayer::new()
        .max_duration(Duration::from_secs(1))
        .concurrency_limit(8);
    let tasks = layer.tasks();
    let app = Router::new()
        .route(
            "/",
            get(|later: After| async move {
                later.run(async { bug() });
                later.run(std::future::pending::<()>());
                later.run_with(|_| async {});
                "ok"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    for _ in 0..3 {
        let (status, _) = get_with(address, "/", &[]).await;
        assert_eq!(status, 200);
    }
    support::within("idle", tasks.idle()).await;
    let stats = tasks.stats();
    assert_eq!(
        (
            stats.scheduled(),
            stats.completed(),
            stats.panicked(),
            stats.timed_out()
        ),
        (9, 3, 3, 3),
        "{stats:?}"
    );
    assert_eq!(stats.cancelled(), 0, "{stats:?}");
    assert_eq!((stats.running(), stats.queued()), (0, 0), "{stats:?}");
}

/// A shutdown whose grace runs out closes the layer, writes off what is pending and tells the
/// drivers to stop, calling the recorder meanwhile: it keeps its deadline, and work registered
/// later is refused as shut down, not lost to a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_writes_off_keeps_its_deadline_and_later_work_is_refused() {
    install();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let kept = Arc::new(Mutex::new(None::<After>));
    let keep = kept.clone();
    let app = Router::new()
        .route(
            "/forever",
            get(move |later: After| async move {
                later.run(std::future::pending::<()>());
                *keep.lock().unwrap() = Some(later);
                "ok"
            }),
        )
        .route(
            "/try",
            get(|later: After| async move {
                match later.try_run(async {}) {
                    Ok(()) => "taken",
                    Err(refused) if refused.is_shut_down() => "shut down",
                    Err(_) => "refused",
                }
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    let (status, _) = get_with(address, "/forever", &[]).await;
    assert_eq!(status, 200);
    support::eventually("the callback to start", || tasks.stats().running() == 1).await;

    let begun = Instant::now();
    let report = support::within("the shutdown", tasks.shutdown(Duration::from_millis(100))).await;
    let took = begun.elapsed();
    assert!(took < Duration::from_secs(5), "the shutdown took {took:?}");
    assert_eq!((report.cancelled(), report.completed()), (1, 0));
    assert_eq!(tasks.pending(), 0);

    let later = kept.lock().unwrap().take().unwrap();
    let refused = later.try_run(async {}).unwrap_err();
    assert!(refused.is_shut_down(), "{refused}");
    later.run(async {});
    let (status, body) = get_with(address, "/try", &[]).await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"shut down"[..]));
    support::within("idle", tasks.idle()).await;
    let stats = tasks.stats();
    assert_eq!(
        (stats.scheduled(), stats.cancelled(), stats.shed()),
        (1, 1, 0),
        "{stats:?}"
    );
}

/// A snapshot cut by its cap is counted, and published, as the request enters the layer: the
/// request is served and its work runs, seeing the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_snapshot_does_not_panic_the_server() {
    install();
    let layer = AfterLayer::new().snapshot(SnapshotConfig::new().max_bytes(64));
    let tasks = layer.tasks();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = Router::new()
        .route(
            "/",
            get(move |later: After| {
                let record = record.clone();
                async move {
                    later.run_with(move |ctx| async move {
                        record.lock().unwrap().push(ctx.request().truncated());
                    });
                    "ok"
                }
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    let large = "l".repeat(1024);
    let (status, body) = get_with(address, "/", &[("x-large", &large)]).await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..]));
    support::within("idle", tasks.idle()).await;
    assert_eq!(*seen.lock().unwrap(), [true]);
    let stats = tasks.stats();
    assert_eq!((stats.truncated(), stats.completed()), (1, 1), "{stats:?}");
}

/// With counters that work and gauges that panic, a callback gets as far as its gauge: a
/// queued callback's gauge panicking as it starts would unwind through the callbacks that
/// hold their place in the gauges, and each one's drop calls the gauge again, while unwinding:
/// that aborts the process. The panic is said at `ERROR`.
#[test]
fn a_gauge_that_panics_as_callbacks_start_and_end_does_not_abort() {
    // A recorder for this thread only, and a runtime on this thread only: no other test of this
    // binary sees it.
    install();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let recorder = Record {
        counters_panic: false,
    };
    let logs = support::Logs::capture();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let layer = AfterLayer::new()
                .max_duration(Duration::from_secs(1))
                .concurrency_limit(1);
            let tasks = layer.tasks();
            let service = layer.layer(tower::service_fn(|request: Request<()>| {
                let later = request.extensions().get::<After>().unwrap().clone();
                async move {
                    later.run(async {});
                    later.run(async { bug() });
                    later.run(async { tokio::task::yield_now().await });
                    later.run(std::future::pending::<()>());
                    Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
                }
            }));
            let response = service.oneshot(Request::new(())).await.unwrap();
            response.into_body().collect().await.unwrap();
            support::within("idle", tasks.idle()).await;
            let stats = tasks.stats();
            assert_eq!(
                (
                    stats.completed(),
                    stats.panicked(),
                    stats.timed_out(),
                    stats.cancelled()
                ),
                (2, 1, 1, 0),
                "{stats:?}"
            );
            assert_eq!((stats.running(), stats.queued()), (0, 0), "{stats:?}");
        });
    });
    let text = logs.text();
    assert!(
        text.contains("ERROR") && text.contains("the metrics recorder panicked"),
        "a recorder that panics is not said: {text}"
    );
}
