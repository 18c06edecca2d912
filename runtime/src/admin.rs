//! `/healthz`, `/readyz` and `/metrics`, served by every long-running component.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Named readiness checks; the component is ready when every check is passing.
/// A component registers its checks as not-ready at start and flips them as it connects.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<&'static str, Result<(), String>>>>,
}

impl Readiness {
    pub fn new(names: &[&'static str]) -> Self {
        let r = Self::default();
        for n in names {
            r.fail(n, "starting");
        }
        r
    }

    pub fn pass(&self, name: &'static str) {
        if let Ok(mut c) = self.checks.lock() {
            c.insert(name, Ok(()));
        }
    }

    pub fn fail(&self, name: &'static str, why: impl Into<String>) {
        if let Ok(mut c) = self.checks.lock() {
            c.insert(name, Err(why.into()));
        }
    }

    pub fn set(&self, name: &'static str, result: Result<(), String>) {
        if let Ok(mut c) = self.checks.lock() {
            c.insert(name, result);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.checks
            .lock()
            .map(|c| c.values().all(|r| r.is_ok()))
            .unwrap_or(false)
    }

    /// The failing checks with their reasons.
    pub fn failing(&self) -> BTreeMap<&'static str, String> {
        self.checks
            .lock()
            .map(|c| {
                c.iter()
                    .filter_map(|(k, v)| v.as_ref().err().map(|e| (*k, e.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[derive(Clone)]
pub struct AdminState {
    pub readiness: Readiness,
    pub registry: Arc<Registry>,
}

/// The admin routes, to serve alone or merged into a component's own router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, axum::Json(json!({"status": "ok"})))
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let failing = s.readiness.failing();
    if failing.is_empty() {
        (StatusCode::OK, axum::Json(json!({"ready": true}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false, "failing": failing})),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves a router on an already bound listener until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}
