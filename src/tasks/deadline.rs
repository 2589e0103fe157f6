//! Deadlines that hold even when every worker thread is blocked.
//!
//! Tokio's timers are driven by its worker threads: callbacks that block every worker inside
//! their poll (a blocking call where an `.await` should be) hold them back. A shutdown's grace
//! and a Lambda invocation's deadline are promises, so one plain thread for the whole process
//! keeps them too. It is started once, before the first wait that needs it (never inside a
//! `poll`), and sleeps until the nearest deadline; a wait hands it a deadline and a channel to
//! fire, and takes it back by dropping the receiver.

use std::collections::BTreeMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use tokio::time::Instant;

/// How long a wait whose deadline passed gives the work it stopped to say so: callbacks that were
/// counting their own ending as a shutdown closed the layer, or that a Lambda invocation's
/// deadline stopped. Short: it comes out of the time left (a Lambda invocation's margin is
/// 100 ms), and work that can react does so at once.
pub(crate) const SETTLE: std::time::Duration = std::time::Duration::from_millis(20);

/// A deadline for the thread: when, and whom to tell.
type Entry = (std::time::Instant, oneshot::Sender<()>);

/// The thread's inbox; `None` if it could not be started (Tokio's timer alone keeps deadlines).
static BACKSTOP: OnceLock<Option<mpsc::Sender<Entry>>> = OnceLock::new();

/// Starts the backstop thread, if it is not running yet. Called where a wait is set up, outside
/// any `poll`.
pub(crate) fn start() {
    BACKSTOP.get_or_init(|| {
        let (send, receive) = mpsc::channel::<Entry>();
        std::thread::Builder::new()
            .name("tower-after-deadlines".into())
            .spawn(move || keep(&receive))
            .ok()
            .map(|_| send)
    });
}

/// The thread: fires each deadline as it comes, until the process ends.
fn keep(inbox: &mpsc::Receiver<Entry>) {
    // By deadline, then by arrival, which tells equal deadlines apart.
    let mut waiting: BTreeMap<(std::time::Instant, u64), oneshot::Sender<()>> = BTreeMap::new();
    for arrival in 0_u64.. {
        let next = waiting.first_key_value().map(|(&(at, _), _)| at);
        let received = match next {
            None => inbox.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => inbox.recv_timeout(at.saturating_duration_since(std::time::Instant::now())),
        };
        match received {
            Ok((at, fire)) => {
                // Waits that ended early leave their entries: drop them now and then.
                if waiting.len() >= 64 && waiting.len().is_power_of_two() {
                    waiting.retain(|_, fire| !fire.is_closed());
                }
                waiting.insert((at, arrival), fire);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = std::time::Instant::now();
        while let Some(entry) = waiting.first_entry().filter(|entry| entry.key().0 <= now) {
            let _ = entry.remove().send(());
        }
    }
}

/// Asks the backstop thread to fire at `deadline`; `None` if it is not running.
fn arm(deadline: Instant) -> Option<oneshot::Receiver<()>> {
    let inbox = BACKSTOP.get_or_init(|| None).as_ref()?;
    let (fire, fired) = oneshot::channel();
    inbox.send((deadline.into_std(), fire)).ok().map(|()| fired)
}

/// Awaits `future` until `deadline` (`None`: no deadline); `None` if the deadline came first.
///
/// Tokio's timer keeps the deadline, and so does the backstop thread, if [`start`] started it.
pub(crate) async fn until<F: Future>(deadline: Option<Instant>, future: F) -> Option<F::Output> {
    let Some(deadline) = deadline else {
        return Some(future.await);
    };
    let mut future = pin!(future);
    let mut timer = pin!(tokio::time::sleep_until(deadline));
    // Armed only if the future does not end at once: most drains have nothing to wait for.
    let mut backstop: Option<Option<oneshot::Receiver<()>>> = None;
    poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        let backstop = backstop.get_or_insert_with(|| arm(deadline));
        if timer.as_mut().poll(cx).is_ready() || fired(backstop, cx) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

fn fired(backstop: &mut Option<oneshot::Receiver<()>>, cx: &mut Context<'_>) -> bool {
    let Some(receiver) = backstop else {
        return false;
    };
    match Pin::new(receiver).poll(cx) {
        Poll::Ready(Ok(())) => true,
        Poll::Ready(Err(_)) => {
            *backstop = None;
            false
        }
        Poll::Pending => false,
    }
}
