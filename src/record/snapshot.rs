//! [`RequestSnapshot`]: the request as callbacks see it.
//!
//! Callbacks run after the request and its handler are gone, so they read a copy taken when the
//! request entered the layer, like Next.js's `headers()` and `cookies()` inside `after()`.
//!
//! The copy is made of the bytes, not of the request's `Uri` and `HeaderValue`s: those share
//! their storage with the server's read buffer (hyper's is 8 KiB), and a pending callback holding
//! them would keep a whole buffer alive per request. The request target and the headers are
//! copied into one small buffer, one allocation; the `Uri` and the `HeaderMap` are rebuilt from
//! it on first use, inside the callback, off the response path. Cookies and single headers are
//! read from the buffer directly.
//!
//! A [`SnapshotConfig`] bounds the copy: a byte cap, so that a client's large headers cannot
//! make every pending callback pin that much memory, and a list of the headers to keep, which
//! skips the others without copying them.

use std::fmt;
use std::sync::OnceLock;

use bytes::Bytes;
use cookie::Cookie;
use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};

use crate::record::snapshot_config::{All, Keep, Kept, Listed, SnapshotConfig, REQUEST_ID};

/// The method, URI, version and headers of a request, as they were when it entered
/// [`AfterLayer`](crate::AfterLayer).
///
/// Changes made later by inner middleware or the handler are not seen here. Which headers it
/// holds, and how many bytes, is bounded by a [`SnapshotConfig`].
///
/// Its `Debug` output hides the values of `Authorization`, `Proxy-Authorization`, `Cookie` and
/// `Set-Cookie`, so logging a snapshot does not leak credentials.
///
/// ```
/// use tower_after::AfterContext;
///
/// async fn log(ctx: AfterContext) {
///     let request = ctx.request();
///     let language = request.headers().get("accept-language");
///     println!(
///         "{} {} {:?} from {} (language {language:?}, session {:?})",
///         request.method(),
///         request.uri().path(),
///         request.version(),
///         request.header("user-agent").unwrap_or("-"),
///         request.cookie("session-id"),
///     );
/// }
/// ```
pub struct RequestSnapshot {
    method: Method,
    version: Version,
    /// Whether the cap cut or left out anything.
    truncated: bool,
    /// The request target, then each header as `name length, value length, name, value` (lengths
    /// as little-endian `u32`).
    raw: Box<[u8]>,
    /// Within the cap, itself at most `u32::MAX`.
    target_len: u32,
    /// The route template the router matched, stored right after the target; 0 for none.
    route_len: u16,
    /// Rebuilt on first use; boxed so that an unused one costs a pointer, not its size.
    uri: OnceLock<Box<Uri>>,
    headers: OnceLock<Box<HeaderMap>>,
}

/// The route template that axum's router matched, if it ran before the layer.
#[cfg(feature = "axum")]
fn matched_route<B>(request: &Request<B>) -> Option<&str> {
    let matched = request.extensions().get::<axum::extract::MatchedPath>()?;
    Some(matched.as_str())
}

#[cfg(not(feature = "axum"))]
fn matched_route<B>(_: &Request<B>) -> Option<&str> {
    None
}

/// Bytes of a header's two lengths in `raw`.
const LENGTHS: usize = 8;

/// The longest method `http` stores inline; longer ones are on the heap.
const INLINE_METHOD: usize = 15;

/// Taking the copy, and what it costs.
impl RequestSnapshot {
    pub(crate) fn new<B>(request: &Request<B>, config: &SnapshotConfig) -> Self {
        let headers = request.headers();
        match &config.keep {
            Keep::All => Self::build(request, config.max_bytes, All(headers)),
            Keep::Only(names) => {
                Self::build(request, config.max_bytes, Listed::new(headers, names))
            }
        }
    }

    /// The snapshot of `request` with the headers `kept` visits, in that order, while they fit.
    /// They are visited twice: to count their bytes, then to copy them into a buffer of that
    /// size.
    fn build<B>(request: &Request<B>, max_bytes: usize, kept: impl Kept) -> Self {
        // Lengths are stored as `u32`s: in a buffer below 4 GiB, every one fits.
        let mut budget = max_bytes.min(u32::MAX as usize);
        let mut truncated = false;

        let mut method = request.method().clone();
        let method_len = method_heap(&method);
        if method_len <= budget {
            budget -= method_len;
        } else if let Some(Ok(cut)) = method
            .as_str()
            .as_bytes()
            .get(..INLINE_METHOD)
            .map(Method::from_bytes)
        {
            // A prefix of a token is a token, and one this short is stored inline.
            method = cut;
            truncated = true;
        }

        let uri = request.uri();
        let mut target = target_parts(uri);
        let mut target_len: usize = target.iter().map(|part| part.len()).sum();
        if target_len > budget {
            let path = uri.path();
            let mut end = budget.min(path.len());
            while !path.is_char_boundary(end) {
                end -= 1;
            }
            target = [&path[..end], "", "", ""];
            target_len = end;
            truncated = true;
        }
        budget -= target_len;

        let route = matched_route(request)
            .filter(|route| route.len() <= usize::from(u16::MAX))
            .unwrap_or_default();
        let route = if route.len() <= budget {
            budget -= route.len();
            route
        } else {
            truncated = true;
            ""
        };

        // How many of the kept headers fit, and their bytes.
        let mut count = 0_usize;
        let mut headers_len = 0;
        kept.visit(|name, value| {
            let len = LENGTHS + name.len() + value.len();
            if len > budget - headers_len {
                truncated = true;
                return false;
            }
            headers_len += len;
            count += 1;
            true
        });

        let mut raw = Vec::with_capacity(target_len + route.len() + headers_len);
        for part in target {
            raw.extend_from_slice(part.as_bytes());
        }
        raw.extend_from_slice(route.as_bytes());
        kept.visit(|name, value| {
            if count == 0 {
                return false;
            }
            count -= 1;
            // Both below `budget`, so below `u32::MAX`.
            raw.extend_from_slice(&(name.len() as u32).to_le_bytes());
            raw.extend_from_slice(&(value.len() as u32).to_le_bytes());
            raw.extend_from_slice(name);
            raw.extend_from_slice(value.as_bytes());
            true
        });
        Self {
            method,
            version: request.version(),
            truncated,
            raw: raw.into_boxed_slice(),
            target_len: u32::try_from(target_len).unwrap_or(u32::MAX),
            // At most `u16::MAX`, filtered above.
            route_len: u16::try_from(route.len()).unwrap_or(0),
            uri: OnceLock::new(),
            headers: OnceLock::new(),
        }
    }

    /// Whether the [`SnapshotConfig`]'s byte cap cut the method or the request target, or left
    /// out the route template or headers. Headers left out because they are not in its keep-list do not count.
    ///
    /// A callback that needs a header can tell "not sent" from "not kept":
    ///
    /// ```
    /// # use tower_after::RequestSnapshot;
    /// fn request_id(request: &RequestSnapshot) -> &str {
    ///     match request.header("x-request-id") {
    ///         Some(id) => id,
    ///         None if request.truncated() => "<too large to keep>",
    ///         None => "-",
    ///     }
    /// }
    /// ```
    #[must_use]
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The heap bytes this snapshot keeps alive while a callback holds it, fixed at creation:
    /// its own size, its buffer and a long method's bytes. The `Uri` and `HeaderMap` rebuilt on
    /// demand are not counted: they exist only once a running callback reads them.
    pub(crate) fn held_bytes(&self) -> usize {
        SNAPSHOT_SIZE + self.raw.len() + method_heap(&self.method)
    }
}

/// What callbacks read.
impl RequestSnapshot {
    /// The request method.
    #[must_use]
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request URI, as it entered the layer (before any nesting strips a prefix).
    #[must_use]
    pub fn uri(&self) -> &Uri {
        self.uri.get_or_init(|| {
            // It was a valid URI when copied, so it parses again.
            Box::new(Uri::try_from(&self.raw[..self.target_len as usize]).unwrap_or_default())
        })
    }

    /// The request path, as in [`uri().path()`](RequestSnapshot::uri), read from the copy
    /// without rebuilding the URI: the cheap way to log or match it.
    ///
    /// ```
    /// # async fn log(ctx: tower_after::AfterContext) {
    /// tracing::info!(path = ctx.request().path(), "done");
    /// # }
    /// ```
    #[must_use]
    pub fn path(&self) -> &str {
        let target = &self.raw[..self.target_len as usize];
        if target.first() == Some(&b'/') {
            let end = target.iter().position(|&byte| byte == b'?');
            // From a valid `Uri`, whose path is ASCII: this never fails.
            if let Ok(path) = std::str::from_utf8(&target[..end.unwrap_or(target.len())]) {
                return path;
            }
        }
        self.uri().path()
    }

    /// The HTTP version.
    #[must_use]
    pub fn version(&self) -> Version {
        self.version
    }

    /// The request headers.
    ///
    /// The map is rebuilt from the snapshot on first use; to read one header,
    /// [`RequestSnapshot::header`] is cheaper.
    #[must_use]
    pub fn headers(&self) -> &HeaderMap {
        self.headers.get_or_init(|| {
            let shared = Bytes::copy_from_slice(&self.raw);
            let mut map = HeaderMap::with_capacity(self.raw_headers().count());
            for (name, value) in self.raw_headers() {
                // Where `value` lies in `raw`, and so in its copy.
                let start = value.as_ptr() as usize - self.raw.as_ptr() as usize;
                // Both were valid in the request they were copied from.
                let name = HeaderName::from_bytes(name);
                let value =
                    HeaderValue::from_maybe_shared(shared.slice(start..start + value.len()));
                if let (Ok(name), Ok(value)) = (name, value) {
                    map.append(name, value);
                }
            }
            Box::new(map)
        })
    }

    /// The first value of the header `name` (any case), if it is there and is UTF-8.
    ///
    /// ```
    /// # use tower_after::RequestSnapshot;
    /// fn agent(request: &RequestSnapshot) -> &str {
    ///     request.header("user-agent").unwrap_or("-")
    /// }
    /// ```
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.values(name.as_bytes())
            .next()
            .and_then(|value| std::str::from_utf8(value).ok())
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
        self.values(COOKIE.as_str().as_bytes())
            .flat_map(|header| header.split(|&byte| byte == b';'))
            .filter_map(|pair| std::str::from_utf8(pair).ok())
            .filter_map(|pair| {
                let cookie = Cookie::parse(pair).ok()?;
                Some((cookie.name_raw()?, cookie.value_raw()?))
            })
    }

    /// The values of the header `name`, compared without regard to case.
    fn values<'a, 'n>(&'a self, name: &'n [u8]) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        self.raw_headers()
            .filter(move |(candidate, _)| candidate.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    /// The `x-request-id` header (tower-http's `SetRequestIdLayer` sets it), for the crate's
    /// own log lines and spans. A keep-list always keeps it.
    pub(crate) fn request_id(&self) -> Option<&str> {
        self.header(REQUEST_ID.as_str())
    }

    /// The route template the router matched for this request, such as `/users/{id}`: axum's
    /// [`MatchedPath`](axum::extract::MatchedPath), the low-cardinality name an access log or a
    /// metric wants, where [`path`](RequestSnapshot::path) would give one per user.
    ///
    /// It is there when [`AfterLayer`](crate::AfterLayer) is added with `Router::layer` (the
    /// usual way, which runs it after routing), and `None` when it wraps the router from
    /// outside (a `ServiceBuilder` around the whole `Router`), for requests no route matched
    /// (the fallback), for a service mounted with `Router::nest_service` (a layer on the nested
    /// `Router` itself sees its template), and without axum. It is always the whole template,
    /// prefix included (`/api/users/{id}`), also for a layer on a router mounted with
    /// `Router::nest`, whose [`path`](RequestSnapshot::path) has the prefix stripped.
    ///
    /// It is stored in the snapshot after the request target and counts against its
    /// [cap](crate::SnapshotConfig::max_bytes) before the headers; one that does not fit is left
    /// out, and the snapshot is [`truncated`](RequestSnapshot::truncated).
    ///
    /// ```
    /// # async fn log(ctx: tower_after::AfterContext) {
    /// let route = ctx.request().matched_path().unwrap_or("<unmatched>");
    /// tracing::info!(route, status = ?ctx.outcome().status(), "served");
    /// # }
    /// ```
    #[cfg(feature = "axum")]
    #[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
    #[must_use]
    pub fn matched_path(&self) -> Option<&str> {
        let start = self.target_len as usize;
        let route = self.raw.get(start..start + usize::from(self.route_len))?;
        // Copied from a `str`.
        std::str::from_utf8(route)
            .ok()
            .filter(|route| !route.is_empty())
    }

    /// Every header as `(name, value)` bytes, in order.
    fn raw_headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let mut rest = &self.raw[self.target_len as usize + usize::from(self.route_len)..];
        std::iter::from_fn(move || {
            let (lengths, tail) = rest.split_at_checked(LENGTHS)?;
            let (name_len, value_len) = lengths.split_at(LENGTHS / 2);
            let name_len = u32::from_le_bytes(name_len.try_into().ok()?) as usize;
            let value_len = u32::from_le_bytes(value_len.try_into().ok()?) as usize;
            let (name, tail) = tail.split_at_checked(name_len)?;
            let (value, tail) = tail.split_at_checked(value_len)?;
            rest = tail;
            Some((name, value))
        })
    }
}

/// The fixed part of [`RequestSnapshot::held_bytes`].
const SNAPSHOT_SIZE: usize = std::mem::size_of::<RequestSnapshot>();

/// The bytes `http` allocates for `method`: only extension methods too long to store inline.
fn method_heap(method: &Method) -> usize {
    let len = method.as_str().len();
    if len > INLINE_METHOD {
        len
    } else {
        0
    }
}

/// The request target as string pieces: `scheme://authority/path?query`, or the parts of it the
/// URI has.
fn target_parts(uri: &Uri) -> [&str; 4] {
    let path = uri.path_and_query().map_or("", |path| path.as_str());
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => [scheme, "://", authority.as_str(), path],
        (None, Some(authority)) if path.is_empty() => [authority.as_str(), "", "", ""],
        _ if path.is_empty() => ["/", "", "", ""],
        _ => [path, "", "", ""],
    }
}

/// Headers whose values are credentials, hidden from `Debug`.
fn is_secret(name: &[u8]) -> bool {
    [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE, SET_COOKIE]
        .iter()
        .any(|secret| secret.as_str().as_bytes().eq_ignore_ascii_case(name))
}

impl fmt::Debug for RequestSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Headers<'a>(&'a RequestSnapshot);
        impl fmt::Debug for Headers<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut map = f.debug_map();
                for (name, value) in self.0.raw_headers() {
                    let name = String::from_utf8_lossy(name);
                    if is_secret(name.as_bytes()) {
                        map.entry(&name, &"<redacted>");
                    } else {
                        map.entry(&name, &String::from_utf8_lossy(value));
                    }
                }
                map.finish()
            }
        }
        f.debug_struct("RequestSnapshot")
            .field("method", &self.method)
            .field("uri", self.uri())
            .field("version", &self.version)
            .field("headers", &Headers(self))
            .field("truncated", &self.truncated)
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
        RequestSnapshot::new(&request, &SnapshotConfig::default())
    }

    #[test]
    fn the_path_is_read_without_rebuilding_the_uri() {
        for (uri, path) in [
            ("/orders/7?page=2", "/orders/7"),
            ("/", "/"),
            ("http://example.com/a/b?c", "/a/b"),
            ("http://example.com", "/"),
            ("*", "*"),
        ] {
            let request = Request::builder().uri(uri).body(()).unwrap();
            let snapshot = RequestSnapshot::new(&request, &SnapshotConfig::default());
            assert_eq!(snapshot.path(), path, "{uri}");
            assert_eq!(snapshot.path(), request.uri().path(), "{uri}");
        }
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
    fn the_copy_keeps_target_headers_and_their_order() {
        let request = Request::post("https://example.com:8443/orders/7?expand=items")
            .header("user-agent", "probe/1.0")
            .header("x-dup", "one")
            .header("x-dup", "two")
            .header("x-bytes", HeaderValue::from_bytes(b"caf\xe9").unwrap())
            .body(())
            .unwrap();
        let snapshot = RequestSnapshot::new(&request, &SnapshotConfig::default());
        assert_eq!(snapshot.method(), Method::POST);
        assert_eq!(snapshot.uri(), request.uri());
        assert_eq!(snapshot.headers(), request.headers());
        assert_eq!(snapshot.header("User-Agent"), Some("probe/1.0"));
        assert_eq!(snapshot.header("x-dup"), Some("one"));
        assert_eq!(snapshot.header("x-bytes"), None, "not UTF-8");
        assert_eq!(snapshot.header("missing"), None);
    }

    #[test]
    fn every_form_of_request_target_survives() {
        for target in [
            "/",
            "/a/b?c=d&e",
            "*",
            "http://example.com/x?y",
            "example.com:443",
        ] {
            let request = Request::builder().uri(target).body(()).unwrap();
            let snapshot = RequestSnapshot::new(&request, &SnapshotConfig::default());
            assert_eq!(snapshot.uri(), request.uri(), "{target}");
        }
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
        let text = format!(
            "{:?}",
            RequestSnapshot::new(&request, &SnapshotConfig::default())
        );
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("visible"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    fn request(target: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::get(target);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("test request is valid")
    }

    fn capped(max_bytes: usize) -> SnapshotConfig {
        SnapshotConfig::new().max_bytes(max_bytes)
    }

    fn names(snapshot: &RequestSnapshot) -> Vec<&str> {
        snapshot
            .raw_headers()
            .map(|(name, _)| std::str::from_utf8(name).unwrap())
            .collect()
    }

    #[test]
    fn the_defaults_keep_every_header_up_to_16_kib() {
        let config = SnapshotConfig::default();
        assert!(matches!(config.keep, Keep::All));
        assert_eq!(config.max_bytes, 16 * 1024);
        assert_eq!(SnapshotConfig::DEFAULT_MAX_BYTES, 16 * 1024);

        // `/` and one header of exactly what is left: 8 + 5 + value.
        let fits = "v".repeat(16 * 1024 - 1 - LENGTHS - 5);
        let snapshot = RequestSnapshot::new(&request("/", &[("x-big", &fits)]), &config);
        assert!(!snapshot.truncated());
        assert_eq!(snapshot.held_bytes(), SNAPSHOT_SIZE + 16 * 1024);
        let one_more = format!("{fits}v");
        let snapshot = RequestSnapshot::new(&request("/", &[("x-big", &one_more)]), &config);
        assert!(snapshot.truncated());
        assert_eq!(snapshot.held_bytes(), SNAPSHOT_SIZE + 1);
    }

    #[test]
    fn headers_are_kept_in_order_until_the_first_that_does_not_fit() {
        // "/a" is 2 bytes; the headers cost 8 + 3 + 4 = 15, 8 + 3 + 10 = 21 and 8 + 3 + 1 = 12.
        let request = request(
            "/a",
            &[("x-a", "1234"), ("x-b", "0123456789"), ("x-c", "1")],
        );
        let snapshot = RequestSnapshot::new(&request, &capped(2 + 15 + 20));
        // `x-c` would fit, but is after the first that does not.
        assert_eq!(names(&snapshot), ["x-a"]);
        assert!(snapshot.truncated());
        assert_eq!(snapshot.held_bytes(), SNAPSHOT_SIZE + 2 + 15);
        assert_eq!(snapshot.header("x-a"), Some("1234"));
        assert_eq!(snapshot.header("x-c"), None);
        let mut expected = HeaderMap::new();
        expected.insert("x-a", HeaderValue::from_static("1234"));
        assert_eq!(snapshot.headers(), &expected);
        assert_eq!(snapshot.uri(), "/a");

        let snapshot = RequestSnapshot::new(&request, &capped(2 + 15 + 21));
        assert_eq!(names(&snapshot), ["x-a", "x-b"]);
        assert!(snapshot.truncated());

        let snapshot = RequestSnapshot::new(&request, &capped(2 + 15 + 21 + 12));
        assert_eq!(names(&snapshot), ["x-a", "x-b", "x-c"]);
        assert!(!snapshot.truncated(), "exactly the cap fits");
        assert_eq!(snapshot.held_bytes(), SNAPSHOT_SIZE + 2 + 15 + 21 + 12);
        assert_eq!(snapshot.headers(), request.headers());
    }

    #[test]
    fn a_keep_list_skips_other_headers_without_truncating() {
        let big = "x".repeat(1000);
        let request = request(
            "/",
            &[
                ("accept", "*/*"),
                ("cookie", "a=1; b=2"),
                ("x-other", &big),
                ("user-agent", "probe/1.0"),
                ("x-request-id", "r-7"),
                ("cookie", "c=3"),
            ],
        );
        let config = SnapshotConfig::new()
            .keep_headers([
                COOKIE,
                http::header::USER_AGENT,
                HeaderName::from_static("x-request-id"),
            ])
            .max_bytes(100);
        let snapshot = RequestSnapshot::new(&request, &config);
        assert!(!snapshot.truncated(), "left out by the list, not the cap");
        // A `HeaderMap` yields a name's values together, after its first.
        assert_eq!(
            names(&snapshot),
            ["cookie", "cookie", "user-agent", "x-request-id"]
        );
        let expected = 1 + (8 + 6 + 8) + (8 + 6 + 3) + (8 + 10 + 9) + (8 + 12 + 3);
        assert_eq!(snapshot.held_bytes(), SNAPSHOT_SIZE + expected);
        assert_eq!(
            snapshot.cookies().collect::<Vec<_>>(),
            [("a", "1"), ("b", "2"), ("c", "3")]
        );
        assert_eq!(snapshot.cookie("c"), Some("3"));
        assert_eq!(snapshot.header("user-agent"), Some("probe/1.0"));
        assert_eq!(snapshot.header("X-Request-Id"), Some("r-7"));
        assert_eq!(snapshot.header("accept"), None);
        assert_eq!(snapshot.headers().len(), 4);
        assert_eq!(snapshot.headers().get_all(COOKIE).iter().count(), 2);
        assert!(snapshot.headers().get("x-other").is_none());

        // The cap applies to what the list keeps.
        let snapshot = RequestSnapshot::new(&request, &config.clone().max_bytes(expected - 1));
        assert!(snapshot.truncated());
        assert_eq!(names(&snapshot), ["cookie", "cookie", "user-agent"]);

        // A name listed twice is copied once, and the request id is always kept, last.
        let twice = RequestSnapshot::new(
            &request,
            &SnapshotConfig::new().keep_headers([COOKIE, COOKIE]),
        );
        assert_eq!(names(&twice), ["cookie", "cookie", "x-request-id"]);
        assert_eq!(twice.request_id(), Some("r-7"));

        // An empty list keeps only the request id; back to all of them.
        let none = RequestSnapshot::new(&request, &config.clone().keep_headers([]));
        assert_eq!(none.held_bytes(), SNAPSHOT_SIZE + 1 + (8 + 12 + 3));
        assert!(!none.truncated());
        let all = RequestSnapshot::new(&request, &config.keep_all_headers().max_bytes(usize::MAX));
        assert_eq!(all.headers(), request.headers());
    }

    #[test]
    fn a_target_that_does_not_fit_is_cut_to_its_path() {
        for (target, max_bytes, path) in [
            ("/orders/7?page=2", 15, "/orders/7"),
            ("/orders/7?page=2", 5, "/orde"),
            ("http://example.com/a/b?c", 10, "/a/b"),
            ("http://example.com", 10, "/"),
            ("/caf\u{e9}/x", 5, "/caf"),
            ("/caf\u{e9}/x", 6, "/caf\u{e9}"),
            ("example.com:443", 3, "/"),
            ("/abc", 0, "/"),
            ("*", 0, "/"),
        ] {
            let request = request(target, &[("x-a", "1")]);
            let snapshot = RequestSnapshot::new(&request, &capped(max_bytes));
            assert!(snapshot.truncated(), "{target}");
            assert_eq!(snapshot.path(), path, "{target}");
            assert_eq!(snapshot.uri().path(), path, "{target}");
            assert_eq!(snapshot.uri().query(), None, "{target}");
            assert_eq!(snapshot.uri().authority(), None, "{target}");
            assert!(snapshot.headers().is_empty(), "{target}");
            assert!(
                snapshot.held_bytes() <= SNAPSHOT_SIZE + max_bytes,
                "{target}"
            );
        }
    }

    #[test]
    fn a_long_method_counts_and_is_cut_when_it_does_not_fit() {
        let long = Method::from_bytes(&[b'M'; 40]).unwrap();
        let mut request = request("/", &[]);
        *request.method_mut() = long.clone();

        let snapshot = RequestSnapshot::new(&request, &capped(41));
        assert!(!snapshot.truncated());
        assert_eq!(snapshot.method(), long);
        assert_eq!(snapshot.held_bytes(), SNAPSHOT_SIZE + 40 + 1);

        let snapshot = RequestSnapshot::new(&request, &capped(39));
        assert!(snapshot.truncated());
        assert_eq!(snapshot.method().as_str(), "M".repeat(INLINE_METHOD));
        assert_eq!(snapshot.held_bytes(), SNAPSHOT_SIZE + 1);

        // Short methods are stored inline and cost nothing.
        *request.method_mut() = Method::from_bytes(b"PURGE").unwrap();
        let snapshot = RequestSnapshot::new(&request, &capped(1));
        assert!(!snapshot.truncated());
        assert_eq!(snapshot.held_bytes(), SNAPSHOT_SIZE + 1);
    }

    #[test]
    fn debug_says_whether_the_snapshot_was_truncated() {
        let request = request("/", &[("x-a", "1")]);
        let text = format!("{:?}", RequestSnapshot::new(&request, &capped(1)));
        assert!(text.contains("truncated: true"), "{text}");
    }

    mod hostile {
        use super::*;
        use http::header::{ACCEPT, USER_AGENT};
        use proptest::prelude::*;

        /// Names the strategies pick from, so that keep-lists and duplicates meet.
        fn pool() -> [HeaderName; 5] {
            [
                COOKIE,
                USER_AGENT,
                ACCEPT,
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("x-dup"),
            ]
        }

        fn name() -> impl Strategy<Value = HeaderName> {
            prop_oneof![
                3 => (0..pool().len()).prop_map(|index| pool()[index].clone()),
                1 => "x-[a-z0-9-]{1,30}".prop_map(|name| HeaderName::try_from(name).unwrap()),
            ]
        }

        /// Any bytes `HeaderValue` accepts, UTF-8 or not, cookie separators included. A long
        /// value repeats a short random pattern: a strategy per byte would make the test slow.
        fn value() -> impl Strategy<Value = HeaderValue> {
            let byte = prop_oneof![
                Just(b'\t'),
                Just(b'='),
                Just(b';'),
                0x20_u8..=0x7e,
                0x80_u8..=0xff,
            ];
            let pattern = prop::collection::vec(byte, 1..24);
            let len = prop_oneof![8 => 0_usize..40, 2 => 0_usize..4000];
            (pattern, len).prop_map(|(pattern, len)| {
                let bytes: Vec<u8> = pattern.into_iter().cycle().take(len).collect();
                HeaderValue::from_bytes(&bytes).unwrap()
            })
        }

        fn target() -> impl Strategy<Value = Uri> {
            let path = prop_oneof![
                "/[a-z0-9/%.-]{0,40}(\\?[a-z0-9=&]{0,40})?".boxed(),
                // Long, and with multi-byte characters where a cut may land.
                (0_usize..12_000, 0_usize..8_000)
                    .prop_map(|(path, query)| {
                        let path: String = (0..path)
                            .map(|i| if i % 3 == 0 { '\u{e9}' } else { 'a' })
                            .collect();
                        format!("/{path}?{}", "q".repeat(query))
                    })
                    .boxed(),
            ];
            prop_oneof![
                4 => path.clone(),
                1 => path.prop_map(|path| format!("http://example.com{path}")),
                1 => Just("*".to_owned()),
                1 => Just("example.com:443".to_owned()),
            ]
            .prop_map(|target| Uri::try_from(target).unwrap())
        }

        fn method() -> impl Strategy<Value = Method> {
            prop_oneof![
                Just(Method::GET),
                Just(Method::POST),
                "[A-Z]{1,40}".prop_map(|method| Method::from_bytes(method.as_bytes()).unwrap()),
            ]
        }

        fn config() -> impl Strategy<Value = (Option<Vec<HeaderName>>, usize)> {
            let keep = prop_oneof![
                Just(None),
                // Duplicates, names never sent, and more than `LOOKUPS` names.
                prop::collection::vec(name(), 0..12).prop_map(Some),
            ];
            let max_bytes = prop_oneof![
                0_usize..200,
                0_usize..20_000,
                Just(SnapshotConfig::DEFAULT_MAX_BYTES),
                Just(usize::MAX),
            ];
            (keep, max_bytes)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn the_cap_and_the_list_hold_against_hostile_requests(
                method in method(),
                target in target(),
                headers in prop::collection::vec((name(), value()), 0..=100),
                (keep, max_bytes) in config(),
            ) {
                let mut request = Request::new(());
                *request.method_mut() = method;
                *request.uri_mut() = target;
                for (name, value) in headers {
                    request.headers_mut().append(name, value);
                }
                let mut config = SnapshotConfig::new().max_bytes(max_bytes);
                if let Some(names) = keep.clone() {
                    config = config.keep_headers(names);
                }
                let snapshot = RequestSnapshot::new(&request, &config);

                prop_assert!(snapshot.held_bytes() <= max_bytes.saturating_add(SNAPSHOT_SIZE));

                // The kept headers are the first of those the list keeps: in request order, or
                // in the list's order, each name's values in request order.
                let request_id = REQUEST_ID;
                let listed: Vec<_> = match &keep {
                    None => request.headers().iter().collect(),
                    Some(names) => {
                        let mut unique: Vec<&HeaderName> = Vec::new();
                        // The request id is always kept, after the listed names.
                        for name in names.iter().chain([&request_id]) {
                            if !unique.contains(&name) {
                                unique.push(name);
                            }
                        }
                        unique
                            .into_iter()
                            .flat_map(|name| request.headers().get_all(name).iter().map(move |value| (name, value)))
                            .collect()
                    }
                };
                let kept: Vec<_> = snapshot.raw_headers().collect();
                prop_assert!(kept.len() <= listed.len());
                for ((name, value), (listed_name, listed_value)) in kept.iter().zip(&listed) {
                    prop_assert_eq!(*name, listed_name.as_str().as_bytes());
                    prop_assert_eq!(*value, listed_value.as_bytes());
                }

                // Truncated exactly when the cap cut something, and only what did not fit.
                let full_target = target_parts(request.uri()).concat();
                let target_cut = snapshot.raw[..snapshot.target_len as usize] != *full_target.as_bytes();
                let method_cut = snapshot.method() != request.method();
                let headers_cut = kept.len() < listed.len();
                prop_assert_eq!(snapshot.truncated(), target_cut || method_cut || headers_cut);
                if headers_cut {
                    let (name, value) = listed[kept.len()];
                    let used = snapshot.held_bytes() - SNAPSHOT_SIZE;
                    prop_assert!(used + LENGTHS + name.as_str().len() + value.len() > max_bytes);
                }
                if target_cut {
                    prop_assert!(method_heap(snapshot.method()) + full_target.len() > max_bytes);
                    prop_assert!(request.uri().path().starts_with(snapshot.path()) || snapshot.path() == "/");
                    prop_assert_eq!(snapshot.uri().query(), None);
                } else {
                    prop_assert_eq!(snapshot.uri(), request.uri());
                }
                if method_cut {
                    prop_assert!(request.method().as_str().starts_with(snapshot.method().as_str()));
                }

                // Every reader sees what was kept, and only that.
                prop_assert_eq!(snapshot.path(), snapshot.uri().path());
                let mut expected = HeaderMap::new();
                let mut only_kept = Request::new(());
                for (name, value) in &kept {
                    let name = HeaderName::from_bytes(name).unwrap();
                    let value = HeaderValue::from_bytes(value).unwrap();
                    expected.append(name.clone(), value.clone());
                    only_kept.headers_mut().append(name, value);
                }
                prop_assert_eq!(snapshot.headers(), &expected);
                for name in pool() {
                    let first = expected.get(&name).and_then(|value| std::str::from_utf8(value.as_bytes()).ok());
                    prop_assert_eq!(snapshot.header(name.as_str()), first);
                }
                let uncapped = RequestSnapshot::new(&only_kept, &capped(usize::MAX));
                prop_assert!(snapshot.cookies().eq(uncapped.cookies()));
                let _ = format!("{snapshot:?}");
            }
        }
    }
}
