//! What clients that send large headers can make a server hold, with and without the crate's
//! byte bound: every response keeps its request's snapshot for a minute (an `after_each` hook
//! that waits), and one client on 127.0.0.1 sends plain GETs with headers of a given size.
//!
//! Run with: `cargo run --release --example held_bytes`
//!
//! Each row runs in a process of its own, so that one row's memory does not hide the next's.
//! `bounded` is the default layer (snapshots capped at 16 KiB, 64 MiB held at most);
//! `unbounded` lifts both, as the crate behaved before it had them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use axum::Router;
use tower_after::{AfterLayer, SnapshotConfig};

/// The rows: requests, KiB of headers each, and the layer.
const ROWS: &[(usize, usize, &str)] = &[
    (2_000, 1, "unbounded"),
    (2_000, 64, "unbounded"),
    (10_000, 64, "unbounded"),
    (2_000, 256, "unbounded"),
    (10_000, 15, "unbounded"),
    (2_000, 1, "bounded"),
    (2_000, 64, "bounded"),
    (10_000, 64, "bounded"),
    (2_000, 256, "bounded"),
    (10_000, 15, "bounded"),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, row, requests, kib, mode] = args.as_slice() {
        if row == "row" {
            let (requests, kib) = (requests.parse().unwrap(), kib.parse().unwrap());
            return run_row(requests, kib, mode);
        }
    }
    println!("| layer | requests | headers each | pending | shed | truncated | held by snapshots | RSS growth |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let me = std::env::current_exe().unwrap();
    for (requests, kib, mode) in ROWS {
        let output = Command::new(&me)
            .args(["row", &requests.to_string(), &kib.to_string(), mode])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        print!("{}", String::from_utf8_lossy(&output.stdout));
    }
}

/// Resident memory of this process, in bytes (Linux).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn run_row(requests: usize, kib: usize, mode: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut layer = AfterLayer::new()
        .max_pending(usize::MAX)
        .after_each(|_| tokio::time::sleep(Duration::from_secs(60)));
    if mode == "unbounded" {
        layer = layer
            .snapshot(SnapshotConfig::new().max_bytes(usize::MAX))
            .max_held_bytes(usize::MAX);
    }
    let tasks = layer.tasks();
    let app = Router::new().layer(layer);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let address = listener.local_addr().unwrap();
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });

    // hyper takes at most 100 headers: large sizes come as 64 KiB headers.
    let header_count = kib.div_ceil(64).max(1);
    let value = "v".repeat(kib * 1024 / header_count);
    let mut request = String::from("GET /anything HTTP/1.1\r\nhost: localhost\r\n");
    for index in 0..header_count {
        request.push_str(&format!("x-large-{index}: {value}\r\n"));
    }
    request.push_str("\r\n");

    let mut client = TcpStream::connect(address).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut send = |count: usize| {
        for _ in 0..count {
            client.write_all(request.as_bytes()).unwrap();
            read_response(&mut client);
        }
    };
    // Warm up the server's buffers and the runtime before the first reading.
    send(10);
    let before = rss();
    send(requests);
    std::thread::sleep(Duration::from_millis(200));
    let grown = rss().saturating_sub(before);
    let stats = tasks.stats();
    println!(
        "| {mode} | {requests} | {kib} KiB | {} | {} | {} | {:.1} MiB | +{:.0} MiB |",
        tasks.pending(),
        stats.shed(),
        stats.truncated(),
        stats.held_bytes() as f64 / 1048576.0,
        grown as f64 / 1048576.0,
    );
    // The hooks still wait: the process ends without draining them.
    runtime.shutdown_background();
}

/// Reads one response with an empty body (the router's 404).
fn read_response(stream: &mut TcpStream) {
    let mut seen = Vec::new();
    let mut byte = [0_u8; 1024];
    while !seen.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut byte).unwrap();
        assert!(read > 0, "the server closed the connection");
        seen.extend_from_slice(&byte[..read]);
    }
}
