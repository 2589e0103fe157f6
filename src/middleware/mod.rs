pub(crate) mod body;
pub(crate) mod future;
pub(crate) mod layer;
pub(crate) mod max_duration;
pub(crate) mod run_to_end;
pub(crate) mod service;
