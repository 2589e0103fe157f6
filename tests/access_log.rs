//! What an access log and an audit trail need from the layer, through a real server on
//! 127.0.0.1: the route template, typed data from the handler, the budget of an outer
//! `MaxDuration`, the request id in the crate's own lines, and work handed back when refused.
#![cfg(feature = "axum")]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Empty};
use tower_after::{After, AfterContext, AfterLayer, MaxDuration, Overloaded};

/// What the access log wrote, one line per response.
type AccessLog = Arc<Mutex<Vec<String>>>;

#[derive(Debug)]
struct UserId(u64);

async fn profile(later: After) -> &'static str {
    later.insert(UserId(7));
    "profile"
}

#[tokio::test]
async fn the_hook_sees_the_route_template_and_what_the_handler_left() {
    let log = AccessLog::default();
    let writer = log.clone();
    let layer = AfterLayer::new().after_each(move |ctx: AfterContext| {
        let writer = writer.clone();
        async move {
            let route = ctx.request().matched_path().unwrap_or("-").to_owned();
            let user = ctx.get::<UserId>().map(|user| user.0);
            writer
                .lock()
                .unwrap()
                .push(format!("{} {route} {user:?}", ctx.request().path()));
        }
    });
    let tasks = layer.tasks();
    let app = Router::new()
        .route("/users/{id}", get(profile))
        .route("/health", get(|| async { "ok" }))
        .layer(layer);
    let address = support::serve(app).await;

    support::fetch(address, "GET", "/users/41").await;
    support::fetch(address, "GET", "/health").await;
    support::fetch(address, "GET", "/nowhere").await;
    support::within("idle", tasks.idle()).await;

    let mut lines = log.lock().unwrap().clone();
    lines.sort();
    assert_eq!(
        lines,
        [
            "/health /health None",
            "/nowhere - None",
            "/users/41 /users/{id} Some(7)",
        ]
    );
}

#[tokio::test]
async fn a_value_inserted_again_replaces_the_first_and_is_handed_back() {
    let seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = Router::new()
        .route(
            "/",
            get(move |later: After| async move {
                assert!(later.insert(UserId(1)).is_none());
                let replaced = later.insert(UserId(2)).expect("the first value back");
                assert_eq!(replaced.0, 1);
                later.run_with(move |ctx| async move {
                    *record.lock().unwrap() = ctx.get::<UserId>().map(|user| user.0);
                });
                "ok"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    support::fetch(address, "GET", "/").await;
    support::within("idle", tasks.idle()).await;
    assert_eq!(*seen.lock().unwrap(), Some(2));
}

/// A callback of 3 s under a budget of 100 ms set by a `MaxDuration` on either side of the
/// layer: cut both ways.
#[tokio::test]
async fn max_duration_works_on_either_side_of_the_layer() {
    async fn slow(later: After) -> &'static str {
        later.run(tokio::time::sleep(Duration::from_secs(3)));
        "ok"
    }
    let budget = MaxDuration::new(Duration::from_millis(100));
    for outside in [false, true] {
        let layer = AfterLayer::new();
        let tasks = layer.tasks();
        let route = Router::new().route("/slow", get(slow));
        let app = if outside {
            route.layer(layer).layer(budget)
        } else {
            route.layer(budget).layer(layer)
        };
        let address = support::serve(app).await;
        support::fetch(address, "GET", "/slow").await;
        support::within("the budget to cut the callback", tasks.idle()).await;
        let stats = tasks.stats();
        assert_eq!(
            (stats.timed_out(), stats.completed()),
            (1, 0),
            "MaxDuration {} the layer",
            if outside { "outside" } else { "inside" }
        );
    }
}

/// The innermost `MaxDuration` wins, wherever the outer one sits.
#[tokio::test]
async fn the_innermost_max_duration_wins() {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = Router::new()
        .route(
            "/",
            get(|later: After| async move {
                later.run(tokio::time::sleep(Duration::from_millis(300)));
                "ok"
            })
            .layer(MaxDuration::new(Duration::from_secs(30))),
        )
        .layer(layer)
        .layer(MaxDuration::new(Duration::from_millis(50)));
    let address = support::serve(app).await;
    support::fetch(address, "GET", "/").await;
    support::within("idle", tasks.idle()).await;
    assert_eq!(tasks.stats().completed(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn the_crates_own_warnings_name_the_request_id_and_the_registration_site() {
    let logs = support::Logs::capture();
    let layer = AfterLayer::new().max_duration(Duration::from_millis(50));
    let tasks = layer.tasks();
    let app = Router::new()
        .route(
            "/slow",
            get(|later: After| async move {
                later.run(std::future::pending::<()>());
                "ok"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    let request = http::Request::get(format!("http://{address}/slow"))
        .header("x-request-id", "req-7f3a")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = support::client().request(request).await.unwrap();
    response.into_body().collect().await.unwrap();
    support::within("idle", tasks.idle()).await;

    let text = logs.text();
    let warning = text
        .lines()
        .find(|line| line.contains("WARN") && line.contains("after callbacks cancelled"))
        .unwrap_or_else(|| panic!("no budget warning in:\n{text}"));
    assert!(warning.contains("request_id=\"req-7f3a\""), "{warning}");
    // The callback's own line, at DEBUG, is in its span, which names the request and the line
    // of code that registered the work.
    let detail = text
        .lines()
        .find(|line| line.contains("DEBUG") && line.contains("after callback cancelled"))
        .unwrap_or_else(|| panic!("no callback line in:\n{text}"));
    assert!(detail.contains("request_id=\"req-7f3a\""), "{detail}");
    assert!(detail.contains("site=tests/access_log.rs:"), "{detail}");
}

#[tokio::test]
async fn refused_work_is_handed_back_to_the_caller() {
    let outcome = Arc::new(Mutex::new(Vec::new()));
    let record = outcome.clone();
    let layer = AfterLayer::new().max_pending(1);
    let tasks = layer.tasks();
    let app = Router::new()
        .route(
            "/",
            get(move |later: After| async move {
                // The first fills the layer; the second is handed back and run here.
                later.run(std::future::ready(()));
                let again = record.clone();
                let work = async move { again.lock().unwrap().push("ran in the handler") };
                match later.try_run(work) {
                    Ok(()) => record.lock().unwrap().push("accepted"),
                    Err(refused) => {
                        assert!(!refused.is_shut_down());
                        assert!(refused.to_string().contains("AfterLayer::max_pending"));
                        refused.into_work().await;
                    }
                }
                "ok"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    support::fetch(address, "GET", "/").await;
    support::within("idle", tasks.idle()).await;
    assert_eq!(*outcome.lock().unwrap(), ["ran in the handler"]);
    assert_eq!(tasks.stats().shed(), 1);
}

/// A refusal leaves through `?` as a boxed error, without its work: most futures are not `Sync`
/// (this one holds a `Cell` across an `.await`), and `Box<dyn Error + Send + Sync>` or
/// `anyhow::Error` take only errors that are.
#[tokio::test]
async fn a_refusal_leaves_through_the_question_mark_without_its_work() {
    fn register(later: &After) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let work = async {
            let rows = std::cell::Cell::new(0);
            tokio::task::yield_now().await;
            rows.set(1);
        };
        later.try_run(work).map_err(Overloaded::without_work)?;
        Ok(())
    }
    let refusal = Arc::new(Mutex::new(None));
    let record = refusal.clone();
    let layer = AfterLayer::new().max_pending(0);
    let app = Router::new()
        .route(
            "/",
            get(move |later: After| async move {
                *record.lock().unwrap() = register(&later).err().map(|error| error.to_string());
                "ok"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    support::fetch(address, "GET", "/").await;
    let refusal = refusal.lock().unwrap().clone().expect("refused");
    assert!(refusal.contains("AfterLayer::max_pending"), "{refusal}");
}

/// The route template under nesting, as `RequestSnapshot::matched_path` documents it: the whole
/// template under `nest`, also for a layer on the nested router (whose path is stripped); none
/// for a service mounted with `nest_service`, seen from outside it.
#[tokio::test]
async fn the_route_template_under_nested_routers() {
    let log = AccessLog::default();
    let writer = log.clone();
    let layer = AfterLayer::new().after_each(move |ctx: AfterContext| {
        let writer = writer.clone();
        async move {
            let request = ctx.request();
            let route = request.matched_path().unwrap_or("-");
            let line = format!("{} {route}", request.path());
            writer.lock().unwrap().push(line);
        }
    });
    let tasks = layer.tasks();
    let users = Router::new()
        .route("/users/{id}", get(|| async { "user" }))
        .layer(layer.clone());
    let items = Router::new().route("/items/{id}", get(|| async { "item" }));
    let app = Router::new()
        .nest("/api", users)
        .nest_service("/svc", items)
        .layer(layer);
    let address = support::serve(app).await;
    support::fetch(address, "GET", "/api/users/2").await;
    support::fetch(address, "GET", "/svc/items/3").await;
    support::within("idle", tasks.idle()).await;

    let mut lines = log.lock().unwrap().clone();
    lines.sort();
    assert_eq!(
        lines,
        [
            // The outer layer, then the nested router's own.
            "/api/users/2 /api/users/{id}",
            "/svc/items/3 -",
            "/users/2 /api/users/{id}",
        ]
    );
}

/// A value that holds the request's own handle makes a reference cycle (state, data, handle,
/// state): the layer lets go of the data once the request's work is done, so that its snapshot's
/// bytes do not stay counted under `max_held_bytes` for good. With work, and without.
#[tokio::test]
async fn a_value_holding_the_request_s_handle_is_freed() {
    #[derive(Clone)]
    struct RequestContext {
        _later: After,
    }
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = Router::new()
        .route(
            "/",
            get(|later: After| async move {
                later.insert(RequestContext {
                    _later: later.clone(),
                });
                later.run(async {});
                "ok"
            }),
        )
        .route(
            "/without-work",
            get(|later: After| async move {
                later.insert(RequestContext {
                    _later: later.clone(),
                });
                "ok"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    support::fetch(address, "GET", "/").await;
    support::fetch(address, "GET", "/without-work").await;
    support::within("idle", tasks.idle()).await;
    support::eventually("the request's state to be freed", || {
        tasks.stats().held_bytes() == 0
    })
    .await;
}

/// The same cycle, made by a task that outlives its request and inserts once the request's work
/// is done: the value is dropped at once.
#[tokio::test]
async fn a_value_holding_the_handle_inserted_after_the_work_is_dropped_at_once() {
    struct RequestContext {
        _later: After,
    }
    let (kept, late) = tokio::sync::oneshot::channel::<After>();
    let kept = Arc::new(Mutex::new(Some(kept)));
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let app = Router::new()
        .route(
            "/",
            get(move |later: After| async move {
                let sender = kept.lock().unwrap().take().unwrap();
                let _ = sender.send(later.clone());
                later.run(async {});
                "ok"
            }),
        )
        .layer(layer);
    let address = support::serve(app).await;
    support::fetch(address, "GET", "/").await;
    let later = late.await.unwrap();
    support::within("idle", tasks.idle()).await;
    // Long after: the request's work is done, and the value would keep its state alive.
    later.insert(RequestContext {
        _later: later.clone(),
    });
    drop(later);
    support::eventually("the late value to be dropped", || {
        tasks.stats().held_bytes() == 0
    })
    .await;
}

/// A panic payload whose own `Drop` panics.
struct PanicsWhenDropped;

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("the payload's drop");
        }
    }
}

/// A value for `After::insert` whose `Drop` panics with a `PanicsWhenDropped` payload.
struct Bomb;

impl Drop for Bomb {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            std::panic::panic_any(PanicsWhenDropped);
        }
    }
}

/// The crate catches a panic in the `Drop` of a value the handler left (`Data::clear`), and it
/// catches a panicking callback whose payload panics on drop (`log_panic`). But the payload it
/// caught in `Data::clear` is dropped with `let _ = ..`, outside any `catch_unwind`: its panic
/// escapes from the response's `Drop` (here) or from the body's `poll_frame` into the server.
#[tokio::test]
async fn a_left_value_whose_drop_panics_with_a_panicking_payload_does_not_escape_the_response() {
    let layer = AfterLayer::new();
    let tasks = layer.tasks();
    let service = tower::Layer::layer(
        &layer,
        tower::service_fn(|request: http::Request<()>| {
            let later = request.extensions().get::<After>().unwrap().clone();
            async move {
                later.insert(Bomb);
                Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<bytes::Bytes>::new()))
            }
        }),
    );
    let response = tower::ServiceExt::oneshot(service, http::Request::new(()))
        .await
        .unwrap();
    // The request has no work: dropping its response ends it, and lets go of what it left.
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(response)));
    assert!(
        dropped.is_ok(),
        "dropping the response panicked: a user's panic escaped the crate's Drop"
    );
    support::within("the request's end", tasks.idle()).await;
}
