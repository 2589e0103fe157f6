//! The layer's watch over drivers whose callbacks are still pending: it tells them when their
//! request's budget ran out, or when a shutdown's grace did.
//!
//! Why one watch per layer rather than a timer and a shutdown waiter in every driver: most
//! callbacks end on their first poll and need neither, but under load the ones that wait (a
//! network call, a sleep) are many at once, and a Tokio `Sleep` plus a cancellation waiter cost
//! each of them about 190 bytes and four lock round trips. Here a waiting driver holds a
//! *ticket*: a slot with its waker and deadline, and an entry in one ordered set of deadlines.
//! One watcher task per layer sleeps until the earliest deadline, marks what expired and wakes
//! it; it exits when nothing is left to time, and the next deadline spawns it again. A shutdown
//! wakes every ticket holder. Drivers read their fate under the same lock that wakes them, so
//! no wake-up is lost between the two.

use std::collections::BTreeSet;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

/// Why a driver must stop its callbacks before their end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The request's budget ran out.
    Budget,
    /// A shutdown's grace period ran out.
    Shutdown,
}

/// A waiting driver's place in the watch, until it leaves.
#[derive(Debug)]
pub(crate) struct Ticket(u32);

#[derive(Default)]
pub(crate) struct Watch {
    state: Mutex<State>,
    /// Set once, when a shutdown's grace ran out; also read without the lock.
    shut_down: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Indexed by ticket; vacant slots are listed in `free`.
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    /// Deadlines not yet reached, with their ticket.
    deadlines: BTreeSet<(Instant, u32)>,
    watcher: Watcher,
}

#[derive(Default)]
struct Slot {
    waker: Option<Waker>,
    deadline: Option<Instant>,
    expired: bool,
}

#[derive(Default)]
enum Watcher {
    /// None runs: the next deadline spawns one.
    #[default]
    Absent,
    /// One runs; wake it when an earlier deadline arrives.
    Running(Option<Waker>),
    /// The runtime has no time driver: budgets cannot be enforced.
    Unavailable,
}

impl Watch {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.shut_down.load(Ordering::Acquire)
    }

    /// For a driver whose callbacks are pending: takes or refreshes its ticket with its waker
    /// and its deadline (once known), or says why it must stop instead of waiting.
    pub(crate) fn wait(
        self: &Arc<Self>,
        ticket: &mut Option<Ticket>,
        waker: &Waker,
        deadline: Option<Instant>,
    ) -> Option<Stop> {
        let mut state = self.state();
        if self.is_shut_down() {
            return Some(Stop::Shutdown);
        }
        let index = match ticket {
            Some(Ticket(index)) => *index,
            None => {
                let index = state.take_slot();
                *ticket = Some(Ticket(index));
                index
            }
        };
        let slot = &mut state.slots[index as usize];
        if slot.expired {
            return Some(Stop::Budget);
        }
        if !slot.waker.as_ref().is_some_and(|old| old.will_wake(waker)) {
            slot.waker = Some(waker.clone());
        }
        if let Some(deadline) = deadline.filter(|_| slot.deadline.is_none()) {
            slot.deadline = Some(deadline);
            self.time(state, deadline, index);
        }
        None
    }

    /// Puts a ticket's deadline before the watcher: spawns one if none runs, wakes it if this
    /// deadline is now the earliest.
    fn time(self: &Arc<Self>, mut state: MutexGuard<'_, State>, deadline: Instant, index: u32) {
        state.deadlines.insert((deadline, index));
        let earliest = state.deadlines.first() == Some(&(deadline, index));
        match &mut state.watcher {
            Watcher::Absent => {
                // Drivers run on a runtime, so there is one; without it, nothing can be timed.
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                state.watcher = Watcher::Running(None);
                drop(state);
                runtime.spawn(Watching {
                    watch: self.clone(),
                    sleep: None,
                    exited: false,
                });
            }
            Watcher::Running(watcher) if earliest => {
                let watcher = watcher.take();
                drop(state);
                if let Some(watcher) = watcher {
                    watcher.wake();
                }
            }
            Watcher::Running(_) | Watcher::Unavailable => {}
        }
    }

    /// Gives a ticket back: its driver no longer waits.
    pub(crate) fn leave(&self, Ticket(index): Ticket) {
        let mut state = self.state();
        let slot = std::mem::take(&mut state.slots[index as usize]);
        if let (Some(deadline), false) = (slot.deadline, slot.expired) {
            state.deadlines.remove(&(deadline, index));
        }
        state.free.push(index);
        state.live -= 1;
        if state.live == 0 {
            // Nothing waits: give back what a burst grew, keep what steady use needs.
            state.free.clear();
            state.slots.clear();
            state.slots.shrink_to(64);
            state.free.shrink_to(64);
        }
        drop(state);
        drop(slot);
    }

    /// Marks the shutdown and wakes every waiting driver, which then stops.
    pub(crate) fn shut_down(&self) {
        self.shut_down.store(true, Ordering::Release);
        let wakers: Vec<Waker> = self
            .state()
            .slots
            .iter_mut()
            .filter_map(|slot| slot.waker.take())
            .collect();
        wakers.into_iter().for_each(Waker::wake);
    }
}

impl State {
    fn take_slot(&mut self) -> u32 {
        self.live += 1;
        match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot::default());
                // A process cannot hold 2^32 waiting drivers: each is a task of 256 bytes.
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        }
    }
}

/// The watcher task: sleeps until the earliest deadline, then marks and wakes what expired.
struct Watching {
    watch: Arc<Watch>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// It left `Watcher::Absent` behind itself: its drop must not touch a successor.
    exited: bool,
}

impl Future for Watching {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            let mut state = this.watch.state();
            let now = Instant::now();
            let mut expired = Vec::new();
            while let Some(&(deadline, index)) = state.deadlines.first() {
                if deadline > now {
                    break;
                }
                state.deadlines.pop_first();
                let slot = &mut state.slots[index as usize];
                slot.expired = true;
                expired.extend(slot.waker.take());
            }
            let next = state.deadlines.first().map(|&(deadline, _)| deadline);
            match next {
                None => {
                    state.watcher = Watcher::Absent;
                    this.exited = true;
                }
                Some(_) => match &mut state.watcher {
                    Watcher::Running(Some(waker)) if waker.will_wake(cx.waker()) => {}
                    watcher => *watcher = Watcher::Running(Some(cx.waker().clone())),
                },
            }
            drop(state);
            expired.into_iter().for_each(Waker::wake);
            let Some(next) = next else {
                return Poll::Ready(());
            };
            let sleep = match &mut this.sleep {
                Some(sleep) => {
                    if sleep.deadline() != next {
                        sleep.as_mut().reset(next);
                    }
                    sleep
                }
                None => {
                    // Tokio panics when the runtime was built without its time driver: rather
                    // than lose the callbacks, let them run without a budget and say so.
                    match catch_unwind(AssertUnwindSafe(|| {
                        Box::pin(tokio::time::sleep_until(next))
                    })) {
                        Ok(sleep) => this.sleep.insert(sleep),
                        Err(_) => {
                            this.watch.state().watcher = Watcher::Unavailable;
                            this.exited = true;
                            tracing::error!(
                                "after callbacks run without their max duration: the Tokio \
                                 runtime has no time driver (build it with `enable_time()` or \
                                 `enable_all()`)"
                            );
                            return Poll::Ready(());
                        }
                    }
                }
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        // Dropped unfinished (its runtime shut down): let the next deadline spawn a new one.
        if !self.exited {
            let mut state = self.watch.state();
            if matches!(state.watcher, Watcher::Running(_)) {
                state.watcher = Watcher::Absent;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use http::{Request, Response};
    use http_body_util::{BodyExt, Empty};
    use tokio::time::Instant;
    use tower::{service_fn, Layer, ServiceExt};

    use crate::test_util::settle;
    use crate::{After, AfterLayer, MaxDuration};

    /// Serves one request whose route has `budget` and whose one callback sleeps for `sleep`;
    /// counts the callbacks that ran to their end in `ended`.
    async fn request(
        layer: &AfterLayer,
        budget: Duration,
        sleep: Duration,
        ended: &Arc<AtomicUsize>,
    ) {
        let ended = ended.clone();
        let handler = service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            let ended = ended.clone();
            after.run(async move {
                tokio::time::sleep(sleep).await;
                ended.fetch_add(1, Ordering::SeqCst);
            });
            async { Ok::<_, Infallible>(Response::new(Empty::<bytes::Bytes>::new())) }
        });
        let service = layer.layer(MaxDuration::new(budget).layer(handler));
        let response = service.oneshot(Request::new(())).await.unwrap();
        response.into_body().collect().await.unwrap();
    }

    fn slots(layer: &AfterLayer) -> usize {
        layer.tasks().shared().watch.state().live
    }

    #[tokio::test(start_paused = true)]
    async fn each_budget_runs_out_at_its_own_deadline_whatever_the_order() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let ended = Arc::new(AtomicUsize::new(0));
        // Budgets of 10 s down to 1 s: each new deadline is earlier than the ones before, so
        // the watcher must wake up and sleep less. Every callback would need 100 s.
        for seconds in (1..=10).rev() {
            let budget = Duration::from_secs(seconds);
            request(&layer, budget, Duration::from_secs(100), &ended).await;
            // Let the watcher go to sleep until the earliest deadline so far.
            settle().await;
        }
        assert_eq!(slots(&layer), 10);
        // The responses all ended at the start (time is paused and only moves when idle).
        let start = Instant::now();
        for seconds in 1..=10 {
            let deadline = start + Duration::from_secs(seconds);
            tokio::time::sleep_until(deadline - Duration::from_millis(1)).await;
            settle().await;
            assert_eq!(tasks.stats().timed_out(), seconds - 1, "before {seconds} s");
            tokio::time::sleep_until(deadline + Duration::from_millis(1)).await;
            settle().await;
            assert_eq!(tasks.stats().timed_out(), seconds, "after {seconds} s");
        }
        assert_eq!((tasks.pending(), ended.load(Ordering::SeqCst)), (0, 0));
        assert_eq!(slots(&layer), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn callbacks_that_end_in_time_leave_and_the_watcher_comes_back_when_needed() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let ended = Arc::new(AtomicUsize::new(0));
        let (budget, short) = (Duration::from_secs(5), Duration::from_secs(1));
        request(&layer, budget, short, &ended).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(
            (ended.load(Ordering::SeqCst), tasks.stats().timed_out()),
            (1, 0)
        );
        assert_eq!(slots(&layer), 0);
        // Nothing was left to time, so the watcher exited; a new deadline brings it back.
        request(&layer, budget, Duration::from_secs(100), &ended).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        settle().await;
        assert_eq!(
            (ended.load(Ordering::SeqCst), tasks.stats().timed_out()),
            (1, 1)
        );
        assert_eq!(tasks.pending(), 0);
    }

    #[test]
    fn a_layer_keeps_its_budgets_when_its_first_runtime_is_gone() {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let ended = Arc::new(AtomicUsize::new(0));
        let paused = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap()
        };
        // The first runtime ends while its watcher sleeps; its callback is dropped with it.
        paused().block_on(async {
            request(
                &layer,
                Duration::from_secs(5),
                Duration::from_secs(100),
                &ended,
            )
            .await;
            settle().await;
        });
        assert_eq!(tasks.stats().cancelled(), 1);
        paused().block_on(async {
            request(
                &layer,
                Duration::from_secs(5),
                Duration::from_secs(100),
                &ended,
            )
            .await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            settle().await;
        });
        assert_eq!(tasks.stats().timed_out(), 1);
        assert_eq!(tasks.pending(), 0);
    }
}
