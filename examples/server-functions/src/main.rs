//! Run with
//!
//! ```not_rust
//! cargo run --manifest-path examples/server-functions/Cargo.toml
//! ```
//!
//! then open <http://127.0.0.1:3000> and subscribe, or, in another terminal:
//!
//! ```not_rust
//! curl -d email=alice@example.com http://127.0.0.1:3000/api/subscribe
//! ```
//!
//! A Leptos app whose server function sends a welcome e-mail and records analytics after its
//! response. Which `after` works where in a server function is told in `src/lib.rs`.
//!
//! Settings, from the environment: `ADDR`, where to listen (default `127.0.0.1:3000`).

use std::time::Duration;

use server_functions::{app, Analytics, Mailer, Services};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    // Stand-ins for an e-mail service and an analytics service, both slowish.
    let mailer = Mailer::new(|email| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tracing::info!(to = %email, "welcome e-mail sent");
    });
    let analytics = Analytics::new(|action| async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tracing::info!(
            name = action.name,
            path = %action.path,
            status = action.status,
            completion = %action.completion,
            "action recorded"
        );
    });

    let (router, tasks) = app(Services::new(mailer, analytics));
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    tracing::info!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;

    // The server has stopped taking requests: let the e-mails and records still pending finish.
    tasks.shutdown(Duration::from_secs(10)).await;
    Ok(())
}
