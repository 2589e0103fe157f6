//! Shared helpers for the tests against a real server on 127.0.0.1.
#![allow(dead_code, unreachable_pub)]

mod common;

pub use common::*;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower_after::{AfterContext, Completion};

/// Serves `app` on a free port of 127.0.0.1 until the test's runtime ends.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

/// An HTTP/1.1 client with a connection pool.
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `GET path` (or another method) and reads the whole body.
pub async fn fetch(address: SocketAddr, method: &str, path: &str) -> (http::StatusCode, Bytes) {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{address}{path}"))
        .body(Empty::new())
        .unwrap();
    let response = client().request(request).await.unwrap();
    let status = response.status();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// What one callback saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    pub id: Option<String>,
    pub session: Option<String>,
    pub status: Option<u16>,
    pub completion: Completion,
    pub body_bytes: u64,
}

impl Seen {
    pub fn from_context(ctx: &AfterContext) -> Self {
        let request = ctx.request();
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            path: request.uri().path().to_owned(),
            id: header("x-id"),
            session: request.cookie("session-id").map(str::to_owned),
            status: ctx.outcome().status().map(|status| status.as_u16()),
            completion: ctx.outcome().completion(),
            body_bytes: ctx.outcome().body_bytes(),
        }
    }
}

/// Every callback run, in the order they ran.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<Seen>>>);

impl Journal {
    pub fn push(&self, seen: Seen) {
        self.0.lock().unwrap().push(seen);
    }

    pub fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    pub fn for_path(&self, path: &str) -> Vec<Seen> {
        self.all()
            .into_iter()
            .filter(|seen| seen.path == path)
            .collect()
    }

    /// Waits until `path` has `count` entries, gives extra runs a moment to show up, and
    /// returns them.
    pub async fn wait_for(&self, path: &str, count: usize) -> Vec<Seen> {
        eventually(&format!("{count} callbacks for {path}"), || {
            self.for_path(path).len() >= count
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = self.for_path(path);
        assert_eq!(seen.len(), count, "callbacks for {path}: {seen:#?}");
        seen
    }
}
