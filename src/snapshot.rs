//! [`RequestSnapshot`]: the request as callbacks see it.
//!
//! Callbacks run after the request and its handler are gone, so they read a copy taken when the
//! request entered the layer, like Next.js's `headers()` and `cookies()` inside `after()`. The
//! copy is cheap: header values share their bytes with the original. Cookies are parsed only
//! when a callback asks for them.

use std::fmt;

use cookie::Cookie;
use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE};
use http::{HeaderMap, Method, Request, Uri, Version};

/// The method, URI, version and headers of a request, as they were when it entered
/// [`AfterLayer`](crate::AfterLayer).
///
/// Changes made later by inner middleware or the handler are not seen here.
///
/// Its `Debug` output hides the values of `Authorization`, `Proxy-Authorization`, `Cookie` and
/// `Set-Cookie`, so logging a snapshot does not leak credentials.
pub struct RequestSnapshot {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl RequestSnapshot {
    pub(crate) fn new<B>(request: &Request<B>) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: request.headers().clone(),
        }
    }

    /// The request method.
    #[must_use]
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request URI, as it entered the layer (before any nesting strips a prefix).
    #[must_use]
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The HTTP version.
    #[must_use]
    pub fn version(&self) -> Version {
        self.version
    }

    /// The request headers.
    #[must_use]
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The value of the first cookie called `name`, as sent (not percent-decoded).
    ///
    /// ```
    /// # use tower_after::RequestSnapshot;
    /// fn session(request: &RequestSnapshot) -> &str {
    ///     request.cookie("session-id").unwrap_or("anonymous")
    /// }
    /// ```
    #[must_use]
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies()
            .find(|(candidate, _)| *candidate == name)
            .map(|(_, value)| value)
    }

    /// Every cookie the request sent, as `(name, value)` pairs in the order sent.
    ///
    /// All `Cookie` headers are read. Pairs that are malformed (no `=`, an empty name) or not
    /// UTF-8 are skipped; the rest are still found. Values are as sent: not percent-decoded and
    /// with any surrounding double quotes kept.
    ///
    /// ```
    /// # use tower_after::RequestSnapshot;
    /// fn cookie_names(request: &RequestSnapshot) -> Vec<&str> {
    ///     request.cookies().map(|(name, _)| name).collect()
    /// }
    /// ```
    pub fn cookies(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.headers
            .get_all(COOKIE)
            .iter()
            .flat_map(|header| header.as_bytes().split(|&byte| byte == b';'))
            .filter_map(|pair| std::str::from_utf8(pair).ok())
            .filter_map(|pair| {
                let cookie = Cookie::parse(pair).ok()?;
                Some((cookie.name_raw()?, cookie.value_raw()?))
            })
    }
}

/// Headers whose values are credentials, hidden from `Debug`.
fn is_secret(name: &http::HeaderName) -> bool {
    [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE, SET_COOKIE].contains(name)
}

impl fmt::Debug for RequestSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Headers<'a>(&'a HeaderMap);
        impl fmt::Debug for Headers<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut map = f.debug_map();
                for (name, value) in self.0 {
                    if is_secret(name) {
                        map.entry(name, &"<redacted>");
                    } else {
                        map.entry(name, value);
                    }
                }
                map.finish()
            }
        }
        f.debug_struct("RequestSnapshot")
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("version", &self.version)
            .field("headers", &Headers(&self.headers))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn snapshot(cookie_headers: &[&[u8]]) -> RequestSnapshot {
        let mut request = Request::new(());
        for value in cookie_headers {
            let value = HeaderValue::from_bytes(value).expect("test header is valid");
            request.headers_mut().append(COOKIE, value);
        }
        RequestSnapshot::new(&request)
    }

    #[test]
    fn reads_every_cookie_header_in_order() {
        let request = snapshot(&[b"a=1; b=2", b"c=3"]);
        let all: Vec<_> = request.cookies().collect();
        assert_eq!(all, [("a", "1"), ("b", "2"), ("c", "3")]);
        assert_eq!(request.cookie("c"), Some("3"));
        assert_eq!(request.cookie("missing"), None);
    }

    #[test]
    fn first_of_duplicate_names_wins() {
        let request = snapshot(&[b"id=first; id=second"]);
        assert_eq!(request.cookie("id"), Some("first"));
        assert_eq!(request.cookies().count(), 2);
    }

    #[test]
    fn skips_malformed_pairs_and_keeps_the_rest() {
        let request = snapshot(&[b"novalue; =empty-name;; ok=yes ;x=a=b; ;"]);
        let all: Vec<_> = request.cookies().collect();
        assert_eq!(all, [("ok", "yes"), ("x", "a=b")]);
    }

    #[test]
    fn non_utf8_pairs_are_skipped_without_panic() {
        let request = snapshot(&[b"bad=\xff\xfe; good=1; \xc3\x28=2"]);
        assert_eq!(request.cookies().collect::<Vec<_>>(), [("good", "1")]);
    }

    #[test]
    fn no_cookie_header_means_no_cookies() {
        assert_eq!(snapshot(&[]).cookies().count(), 0);
    }

    #[test]
    fn debug_redacts_credentials() {
        let mut request = Request::new(());
        let headers = request.headers_mut();
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Bearer secret-token"),
        );
        headers.insert(
            COOKIE,
            HeaderValue::from_static("session-id=secret-session"),
        );
        headers.insert("x-trace", HeaderValue::from_static("visible"));
        let text = format!("{:?}", RequestSnapshot::new(&request));
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("visible"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }
}
