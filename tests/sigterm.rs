//! The drain on SIGTERM, in a separate process: `examples/graceful_shutdown.rs` serves requests
//! that each leave 300-500 ms of work behind; SIGTERM arrives right after the responses. With a
//! long grace the process exits 0 only once every callback has written its line; with a short
//! one it reports the cancelled callbacks in its log and still exits 0.
#![cfg(all(unix, feature = "axum"))]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const REQUESTS: u64 = 6;

/// The example's binary, brought up to date with the profile of this test (a quick no-op when
/// `cargo test` has just built it).
fn example_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let test = std::env::current_exe().unwrap();
            let profile_dir = test.parent().and_then(|deps| deps.parent()).unwrap();
            let mut build = Command::new(env!("CARGO"));
            build
                .args(["build", "--quiet", "--example", "graceful_shutdown"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if profile_dir.ends_with("release") {
                build.arg("--release");
            }
            assert!(
                build.status().unwrap().success(),
                "building the example failed"
            );
            profile_dir.join("examples").join("graceful_shutdown")
        })
        .clone()
}

struct Run {
    child: Child,
    address: String,
    stdout: BufReader<std::process::ChildStdout>,
    journal: PathBuf,
}

fn start(grace_ms: u64, name: &str) -> Run {
    let journal =
        std::env::temp_dir().join(format!("tower-after-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&journal);
    let mut child = Command::new(example_binary())
        .env("ADDR", "127.0.0.1:0")
        .env("GRACE_MS", grace_ms.to_string())
        .env("JOURNAL", &journal)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    Run {
        child,
        address,
        stdout,
        journal,
    }
}

/// Sends the requests, each asking for 300-500 ms of work, and reads their responses.
/// Sends `REQUESTS` requests whose callbacks each work for `base_ms` and a little more.
fn fire(address: &str, base_ms: u64) {
    use std::io::{Read, Write};
    for index in 0..REQUESTS {
        let ms = base_ms + index * 200 / REQUESTS;
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        write!(
            stream,
            "GET /work?ms={ms} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
}

fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the process to exit, with a generous deadline; returns its status, the rest of its
/// stdout and its stderr.
fn finish(mut run: Run) -> (std::process::ExitStatus, String, String, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = run.child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = run.child.kill();
            panic!("the server did not exit within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut run.stdout, &mut stdout).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(run.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let journal = std::fs::read_to_string(&run.journal).unwrap_or_default();
    let _ = std::fs::remove_file(&run.journal);
    (
        status,
        stdout,
        stderr,
        journal.lines().map(str::to_owned).collect(),
    )
}

#[test]
fn sigterm_waits_for_every_callback_before_exiting() {
    let run = start(30_000, "drain");
    fire(&run.address, 300);
    terminate(&run.child);
    let (status, stdout, stderr, journal) = finish(run);
    assert!(status.success(), "{status}\n{stderr}");
    assert_eq!(
        journal.len() as u64,
        REQUESTS,
        "journal: {journal:?}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("drained: {REQUESTS} completed, 0 cancelled")),
        "{stdout}"
    );
}

#[test]
fn a_short_grace_cancels_and_says_so() {
    let run = start(50, "cancel");
    // Far longer than the grace, however slowly a loaded machine runs the server.
    fire(&run.address, 10_000);
    terminate(&run.child);
    let (status, stdout, stderr, journal) = finish(run);
    assert!(status.success(), "{status}\n{stderr}");
    assert!(
        journal.is_empty(),
        "callbacks finished after the grace: {journal:?}"
    );
    assert!(
        stdout.contains(&format!("drained: 0 completed, {REQUESTS} cancelled")),
        "{stdout}"
    );
    // One warning for the event, with the count, not one per callback.
    let warnings = stderr.lines().filter(|line| line.contains("WARN")).count();
    assert_eq!(warnings, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "grace period of 50ms ran out completed=0 failed=0 panicked=0 timed_out=0 \
             cancelled={REQUESTS}"
        )),
        "{stderr}"
    );
}
