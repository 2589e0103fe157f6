//! What `AfterLayer` costs per request, per callback and per body frame, next to the bare
//! service and to tower-http's `TraceLayer` end-of-stream hook.
//!
//! Run with
//!
//! ```not_rust
//! cargo bench --bench overhead
//! ```
//!
//! Each request goes through the stack with `oneshot` and its body is collected; the runtime is
//! given a turn after each one, so callbacks run inside the measurement.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use tower_after::{After, AfterLayer};
use tower_http::trace::TraceLayer;

type RequestBody = Empty<Bytes>;

fn request() -> Request<RequestBody> {
    Request::get("/")
        .header("host", "localhost")
        .header("user-agent", "bench/1.0")
        .header("cookie", "session-id=abc123; theme=dark")
        .body(Empty::new())
        .unwrap()
}

/// A handler that registers `callbacks` no-op callbacks (when under the layer) and says hello.
fn handler(
    callbacks: usize,
) -> impl Service<Request<RequestBody>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
{
    service_fn(move |request: Request<RequestBody>| {
        if let Some(after) = request.extensions().get::<After>() {
            for _ in 0..callbacks {
                after.run(async {});
            }
        }
        async { Ok(Response::new(Full::new(Bytes::from_static(b"hello")))) }
    })
}

async fn one<S, B>(service: &S)
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = service.clone().oneshot(request()).await.unwrap();
    black_box(response.into_body().collect().await.unwrap());
    tokio::task::yield_now().await;
}

fn per_request(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("request");
    let layer = AfterLayer::new();

    let bare = handler(0);
    group.bench_function("bare", |b| b.to_async(&runtime).iter(|| one(&bare)));
    let no_callback = layer.layer(handler(0));
    group.bench_function("after, no callback", |b| {
        b.to_async(&runtime).iter(|| one(&no_callback))
    });
    let one_callback = layer.layer(handler(1));
    group.bench_function("after, 1 callback", |b| {
        b.to_async(&runtime).iter(|| one(&one_callback))
    });
    let eight = layer.layer(handler(8));
    group.bench_function("after, 8 callbacks", |b| {
        b.to_async(&runtime).iter(|| one(&eight))
    });
    let trace = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http().on_eos(
            |_: Option<&http::HeaderMap>, latency: Duration, _: &tracing::Span| {
                black_box(latency);
            },
        ))
        .service(handler(0));
    group.bench_function("tower-http TraceLayer on_eos", |b| {
        b.to_async(&runtime).iter(|| one(&trace))
    });
    group.finish();
}

/// An `After` handle of a request whose response is still held, so callbacks only queue.
fn open_request(
    runtime: &tokio::runtime::Runtime,
) -> (After, Response<tower_after::AfterBody<Full<Bytes>>>) {
    let service = AfterLayer::new().layer(service_fn(|request: Request<RequestBody>| {
        let after = request.extensions().get::<After>().unwrap().clone();
        async move {
            let mut response = Response::new(Full::new(Bytes::new()));
            response.extensions_mut().insert(after);
            Ok::<_, Infallible>(response)
        }
    }));
    let response = runtime.block_on(service.oneshot(request())).unwrap();
    let after = response.extensions().get::<After>().unwrap().clone();
    (after, response)
}

fn registration(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let mut group = c.benchmark_group("register one callback");
    group.bench_function("run", |b| {
        b.iter_batched(
            || open_request(&runtime),
            |open| {
                open.0.run(async {});
                open
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("run_with", |b| {
        b.iter_batched(
            || open_request(&runtime),
            |open| {
                open.0.run_with(|ctx| async move {
                    black_box(ctx.outcome());
                });
                open
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn streamed_body(c: &mut Criterion) {
    const FRAME: usize = 16 * 1024;
    const FRAMES: usize = 64;
    static DATA: [u8; FRAME * FRAMES] = [7; FRAME * FRAMES];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let streaming = service_fn(|_: Request<RequestBody>| async {
        let frames = (0..FRAMES).map(|index| {
            let frame = Bytes::from_static(&DATA[index * FRAME..(index + 1) * FRAME]);
            Ok::<_, Infallible>(Frame::data(frame))
        });
        Ok::<_, Infallible>(Response::new(StreamBody::new(futures_util::stream::iter(
            frames,
        ))))
    });
    let mut group = c.benchmark_group("1 MiB body in 16 KiB frames");
    group.throughput(Throughput::Bytes((FRAME * FRAMES) as u64));
    group.bench_function("bare", |b| b.to_async(&runtime).iter(|| one(&streaming)));
    let wrapped = AfterLayer::new().layer(streaming);
    group.bench_function("after", |b| b.to_async(&runtime).iter(|| one(&wrapped)));
    group.finish();
}

criterion_group!(benches, per_request, registration, streamed_body);
criterion_main!(benches);
