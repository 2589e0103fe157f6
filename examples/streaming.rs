//! Run with
//!
//! ```not_rust
//! cargo run --example streaming
//! ```
//!
//! then, in another terminal:
//!
//! ```not_rust
//! curl -N 'http://127.0.0.1:3000/ticks?count=5'   # the stream ends by itself after 5 events
//! curl -N http://127.0.0.1:3000/forever            # press Ctrl-C: the client leaves
//! ```
//!
//! A streaming response (server-sent events) finishes only when its stream ends or when the
//! client goes away. The callback runs then, not when the handler returns, and it learns which
//! of the two happened (`Completion::Complete` or `Completion::Aborted`) and how many bytes went
//! out.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::Query;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tower_after::{After, AfterLayer};

#[derive(Deserialize)]
struct Ticks {
    count: usize,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let app = Router::new()
        .route(
            "/ticks",
            get(|later: After, Query(ticks): Query<Ticks>| async move {
                report_when_done(&later);
                events(Some(ticks.count))
            }),
        )
        .route(
            "/forever",
            get(|later: After| async move {
                report_when_done(&later);
                events(None)
            }),
        )
        .layer(AfterLayer::new());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}

fn report_when_done(later: &After) {
    tracing::info!("handler returned; the stream is starting");
    later.run_with(|ctx| async move {
        let outcome = ctx.outcome();
        tracing::info!(
            path = ctx.request().uri().path(),
            completion = %outcome.completion(),
            bytes = outcome.body_bytes(),
            elapsed = ?outcome.elapsed(),
            "stream over"
        );
    });
}

/// One event every 500 ms: `count` of them, or until the client leaves.
fn events(count: Option<usize>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let ticks =
        stream::iter(1..)
            .take(count.unwrap_or(usize::MAX))
            .then(|tick: usize| async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(Event::default().data(format!("tick {tick}")))
            });
    Sse::new(ticks).keep_alive(KeepAlive::default())
}
