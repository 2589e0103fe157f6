//! Every way a response can end, against every kind of callback, through a real server on
//! 127.0.0.1: each callback runs exactly once and sees how its response really ended.
#![cfg(feature = "axum")]

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tower_after::{After, AfterLayer, AfterTasks, Completion};
use tower_http::catch_panic::CatchPanicLayer;

use support::{eventually, within};

/// The kinds of callback every request registers.
const KINDS: [&str; 5] = ["async", "panicking", "nested", "wait_until", "late"];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    id: u64,
    kind: &'static str,
    /// What the callback saw, for those that get a context.
    seen: Option<(Option<u16>, Completion)>,
}

#[derive(Clone, Default)]
struct Journal {
    records: Arc<Mutex<Vec<Record>>>,
    /// Requests whose handler has started.
    started: Arc<Mutex<Vec<u64>>>,
}

impl Journal {
    fn push(&self, id: u64, kind: &'static str, seen: Option<(Option<u16>, Completion)>) {
        self.records.lock().unwrap().push(Record { id, kind, seen });
    }

    fn of(&self, id: u64) -> Vec<Record> {
        let records = self.records.lock().unwrap();
        records
            .iter()
            .filter(|record| record.id == id)
            .cloned()
            .collect()
    }
}

fn request_id(request: &Request) -> u64 {
    request
        .headers()
        .get("x-id")
        .and_then(|value| value.to_str().ok()?.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Inside `AfterLayer`, before any handler: registers one callback of every kind.
/// Panics; typed `()`, so that a callback ending with it returns `()` rather than `!`.
fn fail(message: &str) {
    panic!("{message}")
}

async fn register_every_kind(
    journal: axum::extract::State<Journal>,
    after: After,
    request: Request,
    next: Next,
) -> Response {
    let id = request_id(&request);
    let seen = |ctx: &tower_after::AfterContext| {
        let outcome = ctx.outcome();
        Some((outcome.status().map(|s| s.as_u16()), outcome.completion()))
    };

    let j = journal.clone();
    after.run_with(move |ctx| async move { j.push(id, "async", seen(&ctx)) });

    let j = journal.clone();
    after.run_with(move |ctx| async move {
        j.push(id, "panicking", seen(&ctx));
        fail("a deliberately panicking callback");
    });

    let j = journal.clone();
    after.run_with(move |ctx| async move {
        let outer = seen(&ctx);
        After::current().run(async move { j.push(id, "nested", outer) });
    });

    let j = journal.clone();
    after.wait_until(async move { j.push(id, "wait_until", None) });

    // Registers from a `wait_until` future once the response has finished.
    let (finished, on_finish) = oneshot::channel::<()>();
    after.run(async move {
        let _ = finished.send(());
    });
    let (j, late) = (journal.0.clone(), after.clone());
    after.wait_until(async move {
        if on_finish.await.is_ok() {
            tokio::task::yield_now().await;
            late.run_with(move |ctx| async move { j.push(id, "late", seen(&ctx)) });
        }
    });

    next.run(request).await
}

/// A body that yields a chunk every 5 ms and never ends.
fn endless() -> Body {
    let ticks =
        futures_util::stream::repeat_with(|| Ok::<_, Infallible>(Bytes::from_static(b"tick\n")))
            .then(|tick| async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                tick
            });
    Body::from_stream(ticks)
}

use futures_util::StreamExt;

fn app(journal: &Journal) -> (Router, AfterTasks) {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let stuck = journal.clone();
    let router = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route(
            "/error",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "broken") }),
        )
        .route(
            "/panic",
            get(|| async {
                panic!("a deliberately panicking handler");
                #[allow(unreachable_code)]
                "unreachable"
            }),
        )
        .route(
            "/caught-panic",
            get(|| async {
                panic!("a deliberately panicking handler, caught");
                #[allow(unreachable_code)]
                "unreachable"
            })
            .layer(CatchPanicLayer::new()),
        )
        .route(
            "/body-error",
            get(|| async {
                let chunks = futures_util::stream::iter([
                    Ok(Bytes::from_static(b"part")),
                    Err(std::io::Error::other("the body broke")),
                ]);
                Body::from_stream(chunks)
            }),
        )
        .route("/endless", get(|| async { endless() }))
        .route(
            "/stuck",
            get(move |request: Request| async move {
                stuck.started.lock().unwrap().push(request_id(&request));
                std::future::pending::<&'static str>().await
            }),
        )
        .route("/empty", get(|| async { StatusCode::NO_CONTENT }))
        .route("/not-modified", get(|| async { StatusCode::NOT_MODIFIED }))
        .route(
            "/sse",
            get(|| async {
                let events = futures_util::stream::repeat_with(|| {
                    Ok::<_, Infallible>(Event::default().data("tick"))
                })
                .then(|event| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    event
                });
                Sse::new(events).into_response()
            }),
        )
        .layer(middleware::from_fn_with_state(
            journal.clone(),
            register_every_kind,
        ))
        .layer(layer);
    (router, tasks)
}

// -- clients --------------------------------------------------------------------------------

async fn http1(address: std::net::SocketAddr, method: &str, path: &str, id: u64) {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"))
        .header("x-id", id)
        .body(Empty::<Bytes>::new())
        .unwrap();
    // A failed request (the server dropped the connection) is part of some endings.
    if let Ok(response) = support::client().request(request).await {
        let _ = response.into_body().collect().await;
    }
}

async fn http2(address: std::net::SocketAddr, path: &str, id: u64, read_one_frame: bool) {
    let stream = TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{address}{path}"))
        .header("x-id", id)
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let mut body = response.into_body();
    if read_one_frame {
        body.frame().await.unwrap().unwrap();
        // Dropping the body and the connection resets the stream mid-body.
        drop(body);
        drop(sender);
        connection.abort();
    } else {
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
    }
}

/// Sends a raw HTTP/1.1 request, reads until `until` shows up (if any), then hangs up.
async fn raw_then_leave(
    address: std::net::SocketAddr,
    path: &str,
    id: u64,
    until: Option<&str>,
) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nx-id: {id}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    if let Some(until) = until {
        let mut received = Vec::new();
        while !String::from_utf8_lossy(&received).contains(until) {
            let mut buffer = [0; 4096];
            let read = within("a first chunk", stream.read(&mut buffer))
                .await
                .unwrap();
            assert!(read > 0, "the server hung up first");
            received.extend_from_slice(&buffer[..read]);
        }
    }
    stream
}

// -- the matrix -----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Ending {
    Complete,
    HandlerError,
    HandlerPanic,
    CaughtPanic,
    BodyError,
    ClientAbortsMidBody,
    ClientLeavesDuringHandler,
    Head,
    NoContent,
    NotModified,
    SseEndedByClient,
    Http2Complete,
    Http2ResetMidBody,
}

impl Ending {
    const ALL: [Ending; 13] = [
        Ending::Complete,
        Ending::HandlerError,
        Ending::HandlerPanic,
        Ending::CaughtPanic,
        Ending::BodyError,
        Ending::ClientAbortsMidBody,
        Ending::ClientLeavesDuringHandler,
        Ending::Head,
        Ending::NoContent,
        Ending::NotModified,
        Ending::SseEndedByClient,
        Ending::Http2Complete,
        Ending::Http2ResetMidBody,
    ];

    /// What the callbacks must see: status and completion.
    fn expected(self) -> (Option<u16>, Completion) {
        match self {
            Ending::Complete | Ending::Head | Ending::Http2Complete => {
                (Some(200), Completion::Complete)
            }
            Ending::HandlerError | Ending::CaughtPanic => (Some(500), Completion::Complete),
            Ending::HandlerPanic => (None, Completion::Failed),
            Ending::BodyError => (Some(200), Completion::BodyError),
            Ending::ClientAbortsMidBody | Ending::SseEndedByClient | Ending::Http2ResetMidBody => {
                (Some(200), Completion::Aborted)
            }
            Ending::ClientLeavesDuringHandler => (None, Completion::Aborted),
            Ending::NoContent => (Some(204), Completion::Complete),
            Ending::NotModified => (Some(304), Completion::Complete),
        }
    }

    async fn provoke(self, address: std::net::SocketAddr, id: u64, journal: &Journal) {
        match self {
            Ending::Complete => http1(address, "GET", "/ok", id).await,
            Ending::HandlerError => http1(address, "GET", "/error", id).await,
            Ending::HandlerPanic => http1(address, "GET", "/panic", id).await,
            Ending::CaughtPanic => http1(address, "GET", "/caught-panic", id).await,
            Ending::BodyError => http1(address, "GET", "/body-error", id).await,
            Ending::ClientAbortsMidBody => {
                drop(raw_then_leave(address, "/endless", id, Some("tick")).await)
            }
            Ending::ClientLeavesDuringHandler => {
                let stream = raw_then_leave(address, "/stuck", id, None).await;
                eventually("the handler to start", || {
                    journal.started.lock().unwrap().contains(&id)
                })
                .await;
                drop(stream);
            }
            Ending::Head => http1(address, "HEAD", "/ok", id).await,
            Ending::NoContent => http1(address, "GET", "/empty", id).await,
            Ending::NotModified => http1(address, "GET", "/not-modified", id).await,
            Ending::SseEndedByClient => {
                drop(raw_then_leave(address, "/sse", id, Some("data: tick")).await)
            }
            Ending::Http2Complete => http2(address, "/ok", id, false).await,
            Ending::Http2ResetMidBody => http2(address, "/endless", id, true).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ending_runs_every_kind_of_callback_exactly_once() {
    let journal = Journal::default();
    let (app, tasks) = app(&journal);
    let address = support::serve(app).await;
    let next_id = AtomicU64::new(1);

    for ending in Ending::ALL {
        let id = next_id.fetch_add(1, Ordering::SeqCst);
        let panicked_before = tasks.stats().panicked();
        within(
            &format!("{ending:?}"),
            ending.provoke(address, id, &journal),
        )
        .await;

        eventually(&format!("every callback of {ending:?}"), || {
            journal.of(id).len() >= KINDS.len()
        })
        .await;
        // Give a duplicate run the chance to show up.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let records = journal.of(id);
        let mut kinds: Vec<_> = records.iter().map(|record| record.kind).collect();
        kinds.sort_unstable();
        let mut expected_kinds = KINDS.to_vec();
        expected_kinds.sort_unstable();
        assert_eq!(kinds, expected_kinds, "{ending:?}: each kind exactly once");

        for record in records.iter().filter(|record| record.kind != "wait_until") {
            assert_eq!(
                record.seen,
                Some(ending.expected()),
                "{ending:?}: {} callback",
                record.kind
            );
        }
        assert_eq!(tasks.stats().panicked(), panicked_before + 1, "{ending:?}");
        eventually("the request's callbacks to end", || tasks.pending() == 0).await;
    }
}
