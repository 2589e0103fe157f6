//! The counters published through the `metrics` facade read settled once `AfterTasks::idle`
//! resolves, as `AfterTasks::stats` do. Its own test binary: it installs the process's global
//! recorder.
#![cfg(all(feature = "metrics", feature = "axum"))]

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};

use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use tower::{Layer, ServiceExt};
use tower_after::{After, AfterLayer};
const COMPLETED: &str = "tower_after_callbacks_completed_total";

#[derive(Default)]
struct Completed {
    value: AtomicU64,
    /// Told when an increment starts, and waits for a word before it lands.
    hold: Mutex<Option<(Sender<()>, Receiver<()>)>>,
}

impl CounterFn for Completed {
    fn increment(&self, value: u64) {
        // Only the endings of the request that the test marked with a header.
        let ours =
            After::try_current().is_some_and(|after| after.request().header("x-counted").is_some());
        if !ours {
            return;
        }
        if let Some((entered, go)) = self.hold.lock().unwrap().take() {
            entered.send(()).unwrap();
            let _ = go.recv();
        }
        self.value.fetch_add(value, Ordering::SeqCst);
    }

    fn absolute(&self, value: u64) {
        self.value.store(value, Ordering::SeqCst);
    }
}

/// A recorder that publishes the completed counter through its counter, and nothing else.
struct Record(Counter);

impl Recorder for Record {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() == COMPLETED {
            self.0.clone()
        } else {
            Counter::noop()
        }
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn completed() -> &'static Arc<Completed> {
    static COMPLETED: OnceLock<Arc<Completed>> = OnceLock::new();
    COMPLETED.get_or_init(|| {
        let completed = Arc::new(Completed::default());
        metrics::set_global_recorder(Record(Counter::from_arc(completed.clone()))).unwrap();
        completed
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_completed_counter_is_settled_when_idle_resolves() {
    let completed = completed();
    let (entered_tx, entered) = channel();
    let (go, go_rx) = channel();
    *completed.hold.lock().unwrap() = Some((entered_tx, go_rx));
    let before = completed.value.load(Ordering::SeqCst);

    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let service = layer.layer(tower::service_fn(|request: Request<()>| {
        let after = request.extensions().get::<After>().unwrap().clone();
        after.run(async {});
        async { Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())) }
    }));
    let request = Request::builder()
        .header("x-counted", "1")
        .body(())
        .unwrap();
    let response = service.oneshot(request).await.unwrap();
    response.into_body().collect().await.unwrap();
    // The callback ended and its driver is publishing the ending: the recorder lets it land a
    // moment later, which a reader that `idle()` let through too early would miss.
    tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the completed counter was never incremented");
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let _ = go.send(());
    });
    support::within("idle", tasks.idle()).await;
    let stats = tasks.stats();
    let published = completed.value.load(Ordering::SeqCst) - before;
    assert_eq!(stats.completed(), 1);
    assert_eq!(
        published, 1,
        "idle() resolved, stats say 1 completed, the metrics facade says {published}"
    );
}

/// A recorder is user code: one whose counter panics must not keep the callback pending (then
/// `idle()` would never resolve, and every shutdown would wait out its grace), and the panic is
/// said at `ERROR`.
#[test]
fn a_recorder_that_panics_does_not_keep_the_callback_pending() {
    struct Panics;

    impl CounterFn for Panics {
        fn increment(&self, _: u64) {
            panic!("the recorder failed");
        }
        fn absolute(&self, _: u64) {}
    }

    // A recorder for this thread only, and a runtime on this thread only: no other test of
    // this binary sees it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let recorder = Record(Counter::from_arc(Arc::new(Panics)));
    // Everything runs on this thread, whose logs this captures.
    let logs = support::Logs::capture();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let layer = AfterLayer::new();
            let tasks = layer.tasks();
            let service = layer.layer(tower::service_fn(|request: Request<()>| {
                let after = request.extensions().get::<After>().unwrap().clone();
                async move {
                    after.run(async {});
                    Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
                }
            }));
            drop(service.oneshot(Request::new(())).await.unwrap());
            // The callback ran: its ending is in the totals.
            support::eventually("the callback to be counted", || {
                tasks.stats().completed() == 1
            })
            .await;
            let idle = tokio::time::timeout(Duration::from_secs(10), tasks.idle()).await;
            assert!(
                idle.is_ok(),
                "idle() never resolved: pending() = {} with completed = {}",
                tasks.pending(),
                tasks.stats().completed()
            );
        });
    });
    let text = logs.text();
    assert!(
        text.contains("ERROR") && text.contains("the metrics recorder panicked"),
        "a recorder that panics is not said: {text}"
    );
}
