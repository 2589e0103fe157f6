//! Run with
//!
//! ```not_rust
//! cargo run --example per_route
//! ```
//!
//! then, in another terminal:
//!
//! ```not_rust
//! curl http://127.0.0.1:3000/quick     # 1 s of work: well within the router's 3 s budget
//! curl http://127.0.0.1:3000/report    # 6 s of work: fine, this route allows 10 s
//! curl http://127.0.0.1:3000/overrun   # 6 s of work under a 3 s budget: cancelled, with a warning
//! ```
//!
//! Next.js's `maxDuration`, per route: `AfterLayer::max_duration` sets the default budget of
//! every request's after-response work; `MaxDuration` on a route overrides it. The budget is
//! shared by all of a request's callbacks and counted from the end of its response. When it runs
//! out, what still runs is dropped and the log says so:
//!
//! ```not_rust
//! WARN after{method=GET path="/overrun"}: tower_after::callback: after callback cancelled:
//! the request's max duration of 3s ran out (raise it with `MaxDuration` on the route or
//! `AfterLayer::max_duration`) method=GET path="/overrun"
//! ```

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tower_after::{After, AfterLayer, MaxDuration};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let app = Router::new()
        .route("/quick", get(|later: After| work(later, 1)))
        .route(
            "/report",
            get(|later: After| work(later, 6)).layer(MaxDuration::new(Duration::from_secs(10))),
        )
        .route("/overrun", get(|later: After| work(later, 6)))
        .layer(AfterLayer::new().max_duration(Duration::from_secs(3)));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}

async fn work(later: After, seconds: u64) -> String {
    later.run_with(move |ctx| async move {
        let path = ctx.request().uri().path().to_owned();
        tracing::info!(path, "started {seconds} s of work");
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        tracing::info!(path, "finished {seconds} s of work");
    });
    format!("{seconds} s of work scheduled; see the server's log\n")
}
