//! An AWS Lambda function whose callbacks run after its response is posted: Vercel's
//! `waitUntil`, on Lambda. [cargo-lambda](https://www.cargo-lambda.info) runs it locally and
//! deploys it.
//!
//! # Locally
//!
//! `cargo lambda watch` emulates Lambda's Runtime API and function URLs. In this directory
//! (`examples/lambda-function`):
//!
//! ```not_rust
//! pip install cargo-lambda   # or pipx, where the system's Python refuses pip
//! cargo lambda watch --invoke-address 127.0.0.1
//! ```
//!
//! (Without `--invoke-address`, the emulator listens on every interface.) Then, in another
//! terminal:
//!
//! ```not_rust
//! curl -X POST http://127.0.0.1:9000/lambda-url/tower-after-demo/checkout   # "ordered", at once
//! curl http://127.0.0.1:9000/lambda-url/tower-after-demo/report             # "report scheduled", at once
//! ```
//!
//! The emulator builds and starts the function at the first request, and its terminal shows the
//! callbacks after their responses: `audit written status=Some(200)` 200 ms after `ordered`,
//! `report started` at once after `report scheduled` and `report finished` 2 s later. A request
//! sent during those 2 s is answered only after `report finished`: like Lambda, the emulator hands
//! the function one event at a time, and the function asks for the next one only once the
//! callbacks of the last one have ended.
//!
//! Two warnings at the first request are expected. The emulator sends a deadline in 1970
//! (`lambda-runtime-deadline-ms: 600000`), which `tower_after::lambda` recognizes as no real one
//! (`the Lambda invocation's deadline is not a real one`): each request's budget alone then bounds
//! its callbacks, and none is cancelled. And `lambda_runtime` says that the emulator's
//! `AWS_LAMBDA_MAX_CONCURRENCY` of 1 means running sequentially, which it does. Ctrl-C stops the
//! emulator and the function, whose SIGTERM handler drains what is left
//! (`after callbacks drained at shutdown`).
//!
//! # On AWS
//!
//! In this directory, with your AWS credentials:
//!
//! ```not_rust
//! cargo lambda build --release
//! cargo lambda deploy --enable-function-url --timeout 10
//! ```
//!
//! `build` puts the function in `target/lambda/tower-after-demo/bootstrap`; `deploy` creates the
//! function `tower-after-demo` (named after the binary) with a URL, and its role if needed. Then
//! call the URL that `deploy` prints:
//!
//! ```not_rust
//! curl -X POST "$FUNCTION_URL/checkout"   # answers at once; the audit line follows in the log
//! curl "$FUNCTION_URL/report"             # 2 s of work after the response, within its 5 s budget
//! ```
//!
//! # What it shows
//!
//! The function answers each request at once. `DrainLayer` lets the runtime post that answer,
//! then runs the request's callbacks, and asks Lambda for the next event only once they ended,
//! so Lambda does not freeze them half-way. CloudWatch shows, per invocation, the callback's
//! lines before the invocation's `END` line; the billed duration includes them. A callback
//! that would outlive the function's timeout (10 s here) is cancelled 100 ms before it, with
//! a warning. When Lambda shuts the environment down, SIGTERM drains what is left, within
//! 300 ms of the 500 ms Lambda allows.
//!
//! The code is the same as for a server, except for `main`. It runs only under Lambda or its
//! emulator, which provide the Runtime API that it talks to. `tests/` runs this very binary
//! against a Runtime API on 127.0.0.1, and under `cargo lambda watch`.

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
