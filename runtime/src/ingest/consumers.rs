//! Forgetting consumers that are gone.
//!
//! Every ingester pod joins the group under its own name (the pod name), so each rollout would
//! leave one more consumer in `XINFO CONSUMERS` for ever. After each reclaim pass the ingester
//! removes consumers that have nothing pending and have not read for `reclaim.idleConsumerTtl`.
//!
//! `XGROUP DELCONSUMER` drops the consumer's pending entries with it, so "nothing pending" must
//! still hold at the moment of the delete: the check and the delete run in one script, which
//! Redis executes atomically (no XREADGROUP can slip in between). A live consumer removed by
//! mistake costs nothing: its next XREADGROUP creates it again.

use std::sync::LazyLock;

use redis::Script;
use redis::aio::ConnectionLike;

/// KEYS[1] stream. ARGV[1] group, ARGV[2] the caller's own consumer name (never removed),
/// ARGV[3] idle threshold in ms. Returns the names of the consumers removed.
static REMOVE_IDLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local removed = {}
local threshold = tonumber(ARGV[3])
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do
    info[c[i]] = c[i + 1]
  end
  if info['name'] ~= ARGV[2] and info['pending'] == 0 and info['idle'] >= threshold then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed[#removed + 1] = info['name']
  end
end
return removed
"#,
    )
});

/// Removes the group's consumers (other than `keep`) with nothing pending and idle for at least
/// `idle_ms`. Returns their names.
pub async fn remove_idle<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    keep: &str,
    idle_ms: u64,
) -> redis::RedisResult<Vec<String>> {
    REMOVE_IDLE
        .key(stream)
        .arg(group)
        .arg(keep)
        .arg(idle_ms)
        .invoke_async(conn)
        .await
}
