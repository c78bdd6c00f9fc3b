//! Test-only hooks: ways for the end-to-end suites to break a live hub's state the way a hand edit
//! or a version skew would. Served on the HTTP listener only when the hub starts with
//! `FLOTILLA_TEST_HOOKS=1` in its environment (whoever sets that already owns the process and
//! its data directory); absent otherwise, and announced in the log when present.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use crate::Hub;

/// The variable that turns the hooks on.
pub const ENV: &str = "FLOTILLA_TEST_HOOKS";

/// Whether this process serves the hooks.
pub fn enabled() -> bool {
    std::env::var(ENV).is_ok_and(|v| v == "1")
}

/// `PUT /test-hooks/apps/{name}`: the body becomes the app's stored record, bytes as given.
pub fn routes<S: Clone + Send + Sync + 'static>(hub: Arc<Hub>) -> Router<S> {
    tracing::warn!("{ENV}=1: test hooks are served on the HTTP listener; never in production");
    Router::new()
        .route(
            "/test-hooks/apps/{name}",
            axum::routing::put(put_app_record),
        )
        .with_state(hub)
}

async fn put_app_record(
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
    body: Bytes,
) -> (StatusCode, String) {
    match hub.apps.put_raw_for_test(&name, &body).await {
        Ok(()) => (StatusCode::OK, format!("app record {name:?} replaced\n")),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}
