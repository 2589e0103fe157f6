//! Heap allocations per request, with and without `AfterLayer`.
//!
//! Run with
//!
//! ```not_rust
//! cargo bench --bench allocations
//! ```
//!
//! Counts exact heap blocks and bytes with `dhat`'s counting allocator: one request through an
//! axum router (`oneshot`, body collected), averaged over many requests after a warm-up.

use std::convert::Infallible;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_after::{After, AfterLayer};

#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

const REQUESTS: u64 = 2_000;

fn request() -> Request<Body> {
    Request::get("/")
        .header("host", "localhost")
        .header("user-agent", "bench/1.0")
        .header("accept", "*/*")
        .header("cookie", "session-id=abc123; theme=dark")
        .body(Body::empty())
        .unwrap()
}

/// Average heap blocks and bytes per request served by `app`.
async fn per_request(app: Router) -> (f64, f64) {
    async fn one(app: &Router) -> Result<(), Infallible> {
        let response = app.clone().oneshot(request()).await?;
        response.into_body().collect().await.unwrap();
        Ok(())
    }
    for _ in 0..100 {
        one(&app).await.unwrap();
    }
    tokio::task::yield_now().await;
    let before = dhat::HeapStats::get();
    for _ in 0..REQUESTS {
        one(&app).await.unwrap();
        // Let callbacks run, so their allocations are counted with their request.
        tokio::task::yield_now().await;
    }
    let after = dhat::HeapStats::get();
    (
        (after.total_blocks - before.total_blocks) as f64 / REQUESTS as f64,
        (after.total_bytes - before.total_bytes) as f64 / REQUESTS as f64,
    )
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let bare = per_request(Router::new().route("/", get(|| async { "hello" }))).await;
        let layered = per_request(
            Router::new()
                .route("/", get(|| async { "hello" }))
                .layer(AfterLayer::new()),
        )
        .await;
        let one_callback = per_request(
            Router::new()
                .route(
                    "/",
                    get(|after: After| async move {
                        after.run(async {});
                        "hello"
                    }),
                )
                .layer(AfterLayer::new()),
        )
        .await;
        println!("{:<34} {:>10} {:>10}", "variant", "blocks", "bytes");
        for (name, (blocks, bytes)) in [
            ("bare axum", bare),
            ("AfterLayer, no callback", layered),
            ("AfterLayer, one callback", one_callback),
        ] {
            println!("{name:<34} {blocks:>10.2} {bytes:>10.1}");
        }
        println!(
            "\nbeyond bare axum: no callback {:+.2} blocks, one callback {:+.2} blocks ({:+.0} bytes)",
            layered.0 - bare.0,
            one_callback.0 - bare.0,
            one_callback.1 - bare.1,
        );
    });
}
