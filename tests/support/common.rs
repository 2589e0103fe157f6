//! The helpers every test of the crate shares, its unit tests (`src/test_util.rs`) and its
//! integration tests (`tests/support`) alike: polling with a generous deadline, and capturing
//! what `tracing` logs.

use std::future::Future;
use std::io;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// Polls `check` until it holds, failing after a generous deadline.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs `future` with a generous deadline, so a broken test fails instead of hanging.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Lets every ready task run a few times.
pub async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Panics with `message`. Typed `()`, so that a callback made of it returns `()`, not `!`
/// (which is not an `AfterOutput`).
pub fn fail(message: &str) {
    panic!("{message}")
}

/// Call before setting a subscriber for one test. Tracing caches, for the whole process, whether
/// each log statement is wanted. While only one subscriber exists, it asks the default of
/// whichever thread reaches a statement first: a test without logs, running alongside on another
/// thread, would switch this test's statements off for good. With a second subscriber alive for
/// good, tracing asks every subscriber, wherever it runs.
pub fn ask_every_subscriber() {
    static SECOND: LazyLock<tracing::Dispatch> =
        LazyLock::new(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    LazyLock::force(&SECOND);
}

/// Captures what `tracing` logs while it is alive, on this thread (use a current-thread runtime,
/// so that the callbacks log here too).
pub struct Logs {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Logs {
    pub fn capture() -> Self {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        ask_every_subscriber();
        let guard = tracing::subscriber::set_default(subscriber);
        Self {
            buffer,
            _guard: guard,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }

    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
