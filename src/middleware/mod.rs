//! The Tower face of the crate: what wraps a service and its responses.
//!
//! [`AfterLayer`](layer::AfterLayer) makes an [`AfterService`](service::AfterService), which
//! opens a request's scope and returns a [`ResponseFuture`](future::ResponseFuture); the future
//! wraps the response's body in an [`AfterBody`](body::AfterBody), whose `Finisher` notices the
//! end of the response exactly once and hands the request's work over. Beside them,
//! [`MaxDuration`](max_duration::MaxDuration) sets one route's budget, and
//! [`RunToEndLayer`](run_to_end::RunToEndLayer) keeps a handler running when its client leaves.

pub(crate) mod body;
pub(crate) mod future;
pub(crate) mod layer;
pub(crate) mod max_duration;
pub(crate) mod run_to_end;
pub(crate) mod service;
