//! Opening connections with the timeouts this system needs.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client};
use sqlx::PgPool;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Response timeout of the shared Redis connection (redis-rs 1.x defaults to 500 ms).
pub const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
pub const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub fn redis_client(url: &str) -> redis::RedisResult<Client> {
    Client::open(url)
}

/// A reconnecting multiplexed connection for ordinary commands. Each command that meets a
/// dead connection fails (it is not retried); the next one reconnects.
pub async fn redis_manager(client: &Client) -> redis::RedisResult<ConnectionManager> {
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client.clone(), cfg).await
}

/// A connection of its own for blocking reads (`XREADGROUP ... BLOCK`): its response timeout
/// must outlast the block time, or every idle read fails as a timeout.
pub async fn redis_blocking(
    client: &Client,
    block: Duration,
) -> redis::RedisResult<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(block + Duration::from_secs(3)));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

/// A pool that connects lazily, so a component starts (and reports not-ready) while its
/// database is down, and recovers by itself when it returns.
///
/// JIT is off for these sessions: every query here is a short keyed or batched statement, and
/// a cost estimate that crosses `jit_above_cost` on a table without statistics yet (a freshly
/// filled outbox) made a 500-row claim take 100-150 ms of compilation (measured in the relay
/// benchmark).
pub fn pg_pool(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?.options([("jit", "off")]);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy_with(options))
}
