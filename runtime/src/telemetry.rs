//! Logging through `tracing`: one line per event, text for people or JSON for log pipelines.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level. Tools whose
/// standard output is their result (`widgets`, `dead-letters`) log to standard error.
pub fn init(format: LogFormat, to_stderr: bool) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // redis-rs' cluster client logs every reconnect attempt to a failed node at warn, several
    // a millisecond until the failover; the components log the failure itself once.
    let asked_for_redis = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("redis"));
    if !asked_for_redis && let Ok(quiet) = "redis::cluster_handling=error".parse() {
        filter = filter.add_directive(quiet);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let result = match (format, to_stderr) {
        (LogFormat::Json, false) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Json, true) => builder
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .try_init(),
        (LogFormat::Text, false) => builder.try_init(),
        (LogFormat::Text, true) => builder.with_writer(std::io::stderr).try_init(),
    };
    // A second init (tests, `dev`) keeps the first subscriber.
    let _ = result;
}
