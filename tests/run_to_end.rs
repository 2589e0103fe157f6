//! `RunToEndLayer`: a handler whose client leaves halfway still runs to its end, and what it
//! registers then still runs, through a real server on 127.0.0.1. Without the layer, hyper drops
//! the handler at the client's departure, and the work it would have registered is lost.
#![cfg(feature = "axum")]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tower_after::{After, AfterLayer, AfterTasks, RunToEndLayer};
use tower_http::catch_panic::CatchPanicLayer;

use support::eventually;

/// What the handler and its after-work did, in order.
type Journal = Arc<Mutex<Vec<&'static str>>>;

/// Inserts an order, awaits the insert (the client leaves meanwhile), then registers its audit.
async fn create_order(State(journal): State<Journal>, later: After) -> &'static str {
    journal.lock().unwrap().push("inserting");
    tokio::time::sleep(Duration::from_millis(300)).await;
    journal.lock().unwrap().push("inserted");
    later.run(async move { journal.lock().unwrap().push("audited") });
    "created"
}

/// Serves the orders route, with or without `RunToEndLayer`.
async fn serve(run_to_end: bool) -> (std::net::SocketAddr, AfterTasks, Journal) {
    let journal = Journal::default();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let mut app = Router::new()
        .route("/orders", post(create_order))
        .with_state(journal.clone());
    if run_to_end {
        app = app.layer(RunToEndLayer::new());
    }
    let address = support::serve(app.layer(layer)).await;
    (address, tasks, journal)
}

/// Sends a POST and leaves once the handler has started.
async fn post_and_leave(address: std::net::SocketAddr, journal: &Journal) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"POST /orders HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    eventually("the handler to start", || {
        journal.lock().unwrap().contains(&"inserting")
    })
    .await;
    drop(stream);
}

#[tokio::test]
async fn a_handler_whose_client_left_runs_to_its_end_and_its_work_runs() {
    let (address, tasks, journal) = serve(true).await;
    post_and_leave(address, &journal).await;
    eventually("the audit", || journal.lock().unwrap().contains(&"audited")).await;
    tasks.idle().await;
    assert_eq!(
        *journal.lock().unwrap(),
        ["inserting", "inserted", "audited"]
    );
    // The rest of the handler was pending work of its request, then the audit.
    let stats = tasks.stats();
    assert_eq!((stats.scheduled(), stats.completed()), (2, 2), "{stats:?}");
}

#[tokio::test]
async fn without_the_layer_the_handler_is_dropped_when_its_client_leaves() {
    let (address, tasks, journal) = serve(false).await;
    post_and_leave(address, &journal).await;
    // Well past the moment the handler would have ended.
    tokio::time::sleep(Duration::from_millis(800)).await;
    tasks.idle().await;
    assert_eq!(*journal.lock().unwrap(), ["inserting"]);
}

#[tokio::test]
async fn a_shutdown_waits_for_a_handler_whose_client_left() {
    let (address, tasks, journal) = serve(true).await;
    post_and_leave(address, &journal).await;
    // The client is gone; the handler still awaits its insert.
    eventually("the rest of the handler to be pending", || {
        tasks.pending() == 1
    })
    .await;
    let report = tasks.shutdown(Duration::from_secs(20)).await;
    assert_eq!(
        (report.completed(), report.cancelled()),
        (2, 0),
        "{report:?}"
    );
    assert_eq!(
        *journal.lock().unwrap(),
        ["inserting", "inserted", "audited"]
    );
}

async fn panics() -> &'static str {
    panic!("a handler bug")
}

#[tokio::test]
async fn a_panicking_handler_still_reaches_the_layers_outside() {
    let app = Router::new()
        .route("/orders", post(panics))
        .layer(RunToEndLayer::new())
        .layer(CatchPanicLayer::new())
        .layer(AfterLayer::new());
    let address = support::serve(app).await;
    let (status, _) = support::fetch(address, "POST", "/orders").await;
    assert_eq!(status, 500);
}

/// The rest of a handler whose client left runs as the request's `wait_until` work: when it
/// panics, it is counted in `panicked` (and logged), like any `wait_until` future that panics,
/// not as completed.
#[tokio::test]
async fn a_handler_that_panics_after_its_client_left_is_counted_as_panicked() {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = Arc::new(std::sync::Mutex::new(Some(released)));
    let handler = tower::service_fn(move |_: http::Request<()>| {
        let released = released.lock().unwrap().take().unwrap();
        async move {
            let _ = released.await;
            if true {
                panic!("a handler bug, after the client left");
            }
            let body = http_body_util::Empty::<bytes::Bytes>::new();
            Ok::<_, std::convert::Infallible>(http::Response::new(body))
        }
    });
    let service = tower::Layer::layer(&layer, tower::Layer::layer(&RunToEndLayer::new(), handler));
    let mut call = Box::pin(tower::ServiceExt::oneshot(service, http::Request::new(())));
    assert!(futures_util::poll!(call.as_mut()).is_pending());
    // The client leaves: the rest of the handler becomes pending work of the request.
    drop(call);
    eventually("the rest of the handler pending", || tasks.pending() == 1).await;
    release.send(()).unwrap();
    support::within("the handler's end", tasks.idle()).await;
    let stats = tasks.stats();
    assert_eq!(
        (stats.panicked(), stats.completed()),
        (1, 0),
        "the handler's panic was counted as a completed callback: {stats:?}"
    );
}
