//! A circuit breaker per store, so requests stop waiting on a store that is down.
//!
//! Closed: calls go through; `failure_threshold` failures in a row open it. Open: callers skip
//! the store at once (Redis down -> straight to Postgres; Postgres down -> misses are listed).
//! A background prober pings the store every `probe_interval`: while open, the first success
//! closes it again; while closed, failed pings count too, so a store that dies without traffic
//! still opens its circuit. Requests never act as probes, so none waits on a dead store.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive_failures: u32,
}

/// One store's breaker. `gauge` reads 0 while closed and 1 while open.
#[derive(Debug)]
pub struct Breaker {
    name: &'static str,
    failure_threshold: u32,
    inner: Mutex<Inner>,
    gauge: Gauge,
}

impl Breaker {
    pub fn new(name: &'static str, failure_threshold: u32, gauge: Gauge) -> Self {
        gauge.set(0);
        Self {
            name,
            failure_threshold: failure_threshold.max(1),
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
            }),
            gauge,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn state(&self) -> State {
        self.inner.lock().map(|i| i.state).unwrap_or(State::Open)
    }

    /// Whether a request may use the store now.
    pub fn allows(&self) -> bool {
        self.state() == State::Closed
    }

    pub fn record_success(&self) {
        if let Ok(mut i) = self.inner.lock() {
            i.consecutive_failures = 0;
            if i.state == State::Open {
                i.state = State::Closed;
                self.gauge.set(0);
                tracing::info!(store = self.name, "circuit closed: store answers again");
            }
        }
    }

    pub fn record_failure(&self, error: &dyn std::fmt::Display) {
        if let Ok(mut i) = self.inner.lock() {
            i.consecutive_failures = i.consecutive_failures.saturating_add(1);
            if i.state == State::Closed && i.consecutive_failures >= self.failure_threshold {
                i.state = State::Open;
                self.gauge.set(1);
                tracing::warn!(store = self.name, %error, "circuit opened: serving without this store");
            }
        }
    }

    /// Opens at once (a failed start-up probe: no need to wait for request failures).
    pub fn trip(&self, error: &dyn std::fmt::Display) {
        if let Ok(mut i) = self.inner.lock() {
            i.consecutive_failures = self.failure_threshold;
            if i.state == State::Closed {
                i.state = State::Open;
                self.gauge.set(1);
                tracing::warn!(store = self.name, %error, "circuit opened: serving without this store");
            }
        }
    }
}

/// Probes at start (opening the breaker at once if the store is down), then every `interval`
/// until `cancel` fires: a success closes an open breaker, a failure counts like a failed call. `on_change` runs after every
/// probe, e.g. to update readiness.
pub async fn run_prober<P, Fut>(
    breaker: &Breaker,
    interval: Duration,
    mut probe: P,
    on_change: impl Fn(),
    cancel: CancellationToken,
) where
    P: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut first = true;
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = probe() => r,
        };
        match result {
            Ok(()) => breaker.record_success(),
            Err(e) if first => breaker.trip(&e),
            // While closed, failed probes count like failed requests, so a store that dies
            // while there is no traffic still opens its circuit (and readiness follows).
            Err(e) => {
                tracing::debug!(store = breaker.name(), error = %e, "probe failed");
                breaker.record_failure(&e);
            }
        }
        first = false;
        on_change();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_closes_on_success() {
        let b = Breaker::new("redis", 3, Gauge::default());
        b.record_failure(&"x");
        b.record_failure(&"x");
        b.record_success();
        b.record_failure(&"x");
        b.record_failure(&"x");
        assert!(b.allows(), "a success in between resets the count");
        b.record_failure(&"x");
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.gauge.get(), 1);
        b.record_success();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.gauge.get(), 0);
        b.trip(&"down");
        assert!(!b.allows());
    }
}
