//! What a layer decides for each of its requests: set once by `AfterLayer`'s builder methods,
//! shared by every request through one `Arc`.

use std::future::Future;
use std::panic::Location;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::record::snapshot_config::SnapshotConfig;
use crate::request::callback::RunResult;
use crate::request::context::AfterContext;
use crate::tasks::ledger::Ledger;

/// What a layer decides for each of its requests, and the state they share: one reference per
/// request reaches it all.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) max_duration: Duration,
    pub(crate) limit: Option<Arc<Semaphore>>,
    /// Work for after every response, and where it was set: `AfterLayer::after_each`.
    pub(crate) after_each: Option<(AfterEach, &'static Location<'static>)>,
    /// How many callbacks the layer holds at most: `AfterLayer::max_pending`.
    pub(crate) max_pending: usize,
    /// What a snapshot keeps: `AfterLayer::snapshot`.
    pub(crate) snapshot: SnapshotConfig,
    /// How many bytes of snapshots pending work holds at most: `AfterLayer::max_held_bytes`.
    pub(crate) max_held_bytes: usize,
}

/// The hook of `AfterLayer::after_each`, type-erased so that the layer's type stays the same.
pub(crate) type AfterEach =
    Arc<dyn Fn(AfterContext) -> Pin<Box<dyn Future<Output = RunResult> + Send>> + Send + Sync>;
