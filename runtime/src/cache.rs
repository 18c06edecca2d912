//! The Redis hot cache: one string per widget holding the ready-to-send JSON.
//!
//! A value is a 19-digit zero-padded version, `|`, then the widget's JSON object exactly as the
//! API sends it (`{"key":..,"type":..,"version":..,"content":..}`). An empty JSON part is a
//! tombstone: the widget was deleted at that version. Fixed-width versions let the guard script
//! compare them as strings, exactly, without Lua's 53-bit numbers.
//!
//! Every write goes through one atomic script that never replaces a newer version with an older
//! one, whoever writes (ingester replicas with the long TTL, API back-fills with the short one).

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

const VERSION_WIDTH: usize = 19;
const HEADER_LEN: usize = VERSION_WIDTH + 1;

/// Set each key only if the stored version is older (or absent). Equal version: keep the value,
/// but extend its TTL when the new TTL is longer (an ingester replay after a back-fill).
/// KEYS: the cache keys. ARGV: per key, the padded version, the full value, the TTL in ms.
/// Returns per key 1 if written, 0 if a same-or-newer version was already there.
static GUARDED_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 3
  local version = ARGV[base + 1]
  local value = ARGV[base + 2]
  local ttl = tonumber(ARGV[base + 3])
  local cur = redis.call('GET', key)
  local cur_version = cur and string.sub(cur, 1, 19) or nil
  if cur_version == nil or cur_version < version then
    redis.call('SET', key, value, 'PX', ttl)
    out[i] = 1
  else
    if cur_version == version and redis.call('PTTL', key) < ttl then
      redis.call('PEXPIRE', key, ttl)
    end
    out[i] = 0
  end
end
return out
"#,
    )
});

/// Most bytes of values in one call of the guarded script: a whole batch of large widgets in
/// one call (batch size x 64 KiB) could outlast the connection's response timeout or pass the
/// server's query-buffer limit, fail on every retry and never progress.
pub const MAX_WRITE_BYTES: usize = 1 << 20;

/// Consecutive ranges of `writes` of at most [`MAX_WRITE_BYTES`] each, one script call per range.
pub fn write_chunks(writes: &[CacheWrite<'_>]) -> Vec<std::ops::Range<usize>> {
    chunks_of(writes, MAX_WRITE_BYTES)
}

fn chunks_of(writes: &[CacheWrite<'_>], max: usize) -> Vec<std::ops::Range<usize>> {
    crate::chunk::by_size(
        writes,
        |w| w.json.map_or(0, <[u8]>::len) + w.widget_key.len() + 32,
        max,
    )
}

/// One guarded write.
#[derive(Debug, Clone)]
pub struct CacheWrite<'a> {
    pub widget_key: &'a str,
    pub version: i64,
    /// `None` writes a tombstone.
    pub json: Option<&'a [u8]>,
    pub ttl: Duration,
}

/// What a cache value says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached<'a> {
    Widget { version: i64, json: &'a [u8] },
    Deleted { version: i64 },
}

pub fn encode_value(version: i64, json: Option<&[u8]>) -> Vec<u8> {
    let json = json.unwrap_or_default();
    let mut v = Vec::with_capacity(HEADER_LEN + json.len());
    v.extend_from_slice(format!("{:0width$}|", version.max(0), width = VERSION_WIDTH).as_bytes());
    v.extend_from_slice(json);
    v
}

/// Reads a cache value; `None` if it is not in this format (treated as a miss).
pub fn decode_value(raw: &[u8]) -> Option<Cached<'_>> {
    if raw.len() < HEADER_LEN || raw[VERSION_WIDTH] != b'|' {
        return None;
    }
    let version: i64 = std::str::from_utf8(&raw[..VERSION_WIDTH])
        .ok()?
        .parse()
        .ok()?;
    let json = &raw[HEADER_LEN..];
    Some(if json.is_empty() {
        Cached::Deleted { version }
    } else {
        Cached::Widget { version, json }
    })
}

/// The widget object the API sends, built once at write time so reads only splice bytes.
/// `content` must be valid JSON (it comes from Postgres jsonb or a validated event).
pub fn widget_json(widget_key: &str, widget_type: &str, version: i64, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + widget_key.len() + widget_type.len() + 48);
    out.extend_from_slice(b"{\"key\":");
    // Keys and types are validated to plain ASCII, but escaping keeps this correct regardless.
    out.extend_from_slice(serde_json::Value::from(widget_key).to_string().as_bytes());
    out.extend_from_slice(b",\"type\":");
    out.extend_from_slice(serde_json::Value::from(widget_type).to_string().as_bytes());
    out.extend_from_slice(format!(",\"version\":{version},\"content\":").as_bytes());
    out.extend_from_slice(content);
    out.push(b'}');
    out
}

/// Cache keys of one pipeline.
#[derive(Debug, Clone)]
pub struct Cache {
    prefix: String,
}

impl Cache {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn key(&self, widget_key: &str) -> String {
        format!("{}w:{widget_key}", self.prefix)
    }

    /// Writes many widgets in one atomic script call; returns per write whether it won.
    ///
    /// In a cluster the writes are split by slot (cache keys carry no hash tag, so they spread
    /// over every node) and the parts run at once: one round trip, not one per slot.
    pub async fn write_many<C: crate::connect::Topology>(
        &self,
        conn: &mut C,
        writes: &[CacheWrite<'_>],
    ) -> redis::RedisResult<Vec<bool>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        if !conn.is_cluster() {
            return self.guarded_set(conn, writes.iter()).await;
        }
        let mut slots: std::collections::HashMap<redis::cluster_routing::Slot, Vec<usize>> =
            Default::default();
        for (i, w) in writes.iter().enumerate() {
            let slot = redis::cluster_routing::Slot::for_key(self.key(w.widget_key));
            slots.entry(slot).or_default().push(i);
        }
        let parts = slots.into_values().map(|part| {
            let mut conn = conn.clone();
            async move {
                let won = self
                    .guarded_set(&mut conn, part.iter().map(|&i| &writes[i]))
                    .await?;
                Ok::<_, redis::RedisError>((part, won))
            }
        });
        let mut out = vec![false; writes.len()];
        for (part, won) in futures::future::try_join_all(parts).await? {
            for (i, w) in part.into_iter().zip(won) {
                out[i] = w;
            }
        }
        Ok(out)
    }

    /// One call of the guarded script (all keys in one slot, in a cluster).
    async fn guarded_set<'w, C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        writes: impl Iterator<Item = &'w CacheWrite<'w>>,
    ) -> redis::RedisResult<Vec<bool>> {
        let mut inv = GUARDED_SET.prepare_invoke();
        for w in writes {
            inv.key(self.key(w.widget_key));
            inv.arg(format!(
                "{:0width$}",
                w.version.max(0),
                width = VERSION_WIDTH
            ));
            inv.arg(encode_value(w.version, w.json));
            inv.arg(w.ttl.as_millis().max(1) as u64);
        }
        let won: Vec<i64> = inv.invoke_async(conn).await?;
        Ok(won.into_iter().map(|w| w == 1).collect())
    }

    /// Fetches many widgets with one MGET, in the order asked.
    pub async fn get_many<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        widget_keys: &[&str],
    ) -> redis::RedisResult<Vec<Option<Vec<u8>>>> {
        if widget_keys.is_empty() {
            return Ok(Vec::new());
        }
        self.mget(widget_keys).query_async(conn).await
    }

    /// `MGET` of the widgets' cache keys (at least one), as a command that owns its arguments.
    pub fn mget(&self, widget_keys: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("MGET");
        for k in widget_keys {
            cmd.arg(self.key(k));
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_chunked_by_bytes() {
        let big: &[u8] = &[b'x'; 600];
        let w = |json: Option<&'static [u8]>| CacheWrite {
            widget_key: "a.b",
            version: 1,
            json,
            ttl: Duration::from_secs(1),
        };
        let big: &'static [u8] = Box::leak(big.to_vec().into_boxed_slice());
        let writes = vec![w(Some(big)), w(Some(big)), w(None), w(Some(big))];
        // 635 + 635 > 1000: each big one alone, the tombstone rides with the one before it.
        assert_eq!(chunks_of(&writes, 1000), vec![0..1, 1..3, 3..4]);
        assert!(write_chunks(&[]).is_empty());
    }

    #[test]
    fn values_round_trip() {
        let json = br#"{"key":"a.b"}"#;
        let v = encode_value(42, Some(json));
        assert_eq!(&v[..20], b"0000000000000000042|");
        assert_eq!(decode_value(&v), Some(Cached::Widget { version: 42, json }));
        let t = encode_value(i64::MAX, None);
        assert_eq!(
            decode_value(&t),
            Some(Cached::Deleted { version: i64::MAX })
        );
        assert_eq!(decode_value(b"garbage"), None);
        assert_eq!(decode_value(b"000000000000000004x|{}"), None);
    }

    #[test]
    fn widget_json_is_valid_json_with_the_content_spliced() {
        let j = widget_json("deals.top", "carousel", 7, br#"{"items":[1,2]}"#);
        let v: serde_json::Value = serde_json::from_slice(&j).expect("valid json");
        assert_eq!(v["key"], "deals.top");
        assert_eq!(v["type"], "carousel");
        assert_eq!(v["version"], 7);
        assert_eq!(v["content"]["items"][1], 2);
    }
}
