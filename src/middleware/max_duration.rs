//! [`MaxDuration`]: one route's budget for its after-response work, the counterpart of Next.js's
//! `maxDuration` route config.

use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tower_layer::Layer;
use tower_service::Service;

use crate::handle::After;

/// A [`Layer`] that sets the budget of the after-response work of the requests it wraps,
/// overriding the one of [`AfterLayer`](crate::AfterLayer): the counterpart of Next.js's `maxDuration` route config.
///
/// On a single route:
///
/// ```
/// use std::time::Duration;
/// use axum::{routing::get, Router};
/// use tower_after::{AfterLayer, MaxDuration};
///
/// async fn report() -> &'static str { "queued" }
///
/// let app: Router = Router::new()
///     .route("/report", get(report).layer(MaxDuration::new(Duration::from_secs(120))))
///     .layer(AfterLayer::new().max_duration(Duration::from_secs(10)));
/// ```
///
/// It works on either side of `AfterLayer`: inside, it sets the budget of the request's work;
/// outside (added after `AfterLayer`, or around the whole router), it leaves the budget in the
/// request for `AfterLayer` to take up. The innermost `MaxDuration` a request passes wins.
///
/// Unlike Next.js's `maxDuration`, it bounds only the work *after* the response, not the
/// request's own handling: for that, put a `TimeoutLayer` on the route.
#[derive(Debug, Clone, Copy)]
pub struct MaxDuration {
    max_duration: Duration,
}

impl MaxDuration {
    /// A budget of `max_duration` for each request's callbacks, counted from the end of its
    /// response; [`Duration::MAX`] means no limit.
    #[must_use]
    pub fn new(max_duration: Duration) -> Self {
        Self { max_duration }
    }
}

impl<S> Layer<S> for MaxDuration {
    type Service = MaxDurationService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MaxDurationService {
            inner,
            max_duration: self.max_duration,
        }
    }
}

/// The service made by [`MaxDuration`]: it sets the budget of the request's callbacks (or, outside
/// [`AfterLayer`](crate::AfterLayer), leaves it in the request for the layer), then calls the inner service.
///
/// tower-http names a layer `XLayer` and its service `X<S>`, and so does this crate
/// ([`RunToEndLayer`](crate::RunToEndLayer) makes [`RunToEnd`](crate::RunToEnd)), except where
/// `X` already names what users write: [`After`] is the handle, so [`AfterLayer`](crate::AfterLayer) makes
/// [`AfterService`](crate::AfterService); `MaxDuration` is the route setting users write, like axum's `Extension`, so
/// its service is `MaxDurationService`.
///
/// ```
/// use std::time::Duration;
/// use tower::{service_fn, ServiceBuilder};
/// use tower_after::{AfterLayer, MaxDuration};
/// # use std::convert::Infallible;
/// # use http::{Request, Response};
///
/// // Plain Tower: the route-level layer goes inside `AfterLayer`.
/// let service = ServiceBuilder::new()
///     .layer(AfterLayer::new())
///     .layer(MaxDuration::new(Duration::from_secs(300)))
///     .service(service_fn(|_: Request<()>| async {
///         Ok::<_, Infallible>(Response::new(String::new()))
///     }));
/// # let _ = service;
/// ```
#[derive(Debug, Clone)]
pub struct MaxDurationService<S> {
    inner: S,
    max_duration: Duration,
}

impl<S, B> Service<Request<B>> for MaxDurationService<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match request.extensions().get::<After>() {
            // Inside `AfterLayer`: the request's budget.
            Some(after) => after.set_budget(self.max_duration),
            // Outside: left in the request, for `AfterLayer` to take up.
            None => {
                request
                    .extensions_mut()
                    .insert(RouteBudget(self.max_duration));
            }
        }
        self.inner.call(request)
    }
}

/// A budget that a [`MaxDuration`] outside the layer left in the request, taken up as the request
/// enters the layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteBudget(pub(crate) Duration);
