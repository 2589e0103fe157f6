//! Run work after the response is sent: Next.js's
//! [`after()`](https://nextjs.org/docs/app/api-reference/functions/after) for axum, Tower and hyper.
//!
//! Handlers often have work that must not hold up the response: logging, analytics, audit
//! trails, cache warming, notifications. With `tower-after`, a handler registers that work on
//! its request's [`After`] handle; [`AfterLayer`] runs it once the response has been sent, also
//! when the handler failed or the client went away, with a snapshot of the request's headers and
//! cookies, under a per-route time budget, and lets the server drain it at shutdown.
//!
//! `tokio::spawn` in a handler starts the work too early (before the response is out) and loses
//! it at shutdown; tower-http's `on_eos` runs synchronously inside the server's poll and misses
//! clients that leave. This crate fills the gap.
//!
//! # Quick start
//!
//! ```
//! use std::time::Duration;
//! use axum::{body::Body, http::Request, routing::{get, post}, Router};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_after::{After, AfterLayer, MaxDuration};
//!
//! async fn handler(later: After) -> &'static str {
//!     later.run_with(|ctx| async move {
//!         let session = ctx.request().cookie("session-id").unwrap_or("anonymous");
//!         let status = ctx.outcome().status().map(|status| status.as_u16());
//!         tracing::info!(session, status, "user action");
//!     });
//!     "ok"
//! }
//!
//! async fn report() -> &'static str { "started" }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = AfterLayer::new();
//! let tasks = layer.tasks();
//! let app = Router::new()
//!     .route("/", post(handler))
//!     .route("/report", get(report).layer(MaxDuration::new(Duration::from_secs(120))))
//!     .layer(layer);
//!
//! // Here one request through `oneshot`; a server would use `axum::serve`.
//! let request = Request::post("/").header("cookie", "session-id=alice").body(Body::empty()).unwrap();
//! let response = app.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! // Read to its end, the response is finished: its callback starts now. (Dropped unread, it
//! // would count as a client that left, and the callback would see `Completion::Aborted`.)
//! response.into_body().collect().await.unwrap();
//!
//! // At shutdown, once the server has stopped: let pending callbacks finish.
//! let report = tasks.shutdown(Duration::from_secs(10)).await;
//! assert_eq!(report.completed(), 1);
//! # }
//! ```
//!
//! [`run_with`](After::run_with) takes a closure that receives the request's [`AfterContext`],
//! as Next.js's `after(() => ..)` does; [`run`](After::run) takes a future that needs none. Async
//! closures work as well: `later.run_with(async |ctx| { .. })`.
//!
//! Deep in a handler's call tree, where no handle was passed down, the free function
//! [`after(future)`](after()) is short for `After::current().run(future)`, and
//! [`try_after`] is its non-panicking twin for helpers that also run outside requests:
//!
//! ```
//! async fn record_signup(email: String) {
//!     tower_after::after(async move {
//!         tracing::info!(email, "welcome e-mail queued"); // once the response is out
//!     });
//! }
//! ```
//!
//! Without axum, read [`After`] from the request extensions. This crate supports axum 0.8,
//! Tower 0.5, hyper 1 and Tokio 1.
//!
//! # The mental model
//!
//! - [`AfterLayer`] opens a scope for each request: a [`RequestSnapshot`] of its method, URI,
//!   headers and cookies, and a queue of callbacks.
//! - The handler (or anything in its task) adds to the queue through [`After`]:
//!   [`run`](After::run), [`run_with`](After::run_with), [`run_blocking`](After::run_blocking),
//!   [`wait_until`](After::wait_until), or the free function [`after()`].
//! - The response body is wrapped in an [`AfterBody`] that notices its end: the last frame, an
//!   error, or being dropped because the client left. Then the queue is handed to a Tokio task,
//!   which starts the callbacks in order, runs them concurrently, and gives each an
//!   [`AfterContext`] with the snapshot and the [`Outcome`].
//! - The callbacks share a budget, counted from the end of the response ([`MaxDuration`]);
//!   [`AfterTasks::shutdown`] drains them when the server stops.
//!
//! # When callbacks run
//!
//! | the response…                                          | the callbacks see                          |
//! |--------------------------------------------------------|--------------------------------------------|
//! | was sent to its end                                    | its status, [`Completion::Complete`]       |
//! | has no body (`HEAD`, `204`, `304`) and was handed over  | its status, [`Completion::Complete`]       |
//! | failed mid-body (the body yielded an error)            | its status, [`Completion::BodyError`]      |
//! | was dropped mid-body: the client left                  | its status, [`Completion::Aborted`]        |
//! | never came: the client left while the handler ran     | no status, [`Completion::Aborted`]         |
//! | never came: the inner service failed or panicked       | no status, [`Completion::Failed`]          |
//!
//! In every case the callbacks run exactly once, never before the response is finished, and
//! never inside the server's poll of the response or its `Drop`: they run on a Tokio task of their
//! own, so a slow callback delays neither its response nor the next request on the connection.
//! A panicking callback is caught and logged (`ERROR`, with method and path); the others still run.
//!
//! # Ways to register work
//!
//! Every way takes work that returns `()` or `Result<(), E>` ([`AfterOutput`]: an `Err` is
//! logged at `ERROR` and counted as [`failed`](AfterStats::failed)), and all of it runs under
//! the request's budget, the layer's concurrency limit and its shutdown drain. `try_` always
//! means the same: the fallible form, which hands the work back instead of panicking or dropping
//! it.
//!
//! | call | takes | starts | returns | when the layer refuses it (full, or shut down) |
//! |---|---|---|---|---|
//! | [`After::run`] | a future | once the response ended | nothing | shed: counted in [`AfterStats::shed`], logged |
//! | [`After::run_with`] | a closure given the [`AfterContext`], returning a future | once the response ended | nothing | shed |
//! | [`After::try_run`], [`After::try_run_with`] | as `run`, `run_with` | once the response ended | `Result<(), `[`Overloaded<W>`](Overloaded)`>` | `Err`, with the work handed back |
//! | [`After::run_named`] | a name and a closure | once the response ended; until then, a later one of the same name replaces it | nothing | shed (a replacement is never refused) |
//! | [`After::forget`] | a name | (removes a named one not yet started) | whether it found one | |
//! | [`After::run_blocking`] | a synchronous closure | once the response ended, on the blocking pool | nothing | shed |
//! | [`After::wait_until`] | a future | now | nothing | shed |
//! | [`after()`] | a future | once the response ended | nothing; panics outside a request | shed |
//! | [`try_after()`] | a future | once the response ended | `Result<(), F>`: the work back outside a request | shed |
//! | [`AfterLayer::after_each`] | a closure, called for every response | once the response ended, before the request's own work | | shed |
//!
//! A callback learns about its request through [`AfterContext`]: the [`RequestSnapshot`] (with
//! the [route template](RequestSnapshot::matched_path) under axum), the [`Outcome`], typed data
//! the handler left with [`After::insert`] ([`AfterContext::get`]), its
//! [`deadline`](AfterContext::deadline), and [`stopping`](AfterContext::stopping), which tells it
//! to wrap up before a shutdown or its budget stops it.
//!
//! # Next.js → tower-after
//!
//! | Next.js                                   | tower-after                                                   |
//! |-------------------------------------------|---------------------------------------------------------------|
//! | `after(() => { .. })`                     | [`After::run_with`]`(\|ctx\| async move { .. })`; a future needing no context: [`After::run`], or [`after()`] deep in the call tree |
//! | `waitUntil(promise)`, `after(promise)`    | [`After::wait_until`]: starts now, budgeted and drained       |
//! | `headers()`, `cookies()` inside `after`   | [`AfterContext::request`]: [`RequestSnapshot::headers`], [`RequestSnapshot::cookie`] |
//! | `maxDuration`                             | [`MaxDuration`] on a route, [`AfterLayer::max_duration`] for all |
//! | draining on `SIGTERM`                     | [`AfterTasks::shutdown`] after `with_graceful_shutdown` returns |
//! | `after` in a Server Action                | `leptos_axum::extract::<After>()` in a Leptos server function, with `AfterLayer` added after `leptos_routes` (the README's *Server functions* section and the `server-functions` example say what works there) |
//! | a route handler runs to its end when the client leaves | [`RunToEndLayer`] inside `AfterLayer` (under hyper, a handler is dropped when its client leaves) |
//! | "`after` was called outside a request scope" | [`After::current`] panics naming `AfterLayer`; [`After::try_current`] is `None` |
//!
//! # Where to put the layer
//!
//! Add `AfterLayer` last (outermost) on the router, so that every route, fallback and middleware
//! is inside it. `Router::layer` wraps what came before, so the outermost layer comes last;
//! `ServiceBuilder` lists the outermost first. The recommended stack, both ways:
//!
//! ```
//! use std::time::Duration;
//! use axum::{http::StatusCode, routing::get, Router};
//! use tower::ServiceBuilder;
//! use tower_after::AfterLayer;
//! use tower_http::{catch_panic::CatchPanicLayer, timeout::TimeoutLayer, trace::TraceLayer};
//!
//! let timeout = || TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(10));
//!
//! // `Router::layer`: innermost first.
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hi" }))
//!     .layer(timeout())
//!     .layer(CatchPanicLayer::new())
//!     .layer(AfterLayer::new())
//!     .layer(TraceLayer::new_for_http());
//!
//! // `ServiceBuilder`: outermost first.
//! let app: Router = Router::new().route("/", get(|| async { "hi" })).layer(
//!     ServiceBuilder::new()
//!         .layer(TraceLayer::new_for_http())
//!         .layer(AfterLayer::new())
//!         .layer(CatchPanicLayer::new())
//!         .layer(timeout()),
//! );
//! ```
//!
//! `Router::layer` has a cost: axum boxes the route's future and body once more for every layer
//! added that way. Around the whole router, `AfterLayer` avoids it and costs about what
//! tower-http's `TraceLayer` with an `on_eos` hook costs (see `BENCHMARKS.md`); `axum::serve`
//! then wants the body as axum's `Body`:
//!
//! ```no_run
//! use axum::{extract::Request, routing::get, Router, ServiceExt};
//! use tower::ServiceBuilder;
//! use tower_after::AfterLayer;
//!
//! # #[tokio::main]
//! # async fn main() -> std::io::Result<()> {
//! let router = Router::new().route("/", get(|| async { "hi" }));
//! let app = ServiceBuilder::new()
//!     .map_response(|response: http::Response<_>| response.map(axum::body::Body::new))
//!     .layer(AfterLayer::new())
//!     .service(router);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, ServiceExt::<Request>::into_make_service(app)).await
//! # }
//! ```
//!
//! Relative to tower-http's layers:
//! - `CatchPanicLayer` **inside** `AfterLayer`: callbacks see the `500` it makes. Outside, a
//!   panicking handler is seen as [`Completion::Failed`] with no status.
//! - `TimeoutLayer` **inside**: a timed-out request's callbacks still run and see its status.
//! - `CompressionLayer` inside: [`Outcome::body_bytes`] counts compressed bytes; outside, the
//!   uncompressed ones. Both work.
//! - `TraceLayer` either side. Its request span closes when the response ends, whatever the
//!   callbacks still do: each callback runs in an `after` span of its own (see *Tracing*).
//! - [`MaxDuration`] either side: inside (a route's `.layer()`), it sets the request's budget;
//!   outside, it leaves it in the request for `AfterLayer` to take up. The innermost one wins.
//!
//! # Guarantees, and what they do not cover
//!
//! Every callback registered runs exactly once, or is cancelled by a budget or a shutdown grace
//! period you chose, which the log then reports (one `WARN` for the request, or for the
//! shutdown, with a count; each callback's own line at `DEBUG`, in its span).
//! [`AfterTasks::shutdown`] keeps its grace period even when a callback blocks inside its poll:
//! what has not finished by then is reported as cancelled, and the shutdown returns.
//! Callbacks live in the server's memory: a crash, `kill -9` or a power cut loses those that had
//! not run. Work that must survive that belongs in a durable queue: push it *before* responding
//! (see below), and keep `after` for best-effort work.
//!
//! # Which guarantee do you need?
//!
//! - **Best effort**: [`After::run`], [`After::run_with`]. Analytics, logs, cache warming. The
//!   work costs the response nothing and never fails it; it lives in the server's memory, so a
//!   crash, `kill -9` or a stop that does not drain loses what has not run yet.
//! - **Finished at shutdown**: the same callbacks, with [`AfterTasks::shutdown`] called once
//!   `axum::serve(..).with_graceful_shutdown(..)` returns. A SIGTERM or a rolling deploy then
//!   waits, up to the grace period, for the pending work; a crash still loses it.
//! - **Must not be lost**: a durable queue. Receipts, payments, webhooks: push a job to a queue
//!   in a database *before* responding, and let a worker run it. The response waits for one
//!   committed write and a failed push fails the request, but the job survives a crash and runs
//!   at least once, so make it tolerate a second run. The `durable_jobs` example
//!   (`examples/durable-jobs` in the repository) does this with [apalis](https://docs.rs/apalis)
//!   and SQLite, beside `after` for its analytics, and shows the switch to PostgreSQL or Redis
//!   for several replicas.
//!
//! Callbacks need a Tokio runtime with its time driver enabled (`enable_time` or `enable_all` on
//! the runtime builder; `#[tokio::main]` and `#[tokio::test]` enable it). Without it, a callback
//! that has to wait makes Tokio panic in its driver task (naming `enable_time`; your panic hook
//! sees it, and under `panic = "abort"` the process aborts), and the request's callbacks are
//! cancelled with an error in the log. Callbacks run on the runtime that serves the request: a
//! request's first callback, registered from its own task, is spawned there at once as its own
//! task and waits for the response; others get a task where the response finishes. Work
//! registered later from elsewhere (a plain thread, the blocking pool, a helper's temporary
//! runtime) runs on the runtime that serves the layer, not on the registering one, which might
//! end before the work does. If the serving runtime shuts down first, its callbacks are
//! cancelled with a warning; a response finished on a thread without any runtime has its
//! waiting callbacks dropped, with an error in the log, rather than a panic.
//!
//! # Testing
//!
//! Callbacks start once the response has *ended*, and run in the background. A test reads the
//! response to its end, waits with [`AfterTasks::idle`], then asserts:
//!
//! ```
//! use axum::{body::Body, http::Request, routing::post, Router};
//! use http_body_util::BodyExt;
//! use tower::ServiceExt;
//! use tower_after::{After, AfterLayer};
//!
//! async fn create_order(later: After) -> &'static str {
//!     later.run(async { /* write the audit row */ });
//!     "created"
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let layer = AfterLayer::new();
//! let tasks = layer.tasks(); // before the layer moves into the router
//! let app = Router::new().route("/orders", post(create_order)).layer(layer);
//!
//! let request = Request::post("/orders").body(Body::empty()).unwrap();
//! let response = app.oneshot(request).await.unwrap();
//! let body = response.into_body().collect().await.unwrap().to_bytes(); // the callbacks start
//! assert_eq!(body, "created");
//! tasks.idle().await; // every callback of the layer has ended
//! assert_eq!(tasks.stats().completed(), 1);
//! # }
//! ```
//!
//! Against a real server (`axum::serve` on `127.0.0.1:0`), the same: read the response, then
//! `tasks.idle().await`. Asserting without waiting is a race; a response held unread keeps its
//! callbacks waiting, so `idle()` does not resolve until it is read or dropped; a response dropped
//! unread counts as a client that left, and its callbacks see [`Completion::Aborted`].
//!
//! # Tracing
//!
//! Each callback runs in a span of its own, `after`, with no parent: a callback still running
//! never keeps the request's span open, so the request's span (tower-http's `TraceLayer`, an
//! OpenTelemetry server span) measures the response, not the work after it. The `after` span
//! *follows from* the span that was current where the callback was registered (a link, in
//! OpenTelemetry's terms) and records the request's `method`, `path` and `request_id` (its
//! `x-request-id` header, if it has one), the callback's `name` for [`After::run_named`], and
//! the `site`, the line of code that registered it, so its lines can be traced back to the
//! request. It is an `INFO` span, created only if a subscriber is interested in it.
//!
//! The crate logs under the target `tower_after`, one line per event, not per callback: a `WARN`
//! for each request whose budget cancelled callbacks and for each shutdown or Lambda invocation
//! that did (with counts), and, at most once a second with a count, for refused work and
//! truncated snapshots; an `ERROR` for each callback that panicked, inside its span and naming
//! the request. Each cancelled callback's own line is at `DEBUG`, inside its span. At `INFO` it
//! logs one line per shutdown: a drain that ended within its grace says what it drained (one that
//! ran out says so at `WARN`). A filter such as `RUST_LOG=myapp=info`
//! hides both those lines and the `after` spans: add `tower_after=info`, which keeps the spans
//! (so your callbacks' own lines say which request they belong to) and adds no line per request.
//!
//! To tell two requests to the same path apart in callback logs, give requests an id and put
//! tower-http's `SetRequestIdLayer` *outside* `AfterLayer`, so that the id is in the snapshot:
//! the `after` span and the crate's own lines then name it (`request_id`), and a callback reads
//! it with `ctx.request().header("x-request-id")`.
//!
//! # Feature flags
//!
//! - `axum` (default): `After` is an axum extractor (`After` and `Option<After>`). Without it
//!   the crate depends only on Tower, `http` and Tokio; read `After` from the request
//!   extensions.
//! - `metrics`: publishes the counters of [`AfterTasks::stats`] through the
//!   [`metrics`](https://docs.rs/metrics) facade, under the names listed at [`AfterStats`].
//! - `lambda`: the module `lambda`, for AWS Lambda with `lambda_runtime` (see *Serverless: AWS
//!   Lambda*). On docs.rs, items that need a feature say which.
//!
//! # Serverless: AWS Lambda
//!
//! A long-running server keeps its process alive between requests, so callbacks simply run on.
//! Lambda instead *freezes* the execution environment as soon as the runtime asks for the next
//! event, which `lambda_runtime` does right after it posted a response: callbacks still pending
//! would be frozen mid-flight, resumed during some later invocation, or lost with the
//! environment. Vercel's `waitUntil` exists for this, and the `lambda` feature brings it:
//! `lambda::DrainLayer` goes on `lambda_runtime::Runtime::layer`, which wraps each invocation up
//! to and including the post of its response.
//!
//! The feature is off by default, and `lambda_http` and `lambda_runtime` are your own
//! dependencies, as they are for any Rust function on Lambda:
//!
//! ```toml
//! [dependencies]
//! tower-after = { version = "0.1", features = ["lambda"] }
//! lambda_http = "1"
//! lambda_runtime = "1"
//! ```
//!
//! ```rust,ignore
//! let layer = AfterLayer::new();
//! let app = Router::new().route("/", post(handler)).layer(layer.clone());
//! tower_after::lambda::graceful_shutdown(layer.tasks(), Duration::from_millis(300)).await;
//! lambda_runtime::Runtime::new(lambda_http::Adapter::from(app))
//!     .layer(tower_after::lambda::DrainLayer::new(layer.tasks()))
//!     .run()
//!     .await
//! ```
//!
//! Locally, `cargo lambda watch` runs the function the way Lambda does, one event at a time
//! unless told otherwise: with its default `--concurrency 1`, each request waits until the
//! previous invocation's callbacks have ended, which is what Lambda does too. The emulator sends a
//! deadline in 1970, which `DrainLayer` recognizes as no real deadline (it says so once): each
//! request's budget then bounds the wait.
//!
//! With `DrainLayer`, for each invocation:
//! - The callbacks of its request start only once its response has been posted to the Runtime
//!   API. (`lambda_http` reads the whole response body before it posts it; without the layer,
//!   the callbacks would start first.)
//! - The runtime asks for the next event only once those callbacks, and the work they register
//!   for the same request, have ended: Lambda freezes nothing half-way, and no work of one
//!   invocation runs during the next.
//! - The wait is bounded by each request's budget ([`MaxDuration`], [`AfterLayer::max_duration`])
//!   and in any case by the invocation's deadline (the function's timeout, which Lambda sends
//!   with each event), less a margin of 100 ms: what still runs then is cancelled, with one
//!   `WARN` for the invocation, and counted as timed out. An invocation that
//!   outlived its timeout would make Lambda reset the execution environment.
//! - An invocation whose request registered nothing goes on as soon as its response is posted:
//!   no wait, no timer.
//! - With concurrent invocations (`lambda_http`'s `concurrency-tokio` feature with
//!   `run_concurrent`, for Lambda Managed Instances), each worker waits for the work of its own
//!   invocation only; the others go on taking events. A worker that waits takes no event.
//!
//! What it does not guarantee:
//! - The wait is part of the invocation: it is billed, and it counts against the function's
//!   timeout. Choose a timeout that covers the response *and* the work after it, and budgets that
//!   fit in it.
//! - Only work registered on a request that entered [`AfterLayer`] inside the invocation's task is
//!   held and waited for. A layer that moves requests to another task (`tower::buffer`) loses the
//!   hold; work registered late, from a task the handler spawned after the invocation ended,
//!   runs unwatched and may be frozen with the environment (if the invocation's deadline cut
//!   its work, late work is stopped at once instead, counted as timed out and logged at `DEBUG`:
//!   the invocation's `WARN` already said it was cut).
//! - A callback that blocks its thread instead of awaiting cannot be stopped: the invocation
//!   still ends at its deadline, and the callback runs on, into the next invocation or a freeze.
//! - Tested with `lambda_http::Adapter` (buffered responses), sequential and concurrent, against
//!   a Runtime API on the loopback; not against Lambda itself, and not with response streaming.
//! - At shutdown, Lambda sends SIGTERM only to a runtime with an extension registered, then leaves
//!   it about 500 ms (300 ms when external extensions are installed) before SIGKILL.
//!   `lambda::graceful_shutdown(tasks, grace)` registers such an extension and runs
//!   [`AfterTasks::shutdown`] on SIGTERM; keep `grace` near 300 ms. Since every invocation
//!   drained its own work, there is usually nothing left by then. It drains the layer whose
//!   `tasks` it is given, and registers the one extension a function may have for this: to drain
//!   several layers (a route with an `AfterLayer` of its own), call
//!   `lambda_runtime::spawn_graceful_shutdown_handler` yourself and shut each layer down in it.
//! - As on a server, a crash, an out-of-memory kill or a lost environment loses callbacks that
//!   had not run: work that must happen belongs in a durable queue (SQS, a table) written before
//!   the response.
//!
//! The example `examples/lambda-function`, a package of its own, is a function ready to run
//! under `cargo lambda watch` and to deploy with `cargo lambda deploy`; the README's section on
//! AWS Lambda gives the commands, and what to look for in the emulator's output.
//!
//! ## Cloudflare Workers, and other platforms without Tokio
//!
//! Not supported: callbacks run on Tokio. `ARCHITECTURE.md` in the repository says what support
//! for a platform such as Cloudflare Workers (`Context::wait_until`) would take.

#![cfg_attr(docsrs, feature(doc_cfg))]

/// The README's Rust examples, compiled and run as doctests so that they stay correct.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod handle;
#[cfg(feature = "lambda")]
#[cfg_attr(docsrs, doc(cfg(feature = "lambda")))]
pub mod lambda;
mod middleware;
mod record;
mod request;
mod tasks;
#[cfg(test)]
mod test_util;
mod unwind;

#[cfg(feature = "axum")]
pub use handle::extract::MissingAfterLayer;
pub use handle::{after, try_after, After, AfterWork};
pub use middleware::body::AfterBody;
pub use middleware::future::ResponseFuture;
pub use middleware::layer::AfterLayer;
pub use middleware::max_duration::{MaxDuration, MaxDurationService};
pub use middleware::run_to_end::{RunToEnd, RunToEndFuture, RunToEndLayer};
pub use middleware::service::AfterService;
pub use record::outcome::{Completion, Outcome};
pub use record::snapshot::RequestSnapshot;
pub use record::snapshot_config::SnapshotConfig;
pub use request::callback::AfterOutput;
pub use request::context::AfterContext;
pub use tasks::refusal::Overloaded;
pub use tasks::stats::AfterStats;
pub use tasks::{AfterTasks, ShutdownReport};
