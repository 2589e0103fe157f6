//! The runtime that serves a layer: where work registered off it runs.
//!
//! Work registered from a plain thread, the blocking pool or a helper's temporary runtime must
//! not run there: a plain thread has no runtime, and a temporary one would take the work with it
//! when it ends. It runs on the runtime that serves the layer instead, remembered once, when the
//! layer first takes a request (work handed out by a request that registered none must find it
//! too). A small task on that runtime notices when it shuts down (the runtime drops it), so that
//! a layer that outlives its runtime (a test suite, a restarted server loop) remembers the next
//! one instead: nothing is checked per request but one atomic load.

use std::future::pending;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::runtime::Handle;

/// The serving runtime of one layer, if it knows a live one.
#[derive(Default)]
pub(crate) struct Serving {
    /// The generation of the remembered runtime while it is alive; 0 for none.
    live: Arc<AtomicU64>,
    remembered: Mutex<Option<(u64, Handle)>>,
}

/// Lives in a task on the remembered runtime; dropped when that runtime shuts down.
struct Alive {
    live: Arc<AtomicU64>,
    generation: u64,
}

impl Drop for Alive {
    fn drop(&mut self) {
        // Only if no later runtime was remembered meanwhile. Relaxed: the generation guards no
        // memory (the handle is read under the lock); a compare-and-swap sees the latest value.
        let _ =
            (self.live).compare_exchange(self.generation, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

impl Serving {
    /// Whether a live serving runtime is known.
    #[inline]
    pub(crate) fn is_known(&self) -> bool {
        // Relaxed: a hint that guards no memory; the handle is read under the lock (`handle`),
        // and `remember` checks again under it.
        self.live.load(Ordering::Relaxed) != 0
    }

    /// Remembers the current runtime, where a request is served, unless a live one is known
    /// already (which costs one atomic load).
    #[inline]
    pub(crate) fn remember_current(&self) {
        if !self.is_known() {
            self.remember_current_slow();
        }
    }

    #[cold]
    fn remember_current_slow(&self) {
        if let Ok(runtime) = Handle::try_current() {
            self.remember(&runtime);
        }
    }

    /// Remembers `runtime`, where a request is served, unless a live one is known already (which
    /// costs one atomic load).
    pub(crate) fn remember(&self, runtime: &Handle) {
        if self.is_known() {
            return;
        }
        let mut remembered = self
            .remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Another request may have remembered one while this one waited for the lock.
        if self.is_known() {
            return;
        }
        let generation = remembered
            .as_ref()
            .map_or(1, |(generation, _)| generation + 1);
        *remembered = Some((generation, runtime.clone()));
        // Relaxed: stored under the lock, which orders it before `handle`'s read; `is_known`
        // reads it as a hint only.
        self.live.store(generation, Ordering::Relaxed);
        let alive = Alive {
            live: self.live.clone(),
            generation,
        };
        runtime.spawn(async move {
            let _alive = alive;
            pending::<()>().await;
        });
    }

    /// The live serving runtime, if one is known.
    pub(crate) fn handle(&self) -> Option<Handle> {
        let remembered = self
            .remembered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Relaxed: read under the lock that `remember` stores it under; the handle comes from the
        // lock too, so this load needs to acquire nothing.
        let live = self.live.load(Ordering::Relaxed);
        match &*remembered {
            Some((generation, handle)) if *generation == live => Some(handle.clone()),
            _ => None,
        }
    }
}
