//! [`SnapshotConfig`]: what a [`RequestSnapshot`](crate::RequestSnapshot) keeps of a request, and
//! the visit of the headers it keeps, which the snapshot copies.

use http::header::GetAll;
use http::{HeaderMap, HeaderName, HeaderValue};

/// The request id header that the crate's log lines and spans name.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What a [`RequestSnapshot`](crate::RequestSnapshot) keeps of a request: which headers, and at most how many bytes.
///
/// Every pending callback holds its request's snapshot, so what a client sends decides what the
/// layer holds: hyper accepts headers of hundreds of KiB. The cap bounds that per request; the
/// keep-list drops the headers callbacks do not read, and makes the snapshot cheaper to take.
///
/// By default all headers are kept, up to [`DEFAULT_MAX_BYTES`](Self::DEFAULT_MAX_BYTES)
/// (16 KiB, the header size limit of Node.js and so of Next.js).
///
/// What counts against the cap, in this order:
///
/// 1. the method, if it is an extension longer than 15 bytes (shorter ones are stored inline);
///    one that does not fit is cut to its first 15 bytes;
/// 2. the request target (`scheme://authority/path?query`, as it came); one that does not fit
///    is replaced by its path alone, cut at a character boundary to what fits (`/` if nothing
///    does), so that [`RequestSnapshot::uri`](crate::RequestSnapshot::uri) and [`RequestSnapshot::path`](crate::RequestSnapshot::path) stay valid;
/// 3. each kept header: its name, its value and 8 bytes of bookkeeping. Headers are taken in
///    the order of the request's `HeaderMap` (request order, with a name's later values right
///    after its first), or with a keep-list in the list's order, while they fit; the first one
///    that does not fit and every later one are left out. So a header found in the snapshot is
///    always the request's first of that name, and a keep-list's first names are the last to go.
///
/// Whatever is cut or left out by the cap marks the snapshot
/// [`truncated`](crate::RequestSnapshot::truncated); headers left out by the keep-list do not.
///
/// ```
/// use http::header::{COOKIE, USER_AGENT};
/// use http::HeaderName;
/// use tower_after::SnapshotConfig;
///
/// let config = SnapshotConfig::new()
///     .keep_headers([COOKIE, USER_AGENT, HeaderName::from_static("x-request-id")])
///     .max_bytes(4 * 1024);
/// ```
#[derive(Clone, Debug)]
pub struct SnapshotConfig {
    pub(crate) keep: Keep,
    pub(crate) max_bytes: usize,
}

/// Which headers a snapshot keeps.
#[derive(Clone, Debug)]
pub(crate) enum Keep {
    All,
    /// Without duplicates, in the caller's order. Each is looked up in the request's map.
    Only(Box<[HeaderName]>),
}

impl SnapshotConfig {
    /// The default cap, 16 KiB: what Node.js, and so Next.js, accepts for a request's headers.
    pub const DEFAULT_MAX_BYTES: usize = 16 * 1024;

    /// All headers, up to [`DEFAULT_MAX_BYTES`](Self::DEFAULT_MAX_BYTES).
    #[must_use]
    pub fn new() -> Self {
        Self {
            keep: Keep::All,
            max_bytes: Self::DEFAULT_MAX_BYTES,
        }
    }

    /// Keeps only the headers called `names` (all their values), and skips the others without
    /// copying them: cheaper than keeping all, for a few names. Under the cap, earlier names
    /// come first. `x-request-id` is always kept, after them: the crate's own log lines and
    /// spans name the request by it.
    #[must_use]
    pub fn keep_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        let mut unique = Vec::new();
        for name in names.into_iter().chain([REQUEST_ID]) {
            // Listed twice, a header would be copied twice.
            if !unique.contains(&name) {
                unique.push(name);
            }
        }
        self.keep = Keep::Only(unique.into_boxed_slice());
        self
    }

    /// Keeps every header (the default).
    #[must_use]
    pub fn keep_all_headers(mut self) -> Self {
        self.keep = Keep::All;
        self
    }

    /// The most bytes one snapshot holds beyond its fixed size (16 KiB by default);
    /// `usize::MAX` for no cap.
    #[must_use]
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The cap, for the crate's own messages.
    pub(crate) fn max_bytes_value(&self) -> usize {
        self.max_bytes
    }
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// The headers a snapshot keeps, visited in order as `(name, value)` until the visitor returns
/// `false`. Visiting with a closure, rather than iterating, keeps the nested loops of [`Listed`]
/// as cheap as plain ones.
pub(crate) trait Kept {
    fn visit(&self, visitor: impl FnMut(&[u8], &HeaderValue) -> bool);
}

/// Every header, in the map's order.
pub(crate) struct All<'a>(pub(crate) &'a HeaderMap);

impl Kept for All<'_> {
    fn visit(&self, mut visitor: impl FnMut(&[u8], &HeaderValue) -> bool) {
        for (name, value) in self.0 {
            if !visitor(name.as_str().as_bytes(), value) {
                return;
            }
        }
    }
}

/// The values of the listed names, in the list's order. A lookup per name, not a comparison per
/// header and name: with a few names, fewer instructions, and the headers left out are never
/// touched.
pub(crate) struct Listed<'a> {
    headers: &'a HeaderMap,
    names: &'a [HeaderName],
    /// The first names' lookups, made once for both visits.
    found: [Option<GetAll<'a, HeaderValue>>; LOOKUPS],
}

/// How many lookups [`Listed`] keeps; names beyond are looked up on each visit.
pub(crate) const LOOKUPS: usize = 8;

impl<'a> Listed<'a> {
    pub(crate) fn new(headers: &'a HeaderMap, names: &'a [HeaderName]) -> Self {
        let found = std::array::from_fn(|i| names.get(i).map(|name| headers.get_all(name)));
        Self {
            headers,
            names,
            found,
        }
    }
}

impl Kept for Listed<'_> {
    fn visit(&self, mut visitor: impl FnMut(&[u8], &HeaderValue) -> bool) {
        for (index, name) in self.names.iter().enumerate() {
            let looked_up;
            let values = match self.found.get(index) {
                Some(Some(found)) => found,
                _ => {
                    looked_up = self.headers.get_all(name);
                    &looked_up
                }
            };
            let name = name.as_str().as_bytes();
            for value in values {
                if !visitor(name, value) {
                    return;
                }
            }
        }
    }
}
