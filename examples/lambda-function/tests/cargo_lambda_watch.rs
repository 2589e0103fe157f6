//! The function under `cargo lambda watch`, the emulator the example's docs tell you to run, with
//! a real HTTP client calling its function URL on 127.0.0.1, as `curl` would.
//!
//! It needs cargo-lambda, so it is ignored by default. Run it with
//!
//! ```not_rust
//! pip install cargo-lambda
//! cargo test --manifest-path examples/lambda-function/Cargo.toml --test cargo_lambda_watch -- --ignored
//! ```
//!
//! `tests/runtime_api.rs` checks the same promises against a Runtime API of its own, without
//! cargo-lambda.

#![cfg(unix)]

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// What only a broken promise makes a test wait for. The first request waits for the emulator
/// to start the function, which `cargo run` may have to build first.
const DEADLINE: Duration = Duration::from_secs(300);

/// `cargo lambda watch`, interrupted as Ctrl-C would if a test fails before it stopped it.
struct Emulator {
    child: Child,
    log: PathBuf,
}

impl Emulator {
    fn start(port: u16) -> Self {
        let version = Command::new(env!("CARGO"))
            .args(["lambda", "--version"])
            .output()
            .unwrap();
        assert!(
            version.status.success(),
            "cargo-lambda is not installed (pip install cargo-lambda): {}",
            String::from_utf8_lossy(&version.stderr)
        );
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cargo_lambda_watch.log");
        let file = File::create(&log).unwrap();
        let child = Command::new(env!("CARGO"))
            .args(["lambda", "watch", "--invoke-address", "127.0.0.1"])
            .args(["--invoke-port", &port.to_string()])
            // The test's own edits, if any, must not restart the function mid-way.
            .arg("--ignore-changes")
            .args(["--env-var", "RUST_LOG=info"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    /// What the emulator and the function have printed so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `text`.
    async fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGINT, which the emulator passes on to the function, and waits for its exit.
    async fn interrupt(&mut self) -> Option<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGINT lets the emulator stop the function too; SIGKILL if it does not listen.
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free port of 127.0.0.1.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Calls `method path` on the function URL; returns the status and the body.
async fn call(client: &HttpClient, port: u16, method: Method, path: &str) -> (StatusCode, String) {
    let uri = format!("http://127.0.0.1:{port}/lambda-url/tower-after-demo{path}");
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .body(Empty::new())
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
#[ignore = "needs cargo-lambda: pip install cargo-lambda"]
async fn under_cargo_lambda_watch_callbacks_run_after_the_response() {
    let port = free_port();
    let mut emulator = Emulator::start(port);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();

    // The emulator listens at once, and starts the function at the first request.
    let deadline = Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the emulator does not listen:\n{}",
            emulator.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = tokio::time::timeout(DEADLINE, call(&client, port, Method::GET, "/report"))
        .await
        .expect("no answer from the emulator");
    let answered = Instant::now();
    assert_eq!(
        report,
        (StatusCode::OK, "report scheduled\n".to_owned()),
        "{}",
        emulator.log()
    );
    // The report takes 2 s after its response.
    assert!(
        !emulator.log().contains("report finished"),
        "{}",
        emulator.log()
    );

    // One event at a time: the emulator hands this one over only once the function asked for
    // it, which it does once the report's callback has ended, 2 s after the report's response
    // was posted. Without the wait it comes within milliseconds; the bound leaves a second for
    // the report's response to reach this client on a loaded machine.
    let checkout = tokio::time::timeout(DEADLINE, call(&client, port, Method::POST, "/checkout"))
        .await
        .unwrap_or_else(|_| panic!("no answer to the checkout:\n{}", emulator.log()));
    let waited = answered.elapsed();
    assert_eq!(checkout, (StatusCode::OK, "ordered\n".to_owned()));
    assert!(
        waited >= Duration::from_secs(1),
        "the checkout was answered {waited:?} after the report, before the report's 2 s of work \
         could end:\n{}",
        emulator.log()
    );
    emulator.wait_for("report finished").await;
    emulator.wait_for("audit written status=Some(200)").await;

    let log = emulator.log();
    // The emulator's deadline in 1970 is recognized, once, and cancels nothing.
    assert_eq!(
        log.matches("the Lambda invocation's deadline is not a real one")
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains("cancelled"), "{log}");

    // Ctrl-C: the function drains (nothing is left) and both exit.
    let status = emulator.interrupt().await;
    let log = emulator.log();
    assert!(status.is_some(), "still running after SIGINT:\n{log}");
    assert!(
        log.contains("after callbacks drained at shutdown completed=0"),
        "{log}"
    );
}
