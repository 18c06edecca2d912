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
/// Components sharing one process (`dev`) each take a [`Readiness::scoped`] view, so their
/// checks of the same store (`redis`, `database`) do not overwrite each other.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, Result<(), String>>>>,
    prefix: String,
}

impl Readiness {
    pub fn new(names: &[&str]) -> Self {
        let r = Self::default();
        for n in names {
            r.fail(n, "starting");
        }
        r
    }

    /// A view whose check names are prefixed with `scope/`, sharing the same set of checks.
    pub fn scoped(&self, scope: &str) -> Self {
        Self {
            checks: self.checks.clone(),
            prefix: format!("{}{scope}/", self.prefix),
        }
    }

    pub fn pass(&self, name: &str) {
        self.set(name, Ok(()));
    }

    pub fn fail(&self, name: &str, why: impl Into<String>) {
        self.set(name, Err(why.into()));
    }

    pub fn set(&self, name: &str, result: Result<(), String>) {
        if let Ok(mut c) = self.checks.lock() {
            c.insert(format!("{}{name}", self.prefix), result);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.checks
            .lock()
            .map(|c| c.values().all(|r| r.is_ok()))
            .unwrap_or(false)
    }

    /// The failing checks (full names) with their reasons.
    pub fn failing(&self) -> BTreeMap<String, String> {
        self.checks
            .lock()
            .map(|c| {
                c.iter()
                    .filter_map(|(k, v)| v.as_ref().err().map(|e| (k.clone(), e.clone())))
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

/// Names the failing checks (`database`, `redis`, ...) and nothing more: the reasons are
/// driver errors with host names and users in them, which belong in the logs (each component
/// logs them as they happen), not in a body any prober can read.
async fn readyz(State(s): State<AdminState>) -> Response {
    let failing: Vec<String> = s.readiness.failing().into_keys().collect();
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
    crate::server::serve(listener, app, &crate::server::admin_limits(), cancel).await
}

#[cfg(test)]
mod tests {
    use super::Readiness;

    #[test]
    fn scoped_checks_do_not_overwrite_each_other() {
        let all = Readiness::default();
        let worker = all.scoped("outbox-worker:deals");
        let ingester = all.scoped("ingester");
        worker.fail("redis", "down");
        ingester.pass("redis");
        assert!(!all.is_ready());
        assert_eq!(
            all.failing().keys().collect::<Vec<_>>(),
            ["outbox-worker:deals/redis"]
        );
        worker.pass("redis");
        assert!(all.is_ready());
    }
}
