//! Run with
//!
//! ```not_rust
//! cargo run --example tower --no-default-features
//! ```
//!
//! then `curl http://127.0.0.1:3000/`.
//!
//! Without axum: a plain Tower service served by hyper. The crate builds without its `axum`
//! feature; the request's `After` handle is in the request extensions.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::{service_fn, ServiceBuilder};
use tower_after::{After, AfterLayer};

async fn hello(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // `AfterLayer` put the handle there.
    if let Some(later) = request.extensions().get::<After>() {
        later.run_with(|ctx| async move {
            tracing::info!(
                method = %ctx.request().method(),
                path = ctx.request().uri().path(),
                status = ctx.outcome().status().map(|status| status.as_u16()),
                "after response"
            );
        });
    }
    Ok(Response::new(Full::new(Bytes::from_static(
        b"Hello from Tower and hyper!\n",
    ))))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let service = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(hello));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let service = TowerToHyperService::new(service.clone());
                connections.spawn(async move {
                    let served = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(error) = served {
                        tracing::debug!("connection ended: {error}");
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Stop accepting, let open connections finish, then drain the callbacks.
    connections.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), connections.wait()).await;
    let report = tasks.shutdown(Duration::from_secs(10)).await;
    tracing::info!(
        completed = report.completed(),
        cancelled = report.cancelled(),
        "bye"
    );
    Ok(())
}
