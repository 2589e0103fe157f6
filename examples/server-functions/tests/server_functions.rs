//! The example's promises, with its own app, a real server on 127.0.0.1 and a real HTTP client:
//! a server function's work runs after its response, sees that response, and runs once; during
//! server-side rendering the handle from the request parts still works, the free function does
//! not; and `AfterLayer` must come after `leptos_routes`.
//!
//! Every wait is bounded by a generous deadline that only a broken promise reaches; no test
//! asserts how long anything took.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use leptos::prelude::*;
use leptos_axum::{generate_route_list, AxumRouteListing, LeptosRoutes};
use leptos_router::components::{Route, Router as LeptosRouter, Routes};
use leptos_router::StaticSegment;
use server_functions::{app, routes, shell, subscribe, Action, Analytics, Mailer, Services};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tower_after::{After, AfterLayer, AfterTasks, Completion};

/// What only a broken promise makes a test wait for.
const DEADLINE: Duration = Duration::from_secs(30);

/// Awaits `future`, or fails the test naming `what` once the deadline has passed.
async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {DEADLINE:?}"))
}

/// Services whose every piece of work says that it has started, then waits at a gate that the
/// test opens, then records what it did.
struct Gated {
    services: Services,
    gate: watch::Sender<bool>,
    started: mpsc::UnboundedReceiver<&'static str>,
    actions: Arc<Mutex<Vec<Action>>>,
    emails: Arc<Mutex<Vec<String>>>,
}

fn gated() -> Gated {
    let (gate, opened) = watch::channel(false);
    let (started_tx, started) = mpsc::unbounded_channel();
    let actions = Arc::new(Mutex::new(Vec::new()));
    let emails = Arc::new(Mutex::new(Vec::new()));
    let analytics = Analytics::new({
        let (started, opened, actions) = (started_tx.clone(), opened.clone(), actions.clone());
        move |action| {
            let (started, mut opened, actions) = (started.clone(), opened.clone(), actions.clone());
            async move {
                let _ = started.send("analytics");
                let _ = opened.wait_for(|open| *open).await;
                actions.lock().unwrap().push(action);
            }
        }
    });
    let mailer = Mailer::new({
        let emails = emails.clone();
        move |email| {
            let (started, mut opened, emails) =
                (started_tx.clone(), opened.clone(), emails.clone());
            async move {
                let _ = started.send("mail");
                let _ = opened.wait_for(|open| *open).await;
                emails.lock().unwrap().push(email);
            }
        }
    });
    Gated {
        services: Services::new(mailer, analytics),
        gate,
        started,
        actions,
        emails,
    }
}

impl Gated {
    /// Waits until `count` pieces of work have started, and returns their kinds, sorted.
    async fn started(&mut self, count: usize) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        for _ in 0..count {
            let kind = within("a piece of work starts", self.started.recv()).await;
            kinds.push(kind.expect("the services are alive"));
        }
        kinds.sort_unstable();
        kinds
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }

    fn actions(&self) -> Vec<Action> {
        self.actions.lock().unwrap().clone()
    }

    fn emails(&self) -> Vec<String> {
        self.emails.lock().unwrap().clone()
    }
}

struct Server {
    addr: SocketAddr,
    tasks: AfterTasks,
    stop: oneshot::Sender<()>,
    serving: JoinHandle<()>,
}

/// The route lists of both apps of these tests, generated before any test serves: while Leptos
/// generates one, no resource of the process loads, and a page that another test renders at that
/// moment would hang (see [`routes`]).
struct RouteLists {
    app: Vec<AxumRouteListing>,
    probe: Vec<AxumRouteListing>,
}

fn route_lists() -> &'static RouteLists {
    static LISTS: LazyLock<RouteLists> = LazyLock::new(|| RouteLists {
        app: routes(),
        probe: generate_route_list(ProbeApp),
    });
    &LISTS
}

/// `router` served on 127.0.0.1 by a task of the current runtime.
async fn serve(router: axum::Router, tasks: AfterTasks) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Server {
        addr,
        tasks,
        stop,
        serving,
    }
}

impl Server {
    /// Stops the way the program does: no new requests, then the `after` work is drained.
    async fn shut_down(self) {
        let _ = self.stop.send(());
        within("the server stops", self.serving).await.unwrap();
        let report = self.tasks.shutdown(DEADLINE).await;
        assert_eq!(report.cancelled(), 0, "no after work is cut off");
    }
}

/// A response, read to its end.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

/// Sends `request` with a client of its own and reads the response to its end.
async fn send(request: Request<Full<Bytes>>) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = within("the response", client.request(request))
        .await
        .expect("a response");
    let status = response.status();
    let headers = response.headers().clone();
    let body = within("the response's body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap()
}

/// A call of the server function at `path` as Leptos's client makes it: the arguments as a
/// form, the result as JSON.
fn call(addr: SocketAddr, path: &str, form: &'static str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}{path}"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .body(Full::from(form))
        .unwrap()
}

/// The form of the page posted by a browser without JavaScript.
fn form_post(addr: SocketAddr, form: &'static str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/api/subscribe"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "text/html,application/xhtml+xml")
        .header(header::REFERER, format!("http://{addr}/"))
        .body(Full::from(form))
        .unwrap()
}

async fn serve_app(services: Services) -> Server {
    route_lists();
    let (router, tasks) = app(services);
    serve(router, tasks).await
}

/// Called over HTTP, the server function answers while both its pieces of work wait at their
/// gate; once opened, each runs exactly once, and the record sees the finished response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_function_s_work_runs_after_its_response() {
    let mut gated = gated();
    let server = serve_app(gated.services.clone()).await;

    // The gate is shut: were the response to wait for its work, it would never come.
    let reply = send(call(
        server.addr,
        "/api/subscribe",
        "email=alice%40example.com",
    ))
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body, r#""alice@example.com subscribed""#);

    // Both started once the response was read, by the extracted handle and by `after`.
    assert_eq!(gated.started(2).await, ["analytics", "mail"]);
    assert!(gated.actions().is_empty());
    assert!(gated.emails().is_empty());
    assert_eq!(server.tasks.stats().completed(), 0);

    gated.open();
    within("the work ends", server.tasks.idle()).await;
    assert_eq!(gated.emails(), ["alice@example.com"]);
    assert_eq!(
        gated.actions(),
        [Action {
            name: "subscribe",
            path: "/api/subscribe".to_owned(),
            status: Some(200),
            completion: Completion::Complete,
            bytes: reply.body.len() as u64,
        }]
    );
    assert_eq!(server.tasks.stats().completed(), 2);
    server.shut_down().await;
}

/// The page's `<ActionForm>` posted without JavaScript: `leptos_axum` redirects back to the page,
/// and the work sees that redirect. The page then counts the new subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_posted_without_javascript_is_redirected_and_its_work_sees_the_redirect() {
    let gated = gated();
    gated.open();
    let server = serve_app(gated.services.clone()).await;

    let page = send(get(server.addr, "/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body
            .contains(r#"<form action="/api/subscribe" method="post">"#),
        "{}",
        page.body
    );

    let reply = send(form_post(server.addr, "email=bob%40example.com")).await;
    assert_eq!(reply.status, StatusCode::FOUND, "{}", reply.body);
    let location = reply.headers[header::LOCATION].to_str().unwrap();
    assert!(
        location.starts_with(&format!("http://{}/", server.addr)),
        "{location}"
    );
    within("the work ends", server.tasks.idle()).await;
    assert_eq!(gated.emails(), ["bob@example.com"]);
    let subscribed: Vec<_> = gated
        .actions()
        .into_iter()
        .filter(|action| action.name == "subscribe")
        .map(|action| (action.path, action.status))
        .collect();
    assert_eq!(subscribed, [("/api/subscribe".to_owned(), Some(302))]);

    let page = send(get(server.addr, "/")).await;
    assert!(page.body.contains("1 subscribed so far"), "{}", page.body);
    server.shut_down().await;
}

/// A server function that returns an error answers `500`; the work registered before the error
/// still runs, and sees the `500`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_function_that_fails_still_runs_its_work_with_the_error_status() {
    let gated = gated();
    gated.open();
    let server = serve_app(gated.services.clone()).await;

    let reply = send(call(server.addr, "/api/subscribe", "email=nobody")).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        reply.body.contains("is not an e-mail address"),
        "{}",
        reply.body
    );
    within("the work ends", server.tasks.idle()).await;
    let actions = gated.actions();
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0].status, Some(500));
    assert!(gated.emails().is_empty(), "no welcome for a failed call");
    assert_eq!(server.tasks.stats().completed(), 1);
    server.shut_down().await;
}

/// While the page is rendered on the server, it calls `subscriber_count` in a resource: the
/// handle extracted there is the page's, so the record waits for the page's whole stream and
/// sees its path, its status and all its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_rendering_the_extracted_handle_belongs_to_the_page_s_request() {
    let mut gated = gated();
    let server = serve_app(gated.services.clone()).await;

    let page = send(get(server.addr, "/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("0 subscribed so far"), "{}", page.body);

    assert_eq!(gated.started(1).await, ["analytics"]);
    assert!(gated.actions().is_empty());
    gated.open();
    within("the work ends", server.tasks.idle()).await;
    assert_eq!(
        gated.actions(),
        [Action {
            name: "subscriber_count",
            path: "/".to_owned(),
            status: Some(200),
            completion: Completion::Complete,
            bytes: page.body.len() as u64,
        }]
    );
    assert_eq!(server.tasks.stats().completed(), 1);
    server.shut_down().await;
}

/// What one piece of the probe's work saw: when it was registered (before or after waiting), the
/// path of its request, and the bytes of its response.
type Sight = (&'static str, String, u64);

/// What the probe's work saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Sight>>>);

impl Seen {
    fn take(&self) -> Vec<Sight> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Whether the free function and the handle from the request parts reach the request, before
/// and after an await that waits, as a query to a database does.
#[server(endpoint = "probe")]
async fn probe() -> Result<String, ServerFnError> {
    let before = reach("before").await;
    tokio::task::yield_now().await;
    let then = reach("after").await;
    Ok(format!("before waiting: {before}; after waiting: {then}"))
}

/// Registers empty work with `after()` if it reaches the request, and through the handle work
/// that records which response it followed.
async fn reach(when: &'static str) -> String {
    let free = match tower_after::try_after(async {}) {
        Ok(()) => "in scope",
        Err(_) => "out of scope",
    };
    let handle = match leptos_axum::extract::<After>().await {
        Ok(after) => {
            let seen = use_context::<Seen>().expect("the probe's router provides Seen");
            after.run_with(move |ctx| async move {
                let path = ctx.request().path().to_owned();
                let bytes = ctx.outcome().body_bytes();
                seen.0.lock().unwrap().push((when, path, bytes));
            });
            "present"
        }
        Err(_) => "missing",
    };
    format!("after() {free}, handle {handle}")
}

#[component]
fn ProbeApp() -> impl IntoView {
    view! {
        <LeptosRouter>
            <Routes fallback=|| "Not found.">
                <Route path=StaticSegment("probe") view=ProbePage />
            </Routes>
        </LeptosRouter>
    }
}

#[component]
fn ProbePage() -> impl IntoView {
    let probed = Resource::new(|| (), |_| probe());
    view! {
        <Suspense fallback=|| "probing">
            {move || Suspend::new(async move {
                probed.await.unwrap_or_else(|error| error.to_string())
            })}
        </Suspense>
    }
}

/// Over HTTP, `leptos_axum` awaits the server function inside the request's response future,
/// so the free function reaches the request all along. During rendering, the resource that calls
/// the server function polls it once where the page is built, inside the response future, then
/// moves it to a task of its own: past its first await that waits, only the handle from the
/// request parts reaches the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_rendering_the_free_function_reaches_the_request_only_until_the_first_wait() {
    let seen = Seen::default();
    let options = LeptosOptions::builder().output_name("probe").build();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let router = axum::Router::new()
        .leptos_routes_with_context(
            &options,
            route_lists().probe.clone(),
            {
                let seen = seen.clone();
                move || provide_context(seen.clone())
            },
            ProbeApp,
        )
        .with_state(options)
        .layer(layer);
    let server = serve(router, tasks).await;

    let over_http = send(call(server.addr, "/api/probe", "")).await;
    assert_eq!(over_http.status, StatusCode::OK, "{}", over_http.body);
    assert_eq!(
        over_http.body,
        "\"before waiting: after() in scope, handle present; \
         after waiting: after() in scope, handle present\""
    );
    within("the work ends", server.tasks.idle()).await;
    let bytes = over_http.body.len() as u64;
    assert_eq!(
        seen.take(),
        [
            ("before", "/api/probe".to_owned(), bytes),
            ("after", "/api/probe".to_owned(), bytes)
        ]
    );
    assert_eq!(
        server.tasks.stats().completed(),
        4,
        "two after(), two handle"
    );

    let rendered = send(get(server.addr, "/probe")).await;
    assert_eq!(rendered.status, StatusCode::OK);
    assert!(
        rendered.body.contains(
            "before waiting: after() in scope, handle present; \
             after waiting: after() out of scope, handle present"
        ),
        "{}",
        rendered.body
    );
    within("the work ends", server.tasks.idle()).await;
    // The handle's work, registered from the task that Leptos spawned, too, followed the page's
    // whole stream.
    let bytes = rendered.body.len() as u64;
    assert_eq!(
        seen.take(),
        [
            ("before", "/probe".to_owned(), bytes),
            ("after", "/probe".to_owned(), bytes)
        ]
    );
    assert_eq!(
        server.tasks.stats().completed(),
        4 + 3,
        "one after(), two handle"
    );
    server.shut_down().await;
}

/// `Router::layer` wraps only the routes already there: an `AfterLayer` added before
/// `leptos_routes` misses the server functions, whose handle is then missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_after_layer_added_before_leptos_routes_misses_the_server_functions() {
    let gated = gated();
    gated.open();
    let options = LeptosOptions::builder().output_name("too-early").build();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let services = gated.services.clone();
    let router = axum::Router::new()
        .layer(layer)
        .leptos_routes_with_context(
            &options,
            route_lists().app.clone(),
            move || provide_context(services.clone()),
            shell,
        )
        .with_state(options);
    let server = serve(router, tasks).await;

    let reply = send(call(
        server.addr,
        "/api/subscribe",
        "email=carol%40example.com",
    ))
    .await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        reply.body.contains("no `After` handle") && reply.body.contains("after `leptos_routes`"),
        "{}",
        reply.body
    );
    assert!(
        gated.services.subscribers.lock().unwrap().is_empty(),
        "nothing is done without the handle"
    );
    within("the work ends", server.tasks.idle()).await;
    assert_eq!(server.tasks.stats().scheduled(), 0);
    server.shut_down().await;
}

/// Called as a plain Rust function on the server, outside `leptos_axum`, a server function has
/// no request head, so no handle: it fails rather than drop its work.
#[tokio::test]
async fn a_server_function_called_in_process_has_no_handle() {
    let error = subscribe("dave@example.com".to_owned())
        .await
        .expect_err("no request, no handle");
    assert!(error.to_string().contains("no `After` handle"), "{error}");
}
