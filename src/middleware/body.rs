//! [`AfterBody`]: the response body that notices its own end.
//!
//! The end of a response is not one event. The server may poll the body until it yields `None`,
//! or stop as soon as `is_end_stream()` says it is done (hyper does, once a `Content-Length` is
//! met), or never poll it at all (`HEAD`, `204`, `304`), or drop it half-way because the client
//! left. The body checks for its end after every frame and treats its own drop as the end, so
//! every one of these paths finishes the request exactly once.

use std::fmt;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::time::Instant;

use crate::record::outcome::Completion;
use crate::request::Inflight;
use bytes::Buf;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The response body of [`AfterService`](crate::AfterService): the inner body, unchanged,
    /// plus the bookkeeping that starts the request's callbacks once the body has ended.
    ///
    /// Its frames, size hint and end are the inner body's. Read it to its end, or drop it,
    /// and the request's callbacks start:
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{service_fn, Layer, ServiceExt};
    /// use tower_after::{After, AfterLayer};
    ///
    /// let layer = AfterLayer::new();
    /// let tasks = layer.tasks();
    /// let service = layer.layer(service_fn(|request: Request<()>| async move {
    ///     request.extensions().get::<After>().unwrap().run(async {});
    ///     Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from("hello"))))
    /// }));
    /// let body = service.oneshot(Request::new(())).await.unwrap().into_body();
    /// assert_eq!(tasks.pending(), 1); // waiting for the body's end
    /// assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
    /// tasks.idle().await; // the callback ran
    /// # }
    /// ```
    pub struct AfterBody<B> {
        #[pin]
        inner: B,
        finisher: Finisher,
    }
}

impl<B: Body> AfterBody<B> {
    /// `finisher`: of a response whose body is `inner` ([`Finisher::responded`]).
    pub(crate) fn new(inner: B, mut finisher: Finisher) -> Self {
        if inner.is_end_stream() || finisher.expected == Some(0) {
            finisher.on_drop = Completion::Complete;
        }
        Self { inner, finisher }
    }
}

impl<B: Body> Body for AfterBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        // A panic in the inner body unwinds through here: the server drops this body, and the
        // response failed rather than being left by the client.
        let on_drop = mem::replace(&mut this.finisher.on_drop, Completion::BodyError);
        let polled = this.inner.as_mut().poll_frame(cx);
        this.finisher.on_drop = on_drop;
        let frame = ready!(polled);
        let finisher = this.finisher;
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    finisher.body_bytes += data.remaining() as u64;
                    // All the bytes are out: the server may stop polling and drop the body now,
                    // which then counts as complete. Trailers may still follow, so this is not
                    // the end yet.
                    if finisher
                        .expected
                        .is_some_and(|expected| finisher.body_bytes >= expected)
                    {
                        finisher.on_drop = Completion::Complete;
                    }
                }
                // Trailers are a body's last frame: servers (hyper, over HTTP/1.1 and HTTP/2)
                // send them as the end and drop the body without polling it again. After fewer
                // bytes than announced, the server cannot complete the response.
                if frame.is_trailers() {
                    finisher.finish(if finisher.short() {
                        Completion::BodyError
                    } else {
                        Completion::Complete
                    });
                } else if this.inner.is_end_stream() {
                    finisher.finish(Completion::Complete);
                }
            }
            Some(Err(_)) => finisher.finish(Completion::BodyError),
            // Shorter than its announced length: the server cannot complete the response.
            None if finisher.short() => finisher.finish(Completion::BodyError),
            None => finisher.finish(Completion::Complete),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: fmt::Debug> fmt::Debug for AfterBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AfterBody")
            .field("inner", &self.inner)
            .field("finished", &self.finisher.inflight.is_none())
            .finish()
    }
}

/// Reports the end of a request, exactly once: when told, or when dropped. It exists from
/// before the inner service is called, so that even a panic in a synchronous `call` finishes
/// the request.
pub(crate) struct Finisher {
    /// Taken when the request finishes, so it cannot finish twice.
    inflight: Option<Arc<Inflight>>,
    status: Option<StatusCode>,
    body_bytes: u64,
    /// The body's exact length, if known.
    expected: Option<u64>,
    /// How the request ended if this is dropped now.
    on_drop: Completion,
    /// When the request entered the layer: here, not in the request's state, which pending
    /// callbacks keep alive.
    entered: Instant,
}

impl Finisher {
    /// A finisher for a request whose inner service is about to run: dropped now, it fails.
    pub(crate) fn new(inflight: Arc<Inflight>) -> Self {
        Self {
            inflight: Some(inflight),
            status: None,
            body_bytes: 0,
            expected: None,
            on_drop: Completion::Failed,
            entered: Instant::now(),
        }
    }

    /// Moves the request out, leaving a finisher with nothing to report.
    pub(crate) fn take(&mut self) -> Self {
        Self {
            inflight: self.inflight.take(),
            status: self.status,
            body_bytes: self.body_bytes,
            expected: self.expected,
            on_drop: self.on_drop,
            entered: self.entered,
        }
    }

    /// How the request ends if this is dropped: `Failed` while user code runs (a panic unwinds
    /// through it), `Aborted` while the server waits (the client may leave).
    pub(crate) fn on_drop(&mut self, completion: Completion) {
        self.on_drop = completion;
    }

    /// Records the response's status and how long its body is; a response the server sends
    /// without a body counts as complete once dropped.
    pub(crate) fn responded<B: Body>(mut self, response: &Response<B>) -> Self {
        let status = response.status();
        self.status = Some(status);
        // A `Content-Length` header binds the server just as an exact size hint does: hyper
        // stops polling once that many bytes are out (`ServeFile`, a stream with its length).
        // The hint first: it is cheaper, and it wins.
        self.expected = response
            .body()
            .size_hint()
            .exact()
            .or_else(|| content_length(response.headers()));
        let head = self
            .inflight
            .as_ref()
            .is_some_and(|inflight| inflight.snapshot.method() == Method::HEAD);
        let bodiless = head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        self.on_drop = if bodiless {
            Completion::Complete
        } else {
            Completion::Aborted
        };
        self
    }

    /// Whether fewer bytes went out than the response announced.
    fn short(&self) -> bool {
        self.expected
            .is_some_and(|expected| self.body_bytes < expected)
    }

    pub(crate) fn finish(&mut self, completion: Completion) {
        if let Some(inflight) = self.inflight.take() {
            // The server sends no more than the announced length.
            let sent = self
                .expected
                .map_or(self.body_bytes, |expected| self.body_bytes.min(expected));
            inflight.finish(self.status, completion, sent, self.entered);
        }
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        self.finish(self.on_drop);
    }
}

/// The length a `Content-Length` header announces: digits only, as hyper reads it (Rust's
/// `parse` would also take a sign).
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let digits = headers.get(CONTENT_LENGTH)?.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Empty, Full};
    use tower::{service_fn, Layer, ServiceExt};

    use crate::test_util::{recording, settle, Seen, TestBody, Then};
    use crate::{After, AfterLayer, Completion};

    #[tokio::test]
    async fn a_body_read_to_its_end_is_complete() {
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(&layer, &seen, || {
            Response::new(TestBody::new(&["hello ", "world"], Then::End))
        });
        let response = service.oneshot(Request::new(())).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello world");

        let outcome = seen.one().await;
        assert_eq!(outcome.completion(), Completion::Complete);
        assert_eq!(outcome.status(), Some(StatusCode::OK));
        assert_eq!(outcome.body_bytes(), 11);
        assert_eq!(layer.tasks().pending(), 0);
    }

    #[tokio::test]
    async fn callbacks_wait_for_the_end_of_the_body() {
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(&layer, &seen, || {
            Response::new(TestBody::new(&["first", "second"], Then::End))
        });
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        settle().await;
        assert!(seen.all().is_empty(), "ran before the body ended");
        assert_eq!(layer.tasks().pending(), 1);

        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.is_none());
        assert_eq!(seen.one().await.completion(), Completion::Complete);
    }

    #[tokio::test]
    async fn reaching_an_exact_length_is_complete_once_dropped() {
        // hyper stops polling once Content-Length bytes went out, then drops the body.
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(&layer, &seen, || {
            Response::new(TestBody::new(&["12345"], Then::Pending).exact())
        });
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        settle().await;
        assert!(seen.all().is_empty(), "trailers may still follow");
        drop(body);
        let outcome = seen.one().await;
        assert_eq!(outcome.completion(), Completion::Complete);
        assert_eq!(outcome.body_bytes(), 5);
    }

    #[tokio::test]
    async fn trailers_after_an_exact_length_are_part_of_the_response() {
        // gRPC over HTTP/2: the data has its exact length, then `grpc-status` in trailers.
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(&layer, &seen, || {
            Response::new(TestBody::new(&["12345"], Then::Trailers).exact())
        });
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        settle().await;
        assert!(seen.all().is_empty(), "ran before the trailers");
        let trailers = body.frame().await.unwrap().unwrap();
        assert_eq!(trailers.trailers_ref().unwrap()["grpc-status"], "0");
        assert!(body.frame().await.is_none());
        assert_eq!(seen.one().await.completion(), Completion::Complete);

        // Trailers that fail after the last byte: the response failed.
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(&layer, &seen, || {
            Response::new(TestBody::new(&["12345"], Then::Error).exact())
        });
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.unwrap().is_err());
        assert_eq!(seen.one().await.completion(), Completion::BodyError);
    }

    #[tokio::test]
    async fn a_content_length_that_the_body_does_not_match() {
        let with_length = |length: &'static str, chunks: &'static [&'static str], then| {
            move || {
                let mut response = Response::new(TestBody::new(chunks, then));
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_LENGTH, length.parse().unwrap());
                response
            }
        };
        // Longer than announced: the server sends the announced bytes and stops there.
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(
            &layer,
            &seen,
            with_length("5", &["0123456789"], Then::Pending),
        );
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        let outcome = seen.one().await;
        assert_eq!(
            (outcome.completion(), outcome.body_bytes()),
            (Completion::Complete, 5)
        );

        // Shorter than announced: the server cannot complete the response.
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(&layer, &seen, with_length("5", &["123"], Then::End));
        let body = service.oneshot(Request::new(())).await.unwrap().into_body();
        body.collect().await.unwrap();
        let outcome = seen.one().await;
        assert_eq!(
            (outcome.completion(), outcome.body_bytes()),
            (Completion::BodyError, 3)
        );

        // Not a length hyper would read: no length is assumed.
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(&layer, &seen, with_length("+3", &["123"], Then::Pending));
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(seen.one().await.completion(), Completion::Aborted);
    }

    #[tokio::test]
    async fn a_full_body_ends_with_its_only_frame() {
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(&layer, &seen, || {
            Response::new(Full::new(bytes::Bytes::from("all at once")))
        });
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        assert_eq!(seen.one().await.completion(), Completion::Complete);
    }

    #[tokio::test]
    async fn a_body_dropped_half_way_is_aborted() {
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(&layer, &seen, || {
            Response::new(TestBody::new(&["tick"], Then::Pending))
        });
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        settle().await;
        assert!(seen.all().is_empty());

        drop(body);
        let outcome = seen.one().await;
        assert_eq!(outcome.completion(), Completion::Aborted);
        assert_eq!(outcome.status(), Some(StatusCode::OK));
        assert_eq!(outcome.body_bytes(), 4);
    }

    #[tokio::test]
    async fn a_body_error_ends_the_response_once() {
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(&layer, &seen, || {
            Response::new(TestBody::new(&["part"], Then::Error))
        });
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.unwrap().is_err());
        // The server would stop here; polling on or dropping must not finish it again.
        assert!(body.frame().await.is_none());
        drop(body);
        let outcome = seen.one().await;
        assert_eq!(outcome.completion(), Completion::BodyError);
        assert_eq!(outcome.body_bytes(), 4);
    }

    #[tokio::test]
    async fn responses_without_a_body_are_complete_when_dropped_unpolled() {
        let cases: [(http::Method, StatusCode, bool); 4] = [
            (http::Method::HEAD, StatusCode::OK, false),
            (http::Method::GET, StatusCode::NO_CONTENT, false),
            (http::Method::GET, StatusCode::NOT_MODIFIED, false),
            (http::Method::GET, StatusCode::OK, true),
        ];
        for (method, status, empty) in cases {
            let (layer, seen) = (AfterLayer::new(), Seen::default());
            let service = recording(&layer, &seen, move || {
                let body: http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error> =
                    if empty {
                        Empty::new().map_err(|never| match never {}).boxed()
                    } else {
                        // A body the server would not send: never polled.
                        TestBody::new(&["unsent"], Then::Pending).boxed()
                    };
                let mut response = Response::new(body);
                *response.status_mut() = status;
                response
            });
            let request = Request::builder().method(method.clone()).body(()).unwrap();
            let response = service.oneshot(request).await.unwrap();
            drop(response);
            let outcome = seen.one().await;
            assert_eq!(
                outcome.completion(),
                Completion::Complete,
                "{method} answered {status}, empty body: {empty}"
            );
            assert_eq!(outcome.status(), Some(status));
            assert_eq!(outcome.body_bytes(), 0);
        }
    }

    #[tokio::test]
    async fn an_empty_body_polled_is_complete() {
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let service = recording(
            &layer,
            &seen,
            || Response::new(Empty::<bytes::Bytes>::new()),
        );
        let mut body = service.oneshot(Request::new(())).await.unwrap().into_body();
        assert!(body.frame().await.is_none());
        assert_eq!(seen.one().await.completion(), Completion::Complete);
    }

    /// Serves one request on a runtime that is then dropped, with a handler that registers
    /// one callback through `register` from the request's task, and returns the response, not
    /// yet read.
    fn served_on_a_dropped_runtime(
        layer: &AfterLayer,
        register: fn(After, Seen),
        seen: &Seen,
    ) -> Response<crate::AfterBody<Full<bytes::Bytes>>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let seen = seen.clone();
        let service = layer.layer(service_fn(move |_: Request<()>| {
            let seen = seen.clone();
            async move {
                // From the request's own task, as a handler registers.
                register(After::current(), seen);
                Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from("x"))))
            }
        }));
        let response = runtime.block_on(service.oneshot(Request::new(()))).unwrap();
        drop(runtime);
        response
    }

    #[test]
    fn a_body_dropped_outside_any_runtime_drops_its_callbacks_without_panicking() {
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let tasks = layer.tasks();
        // A named callback stays queued, for the driver that the end of the response spawns.
        let response = served_on_a_dropped_runtime(
            &layer,
            |after, seen| {
                after.run_named(
                    "audit",
                    move |ctx| async move { seen.record(*ctx.outcome()) },
                );
            },
            &seen,
        );
        assert_eq!(tasks.pending(), 1);
        // On a thread with no runtime at all.
        let errors = std::thread::spawn(move || {
            let logs = crate::test_util::Logs::capture();
            drop(response);
            logs.lines_with("no Tokio runtime")
        })
        .join()
        .expect("no panic");
        assert_eq!(tasks.pending(), 0);
        assert_eq!(tasks.stats().cancelled(), 1);
        assert!(seen.all().is_empty());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("ERROR") && errors[0].contains("cancelled=1"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_runtime_dropped_while_a_callback_waits_for_its_response_cancels_it() {
        let logs = crate::test_util::Logs::capture();
        let (layer, seen) = (AfterLayer::new(), Seen::default());
        let tasks = layer.tasks();
        // The first callback rides in a driver spawned on the runtime, which goes with it.
        let response = served_on_a_dropped_runtime(
            &layer,
            |after, seen| after.run_with(move |ctx| async move { seen.record(*ctx.outcome()) }),
            &seen,
        );
        assert_eq!(tasks.pending(), 0);
        assert_eq!(tasks.stats().cancelled(), 1);
        let warnings = logs.lines_with("the runtime shut down before they ended");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("cancelled=1"), "{warnings:?}");
        // Its response, dropped later on a thread without a runtime, has nothing left to hand.
        std::thread::spawn(move || drop(response))
            .join()
            .expect("no panic");
        assert!(seen.all().is_empty());
        assert_eq!(tasks.stats().scheduled(), 1);
    }
}
