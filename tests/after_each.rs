//! `AfterLayer::after_each`: a hook after every response, through a real server on 127.0.0.1,
//! on the paths callbacks take: a completed response, a rejection before any handler ran, a
//! client that leaves, a panicking handler, and the drain at shutdown.
#![cfg(feature = "axum")]

mod support;

use std::time::Duration;

use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use tower_after::{After, AfterLayer, Completion};
use tower_http::catch_panic::CatchPanicLayer;

use support::{eventually, fetch, serve, Journal, Seen};

#[derive(serde::Deserialize)]
struct Order {
    item: String,
}

async fn panics() -> &'static str {
    panic!("handler bug")
}

/// Set once the `/slow` handler runs.
static SLOW_STARTED: AtomicBool = AtomicBool::new(false);

/// An app whose layer records every response with `after_each`; no handler registers anything.
fn app(journal: &Journal, layer: AfterLayer) -> Router {
    let journal = journal.clone();
    let layer = layer.after_each(move |ctx| {
        let journal = journal.clone();
        async move { journal.push(Seen::from_context(&ctx)) }
    });
    Router::new()
        .route("/ok", get(|| async { "fine" }))
        .route(
            "/json",
            post(|Json(order): Json<Order>| async move { order.item }),
        )
        .route(
            "/slow",
            get(|| async {
                SLOW_STARTED.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(30)).await;
                "too late"
            }),
        )
        .route("/panic", get(panics))
        .layer(CatchPanicLayer::new())
        .layer(layer)
}

#[tokio::test]
async fn the_hook_sees_every_response_even_where_no_handler_ran() {
    let journal = Journal::default();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let address = serve(app(&journal, layer)).await;

    // A completed response.
    assert_eq!(fetch(address, "GET", "/ok").await.0, 200);
    let seen = journal.wait_for("/ok", 1).await;
    assert_eq!(
        (seen[0].status, seen[0].completion),
        (Some(200), Completion::Complete)
    );

    // Malformed JSON: the extractor rejects it, the handler never runs.
    let request = http::Request::post(format!("http://{address}/json"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from("{not json")))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let status = client.request(request).await.unwrap().status();
    assert_eq!(status, 400);
    let seen = journal.wait_for("/json", 1).await;
    assert_eq!(
        (seen[0].status, seen[0].completion),
        (Some(400), Completion::Complete)
    );

    // A panicking handler: `CatchPanicLayer` inside makes it a 500.
    assert_eq!(fetch(address, "GET", "/panic").await.0, 500);
    let seen = journal.wait_for("/panic", 1).await;
    assert_eq!(
        (seen[0].status, seen[0].completion),
        (Some(500), Completion::Complete)
    );

    // A client that leaves while the handler works.
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    eventually("the server to take the request", || {
        SLOW_STARTED.load(Ordering::SeqCst)
    })
    .await;
    // The hook waits for the response's end without holding a place meanwhile.
    assert_eq!(tasks.pending(), 0);
    drop(stream);
    let seen = journal.wait_for("/slow", 1).await;
    assert_eq!(
        (seen[0].status, seen[0].completion),
        (None, Completion::Aborted)
    );

    // Counted like any callback.
    eventually("every hook to end", || tasks.pending() == 0).await;
    assert_eq!(tasks.stats().scheduled(), 4);
    assert_eq!(tasks.stats().completed(), 4);
}

#[tokio::test]
async fn the_hook_is_drained_at_shutdown() {
    let journal = Journal::default();
    let gate = std::sync::Arc::new(Semaphore::new(0));
    let (recorded, waiting) = (journal.clone(), gate.clone());
    let layer = AfterLayer::new().after_each(move |ctx| {
        let (journal, gate) = (recorded.clone(), waiting.clone());
        async move {
            let _permit = gate.acquire().await.unwrap();
            journal.push(Seen::from_context(&ctx));
        }
    });
    let tasks = layer.tasks();
    let address = serve(
        Router::new()
            .route("/ok", get(|| async { "fine" }))
            .layer(layer),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(fetch(address, "GET", "/ok").await.0, 200);
    }
    eventually("three hooks waiting", || tasks.pending() == 3).await;
    assert!(journal.all().is_empty());

    gate.add_permits(3);
    let report = tasks.shutdown(Duration::from_secs(20)).await;
    assert_eq!((report.completed(), report.cancelled()), (3, 0));
    assert_eq!(journal.for_path("/ok").len(), 3);
}

#[tokio::test]
async fn open_responses_hold_no_place_under_max_pending() {
    // Three streams stay open; with a bound of two, a fourth request's work is still taken.
    let layer = AfterLayer::new().max_pending(2).after_each(|_| async {});
    let tasks = layer.tasks();
    let (hold, held) = tokio::sync::watch::channel(());
    let app = Router::new()
        .route(
            "/stream",
            get(move || {
                let mut held = held.clone();
                async move {
                    let stream = async_stream(move || async move {
                        let _ = held.changed().await;
                    });
                    axum::body::Body::from_stream(stream)
                }
            }),
        )
        .route(
            "/work",
            get(|after: After| async move {
                match after.try_run_with(|_| async {}) {
                    Ok(()) => "taken",
                    Err(_) => "refused",
                }
            }),
        )
        .layer(layer);
    let address = serve(app).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /stream HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        streams.push(stream);
    }
    let (status, body) = fetch(address, "GET", "/work").await;
    assert_eq!((status, &body[..]), (http::StatusCode::OK, &b"taken"[..]));
    assert_eq!(tasks.stats().shed(), 0);
    drop(hold);
    drop(streams);
    eventually("every hook to end", || tasks.pending() == 0).await;
}

/// A body stream of no frames that ends when `wait` resolves.
fn async_stream<W, F>(
    wait: W,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>>
where
    W: FnOnce() -> F,
    F: std::future::Future<Output = ()>,
{
    use futures_util::StreamExt;
    futures_util::stream::once(wait()).filter_map(|()| async { None })
}
