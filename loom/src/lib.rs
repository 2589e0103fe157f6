//! The request state machine and the pending count of `tower-after`, compiled on their own for
//! their loom models.

#![allow(dead_code, unreachable_pub)]

#[path = "../../src/request/scope.rs"]
mod scope;

#[path = "../../src/tasks/pending.rs"]
mod pending;

#[cfg(all(test, loom))]
mod models;

#[cfg(all(test, loom))]
mod pending_models;
