//! Run work after the response is sent: Next.js's [`after()`] for axum, Tower and hyper.
//!
//! Handlers often have work that must not hold up the response: logging, analytics, audit
//! trails, cache warming, notifications. With `tower-after`, a handler registers that work on
//! its request's [`After`] handle; [`AfterLayer`] runs it once the response has been sent, also
//! when the handler failed or the client went away, and lets the server drain it at shutdown.
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::{get, post}, Router};
//! use tower_after::{After, AfterLayer, MaxDuration};
//!
//! async fn handler(after: After) -> &'static str {
//!     after.run_with(|ctx| async move {
//!         let session = ctx.request().cookie("session-id").unwrap_or("anonymous");
//!         tracing::info!(session, status = ?ctx.outcome().status(), "user action");
//!     });
//!     "ok"
//! }
//!
//! async fn report() -> &'static str { "started" }
//!
//! let app: Router = Router::new()
//!     .route("/", post(handler))
//!     .route("/report", get(report).layer(MaxDuration::new(Duration::from_secs(120))))
//!     .layer(AfterLayer::new());
//! ```
//!
//! # The mental model
//!
//! - [`AfterLayer`] opens a scope for each request: a [`RequestSnapshot`] of its method, URI,
//!   headers and cookies, and a queue of callbacks.
//! - The handler (or anything in its task) adds to the queue through [`After`]:
//!   [`run`](After::run), [`run_with`](After::run_with), [`wait_until`](After::wait_until), or
//!   the free function [`after()`].
//! - The response body is wrapped in an [`AfterBody`] that notices its end: the last frame, an
//!   error, or being dropped because the client left. Then the queue is handed to a Tokio task,
//!   which starts the callbacks in order, runs them concurrently, and gives each an
//!   [`AfterContext`] with the snapshot and the [`Outcome`].
//! - The callbacks share a budget, counted from the end of the response ([`MaxDuration`]);
//!   [`AfterTasks::shutdown`] drains them when the server stops.
//!
//! # Feature flags
//!
//! - `axum` (default): `After` is an axum extractor (`After` and `Option<After>`). Without it
//!   the crate depends only on Tower, `http` and Tokio; read `After` from the request
//!   extensions.
//! - `metrics`: publishes the counters of [`AfterTasks::stats`] through the
//!   [`metrics`](https://docs.rs/metrics) facade, under the names listed at [`AfterStats`].
//!
//! # Serverless: AWS Lambda and other freezing platforms
//!
//! A long-running server keeps its process alive between requests, so callbacks simply run on.
//! Lambda instead *freezes* the execution environment as soon as an invocation is over, and an
//! invocation is over when the runtime and every extension have asked for the next event. The
//! Rust runtime (`lambda_http`) asks right after it posted the response: callbacks still
//! pending would be frozen mid-flight, resumed at some later invocation, or lost with the
//! environment. This is what Vercel's `waitUntil` exists for.
//!
//! The adapter therefore registers an *internal extension* in the same process, whose handler
//! for each `INVOKE` event returns only once [`AfterTasks::idle`] resolves: Lambda keeps the
//! environment running until then, while the client already has its response. For `idle()` not
//! to resolve before the invocation's request has even entered the layer, a middleware inside
//! `AfterLayer` counts the requests it sees and registers a no-op callback for each (pending from
//! the start of the request until its response is finished); the extension first waits for its
//! invocation's request to have been counted. On paper (with `lambda_http` and
//! `lambda-extension`, which this crate does not depend on):
//!
//! ```rust,ignore
//! let layer = AfterLayer::new().max_duration(Duration::from_secs(10)); // below the function timeout
//! let tasks = layer.tasks();
//! let (entered, mut seen) = tokio::sync::watch::channel(0_u64);
//! let app = Router::new()
//!     .route("/", post(handler))
//!     .layer(middleware::from_fn(move |after: After, request: Request, next: Next| {
//!         after.run(async {}); // holds `idle()` until this response is finished
//!         entered.send_modify(|count| *count += 1);
//!         next.run(request)
//!     }))
//!     .layer(layer);
//!
//! let mut invocations = 0_u64;
//! let extension = lambda_extension::Extension::new()
//!     .with_events(&["INVOKE"])
//!     .with_events_processor(service_fn(move |_event: LambdaEvent| {
//!         invocations += 1;
//!         let (tasks, mut seen, invocation) = (tasks.clone(), seen.clone(), invocations);
//!         async move {
//!             seen.wait_for(|count| *count >= invocation).await?;
//!             tasks.idle().await;
//!             Ok::<(), Error>(())
//!         }
//!     }))
//!     .register()
//!     .await?;
//! tokio::try_join!(lambda_http::run(app), extension.run())?;
//! ```
//!
//! The budget must stay below the function's timeout, which Lambda enforces on the whole
//! invocation, callbacks included.
//!
//! [`after()`]: https://nextjs.org/docs/app/api-reference/functions/after

mod after;
mod body;
mod context;
mod layer;
mod scope;
mod service;
mod snapshot;
mod tasks;
#[cfg(test)]
mod test_util;

#[cfg(feature = "axum")]
pub use after::MissingAfterLayer;
pub use after::{after, After};
pub use body::AfterBody;
pub use context::{AfterContext, Completion, Outcome};
pub use layer::{AfterLayer, MaxDuration, MaxDurationService};
pub use service::{AfterService, ResponseFuture};
pub use snapshot::RequestSnapshot;
pub use tasks::{AfterStats, AfterTasks, ShutdownReport};
