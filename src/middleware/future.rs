//! [`ResponseFuture`]: where a response that never came is noticed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;

use crate::middleware::body::{AfterBody, Finisher};
use crate::record::outcome::Completion;
use crate::request::Inflight;

pin_project! {
    /// Response future of [`AfterService`](crate::AfterService).
    ///
    /// If it ends without a response (the inner service failed or panicked) or is dropped before
    /// one (the client left while the handler ran), the request's callbacks start right away.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use tower::{service_fn, Layer, Service};
    /// use tower_after::AfterLayer;
    ///
    /// let mut service = AfterLayer::new().layer(service_fn(|_: Request<()>| async {
    ///     Ok::<_, Infallible>(Response::new(String::new()))
    /// }));
    /// let future: tower_after::ResponseFuture<_> = service.call(Request::new(()));
    /// let response = future.await.unwrap(); // its body is an `AfterBody`
    /// # drop(response);
    /// # }
    /// ```
    pub struct ResponseFuture<F> {
        #[pin]
        inner: TaskLocalFuture<Arc<Inflight>, F>,
        finisher: Finisher,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: TaskLocalFuture<Arc<Inflight>, F>, finisher: Finisher) -> Self {
        Self { inner, finisher }
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Body,
{
    type Output = Result<Response<AfterBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // A panic in the inner future unwinds through here: whoever catches it drops this
        // future, and the request fails.
        this.finisher.on_drop(Completion::Failed);
        let polled = this.inner.poll(cx);
        this.finisher.on_drop(Completion::Aborted);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(response)) => {
                let finisher = this.finisher.take().responded(&response);
                Poll::Ready(Ok(response.map(|body| AfterBody::new(body, finisher))))
            }
            Poll::Ready(Err(error)) => {
                this.finisher.finish(Completion::Failed);
                Poll::Ready(Err(error))
            }
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
