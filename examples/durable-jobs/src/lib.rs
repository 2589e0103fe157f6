//! Run with
//!
//! ```not_rust
//! cargo run --manifest-path examples/durable-jobs/Cargo.toml
//! ```
//!
//! then, in another terminal:
//!
//! ```not_rust
//! curl -X POST 'http://127.0.0.1:3000/checkout?order=1&email=alice@example.com'
//! ```
//!
//! The handler places an order, queues its receipt e-mail in a SQLite file (in the temporary
//! directory, or at `DATABASE`), and records a page view for analytics once the response is out;
//! a worker in the same process sends the receipts. To see a receipt outlive its server, start it
//! with `WORKER=off`, place an order, `kill -9` it, and start it again without `WORKER=off`.
//!
//! An `after` callback lives in the server's memory: it costs the response nothing and a graceful
//! shutdown drains it, but a crash, `kill -9`, an out-of-memory kill or a power cut loses it. That
//! is the right price for best-effort work such as analytics, which must neither slow a response
//! down nor fail it. Work that must not be lost, such as the receipt of an order, is instead
//! pushed to a durable queue *before* the handler responds: the response waits for one committed
//! write, and a push that fails fails the request, so a client is never told "done" for work
//! nobody will do; in exchange the job is on disk, and a worker of this process or of the next
//! one runs it even if the server dies the moment after it answered. Delivery is at least once
//! (a job cut off mid-way runs again), so a job should tolerate running twice.
//!
//! SQLite keeps the queue on one machine. When the work outgrows it, several server replicas
//! share one queue in PostgreSQL or Redis: swap `apalis-sqlite` for `apalis-postgres` (or
//! `apalis-redis`) in `Cargo.toml`, then the storage's type in [`Queue`] and the line of
//! [`open_queue`] that makes it; the handler and the worker stay as they are.
//!
//! ```rust,ignore
//! pub type Queue = apalis_postgres::PostgresStorage<Receipt>;
//! let queue = PostgresStorage::new(&pool); // pool: PgPool::connect(url), then PostgresStorage::setup(&pool)
//!
//! pub type Queue = apalis_redis::RedisStorage<Receipt>;
//! let queue = RedisStorage::new(apalis_redis::connect(url).await?);
//! ```
//!
//! The program is `src/main.rs`; its parts are this library, so that the integration test in
//! `tests/` drives the very handler and worker that the program runs.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{BackendExt, BoxDynError, Data, TaskSink, WorkerBuilder, WorkerError};
use apalis_sqlite::{Config, SqliteStorage};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqliteSynchronous};
use tower_after::{After, AfterLayer, AfterTasks};

/// The queue of receipts. The one type to change, with [`open_queue`], to move the queue to
/// PostgreSQL or Redis.
pub type Queue = SqliteStorage<Receipt>;

/// The name of the queue in the database. Named here rather than left to apalis, whose default is
/// the Rust type's path, which would change with a rename of the type or the crate and leave the
/// jobs already queued under the old name unread.
pub const QUEUE: &str = "receipts";

/// How often an idle worker looks for new jobs.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A job: send the receipt of an order. Stored as JSON, so it must outlive the code that wrote
/// it: add fields with defaults rather than rename them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The order number.
    pub order: u64,
    /// Where to send the receipt.
    pub email: String,
}

/// A page view, for analytics: what the callback registered with `after` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageView {
    /// The path of the request.
    pub path: String,
    /// The status of the response, if there was one.
    pub status: Option<u16>,
    /// From the start of the request to the end of its response.
    pub elapsed: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Sends receipt e-mails. The program's logs them; a real one calls an e-mail service. An error
/// marks the job failed, and the worker runs it again later.
#[derive(Clone)]
pub struct Mailer(Arc<dyn Fn(Receipt) -> BoxFuture<Result<(), BoxDynError>> + Send + Sync>);

impl Mailer {
    /// A mailer that sends with `send`.
    pub fn new<F, Fut>(send: F) -> Self
    where
        F: Fn(Receipt) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxDynError>> + Send + 'static,
    {
        Self(Arc::new(move |receipt| Box::pin(send(receipt))))
    }

    async fn send(&self, receipt: Receipt) -> Result<(), BoxDynError> {
        (self.0)(receipt).await
    }
}

/// Records page views. The program's logs them; a real one calls an analytics service, which
/// may be slow or down: neither must show in the response.
#[derive(Clone)]
pub struct Analytics(Arc<dyn Fn(PageView) -> BoxFuture<()> + Send + Sync>);

impl Analytics {
    /// Analytics that record with `record`.
    pub fn new<F, Fut>(record: F) -> Self
    where
        F: Fn(PageView) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self(Arc::new(move |view| Box::pin(record(view))))
    }

    async fn record(&self, view: PageView) {
        (self.0)(view).await;
    }
}

/// Opens the queue in the SQLite file at `path`, creating it and its tables if need be.
///
/// apalis-sqlite's `setup` turns `synchronous` off on the connection it runs on: a commit then
/// survives the process dying, not the machine losing power. So it runs on a connection of its
/// own, and the queue's connections keep SQLite's `FULL`, where a push is on disk once it returns.
pub async fn open_queue(path: &Path) -> Result<Queue, apalis_sqlite::Error> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    let setup = SqlitePool::connect_with(options.clone()).await?;
    SqliteStorage::setup(&setup).await?;
    setup.close().await;

    let pool = SqlitePool::connect_with(options.synchronous(SqliteSynchronous::Full)).await?;
    Ok(SqliteStorage::new(&pool).with_config(Config::default().queue(QUEUE)))
}

#[derive(Clone)]
struct AppState {
    queue: Queue,
    analytics: Analytics,
}

/// The query of `POST /checkout`.
#[derive(Deserialize)]
struct Order {
    order: u64,
    email: String,
}

/// The routes, inside an [`AfterLayer`], and the handle that drains its callbacks at shutdown.
pub fn app(queue: Queue, analytics: Analytics) -> (Router, AfterTasks) {
    let layer = AfterLayer::new().max_duration(Duration::from_secs(10));
    let tasks = layer.tasks();
    let router = Router::new()
        .route("/checkout", post(checkout))
        .with_state(AppState { queue, analytics })
        .layer(layer);
    (router, tasks)
}

/// Places an order: queues its receipt before answering, records the page view after.
async fn checkout(
    State(state): State<AppState>,
    after: After,
    Query(order): Query<Order>,
) -> (StatusCode, String) {
    // Best effort, after the response: it sees the status, failures included, and a slow
    // analytics service delays no one.
    let analytics = state.analytics;
    after.run_with(move |ctx| async move {
        let view = PageView {
            path: ctx.request().uri().path().to_owned(),
            status: ctx.outcome().status().map(|status| status.as_u16()),
            elapsed: ctx.outcome().elapsed(),
        };
        analytics.record(view).await;
    });

    // Your application would commit the order to its database here.

    // Must not be lost: the receipt is in the queue before the client hears "placed". Clones of
    // the storage share its connection pool.
    let receipt = Receipt {
        order: order.order,
        email: order.email,
    };
    let mut queue = state.queue;
    match queue.push(receipt).await {
        Ok(()) => (
            StatusCode::CREATED,
            format!("order {} placed, receipt queued\n", order.order),
        ),
        Err(error) => {
            tracing::error!(order = order.order, "cannot queue the receipt: {error}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the receipt could not be queued, try again\n".to_owned(),
            )
        }
    }
}

/// The job: sends one receipt.
async fn send_receipt(receipt: Receipt, mailer: Data<Mailer>) -> Result<(), BoxDynError> {
    mailer.send(receipt).await
}

/// Runs a worker that sends the receipts of `queue` with `mailer`, until `shutdown` resolves;
/// then it lets the jobs it has started finish.
///
/// `name` must be unique among the workers alive on the queue: apalis refuses to start a worker
/// under the name of one that was seen within its heartbeat interval (30 s). A job left running
/// by a worker that died is queued again once that worker has missed its heartbeats, and then
/// goes to whichever worker is alive; jobs that no worker had taken yet go to the next one at
/// once.
pub async fn run_worker(
    name: &str,
    queue: Queue,
    mailer: Mailer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    WorkerBuilder::new(name)
        .backend(queue.poll_with_interval(POLL_INTERVAL))
        .data(mailer)
        .build(send_receipt)
        .run_until(async move {
            shutdown.await;
            Ok::<_, WorkerError>(())
        })
        .await
}
