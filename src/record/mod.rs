//! What the layer records of a request for its callbacks: the [`RequestSnapshot`] taken when the
//! request entered the layer, the [`Outcome`] of its response, and the values its handler left
//! ([`After::insert`](crate::After::insert)). Plain data: it knows nothing of drivers or Tokio.
//!
//! [`RequestSnapshot`]: snapshot::RequestSnapshot
//! [`Outcome`]: outcome::Outcome

pub(crate) mod data;
pub(crate) mod outcome;
pub(crate) mod snapshot;
pub(crate) mod snapshot_config;
