//! Cooperative cancellation: `AfterContext::stopping` tells a callback that a shutdown started
//! or that its budget nears its end, so it can commit what it has before it is dropped.
#![cfg(feature = "axum")]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use tower_after::{After, AfterContext, AfterLayer, AfterTasks};

/// Rows written in batches: `committed` counts the rows that reached the store.
#[derive(Clone, Default)]
struct Store {
    committed: Arc<AtomicUsize>,
}

/// Imports rows one every 10 ms, for far longer than anyone waits, and commits what it has
/// once told to stop, if it listens.
async fn import(ctx: AfterContext, store: Store, listens: bool) {
    let mut batch = 0;
    let mut stopping = ctx.stopping();
    loop {
        tokio::select! {
            _ = &mut stopping, if listens => break,
            _ = tokio::time::sleep(Duration::from_millis(10)) => batch += 1,
        }
    }
    // The commit itself takes a moment, as a database's would.
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.committed.fetch_add(batch, Ordering::SeqCst);
}

async fn serve_import(layer: AfterLayer, store: &Store, listens: bool) -> AfterTasks {
    let tasks = layer.tasks();
    let store = store.clone();
    let app = Router::new()
        .route(
            "/import",
            get(move |later: After| async move {
                later.run_with(move |ctx| import(ctx, store, listens));
                "importing"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    support::fetch(address, "GET", "/import").await;
    support::eventually("the import to run", || tasks.stats().running() == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    tasks
}

#[tokio::test]
async fn a_callback_that_listens_commits_when_the_shutdown_starts() {
    let store = Store::default();
    let tasks = serve_import(AfterLayer::new(), &store, true).await;
    let started = Instant::now();
    let report = support::within("the drain", tasks.shutdown(Duration::from_secs(20))).await;
    // It wrapped up at once, long before the grace ran out, and its rows are in.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!((report.completed(), report.cancelled()), (1, 0));
    assert!(store.committed.load(Ordering::SeqCst) > 0);
}

#[tokio::test]
async fn a_callback_that_ignores_it_is_cancelled_at_the_end_of_the_grace() {
    let store = Store::default();
    let tasks = serve_import(AfterLayer::new(), &store, false).await;
    let report = support::within("the drain", tasks.shutdown(Duration::from_millis(200))).await;
    assert_eq!((report.completed(), report.cancelled()), (0, 1));
    assert_eq!(store.committed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_callback_that_listens_commits_before_its_budget_runs_out() {
    let store = Store::default();
    // Told a tenth of the budget (100 ms) before its end: time enough for the 20 ms commit.
    let layer = AfterLayer::new().max_duration(Duration::from_secs(1));
    let tasks = serve_import(layer, &store, true).await;
    support::within("the import to end", tasks.idle()).await;
    let stats = tasks.stats();
    assert_eq!((stats.completed(), stats.timed_out()), (1, 0));
    assert!(store.committed.load(Ordering::SeqCst) > 0);

    // Without listening, the same callback is cut by its budget, and nothing is committed.
    let store = Store::default();
    let layer = AfterLayer::new().max_duration(Duration::from_secs(1));
    let tasks = serve_import(layer, &store, false).await;
    support::within("the budget", tasks.idle()).await;
    let stats = tasks.stats();
    assert_eq!((stats.completed(), stats.timed_out()), (0, 1));
    assert_eq!(store.committed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_deadline_is_the_end_of_the_response_plus_the_budget() {
    let layer = AfterLayer::new().max_duration(Duration::from_secs(30));
    let tasks = layer.tasks();
    let seen = Arc::new(std::sync::Mutex::new(None));
    let record = seen.clone();
    let app = Router::new()
        .route(
            "/",
            get(move |later: After| async move {
                later.run_with(move |ctx| async move {
                    let deadline = ctx.deadline().expect("a budget");
                    let expected = ctx.outcome().finished_at() + Duration::from_secs(30);
                    *record.lock().unwrap() = Some(deadline == expected);
                });
                "ok"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    support::fetch(address, "GET", "/").await;
    support::within("idle", tasks.idle()).await;
    assert_eq!(*seen.lock().unwrap(), Some(true));
}

/// A drain that ends within its grace leaves the layer working as before: a callback of a later
/// request is not told to wrap up at once.
#[tokio::test]
async fn after_a_drain_that_ended_in_time_stopping_waits_for_the_next_shutdown() {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let report = support::within("the drain", tasks.shutdown(Duration::from_secs(1))).await;
    assert_eq!(report.total(), 0);

    let told = Arc::new(std::sync::Mutex::new(None));
    let record = told.clone();
    let app = Router::new()
        .route(
            "/",
            get(move |later: After| async move {
                later.run_with(move |ctx| async move {
                    let stopping = ctx.stopping();
                    let at_once = tokio::time::timeout(Duration::from_millis(100), stopping).await;
                    *record.lock().unwrap() = Some(at_once.is_ok());
                });
                "ok"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    support::fetch(address, "GET", "/").await;
    support::within("idle", tasks.idle()).await;
    assert_eq!(
        *told.lock().unwrap(),
        Some(false),
        "told to stop with no shutdown under way"
    );
}

/// `ShutdownReport`: "Every callback pending when the drain started, or registered during it, is
/// counted exactly once, in this report or in that of a drain running at the same time". The
/// drain tells callbacks to wrap up (`AfterContext::stopping`) *before* it reads the totals it
/// reports the difference of: a callback that wraps up at once, on another worker, and ends in
/// between, is counted in neither reading's difference, so in no report at all.
///
/// A race: the callback spins on `stopping()` on one worker thread so as to end as soon as the
/// drain starts; over many rounds, some round loses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_that_wraps_up_as_the_drain_starts_is_in_its_report() {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::AtomicBool;
    use std::task::Poll;

    let mut missed = 0;
    const ROUNDS: usize = 300;
    for _ in 0..ROUNDS {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let started = Arc::new(AtomicBool::new(false));
        let flag = started.clone();
        let service = tower::Layer::layer(
            &layer,
            tower::service_fn(move |request: http::Request<()>| {
                let later = request.extensions().get::<After>().unwrap().clone();
                let flag = flag.clone();
                later.run_with(move |ctx| {
                    std::future::poll_fn(move |cx| {
                        flag.store(true, Ordering::SeqCst);
                        // Wraps up as soon as it is told to: a callback that watches `stopping()`
                        // and has nothing left to flush.
                        loop {
                            let mut stopping = ctx.stopping();
                            if Pin::new(&mut stopping).poll(cx).is_ready() {
                                return Poll::Ready(());
                            }
                            std::hint::spin_loop();
                        }
                    })
                });
                async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                        bytes::Bytes,
                    >::new(
                    )))
                }
            }),
        );
        let response = tower::ServiceExt::oneshot(service, http::Request::new(()))
            .await
            .unwrap();
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        support::eventually("the callback to start", || started.load(Ordering::SeqCst)).await;
        let report = support::within("the drain", tasks.shutdown(Duration::from_secs(10))).await;
        assert_eq!(tasks.stats().completed(), 1);
        if report.total() != 1 {
            missed += 1;
        }
    }
    assert_eq!(
        missed, 0,
        "in {missed} of {ROUNDS} drains, the one pending callback, which completed during the \
         drain, was in the report of no drain"
    );
}
