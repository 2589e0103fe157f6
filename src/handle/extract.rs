//! The axum extractor for [`After`], and its rejection.

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::StatusCode;
use std::convert::Infallible;
use std::fmt;

use crate::handle::After;

/// Extracts the request's [`After`] handle; rejects with [`MissingAfterLayer`] when the router
/// lacks [`AfterLayer`](crate::AfterLayer). `Option<After>` never rejects.
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S> FromRequestParts<S> for After
where
    S: Send + Sync,
{
    type Rejection = MissingAfterLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<After>()
            .cloned()
            .ok_or(MissingAfterLayer)
    }
}

#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S> OptionalFromRequestParts<S> for After
where
    S: Send + Sync,
{
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<After>().cloned())
    }
}

/// Rejection of the [`After`] extractor: the request did not pass through
/// [`AfterLayer`](crate::AfterLayer).
///
/// This is a server bug rather than a client error, so it answers `500 Internal Server
/// Error`, with a body that names the fix.
///
/// ```
/// use tower_after::MissingAfterLayer;
///
/// let rejection = MissingAfterLayer::default();
/// assert_eq!(rejection.status(), 500);
/// assert!(rejection.body_text().contains("AfterLayer"));
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MissingAfterLayer;

impl MissingAfterLayer {
    /// The status code of the rejection: `500 Internal Server Error`.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        StatusCode::INTERNAL_SERVER_ERROR
    }

    /// The body text of the rejection.
    #[must_use]
    pub fn body_text(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for MissingAfterLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "Missing request extension: `After` was not found. \
             Is `AfterLayer` applied, outside this route? Add `.layer(AfterLayer::new())` \
             to the router.",
        )
    }
}

impl std::error::Error for MissingAfterLayer {}

impl IntoResponse for MissingAfterLayer {
    fn into_response(self) -> Response {
        // Like axum's own rejections: at TRACE, under their target, so that
        // `RUST_LOG=axum::rejection=trace` shows every rejection and nothing else does.
        tracing::event!(
            target: "axum::rejection",
            tracing::Level::TRACE,
            status = self.status().as_u16(),
            body = %self,
            rejection_type = std::any::type_name::<Self>(),
            "rejecting request",
        );
        (self.status(), self.body_text()).into_response()
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use crate::After;
    use crate::AfterLayer;

    async fn call(app: Router) -> (StatusCode, String) {
        let response = app.oneshot(Request::new(Body::empty())).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn the_extractor_finds_the_handle_under_the_layer() {
        let app = Router::new()
            .route(
                "/",
                get(|after: After| async move { after.request().uri().to_string() }),
            )
            .layer(AfterLayer::new());
        assert_eq!(call(app).await, (StatusCode::OK, "/".to_owned()));
    }

    #[tokio::test]
    async fn without_the_layer_the_extractor_answers_500_naming_it() {
        let logs = crate::test_util::Logs::capture();
        let app = Router::new().route("/", get(|_: After| async { "unreachable" }));
        let (status, body) = call(app).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("AfterLayer"), "{body}");
        // Logged like axum's rejections: at TRACE under `axum::rejection`, never as an error.
        let lines = logs.lines_with("MissingAfterLayer");
        assert_eq!(lines.len(), 1, "{}", logs.text());
        assert!(
            lines[0].contains("TRACE") && lines[0].contains("axum::rejection"),
            "{lines:?}"
        );
        assert!(logs.lines_with("ERROR").is_empty(), "{}", logs.text());
    }

    #[tokio::test]
    async fn an_optional_handle_is_none_without_the_layer() {
        let handler = |after: Option<After>| async move { format!("{}", after.is_some()) };
        let bare = Router::new().route("/", get(handler));
        assert_eq!(call(bare).await.1, "false");
        let layered = Router::new()
            .route("/", get(handler))
            .layer(AfterLayer::new());
        assert_eq!(call(layered).await.1, "true");
    }
}
