//! `widget-operator run [--namespace NS]` runs the controller; `widget-operator crd` prints the
//! CustomResourceDefinition.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use widget_operator::admin::{self, AdminState};
use widget_operator::controller::{self, Context};
use widget_operator::leader;
use widget_operator::metrics::Metrics;
use widget_runtime::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "widget-operator",
    version,
    about = "Runs WidgetPipeline resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run(RunArgs),
    /// Print the WidgetPipeline CustomResourceDefinition (YAML).
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (least-privilege installs); all namespaces when unset.
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    admin_listen: SocketAddr,
    /// Namespace of the leader-election Lease (defaults to the operator's own namespace).
    #[arg(long, env = "LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Identity in the Lease; the pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Image prefixes pipelines may run, comma-separated (e.g.
    /// `ghcr.io/example/widget-runtime:`); a pipeline with another image is refused with the
    /// status reason `ImageNotAllowed`. Unset: any image.
    #[arg(long, env = "ALLOWED_IMAGES", value_delimiter = ',')]
    allowed_images: Vec<String>,
    /// Run without leader election (a single replica, e.g. local development).
    #[arg(long)]
    no_leader_election: bool,
    #[arg(long, value_enum, env = "LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", widget_crds::crd_yaml());
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format, false);
    // kube's rustls client needs a process-wide crypto provider; naming it here keeps the
    // client working even if another dependency later enables a second provider (rustls then
    // refuses to guess). Err only means one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let shutdown = widget_runtime::shutdown::on_signal();

    let client = kube::Client::try_default()
        .await
        .context("cannot configure a Kubernetes client")?;
    let version = client
        .apiserver_version()
        .await
        .context("the Kubernetes API does not answer")?;
    tracing::info!(server = %version.git_version, namespace = ?args.namespace, "starting");

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let admin = tokio::spawn(admin::serve(
        args.admin_listen,
        AdminState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        shutdown.clone(),
    ));

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("widget-operator-{}", std::process::id()));
    let ctx = Arc::new(
        Context::new(client.clone(), metrics.clone(), Some(identity.clone()))
            .with_allowed_images(args.allowed_images.clone()),
    );
    ready.store(true, Ordering::Relaxed);

    if args.no_leader_election {
        metrics.leader.set(1);
        let token = shutdown.clone();
        controller::run(ctx, args.namespace.clone(), async move {
            token.cancelled().await
        })
        .await;
    } else {
        let lease_ns = args
            .lease_namespace
            .clone()
            .or_else(|| {
                std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                    .ok()
            })
            .or_else(|| args.namespace.clone())
            .unwrap_or_else(|| "default".into());
        let (mut leading, lease_task) =
            leader::contend(client.clone(), lease_ns.trim(), &identity).await?;
        loop {
            // Wait to become the leader (or for shutdown).
            while !*leading.borrow_and_update() {
                tokio::select! {
                    changed = leading.changed() => {
                        if changed.is_err() {
                            anyhow::bail!("the lease manager stopped");
                        }
                    }
                    _ = shutdown.cancelled() => break,
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            tracing::info!(%identity, "leading");
            metrics.leader.set(1);
            // Run until shutdown or until the lease is lost.
            let stop = CancellationToken::new();
            let watcher_stop = stop.clone();
            let mut lost = leading.clone();
            let app_shutdown = shutdown.clone();
            let guard = tokio::spawn(async move {
                tokio::select! {
                    _ = app_shutdown.cancelled() => {}
                    _ = async { while lost.changed().await.is_ok() && *lost.borrow() {} } => {}
                }
                watcher_stop.cancel();
            });
            let token = stop.clone();
            controller::run(ctx.clone(), args.namespace.clone(), async move {
                token.cancelled().await
            })
            .await;
            guard.abort();
            metrics.leader.set(0);
            if shutdown.is_cancelled() {
                break;
            }
            tracing::warn!("lost the lease; standing by");
        }
        // Dropping the receiver makes the manager release the lease.
        drop(leading);
        match lease_task.await {
            Ok(Ok(_)) => tracing::info!("lease released"),
            Ok(Err(e)) => tracing::warn!(error = %e, "lease manager failed"),
            Err(e) => tracing::warn!(error = %e, "lease task failed"),
        }
    }
    shutdown.cancel();
    match admin.await {
        Ok(result) => result?,
        Err(e) => tracing::warn!(error = %e, "admin server task failed"),
    }
    Ok(())
}
