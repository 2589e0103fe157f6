//! Run with
//!
//! ```not_rust
//! cargo run --example analytics
//! ```
//!
//! then, in another terminal:
//!
//! ```not_rust
//! curl -X POST -H 'cookie: session-id=alice' http://127.0.0.1:3000/checkout
//! curl -X POST http://127.0.0.1:3000/checkout
//! curl http://127.0.0.1:3000/actions
//! ```
//!
//! The use case of Next.js's `after()` documentation: a route performs a mutation and, once its
//! response has been sent, records the user's action for analytics: user agent, `session-id`
//! cookie, status and latency. The rows go to a SQLite database, `analytics.sqlite3`, created in
//! the working directory on first run; `GET /actions` lists the latest ones. SQLite's client is
//! synchronous, so the write runs with `run_blocking`, on Tokio's blocking pool.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use rusqlite::Connection;
use tower_after::{After, AfterLayer};

type Database = Arc<Mutex<Connection>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let connection = Connection::open("analytics.sqlite3")?;
    connection.execute_batch(
        "CREATE TABLE IF NOT EXISTS orders (
             id INTEGER PRIMARY KEY,
             session TEXT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS actions (
             id INTEGER PRIMARY KEY,
             at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')),
             action TEXT NOT NULL,
             session TEXT NOT NULL,
             user_agent TEXT NOT NULL,
             status INTEGER,
             latency_us INTEGER NOT NULL
         );",
    )?;
    let database: Database = Arc::new(Mutex::new(connection));

    let layer = AfterLayer::new().max_duration(Duration::from_secs(10));
    let tasks = layer.tasks();
    let app = Router::new()
        .route("/checkout", post(checkout))
        .route("/actions", get(actions))
        .with_state(database)
        .layer(layer);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    tasks.shutdown(Duration::from_secs(10)).await;
    Ok(())
}

/// The mutation: records an order. Analytics happen after the response.
async fn checkout(State(database): State<Database>, later: After) -> (StatusCode, String) {
    let recorder = database.clone();
    later.run_blocking(move |ctx| {
        let request = ctx.request();
        let outcome = ctx.outcome();
        let row = (
            "checkout",
            request.cookie("session-id").unwrap_or("anonymous"),
            request.header("user-agent").unwrap_or("unknown"),
            outcome.status().map(|status| status.as_u16()),
            outcome.elapsed().as_micros() as i64,
        );
        let written = recorder
            .lock()
            .map_err(|_| "poisoned".to_owned())
            .and_then(|db| {
                db.execute(
                    "INSERT INTO actions (action, session, user_agent, status, latency_us)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                    row,
                )
                .map_err(|error| error.to_string())
            });
        match written {
            Ok(_) => tracing::info!(session = row.1, "user action recorded"),
            Err(error) => tracing::error!("cannot record the user action: {error}"),
        }
    });

    let session = later
        .request()
        .cookie("session-id")
        .unwrap_or("anonymous")
        .to_owned();
    let placed = tokio::task::spawn_blocking(move || {
        let db = database.lock().map_err(|_| "poisoned".to_owned())?;
        db.execute("INSERT INTO orders (session) VALUES (?1)", [session])
            .map_err(|error| error.to_string())?;
        Ok::<_, String>(db.last_insert_rowid())
    })
    .await;
    match placed {
        Ok(Ok(order)) => (StatusCode::CREATED, format!("order {order} placed\n")),
        Ok(Err(error)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
    }
}

/// The latest recorded actions, newest first.
async fn actions(State(database): State<Database>) -> (StatusCode, String) {
    let listed = tokio::task::spawn_blocking(move || {
        let db = database.lock().map_err(|_| "poisoned".to_owned())?;
        let mut statement = db
            .prepare(
                "SELECT at, action, session, user_agent, status, latency_us
                 FROM actions ORDER BY id DESC LIMIT 20",
            )
            .map_err(|error| error.to_string())?;
        let rows = statement
            .query_map([], |row| {
                Ok(format!(
                    "{}  {:<8}  session={:<10}  status={:<4}  {:>6} us  {}\n",
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, Option<u16>>(4)?
                        .map_or("-".to_owned(), |s| s.to_string()),
                    row.get::<_, i64>(5)?,
                    row.get::<_, String>(3)?,
                ))
            })
            .map_err(|error| error.to_string())?;
        rows.collect::<Result<String, _>>()
            .map_err(|error| error.to_string())
    })
    .await;
    match listed {
        Ok(Ok(rows)) if rows.is_empty() => (StatusCode::OK, "no actions yet\n".to_owned()),
        Ok(Ok(rows)) => (StatusCode::OK, rows),
        Ok(Err(error)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
    }
}
