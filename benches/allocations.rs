//! Heap allocations per request, and heap held per pending callback, behind a real server.
//!
//! Run with
//!
//! ```not_rust
//! cargo bench --bench allocations
//! ```
//!
//! An axum server on 127.0.0.1 and an HTTP/1.1 client on one keep-alive connection run in this
//! process, on one thread, under `dhat`'s counting allocator. Both sides are counted, so only the
//! differences between variants mean something: what the layer adds to a bare axum request.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;
use tower_after::{After, AfterLayer};

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

const REQUESTS: u64 = 2_000;

async fn connect(app: Router) -> SendRequest<Empty<Bytes>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn get_once(sender: &mut SendRequest<Empty<Bytes>>) {
    let request = http::Request::get("/")
        .header("host", "localhost")
        .header("user-agent", "bench/1.0")
        .header("accept", "*/*")
        .header("cookie", "session-id=abc123; theme=dark")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    response.into_body().collect().await.unwrap();
}

/// Lets the server, the client and any callbacks settle.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Average heap blocks and bytes allocated per request served by `app`.
async fn per_request(app: Router) -> (f64, f64) {
    let mut sender = connect(app).await;
    for _ in 0..200 {
        get_once(&mut sender).await;
    }
    settle().await;
    let before = dhat::HeapStats::get();
    for _ in 0..REQUESTS {
        get_once(&mut sender).await;
        tokio::task::yield_now().await;
    }
    settle().await;
    let after = dhat::HeapStats::get();
    (
        (after.total_blocks - before.total_blocks) as f64 / REQUESTS as f64,
        (after.total_bytes - before.total_bytes) as f64 / REQUESTS as f64,
    )
}

/// Heap held, per request, while each request leaves `future()` pending, beyond the future
/// itself; and the future's own size.
async fn held_per_pending<F, Fut>(future: F) -> (f64, usize)
where
    F: Fn(Arc<Semaphore>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let gate = Arc::new(Semaphore::new(0));
    let own_size = std::mem::size_of_val(&future(gate.clone()));
    let (make, open) = (future.clone(), gate.clone());
    let app = Router::new()
        .route(
            "/",
            get(move |after: After| {
                let (make, open) = (make.clone(), open.clone());
                async move {
                    after.run(make(open));
                    "hello"
                }
            }),
        )
        .layer(AfterLayer::new());
    let mut sender = connect(app).await;
    get_once(&mut sender).await;
    settle().await;
    let before = dhat::HeapStats::get();
    for _ in 0..REQUESTS {
        get_once(&mut sender).await;
    }
    settle().await;
    let after = dhat::HeapStats::get();
    gate.add_permits(Semaphore::MAX_PERMITS / 2);
    settle().await;
    let held = (after.curr_bytes - before.curr_bytes) as f64 / REQUESTS as f64;
    (held - own_size as f64, own_size)
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        async fn hello() -> &'static str {
            "hello"
        }
        async fn one_callback(later: After) -> &'static str {
            later.run(async {});
            "hello"
        }
        let bare = per_request(Router::new().route("/", get(hello))).await;
        // What axum's `Router::layer` costs for any layer: a second boxed route and future.
        let noop = per_request(Router::new().route("/", get(hello)).layer(
            tower::util::MapRequestLayer::new(std::convert::identity::<axum::extract::Request>),
        ))
        .await;
        // The nearest existing tool: tower-http's end-of-stream hook.
        let trace = per_request(Router::new().route("/", get(hello)).layer(
            tower_http::trace::TraceLayer::new_for_http().on_eos(
                |_: Option<&http::HeaderMap>, latency: std::time::Duration, _: &tracing::Span| {
                    std::hint::black_box(latency);
                },
            ),
        ))
        .await;
        // What a user would write instead: that hook spawning the work.
        let eos_spawn = per_request(Router::new().route("/", get(hello)).layer(
            tower_http::trace::TraceLayer::new_for_http().on_eos(
                |_: Option<&http::HeaderMap>, _: std::time::Duration, _: &tracing::Span| {
                    tokio::spawn(async {});
                },
            ),
        ))
        .await;
        let layered = per_request(
            Router::new()
                .route("/", get(hello))
                .layer(AfterLayer::new()),
        )
        .await;
        let callback = per_request(
            Router::new()
                .route("/", get(one_callback))
                .layer(AfterLayer::new()),
        )
        .await;
        println!("Per request (server and client, one keep-alive connection):");
        println!("{:<28} {:>8} {:>8}", "variant", "blocks", "bytes");
        for (name, (blocks, bytes)) in [
            ("bare axum", bare),
            ("a no-op layer", noop),
            ("TraceLayer with on_eos", trace),
            ("AfterLayer, no callback", layered),
            ("on_eos spawning the work", eos_spawn),
            ("AfterLayer, one callback", callback),
        ] {
            println!("{name:<28} {blocks:>8.2} {bytes:>8.0}");
        }
        println!(
            "Beyond bare axum: no callback {:+.2} blocks, one callback {:+.2} blocks",
            layered.0 - bare.0,
            callback.0 - bare.0
        );
        println!(
            "Beyond a no-op layer: no callback {:+.2} blocks, one callback {:+.2} blocks",
            layered.0 - noop.0,
            callback.0 - noop.0
        );
        println!(
            "Against the floor: no callback {:+.2} blocks beyond TraceLayer, one callback {:+.2} \
             blocks beyond on_eos spawning the work",
            layered.0 - trace.0,
            callback.0 - eos_spawn.0
        );

        let (held, own) = held_per_pending(|gate: Arc<Semaphore>| async move {
            drop(gate.acquire().await);
        })
        .await;
        println!(
            "\nHeld per pending callback, beyond its own future ({own} bytes): {held:.0} bytes"
        );
    });
}
