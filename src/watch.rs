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
//!
//! The watcher runs on one runtime, and a runtime that is not driven (or has no time driver)
//! cannot time anything else's deadlines. So only the drivers of the watcher's own runtime rely
//! on it; a layer that also serves from other runtimes times those drivers' deadlines with a
//! `Sleep` of their own, as a fallback that costs what the shared watch saves.

use std::collections::BTreeSet;
use std::future::Future;
use std::panic::catch_unwind;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::runtime::{Handle, Id as RuntimeId};
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
    /// The deadline of a driver on another runtime than the watcher's, timed by the driver.
    sleep: Option<Pin<Box<Sleep>>>,
    expired: bool,
}

#[derive(Default)]
enum Watcher {
    /// None runs: the next deadline spawns one.
    #[default]
    Absent,
    /// One runs on `runtime`; wake it when an earlier deadline arrives.
    Running {
        runtime: RuntimeId,
        waker: Option<Waker>,
    },
    /// `runtime` has no time driver: the budgets of its requests cannot be enforced.
    Unavailable { runtime: RuntimeId },
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
        deadline: Option<Instant>,
        cx: &mut Context<'_>,
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
        remember(&mut slot.waker, cx.waker());
        if let Some(sleep) = &mut slot.sleep {
            // Polled under the lock: a timer never calls back into the watch.
            if sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
            slot.expired = true;
            return Some(Stop::Budget);
        }
        match deadline.filter(|_| slot.deadline.is_none()) {
            Some(deadline) => {
                slot.deadline = Some(deadline);
                self.time(state, deadline, index, cx)
            }
            None => None,
        }
    }

    /// Times a ticket's new deadline: by the watcher if it runs on this driver's runtime (spawned
    /// if none runs; woken if this deadline is now the earliest), else by a `Sleep` of its own.
    fn time(
        self: &Arc<Self>,
        mut state: MutexGuard<'_, State>,
        deadline: Instant,
        index: u32,
        cx: &mut Context<'_>,
    ) -> Option<Stop> {
        // Drivers run on a runtime, so there is one; without it, nothing can be timed.
        let runtime = Handle::try_current().ok()?;
        let id = runtime.id();
        let earliest = state
            .deadlines
            .first()
            .is_none_or(|&(first, _)| deadline < first);
        let State {
            deadlines, watcher, ..
        } = &mut *state;
        match watcher {
            Watcher::Running { runtime, waker } if *runtime == id => {
                deadlines.insert((deadline, index));
                let waker = if earliest { waker.take() } else { None };
                drop(state);
                if let Some(waker) = waker {
                    waker.wake();
                }
                None
            }
            // Logged once, by the watcher that found it out.
            Watcher::Unavailable { runtime } if *runtime == id => None,
            // None serves a runtime that needs it: this one takes the watch.
            Watcher::Absent | Watcher::Unavailable { .. } if deadlines.is_empty() => {
                *watcher = Watcher::Running {
                    runtime: id,
                    waker: None,
                };
                deadlines.insert((deadline, index));
                drop(state);
                runtime.spawn(Watching {
                    watch: self.clone(),
                    runtime: id,
                    sleep: None,
                    exited: false,
                });
                None
            }
            // The watch serves another runtime: this driver times its own deadline.
            Watcher::Absent | Watcher::Running { .. } | Watcher::Unavailable { .. } => {
                let Some(sleep) = timer(deadline) else {
                    drop(state);
                    no_time_driver();
                    return None;
                };
                let slot = &mut state.slots[index as usize];
                let ready = slot.sleep.insert(sleep).as_mut().poll(cx).is_ready();
                slot.expired = ready;
                ready.then_some(Stop::Budget)
            }
        }
    }

    /// Gives a ticket back: its driver no longer waits.
    pub(crate) fn leave(&self, Ticket(index): Ticket) {
        let mut state = self.state();
        let slot = std::mem::take(&mut state.slots[index as usize]);
        if let (Some(deadline), None, false) = (slot.deadline, &slot.sleep, slot.expired) {
            state.deadlines.remove(&(deadline, index));
        }
        state.free.push(index);
        state.live -= 1;
        // Under steady load the table keeps the size of its largest burst (about 50 bytes a
        // slot); it shrinks once nothing waits. The watcher, if it runs, sleeps on until the
        // deadline it last saw, then exits: waking it here would respawn one per request at
        // low load.
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

/// A timer for `deadline`, or `None` when the runtime has no time driver: Tokio panics then, and
/// rather than lose the callbacks, the caller lets them run without a budget and says so.
fn timer(deadline: Instant) -> Option<Pin<Box<Sleep>>> {
    catch_unwind(|| Box::pin(tokio::time::sleep_until(deadline))).ok()
}

/// Keeps `waker` in `slot`, cloning it only when it would wake another task.
fn remember(slot: &mut Option<Waker>, waker: &Waker) {
    if !slot.as_ref().is_some_and(|old| old.will_wake(waker)) {
        *slot = Some(waker.clone());
    }
}

fn no_time_driver() {
    tracing::error!(
        "after callbacks run without their max duration: the Tokio runtime has no time driver \
         (build it with `enable_time()` or `enable_all()`)"
    );
}

/// The watcher task: sleeps until the earliest deadline, then marks and wakes what expired.
struct Watching {
    watch: Arc<Watch>,
    runtime: RuntimeId,
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
                Some(_) => {
                    if let Watcher::Running { waker, .. } = &mut state.watcher {
                        remember(waker, cx.waker());
                    }
                }
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
                None => match timer(next) {
                    Some(sleep) => this.sleep.insert(sleep),
                    None => {
                        this.watch.state().watcher = Watcher::Unavailable {
                            runtime: this.runtime,
                        };
                        this.exited = true;
                        no_time_driver();
                        return Poll::Ready(());
                    }
                },
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
            if matches!(state.watcher, Watcher::Running { .. }) {
                state.watcher = Watcher::Absent;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use http::{Request, Response};
    use http_body_util::{BodyExt, Empty};
    use tokio::time::Instant;
    use tower::{service_fn, Layer, ServiceExt};

    use crate::test_util::{eventually, settle, Logs};
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
        let callback = async move {
            tokio::time::sleep(sleep).await;
            ended.fetch_add(1, Ordering::SeqCst);
        };
        request_with(layer, budget, callback).await;
    }

    /// Serves one request whose route has `budget` and whose one callback is `callback`.
    async fn request_with(
        layer: &AfterLayer,
        budget: Duration,
        callback: impl Future<Output = ()> + Send + 'static,
    ) {
        let callback = Mutex::new(Some(callback));
        let handler = service_fn(move |request: Request<()>| {
            let after = request.extensions().get::<After>().unwrap().clone();
            after.run(callback.lock().unwrap().take().unwrap());
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
        let (budget, long) = (Duration::from_secs(5), Duration::from_secs(100));
        // The first runtime ends while its watcher sleeps; its callback is dropped with it.
        paused().block_on(async {
            request(&layer, budget, long, &ended).await;
            settle().await;
        });
        assert_eq!(tasks.stats().cancelled(), 1);
        paused().block_on(async {
            request(&layer, budget, long, &ended).await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            settle().await;
        });
        assert_eq!(tasks.stats().timed_out(), 1);
        assert_eq!(tasks.pending(), 0);
    }

    /// A current-thread runtime, which runs its tasks only inside `block_on`.
    fn current_thread(time: bool) -> tokio::runtime::Runtime {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        if time {
            builder.enable_time();
        }
        builder.build().unwrap()
    }

    /// Serves on `first` a request whose callback outlives the test, then on a second runtime
    /// one with a 100 ms budget: that budget must hold whatever `first` can do.
    fn a_second_runtime_keeps_its_budgets(first: &tokio::runtime::Runtime) {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let ended = Arc::new(AtomicUsize::new(0));
        let forever = Duration::from_secs(3600);
        let never = std::future::pending();
        first.block_on(request_with(&layer, Duration::from_millis(10), never));
        first.block_on(settle());
        assert_eq!(slots(&layer), 1);
        let second = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        second.block_on(async {
            request(&layer, Duration::from_millis(100), forever, &ended).await;
            eventually("the 100 ms budget", || tasks.stats().timed_out() >= 1).await;
        });
        assert_eq!(ended.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn budgets_hold_on_a_second_runtime_while_the_first_is_idle() {
        // Outside `block_on` the first runtime's watcher is stuck, with the first request's
        // deadline long passed.
        a_second_runtime_keeps_its_budgets(&current_thread(true));
    }

    #[test]
    fn a_runtime_without_a_time_driver_does_not_disable_budgets_elsewhere() {
        let logs = Logs::capture();
        a_second_runtime_keeps_its_budgets(&current_thread(false));
        assert_eq!(logs.lines_with("no time driver").len(), 1);
    }
}
