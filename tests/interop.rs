//! `AfterLayer` among the middleware axum users already have: tower-http's panic catching,
//! timeouts, compression, tracing and body limits, and axum's own `from_fn`, nesting,
//! `route_layer`, fallbacks and state.
#![cfg(feature = "axum")]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_after::{After, AfterLayer, Completion};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use support::{Journal, Seen};

/// Sends `request` to `app` and reads the whole response body; returns status and body size.
async fn send(app: Router, request: Request) -> (StatusCode, usize) {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body.len())
}

fn get_request(path: &str) -> Request {
    Request::get(path).body(Body::empty()).unwrap()
}

/// Middleware inside `AfterLayer` that records every request's outcome.
async fn record_every_request(
    State(journal): State<Journal>,
    after: After,
    request: Request,
    next: Next,
) -> Response {
    after.run_with(move |ctx| async move { journal.push(Seen::from_context(&ctx)) });
    next.run(request).await
}

fn recorded(router: Router, journal: &Journal) -> Router {
    router
        .layer(middleware::from_fn_with_state(
            journal.clone(),
            record_every_request,
        ))
        .layer(AfterLayer::new())
}

#[tokio::test]
async fn catch_panic_inside_lets_callbacks_see_its_500() {
    let journal = Journal::default();
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                panic!("handler bug");
                #[allow(unreachable_code)]
                "unreachable"
            }),
        )
        .layer(CatchPanicLayer::new());
    let app = recorded(app, &journal);
    assert_eq!(
        send(app, get_request("/")).await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let seen = journal.wait_for("/", 1).await;
    assert_eq!(
        (seen[0].status, seen[0].completion),
        (Some(500), Completion::Complete)
    );
}

#[tokio::test]
async fn a_timed_out_request_still_runs_its_callbacks() {
    let journal = Journal::default();
    let handler_journal = journal.clone();
    let app = Router::new()
        .route(
            "/slow",
            get(move |after: After| async move {
                // Registered by the handler, which the timeout then drops.
                after.run_with(move |ctx| async move {
                    let mut seen = Seen::from_context(&ctx);
                    seen.path = "from the handler".to_owned();
                    handler_journal.push(seen);
                });
                tokio::time::sleep(Duration::from_secs(60)).await;
                "too late"
            }),
        )
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(50),
        ));
    let app = recorded(app, &journal);
    assert_eq!(
        send(app, get_request("/slow")).await.0,
        StatusCode::REQUEST_TIMEOUT
    );
    for path in ["/slow", "from the handler"] {
        let seen = journal.wait_for(path, 1).await;
        assert_eq!(
            (seen[0].status, seen[0].completion),
            (Some(408), Completion::Complete),
            "{path}"
        );
    }
}

#[tokio::test]
async fn compression_on_either_side_of_the_layer() {
    const SIZE: usize = 64 * 1024;
    let handler = || async { "a".repeat(SIZE) };
    let gzip = || {
        Request::get("/")
            .header("accept-encoding", "gzip")
            .body(Body::empty())
            .unwrap()
    };

    // Inside: callbacks count the compressed bytes.
    let journal = Journal::default();
    let inside = recorded(
        Router::new()
            .route("/", get(handler))
            .layer(CompressionLayer::new()),
        &journal,
    );
    let (status, sent) = send(inside, gzip()).await;
    assert_eq!(status, StatusCode::OK);
    let seen = journal.wait_for("/", 1).await;
    assert_eq!(seen[0].completion, Completion::Complete);
    assert_eq!(seen[0].body_bytes, sent as u64);
    assert!(sent < SIZE / 10, "the body was compressed: {sent} bytes");

    // Outside: callbacks count the bytes before compression.
    let journal = Journal::default();
    let outside =
        recorded(Router::new().route("/", get(handler)), &journal).layer(CompressionLayer::new());
    let (status, sent) = send(outside, gzip()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(sent < SIZE / 10);
    let seen = journal.wait_for("/", 1).await;
    assert_eq!(
        (seen[0].completion, seen[0].body_bytes),
        (Completion::Complete, SIZE as u64)
    );
}

#[tokio::test]
async fn callback_logs_name_their_request_outside_the_trace_layer_span() {
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || Capture(writer.clone()))
        .finish();
    support::ask_every_subscriber();
    let _guard = tracing::subscriber::set_default(subscriber);

    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = Router::new()
        .route(
            "/traced",
            get(|after: After| async move {
                after.run(async { tracing::info!("written by the callback") });
                "ok"
            }),
        )
        .layer(layer)
        .layer(TraceLayer::new_for_http());
    assert_eq!(send(app, get_request("/traced")).await.0, StatusCode::OK);
    support::eventually("the callback", || tasks.pending() == 0).await;

    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|line| line.contains("written by the callback"))
        .unwrap_or_else(|| panic!("no callback log in:\n{text}"));
    // Its own span, not a child of the request's (which closed with the response), naming the
    // request it belongs to.
    // And the line of code that registered the work.
    assert!(
        line.contains("after{method=GET path=\"/traced\" site=tests/interop.rs:"),
        "{line}"
    );
    assert!(!line.contains("request{"), "{line}");
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_request_refused_by_a_body_limit_runs_its_callbacks() {
    let journal = Journal::default();
    let app = Router::new()
        .route(
            "/upload",
            post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        )
        .layer(RequestBodyLimitLayer::new(16));
    let app = recorded(app, &journal);
    let request = Request::post("/upload")
        .body(Body::from(vec![b'x'; 1024]))
        .unwrap();
    assert_eq!(send(app, request).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    let seen = journal.wait_for("/upload", 1).await;
    assert_eq!(
        (seen[0].status, seen[0].completion),
        (Some(413), Completion::Complete)
    );
}

#[tokio::test]
async fn nested_routers_see_the_full_path() {
    let journal = Journal::default();
    let api = Router::new().route("/users/{id}", get(|| async { "user" }));
    let app = recorded(Router::new().nest("/api", api), &journal);
    assert_eq!(
        send(app, get_request("/api/users/7")).await.0,
        StatusCode::OK
    );
    let seen = journal.wait_for("/api/users/7", 1).await;
    assert_eq!(seen[0].status, Some(200));
}

#[tokio::test]
async fn fallbacks_are_inside_the_layer() {
    let journal = Journal::default();
    let fallback_journal = journal.clone();
    let app = Router::new().route("/", get(|| async { "home" })).fallback(
        move |after: After| async move {
            after.run_with(move |ctx| async move {
                let mut seen = Seen::from_context(&ctx);
                seen.path = "fallback".to_owned();
                fallback_journal.push(seen);
            });
            (StatusCode::NOT_FOUND, "nothing here")
        },
    );
    let app = recorded(app, &journal);
    assert_eq!(
        send(app, get_request("/missing")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(journal.wait_for("fallback", 1).await[0].status, Some(404));
    assert_eq!(journal.wait_for("/missing", 1).await[0].status, Some(404));
}

#[tokio::test]
async fn route_layer_covers_matched_routes_only() {
    let app = Router::new()
        .route(
            "/",
            get(|after: Option<After>| async move { format!("{}", after.is_some()) }),
        )
        .route_layer(AfterLayer::new())
        .fallback(|after: Option<After>| async move { format!("{}", after.is_some()) });
    let response = app.clone().oneshot(get_request("/")).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"true");
    let response = app.oneshot(get_request("/missing")).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"false", "the fallback is outside `route_layer`");
}

#[derive(Clone)]
struct AppState {
    greeting: &'static str,
    journal: Journal,
}

#[tokio::test]
async fn state_extractors_beside_after() {
    let journal = Journal::default();
    let state = AppState {
        greeting: "hello",
        journal: journal.clone(),
    };
    let app = Router::new()
        .route(
            "/",
            get(|State(state): State<AppState>, after: After| async move {
                let journal = state.journal.clone();
                after.run_with(move |ctx| async move { journal.push(Seen::from_context(&ctx)) });
                state.greeting
            }),
        )
        .with_state(state)
        .layer(AfterLayer::new());
    assert_eq!(send(app, get_request("/")).await, (StatusCode::OK, 5));
    assert_eq!(journal.wait_for("/", 1).await[0].body_bytes, 5);
}
