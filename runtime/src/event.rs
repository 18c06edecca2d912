//! A widget change as product teams produce it, and the rules every event must keep.
//!
//! The same rules are checked by the producer (before the row is written) and again by the
//! ingester (an event may have been written by something other than this library).

use serde::{Deserialize, Serialize};

/// Largest widget content accepted, as serialized JSON.
pub const MAX_CONTENT_BYTES: usize = 64 * 1024;
/// Longest widget key accepted.
pub const MAX_KEY_LEN: usize = 200;
/// Longest `widget_type` accepted.
pub const MAX_TYPE_LEN: usize = 64;
/// Longest key parameter (the part after `:`, e.g. a user id).
pub const MAX_PARAM_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("widget key is empty")]
    Empty,
    #[error("widget key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    #[error("widget key must look like <source>.<name>[:<param>] (missing '.')")]
    NoSource,
    #[error("widget key source part `{0}` must be [a-z0-9-], starting with a letter or digit")]
    BadSource(String),
    #[error("widget key name part `{0}` must be [a-z0-9_.-], starting with a letter or digit")]
    BadName(String),
    #[error("widget key parameter `{0}` must be 1-{MAX_PARAM_LEN} characters of [A-Za-z0-9_-]")]
    BadParam(String),
}

/// A validated widget key: `<source>.<name>[:<param>]`, e.g. `deals.top-picks` or
/// `loyalty.points:42`. The source part is the namespace that only that source may write.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WidgetKey<'a> {
    pub full: &'a str,
    pub source: &'a str,
    pub name: &'a str,
    pub param: Option<&'a str>,
}

fn is_lower_word(s: &str, extra: &[u8]) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(b))
}

/// A key parameter such as a user id: also what the API accepts as `user`.
pub fn is_valid_param(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= MAX_PARAM_LEN
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl<'a> WidgetKey<'a> {
    pub fn parse(full: &'a str) -> Result<Self, KeyError> {
        if full.is_empty() {
            return Err(KeyError::Empty);
        }
        if full.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
        let (base, param) = match full.split_once(':') {
            Some((b, p)) => (b, Some(p)),
            None => (full, None),
        };
        let (source, name) = base.split_once('.').ok_or(KeyError::NoSource)?;
        if !is_lower_word(source, b"-") {
            return Err(KeyError::BadSource(source.into()));
        }
        if !is_lower_word(name, b"-_.") {
            return Err(KeyError::BadName(name.into()));
        }
        if let Some(p) = param
            && !is_valid_param(p)
        {
            return Err(KeyError::BadParam(p.into()));
        }
        Ok(Self {
            full,
            source,
            name,
            param,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Upsert,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "upsert" => Some(Op::Upsert),
            "delete" => Some(Op::Delete),
            _ => None,
        }
    }
}

/// One widget change. `data_version` is chosen by the producer and must strictly increase per
/// key (a timestamp in micros or a row version both work); the newest version always wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WidgetEvent {
    pub widget_key: String,
    pub widget_type: String,
    pub data_version: i64,
    pub op: Op,
    /// The server-driven-UI payload; `None` for deletes.
    pub content: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("invalid widget key `{key}`: {reason}")]
    Key { key: String, reason: KeyError },
    #[error("widget_type must be 1-{MAX_TYPE_LEN} characters of [a-z0-9_.-], got `{0}`")]
    Type(String),
    #[error("data_version must be greater than zero, got {0}")]
    Version(i64),
    #[error("an upsert needs content")]
    MissingContent,
    #[error("a delete carries no content")]
    UnexpectedContent,
    #[error("content is {size} bytes, more than the limit of {MAX_CONTENT_BYTES}")]
    ContentTooLarge { size: usize },
    #[error(
        "source `{source_name}` may not write `{key}`: keys of this source start with `{source_name}.`"
    )]
    ForeignKey { source_name: String, key: String },
}

impl EventError {
    /// A short stable reason for dead-letter entries and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            EventError::Key { .. } => "invalid-key",
            EventError::Type(_) => "invalid-type",
            EventError::Version(_) => "invalid-version",
            EventError::MissingContent | EventError::UnexpectedContent => "invalid-content",
            EventError::ContentTooLarge { .. } => "content-too-large",
            EventError::ForeignKey { .. } => "foreign-namespace",
        }
    }
}

/// Checks the fields of an event; `content_len` is the serialized content's size in bytes.
pub fn validate_fields(
    widget_key: &str,
    widget_type: &str,
    data_version: i64,
    op: Op,
    content_len: Option<usize>,
) -> Result<(), EventError> {
    WidgetKey::parse(widget_key).map_err(|reason| EventError::Key {
        key: widget_key.into(),
        reason,
    })?;
    if widget_type.is_empty()
        || widget_type.len() > MAX_TYPE_LEN
        || !widget_type
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
    {
        return Err(EventError::Type(widget_type.into()));
    }
    if data_version <= 0 {
        return Err(EventError::Version(data_version));
    }
    match (op, content_len) {
        (Op::Upsert, None) => return Err(EventError::MissingContent),
        (Op::Delete, Some(_)) => return Err(EventError::UnexpectedContent),
        (_, Some(size)) if size > MAX_CONTENT_BYTES => {
            return Err(EventError::ContentTooLarge { size });
        }
        _ => {}
    }
    Ok(())
}

/// The ownership rule: a source writes only keys in its own namespace.
pub fn check_owner(source: &str, widget_key: &str) -> Result<(), EventError> {
    match WidgetKey::parse(widget_key) {
        Ok(k) if k.source == source => Ok(()),
        Ok(_) => Err(EventError::ForeignKey {
            source_name: source.into(),
            key: widget_key.into(),
        }),
        Err(reason) => Err(EventError::Key {
            key: widget_key.into(),
            reason,
        }),
    }
}

impl WidgetEvent {
    pub fn upsert(
        key: impl Into<String>,
        widget_type: impl Into<String>,
        data_version: i64,
        content: serde_json::Value,
    ) -> Self {
        Self {
            widget_key: key.into(),
            widget_type: widget_type.into(),
            data_version,
            op: Op::Upsert,
            content: Some(content),
        }
    }

    pub fn delete(
        key: impl Into<String>,
        widget_type: impl Into<String>,
        data_version: i64,
    ) -> Self {
        Self {
            widget_key: key.into(),
            widget_type: widget_type.into(),
            data_version,
            op: Op::Delete,
            content: None,
        }
    }

    /// Validates the event and returns its content serialized, so it is encoded only once.
    pub fn validate(&self) -> Result<Option<String>, EventError> {
        let content = self.content.as_ref().map(|c| c.to_string());
        validate_fields(
            &self.widget_key,
            &self.widget_type,
            self.data_version,
            self.op,
            content.as_ref().map(|c| c.len()),
        )?;
        Ok(content)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_parse_into_parts() {
        let k = WidgetKey::parse("loyalty.points:u-42").expect("valid");
        assert_eq!(
            (k.source, k.name, k.param),
            ("loyalty", "points", Some("u-42"))
        );
        let k = WidgetKey::parse("deals.top-picks").expect("valid");
        assert_eq!((k.source, k.name, k.param), ("deals", "top-picks", None));
    }

    #[test]
    fn bad_keys_are_rejected_with_the_reason() {
        assert_eq!(WidgetKey::parse(""), Err(KeyError::Empty));
        assert_eq!(WidgetKey::parse("nodot"), Err(KeyError::NoSource));
        assert!(matches!(
            WidgetKey::parse("Deals.x"),
            Err(KeyError::BadSource(_))
        ));
        assert!(matches!(
            WidgetKey::parse("deals."),
            Err(KeyError::BadName(_))
        ));
        assert!(matches!(
            WidgetKey::parse("deals.x:"),
            Err(KeyError::BadParam(_))
        ));
        assert!(matches!(
            WidgetKey::parse("deals.x:a b"),
            Err(KeyError::BadParam(_))
        ));
        assert_eq!(WidgetKey::parse(&"a.".repeat(150)), Err(KeyError::TooLong));
    }

    #[test]
    fn events_are_validated() {
        let ok = WidgetEvent::upsert("deals.top", "carousel", 1, json!({"a": 1}));
        assert_eq!(ok.validate(), Ok(Some(r#"{"a":1}"#.into())));
        assert_eq!(
            WidgetEvent::delete("deals.top", "carousel", 2).validate(),
            Ok(None)
        );
        let mut e = ok.clone();
        e.data_version = 0;
        assert_eq!(e.validate(), Err(EventError::Version(0)));
        let mut e = ok.clone();
        e.widget_type = "Bad Type".into();
        assert!(matches!(e.validate(), Err(EventError::Type(_))));
        let mut e = ok.clone();
        e.content = None;
        assert_eq!(e.validate(), Err(EventError::MissingContent));
        let big = WidgetEvent::upsert("deals.top", "t", 1, json!("x".repeat(MAX_CONTENT_BYTES)));
        assert!(matches!(
            big.validate(),
            Err(EventError::ContentTooLarge { .. })
        ));
    }

    #[test]
    fn ownership_is_by_source_prefix() {
        assert!(check_owner("deals", "deals.top").is_ok());
        let e = check_owner("deals", "loyalty.points").expect_err("foreign");
        assert_eq!(e.reason(), "foreign-namespace");
    }
}
