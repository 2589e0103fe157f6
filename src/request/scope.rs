//! One request's state machine: where its work waits for the response to finish, and who must
//! act when work arrives.
//!
//! Three parties race on it: the handler (or anything holding the request's `After`) registers
//! and forgets work, the response's future or body finishes the request, and at most one driver
//! task takes the work and runs it. Every method takes the lock once, changes the state, and
//! returns what the caller must do next ([`Next`]): spawn a driver, wake the one that waits, or
//! nothing. Acting on that (spawning, waking) happens outside the lock, in `hand_over.rs`.
//!
//! It knows nothing of Tokio, tracing or what a job is, so that it can be read on its own and
//! checked with `loom` (see `loom/` in the repository), which explores every interleaving of those parties.

use std::mem;
use std::task::Waker;

#[cfg(loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::{Mutex, MutexGuard};

/// Work that may carry a name, under which a later registration replaces it.
pub(crate) trait Named {
    fn name(&self) -> Option<&str>;
}

/// One request's work, and whether a driver is on it.
pub(crate) struct Scope<J> {
    state: Mutex<State<J>>,
}

struct State<J> {
    finished: bool,
    /// Work the driver has not taken yet, in registration order, with when it may start: before
    /// the response finished, only work meant to start at once (`wait_until`) is taken. A
    /// request's first callback usually rides in its driver instead ([`Scope::claim`]), so this
    /// is mostly empty, and costs no allocation then.
    queue: Vec<(J, Start)>,
    driver: DriverSlot,
}

enum DriverSlot {
    /// No driver: the next work to arrive spawns one.
    Empty,
    /// A driver exists. It will take whatever is queued before it retires; when it waits, its
    /// waker is here.
    Filled(Option<Waker>),
}

/// When registered work may start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// Once the response has finished.
    AfterResponse,
    /// At once (`wait_until`).
    Now,
}

/// What the caller of a [`Scope`] method must do, outside the lock.
#[must_use]
#[derive(Debug)]
pub(crate) enum Next {
    /// Nothing: no work to start, or a driver will see it anyway.
    Nothing,
    /// Nothing, from [`Scope::finish`]: the request's work is done (none was registered, or
    /// only early work that ended).
    Done,
    /// Wake the waiting driver.
    Wake(Waker),
    /// Spawn a driver: there is work and none exists.
    Spawn,
}

impl<J: Named> Scope<J> {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                finished: false,
                queue: Vec::new(),
                driver: DriverSlot::Empty,
            }),
        }
    }

    /// Locks the state. No code of the crate's users runs under this lock, so it is never
    /// poisoned by their panics; a poisoned lock is recovered rather than turned into a panic.
    fn state(&self) -> MutexGuard<'_, State<J>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes the caller the request's driver if it has none, so that it spawns one that carries
    /// its job itself, instead of queueing it: `true` if so. The new driver takes queued work
    /// like any other, and must hold a job meant for after the response until
    /// [`Taken::response_finished`] says so.
    ///
    /// Only with nothing queued: a driver starts what it carries before what it takes, so
    /// carrying a job behind queued ones would start it out of registration order.
    pub(crate) fn claim(&self) -> bool {
        let mut state = self.state();
        let claimed = matches!(state.driver, DriverSlot::Empty) && state.queue.is_empty();
        if claimed {
            state.driver = DriverSlot::Filled(None);
        }
        claimed
    }

    /// Adds `job`. A named job replaces a queued job of the same name, which is returned.
    pub(crate) fn register(&self, job: J, start: Start) -> (Next, Option<J>) {
        let mut state = self.state();
        let replaced = job.name().and_then(|name| state.take_named(name));
        state.queue.push((job, start));
        if start == Start::AfterResponse && !state.finished {
            return (Next::Nothing, replaced);
        }
        (state.call_driver(), replaced)
    }

    /// Whether a job called `name` is queued: registering that name again replaces it.
    pub(crate) fn holds_named(&self, name: &str) -> bool {
        self.state()
            .queue
            .iter()
            .any(|(job, _)| job.name() == Some(name))
    }

    /// Removes the queued job called `name`, if it has not been taken yet.
    pub(crate) fn forget(&self, name: &str) -> Option<J> {
        self.state().take_named(name)
    }

    /// Marks the response as finished: what was queued may now be taken, `first` (if any) before
    /// the rest. A driver that already runs (for early work) is woken, so that it learns of the
    /// end and its deadline.
    pub(crate) fn finish(&self, first: Option<J>) -> Next {
        let mut state = self.state();
        debug_assert!(!state.finished, "a request finishes once");
        state.finished = true;
        if let Some(first) = first {
            state.queue.insert(0, (first, Start::AfterResponse));
        }
        match state.driver {
            DriverSlot::Empty if state.queue.is_empty() => Next::Done,
            _ => state.call_driver(),
        }
    }

    /// For the driver: the work it may start now, remembering `waker` to be woken when more
    /// arrives. A driver that is `idle` (runs nothing) and finds nothing new retires: `None`,
    /// and the next work to arrive spawns a new driver.
    pub(crate) fn take(&self, waker: &Waker, idle: bool) -> Option<Taken<J>> {
        let mut state = self.state();
        let taken = state.take_ready();
        if idle && taken.jobs.is_empty() {
            state.driver = DriverSlot::Empty;
            return None;
        }
        match &mut state.driver {
            DriverSlot::Filled(Some(current)) if current.will_wake(waker) => {}
            driver => *driver = DriverSlot::Filled(Some(waker.clone())),
        }
        Some(taken)
    }

    /// Whether the request's work is at rest, no driver running and no work waiting, and if so
    /// whether its response finished too (`Some(true)`): its work is then done. Work registered
    /// later starts a new driver, which makes it busy again.
    pub(crate) fn at_rest(&self) -> Option<bool> {
        let state = self.state();
        let at_rest = matches!(state.driver, DriverSlot::Empty) && state.queue.is_empty();
        at_rest.then_some(state.finished)
    }

    /// For a driver that stops before its work is done (cancelled): everything it could still
    /// take, and its retirement, so that work arriving later spawns a new driver.
    pub(crate) fn abandon(&self) -> Taken<J> {
        let mut state = self.state();
        state.driver = DriverSlot::Empty;
        state.take_ready()
    }
}

impl<J: Named> State<J> {
    fn take_named(&mut self, name: &str) -> Option<J> {
        let position = (self.queue.iter()).position(|(job, _)| job.name() == Some(name))?;
        Some(self.queue.remove(position).0)
    }

    /// The work that may start now: all of it once the response finished, before that only
    /// the work meant to start at once.
    fn take_ready(&mut self) -> Taken<J> {
        let finished = self.finished;
        let jobs = if finished {
            mem::take(&mut self.queue)
        } else if self.queue.iter().any(|(_, start)| *start == Start::Now) {
            let (now, later) = mem::take(&mut self.queue)
                .into_iter()
                .partition(|(_, start)| *start == Start::Now);
            self.queue = later;
            now
        } else {
            Vec::new()
        };
        Taken { jobs, finished }
    }

    /// There is work for a driver: spawn one, or wake the one that waits.
    fn call_driver(&mut self) -> Next {
        match &mut self.driver {
            DriverSlot::Empty => {
                self.driver = DriverSlot::Filled(None);
                Next::Spawn
            }
            DriverSlot::Filled(waker) => waker.take().map_or(Next::Nothing, Next::Wake),
        }
    }
}

/// Work handed to a driver, in registration order.
pub(crate) struct Taken<J> {
    jobs: Vec<(J, Start)>,
    finished: bool,
}

impl<J> Taken<J> {
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Whether the response had finished: work held for after it may start.
    pub(crate) fn response_finished(&self) -> bool {
        self.finished
    }
}

impl<J> IntoIterator for Taken<J> {
    type Item = J;
    type IntoIter = std::iter::Map<std::vec::IntoIter<(J, Start)>, fn((J, Start)) -> J>;

    fn into_iter(self) -> Self::IntoIter {
        self.jobs.into_iter().map(|(job, _)| job)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    use super::{Named, Next, Scope, Start};

    /// A job: its number, and maybe a name.
    #[derive(Debug, PartialEq, Eq)]
    struct Job(u32, Option<&'static str>);

    impl Named for Job {
        fn name(&self) -> Option<&str> {
            self.1
        }
    }

    struct Flag;
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {}
    }

    fn waker() -> Waker {
        Waker::from(Arc::new(Flag))
    }

    fn jobs(scope: &Scope<Job>, idle: bool) -> Option<Vec<u32>> {
        scope
            .take(&waker(), idle)
            .map(|taken| taken.into_iter().map(|job| job.0).collect())
    }

    fn job(number: u32) -> Job {
        Job(number, None)
    }

    #[test]
    fn work_waits_for_the_response_then_spawns_one_driver() {
        let scope = Scope::new();
        assert!(matches!(
            scope.register(job(1), Start::AfterResponse).0,
            Next::Nothing
        ));
        assert!(matches!(
            scope.register(job(2), Start::AfterResponse).0,
            Next::Nothing
        ));
        assert!(matches!(scope.finish(None), Next::Spawn));
        assert_eq!(jobs(&scope, true), Some(vec![1, 2]));
        assert_eq!(
            jobs(&scope, true),
            None,
            "an idle driver with nothing retires"
        );
    }

    #[test]
    fn a_request_without_work_never_needs_a_driver() {
        let scope = Scope::<Job>::new();
        assert!(matches!(scope.finish(None), Next::Done));
    }

    #[test]
    fn early_work_starts_before_the_end_and_late_work_wakes_the_driver() {
        let scope = Scope::new();
        assert!(matches!(scope.register(job(1), Start::Now).0, Next::Spawn));
        assert!(matches!(
            scope.register(job(2), Start::AfterResponse).0,
            Next::Nothing
        ));
        // The driver runs the early work, and waits.
        assert_eq!(jobs(&scope, true), Some(vec![1]));
        // The end of the response wakes it, for the queued work and the deadline.
        assert!(matches!(scope.finish(None), Next::Wake(_)));
        assert_eq!(jobs(&scope, false), Some(vec![2]));
        assert!(matches!(
            scope.register(job(3), Start::AfterResponse).0,
            Next::Wake(_)
        ));
    }

    #[test]
    fn the_last_registration_of_a_name_wins_until_taken() {
        let scope = Scope::new();
        let named = |number| Job(number, Some("audit"));
        assert_eq!(scope.register(named(1), Start::AfterResponse).1, None);
        assert_eq!(
            scope.register(named(2), Start::AfterResponse).1,
            Some(named(1))
        );
        assert_eq!(scope.forget("audit"), Some(named(2)));
        assert_eq!(scope.forget("audit"), None);
        assert!(matches!(
            scope.register(named(3), Start::AfterResponse).0,
            Next::Nothing
        ));
        assert!(matches!(scope.finish(None), Next::Spawn));
        assert_eq!(jobs(&scope, true), Some(vec![3]));
        assert_eq!(
            scope.forget("audit"),
            None,
            "taken work cannot be forgotten"
        );
    }

    #[test]
    fn an_abandoned_scope_spawns_a_new_driver_for_later_work() {
        let scope = Scope::new();
        let _ = scope.register(job(1), Start::AfterResponse);
        let _ = scope.finish(None);
        let abandoned: Vec<_> = scope.abandon().into_iter().collect();
        assert_eq!(abandoned, [job(1)]);
        assert!(matches!(
            scope.register(job(2), Start::AfterResponse).0,
            Next::Spawn
        ));
    }
}
