//! The dead-letter stream (`<stream>.dead`): entries that can never be applied, kept verbatim
//! beside the reason, so the group keeps moving and nothing is silently dropped.
//!
//! Moving an entry is one atomic script per batch: for each entry, XACK it in the group and,
//! only if that XACK removed it from the pending list, XADD it to the dead-letter stream. So an
//! entry is never lost (it is acknowledged only together with its dead-letter copy) and never
//! doubled (a retry after a lost reply, or a second replica that reclaimed the same entry, finds
//! it already acknowledged and writes nothing). A MULTI/EXEC would give the first property but
//! not the second. The same script confirms the entry's outbox row to its worker (see
//! [`crate::durability`]) together with the XACK when the event was rejected for what it is: it
//! is handled, and its row must not wait in the outbox for a replay. An entry dead-lettered for
//! `max-deliveries` is not confirmed (its row stays for a replay or the retention cap).

use std::sync::LazyLock;

use redis::Script;
use redis::aio::ConnectionLike;

use super::consumer::Entry;
use crate::durability;
use crate::stats::unix_ms;
use crate::stream;

/// Extra fields of a dead-letter entry, beside the original ones.
pub mod field {
    /// Short stable reason: `undecodable`, `foreign-namespace`, `max-deliveries`, ...
    pub const REASON: &str = "reason";
    /// Human-readable message.
    pub const ERROR: &str = "error";
    /// The entry's id in the main stream.
    pub const ORIGINAL_ID: &str = "original_id";
    /// The consumer that dead-lettered it.
    pub const CONSUMER: &str = "consumer";
    pub const DEAD_LETTERED_AT_MS: &str = "dead_lettered_at_ms";
    /// Present when the original entry had more than [`super::MAX_COPIED_FIELDS`] fields.
    pub const TRUNCATED_FIELDS: &str = "truncated_fields";
    /// How often it had been delivered, when known (`max-deliveries`).
    pub const DELIVERIES: &str = "deliveries";

    /// Every field the dead-lettering adds; the rest are the original entry's.
    pub const CONTEXT: [&str; 7] = [
        REASON,
        ERROR,
        ORIGINAL_ID,
        CONSUMER,
        DEAD_LETTERED_AT_MS,
        TRUNCATED_FIELDS,
        DELIVERIES,
    ];
}

/// Original fields copied into a dead letter. The script's XADD passes every field through
/// Lua's `unpack`, which fails beyond about 8,000 values: an entry with thousands of fields
/// (only a foreign writer makes one) would otherwise fail its dead-lettering for ever and stall
/// every replica that reclaims it. Real entries have about a dozen fields.
pub const MAX_COPIED_FIELDS: usize = 64;

/// Reason for entries larger than [`stream::MAX_ENTRY_BYTES`].
pub const ENTRY_TOO_LARGE: &str = "entry-too-large";

/// Reason for entries delivered more than `reclaim.maxDeliveries` times.
pub const MAX_DELIVERIES: &str = "max-deliveries";

/// KEYS[1] stream, KEYS[2] dead-letter stream, KEYS[3..] confirmation sets. ARGV[1] group,
/// ARGV[2] MAXLEN of the dead-letter stream, then per entry: id, index into KEYS of its
/// confirmation set (0: none), confirmation member, field count n, then n field/value arguments.
/// Returns per entry 1 if it was moved, 0 if it was no longer pending (nothing written), then
/// how many older dead letters the MAXLEN cap trimmed.
static MOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
local before = redis.call('XLEN', KEYS[2])
local added = 0
local i = 3
while i <= #ARGV do
  local id = ARGV[i]
  local confirm = tonumber(ARGV[i + 1])
  local n = tonumber(ARGV[i + 3])
  local acked = redis.call('XACK', KEYS[1], ARGV[1], id)
  if acked == 1 then
    local args = {KEYS[2], 'MAXLEN', '~', ARGV[2], '*'}
    for j = 1, n do
      args[#args + 1] = ARGV[i + 3 + j]
    end
    redis.call('XADD', unpack(args))
    added = added + 1
  end
  if acked == 1 and confirm > 0 then
    redis.call('SADD', KEYS[confirm], ARGV[i + 2])
  end
  out[#out + 1] = acked
  i = i + 4 + n
end
out[#out + 1] = before + added - redis.call('XLEN', KEYS[2])
return out
"#,
    )
});

/// One entry to move, with why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: String,
    pub reason: &'static str,
    pub error: String,
    /// The original fields, verbatim.
    pub fields: Vec<(String, Vec<u8>)>,
    /// The source and outbox row it names, when it names them (a worker relayed it).
    pub origin: Option<(String, durability::RowRef)>,
    /// How often it had been delivered, when known.
    pub deliveries: Option<u64>,
}

impl DeadLetter {
    pub fn new(entry: &Entry, reason: &'static str, error: impl Into<String>) -> Self {
        let mut fields = stream::raw_fields(&entry.fields);
        let text = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        };
        let origin = text(stream::field::SOURCE).and_then(|source| {
            let id = durability::outbox_id(text(stream::field::EVENT_ID)?, source)?;
            let version = text(stream::field::DATA_VERSION)?.parse().ok()?;
            let produced_at_us = text(stream::field::PRODUCED_AT_US)?.parse().ok()?;
            let row = durability::RowRef {
                id,
                version,
                produced_at_us,
            };
            Some((source.to_string(), row))
        });
        let total = fields.len();
        if total > MAX_COPIED_FIELDS {
            fields.truncate(MAX_COPIED_FIELDS);
            fields.push((
                field::TRUNCATED_FIELDS.into(),
                format!("{total} fields, the first {MAX_COPIED_FIELDS} kept").into_bytes(),
            ));
        }
        Self {
            id: entry.id.clone(),
            reason,
            error: error.into(),
            fields,
            origin,
            deliveries: None,
        }
    }

    /// A dead letter for an entry too large to handle: every value clipped to
    /// [`stream::MAX_ECHOED`] bytes (the full size is in the error), so the entry is not copied
    /// again. It cannot be replayed; its outbox row, if any, stays for a replay or the cap.
    pub fn oversized(entry: &Entry, size: usize) -> Self {
        let mut fields: Vec<(String, Vec<u8>)> = entry
            .fields
            .iter()
            .take(MAX_COPIED_FIELDS)
            .map(|(k, v)| {
                let bytes: &[u8] = match v {
                    redis::Value::BulkString(b) => b,
                    redis::Value::SimpleString(s) => s.as_bytes(),
                    _ => b"",
                };
                let cut = &bytes[..bytes.len().min(stream::MAX_ECHOED)];
                (stream::clip(k), cut.to_vec())
            })
            .collect();
        fields.sort();
        fields.push((
            field::TRUNCATED_FIELDS.into(),
            format!("every value clipped to {} bytes", stream::MAX_ECHOED).into_bytes(),
        ));
        Self {
            id: entry.id.clone(),
            reason: ENTRY_TOO_LARGE,
            error: format!(
                "the entry is {size} bytes, more than the {} an entry may take",
                stream::MAX_ENTRY_BYTES
            ),
            fields,
            origin: None,
            deliveries: None,
        }
    }

    pub fn with_deliveries(mut self, times: u64) -> Self {
        self.deliveries = Some(times);
        self
    }

    /// The dead-letter entry's fields: the original ones, then the reason and context.
    pub fn entry_fields(&self, consumer: &str, now_ms: i64) -> Vec<(String, Vec<u8>)> {
        let mut f = self.fields.clone();
        f.push((field::REASON.into(), self.reason.as_bytes().to_vec()));
        f.push((field::ERROR.into(), self.error.as_bytes().to_vec()));
        f.push((field::ORIGINAL_ID.into(), self.id.as_bytes().to_vec()));
        f.push((field::CONSUMER.into(), consumer.as_bytes().to_vec()));
        f.push((
            field::DEAD_LETTERED_AT_MS.into(),
            now_ms.to_string().into_bytes(),
        ));
        if let Some(times) = self.deliveries {
            f.push((field::DELIVERIES.into(), times.to_string().into_bytes()));
        }
        f
    }
}

/// Where dead letters go and who writes them.
#[derive(Debug, Clone)]
pub struct DeadLetterTarget<'a> {
    pub stream: &'a str,
    pub group: &'a str,
    pub dead_stream: &'a str,
    pub max_len: u64,
    pub consumer: &'a str,
}

/// What one move did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Moved {
    /// Per entry: whether this call moved it.
    pub moved: Vec<bool>,
    /// Older dead letters the `MAXLEN` cap trimmed to make room.
    pub trimmed: u64,
}

/// Moves entries in one atomic script call.
pub async fn move_entries<C: ConnectionLike>(
    conn: &mut C,
    target: &DeadLetterTarget<'_>,
    letters: &[DeadLetter],
) -> redis::RedisResult<Moved> {
    if letters.is_empty() {
        return Ok(Moved::default());
    }
    let now = unix_ms();
    let mut inv = MOVE.prepare_invoke();
    inv.key(target.stream).key(target.dead_stream);
    inv.arg(target.group).arg(target.max_len);
    let mut confirm_keys: Vec<String> = Vec::new();
    for l in letters {
        let fields = l.entry_fields(target.consumer, now);
        // An entry that merely kept failing is not confirmed: its row stays in the outbox (the
        // only copy outside Redis) for a replay or the retention cap, rather than living on
        // only in the dead-letter stream.
        let origin = l.origin.as_ref().filter(|_| l.reason != MAX_DELIVERIES);
        let (index, member) = match origin {
            Some((source, row)) => {
                let key = durability::confirmed_key(target.stream, source);
                let at = match confirm_keys.iter().position(|k| *k == key) {
                    Some(at) => at,
                    None => {
                        inv.key(&key);
                        confirm_keys.push(key);
                        confirm_keys.len() - 1
                    }
                };
                (at + 3, row.member())
            }
            None => (0, String::new()),
        };
        inv.arg(&l.id).arg(index).arg(member).arg(fields.len() * 2);
        for (k, v) in fields {
            inv.arg(k).arg(v);
        }
    }
    let moved: Vec<i64> = inv.invoke_async(conn).await?;
    let mut moved = moved;
    let trimmed = moved.pop().unwrap_or(0).max(0) as u64;
    Ok(Moved {
        moved: moved.into_iter().map(|m| m == 1).collect(),
        trimmed,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn dead_letter_keeps_original_fields_and_adds_context() {
        let entry = Entry {
            id: "7-1".into(),
            fields: HashMap::from([(
                "widget_key".to_string(),
                redis::Value::BulkString(b"deals.x".to_vec()),
            )]),
        };
        let dl = DeadLetter::new(&entry, "undecodable", "field `v` is missing");
        let f: HashMap<String, Vec<u8>> = dl.entry_fields("pod-a", 42).into_iter().collect();
        assert_eq!(f["widget_key"], b"deals.x");
        assert_eq!(f[field::REASON], b"undecodable");
        assert_eq!(f[field::ERROR], b"field `v` is missing");
        assert_eq!(f[field::ORIGINAL_ID], b"7-1");
        assert_eq!(f[field::CONSUMER], b"pod-a");
        assert_eq!(f[field::DEAD_LETTERED_AT_MS], b"42");
    }
}
