//! `widget-runtime`: every runtime component of the Home Widget Platform in one binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use widget_runtime::config::Config;
use widget_runtime::telemetry::{self, LogFormat};
use widget_runtime::{connect, outbox, shutdown, store};

#[derive(Parser)]
#[command(name = "widget-runtime", version, about = "Home Widget Platform runtime components")]
struct Cli {
    /// Log as human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value = "text", env = "LOG_FORMAT")]
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

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).with_context(|| format!("invalid configuration in {}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Migrate { target } => {
            let (url, migrator, what) = match target {
                MigrateTarget::Core { database_url } => (database_url, &*store::CORE_MIGRATIONS, "core"),
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
            let redis = connect::redis_client(&args.redis_url).context("invalid REDIS_URL")?;
            let pool = connect::pg_pool(&args.source_database_url, 4)
                .context("invalid SOURCE_DATABASE_URL")?;
            let listener = tokio::net::TcpListener::bind(args.common.admin_listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.common.admin_listen))?;
            let cancel = shutdown::on_signal();
            outbox::worker::run_standalone(settings, redis, pool, listener, cancel).await?;
        }
    }
    Ok(())
}
