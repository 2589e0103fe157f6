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
pub use tasks::{AfterTasks, ShutdownReport};
