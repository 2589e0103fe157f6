//! Run with
//!
//! ```not_rust
//! cargo lambda build --release --features lambda --example lambda
//! cargo lambda deploy --binary-name lambda --enable-function-url --timeout 10 tower-after-demo
//! ```
//!
//! then call the URL that `deploy` prints:
//!
//! ```not_rust
//! curl -X POST "$FUNCTION_URL/checkout"   # answers at once; the audit line follows in the log
//! curl "$FUNCTION_URL/report"             # 2 s of work after the response, within its 5 s budget
//! ```
//!
//! Vercel's `waitUntil` on AWS Lambda. [cargo-lambda](https://www.cargo-lambda.info) builds the
//! example for Lambda (`target/lambda/lambda/bootstrap`) and deploys it as a function with a
//! URL; `deploy` uses your AWS credentials and creates the function's role if needed.
//!
//! The function answers each request at once. `DrainLayer` lets the runtime post that answer,
//! then runs the request's callbacks, and asks Lambda for the next event only once they ended,
//! so Lambda does not freeze them half-way. CloudWatch shows, per invocation, the callback's
//! lines before the invocation's `END` line; the billed duration includes them. A callback
//! that would outlive the function's timeout (10 s here) is cancelled 100 ms before it, with
//! a warning. When Lambda shuts the environment down, SIGTERM drains what is left, within
//! 300 ms of the 500 ms Lambda allows.
//!
//! The code is the same as for a server, except for `main`. It runs only under Lambda (or
//! `cargo lambda watch`), which provides the Runtime API that it talks to.

use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tower_after::lambda::{graceful_shutdown, DrainLayer};
use tower_after::{After, AfterLayer, MaxDuration};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    // CloudWatch adds its own timestamps and shows no colours.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .without_time()
        .with_ansi(false)
        .init();

    // Each request's callbacks get 3 s unless a route says otherwise; all of them stay within
    // the function's timeout anyway.
    let layer = AfterLayer::new().max_duration(Duration::from_secs(3));
    let tasks = layer.tasks();
    let app = Router::new()
        .route("/checkout", post(checkout))
        .route(
            "/report",
            get(report).layer(MaxDuration::new(Duration::from_secs(5))),
        )
        .layer(layer);

    graceful_shutdown(tasks.clone(), Duration::from_millis(300)).await;
    lambda_runtime::Runtime::new(lambda_http::Adapter::from(app))
        .layer(DrainLayer::new(tasks))
        .run()
        .await
}

async fn checkout(after: After) -> &'static str {
    after.run_with(|ctx| async move {
        // Stands for a call to an audit service.
        tokio::time::sleep(Duration::from_millis(200)).await;
        tracing::info!(status = ?ctx.outcome().status(), "audit written");
    });
    "ordered\n"
}

async fn report(after: After) -> &'static str {
    after.run(async {
        tracing::info!("report started");
        tokio::time::sleep(Duration::from_secs(2)).await;
        tracing::info!("report finished");
    });
    "report scheduled\n"
}
