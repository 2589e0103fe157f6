//! Run with
//!
//! ```not_rust
//! cargo run --manifest-path examples/server-functions/Cargo.toml
//! ```
//!
//! then open <http://127.0.0.1:3000> and subscribe to the newsletter, or call the server function
//! the way Leptos's client does, in another terminal:
//!
//! ```not_rust
//! curl -d email=alice@example.com http://127.0.0.1:3000/api/subscribe
//! ```
//!
//! A Leptos app served by `leptos_axum`: a page rendered on the server, with an `<ActionForm>`
//! that calls the server function `subscribe`. Server functions are Leptos's counterpart of the
//! Server Actions in which Next.js documents `after()`, and `subscribe` registers two pieces of
//! work for after its response: the welcome e-mail and a record for analytics. The page is only
//! rendered on the server (no WebAssembly is built, so `cargo run` is all it takes): the form is a
//! plain HTML form, which `leptos_axum` answers with a redirect back to the page.
//!
//! # Which handle to use in a server function
//!
//! - [`leptos_axum::extract`]`::<`[`After`]`>()` works wherever `leptos_axum` runs the server
//!   function: when it is called over HTTP, and when a page calls it while being rendered on the
//!   server. `leptos_axum` gives server functions a copy of the request's head (`Parts`) as
//!   Leptos context, and the copy keeps the extensions, among them the `After` handle that
//!   `AfterLayer` put there. Context follows the server function wherever Leptos polls it, so
//!   this is the one to use in a server function.
//! - The free function [`tower_after::after`] reaches the request only while the server function
//!   is polled inside the request's own response future, where `AfterLayer` keeps the request
//!   current. Over HTTP that is always so: `leptos_axum` awaits the server function in its
//!   handler. While a page is rendered it is not: the resource that calls the server function
//!   polls it once where the page is built, inside the response future, and then moves it to a
//!   task of its own. Up to its first await that waits (a query to a database, a call to
//!   another service) `after` works; past it, `after` panics and [`tower_after::try_after`]
//!   hands the work back. So `after` suits helpers deep in a server function's call tree
//!   ([`send_welcome`] here) only when HTTP calls alone reach them; pass the extracted handle
//!   down otherwise.
//!
//! Work registered through the handle during rendering belongs to the page's request: it runs
//! once the page's whole stream has been sent, and `ctx.request()` shows the page's path, not
//! `/api/...`. Called over HTTP, a server function's work sees `/api/subscribe` and the status of
//! its response: `200`, `302` for a form posted without JavaScript (redirected back to the page),
//! or `500` when the server function returned an error. Called as a plain Rust function outside
//! `leptos_axum` (from a test, a job, another handler), a server function has no request head:
//! the extractor fails, and `subscribe` returns that error rather than lose its work.
//!
//! `AfterLayer` goes on the router after `leptos_routes`: `Router::layer` wraps only the routes
//! that are already there, and `leptos_routes` adds the server functions' routes as well as the
//! pages'. Added before, it misses them, and the extractor fails with an error naming
//! `AfterLayer`.
//!
//! In an app that also builds for the browser, `tower-after` is a server-only dependency: enable
//! it with the `ssr` feature, and keep its uses in the bodies of server functions, which are only
//! compiled for the server, and in items marked `#[cfg(feature = "ssr")]`.
//!
//! The program is `src/main.rs`; its parts are this library, so that the integration tests in
//! `tests/` drive the very app that the program serves.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::Router;
use leptos::prelude::*;
use leptos_axum::{generate_route_list, AxumRouteListing, LeptosRoutes};
use leptos_router::components::{Route, Router as LeptosRouter, Routes};
use leptos_router::StaticSegment;
use tower_after::{After, AfterContext, AfterLayer, AfterTasks, Completion};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What analytics record about a server function's call, once its response is out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Action {
    /// The server function.
    pub name: &'static str,
    /// The path of the request that called it: `/api/...` over HTTP, the page's path while a
    /// page is rendered.
    pub path: String,
    /// The status of that request's response, if there was one.
    pub status: Option<u16>,
    /// How that response ended.
    pub completion: Completion,
    /// The bytes of that response's body that were sent: for a page, its whole stream.
    pub bytes: u64,
}

impl Action {
    fn new(name: &'static str, ctx: &AfterContext) -> Self {
        Self {
            name,
            path: ctx.request().path().to_owned(),
            status: ctx.outcome().status().map(|status| status.as_u16()),
            completion: ctx.outcome().completion(),
            bytes: ctx.outcome().body_bytes(),
        }
    }
}

/// Records actions. The program's logs them; a real one calls an analytics service, which may be
/// slow or down: neither must show in the response.
#[derive(Clone)]
pub struct Analytics(Arc<dyn Fn(Action) -> BoxFuture<()> + Send + Sync>);

impl Analytics {
    /// Analytics that record with `record`.
    pub fn new<F, Fut>(record: F) -> Self
    where
        F: Fn(Action) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self(Arc::new(move |action| Box::pin(record(action))))
    }

    async fn record(&self, action: Action) {
        (self.0)(action).await;
    }
}

/// Sends welcome e-mails. The program's logs them; a real one calls an e-mail service.
#[derive(Clone)]
pub struct Mailer(Arc<dyn Fn(String) -> BoxFuture<()> + Send + Sync>);

impl Mailer {
    /// A mailer that sends with `send`, given the address.
    pub fn new<F, Fut>(send: F) -> Self
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Self(Arc::new(move |email| Box::pin(send(email))))
    }

    async fn send(&self, email: String) {
        (self.0)(email).await;
    }
}

/// What the server functions use, provided to them as Leptos context.
#[derive(Clone)]
pub struct Services {
    /// The subscribers' addresses; a real app keeps them in its database.
    pub subscribers: Arc<Mutex<Vec<String>>>,
    /// Sends the welcome e-mail.
    pub mailer: Mailer,
    /// Records what was done.
    pub analytics: Analytics,
}

impl Services {
    /// No subscribers yet, and these services.
    pub fn new(mailer: Mailer, analytics: Analytics) -> Self {
        Self {
            subscribers: Arc::default(),
            mailer,
            analytics,
        }
    }
}

/// The [`Services`] that the app provided, or the error that a server function returns when
/// it is called outside the app.
fn services() -> Result<Services, ServerFnError> {
    use_context::<Services>().ok_or_else(|| {
        ServerFnError::new("no Services in the context: serve the server functions with `app`")
    })
}

/// The request's [`After`] handle, from the request head that `leptos_axum` provides to server
/// functions. Fails, with an error naming the fix, when the server function is called outside
/// `leptos_axum` or when `AfterLayer` does not wrap its route.
async fn after_handle() -> Result<After, ServerFnError> {
    leptos_axum::extract::<After>().await.map_err(|error| {
        ServerFnError::new(format!(
            "no `After` handle for this request ({error}): serve the server functions with \
             `leptos_axum`, and add `AfterLayer` with `Router::layer` after `leptos_routes`"
        ))
    })
}

/// Subscribes `email` to the newsletter; the welcome e-mail and the analytics wait for the
/// response.
#[server(endpoint = "subscribe")]
pub async fn subscribe(
    /// The address to subscribe.
    email: String,
) -> Result<String, ServerFnError> {
    let after = after_handle().await?;
    let services = services()?;

    // Registered first, so that it also records the calls that fail below, with their `500`.
    let analytics = services.analytics.clone();
    after.run_with(move |ctx| async move {
        analytics.record(Action::new("subscribe", &ctx)).await;
    });

    let email = email.trim().to_owned();
    if !email.contains('@') {
        return Err(ServerFnError::new(format!(
            "{email:?} is not an e-mail address"
        )));
    }
    services.subscribers.lock().unwrap().push(email.clone());
    send_welcome(&services.mailer, email.clone());
    Ok(format!("{email} subscribed"))
}

/// Sends the welcome e-mail once the response is out: a helper deep in a server function's call
/// tree, with no handle passed down, so it uses the free function `after`. Only `subscribe`
/// calls it, and pages do not call `subscribe` while they are rendered, so it always runs inside
/// the request's own response future, where `after` works; see the crate docs.
pub fn send_welcome(mailer: &Mailer, email: String) {
    let mailer = mailer.clone();
    tower_after::after(async move { mailer.send(email).await });
}

/// The number of subscribers. The page calls it while it is rendered on the server; its record
/// for analytics then belongs to the page's request, and waits for the page's whole stream. It
/// uses the extracted handle, which reaches the request wherever Leptos polls the server
/// function; `after` would not, past an await that waits.
#[server(endpoint = "subscribers")]
pub async fn subscriber_count() -> Result<usize, ServerFnError> {
    let after = after_handle().await?;
    let services = services()?;
    let analytics = services.analytics.clone();
    after.run_with(move |ctx| async move {
        analytics
            .record(Action::new("subscriber_count", &ctx))
            .await;
    });
    let count = services.subscribers.lock().unwrap().len();
    Ok(count)
}

/// The HTML document. It loads no script: the page is only rendered on the server, and its form
/// posts as a plain HTML form.
pub fn shell() -> impl IntoView {
    view! {
        <!DOCTYPE html>
        <html lang="en">
            <head>
                <meta charset="utf-8" />
                <title>"Newsletter"</title>
            </head>
            <body>
                <App />
            </body>
        </html>
    }
}

/// The app's routes.
#[component]
pub fn App() -> impl IntoView {
    view! {
        <LeptosRouter>
            <main>
                <Routes fallback=|| "Not found.">
                    <Route path=StaticSegment("") view=HomePage />
                </Routes>
            </main>
        </LeptosRouter>
    }
}

/// The newsletter's page: how many have subscribed, and the form that subscribes.
#[component]
fn HomePage() -> impl IntoView {
    let subscribe = ServerAction::<Subscribe>::new();
    // Fetched again after each subscription when the page runs in a browser with WebAssembly;
    // here, on the server, once per rendering.
    let count = Resource::new(move || subscribe.version().get(), |_| subscriber_count());
    view! {
        <h1>"Newsletter"</h1>
        <Suspense fallback=|| "Counting…">
            <p>
                {move || Suspend::new(async move {
                    match count.await {
                        Ok(count) => format!("{count} subscribed so far"),
                        Err(error) => format!("Cannot count the subscribers: {error}"),
                    }
                })}
            </p>
        </Suspense>
        <ActionForm action=subscribe>
            <input type="email" name="email" placeholder="you@example.com" required />
            <button type="submit">"Subscribe"</button>
        </ActionForm>
    }
}

/// The app's routes, generated once per process.
///
/// While Leptos generates a route list, it keeps every resource in the process from loading (the
/// switch is process-wide), so a page rendered at that moment by another server of the same
/// process never finishes its stream. A program builds its app once and never sees this; a test
/// suite builds one per test, in parallel, and would hang now and then. Generating the list once,
/// before any server of the process serves, rules it out.
pub fn routes() -> Vec<AxumRouteListing> {
    static ROUTES: LazyLock<Vec<AxumRouteListing>> = LazyLock::new(|| generate_route_list(App));
    ROUTES.clone()
}

/// The Leptos app and its server functions, inside an [`AfterLayer`], and the handle that drains
/// its callbacks at shutdown.
pub fn app(services: Services) -> (Router, AfterTasks) {
    let options = LeptosOptions::builder()
        .output_name("server-functions")
        .build();
    let layer = AfterLayer::new().max_duration(Duration::from_secs(10));
    let tasks = layer.tasks();
    let router = Router::new()
        // The pages' routes, and one for each server function.
        .leptos_routes_with_context(
            &options,
            routes(),
            move || provide_context(services.clone()),
            shell,
        )
        .with_state(options)
        // After `leptos_routes`, so that it wraps the server functions' routes too.
        .layer(layer);
    (router, tasks)
}
