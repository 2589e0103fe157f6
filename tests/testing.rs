//! The testing pattern the README documents, exactly as a user writes it: read the response to
//! its end, wait for the layer's work with `AfterTasks::idle()`, then assert. Through `oneshot`
//! and through a real server on 127.0.0.1, and the three things the README warns of.
#![cfg(feature = "axum")]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::Request;
use axum::routing::post;
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_after::{After, AfterLayer, AfterTasks, Completion};

/// What the app's after-work wrote: the audit rows, with how each response ended.
type AuditLog = Arc<Mutex<Vec<Completion>>>;

async fn create_order(State(audit): State<AuditLog>, later: After) -> &'static str {
    later.run_with(move |ctx| async move {
        // A write that takes a moment, as a database's would.
        tokio::time::sleep(Duration::from_millis(20)).await;
        audit.lock().unwrap().push(ctx.outcome().completion());
    });
    "created"
}

/// The app, its layer's tasks, and its audit log.
fn app() -> (Router, AfterTasks, AuditLog) {
    let audit = AuditLog::default();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = Router::new()
        .route("/orders", post(create_order))
        .with_state(audit.clone())
        .layer(layer);
    (app, tasks, audit)
}

fn create() -> Request<Body> {
    Request::post("/orders").body(Body::empty()).unwrap()
}

#[tokio::test]
async fn through_oneshot_read_the_body_then_wait_for_idle() {
    let (app, tasks, audit) = app();
    let response = app.oneshot(create()).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "created");
    tasks.idle().await;
    assert_eq!(*audit.lock().unwrap(), [Completion::Complete]);
}

#[tokio::test]
async fn through_a_real_server_read_the_response_then_wait_for_idle() {
    let (app, tasks, audit) = app();
    let address = support::serve(app).await;
    for _ in 0..20 {
        let (status, body) = support::fetch(address, "POST", "/orders").await;
        assert_eq!((status.as_u16(), &body[..]), (200, &b"created"[..]));
        tasks.idle().await;
    }
    assert_eq!(audit.lock().unwrap().len(), 20);
}

#[tokio::test]
async fn a_response_held_unread_keeps_its_callbacks_waiting() {
    let (app, tasks, audit) = app();
    let response = app.oneshot(create()).await.unwrap();
    // While the test holds the response, its callback has not started: `idle()` waits.
    let waited = tokio::time::timeout(Duration::from_millis(200), tasks.idle()).await;
    assert!(
        waited.is_err(),
        "idle() resolved while the response was held"
    );
    assert!(audit.lock().unwrap().is_empty());
    response.into_body().collect().await.unwrap();
    tasks.idle().await;
    assert_eq!(*audit.lock().unwrap(), [Completion::Complete]);
}

#[tokio::test]
async fn a_response_dropped_unread_is_a_client_that_left() {
    let (app, tasks, audit) = app();
    let response = app.oneshot(create()).await.unwrap();
    drop(response);
    tasks.idle().await;
    assert_eq!(*audit.lock().unwrap(), [Completion::Aborted]);
}
