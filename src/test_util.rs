//! Helpers for the unit tests: a service that records what its callbacks saw, bodies with
//! awkward endings; and those every test shares (`tests/support/common.rs`).

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/common.rs"]
mod common;

pub(crate) use common::{ask_every_subscriber, eventually, fail, settle, Logs};

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tower::{service_fn, Layer, Service, ServiceExt};

use crate::{After, AfterLayer, AfterTasks, Outcome};

/// Outcomes seen by callbacks, in the order they ran.
#[derive(Clone, Default)]
pub(crate) struct Seen(Arc<Mutex<Vec<Outcome>>>);

impl Seen {
    pub(crate) fn record(&self, outcome: Outcome) {
        self.0.lock().unwrap().push(outcome);
    }

    pub(crate) fn all(&self) -> Vec<Outcome> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until exactly one outcome was recorded, and returns it.
    pub(crate) async fn one(&self) -> Outcome {
        eventually("a callback to run", || !self.all().is_empty()).await;
        // Give a second run, which would be a bug, a chance to show up.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let all = self.all();
        assert_eq!(all.len(), 1, "callbacks ran {} times: {all:?}", all.len());
        all[0]
    }
}

/// A service behind `AfterLayer` that registers one callback recording its outcome, then
/// answers with `respond()`.
pub(crate) fn recording<B, F>(
    layer: &AfterLayer,
    seen: &Seen,
    respond: F,
) -> impl Service<Request<()>, Response = Response<crate::AfterBody<B>>, Error = Infallible>
where
    B: Body,
    F: Fn() -> Response<B> + Clone,
{
    let seen = seen.clone();
    layer.layer(service_fn(move |request: Request<()>| {
        let seen = seen.clone();
        let respond = respond.clone();
        async move {
            let after = request.extensions().get::<After>().unwrap().clone();
            after.run_with(move |ctx| async move { seen.record(*ctx.outcome()) });
            Ok::<_, Infallible>(respond())
        }
    }))
}

/// A body that yields its chunks, then an error if asked to, then never ends if asked to.
/// It never claims `is_end_stream()` on its own, but may announce an exact length, like bodies
/// after which hyper stops polling.
pub(crate) struct TestBody {
    chunks: Vec<Bytes>,
    then: Then,
    exact: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Then {
    End,
    Error,
    Pending,
    /// A trailers frame with `grpc-status: 0`, then the end.
    Trailers,
}

impl TestBody {
    pub(crate) fn new(chunks: &[&'static str], then: Then) -> Self {
        Self {
            chunks: chunks
                .iter()
                .rev()
                .map(|c| Bytes::from_static(c.as_bytes()))
                .collect(),
            then,
            exact: None,
        }
    }

    pub(crate) fn exact(mut self) -> Self {
        self.exact = Some(self.chunks.iter().map(|c| c.len() as u64).sum());
        self
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(chunk) = self.chunks.pop() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match self.then {
            Then::End => Poll::Ready(None),
            Then::Error => {
                self.then = Then::End;
                Poll::Ready(Some(Err(io::Error::other("broken body"))))
            }
            Then::Pending => Poll::Pending,
            Then::Trailers => {
                self.then = Then::End;
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(exact) => SizeHint::with_exact(exact),
            None => SizeHint::default(),
        }
    }
}

/// Serves one request through `layer` with a handler that registers work with `register`,
/// and reads the response to its end.
pub(crate) async fn serve(layer: &AfterLayer, register: impl FnOnce(After) + Send + 'static) {
    let register = Mutex::new(Some(register));
    let service = layer.layer(service_fn(move |request: Request<()>| {
        let after = request.extensions().get::<After>().unwrap().clone();
        (register.lock().unwrap().take().unwrap())(after);
        async { Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new())) }
    }));
    let path = Request::builder().uri("/orders/7").body(()).unwrap();
    let response = service.oneshot(path).await.unwrap();
    response.into_body().collect().await.unwrap();
}

pub(crate) async fn drained(tasks: &AfterTasks) {
    eventually("no pending callbacks", || tasks.pending() == 0).await;
}
