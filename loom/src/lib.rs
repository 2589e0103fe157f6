//! The request state machine of `tower-after`, compiled on its own for its loom models.

#![allow(dead_code, unreachable_pub)]

#[path = "../../src/scope.rs"]
mod scope;

#[cfg(all(test, loom))]
mod models;
