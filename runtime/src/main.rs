//! `widget-runtime`: every runtime component of the Home Widget Platform in one binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use prometheus_client::registry::Registry;
use widget_runtime::admin::{self, AdminState, Readiness};
use widget_runtime::config::Config;
use widget_runtime::telemetry::{self, LogFormat};
use widget_runtime::{api, connect, dev, ingest, outbox, shutdown, store};

#[derive(Parser)]
#[command(
    name = "widget-runtime",
    version,
    about = "Home Widget Platform runtime components"
)]
struct Cli {
    /// Log as human-readable text or one JSON object per line.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update database tables (idempotent).
    Migrate {
        #[command(subcommand)]
        target: MigrateTarget,
    },
    /// Relay one product source's outbox rows to the pipeline's Redis Stream.
    OutboxWorker(OutboxWorkerArgs),
    /// Consume the pipeline's stream into the core database and the hot cache.
    Ingester(IngesterArgs),
    /// Serve the home API (and /healthz, /readyz, /metrics on the admin port).
    CoreApi(CoreApiArgs),
    /// Run migrations, every outbox-worker, the ingester and the core API in one process.
    Dev(DevArgs),
    /// List the pipeline's dead letters, or move them back into the stream once fixed.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLettersAction,
    },
    /// Inspect or repair one widget (e.g. one pinned by a nonsense version).
    Widgets {
        #[command(subcommand)]
        action: WidgetsAction,
    },
    /// Print the `ACL SETUSER` line of a least-privilege Redis user for one component.
    Acl {
        /// Pipeline config file (YAML); gives the key names.
        #[arg(long, env = "WIDGET_CONFIG")]
        config: PathBuf,
        /// The user's name; defaults to `<pipeline>-<component>`.
        #[arg(long)]
        user: Option<String>,
        #[command(subcommand)]
        component: AclComponent,
    },
}

#[derive(Subcommand)]
enum AclComponent {
    /// The outbox-worker of one source.
    Worker {
        #[arg(long)]
        source: String,
    },
    Ingester,
    CoreApi,
}

#[derive(Subcommand)]
enum DeadLettersAction {
    /// Print the dead letters (oldest first): id, time, source, key, reason, deliveries, error.
    List {
        #[command(flatten)]
        args: DeadLetterArgs,
        /// One JSON document instead of a line per dead letter.
        #[arg(long)]
        json: bool,
    },
    /// Move matching dead letters back into the stream (after fixing their cause).
    Replay {
        #[command(flatten)]
        args: DeadLetterArgs,
        /// Only say what would be moved.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args)]
struct DeadLetterArgs {
    /// Pipeline config file (YAML); gives the stream names.
    #[arg(long, env = "WIDGET_CONFIG")]
    config: PathBuf,
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: String,
    /// Only this reason (`undecodable`, `foreign-namespace`, `max-deliveries`, ...).
    #[arg(long)]
    reason: Option<String>,
    /// Only those dead-lettered within this long (`30m`, `2h`, `7d`).
    #[arg(long, value_parser = widget_runtime::config::human_duration::parse)]
    since: Option<std::time::Duration>,
}

#[derive(Subcommand)]
enum WidgetsAction {
    /// Print what the core database and the cache hold for a key (JSON).
    Show(WidgetArgs),
    /// Remove a key's core row and cache entry, so its producer can publish it again.
    Purge {
        #[command(flatten)]
        args: WidgetArgs,
        /// Really delete; without it, print what would be deleted and exit with status 2.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
struct WidgetArgs {
    /// The widget key, e.g. `deals.top-picks`.
    key: String,
    /// Pipeline config file (YAML); gives the cache key prefix.
    #[arg(long, env = "WIDGET_CONFIG")]
    config: PathBuf,
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: String,
    #[arg(long, env = "CORE_DATABASE_URL", hide_env_values = true)]
    core_database_url: String,
}

#[derive(Subcommand)]
enum MigrateTarget {
    /// The core database: the `widgets` table.
    Core {
        #[arg(long, env = "CORE_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// A product database: the `widget_outbox` table.
    Product {
        #[arg(long, env = "SOURCE_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[derive(Args)]
struct ComponentArgs {
    /// Pipeline config file (YAML).
    #[arg(long, env = "WIDGET_CONFIG")]
    config: PathBuf,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, default_value = "0.0.0.0:9090", env = "ADMIN_LISTEN")]
    admin_listen: SocketAddr,
}

#[derive(Args)]
struct OutboxWorkerArgs {
    #[command(flatten)]
    common: ComponentArgs,
    /// The product source (its name in `sources`) this worker relays.
    #[arg(long, env = "SOURCE_NAME")]
    source: String,
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: String,
    #[arg(long, env = "SOURCE_DATABASE_URL", hide_env_values = true)]
    source_database_url: String,
}

#[derive(Args)]
struct IngesterArgs {
    #[command(flatten)]
    common: ComponentArgs,
    /// Consumer name in the group; defaults to the host name (the pod name in Kubernetes).
    #[arg(long, env = "CONSUMER_NAME")]
    consumer: Option<String>,
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: String,
    #[arg(long, env = "CORE_DATABASE_URL", hide_env_values = true)]
    core_database_url: String,
    /// Do not run the core migrations at start (they are idempotent and safe to run).
    #[arg(long)]
    skip_migrations: bool,
}

#[derive(Args)]
struct CoreApiArgs {
    /// Pipeline config file (YAML).
    #[arg(long, env = "WIDGET_CONFIG")]
    config: PathBuf,
    /// Where the API (and its /healthz, /readyz, /metrics) is served.
    #[arg(long, default_value = "0.0.0.0:8080", env = "LISTEN")]
    listen: SocketAddr,
    /// Where /healthz, /readyz and /metrics are served (never on the public port).
    #[arg(long, default_value = "0.0.0.0:9090", env = "ADMIN_LISTEN")]
    admin_listen: SocketAddr,
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: String,
    #[arg(long, env = "CORE_DATABASE_URL", hide_env_values = true)]
    core_database_url: String,
    /// A read replica of the core database for the API's fallback reads (the API only reads
    /// Postgres; the ingester keeps the primary). Replica lag is harmless: the cache's version
    /// guard never lets an older row replace a newer one.
    #[arg(long, env = "CORE_DATABASE_READ_URL", hide_env_values = true)]
    core_database_read_url: Option<String>,
    /// A Redis replica for every cache read (and its invalidations), when the pipeline accepts
    /// replica lag; back-fills and stats still go to `REDIS_URL`.
    #[arg(long, env = "REDIS_READ_URL", hide_env_values = true)]
    redis_read_url: Option<String>,
}

#[derive(Args)]
struct DevArgs {
    /// Pipeline config file (YAML); defaults to the sample in examples/dev-config.yaml.
    #[arg(long, env = "WIDGET_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8080", env = "LISTEN")]
    listen: SocketAddr,
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: String,
    #[arg(long, env = "CORE_DATABASE_URL", hide_env_values = true)]
    core_database_url: String,
    /// The product database of every source; defaults to the core database.
    #[arg(long, env = "SOURCE_DATABASE_URL", hide_env_values = true)]
    source_database_url: Option<String>,
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Serves /healthz, /readyz and /metrics beside a component until `cancel` fires.
fn spawn_admin(
    listener: tokio::net::TcpListener,
    registry: Registry,
    readiness: Readiness,
    cancel: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let app = admin::router(AdminState {
        readiness,
        registry: Arc::new(registry),
    });
    tokio::spawn(admin::serve(listener, app, cancel))
}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).with_context(|| format!("invalid configuration in {}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tool = matches!(
        cli.command,
        Command::Widgets { .. } | Command::DeadLetters { .. } | Command::Acl { .. }
    );
    telemetry::init(cli.log_format, tool);
    match cli.command {
        Command::Migrate { target } => {
            let (url, migrator, what) = match target {
                MigrateTarget::Core { database_url } => {
                    (database_url, &*store::CORE_MIGRATIONS, "core")
                }
                MigrateTarget::Product { database_url } => {
                    (database_url, &*store::PRODUCT_MIGRATIONS, "product")
                }
            };
            let pool = sqlx::PgPool::connect(&url)
                .await
                .with_context(|| format!("cannot connect to the {what} database"))?;
            store::migrate(migrator, &pool)
                .await
                .with_context(|| format!("{what} migrations failed"))?;
            tracing::info!(database = what, "migrations applied");
        }
        Command::OutboxWorker(args) => {
            let config = load_config(&args.common.config)?;
            let settings = outbox::worker::WorkerSettings::from_config(&config, &args.source)?;
            let redis =
                connect::redis_from_env("REDIS_URL", &args.redis_url, &config.redis).await?;
            let pool = connect::pg_pool(&args.source_database_url, 4, &config.database)
                .context("invalid SOURCE_DATABASE_URL")?;
            let listener = bind(args.common.admin_listen).await?;
            let cancel = shutdown::on_signal();
            let mut registry = Registry::default();
            let readiness = Readiness::default();
            let worker = outbox::worker::OutboxWorker::new(
                settings,
                redis,
                pool,
                &mut registry,
                readiness.clone(),
            );
            let admin = spawn_admin(listener, registry, readiness, cancel.clone());
            worker.run(cancel.clone()).await?;
            cancel.cancel();
            admin.await??;
        }
        Command::Ingester(args) => {
            let config = load_config(&args.common.config)?;
            let redis =
                connect::redis_from_env("REDIS_URL", &args.redis_url, &config.redis).await?;
            let pool = connect::pg_pool(&args.core_database_url, 8, &config.database)
                .context("invalid CORE_DATABASE_URL")?;
            let consumer = match args.consumer {
                Some(name) if !name.trim().is_empty() => name,
                _ => gethostname::gethostname().to_string_lossy().into_owned(),
            };
            let listener = bind(args.common.admin_listen).await?;
            let cancel = shutdown::on_signal();
            let mut registry = Registry::default();
            let readiness = Readiness::default();
            let ingester = ingest::Ingester::new(
                &config,
                consumer,
                redis,
                pool.clone(),
                &mut registry,
                readiness.clone(),
            );
            // The admin server answers (not ready) while migrations wait for the database.
            let admin = spawn_admin(listener, registry, readiness, cancel.clone());
            let migrated = args.skip_migrations
                || ingest::migrate_core(&pool, &cancel)
                    .await
                    .context("core migrations failed")?;
            if migrated {
                ingester.run(cancel.clone()).await?;
            }
            cancel.cancel();
            admin.await??;
        }
        Command::CoreApi(args) => {
            let config = load_config(&args.config)?;
            let redis = api::RedisEndpoints {
                primary: connect::redis_from_env("REDIS_URL", &args.redis_url, &config.redis)
                    .await?,
                read: match args.redis_read_url.as_deref().filter(|u| !u.is_empty()) {
                    Some(url) => Some(
                        connect::redis_from_env("REDIS_READ_URL", url, &config.redis)
                            .await?
                            .reading_replicas()
                            .context("invalid REDIS_READ_URL")?,
                    ),
                    None => None,
                },
            };
            let pool = match args
                .core_database_read_url
                .as_deref()
                .filter(|u| !u.is_empty())
            {
                Some(read) => connect::pg_pool(read, 16, &config.database)
                    .context("invalid CORE_DATABASE_READ_URL")?,
                None => connect::pg_pool(&args.core_database_url, 16, &config.database)
                    .context("invalid CORE_DATABASE_URL")?,
            };
            let listener = bind(args.listen).await?;
            let admin = bind(args.admin_listen).await?;
            let cancel = shutdown::on_signal();
            api::serve(
                &config,
                redis,
                pool,
                api::Listeners {
                    api: listener,
                    admin: Some(admin),
                },
                Registry::default(),
                Readiness::default(),
                cancel,
            )
            .await?;
        }
        Command::DeadLetters { action } => {
            let (args, list_json, replay_dry) = match action {
                DeadLettersAction::List { args, json } => (args, Some(json), None),
                DeadLettersAction::Replay { args, dry_run } => (args, None, Some(dry_run)),
            };
            let config = load_config(&args.config)?;
            let filter = widget_runtime::dead_letters::Filter {
                reason: args.reason,
                since_ms: args.since.map(|d| {
                    widget_runtime::stats::unix_ms()
                        .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                }),
            };
            let mut redis = connect::redis_from_env("REDIS_URL", &args.redis_url, &config.redis)
                .await?
                .connection()
                .await
                .context("cannot connect to Redis")?;
            let dead_stream = config.dead_letter_stream();
            if let Some(json) = list_json {
                let letters =
                    widget_runtime::dead_letters::list(&mut redis, &dead_stream, &filter).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&letters)?);
                } else {
                    for l in &letters {
                        let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                        println!(
                            "{}  {}  {}  {}  {}  deliveries={}  {}",
                            l.id,
                            l.dead_lettered_at_ms
                                .and_then(|ms| u64::try_from(ms).ok())
                                .map(|ms| humantime::format_rfc3339_millis(
                                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
                                )
                                .to_string())
                                .unwrap_or_else(|| "-".into()),
                            or(&l.source),
                            or(&l.widget_key),
                            or(&l.reason),
                            l.deliveries.map_or("-".into(), |d| d.to_string()),
                            or(&l.error),
                        );
                    }
                    eprintln!("{} dead letters in {dead_stream}", letters.len());
                }
            }
            if let Some(dry_run) = replay_dry {
                let report = widget_runtime::dead_letters::replay(
                    &mut redis,
                    &config.stream_name(),
                    &dead_stream,
                    &filter,
                    dry_run,
                )
                .await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                tracing::info!(
                    replayed = report.replayed.len(),
                    skipped = report.skipped.len(),
                    dry_run,
                    "dead letters replayed into the stream"
                );
            }
        }
        Command::Acl {
            config,
            user,
            component,
        } => {
            use widget_runtime::acl::{Component, rules};
            let config = load_config(&config)?;
            let (component, label) = match &component {
                AclComponent::Worker { source } => {
                    anyhow::ensure!(
                        config.source(source).is_some(),
                        "no source `{source}` in the config"
                    );
                    (Component::Worker { source }, format!("worker-{source}"))
                }
                AclComponent::Ingester => (Component::Ingester, "ingester".into()),
                AclComponent::CoreApi => (Component::CoreApi, "core-api".into()),
            };
            let user = user.unwrap_or_else(|| format!("{}-{label}", config.pipeline));
            // The password is the operator's to choose: `>secret`, or `#<sha256 hex>`.
            println!(
                "ACL SETUSER {user} reset on >CHANGE-ME {}",
                rules(&config, component).join(" ")
            );
        }
        Command::Widgets { action } => {
            let (args, purge) = match action {
                WidgetsAction::Show(args) => (args, None),
                WidgetsAction::Purge { args, yes } => (args, Some(yes)),
            };
            widget_runtime::event::WidgetKey::parse(&args.key)
                .with_context(|| format!("`{}` is not a widget key", args.key))?;
            let config = load_config(&args.config)?;
            let cache = widget_runtime::cache::Cache::new(config.key_prefix());
            let pool = connect::pg_pool(&args.core_database_url, 1, &config.database)
                .context("invalid CORE_DATABASE_URL")?;
            let mut redis = connect::redis_from_env("REDIS_URL", &args.redis_url, &config.redis)
                .await?
                .connection()
                .await
                .context("cannot connect to Redis")?;
            let report = match purge {
                None | Some(false) => {
                    widget_runtime::repair::show(&pool, &mut redis, &cache, &args.key).await?
                }
                Some(true) => {
                    let before = widget_runtime::repair::purge(
                        &pool,
                        &mut redis,
                        &cache,
                        &args.key,
                        widget_runtime::repair::SECOND_DELETE_AFTER,
                    )
                    .await?;
                    let by = std::env::var("USER").unwrap_or_else(|_| {
                        gethostname::gethostname().to_string_lossy().into_owned()
                    });
                    tracing::warn!(key = %args.key, by = %by,
                        version = before.database.as_ref().map(|d| d.data_version),
                        cached_version = before.cache.as_ref().map(|c| c.version),
                        "widget purged from the core database and the cache");
                    before
                }
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
            if purge == Some(false) {
                eprintln!(
                    "nothing deleted: run again with --yes to purge {}",
                    args.key
                );
                std::process::exit(2);
            }
        }
        Command::Dev(args) => {
            let config = match &args.config {
                Some(path) => load_config(path)?,
                None => Config::from_yaml_str_with_env(
                    dev::SAMPLE_CONFIG,
                    widget_runtime::config_env::process_env(),
                )
                .context("the built-in sample config")?,
            };
            let stores = dev::DevStores {
                source_database_url: args
                    .source_database_url
                    .unwrap_or_else(|| args.core_database_url.clone()),
                redis_url: args.redis_url,
                core_database_url: args.core_database_url,
            };
            let listener = bind(args.listen).await?;
            let cancel = shutdown::on_signal();
            dev::run(config, stores, listener, cancel).await?;
        }
    }
    Ok(())
}
