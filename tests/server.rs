//! The core rules, checked against a real axum server on 127.0.0.1 and a real HTTP client.
#![cfg(feature = "axum")]

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tower_after::{After, AfterLayer, AfterTasks, Completion};

use support::{fetch, serve, within, Journal, Seen};

/// Sets a flag when dropped: shows that the server freed a response body.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct Probes {
    journal: Journal,
    /// Released by the test to let the `/gated` callback finish.
    gate: Arc<Semaphore>,
    /// Notified when `/stuck` has started handling its request.
    stuck_started: Arc<Notify>,
    /// Set when the `/stream` body is dropped.
    stream_dropped: Arc<AtomicBool>,
}

impl Default for Probes {
    fn default() -> Self {
        Self {
            journal: Journal::default(),
            gate: Arc::new(Semaphore::new(0)),
            stuck_started: Arc::default(),
            stream_dropped: Arc::default(),
        }
    }
}

fn record(after: &After, journal: &Journal) {
    let journal = journal.clone();
    after.run_with(move |ctx| async move { journal.push(Seen::from_context(&ctx)) });
}

fn app(probes: &Probes) -> (Router, AfterTasks) {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let p = probes.clone();
    let router = Router::new()
        .route(
            "/hello",
            get(|after: After| async move {
                record(&after, &p.journal);
                tokio::time::sleep(Duration::from_millis(5)).await;
                "hello"
            }),
        )
        .route("/empty", {
            let p = probes.clone();
            get(|after: After| async move {
                record(&after, &p.journal);
                StatusCode::NO_CONTENT
            })
        })
        .route("/gated", {
            let p = probes.clone();
            get(|after: After| async move {
                record(&after, &p.journal);
                let gate = p.gate.clone();
                after.run(async move { drop(gate.acquire().await.unwrap()) });
                "gated"
            })
        })
        .route("/stuck", {
            let p = probes.clone();
            get(|after: After| async move {
                record(&after, &p.journal);
                p.stuck_started.notify_one();
                std::future::pending::<&'static str>().await
            })
        })
        .route("/stream", {
            let p = probes.clone();
            get(|after: After| async move {
                record(&after, &p.journal);
                // A callback still pending must not keep the body alive.
                let gate = p.gate.clone();
                after.run(async move { drop(gate.acquire().await.unwrap()) });
                let flag = DropFlag(p.stream_dropped.clone());
                let ticks = futures_util::stream::unfold(flag, |flag| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Some((Ok::<_, Infallible>(Bytes::from_static(b"tick\n")), flag))
                });
                Body::from_stream(ticks)
            })
        })
        .layer(layer);
    (router, tasks)
}

async fn idle(tasks: &AfterTasks) {
    support::eventually("no pending callbacks", || tasks.pending() == 0).await;
}

#[tokio::test]
async fn a_callback_runs_once_after_a_complete_response() {
    let probes = Probes::default();
    let (app, tasks) = app(&probes);
    let address = serve(app).await;

    let (status, body) = fetch(address, "GET", "/hello").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
    let seen = probes.journal.wait_for("/hello", 1).await;
    assert_eq!(seen[0].completion, Completion::Complete);
    assert_eq!((seen[0].status, seen[0].body_bytes), (Some(200), 5));
    idle(&tasks).await;
}

#[tokio::test]
async fn head_and_204_responses_are_complete() {
    let probes = Probes::default();
    let (app, _tasks) = app(&probes);
    let address = serve(app).await;

    let (status, body) = fetch(address, "HEAD", "/hello").await;
    assert_eq!((status, body.len()), (StatusCode::OK, 0));
    let (status, _) = fetch(address, "GET", "/empty").await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let head = probes.journal.wait_for("/hello", 1).await;
    assert_eq!(
        (head[0].status, head[0].completion),
        (Some(200), Completion::Complete)
    );
    let empty = probes.journal.wait_for("/empty", 1).await;
    assert_eq!(
        (empty[0].status, empty[0].completion),
        (Some(204), Completion::Complete)
    );
}

#[tokio::test]
async fn a_slow_callback_delays_neither_its_response_nor_the_next_on_the_connection() {
    let probes = Probes::default();
    let (app, tasks) = app(&probes);
    let address = serve(app).await;

    let stream = TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    for path in ["/gated", "/hello"] {
        let request = http::Request::get(path)
            .header("host", "localhost")
            .body(Empty::new())
            .unwrap();
        let response = within(path, sender.send_request(request)).await.unwrap();
        within(path, response.into_body().collect()).await.unwrap();
    }
    // Both responses went out over one connection while `/gated`'s callback was blocked.
    probes.journal.wait_for("/hello", 1).await;
    assert_eq!(tasks.pending(), 1);
    probes.gate.add_permits(1);
    idle(&tasks).await;
}

#[tokio::test]
async fn a_client_leaving_mid_stream_aborts_and_frees_the_body() {
    let probes = Probes::default();
    let (app, tasks) = app(&probes);
    let address = serve(app).await;

    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /stream HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    while !String::from_utf8_lossy(&received).contains("tick") {
        let mut buffer = [0; 1024];
        let read = within("the first tick", stream.read(&mut buffer))
            .await
            .unwrap();
        assert!(read > 0, "the server closed the stream");
        received.extend_from_slice(&buffer[..read]);
    }
    drop(stream);

    let seen = probes.journal.wait_for("/stream", 1).await;
    assert_eq!(
        (seen[0].status, seen[0].completion),
        (Some(200), Completion::Aborted)
    );
    assert!(seen[0].body_bytes >= 5);
    assert_eq!(tasks.pending(), 1, "the gated callback is still pending");
    assert!(
        probes.stream_dropped.load(Ordering::SeqCst),
        "a pending callback kept the body alive"
    );
    probes.gate.add_permits(1);
    idle(&tasks).await;
}

#[tokio::test]
async fn a_client_leaving_before_the_response_aborts_the_request() {
    let probes = Probes::default();
    let (app, tasks) = app(&probes);
    let address = serve(app).await;

    let mut stream = TcpStream::connect(address).await.unwrap();
    let started = probes.stuck_started.notified();
    stream
        .write_all(b"GET /stuck HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    within("the handler to start", started).await;
    drop(stream);

    let seen = probes.journal.wait_for("/stuck", 1).await;
    assert_eq!(
        (seen[0].status, seen[0].completion),
        (None, Completion::Aborted)
    );
    idle(&tasks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_each_see_only_their_own_cookies() {
    const REQUESTS: usize = 1_000;
    let probes = Probes::default();
    let (app, tasks) = app(&probes);
    let address = serve(app).await;
    let client = support::client();

    let mut requests = tokio::task::JoinSet::new();
    for id in 0..REQUESTS {
        let client = client.clone();
        requests.spawn(async move {
            let request = http::Request::get(format!("http://{address}/hello"))
                .header("x-id", id.to_string())
                .header("cookie", format!("theme=dark; session-id=s{id}"))
                .header("cookie", "tracking=1")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.into_body().collect().await.unwrap();
        });
    }
    within("all responses", async {
        while let Some(joined) = requests.join_next().await {
            joined.unwrap();
        }
    })
    .await;

    let mut seen = probes.journal.wait_for("/hello", REQUESTS).await;
    seen.sort_by_key(|seen| seen.id.as_deref().unwrap().parse::<usize>().unwrap());
    for (id, seen) in seen.iter().enumerate() {
        assert_eq!(
            seen.id.as_deref(),
            Some(&*id.to_string()),
            "each request ran once"
        );
        assert_eq!(seen.session.as_deref(), Some(&*format!("s{id}")));
        assert_eq!(seen.completion, Completion::Complete);
    }
    idle(&tasks).await;
}

/// A streamed body, with no length known in advance (a gRPC server stream, a body built from a
/// stream of frames): data, then trailers. Like most streamed bodies, it never claims
/// `is_end_stream()` on its own.
fn data_then_trailers() -> Body {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = futures_util::stream::iter([
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"hello"))),
        Ok(http_body::Frame::trailers(trailers)),
    ]);
    Body::new(http_body_util::StreamBody::new(frames))
}

/// A server whose one route answers with `make()` and records how its response ended.
async fn serve_recording(
    make: fn() -> http::Response<Body>,
) -> (
    std::net::SocketAddr,
    AfterTasks,
    Arc<Mutex<Vec<Completion>>>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = Router::new()
        .route(
            "/",
            get(move |later: After| {
                let record = record.clone();
                async move {
                    later.run_with(move |ctx| async move {
                        record.lock().unwrap().push(ctx.outcome().completion());
                    });
                    make()
                }
            }),
        )
        .layer(layer);
    (serve(app).await, tasks, seen)
}

/// The callback ran once, and saw a response sent in full.
async fn ran_once_complete(tasks: &AfterTasks, seen: &Mutex<Vec<Completion>>) {
    support::eventually("the callback", || !seen.lock().unwrap().is_empty()).await;
    within("the callbacks to end", tasks.idle()).await;
    assert_eq!(
        *seen.lock().unwrap(),
        [Completion::Complete],
        "a response sent in full, trailers included, is seen as a client that left"
    );
}

/// hyper (HTTP/2 and HTTP/1.1 alike) sends a trailers frame as the end of the response and then
/// drops the body without polling it again: the response was sent in full, and its callbacks
/// must see `Completion::Complete`, not a client that left.
#[tokio::test]
async fn trailers_end_a_streamed_response_over_http2() {
    let (address, tasks, seen) =
        serve_recording(|| http::Response::new(data_then_trailers())).await;
    let stream = TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(format!("http://{address}/"))
        .body(Empty::new())
        .unwrap();
    let response = within("the response", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let collected = within("the body", response.into_body().collect())
        .await
        .unwrap();
    // The client got everything: the data and the trailers.
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), "hello");

    ran_once_complete(&tasks, &seen).await;
}

/// The same over HTTP/1.1 with chunked encoding: hyper writes the trailers, ends the message,
/// and drops the body.
#[tokio::test]
async fn trailers_end_a_streamed_response_over_http1() {
    let (address, tasks, seen) =
        serve_recording(|| http::Response::new(data_then_trailers())).await;
    let request = http::Request::get(format!("http://{address}/"))
        .header("te", "trailers")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("the response", support::client().request(request))
        .await
        .unwrap();
    let collected = within("the body", response.into_body().collect())
        .await
        .unwrap();
    assert_eq!(collected.to_bytes(), "hello");

    ran_once_complete(&tasks, &seen).await;
}

/// 5 bytes of data, then trailers, under a `Content-Length: 10` header: the body is shorter
/// than it announced.
fn short_body_then_trailers() -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = futures_util::stream::iter([
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"hello"))),
        Ok(http_body::Frame::trailers(trailers)),
    ]);
    http::Response::builder()
        .header("content-length", "10")
        .body(Body::new(http_body_util::StreamBody::new(frames)))
        .unwrap()
}

/// The same short body, without trailers: the control case, which the crate already reports
/// as `BodyError` ("Shorter than its announced length: the server cannot complete the response").
fn short_body() -> http::Response<Body> {
    let frames = futures_util::stream::iter([Ok::<_, Infallible>(http_body::Frame::data(
        Bytes::from_static(b"hello"),
    ))]);
    http::Response::builder()
        .header("content-length", "10")
        .body(Body::new(http_body_util::StreamBody::new(frames)))
        .unwrap()
}

/// How the response `make` returns ends, served through the layer in process and read to its
/// end.
async fn completion_in_process(make: fn() -> http::Response<Body>) -> Completion {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let service = tower::Layer::layer(
        &layer,
        tower::service_fn(move |request: http::Request<()>| {
            let record = record.clone();
            let after = request.extensions().get::<After>().unwrap().clone();
            async move {
                after.run_with(move |ctx| async move {
                    record.lock().unwrap().push(ctx.outcome().completion());
                });
                Ok::<_, Infallible>(make())
            }
        }),
    );
    let response = tower::ServiceExt::oneshot(service, http::Request::new(()))
        .await
        .unwrap();
    let _ = response.into_body().collect().await;
    within("the callback", tasks.idle()).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    seen[0]
}

/// A body shorter than it announced fails the response.
#[tokio::test]
async fn control_a_short_body_without_trailers_is_a_body_error() {
    assert_eq!(
        completion_in_process(short_body).await,
        Completion::BodyError
    );
}

/// Trailers end the body, but not a response shorter than it announced: that one failed.
#[tokio::test]
async fn trailers_after_a_short_body_are_not_a_complete_response() {
    assert_eq!(
        completion_in_process(short_body_then_trailers).await,
        Completion::BodyError,
        "5 of 10 announced bytes, then trailers, reported as a response sent in full"
    );
}

/// The same through hyper over HTTP/1.1: hyper drops the trailers (a `Content-Length` body has
/// no room for them), then fails the message for want of 5 bytes; the client never gets the
/// whole body, and the callback must not be told it was sent in full.
#[tokio::test]
async fn trailers_after_a_short_body_over_http1_are_not_complete() {
    let (address, tasks, seen) = serve_recording(short_body_then_trailers).await;
    let request = http::Request::get(format!("http://{address}/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    // hyper fails the connection: the client gets no response, or a truncated body.
    let client_saw = match within("the response", support::client().request(request)).await {
        Ok(response) => within("the body", response.into_body().collect())
            .await
            .map(|body| body.to_bytes())
            .map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    };
    assert!(
        client_saw.is_err(),
        "the client got the whole body: {client_saw:?}"
    );
    support::eventually("the callback", || !seen.lock().unwrap().is_empty()).await;
    within("the callbacks to end", tasks.idle()).await;
    assert_eq!(
        *seen.lock().unwrap(),
        [Completion::BodyError],
        "a response hyper failed to send (the client got no full body) is reported as complete"
    );
}
