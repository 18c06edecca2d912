//! End-to-end suite against a kind cluster (see `e2e/README.md`).
//!
//! The tests run only when `WIDGET_E2E=1` and `KUBECONFIG` is set; otherwise they print why and
//! pass. `e2e/kind/run.sh` creates the cluster, builds and loads the images, installs the dev
//! databases and the operator, then runs them.

use std::future::Future;
use std::time::{Duration, Instant};

/// Why the suite cannot run here, or `None` when it can.
pub fn skip_reason() -> Option<String> {
    if std::env::var_os("WIDGET_E2E").is_none() {
        return Some(
            "WIDGET_E2E is not set (run e2e/kind/run.sh, or set WIDGET_E2E=1 with a cluster)"
                .into(),
        );
    }
    if std::env::var_os("KUBECONFIG").is_none() {
        return Some("KUBECONFIG is not set".into());
    }
    None
}

/// Polls `check` every second until it returns `Some` or `limit` passes.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let started = Instant::now();
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if started.elapsed() > limit {
            anyhow::bail!(
                "timed out after {limit:?} waiting for {what} (last error: {last_error:?})"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
