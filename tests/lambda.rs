//! `lambda::DrainLayer` against a Runtime API: the real `lambda_runtime` and `lambda_http` client
//! code, serving an axum router, talks to a small Runtime API server on 127.0.0.1 that follows
//! AWS's documented endpoints (`/2018-06-01/runtime/invocation/next`, `.../{id}/response`,
//! `.../{id}/error`, and the extension registration). The server and the router's callbacks
//! write to one journal, whose order is what the tests assert.
//!
//! The example function, `examples/lambda-function`, is a package of its own, whose tests run
//! its binary against such a Runtime API and under `cargo lambda watch`.
#![cfg(feature = "lambda")]

mod support;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tower::{Layer, ServiceExt};
use tower_after::lambda::DrainLayer;
use tower_after::{After, AfterLayer, AfterTasks, MaxDuration};

/// What happened, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// The runtime asked for the next event.
    Next,
    /// The runtime posted the response of this invocation.
    Posted(String),
    /// The runtime posted an error for this invocation.
    Failed(String),
    /// A callback started, or ended.
    Started(String),
    Ended(String),
    /// An extension registered.
    Registered,
}

#[derive(Clone, Default)]
struct Journal(Arc<Mutex<Vec<Entry>>>);

impl Journal {
    fn push(&self, entry: Entry) {
        self.0.lock().unwrap().push(entry);
    }

    fn all(&self) -> Vec<Entry> {
        self.0.lock().unwrap().clone()
    }

    fn count(&self, entry: &Entry) -> usize {
        self.all().iter().filter(|seen| *seen == entry).count()
    }

    /// Where `entry` is, for the `nth` time (from 1).
    fn position(&self, entry: &Entry, nth: usize) -> usize {
        let all = self.all();
        all.iter()
            .enumerate()
            .filter(|(_, seen)| *seen == entry)
            .nth(nth - 1)
            .map(|(index, _)| index)
            .unwrap_or_else(|| panic!("no {entry:?} #{nth} in {all:#?}"))
    }

    /// Waits until `entry` was seen `count` times, with a generous deadline.
    async fn wait_for(&self, entry: Entry, count: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.count(&entry) < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {entry:?} #{count}: {:#?}",
                self.all()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// An event the Runtime API hands out.
struct Event {
    id: String,
    deadline_ms: String,
    body: String,
}

/// The Runtime API's side: a queue of events, and the journal.
#[derive(Clone, Default)]
struct Api {
    queue: Arc<Mutex<VecDeque<Event>>>,
    arrived: Arc<Notify>,
    journal: Journal,
}

impl Api {
    /// Queues an API Gateway (HTTP API) request for `method path`, due within `timeout`.
    fn invoke(&self, id: &str, method: &str, path: &str, timeout: Duration) {
        let deadline = SystemTime::now() + timeout;
        let deadline_ms = deadline.duration_since(UNIX_EPOCH).unwrap().as_millis();
        let body = serde_json::json!({
            "version": "2.0",
            "rawPath": path,
            "requestContext": { "http": { "method": method } },
        });
        self.queue.lock().unwrap().push_back(Event {
            id: id.to_owned(),
            deadline_ms: deadline_ms.to_string(),
            body: body.to_string(),
        });
        self.arrived.notify_waiters();
    }
}

async fn next_event(State(api): State<Api>) -> impl IntoResponse {
    api.journal.push(Entry::Next);
    loop {
        // Long-polls, as Lambda does: an empty answer would make the runtime spin.
        let arrived = api.arrived.notified();
        if let Some(event) = api.queue.lock().unwrap().pop_front() {
            let headers = [
                ("lambda-runtime-aws-request-id", event.id),
                ("lambda-runtime-deadline-ms", event.deadline_ms),
                (
                    "lambda-runtime-invoked-function-arn",
                    "arn:aws:lambda:us-east-1:000000000000:function:after".to_owned(),
                ),
            ];
            return (headers, event.body);
        }
        arrived.await;
    }
}

async fn response(State(api): State<Api>, Path(id): Path<String>) -> StatusCode {
    api.journal.push(Entry::Posted(id));
    StatusCode::ACCEPTED
}

async fn error(State(api): State<Api>, Path(id): Path<String>) -> StatusCode {
    api.journal.push(Entry::Failed(id));
    StatusCode::ACCEPTED
}

async fn register_extension(State(api): State<Api>) -> impl IntoResponse {
    api.journal.push(Entry::Registered);
    let body = r#"{"functionName":"after","functionVersion":"$LATEST","handler":"bootstrap"}"#;
    ([("lambda-extension-identifier", "extension-1")], body)
}

async fn next_extension_event() -> StatusCode {
    // No event for the extension until the test ends.
    std::future::pending().await
}

/// Serves the Runtime API on a free port of 127.0.0.1; returns its address.
async fn serve_api(api: Api) -> String {
    let app = Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next_event))
        .route(
            "/2018-06-01/runtime/invocation/{id}/response",
            post(response),
        )
        .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
        .route("/2020-01-01/extension/register", post(register_extension))
        .route(
            "/2020-01-01/extension/event/next",
            get(next_extension_event),
        )
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

/// The function's router: each callback writes its start and end to the journal.
struct Function {
    journal: Journal,
    /// `/gated/{tag}` callbacks wait for a permit here.
    gate: Arc<Semaphore>,
}

impl Function {
    fn router(&self, layer: AfterLayer) -> Router {
        let (journal, gate) = (self.journal.clone(), self.gate.clone());
        let work = move |after: After, Path((tag, ms)): Path<(String, u64)>| {
            let journal = journal.clone();
            async move {
                after.run(async move {
                    journal.push(Entry::Started(tag.clone()));
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    journal.push(Entry::Ended(tag));
                });
                "accepted"
            }
        };
        let journal = self.journal.clone();
        let gated = move |after: After, Path(tag): Path<String>| {
            let (journal, gate) = (journal.clone(), gate.clone());
            async move {
                after.run(async move {
                    journal.push(Entry::Started(tag.clone()));
                    gate.acquire().await.unwrap().forget();
                    journal.push(Entry::Ended(tag));
                });
                "accepted"
            }
        };
        Router::new()
            .route("/work/{tag}/{ms}", post(work.clone()))
            .route(
                "/budget/{tag}/{ms}",
                post(work).layer(MaxDuration::new(Duration::from_millis(200))),
            )
            .route("/gated/{tag}", post(gated))
            .route("/nothing", get(|| async { "nothing to do" }))
            .layer(layer)
    }
}

/// `Runtime::new` reads the environment once: one runtime at a time is made.
static ENVIRONMENT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn set_environment(address: &str, concurrency: Option<u32>) {
    std::env::set_var("AWS_LAMBDA_RUNTIME_API", address);
    std::env::set_var("AWS_LAMBDA_FUNCTION_NAME", "after");
    std::env::set_var("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128");
    std::env::set_var("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST");
    match concurrency {
        Some(slots) => std::env::set_var("AWS_LAMBDA_MAX_CONCURRENCY", slots.to_string()),
        None => std::env::remove_var("AWS_LAMBDA_MAX_CONCURRENCY"),
    }
}

/// A Runtime API, and the function running against it with `run()`.
struct Setup {
    api: Api,
    journal: Journal,
    tasks: AfterTasks,
    gate: Arc<Semaphore>,
    runtime: JoinHandle<Result<(), lambda_runtime::Error>>,
    layer: AfterLayer,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.runtime.abort();
    }
}

async fn start(concurrency: Option<u32>) -> Setup {
    let api = Api::default();
    let journal = api.journal.clone();
    let address = serve_api(api.clone()).await;
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let gate = Arc::new(Semaphore::new(0));
    let function = Function {
        journal: journal.clone(),
        gate: gate.clone(),
    };
    let app = function.router(layer.clone());
    let environment: tokio::sync::MutexGuard<'_, ()> = ENVIRONMENT.lock().await;
    set_environment(&address, concurrency);
    // The runtime runs on a task of its own, so the router's response must be `Sync`.
    let app = ServiceExt::<lambda_http::Request>::map_response(app, |response: Response| {
        response.map(|body| SyncBody(sync_wrapper::SyncWrapper::new(body)))
    });
    let runtime = lambda_runtime::Runtime::new(lambda_http::Adapter::from(app))
        .layer(DrainLayer::new(tasks.clone()));
    let runtime = match concurrency {
        None => tokio::spawn(runtime.run()),
        Some(_) => tokio::spawn(runtime.run_concurrent()),
    };
    drop(environment);
    Setup {
        api,
        journal,
        tasks,
        gate,
        runtime,
        layer,
    }
}

/// axum's body, made `Sync` for `lambda_http`'s adapter on a spawned task.
struct SyncBody(sync_wrapper::SyncWrapper<Body>);

impl http_body::Body for SyncBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(self.get_mut().0.get_mut()).poll_frame(cx)
    }
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the crate logs, from every test of this file (the drivers log on the runtime's
/// worker threads, so the subscriber is global).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("tower_after=warn")
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .init();
        logs
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The lines logged so far that contain `text`.
fn logged(text: &str) -> Vec<String> {
    let logs = logs().lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|line| line.contains(text))
        .map(str::to_owned)
        .collect()
}

fn entry(make: fn(String) -> Entry, name: &str) -> Entry {
    make(name.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_run_after_the_post_and_before_the_next_event() {
    let setup = start(None).await;
    let journal = &setup.journal;
    setup
        .api
        .invoke("req-1", "POST", "/work/audit/300", TIMEOUT);
    journal.wait_for(Entry::Next, 2).await;

    let posted = journal.position(&entry(Entry::Posted, "req-1"), 1);
    let started = journal.position(&entry(Entry::Started, "audit"), 1);
    let ended = journal.position(&entry(Entry::Ended, "audit"), 1);
    let next = journal.position(&Entry::Next, 2);
    assert!(
        posted < started && started < ended && ended < next,
        "{:#?}",
        journal.all()
    );
    assert_eq!(setup.tasks.stats().completed(), 1);

    // And again for the next invocation: each one drains its own work.
    setup
        .api
        .invoke("req-2", "POST", "/work/again/100", TIMEOUT);
    journal.wait_for(Entry::Next, 3).await;
    let ended = journal.position(&entry(Entry::Ended, "again"), 1);
    assert!(
        journal.position(&entry(Entry::Posted, "req-2"), 1)
            < journal.position(&entry(Entry::Started, "again"), 1)
            && ended < journal.position(&Entry::Next, 3),
        "{:#?}",
        journal.all()
    );
    assert_eq!(journal.count(&entry(Entry::Failed, "req-2")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_over_its_budget_is_cancelled_and_the_next_event_follows() {
    let setup = start(None).await;
    let journal = &setup.journal;
    // The route's `MaxDuration` is 200 ms; the callback would take a minute.
    setup
        .api
        .invoke("req-1", "POST", "/budget/long/60000", TIMEOUT);
    journal.wait_for(Entry::Next, 2).await;
    assert!(
        journal.position(&entry(Entry::Started, "long"), 1) < journal.position(&Entry::Next, 2),
        "{:#?}",
        journal.all()
    );
    assert_eq!(journal.count(&entry(Entry::Ended, "long")), 0);
    let stats = setup.tasks.stats();
    assert_eq!((stats.timed_out(), setup.tasks.pending()), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invocation_deadline_caps_the_wait() {
    logs();
    let setup = start(None).await;
    let journal = &setup.journal;
    // The callback's budget is the default minute, but the invocation is due in 1.5 s.
    setup.api.invoke(
        "req-1",
        "POST",
        "/work/long/60000",
        Duration::from_millis(1500),
    );
    journal.wait_for(Entry::Next, 2).await;
    assert!(
        journal.position(&entry(Entry::Started, "long"), 1) < journal.position(&Entry::Next, 2),
        "{:#?}",
        journal.all()
    );
    assert_eq!(journal.count(&entry(Entry::Ended, "long")), 0);
    assert_eq!(setup.tasks.stats().timed_out(), 1);
    assert_eq!(setup.tasks.pending(), 0);
    // One warning for the invocation; the callback's own line is at DEBUG, below this filter.
    let callback = logged("after callback cancelled");
    assert!(callback.is_empty(), "{callback:?}");
    let invocation =
        logged("after callbacks cancelled: the Lambda invocation's deadline is 100ms away");
    assert!(
        invocation.len() == 1 && invocation[0].contains("requests=1"),
        "{invocation:?}"
    );

    // The layer still works for the next invocation.
    setup.api.invoke("req-2", "POST", "/work/short/10", TIMEOUT);
    journal.wait_for(Entry::Next, 3).await;
    assert!(journal.position(&entry(Entry::Ended, "short"), 1) < journal.position(&Entry::Next, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_that_registers_nothing_waits_for_nothing() {
    let setup = start(None).await;
    let journal = &setup.journal;
    // Work of the same layer outside any invocation, stuck until the gate opens.
    let (gate, outside_journal) = (setup.gate.clone(), journal.clone());
    let outside = setup
        .layer
        .layer(tower::service_fn(move |request: http::Request<Body>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            let (gate, journal) = (gate.clone(), outside_journal.clone());
            after.run(async move {
                journal.push(entry(Entry::Started, "outside"));
                gate.acquire().await.unwrap().forget();
                journal.push(entry(Entry::Ended, "outside"));
            });
            async { Ok::<_, Infallible>(http::Response::new(Body::empty())) }
        }));
    drop(outside.oneshot(http::Request::new(Body::empty())).await);
    journal.wait_for(entry(Entry::Started, "outside"), 1).await;

    // The invocation registers nothing: its next event follows its post, although the layer
    // has work pending.
    setup.api.invoke("req-1", "GET", "/nothing", TIMEOUT);
    journal.wait_for(Entry::Next, 2).await;
    assert_eq!(setup.tasks.stats().scheduled(), 1);
    assert_eq!(setup.tasks.pending(), 1);
    let posted = journal.position(&entry(Entry::Posted, "req-1"), 1);
    assert_eq!(
        journal.all()[posted..],
        [entry(Entry::Posted, "req-1"), Entry::Next],
    );
    setup.gate.add_permits(1);
    journal.wait_for(entry(Entry::Ended, "outside"), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_invocations_each_wait_for_their_own_work() {
    let setup = start(Some(2)).await;
    let journal = &setup.journal;
    journal.wait_for(Entry::Next, 2).await;
    // One worker takes the gated invocation and waits for its callback; the other serves the
    // quick one, waits for its callback only, and asks for more meanwhile.
    setup.api.invoke("slow", "POST", "/gated/slow", TIMEOUT);
    journal.wait_for(entry(Entry::Started, "slow"), 1).await;
    setup.api.invoke("quick", "POST", "/work/quick/50", TIMEOUT);
    journal.wait_for(Entry::Next, 3).await;
    assert_eq!(journal.count(&entry(Entry::Ended, "quick")), 1);
    assert!(
        journal.position(&entry(Entry::Ended, "quick"), 1) < journal.position(&Entry::Next, 3),
        "{:#?}",
        journal.all()
    );
    assert_eq!(journal.count(&entry(Entry::Ended, "slow")), 0);
    assert_eq!(
        journal.count(&Entry::Next),
        3,
        "the slow worker asked too early"
    );

    setup.gate.add_permits(1);
    journal.wait_for(Entry::Next, 4).await;
    assert!(
        journal.position(&entry(Entry::Ended, "slow"), 1) < journal.position(&Entry::Next, 4),
        "{:#?}",
        journal.all()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_registers_an_extension() {
    let api = Api::default();
    let address = serve_api(api.clone()).await;
    let environment = ENVIRONMENT.lock().await;
    set_environment(&address, None);
    let tasks = AfterLayer::new().tasks();
    tower_after::lambda::graceful_shutdown(tasks, Duration::from_millis(300)).await;
    drop(environment);
    assert_eq!(api.journal.all(), [Entry::Registered]);
}

/// On Lambda, a request's work waits for the invocation's response to be posted. Early work
/// (`wait_until`) that ends before the post retires its driver while the request's `run`
/// callback still waits: the request's snapshot stays counted in the held bytes until that one
/// ended too, as everywhere else.
#[tokio::test]
async fn early_work_ending_before_the_post_keeps_the_snapshot_counted_for_queued_work() {
    use lambda_runtime::{Context as LambdaContext, LambdaInvocation};
    use tokio::sync::oneshot;

    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let (early_tx, early_rx) = oneshot::channel::<()>();
    let (late_tx, late_rx) = oneshot::channel::<()>();
    let (finished_tx, finished_rx) = oneshot::channel::<()>();
    let (post_tx, post_rx) = oneshot::channel::<()>();
    let channels = Arc::new(Mutex::new(Some((early_rx, late_rx))));
    let app = layer.layer(tower::service_fn(move |_: http::Request<()>| {
        let channels = channels.clone();
        async move {
            let (early, late) = channels.lock().unwrap().take().unwrap();
            let after = After::current();
            // Early work: rides in the request's driver, which runs it at once.
            after.wait_until(async move {
                let _ = early.await;
            });
            // Work for after the response: queued behind it.
            after.run(async move {
                let _ = late.await;
            });
            Ok::<_, Infallible>(http::Response::new(http_body_util::Empty::<Bytes>::new()))
        }
    }));
    let gates = Arc::new(Mutex::new(Some((finished_tx, post_rx))));
    let function = tower::service_fn(move |_: LambdaInvocation| {
        let (app, gates) = (app.clone(), gates.clone());
        async move {
            let (finished, post) = gates.lock().unwrap().take().unwrap();
            // `lambda_http` drops the body once it has read it, before the post.
            drop(app.oneshot(http::Request::new(())).await.unwrap());
            finished.send(()).unwrap();
            // The invocation's response is not posted yet.
            let _ = post.await;
            Ok::<_, Infallible>(())
        }
    });
    let mut context = LambdaContext::default();
    let deadline = SystemTime::now() + Duration::from_secs(600);
    context.deadline = deadline.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let (parts, ()) = http::Response::new(()).into_parts();
    let invocation = LambdaInvocation {
        parts,
        body: Bytes::new(),
        context,
    };
    let served = tokio::spawn(
        DrainLayer::new(tasks.clone())
            .layer(function)
            .oneshot(invocation),
    );

    support::within("the response to finish", finished_rx)
        .await
        .unwrap();
    assert_eq!(tasks.pending(), 2);
    let held = tasks.stats().held_bytes();
    assert!(held > 0);
    // The early work ends; its driver retires.
    early_tx.send(()).unwrap();
    support::eventually("the early work to end", || tasks.stats().completed() == 1).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }

    let (pending, held_now) = (tasks.pending(), tasks.stats().held_bytes());

    // Let everything end before asserting.
    post_tx.send(()).unwrap();
    late_tx.send(()).unwrap();
    support::within("the invocation", served)
        .await
        .unwrap()
        .unwrap();
    support::within("the callbacks", tasks.idle()).await;

    assert_eq!(pending, 1, "the `run` callback is still queued");
    assert_eq!(
        held_now, held,
        "a pending callback of the request, registered by its handler, no longer holds its \
         snapshot's bytes"
    );
}
