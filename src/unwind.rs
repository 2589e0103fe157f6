//! Keeping user code's panics from unwinding through the crate.
//!
//! User code runs everywhere the crate calls out: a callback, a value's `Drop`, an error's
//! `Display`, a metrics recorder. Where a panic must not escape (a `Drop`, a driver, a response's
//! `poll`), it is caught: here for a value dropped, in `request/callback.rs` for a callback, and in
//! `tasks/ledger.rs` for the metrics recorder.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Drops `value` without unwinding: runs where a panic must not escape (a `Drop`, a driver, a
/// response's `poll`). A panic in its `Drop` is caught, and so is one in the `Drop` of that
/// panic's payload; what the second one threw is leaked.
pub(crate) fn drop_caught<T>(value: T) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(value))) {
        if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
            #[allow(clippy::mem_forget)]
            std::mem::forget(again);
        }
    }
}
