//! The consumer-group side of Redis Streams: creating the group, the blocking read, XACK, and
//! parsing entries from raw replies.
//!
//! Replies are parsed from `redis::Value` by hand rather than through redis-rs' typed stream
//! replies: those fail the whole reply when one entry has a field name that is not UTF-8, which
//! would let one foreign entry block the group forever. Here such an entry simply fails to decode
//! and is dead-lettered like any other bad entry.

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionLike;

/// One stream entry as delivered: its id and its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    pub fields: HashMap<String, Value>,
}

/// True when Redis answered that the stream or the consumer group does not exist (a Redis that
/// restarted without its data, or a stream someone deleted).
pub fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}

/// `XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS s >`: new entries for this consumer, or none
/// when the block time passes. A zero `block` does not block at all (Redis's `BLOCK 0` would
/// wait for ever).
pub async fn read_new<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
    block: Duration,
) -> redis::RedisResult<Vec<Entry>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count.max(1));
    if !block.is_zero() {
        cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
    }
    let reply: Value = cmd
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(conn)
        .await?;
    Ok(parse_read_reply(reply))
}

/// Acknowledges entries; returns how many were still pending.
pub async fn ack<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    ids: &[&str],
) -> redis::RedisResult<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    redis::cmd("XACK")
        .arg(stream)
        .arg(group)
        .arg(ids)
        .query_async(conn)
        .await
}

/// Acknowledges entries and records their confirmations in one MULTI: an entry is never
/// acknowledged without its outbox row being confirmed (the row would wait for a replay), nor
/// confirmed while still pending. Retrying after a lost reply repeats both harmlessly.
pub async fn ack_and_confirm<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    ids: &[&str],
    confirms: &crate::durability::Confirmations,
) -> redis::RedisResult<()> {
    if ids.is_empty() && confirms.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    confirms.add_to(&mut pipe);
    if !ids.is_empty() {
        pipe.cmd("XACK").arg(stream).arg(group).arg(ids).ignore();
    }
    pipe.query_async(conn).await
}

/// Entries of an XREADGROUP reply: RESP2 `[[stream, [entry..]]..]`, RESP3 `{stream: [entry..]}`,
/// or nil when the block time passed.
pub fn parse_read_reply(reply: Value) -> Vec<Entry> {
    let per_stream: Vec<Value> = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    per_stream.into_iter().flat_map(parse_entries).collect()
}

/// A list of `[id, [field, value, ..]]` entries. An entry whose fields are nil (deleted while
/// pending) comes back with no fields, so it fails to decode and is dead-lettered.
pub fn parse_entries(list: Value) -> Vec<Entry> {
    let Value::Array(items) = list else {
        return Vec::new();
    };
    items.into_iter().filter_map(parse_entry).collect()
}

fn parse_entry(v: Value) -> Option<Entry> {
    let Value::Array(parts) = v else {
        return None;
    };
    let mut parts = parts.into_iter();
    let id = as_text(parts.next()?)?;
    let fields = match parts.next() {
        Some(Value::Array(flat)) => {
            let mut fields = HashMap::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                let name = match k {
                    Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                    Value::SimpleString(s) => s,
                    other => format!("{other:?}"),
                };
                fields.insert(name, v);
            }
            fields
        }
        Some(Value::Map(pairs)) => pairs
            .into_iter()
            .filter_map(|(k, v)| as_text(k).map(|k| (k, v)))
            .collect(),
        _ => HashMap::new(),
    };
    Some(Entry { id, fields })
}

pub(crate) fn as_text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, kv: &[(&str, &str)]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(kv.iter().flat_map(|(k, v)| [bulk(k), bulk(v)]).collect()),
        ])
    }

    #[test]
    fn resp2_read_reply_parses() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                entry("1-0", &[("a", "1")]),
                entry("2-0", &[("b", "2")]),
            ]),
        ])]);
        let e = parse_read_reply(reply);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].id, "1-0");
        assert_eq!(e[1].fields.get("b"), Some(&bulk("2")));
    }

    #[test]
    fn resp3_read_reply_and_nil_parse() {
        let reply = Value::Map(vec![(
            bulk("s"),
            Value::Array(vec![entry("3-0", &[("a", "1")])]),
        )]);
        assert_eq!(parse_read_reply(reply)[0].id, "3-0");
        assert!(parse_read_reply(Value::Nil).is_empty());
    }

    #[test]
    fn odd_entries_survive_parsing() {
        // A field name that is not UTF-8 and a deleted (nil) entry: both still come back, so
        // they can be dead-lettered instead of failing the whole reply.
        let weird = Value::Array(vec![
            bulk("4-0"),
            Value::Array(vec![Value::BulkString(vec![0xff, 0xfe]), bulk("x")]),
        ]);
        let deleted = Value::Array(vec![bulk("5-0"), Value::Nil]);
        let e = parse_entries(Value::Array(vec![weird, deleted]));
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].fields.len(), 1);
        assert!(e[1].fields.is_empty());
    }
}
