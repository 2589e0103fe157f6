//! Nothing a client sends can panic the layer or confuse a callback: arbitrary header and cookie
//! bytes (not UTF-8, huge, numerous, duplicated, malformed) through the layer, and the extremes
//! through a real server.
#![cfg(feature = "axum")]

mod support;

use std::convert::Infallible;
use std::sync::mpsc;

use axum::routing::get;
use axum::Router;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{service_fn, Layer, ServiceExt};
use tower_after::{After, AfterLayer, SnapshotConfig};

const NEEDLE: &str = "ZZneedleZZ";

/// What a callback could read from a request's snapshot.
#[derive(Debug)]
struct Read {
    needle: Option<String>,
    cookies: usize,
    headers: usize,
    debug: String,
}

/// Runs `request` through a default layer and returns what its callback read.
fn read_through_layer(request: Request<()>) -> Read {
    read_through(AfterLayer::new(), request)
}

/// Runs `request` through `layer` and returns what its callback read.
fn read_through(layer: AfterLayer, request: Request<()>) -> Read {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    runtime.block_on(async move {
        let service = layer.layer(service_fn(move |request: Request<()>| {
            let tx = tx.clone();
            request
                .extensions()
                .get::<After>()
                .unwrap()
                .run_with(move |ctx| async move {
                    let snapshot = ctx.request();
                    let read = Read {
                        needle: snapshot.cookie(NEEDLE).map(str::to_owned),
                        cookies: snapshot.cookies().count(),
                        headers: snapshot.headers().len(),
                        debug: format!("{snapshot:?}"),
                    };
                    let _ = snapshot.header("cookie");
                    let _ = snapshot.uri().path();
                    tx.send(read).unwrap();
                });
            async { Ok::<_, Infallible>(Response::new(Empty::<bytes::Bytes>::new())) }
        }));
        let response = service.oneshot(request).await.unwrap();
        response.into_body().collect().await.unwrap();
        tokio::task::yield_now().await;
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("the callback ran")
}

/// Bytes a header value may hold (anything but controls other than tab).
fn value_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            Just(b'='),
            Just(b';'),
            Just(b' '),
            Just(b'"'),
            b'a'..=b'z',
            0x80_u8..=0xff,
            0x21_u8..=0x7e,
        ],
        0..max,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn arbitrary_cookie_bytes_never_hide_a_well_formed_pair(
        junk in prop::collection::vec(value_bytes(40), 0..30),
        position in 0_usize..30,
        extra_headers in prop::collection::vec(value_bytes(60), 0..5),
        split_into_two_headers in any::<bool>(),
    ) {
        // Junk segments, with the needle somewhere among them, each on its own `;`.
        let mut segments: Vec<Vec<u8>> = junk
            .into_iter()
            // A junk segment may not itself be, or start, a pair called like the needle.
            .map(|segment| segment.into_iter().filter(|byte| *byte != b'Z').collect())
            .collect();
        let at = position.min(segments.len());
        segments.insert(at, format!("{NEEDLE}=found").into_bytes());
        let mut builder = Request::get("/");
        if split_into_two_headers && segments.len() > 1 {
            let tail = segments.split_off(segments.len() / 2);
            builder = builder.header("cookie", HeaderValue::from_bytes(&segments.join(&b';')).unwrap());
            builder = builder.header("cookie", HeaderValue::from_bytes(&tail.join(&b';')).unwrap());
        } else {
            builder = builder.header("cookie", HeaderValue::from_bytes(&segments.join(&b';')).unwrap());
        }
        for (index, value) in extra_headers.iter().enumerate() {
            builder = builder.header(format!("x-junk-{index}"), HeaderValue::from_bytes(value).unwrap());
        }
        let read = read_through_layer(builder.body(()).unwrap());
        prop_assert_eq!(read.needle.as_deref(), Some("found"));
        prop_assert!(read.cookies >= 1);
        prop_assert!(read.headers > extra_headers.len(), "the cookie header and every extra one");
        // Cookies are credentials: `Debug` names the header but hides its value.
        prop_assert!(read.debug.contains("cookie"));
        prop_assert!(!read.debug.contains(NEEDLE), "{}", read.debug);
    }
}

#[test]
fn ten_thousand_pairs_and_a_64_kib_value() {
    let mut cookie = String::new();
    for index in 0..10_000 {
        cookie.push_str(&format!("pair{index}=value{index}; "));
    }
    // Duplicates, an empty name, stray separators, then the pair to find.
    cookie.push_str("pair1=again; =no-name; ;;==; x=a=b; ");
    cookie.push_str(&format!("{NEEDLE}=found"));
    let huge = "v".repeat(64 * 1024);
    let request = Request::get("/")
        .header("cookie", cookie)
        .header("cookie", format!("huge={huge}"))
        .header("x-huge", huge.as_str())
        .body(())
        .unwrap();
    // Beyond the default cap of a snapshot: this checks the cookie parser, not the cap.
    let uncapped = AfterLayer::new().snapshot(SnapshotConfig::new().max_bytes(usize::MAX));
    let read = read_through(uncapped, request);
    assert_eq!(read.needle.as_deref(), Some("found"));
    // 10,000 pairs, the duplicate, `x=a=b`, the needle and `huge`.
    assert_eq!(read.cookies, 10_000 + 4);
}

#[tokio::test]
async fn a_real_server_survives_hostile_requests() {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = Router::new()
        .route(
            "/",
            get(|after: After| async move {
                after.run_with(|ctx| async move {
                    let _ = ctx.request().cookies().count();
                    let _ = format!("{:?}", ctx.request());
                });
                "ok"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;

    let pairs: String = (0..10_000).map(|i| format!("k{i}=v{i};")).collect();
    let hostile: Vec<Vec<u8>> = vec![
        b"cookie: a=\xff\xfe; b=\xc3\x28; =; ;;\r\n".to_vec(),
        format!("cookie: big={}\r\n", "x".repeat(64 * 1024)).into_bytes(),
        format!("cookie: {pairs}\r\n").into_bytes(),
        b"x-bytes: \x80\x81\x82\r\ncookie: only-a-name\r\n".to_vec(),
    ];
    for headers in hostile {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut request = b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n".to_vec();
        request.extend_from_slice(&headers);
        request.extend_from_slice(b"\r\n");
        stream.write_all(&request).await.unwrap();
        let mut response = Vec::new();
        support::within("a response", stream.read_to_end(&mut response))
            .await
            .unwrap();
        let status_line = String::from_utf8_lossy(&response)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        // Either served or refused (a header too large for the server), never a dead server.
        assert!(
            status_line.starts_with("HTTP/1.1 200") || status_line.starts_with("HTTP/1.1 431"),
            "{status_line:?}"
        );
    }
    // The server is still serving, and every callback ended.
    let (status, _) = support::fetch(address, "GET", "/").await;
    assert_eq!(status, http::StatusCode::OK);
    support::eventually("callbacks to end", || tasks.pending() == 0).await;
    assert_eq!(tasks.stats().panicked(), 0);
}

#[tokio::test]
async fn large_headers_through_a_real_server_pin_no_more_than_the_bound() {
    // Every response keeps its snapshot while its hook waits.
    let (release, released) = tokio::sync::watch::channel(());
    let layer = AfterLayer::new()
        .max_held_bytes(1024 * 1024)
        .after_each(move |_| {
            let mut released = released.clone();
            async move {
                let _ = released.changed().await;
            }
        });
    let tasks = layer.tasks();
    let address = support::serve(Router::new().layer(layer)).await;
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let send =
        |value: &str| format!("GET / HTTP/1.1\r\nhost: localhost\r\nx-large: {value}\r\n\r\n");
    // Beyond a snapshot's cap of 16 KiB: cut, and marked; under it: kept, until the bound.
    let (huge, large) = ("h".repeat(64 * 1024), "l".repeat(15 * 1024));
    for value in [huge.as_str(); 50].into_iter().chain([large.as_str(); 100]) {
        stream.write_all(send(value).as_bytes()).await.unwrap();
        read_head(&mut stream).await;
    }
    support::eventually("every hook to be registered or shed", || {
        let stats = tasks.stats();
        stats.scheduled() == 150
    })
    .await;
    let stats = tasks.stats();
    assert_eq!(stats.truncated(), 50);
    assert!(stats.held_bytes() <= 1024 * 1024, "{stats:?}");
    // About 66 snapshots of 15 KiB fit in 1 MiB: the rest were shed.
    assert!((30..=40).contains(&stats.shed()), "{stats:?}");
    assert_eq!(tasks.pending() + stats.shed(), 150);
    drop(release);
    support::eventually("the hooks to end", || tasks.pending() == 0).await;
    support::eventually("the snapshots to be released", || {
        tasks.stats().held_bytes() == 0
    })
    .await;
}

/// Reads one response head (the responses here have no body).
async fn read_head(stream: &mut tokio::net::TcpStream) {
    let mut seen = Vec::new();
    let mut buffer = [0_u8; 1024];
    while !seen.windows(4).any(|window| window == b"\r\n\r\n") {
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(20), stream.read(&mut buffer))
                .await
                .expect("a response")
                .unwrap();
        assert!(read > 0, "the server closed the connection");
        seen.extend_from_slice(&buffer[..read]);
    }
}
