//! Leader election with a `coordination.k8s.io` Lease (kube-lease-manager): only the holder
//! runs the controller, so two replicas never both act.

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

pub const LEASE_NAME: &str = "widget-operator";
pub const LEASE_SECONDS: u64 = 15;
pub const GRACE_SECONDS: u64 = 5;

/// Starts contending for the lease; the receiver says whether this replica holds it. Dropping
/// the receiver releases the lease.
pub async fn contend(
    client: Client,
    namespace: &str,
    identity: &str,
) -> anyhow::Result<(
    watch::Receiver<bool>,
    tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
)> {
    let manager = LeaseManagerBuilder::new(client, LEASE_NAME)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(GRACE_SECONDS)
        .build()
        .await?;
    Ok(manager.watch().await)
}
