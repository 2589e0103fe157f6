//! The example's promises, with its own handler and worker, a real server on 127.0.0.1, a real
//! HTTP client and a real SQLite file: a queued receipt outlives a server that dies without
//! draining, `after` work never holds a response up, and the push is on the response's path.
//!
//! Every wait is bounded by a generous deadline that only a broken promise reaches; no test
//! asserts how long anything took.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Request, StatusCode};
use durable_jobs::{
    app, open_queue, run_worker, Analytics, Mailer, PageView, Queue, Receipt, QUEUE,
};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tower_after::AfterTasks;

/// What only a broken promise makes a test wait for.
const DEADLINE: Duration = Duration::from_secs(30);

/// Awaits `future`, or fails the test naming `what` once the deadline has passed.
async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {DEADLINE:?}"))
}

fn database() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("queue.sqlite3");
    (dir, path)
}

/// Analytics whose every recording waits at a gate that the test opens, and that tell when one
/// has started waiting there.
struct GatedAnalytics {
    analytics: Analytics,
    gate: watch::Sender<bool>,
    started: Arc<Notify>,
    recorded: Arc<Mutex<Vec<PageView>>>,
}

fn gated_analytics() -> GatedAnalytics {
    let (gate, opened) = watch::channel(false);
    let started = Arc::new(Notify::new());
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let analytics = Analytics::new({
        let (started, recorded) = (started.clone(), recorded.clone());
        move |view| {
            let (started, recorded, mut opened) =
                (started.clone(), recorded.clone(), opened.clone());
            async move {
                started.notify_one();
                let _ = opened.wait_for(|open| *open).await;
                recorded.lock().unwrap().push(view);
            }
        }
    });
    GatedAnalytics {
        analytics,
        gate,
        started,
        recorded,
    }
}

/// A mailer that hands each receipt it sends to the test.
fn recording_mailer() -> (Mailer, mpsc::UnboundedReceiver<Receipt>) {
    let (sent, receipts) = mpsc::unbounded_channel();
    let mailer = Mailer::new(move |receipt| {
        let sent = sent.clone();
        async move {
            sent.send(receipt)?;
            Ok(())
        }
    });
    (mailer, receipts)
}

struct Server {
    addr: SocketAddr,
    tasks: AfterTasks,
    stop: oneshot::Sender<()>,
    serving: JoinHandle<()>,
}

/// The example's app, served on 127.0.0.1 by a task of the current runtime.
async fn serve(queue: Queue, analytics: Analytics) -> Server {
    let (router, tasks) = app(queue, analytics);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Server {
        addr,
        tasks,
        stop,
        serving,
    }
}

impl Server {
    /// Stops the way the program does: no new requests, then the `after` work is drained.
    async fn shut_down(self) {
        let _ = self.stop.send(());
        within("the server stops", self.serving).await.unwrap();
        let report = self.tasks.shutdown(DEADLINE).await;
        assert_eq!(report.cancelled(), 0, "no after work is cut off");
    }
}

struct Worker {
    stop: oneshot::Sender<()>,
    running: JoinHandle<()>,
}

/// The example's worker, on its own connection to the queue at `path`.
async fn start_worker(name: &str, path: &Path, mailer: Mailer) -> Worker {
    let queue = open_queue(path).await.expect("the queue opens");
    let (stop, stopped) = oneshot::channel::<()>();
    let name = name.to_owned();
    let running = tokio::spawn(async move {
        run_worker(&name, queue, mailer, async {
            let _ = stopped.await;
        })
        .await
        .expect("the worker runs");
    });
    Worker { stop, running }
}

impl Worker {
    async fn stop(self) {
        let _ = self.stop.send(());
        within("the worker stops", self.running).await.unwrap();
    }
}

/// `POST /checkout`, with a client of its own, and the response's status and body.
async fn checkout(addr: SocketAddr, order: u64, email: &str) -> (StatusCode, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = Request::post(format!(
        "http://{addr}/checkout?order={order}&email={email}"
    ))
    .body(Empty::new())
    .unwrap();
    let response = client.request(request).await.expect("a response");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// The jobs of the receipt queue in the file at `path`, read through a connection of their own.
async fn jobs_in_file(path: &Path) -> Vec<(Receipt, String)> {
    let pool = SqlitePool::connect_with(SqliteConnectOptions::new().filename(path).read_only(true))
        .await
        .unwrap();
    let rows: Vec<(Vec<u8>, String)> =
        sqlx::query_as("SELECT job, status FROM Jobs WHERE job_type = ?1 ORDER BY id")
            .bind(QUEUE)
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    rows.into_iter()
        .map(|(job, status)| (serde_json::from_slice(&job).expect("a receipt"), status))
        .collect()
}

fn alice(order: u64) -> Receipt {
    Receipt {
        order,
        email: "alice@example.com".to_owned(),
    }
}

/// A server takes an order while no worker runs, and dies with its runtime: no graceful
/// shutdown, no drain. A worker started afterwards on the same file sends the receipt; the page
/// view, an `after` callback that was still waiting, is gone with the server.
#[test]
fn a_job_pushed_before_the_server_died_is_processed_by_a_new_worker() {
    let (_dir, path) = database();

    let doomed = tokio::runtime::Runtime::new().unwrap();
    let analytics = gated_analytics();
    doomed.block_on(async {
        let queue = open_queue(&path).await.expect("the queue opens");
        let server = serve(queue, analytics.analytics.clone()).await;
        let (status, body) = within(
            "the response",
            checkout(server.addr, 1, "alice@example.com"),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(
            jobs_in_file(&path).await,
            [(alice(1), "Pending".to_owned())]
        );
        within("the page view starts", analytics.started.notified()).await;
        assert_eq!(
            server.tasks.pending(),
            1,
            "the page view is waiting at its gate"
        );
        // The server is dropped here, still running, with its runtime below.
    });
    drop(doomed);
    assert!(analytics.recorded.lock().unwrap().is_empty());

    let fresh = tokio::runtime::Runtime::new().unwrap();
    fresh.block_on(async {
        let (mailer, mut sent) = recording_mailer();
        let worker = start_worker("after-the-crash", &path, mailer).await;
        let receipt = within("the receipt is sent", sent.recv()).await;
        assert_eq!(receipt, Some(alice(1)));
        worker.stop().await;
        assert_eq!(jobs_in_file(&path).await, [(alice(1), "Done".to_owned())]);
    });
    // Opening the gate now changes nothing: that callback died with its runtime.
    analytics.gate.send_replace(true);
    assert!(analytics.recorded.lock().unwrap().is_empty());
}

/// The response arrives while its `after` work is still waiting, and by then its job is already
/// committed to the file: the push is on the response's path, the page view is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_work_never_blocks_the_response_while_the_push_is_on_its_path() {
    let (_dir, path) = database();
    let analytics = gated_analytics();
    let (mailer, mut sent) = recording_mailer();
    let worker = start_worker("in-process", &path, mailer).await;
    let queue = open_queue(&path).await.expect("the queue opens");
    let server = serve(queue, analytics.analytics.clone()).await;

    // The gate is shut: were the response to wait for the page view, it would never come.
    let (status, body) = within(
        "the response, while its after work waits",
        checkout(server.addr, 7, "alice@example.com"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let jobs = jobs_in_file(&path).await;
    assert_eq!(
        jobs.len(),
        1,
        "the job is in the file when the response arrives"
    );
    assert_eq!(jobs[0].0, alice(7));

    within("the page view starts", analytics.started.notified()).await;
    assert_eq!(server.tasks.pending(), 1, "the page view is still waiting");
    assert!(analytics.recorded.lock().unwrap().is_empty());

    analytics.gate.send_replace(true);
    within("the page view ends", server.tasks.idle()).await;
    {
        let recorded = analytics.recorded.lock().unwrap();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].path, "/checkout");
        assert_eq!(recorded[0].status, Some(201));
    }

    let receipt = within("the receipt is sent", sent.recv()).await;
    assert_eq!(receipt, Some(alice(7)));
    server.shut_down().await;
    worker.stop().await;
}

/// A push that fails fails the request: the client is not told "placed" for a receipt that
/// nobody will send. The page view still goes out, with the failure's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_fails_fails_the_request() {
    let (_dir, path) = database();
    let analytics = gated_analytics();
    analytics.gate.send_replace(true);
    let queue = open_queue(&path).await.expect("the queue opens");
    let server = serve(queue.clone(), analytics.analytics.clone()).await;
    // The database goes away: the clones of the queue share one pool, and it is closed.
    queue.pool().close().await;

    let (status, _) = within(
        "the response",
        checkout(server.addr, 9, "alice@example.com"),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    within("the page view ends", server.tasks.idle()).await;
    let recorded = analytics.recorded.lock().unwrap().clone();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].status, Some(503));
    server.shut_down().await;
}

/// A receipt whose sending fails stays in the queue and is sent on a later try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_whose_sending_fails_is_tried_again() {
    let (_dir, path) = database();
    let mut queue = open_queue(&path).await.unwrap();
    apalis::prelude::TaskSink::push(&mut queue, alice(3))
        .await
        .unwrap();

    let tries = Arc::new(Mutex::new(0_u32));
    let (sent, mut receipts) = mpsc::unbounded_channel();
    let mailer = Mailer::new({
        let tries = tries.clone();
        move |receipt| {
            let (tries, sent) = (tries.clone(), sent.clone());
            async move {
                let attempt = {
                    let mut tries = tries.lock().unwrap();
                    *tries += 1;
                    *tries
                };
                if attempt == 1 {
                    return Err("the e-mail service is down".into());
                }
                sent.send(receipt)?;
                Ok(())
            }
        }
    });
    let worker = start_worker("retries", &path, mailer).await;
    let receipt = within("the receipt is sent on a later try", receipts.recv()).await;
    assert_eq!(receipt, Some(alice(3)));
    assert_eq!(*tries.lock().unwrap(), 2);
    worker.stop().await;
}
