//! Every interleaving of the parties that race on a layer's pending count: callbacks ending on
//! their own threads, a shutdown closing the layer and writing off what is pending, new work
//! registering, and a drain or `idle()` reading the count.
//!
//! Each model checks the promises `idle()` and `shutdown()` build on it:
//! - whoever sees nothing pending sees every ending counted;
//! - every callback is counted exactly once: by its own ending, or written off by the shutdown;
//! - a closed layer takes no more work.

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;

use crate::pending::{Full, Pending};

/// Runs `f` over every interleaving with at most three preemptions: the waits below spin, and
/// without a bound their interleavings take minutes for no more coverage of these races.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

/// A layer with `n` callbacks registered, and the total their endings count into.
fn layer(n: usize) -> (Arc<Pending>, Arc<AtomicU64>) {
    let pending = Arc::new(Pending::default());
    for _ in 0..n {
        pending.register(usize::MAX).unwrap();
    }
    (pending, Arc::new(AtomicU64::new(0)))
}

/// Ends one callback on a thread of its own, counting its ending into `counted`.
fn end_on_a_thread(pending: &Arc<Pending>, counted: &Arc<AtomicU64>) -> thread::JoinHandle<()> {
    let (pending, counted) = (pending.clone(), counted.clone());
    thread::spawn(move || {
        let _ = pending.end(|| {
            counted.fetch_add(1, Ordering::Relaxed);
        });
    })
}

/// Waits, as `idle()` does, until nothing is pending.
fn wait_for_nothing_pending(pending: &Pending) {
    while pending.get() > 0 {
        thread::yield_now();
    }
}

#[test]
fn whoever_sees_nothing_pending_sees_every_ending_counted() {
    model(|| {
        let (pending, counted) = layer(2);
        let ends = [
            end_on_a_thread(&pending, &counted),
            end_on_a_thread(&pending, &counted),
        ];
        wait_for_nothing_pending(&pending);
        assert_eq!(counted.load(Ordering::Relaxed), 2);
        for end in ends {
            end.join().unwrap();
        }
    });
}

#[test]
fn a_write_off_racing_endings_counts_each_callback_once() {
    model(|| {
        let (pending, counted) = layer(2);
        let ends = [
            end_on_a_thread(&pending, &counted),
            end_on_a_thread(&pending, &counted),
        ];
        let written_off = pending.close();
        // What the drain reads once those counting their ending as it closed are done.
        wait_for_nothing_pending(&pending);
        assert_eq!(counted.load(Ordering::Relaxed) + written_off, 2);
        for end in ends {
            end.join().unwrap();
        }
        // Those written off that end later count nothing.
        assert_eq!(counted.load(Ordering::Relaxed) + written_off, 2);
        assert_eq!(pending.get(), 0);
        assert_eq!(pending.close(), 0, "a second close writes off nothing");
    });
}

#[test]
fn a_closed_layer_takes_no_more_work() {
    model(|| {
        let (pending, counted) = layer(1);
        let registered = Arc::new(AtomicU64::new(0));
        let late = {
            let (pending, counted, registered) =
                (pending.clone(), counted.clone(), registered.clone());
            thread::spawn(move || match pending.register(usize::MAX) {
                Ok(()) => {
                    registered.fetch_add(1, Ordering::Relaxed);
                    let _ = pending.end(|| {
                        counted.fetch_add(1, Ordering::Relaxed);
                    });
                }
                Err(refused) => assert_eq!(refused, Full::Closed),
            })
        };
        let written_off = pending.close();
        late.join().unwrap();
        // The first callback, and the late one if it came in before the close.
        let total = 1 + registered.load(Ordering::Relaxed);
        assert_eq!(counted.load(Ordering::Relaxed) + written_off, total);
        assert_eq!(pending.register(usize::MAX), Err(Full::Closed));
    });
}

#[test]
fn the_bound_holds_under_racing_registrations() {
    model(|| {
        let pending = Arc::new(Pending::default());
        let registrations: Vec<_> = (0..2)
            .map(|_| {
                let pending = pending.clone();
                thread::spawn(move || pending.register(1).is_ok())
            })
            .collect();
        let taken = registrations
            .into_iter()
            .map(|registration| registration.join().unwrap())
            .filter(|&taken| taken)
            .count();
        assert_eq!(taken, 1);
        assert_eq!(pending.get(), 1);
    });
}
