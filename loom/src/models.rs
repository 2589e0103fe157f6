//! Every interleaving of the parties that race on one request's state: the handler registering
//! and forgetting work, the response finishing, and the drivers that the state asks for.
//!
//! Each model checks the promises the crate builds on this state machine:
//! - every job registered runs exactly once, or is replaced or forgotten exactly once;
//! - work queued for after the response is never taken before the response finished;
//! - two drivers never hold work at once, and none is left behind with work to do.

use std::task::{Wake, Waker};

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::{Arc, Mutex, Notify};
use loom::thread::{self, JoinHandle};

use crate::scope::{Named, Next, Scope, Start};

#[derive(Debug)]
struct Job {
    id: u32,
    name: Option<&'static str>,
    start: Start,
}

impl Named for Job {
    fn name(&self) -> Option<&str> {
        self.name
    }
}

fn job(id: u32, start: Start) -> Job {
    Job {
        id,
        name: None,
        start,
    }
}

fn named(id: u32, name: &'static str) -> Job {
    Job {
        id,
        name: Some(name),
        start: Start::AfterResponse,
    }
}

struct Noop;

impl Wake for Noop {
    fn wake(self: std::sync::Arc<Self>) {}
}

/// Wakes a parked driver.
struct Unpark(Arc<Notify>);

impl Wake for Unpark {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.notify();
    }
}

/// One request's state, and what became of its jobs, shared by the model's threads.
#[derive(Clone)]
struct World(Arc<State>);

impl std::ops::Deref for World {
    type Target = State;

    fn deref(&self) -> &State {
        &self.0
    }
}

struct State {
    scope: Scope<Job>,
    /// Set just before the response finishes.
    finished: AtomicBool,
    ran: Mutex<Vec<u32>>,
    dropped: Mutex<Vec<u32>>,
    /// Drivers spawned and not yet returned.
    drivers: AtomicUsize,
    /// Set while a driver holds work it took: two drivers must never hold work at once.
    busy: AtomicBool,
    spawned: Mutex<Vec<JoinHandle<()>>>,
}

impl World {
    fn new() -> Self {
        Self(Arc::new(State {
            scope: Scope::new(),
            finished: AtomicBool::new(false),
            ran: Mutex::new(Vec::new()),
            dropped: Mutex::new(Vec::new()),
            drivers: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            spawned: Mutex::new(Vec::new()),
        }))
    }

    fn register(&self, job: Job) {
        let start = job.start;
        let (next, replaced) = self.scope.register(job, start);
        if let Some(replaced) = replaced {
            self.dropped.lock().unwrap().push(replaced.id);
        }
        self.act(next);
    }

    /// Registers `job` the way the crate does: an unnamed job claims a driver of its own if
    /// there is none, and rides in it; any other is queued.
    fn register_claiming(&self, job: Job) {
        if job.name.is_none() && self.scope.claim() {
            self.drivers.fetch_add(1, Ordering::SeqCst);
            let world = self.clone();
            let handle = thread::spawn(move || world.drive_carrying(job));
            self.spawned.lock().unwrap().push(handle);
        } else {
            self.register(job);
        }
    }

    fn forget(&self, name: &str) {
        if let Some(job) = self.scope.forget(name) {
            self.dropped.lock().unwrap().push(job.id);
        }
    }

    fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        let next = self.scope.finish(None);
        self.act(next);
    }

    fn act(&self, next: Next) {
        match next {
            Next::Nothing | Next::Done => {}
            Next::Wake(waker) => waker.wake(),
            Next::Spawn => {
                self.drivers.fetch_add(1, Ordering::SeqCst);
                let world = self.clone();
                let handle = thread::spawn(move || world.drive());
                self.spawned.lock().unwrap().push(handle);
            }
        }
    }

    /// A driver: the first intake pretends a callback is still running (so it waits with its
    /// waker stored), then it takes until it retires.
    fn drive(&self) {
        let waker = Waker::from(std::sync::Arc::new(Noop));
        let mut idle = false;
        while let Some(taken) = self.scope.take(&waker, idle) {
            let overlap = self.busy.swap(true, Ordering::SeqCst);
            assert!(!overlap, "two drivers hold work at once");
            for job in taken {
                if job.start == Start::AfterResponse {
                    assert!(
                        self.finished.load(Ordering::SeqCst),
                        "job {} taken before the response finished",
                        job.id
                    );
                }
                self.ran.lock().unwrap().push(job.id);
            }
            self.busy.store(false, Ordering::SeqCst);
            idle = true;
        }
        self.drivers.fetch_sub(1, Ordering::SeqCst);
    }

    /// A driver whose first callback never ends (a `wait_until` future): it parks until woken,
    /// and stops once it took `expected` jobs. A wake-up the state fails to ask for leaves it
    /// parked for good, which loom reports as a deadlock.
    fn drive_waiting(&self, expected: usize) {
        let unpark = Arc::new(Notify::new());
        let waker = Waker::from(std::sync::Arc::new(Unpark(unpark.clone())));
        let mut taken_count = 0;
        loop {
            let taken = self
                .scope
                .take(&waker, false)
                .expect("a busy driver never retires");
            for job in taken {
                self.ran.lock().unwrap().push(job.id);
                taken_count += 1;
            }
            if taken_count == expected {
                break;
            }
            unpark.wait();
        }
        self.drivers.fetch_sub(1, Ordering::SeqCst);
    }

    /// A driver spawned with its first job, which it holds until the state says the response
    /// finished (unless it is early work), parking until woken meanwhile: a wake-up the state
    /// fails to ask for leaves it parked for good, which loom reports as a deadlock.
    fn drive_carrying(&self, first: Job) {
        let unpark = Arc::new(Notify::new());
        let waker = Waker::from(std::sync::Arc::new(Unpark(unpark.clone())));
        let mut first = Some(first);
        loop {
            let Some(taken) = self.scope.take(&waker, first.is_none()) else {
                break;
            };
            let finished = taken.response_finished();
            let overlap = self.busy.swap(true, Ordering::SeqCst);
            assert!(!overlap, "two drivers hold work at once");
            let took = taken.len();
            for job in taken {
                if job.start == Start::AfterResponse {
                    assert!(
                        finished,
                        "job {} taken before the response finished",
                        job.id
                    );
                }
                self.ran.lock().unwrap().push(job.id);
            }
            let held = first
                .as_ref()
                .is_some_and(|job| job.start == Start::AfterResponse && !finished);
            if !held {
                if let Some(job) = first.take() {
                    if job.start == Start::AfterResponse {
                        assert!(
                            self.finished.load(Ordering::SeqCst),
                            "job {} started before the response finished",
                            job.id
                        );
                    }
                    self.ran.lock().unwrap().push(job.id);
                }
            }
            self.busy.store(false, Ordering::SeqCst);
            if held && took == 0 {
                unpark.wait();
            }
        }
        self.drivers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Joins every driver spawned (drivers spawn none themselves), then checks that each of
    /// `expected` ran or was dropped exactly once, and that nothing is left.
    fn settle(&self, expected: &[u32]) {
        loop {
            let handle = self.spawned.lock().unwrap().pop();
            match handle {
                Some(handle) => handle.join().unwrap(),
                None => break,
            }
        }
        let mut seen = self.ran.lock().unwrap().clone();
        seen.extend(self.dropped.lock().unwrap().iter());
        seen.sort_unstable();
        assert_eq!(seen, expected, "ran {:?}", self.ran.lock().unwrap());
        assert_eq!(self.drivers.load(Ordering::SeqCst), 0);
        let waker = Waker::from(std::sync::Arc::new(Noop));
        assert!(self.scope.take(&waker, true).is_none(), "work left behind");
    }
}

#[test]
fn registration_races_the_end_of_the_response() {
    loom::model(|| {
        let world = World::new();
        let handler = {
            let world = world.clone();
            thread::spawn(move || {
                world.register(job(1, Start::AfterResponse));
                world.register(job(2, Start::AfterResponse));
            })
        };
        world.finish();
        handler.join().unwrap();
        world.settle(&[1, 2]);
    });
}

#[test]
fn early_work_then_the_end_then_late_work() {
    loom::model(|| {
        let world = World::new();
        // `wait_until` before the end: starts at once.
        world.register(job(1, Start::Now));
        let finisher = {
            let world = world.clone();
            thread::spawn(move || world.finish())
        };
        // Registered from a callback or a late task, racing the end and the driver's retirement.
        world.register(job(2, Start::AfterResponse));
        finisher.join().unwrap();
        world.settle(&[1, 2]);
    });
}

#[test]
fn late_work_races_the_driver_retiring() {
    loom::model(|| {
        let world = World::new();
        world.register(job(1, Start::AfterResponse));
        world.finish();
        // The driver is on job 1 and about to retire; more work arrives meanwhile.
        let late = {
            let world = world.clone();
            thread::spawn(move || world.register(job(2, Start::AfterResponse)))
        };
        late.join().unwrap();
        world.settle(&[1, 2]);
    });
}

#[test]
fn forget_and_replace_race_the_driver_taking_the_work() {
    loom::model(|| {
        let world = World::new();
        world.register(named(1, "audit"));
        let handler = {
            let world = world.clone();
            thread::spawn(move || {
                // Replaces job 1 if it is still queued; job 1 runs otherwise.
                world.register(named(2, "audit"));
                world.forget("audit");
            })
        };
        world.finish();
        handler.join().unwrap();
        world.settle(&[1, 2]);
    });
}

#[test]
fn the_end_and_late_work_wake_a_waiting_driver() {
    loom::model(|| {
        let world = World::new();
        // `wait_until` before the end spawns a driver, which then waits on it.
        let (next, _) = world.scope.register(job(1, Start::Now), Start::Now);
        assert!(matches!(next, Next::Spawn));
        world.drivers.fetch_add(1, Ordering::SeqCst);
        let driver = {
            let world = world.clone();
            thread::spawn(move || world.drive_waiting(3))
        };
        let finisher = {
            let world = world.clone();
            thread::spawn(move || world.finish())
        };
        world.register(job(2, Start::AfterResponse));
        world.register(job(3, Start::AfterResponse));
        finisher.join().unwrap();
        driver.join().unwrap();
        world.settle(&[1, 2, 3]);
    });
}

#[test]
fn a_driver_carrying_its_first_job_holds_it_until_the_end() {
    loom::model(|| {
        let world = World::new();
        let handler = {
            let world = world.clone();
            thread::spawn(move || {
                // Claims a driver that carries job 1; job 2 is queued for it.
                world.register_claiming(job(1, Start::AfterResponse));
                world.register_claiming(job(2, Start::AfterResponse));
            })
        };
        world.finish();
        handler.join().unwrap();
        world.settle(&[1, 2]);
    });
}

#[test]
fn a_carried_job_after_the_driver_retired_claims_a_new_one() {
    loom::model(|| {
        let world = World::new();
        world.register_claiming(job(1, Start::Now));
        let finisher = {
            let world = world.clone();
            thread::spawn(move || world.finish())
        };
        // Late work: claims a new driver if the first retired, or is queued for it otherwise.
        world.register_claiming(job(2, Start::AfterResponse));
        finisher.join().unwrap();
        world.settle(&[1, 2]);
    });
}

#[test]
fn the_end_wakes_a_driver_holding_its_only_job() {
    loom::model(|| {
        let world = World::new();
        let handler = {
            let world = world.clone();
            thread::spawn(move || world.register_claiming(job(1, Start::AfterResponse)))
        };
        world.finish();
        handler.join().unwrap();
        world.settle(&[1]);
    });
}
