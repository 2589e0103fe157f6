//! The function's binary, as `cargo lambda build` builds it, against a Runtime API on 127.0.0.1
//! that follows AWS's documented endpoints (`/2018-06-01/runtime/invocation/next`,
//! `.../{id}/response`, `.../{id}/error`, and the extension registration of `graceful_shutdown`).
//!
//! The function logs to a file, and the Runtime API reads that file each time the function calls
//! it. So each test sees what the function had logged when it posted a response and when it asked
//! for the next event: the callbacks must have logged nothing yet at the post, and everything by
//! the next event.
//!
//! Every wait is bounded by a generous deadline that only a broken promise reaches.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// What only a broken promise makes a test wait for.
const DEADLINE: Duration = Duration::from_secs(30);

/// What the function did, as the Runtime API saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    /// It registered the extension that gets SIGTERM.
    Registered,
    /// It asked for the next event.
    Next,
    /// It posted the response of this invocation.
    Posted(String),
    /// It posted an error for this invocation.
    Failed(String),
}

/// A call, with what the function had logged when it made it.
#[derive(Debug, Clone)]
struct Seen {
    call: Call,
    log: String,
    /// What it posted, for `Posted` and `Failed`.
    body: String,
}

/// An event that the Runtime API hands out.
struct Event {
    id: String,
    deadline_ms: String,
    body: String,
}

/// The Runtime API: a queue of events, and what it saw.
#[derive(Clone)]
struct Api {
    queue: Arc<Mutex<VecDeque<Event>>>,
    arrived: Arc<Notify>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Where the function logs.
    log: PathBuf,
}

impl Api {
    fn new(test: &str) -> Self {
        let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{test}.log"));
        Self {
            queue: Arc::default(),
            arrived: Arc::default(),
            seen: Arc::default(),
            log,
        }
    }

    /// What the function has logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn record(&self, call: Call, body: String) {
        let log = self.log();
        self.seen.lock().unwrap().push(Seen { call, log, body });
    }

    fn calls(&self) -> Vec<Call> {
        let seen = self.seen.lock().unwrap();
        seen.iter().map(|seen| seen.call.clone()).collect()
    }

    /// The `nth` call (from 1) equal to `call`, as it was seen.
    fn seen(&self, call: &Call, nth: usize) -> Seen {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|seen| seen.call == *call)
            .nth(nth - 1)
            .cloned()
            .unwrap_or_else(|| panic!("no {call:?} #{nth} in {:#?}", *seen))
    }

    /// Waits until the function made `call` `count` times.
    async fn wait_for(&self, call: Call, count: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.calls().iter().filter(|seen| **seen == call).count() < count {
            assert!(
                Instant::now() < deadline,
                "no {call:?} #{count} within {DEADLINE:?}: {:#?}\nlog:\n{}",
                self.calls(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Queues a function URL request (an API Gateway HTTP API event) for `method path`, with
    /// `deadline_ms`, the milliseconds since the epoch by which Lambda ends the invocation.
    fn invoke(&self, id: &str, method: &str, path: &str, deadline_ms: u128) {
        let body = serde_json::json!({
            "version": "2.0",
            "rawPath": path,
            "requestContext": { "http": { "method": method } },
        });
        self.queue.lock().unwrap().push_back(Event {
            id: id.to_owned(),
            deadline_ms: deadline_ms.to_string(),
            body: body.to_string(),
        });
        self.arrived.notify_waiters();
    }

    async fn handle(self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let body = request.into_body().collect().await.map_or_else(
            |error| format!("unreadable body: {error}"),
            |body| String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        );
        let invocation = path.strip_prefix("/2018-06-01/runtime/invocation/");
        let response = Response::builder();
        let response = match (method, invocation) {
            (Method::GET, Some("next")) => return Ok(self.next_event().await),
            (Method::POST, Some(invocation)) if invocation.ends_with("/response") => {
                let id = invocation.trim_end_matches("/response").to_owned();
                self.record(Call::Posted(id), body);
                response.status(StatusCode::ACCEPTED).body(Full::default())
            }
            (Method::POST, Some(invocation)) if invocation.ends_with("/error") => {
                let id = invocation.trim_end_matches("/error").to_owned();
                self.record(Call::Failed(id), body);
                response.status(StatusCode::ACCEPTED).body(Full::default())
            }
            (Method::POST, None) if path == "/2020-01-01/extension/register" => {
                self.record(Call::Registered, body);
                let body = r#"{"functionName":"tower-after-demo","functionVersion":"$LATEST","handler":"bootstrap"}"#;
                response
                    .header("lambda-extension-identifier", "extension-1")
                    .body(Full::from(body))
            }
            // The extension gets no event: SIGTERM is what the tests send it.
            (Method::GET, None) if path == "/2020-01-01/extension/event/next" => {
                std::future::pending().await
            }
            _ => response.status(StatusCode::NOT_FOUND).body(Full::default()),
        };
        Ok(response.unwrap())
    }

    async fn next_event(&self) -> Response<Full<Bytes>> {
        self.record(Call::Next, String::new());
        loop {
            // Long-polls, as Lambda does: an empty answer would make the runtime spin.
            let arrived = self.arrived.notified();
            if let Some(event) = self.queue.lock().unwrap().pop_front() {
                return Response::builder()
                    .header("lambda-runtime-aws-request-id", event.id)
                    .header("lambda-runtime-deadline-ms", event.deadline_ms)
                    .header(
                        "lambda-runtime-invoked-function-arn",
                        "arn:aws:lambda:us-east-1:000000000000:function:tower-after-demo",
                    )
                    .body(Full::from(event.body))
                    .unwrap();
            }
            arrived.await;
        }
    }
}

/// Serves the Runtime API on a free port of 127.0.0.1; returns its address.
async fn serve(api: Api) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let api = api.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| api.clone().handle(request));
                // A connection ends with an error when the function exits mid-request.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    address
}

/// The function's process, killed if a test fails before it ended.
struct Function(Child);

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the function's binary against a Runtime API of its own, and waits until it asked for
/// its first event.
async fn start(test: &str) -> (Api, Function) {
    let api = Api::new(test);
    let address = serve(api.clone()).await;
    let log = File::create(&api.log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tower-after-demo"))
        .env("AWS_LAMBDA_RUNTIME_API", &address)
        .env("AWS_LAMBDA_FUNCTION_NAME", "tower-after-demo")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env_remove("AWS_LAMBDA_MAX_CONCURRENCY")
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let function = Function(child);
    api.wait_for(Call::Next, 1).await;
    assert_eq!(api.calls(), [Call::Registered, Call::Next]);
    (api, function)
}

/// The deadline of an invocation whose timeout is `timeout`, as Lambda sends it.
fn due_in(timeout: Duration) -> u128 {
    (SystemTime::now() + timeout)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Asserts that the function answered `id` with a 200 and `body`.
fn assert_answered(api: &Api, id: &str, body: &str) {
    let posted = api.seen(&Call::Posted(id.to_owned()), 1);
    let response: serde_json::Value = serde_json::from_str(&posted.body).unwrap();
    assert_eq!(
        (&response["statusCode"], &response["body"]),
        (&serde_json::json!(200), &serde_json::json!(body)),
        "{response:#}"
    );
}

#[tokio::test]
async fn each_invocation_s_callbacks_run_after_its_post_and_before_the_next_event() {
    let (api, _function) = start("after_the_post").await;

    api.invoke("checkout-1", "POST", "/checkout", due_in(DEADLINE));
    api.wait_for(Call::Next, 2).await;
    assert_eq!(
        api.calls()[2..],
        [Call::Posted("checkout-1".to_owned()), Call::Next]
    );
    assert_answered(&api, "checkout-1", "ordered\n");
    let posted = api.seen(&Call::Posted("checkout-1".to_owned()), 1);
    assert!(!posted.log.contains("audit written"), "{}", posted.log);
    let next = api.seen(&Call::Next, 2);
    assert_eq!(
        next.log.matches("audit written status=Some(200)").count(),
        1,
        "{}",
        next.log
    );

    // Two seconds of work, within the route's five.
    api.invoke("report-1", "GET", "/report", due_in(DEADLINE));
    api.wait_for(Call::Next, 3).await;
    assert_answered(&api, "report-1", "report scheduled\n");
    let posted = api.seen(&Call::Posted("report-1".to_owned()), 1);
    assert!(!posted.log.contains("report started"), "{}", posted.log);
    let next = api.seen(&Call::Next, 3);
    assert!(next.log.contains("report finished"), "{}", next.log);
    assert!(!next.log.contains("WARN"), "{}", next.log);
    assert_eq!(api.calls().len(), 6, "{:#?}", api.calls());
}

#[tokio::test]
async fn the_emulator_s_deadline_in_1970_cancels_nothing() {
    let (api, _function) = start("deadline_in_1970").await;
    // What `cargo lambda watch` sends: 600,000 ms after the epoch, long past.
    api.invoke("report-1", "GET", "/report", 600_000);
    api.wait_for(Call::Next, 2).await;
    api.invoke("checkout-1", "POST", "/checkout", 600_000);
    api.wait_for(Call::Next, 3).await;

    assert_answered(&api, "report-1", "report scheduled\n");
    assert_answered(&api, "checkout-1", "ordered\n");
    let log = api.seen(&Call::Next, 3).log;
    assert!(log.contains("report finished"), "{log}");
    assert!(log.contains("audit written"), "{log}");
    assert!(!log.contains("cancelled"), "{log}");
    // Said once, not per invocation.
    assert_eq!(
        log.matches("the Lambda invocation's deadline is not a real one")
            .count(),
        1,
        "{log}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn sigterm_ends_the_function_after_a_drain() {
    let (api, mut function) = start("sigterm").await;
    api.invoke("checkout-1", "POST", "/checkout", due_in(DEADLINE));
    api.wait_for(Call::Next, 2).await;

    let killed = Command::new("kill")
        .args(["-TERM", &function.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = function.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running {DEADLINE:?} after SIGTERM:\n{}",
            api.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log = api.log();
    assert!(status.success(), "{status}\n{log}");
    // The audit ran within its invocation, so the drain at shutdown had nothing left.
    assert!(
        log.contains("after callbacks drained at shutdown completed=0"),
        "{log}"
    );
    assert!(log.contains("Graceful shutdown completed"), "{log}");
    assert_eq!(log.matches("audit written").count(), 1, "{log}");
}
