//! Run with
//!
//! ```not_rust
//! bash benches/load.sh                 # installs wrk if missing, then runs this
//! cargo run --release --example loadtest -- [--rounds 5] [--seconds 5] [--only a,b]
//! ```
//!
//! To profile one variant: `loadtest serve VARIANT --exit-after SECONDS` prints its address and
//! serves until then, e.g. under `valgrind --tool=callgrind`, while `wrk` loads it. With
//! `WORKERS=2`, every server runs two worker threads on both CPUs instead of one on CPU 0.
//!
//! An HTTP load benchmark of `AfterLayer` against what users would otherwise write, on the same
//! machine and in the same run. Each server variant runs in its own process with a single Tokio
//! worker thread pinned to CPU 0; `wrk` (one thread, 64 connections) is pinned to CPU 1. The
//! variants take turns, in a rotating order, over several rounds; the report gives medians and
//! the ratio of each variant to its baseline in every round, since on a shared machine a single
//! absolute figure means little.
//!
//! A last phase drives the one-callback variant at half its saturating rate with an open-loop
//! client and reports how long callbacks waited between the end of their response and their
//! start. Every server reports its peak resident memory.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tower_after::{After, AfterLayer};
use tower_http::trace::TraceLayer;

/// The server variants, in the order they are reported.
const VARIANTS: &[(&str, &str)] = &[
    ("bare", "bare axum hello world"),
    ("noop-layer", "+ a no-op layer (any layer's floor)"),
    ("trace-eos", "+ tower-http TraceLayer with an on_eos hook"),
    ("after", "+ AfterLayer, no callback"),
    (
        "after-outer",
        "AfterLayer around the whole router, no callback",
    ),
    ("eos-spawn", "+ TraceLayer whose on_eos spawns the work"),
    ("after-callback", "+ AfterLayer, one callback per request"),
    (
        "after-run-to-end",
        "+ AfterLayer and RunToEndLayer, one callback",
    ),
    (
        "after-hook",
        "+ AfterLayer with an after_each hook, nothing else",
    ),
    (
        "after-outer-callback",
        "AfterLayer around the whole router, one callback",
    ),
    ("spawn", "tokio::spawn in the handler"),
    (
        "eos-spawn-sleep",
        "+ TraceLayer whose on_eos spawns a 50 ms sleep",
    ),
    ("after-sleep", "+ AfterLayer, one 50 ms sleeping callback"),
    ("spawn-sleep", "tokio::spawn of a 50 ms sleep"),
    (
        "after-sleep-limit",
        "+ AfterLayer, 50 ms callbacks, limit 64",
    ),
];

/// Each ratio reported: variant, baseline, what is compared, target.
const RATIOS: &[(&str, &str, Metric, &str)] = &[
    ("after", "trace-eos", Metric::Throughput, ">= 0.97"),
    ("after-callback", "eos-spawn", Metric::Throughput, ">= 0.97"),
    (
        "after-sleep",
        "eos-spawn-sleep",
        Metric::Throughput,
        ">= 0.97",
    ),
    ("after-sleep", "eos-spawn-sleep", Metric::P99, "<= 1.05"),
    (
        "after-hook",
        "eos-spawn",
        Metric::Throughput,
        "(the hook's cost)",
    ),
    (
        "after-outer",
        "trace-eos",
        Metric::Throughput,
        "(outside the router)",
    ),
    (
        "after-outer-callback",
        "eos-spawn",
        Metric::Throughput,
        "(outside the router)",
    ),
    ("after", "bare", Metric::Throughput, "(against bare axum)"),
    (
        "noop-layer",
        "bare",
        Metric::Throughput,
        "(any layer's cost)",
    ),
    (
        "trace-eos",
        "bare",
        Metric::Throughput,
        "(nearest existing tool)",
    ),
    (
        "after-callback",
        "spawn",
        Metric::Throughput,
        "(against a spawn)",
    ),
    (
        "after-sleep",
        "spawn-sleep",
        Metric::P99,
        "(against a spawn)",
    ),
    (
        "after-sleep-limit",
        "after-sleep",
        Metric::Throughput,
        "(limit's cost)",
    ),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Metric {
    Throughput,
    P99,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1], exit_after(&args[2..])),
        Some("drive") => drive(&args[1..]),
        _ => orchestrate(&args),
    }
}

// ---------------------------------------------------------------------------------------------
// The servers

/// What every variant's work touches: a process-wide static, so that no variant pays for an
/// extractor or a clone that another does not.
static PROBE: std::sync::LazyLock<Probe> = std::sync::LazyLock::new(Probe::default);

#[derive(Default)]
struct Probe {
    /// Callbacks (or spawned tasks) that ran.
    ran: AtomicU64,
    /// The layer's callbacks, where the variant has one worth counting.
    tasks: std::sync::OnceLock<tower_after::AfterTasks>,
    /// Wait from the end of the response to the start of the callback, by microsecond bucket.
    delays: DelayHistogram,
}

/// `--exit-after SECONDS`: lets a profiler see a clean exit.
fn exit_after(args: &[String]) -> Option<Duration> {
    match args {
        [flag, seconds] if flag == "--exit-after" => Some(Duration::from_secs(
            seconds.parse().expect("--exit-after takes seconds"),
        )),
        _ => None,
    }
}

fn serve(variant: &str, exit_after: Option<Duration>) {
    // The multi-thread scheduler, as under `#[tokio::main]`, with a single worker thread unless
    // `WORKERS` says otherwise (`benches/futex.sh` runs two).
    let workers = std::env::var("WORKERS")
        .ok()
        .and_then(|workers| workers.parse().ok())
        .unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(async {
        let app = app(variant);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port on 127.0.0.1");
        println!("{}", listener.local_addr().expect("a local address"));
        let server = async move {
            if variant.starts_with("after-outer") {
                // Around the whole router: `axum::serve` wants an axum `Body`, so the body is
                // boxed once, here, instead of by `Router::layer`.
                let service = tower::ServiceBuilder::new()
                    .map_response(|response: http::Response<_>| response.map(axum::body::Body::new))
                    .layer(AfterLayer::new())
                    .service(app);
                let service =
                    axum::ServiceExt::<axum::extract::Request>::into_make_service(service);
                axum::serve(listener, service).await
            } else {
                axum::serve(listener, app).await
            }
        };
        let stop = async move {
            match exit_after {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            served = server => served.expect("the server runs"),
            () = stop => {}
        }
    });
    // Return at once, without waiting for open connections: a profiler sees a clean exit.
    runtime.shutdown_background();
}

fn app(variant: &str) -> Router {
    let probe: &'static Probe = &PROBE;
    async fn hello() -> &'static str {
        "Hello, World!"
    }
    async fn stats() -> String {
        let probe = &*PROBE;
        let tasks = probe.tasks.get().map(|tasks| {
            let stats = tasks.stats();
            format!(
                "scheduled {}\ncompleted {}\ntimed_out {}\ncancelled {}\nshed {}\npending {}\n",
                stats.scheduled(),
                stats.completed(),
                stats.timed_out(),
                stats.cancelled(),
                stats.shed(),
                tasks.pending()
            )
        });
        format!(
            "ran {}\npeak_rss_kib {}\ncpu_ticks {}\n{}{}",
            probe.ran.load(Ordering::Relaxed),
            peak_rss_kib(),
            cpu_ticks(),
            probe.delays.render(),
            tasks.unwrap_or_default()
        )
    }
    // The same work as the floor's spawned task: one atomic increment.
    async fn after_callback(later: After) -> &'static str {
        later.run(async {
            PROBE.ran.fetch_add(1, Ordering::Relaxed);
        });
        "Hello, World!"
    }
    // For the delay phase only: the callback also reads the clock.
    async fn after_delay(later: After) -> &'static str {
        later.run_with(|ctx| async move {
            PROBE.delays.record(ctx.outcome().finished_at().elapsed());
            PROBE.ran.fetch_add(1, Ordering::Relaxed);
        });
        "Hello, World!"
    }
    async fn spawn() -> &'static str {
        tokio::spawn(async {
            PROBE.ran.fetch_add(1, Ordering::Relaxed);
        });
        "Hello, World!"
    }
    async fn after_sleep(later: After) -> &'static str {
        later.run(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            PROBE.ran.fetch_add(1, Ordering::Relaxed);
        });
        "Hello, World!"
    }
    /// What a user would write instead of the crate: tower-http's `on_eos` spawning the work.
    fn eos_spawn(router: Router, sleep: bool) -> Router {
        router.layer(TraceLayer::new_for_http().on_eos(
            move |_: Option<&http::HeaderMap>, _: Duration, _: &tracing::Span| {
                tokio::spawn(async move {
                    if sleep {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    PROBE.ran.fetch_add(1, Ordering::Relaxed);
                });
            },
        ))
    }
    async fn spawn_sleep() -> &'static str {
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            PROBE.ran.fetch_add(1, Ordering::Relaxed);
        });
        "Hello, World!"
    }

    let stats_route = Router::new().route("/__stats", get(stats));
    let route = |handler| Router::new().route("/", handler);
    let router = match variant {
        "bare" => route(get(hello)),
        // What `Router::layer` costs whatever the layer does: the floor under any layer's ratio.
        "noop-layer" => route(get(hello)).layer(tower::util::MapRequestLayer::new(
            std::convert::identity::<axum::extract::Request>,
        )),
        "trace-eos" => route(get(hello)).layer(TraceLayer::new_for_http().on_eos(
            |_: Option<&http::HeaderMap>, latency: Duration, _: &tracing::Span| {
                std::hint::black_box(latency);
            },
        )),
        "after" => route(get(hello)).layer(AfterLayer::new()),
        "after-outer" => route(get(hello)),
        "after-outer-callback" => route(get(after_callback)),
        "after-hook" => {
            route(get(hello)).layer(AfterLayer::new().after_each(move |ctx| async move {
                probe.delays.record(ctx.outcome().finished_at().elapsed());
                probe.ran.fetch_add(1, Ordering::Relaxed);
            }))
        }
        "eos-spawn" => eos_spawn(route(get(hello)), false),
        "eos-spawn-sleep" => eos_spawn(route(get(hello)), true),
        "after-callback" => route(get(after_callback)).layer(AfterLayer::new()),
        "after-run-to-end" => route(get(after_callback))
            .layer(tower_after::RunToEndLayer::new())
            .layer(AfterLayer::new()),
        "after-delay" => route(get(after_delay)).layer(AfterLayer::new()),
        "spawn" => route(get(spawn)),
        "after-sleep" => route(get(after_sleep)).layer(AfterLayer::new()),
        "spawn-sleep" => route(get(spawn_sleep)),
        "after-sleep-limit" => {
            let layer = AfterLayer::new().concurrency_limit(64);
            let _ = probe.tasks.set(layer.tasks());
            route(get(after_sleep)).layer(layer)
        }
        other => panic!("unknown variant {other:?}"),
    };
    router.merge(stats_route)
}

/// Counts of delays by power-of-two microsecond bucket: bucket `i` holds delays below `2^i` µs.
struct DelayHistogram([AtomicU64; 32]);

impl Default for DelayHistogram {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl DelayHistogram {
    fn record(&self, delay: Duration) {
        let micros = delay.as_micros().min(u128::from(u32::MAX)) as u32;
        let bucket = (32 - micros.leading_zeros()) as usize;
        self.0[bucket.min(31)].fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self) -> String {
        let counts: Vec<String> = self
            .0
            .iter()
            .map(|count| count.load(Ordering::Relaxed).to_string())
            .collect();
        format!("delays {}\n", counts.join(" "))
    }
}

/// CPU time of this process, user and system, in clock ticks (1/100 s on Linux).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces:
    // utime and stime are the 14th and 15th fields of the line.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<u64>().ok())
    };
    field(11).unwrap_or(0) + field(12).unwrap_or(0)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The open-loop client for the delay measurement

/// `drive ADDRESS RATE SECONDS`: sends GET / at a fixed total rate over 16 connections.
fn drive(args: &[String]) {
    let address: SocketAddr = args[0].parse().expect("an address");
    let rate: f64 = args[1].parse().expect("a rate");
    let seconds: u64 = args[2].parse().expect("seconds");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(async move {
        const CONNECTIONS: usize = 16;
        let period = Duration::from_secs_f64(CONNECTIONS as f64 / rate);
        let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for connection in 0..CONNECTIONS {
            tasks.spawn(async move {
                let stream = tokio::net::TcpStream::connect(address)
                    .await
                    .expect("connect");
                let io = hyper_util::rt::TokioIo::new(stream);
                let (mut sender, conn) = hyper::client::conn::http1::handshake::<
                    _,
                    http_body_util::Empty<bytes::Bytes>,
                >(io)
                .await
                .expect("handshake");
                tokio::spawn(conn);
                let start = tokio::time::Instant::now()
                    + period.mul_f64(connection as f64 / CONNECTIONS as f64);
                let mut ticks = tokio::time::interval_at(start, period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while tokio::time::Instant::now() < end {
                    ticks.tick().await;
                    let request = http::Request::get("/")
                        .header("host", "localhost")
                        .body(http_body_util::Empty::new())
                        .expect("a request");
                    let response = sender.send_request(request).await.expect("a response");
                    http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .expect("a body");
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    });
}

// ---------------------------------------------------------------------------------------------
// The orchestrator

struct Options {
    rounds: usize,
    seconds: u64,
    only: Option<Vec<String>>,
}

fn options(args: &[String]) -> Options {
    let mut options = Options {
        rounds: 5,
        seconds: 5,
        only: None,
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--rounds" => options.rounds = value().parse().expect("--rounds takes a number"),
            "--seconds" => options.seconds = value().parse().expect("--seconds takes a number"),
            "--only" => options.only = Some(value().split(',').map(str::to_owned).collect()),
            other => panic!("unknown option {other:?}; see the top of examples/loadtest.rs"),
        }
    }
    options
}

struct Server {
    child: Child,
    address: SocketAddr,
}

impl Server {
    fn start(variant: &str) -> Self {
        let exe = std::env::current_exe().expect("the path of this program");
        // One worker pinned to CPU 0, or with `WORKERS=2`, two workers on both CPUs (which
        // `wrk` then shares): the contention one pinned core hides.
        let cpus = if std::env::var("WORKERS").is_ok_and(|workers| workers != "1") {
            "0,1"
        } else {
            "0"
        };
        let mut child = Command::new("taskset")
            .args(["-c", cpus])
            .arg(exe)
            .args(["serve", variant])
            .stdout(Stdio::piped())
            .spawn()
            .expect("taskset (util-linux) to start the server on CPU 0");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("the server's address");
        let address = line.trim().parse().expect("the server prints its address");
        Self { child, address }
    }

    fn stats(&self) -> BTreeMap<String, String> {
        let mut stream = TcpStream::connect(self.address).expect("connect for stats");
        write!(
            stream,
            "GET /__stats HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
        )
        .expect("ask for stats");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read stats");
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        body.lines()
            .filter_map(|line| line.split_once(' '))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    peak_rss_kib: f64,
    /// Server CPU time (user and system) per request, in microseconds.
    cpu_us: f64,
}

/// Throughput, p50 and p99 (ms), and the number of requests.
fn wrk(address: SocketAddr, seconds: u64) -> (f64, f64, f64, f64) {
    let output = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1", "-c64"])
        .arg(format!("-d{seconds}s"))
        .arg("--latency")
        .arg(format!("http://{address}/"))
        .output()
        .expect("wrk to run (install it with `apt-get install wrk`, or run benches/load.sh)");
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |prefix: &str| -> Option<&str> {
        let line = text
            .lines()
            .find(|line| line.trim_start().starts_with(prefix))?;
        line.split_whitespace().nth(1)
    };
    let throughput = field("Requests/sec:")
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no throughput in wrk's output:\n{text}"));
    let latency = |prefix| field(prefix).map_or(f64::NAN, parse_wrk_duration);
    let requests = text
        .lines()
        .find(|line| line.contains("requests in"))
        .and_then(|line| line.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    (throughput, latency("50%"), latency("99%"), requests)
}

/// wrk prints `812.00us`, `1.23ms` or `2.01s`; in milliseconds.
fn parse_wrk_duration(text: &str) -> f64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        _ => f64::NAN,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

fn orchestrate(args: &[String]) {
    let options = options(args);
    for tool in ["wrk", "taskset"] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        assert!(
            found,
            "`{tool}` is missing: install it with `apt-get install wrk util-linux`, or run benches/load.sh"
        );
    }
    let variants: Vec<&str> = VARIANTS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| {
            options
                .only
                .as_ref()
                .is_none_or(|only| only.iter().any(|o| o == name))
        })
        .collect();
    let workers = std::env::var("WORKERS").unwrap_or_else(|_| "1".to_owned());
    let placement = if workers == "1" {
        "server on CPU 0 (1 worker thread)"
    } else {
        "server on CPUs 0-1 (WORKERS worker threads)"
    };
    println!(
        "{} variants x {} rounds x {} s; {}, wrk on CPU 1",
        variants.len(),
        options.rounds,
        options.seconds,
        placement.replace("WORKERS", &workers)
    );

    let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    for round in (0..options.rounds).filter(|_| !variants.is_empty()) {
        // Rotate the order, so that no variant always runs first or last.
        let mut order = variants.clone();
        order.rotate_left(round % variants.len());
        for variant in order {
            let server = Server::start(variant);
            wrk(server.address, 1); // warm up
            let ticks = |stats: &BTreeMap<String, String>| -> f64 {
                stats
                    .get("cpu_ticks")
                    .and_then(|value| value.parse().ok())
                    .unwrap_or(f64::NAN)
            };
            let before = ticks(&server.stats());
            let (throughput, p50_ms, p99_ms, requests) = wrk(server.address, options.seconds);
            let stats = server.stats();
            let cpu_us = (ticks(&stats) - before) * 10_000.0 / requests;
            let peak_rss_kib = stats
                .get("peak_rss_kib")
                .and_then(|value| value.parse().ok())
                .unwrap_or(f64::NAN);
            eprintln!(
                "round {} {variant:<18} {throughput:>10.0} req/s  p50 {p50_ms:>7.3} ms  p99 {p99_ms:>7.3} ms  cpu {cpu_us:>6.2} us/req",
                round + 1
            );
            runs.entry(variant).or_default().push(Run {
                throughput,
                p50_ms,
                p99_ms,
                peak_rss_kib,
                cpu_us,
            });
        }
    }

    println!(
        "\n| variant | req/s (median) | p50 ms | p99 ms | server CPU µs / request | peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, label) in VARIANTS {
        let Some(list) = runs.get(name) else { continue };
        let pick = |f: fn(&Run) -> f64| median(&mut list.iter().map(f).collect::<Vec<_>>());
        println!(
            "| {label} | {:.0} | {:.3} | {:.3} | {:.2} | {:.1} |",
            pick(|run| run.throughput),
            pick(|run| run.p50_ms),
            pick(|run| run.p99_ms),
            pick(|run| run.cpu_us),
            pick(|run| run.peak_rss_kib) / 1024.0,
        );
    }

    // Besides the ratios of what wrk saw, the same ratio of the server's CPU cost: the inverse
    // ratio of CPU time per request, the throughput each variant would reach on a CPU of its
    // own. Other tenants of a shared machine disturb it far less than wall-clock figures.
    println!("\n| ratio | per round | median | median, by server CPU per request | target |");
    println!("|---|---|---:|---:|---|");
    for (variant, baseline, metric, target) in RATIOS {
        let (Some(a), Some(b)) = (runs.get(variant), runs.get(baseline)) else {
            continue;
        };
        let value = |run: &Run| match metric {
            Metric::Throughput => run.throughput,
            Metric::P99 => run.p99_ms,
        };
        let mut per_round: Vec<f64> = a.iter().zip(b).map(|(a, b)| value(a) / value(b)).collect();
        let mut by_cpu: Vec<f64> = a.iter().zip(b).map(|(a, b)| b.cpu_us / a.cpu_us).collect();
        let listed: Vec<String> = per_round
            .iter()
            .map(|ratio| format!("{ratio:.3}"))
            .collect();
        let what = match metric {
            Metric::Throughput => "throughput",
            Metric::P99 => "p99 latency",
        };
        println!(
            "| {what} {variant} / {baseline} | {} | {:.3} | {} | {target} |",
            listed.join(" "),
            median(&mut per_round),
            match metric {
                Metric::Throughput => format!("{:.3}", median(&mut by_cpu)),
                Metric::P99 => "".to_owned(),
            }
        );
    }

    if variants.contains(&"after-callback") {
        if let Some(list) = runs.get("after-callback") {
            let saturating = median(&mut list.iter().map(|run| run.throughput).collect::<Vec<_>>());
            delay_phase(saturating / 2.0, options.seconds.max(5));
        }
    }
    if options
        .only
        .as_ref()
        .is_none_or(|only| only.iter().any(|o| o == "overload"))
    {
        overload_phase();
    }
}

/// 50 ms callbacks under `concurrency_limit(64)` at full load for 8 s: far more arrive than
/// run, and what waits must stay bounded (`AfterLayer::max_pending`, 10,000 by default).
/// Reports peak memory against the no-callback variant under the same load, throughput against
/// the one-sleeping-callback variant without a limit, and the accounting once all has ended.
fn overload_phase() {
    let peak = |server: &Server| -> f64 {
        let stats = server.stats();
        stats
            .get("peak_rss_kib")
            .and_then(|value| value.parse().ok())
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    let baseline = Server::start("after");
    let (baseline_rate, ..) = wrk(baseline.address, 8);
    let baseline_rss = peak(&baseline);
    drop(baseline);
    let unlimited = Server::start("after-sleep");
    let (unlimited_rate, ..) = wrk(unlimited.address, 8);
    drop(unlimited);

    let server = Server::start("after-sleep-limit");
    let (rate, _, p99_ms, _) = wrk(server.address, 8);
    let overloaded_rss = peak(&server);
    // Let what was accepted drain: 10,000 callbacks of 50 ms, 64 at a time, take about 8 s.
    let mut stats = server.stats();
    for _ in 0..600 {
        if stats.get("pending").map(String::as_str) == Some("0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        stats = server.stats();
    }
    let count = |key: &str| -> u64 { stats.get(key).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let (scheduled, completed, shed) = (count("scheduled"), count("completed"), count("shed"));
    let (cancelled, timed_out, pending) =
        (count("cancelled"), count("timed_out"), count("pending"));
    println!(
        "\nOverload, 8 s at full load, 50 ms callbacks, limit 64: {rate:.0} req/s (p99 {p99_ms:.1} ms) \
         vs {unlimited_rate:.0} without the limit and {baseline_rate:.0} without callbacks; \
         peak RSS {overloaded_rss:.1} MiB vs {baseline_rss:.1} MiB without callbacks \
         (+{:.1} MiB; bound: +64 MiB)",
        overloaded_rss - baseline_rss
    );
    println!(
        "scheduled {scheduled} = completed {completed} + shed {shed} + cancelled {cancelled} \
         + timed out {timed_out} + pending {pending}: {}",
        if scheduled == completed + shed + cancelled + timed_out + pending {
            "holds"
        } else {
            "DOES NOT HOLD"
        }
    );
}

/// Drives the one-callback variant at `rate` and reports the callback start delay.
fn delay_phase(rate: f64, seconds: u64) {
    let server = Server::start("after-delay");
    let exe = std::env::current_exe().expect("the path of this program");
    let status = Command::new("taskset")
        .args(["-c", "1"])
        .arg(exe)
        .args([
            "drive",
            &server.address.to_string(),
            &rate.to_string(),
            &seconds.to_string(),
        ])
        .status()
        .expect("the open-loop client");
    assert!(status.success(), "the open-loop client failed");
    let stats = server.stats();
    let counts: Vec<u64> = stats
        .get("delays")
        .map(|line| {
            line.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let total: u64 = counts.iter().sum();
    let percentile = |p: f64| {
        let wanted = (total as f64 * p).ceil() as u64;
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= wanted {
                return 1_u64 << bucket;
            }
        }
        u64::MAX
    };
    println!(
        "\nCallback start delay at {rate:.0} req/s (half the saturating rate), {total} callbacks: \
         p50 < {} us, p99 < {} us, p99.9 < {} us (power-of-two buckets; target: p99 < 100 us)",
        percentile(0.50),
        percentile(0.99),
        percentile(0.999),
    );
}
