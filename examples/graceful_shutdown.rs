//! Run with
//!
//! ```not_rust
//! cargo run --example graceful_shutdown
//! ```
//!
//! then call `curl 'http://127.0.0.1:3000/work?ms=3000'` a few times and press Ctrl-C (or send
//! SIGTERM): the server stops taking requests, waits for the work the requests left behind, for
//! at most the grace period, and prints what it drained.
//!
//! Settings, from the environment:
//! - `ADDR`: where to listen (default `127.0.0.1:3000`; `127.0.0.1:0` picks a free port);
//! - `GRACE_MS`: the grace period of the drain, in milliseconds (default 10000);
//! - `JOURNAL`: a file each callback appends a line to once its work is done (default: none).

use std::time::Duration;

use axum::extract::Query;
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tower_after::{After, AfterLayer};

#[derive(Deserialize)]
struct Work {
    /// How long the work left behind takes, in milliseconds.
    ms: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let address = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let grace = Duration::from_millis(
        std::env::var("GRACE_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(10_000),
    );

    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = Router::new().route("/work", get(work)).layer(layer);

    let listener = TcpListener::bind(&address).await?;
    // On stdout, for whoever started this process: where to send requests.
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;

    tracing::info!("no longer serving; draining callbacks for at most {grace:?}");
    let report = tasks.shutdown(grace).await;
    println!(
        "drained: {} completed, {} cancelled",
        report.completed(),
        report.cancelled()
    );
    Ok(())
}

async fn work(later: After, Query(work): Query<Work>) -> &'static str {
    later.run_with(move |ctx| async move {
        tokio::time::sleep(Duration::from_millis(work.ms)).await;
        let line = format!("done {} after {} ms\n", ctx.request().uri(), work.ms);
        if let Ok(path) = std::env::var("JOURNAL") {
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .await;
            match file {
                Ok(mut file) => {
                    if let Err(error) = file.write_all(line.as_bytes()).await {
                        tracing::error!("cannot write to {path}: {error}");
                    }
                }
                Err(error) => tracing::error!("cannot open {path}: {error}"),
            }
        }
        tracing::info!("{}", line.trim_end());
    });
    "Accepted: the work runs after this response.\n"
}

/// Resolves on Ctrl-C, or on SIGTERM where there is one.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
