//! The Redis Stream entry: the envelope between the outbox-worker and the ingester.
//!
//! Fields of one entry (all strings or bytes):
//! `v` (envelope version), `event_id` (`<source>:<outbox id>`), `source`, `widget_key`,
//! `widget_type`, `data_version`, `op`, `content` (JSON bytes, absent for deletes) and
//! `produced_at_us` (the outbox row's `created_at`, unix microseconds, for ingress lag).

use std::collections::HashMap;

use redis::Value;

use crate::event::{self, EventError, Op};

pub const ENVELOPE_VERSION: &str = "1";

/// Largest entry (field names and values) the ingester decodes. A real entry is at most the
/// 64 KiB content limit plus about a hundred bytes; anything far larger is dead-lettered by its
/// length, with its values clipped, before it is copied any further.
pub const MAX_ENTRY_BYTES: usize = 256 * 1024;

/// Longest value echoed into an error message, a log line or a clipped dead letter.
pub const MAX_ECHOED: usize = 256;

/// At most [`MAX_ECHOED`] bytes of `s`, cut at a character boundary, with the full length.
pub fn clip(s: &str) -> String {
    if s.len() <= MAX_ECHOED {
        return s.to_string();
    }
    let mut end = MAX_ECHOED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

/// The bytes an entry's field names and values take.
pub fn entry_size(map: &HashMap<String, Value>) -> usize {
    map.iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    Value::BulkString(b) => b.len(),
                    Value::SimpleString(s) => s.len(),
                    _ => 16,
                }
        })
        .sum()
}

pub mod field {
    pub const VERSION: &str = "v";
    pub const EVENT_ID: &str = "event_id";
    pub const SOURCE: &str = "source";
    pub const WIDGET_KEY: &str = "widget_key";
    pub const WIDGET_TYPE: &str = "widget_type";
    pub const DATA_VERSION: &str = "data_version";
    pub const OP: &str = "op";
    pub const CONTENT: &str = "content";
    pub const PRODUCED_AT_US: &str = "produced_at_us";
}

/// An event as it travels through the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    pub event_id: String,
    pub source: String,
    pub widget_key: String,
    pub widget_type: String,
    pub data_version: i64,
    pub op: Op,
    /// Serialized JSON, exactly as the producer wrote it; `None` for deletes.
    pub content: Option<Vec<u8>>,
    pub produced_at_us: i64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{field}` is not valid: {message}")]
    Bad {
        field: &'static str,
        message: String,
    },
    #[error(
        "envelope version `{0}` is not supported (this build reads version {ENVELOPE_VERSION})"
    )]
    Version(String),
    #[error(transparent)]
    Rules(#[from] EventError),
}

impl DecodeError {
    /// A short stable reason for dead-letter entries and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Rules(e) => e.reason(),
            DecodeError::Version(_) => "unsupported-envelope",
            DecodeError::Missing(_) | DecodeError::Bad { .. } => "undecodable",
        }
    }
}

impl StreamEvent {
    /// The field/value pairs for XADD.
    pub fn to_fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut f = Vec::with_capacity(9);
        f.push((field::VERSION, ENVELOPE_VERSION.as_bytes().to_vec()));
        f.push((field::EVENT_ID, self.event_id.as_bytes().to_vec()));
        f.push((field::SOURCE, self.source.as_bytes().to_vec()));
        f.push((field::WIDGET_KEY, self.widget_key.as_bytes().to_vec()));
        f.push((field::WIDGET_TYPE, self.widget_type.as_bytes().to_vec()));
        f.push((
            field::DATA_VERSION,
            self.data_version.to_string().into_bytes(),
        ));
        f.push((field::OP, self.op.as_str().as_bytes().to_vec()));
        if let Some(c) = &self.content {
            f.push((field::CONTENT, c.clone()));
        }
        f.push((
            field::PRODUCED_AT_US,
            self.produced_at_us.to_string().into_bytes(),
        ));
        f
    }

    /// Decodes an entry's fields and checks the event rules, including ownership: the key must
    /// be in the namespace of the source that produced it.
    pub fn decode(map: &HashMap<String, Value>) -> Result<Self, DecodeError> {
        let version = text(map, field::VERSION)?;
        if version != ENVELOPE_VERSION {
            return Err(DecodeError::Version(version));
        }
        let op_text = text(map, field::OP)?;
        let op = Op::parse(&op_text).ok_or_else(|| DecodeError::Bad {
            field: field::OP,
            message: format!("`{}` is neither upsert nor delete", clip(&op_text)),
        })?;
        let content = match map.get(field::CONTENT) {
            None | Some(Value::Nil) => None,
            Some(_) => {
                let bytes = bytes(map, field::CONTENT)?;
                if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err() {
                    return Err(DecodeError::Bad {
                        field: field::CONTENT,
                        message: "not valid JSON".into(),
                    });
                }
                Some(bytes)
            }
        };
        let ev = StreamEvent {
            event_id: text(map, field::EVENT_ID)?,
            source: text(map, field::SOURCE)?,
            widget_key: text(map, field::WIDGET_KEY)?,
            widget_type: text(map, field::WIDGET_TYPE)?,
            data_version: number(map, field::DATA_VERSION)?,
            op,
            content,
            produced_at_us: number(map, field::PRODUCED_AT_US)?,
        };
        event::validate_fields(
            &ev.widget_key,
            &ev.widget_type,
            ev.data_version,
            ev.op,
            ev.content.as_ref().map(|c| c.len()),
        )?;
        event::check_owner(&ev.source, &ev.widget_key)?;
        Ok(ev)
    }
}

fn bytes(map: &HashMap<String, Value>, name: &'static str) -> Result<Vec<u8>, DecodeError> {
    match map.get(name) {
        None | Some(Value::Nil) => Err(DecodeError::Missing(name)),
        Some(Value::BulkString(b)) => Ok(b.clone()),
        Some(Value::SimpleString(s)) => Ok(s.clone().into_bytes()),
        Some(Value::Int(i)) => Ok(i.to_string().into_bytes()),
        Some(other) => Err(DecodeError::Bad {
            field: name,
            message: format!("unexpected value {other:?}"),
        }),
    }
}

fn text(map: &HashMap<String, Value>, name: &'static str) -> Result<String, DecodeError> {
    String::from_utf8(bytes(map, name)?).map_err(|_| DecodeError::Bad {
        field: name,
        message: "not UTF-8".into(),
    })
}

fn number(map: &HashMap<String, Value>, name: &'static str) -> Result<i64, DecodeError> {
    let t = text(map, name)?;
    t.parse().map_err(|_| DecodeError::Bad {
        field: name,
        message: format!("`{}` is not an integer", clip(&t)),
    })
}

/// All fields of an entry as text, for dead-lettering an entry verbatim beside its reason.
pub fn raw_fields(map: &HashMap<String, Value>) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = map
        .iter()
        .map(|(k, v)| {
            let b = match v {
                Value::BulkString(b) => b.clone(),
                Value::SimpleString(s) => s.clone().into_bytes(),
                Value::Int(i) => i.to_string().into_bytes(),
                other => format!("{other:?}").into_bytes(),
            };
            (k.clone(), b)
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StreamEvent {
        StreamEvent {
            event_id: "deals:7".into(),
            source: "deals".into(),
            widget_key: "deals.top".into(),
            widget_type: "carousel".into(),
            data_version: 3,
            op: Op::Upsert,
            content: Some(br#"{"title":"Hi"}"#.to_vec()),
            produced_at_us: 1_700_000_000_000_000,
        }
    }

    fn as_map(ev: &StreamEvent) -> HashMap<String, Value> {
        ev.to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), Value::BulkString(v)))
            .collect()
    }

    #[test]
    fn echoed_values_are_clipped_at_a_character_boundary() {
        assert_eq!(clip("short"), "short");
        let e = clip(&"é".repeat(200));
        assert!(e.starts_with("éé") && e.ends_with("(400 bytes)"), "{e}");
        assert!(e.len() < MAX_ECHOED + 20);
    }

    #[test]
    fn encode_decode_round_trip() {
        let ev = sample();
        assert_eq!(StreamEvent::decode(&as_map(&ev)), Ok(ev.clone()));
        let mut del = ev;
        del.op = Op::Delete;
        del.content = None;
        assert_eq!(StreamEvent::decode(&as_map(&del)), Ok(del));
    }

    #[test]
    fn bad_entries_have_reasons() {
        let mut m = as_map(&sample());
        m.remove(field::WIDGET_KEY);
        assert_eq!(
            StreamEvent::decode(&m).map_err(|e| e.reason()),
            Err("undecodable")
        );

        let mut m = as_map(&sample());
        m.insert(
            field::CONTENT.into(),
            Value::BulkString(b"{not json".to_vec()),
        );
        assert_eq!(
            StreamEvent::decode(&m).map_err(|e| e.reason()),
            Err("undecodable")
        );

        let mut m = as_map(&sample());
        m.insert(field::VERSION.into(), Value::BulkString(b"9".to_vec()));
        assert_eq!(
            StreamEvent::decode(&m).map_err(|e| e.reason()),
            Err("unsupported-envelope")
        );

        let mut ev = sample();
        ev.widget_key = "loyalty.points".into();
        let e = StreamEvent::decode(&as_map(&ev)).expect_err("foreign");
        assert_eq!(e.reason(), "foreign-namespace");
    }
}
