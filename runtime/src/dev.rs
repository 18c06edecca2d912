//! `widget-runtime dev`: every component in one process, for a laptop and for the demo.
//!
//! Runs the core and product migrations, one outbox-worker per configured source (all against
//! one product database, which may be the core database), the ingester and the core API, under
//! one cancel token, with one metrics registry and one readiness served beside the API.

use std::collections::HashSet;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::Readiness;
use crate::config::Config;
use crate::ingest::Ingester;
use crate::outbox::worker::{OutboxWorker, WorkerSettings};
use crate::{api, connect, store};

/// The config `dev` uses when none is given (`examples/dev-config.yaml`).
pub const SAMPLE_CONFIG: &str = include_str!("../../examples/dev-config.yaml");

/// Where `dev` connects.
#[derive(Debug, Clone)]
pub struct DevStores {
    pub redis_url: String,
    pub core_database_url: String,
    /// The product database of every source; may equal the core one.
    pub source_database_url: String,
}

/// Runs all components until `cancel` fires or one of them fails.
pub async fn run(
    config: Config,
    stores: DevStores,
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    // One product database for every source: two sources on one table would relay each
    // other's rows (and dead-letter them as foreign keys).
    let mut tables = HashSet::new();
    for s in &config.sources {
        anyhow::ensure!(
            tables.insert(s.outbox_table.as_str()),
            "sources share the outbox table `{}`; in `dev` all sources use one database, so \
             give each its own outboxTable",
            s.outbox_table
        );
    }
    let redis = connect::redis_from_env("REDIS_URL", &stores.redis_url, &config.redis).await?;
    let core = connect::pg_pool(&stores.core_database_url, 16, &config.database)
        .context("invalid CORE_DATABASE_URL")?;
    let source = if stores.source_database_url == stores.core_database_url {
        core.clone()
    } else {
        connect::pg_pool(&stores.source_database_url, 8, &config.database)
            .context("invalid SOURCE_DATABASE_URL")?
    };
    store::migrate(&store::CORE_MIGRATIONS, &core)
        .await
        .context("core migrations failed (is CORE_DATABASE_URL reachable?)")?;
    store::migrate(&store::PRODUCT_MIGRATIONS, &source)
        .await
        .context("product migrations failed (is SOURCE_DATABASE_URL reachable?)")?;

    let mut registry = Registry::default();
    let readiness = Readiness::default();
    let mut tasks: JoinSet<anyhow::Result<&'static str>> = JoinSet::new();
    for s in &config.sources {
        let settings = WorkerSettings::from_config(&config, &s.name)?;
        let worker = OutboxWorker::new(
            settings,
            redis.clone(),
            source.clone(),
            &mut registry,
            readiness.scoped(&format!("outbox-worker:{}", s.name)),
        );
        let c = cancel.clone();
        tasks.spawn(async move {
            worker.run(c).await?;
            Ok("outbox-worker")
        });
    }
    let consumer = format!("dev-{}", gethostname::gethostname().to_string_lossy());
    let ingester = Ingester::new(
        &config,
        consumer,
        redis.clone(),
        core.clone(),
        &mut registry,
        readiness.scoped("ingester"),
    );
    let c = cancel.clone();
    tasks.spawn(async move {
        ingester.run(c).await?;
        Ok("ingester")
    });
    let c = cancel.clone();
    tasks.spawn(async move {
        api::serve(
            &config,
            redis,
            core,
            api::Listeners {
                api: listener,
                admin: None,
            },
            registry,
            readiness,
            c,
        )
        .await?;
        Ok("core-api")
    });

    // Every component runs until cancelled; one that ends early takes the others down.
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
        match outcome {
            Ok(name) if !cancel.is_cancelled() => {
                tracing::error!(component = name, "component stopped unexpectedly");
                first_error.get_or_insert_with(|| anyhow::anyhow!("{name} stopped unexpectedly"));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "component failed");
                first_error.get_or_insert(e);
            }
        }
        cancel.cancel();
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
