pub(crate) mod callback;
pub(crate) mod driver;
pub(crate) mod host;
pub(crate) mod scope;
