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
//! A server whose receipts go to a durable queue and whose analytics go through `after`, and the
//! worker that sends the receipts, in one process. Why the two kinds of work take different
//! roads, and how several replicas share one queue, is told in `src/lib.rs`.
//!
//! Settings, from the environment:
//! - `ADDR`: where to listen (default `127.0.0.1:3000`);
//! - `DATABASE`: the SQLite file of the queue (default `tower-after-durable-jobs.sqlite3` in the
//!   temporary directory); it outlives the process, and so do the jobs in it;
//! - `WORKER`: `off` to queue receipts without sending them, e.g. to `kill -9` the server and see
//!   the next run send them.

use std::time::Duration;

use durable_jobs::{app, open_queue, run_worker, Analytics, Mailer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();

    let path = std::env::var_os("DATABASE").map_or_else(
        || std::env::temp_dir().join("tower-after-durable-jobs.sqlite3"),
        Into::into,
    );
    let queue = open_queue(&path).await?;
    tracing::info!("queue in {}", path.display());

    // Stand-ins for an e-mail service and an analytics service, both slowish.
    let mailer = Mailer::new(|receipt| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tracing::info!(order = receipt.order, to = %receipt.email, "receipt sent");
        Ok(())
    });
    let analytics = Analytics::new(|view| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tracing::info!(path = %view.path, status = view.status, elapsed = ?view.elapsed, "page view recorded");
    });

    // Unique per process, and per machine when replicas share a queue (containers set
    // HOSTNAME): a restarted process must not wait for its former self's name to time out.
    let name = format!(
        "receipts-{}-{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "local".to_owned()),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let (stop_worker, stop) = oneshot::channel::<()>();
    let worker = if std::env::var("WORKER").is_ok_and(|worker| worker == "off") {
        tracing::warn!("WORKER=off: receipts are queued, not sent");
        None
    } else {
        let queue = queue.clone();
        Some(tokio::spawn(async move {
            let stopped = async {
                let _ = stop.await;
            };
            match run_worker(&name, queue, mailer, stopped).await {
                Ok(()) => tracing::info!("worker stopped"),
                Err(error) => tracing::error!("worker failed: {error}"),
            }
        }))
    };

    let (router, tasks) = app(queue, analytics);
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;

    // The server has stopped taking requests: drain the analytics, then let the worker finish
    // the receipt it may be sending. Receipts still queued wait in the file for the next run.
    tasks.shutdown(Duration::from_secs(10)).await;
    let _ = stop_worker.send(());
    if let Some(worker) = worker {
        if tokio::time::timeout(Duration::from_secs(10), worker)
            .await
            .is_err()
        {
            tracing::warn!("worker still busy after 10 s; its job will run again");
        }
    }
    Ok(())
}
