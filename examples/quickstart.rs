//! Run with
//!
//! ```not_rust
//! cargo run --example quickstart
//! ```
//!
//! then, in another terminal:
//!
//! ```not_rust
//! curl -H 'cookie: session-id=abc' http://127.0.0.1:3000/
//! curl http://127.0.0.1:3000/report
//! ```
//!
//! Every request logs a line from an after-response callback: method, path, route template,
//! status, user agent, how the response ended and how long it took. `/report` also leaves 3
//! seconds of work behind; press Ctrl-C right after calling it and watch the server drain that
//! work before it exits.

use std::time::Duration;

use axum::extract::Request;
use axum::http::header::USER_AGENT;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tower_after::{After, AfterLayer};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with(tracing_subscriber::fmt::layer())
        .init();

    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = Router::new()
        .route("/", get(hello))
        .route("/report", get(report))
        // Middleware inside `AfterLayer` can schedule work too: here, for every request.
        .layer(middleware::from_fn(log_after_response))
        .layer(layer);

    let listener = TcpListener::bind("127.0.0.1:3000").await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;

    // The server stopped taking requests; let the work they left behind finish.
    let report = tasks.shutdown(Duration::from_secs(10)).await;
    tracing::info!(
        completed = report.completed(),
        cancelled = report.cancelled(),
        "bye"
    );
    Ok(())
}

async fn hello() -> &'static str {
    "Hello! This response went out before its log line was written.\n"
}

async fn report(later: After) -> &'static str {
    later.run(async {
        tracing::info!("building the report...");
        tokio::time::sleep(Duration::from_secs(3)).await;
        tracing::info!("report built");
    });
    "Your report is being built; see the server's log.\n"
}

async fn log_after_response(later: After, request: Request, next: Next) -> Response {
    later.run_with(|ctx| async move {
        let request = ctx.request();
        let outcome = ctx.outcome();
        let agent = request.headers().get(USER_AGENT);
        tracing::info!(
            method = %request.method(),
            path = request.path(),
            route = request.matched_path(),
            status = outcome.status().map(|status| status.as_u16()),
            user_agent = agent.and_then(|agent| agent.to_str().ok()).unwrap_or("-"),
            completion = %outcome.completion(),
            elapsed = ?outcome.elapsed(),
            "after response"
        );
    });
    next.run(request).await
}

/// Resolves on Ctrl-C, or on SIGTERM where there is one.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {error}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!("cannot listen for SIGTERM: {error}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
