//! Building responses: the body is assembled as bytes around the cached widget JSON, which is
//! spliced in as stored, never parsed or re-serialized. Also the ETag and `If-None-Match`.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::fetch::{Lookup, Origin, Slot};

/// Response header naming where the widgets came from: `cache`, `database` or `mixed`.
pub const SOURCE_HEADER: &str = "x-widget-source";

/// `cache`, `database` or `mixed`, from the widgets served; with none served, the store that
/// answered.
pub fn source_label(lookup: &Lookup) -> &'static str {
    let (mut cache, mut db) = (false, false);
    for s in &lookup.slots {
        match s {
            Slot::Widget {
                origin: Origin::Cache,
                ..
            } => cache = true,
            Slot::Widget {
                origin: Origin::Database,
                ..
            } => db = true,
            _ => {}
        }
    }
    match (cache, db) {
        (true, true) => "mixed",
        (true, false) => "cache",
        (false, true) => "database",
        (false, false) if lookup.cache_answered => "cache",
        (false, false) => "database",
    }
}

/// A weak validator over what the body says: the screen, each widget's key and version, and the
/// missing keys. Weak, because the same version may be rendered with different JSON spacing
/// depending on whether it came from the cache or from Postgres.
pub fn etag(screen: Option<&str>, keys: &[String], lookup: &Lookup) -> String {
    let mut h = Sha256::new();
    if let Some(s) = screen {
        h.update(b"screen\0");
        h.update(s.as_bytes());
    }
    for (key, slot) in keys.iter().zip(&lookup.slots) {
        h.update(b"\n");
        h.update(key.as_bytes());
        match slot {
            Slot::Widget { version, .. } => h.update(format!("={version}").as_bytes()),
            Slot::Deleted { .. } | Slot::Missing => h.update(b"!"),
        }
    }
    let digest = h.finalize();
    format!("W/\"{}\"", hex::encode(&digest[..16]))
}

/// Weak comparison of `If-None-Match` against our tag (RFC 9110 13.1.2).
pub fn not_modified(headers: &HeaderMap, tag: &str) -> bool {
    let ours = tag.trim_start_matches("W/");
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == ours)
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    // Keys and screen names are validated ASCII, but escaping keeps the body valid regardless.
    if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

/// The 200 body: `{["screen":..,]"widgets":[..],"missing":[..]}`.
pub fn body(screen: Option<&str>, keys: &[String], lookup: &Lookup) -> Vec<u8> {
    let widgets_len: usize = lookup
        .slots
        .iter()
        .map(|s| match s {
            Slot::Widget { json, .. } => json.len() + 1,
            _ => 0,
        })
        .sum();
    let mut out = Vec::with_capacity(widgets_len + 64 + screen.map_or(0, str::len));
    out.push(b'{');
    if let Some(s) = screen {
        out.extend_from_slice(b"\"screen\":");
        write_json_str(&mut out, s);
        out.push(b',');
    }
    out.extend_from_slice(b"\"widgets\":[");
    let mut first = true;
    for slot in &lookup.slots {
        if let Slot::Widget { json, .. } = slot {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(json);
        }
    }
    out.extend_from_slice(b"],\"missing\":[");
    let mut first = true;
    for (key, slot) in keys.iter().zip(&lookup.slots) {
        if !matches!(slot, Slot::Widget { .. }) {
            if !first {
                out.push(b',');
            }
            first = false;
            write_json_str(&mut out, key);
        }
    }
    out.extend_from_slice(b"]}");
    out
}

/// A finished answer: its body, validator and source header.
#[derive(Debug, Clone)]
pub struct Assembled {
    pub body: bytes::Bytes,
    pub etag: String,
    pub source: &'static str,
}

pub fn assemble(screen: Option<&str>, keys: &[String], lookup: &Lookup) -> Assembled {
    Assembled {
        body: bytes::Bytes::from(body(screen, keys, lookup)),
        etag: etag(screen, keys, lookup),
        source: source_label(lookup),
    }
}

/// 200 with the body, or 304 without one when the client's copy is current.
pub fn render(
    screen: Option<&str>,
    keys: &[String],
    lookup: &Lookup,
    request_headers: &HeaderMap,
) -> Response {
    respond(&assemble(screen, keys, lookup), request_headers)
}

pub fn respond(a: &Assembled, request_headers: &HeaderMap) -> Response {
    let mut res = if not_modified(request_headers, &a.etag) {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Body::from(a.body.clone()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&a.etag) {
        h.insert(header::ETAG, v);
    }
    // Clients may keep the body but must revalidate it (cheaply, with If-None-Match).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(SOURCE_HEADER, HeaderValue::from_static(a.source));
    res
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn lookup(slots: Vec<Slot>) -> Lookup {
        Lookup {
            slots,
            cache_answered: true,
            database_answered: false,
            database_failed: false,
        }
    }

    #[test]
    fn body_splices_widgets_in_order_and_lists_missing() {
        let keys = vec!["a.x".to_string(), "a.y".into(), "a.z".into()];
        let l = lookup(vec![
            Slot::Widget {
                version: 2,
                json: Bytes::from_static(br#"{"key":"a.x","v":1}"#),
                origin: Origin::Cache,
            },
            Slot::Missing,
            Slot::Widget {
                version: 5,
                json: Bytes::from_static(br#"{"key":"a.z"}"#),
                origin: Origin::Database,
            },
        ]);
        let b = body(Some("home"), &keys, &l);
        assert_eq!(
            std::str::from_utf8(&b).expect("utf8"),
            r#"{"screen":"home","widgets":[{"key":"a.x","v":1},{"key":"a.z"}],"missing":["a.y"]}"#
        );
        assert_eq!(source_label(&l), "mixed");
    }

    #[test]
    fn etag_follows_versions_and_if_none_match_compares_weakly() {
        let keys = vec!["a.x".to_string()];
        let v = |version| {
            lookup(vec![Slot::Widget {
                version,
                json: Bytes::from_static(b"{}"),
                origin: Origin::Cache,
            }])
        };
        let t1 = etag(None, &keys, &v(1));
        assert_eq!(t1, etag(None, &keys, &v(1)));
        assert_ne!(t1, etag(None, &keys, &v(2)));
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"other\", {}", t1.trim_start_matches("W/")))
                .expect("header"),
        );
        assert!(not_modified(&h, &t1));
        assert!(!not_modified(&HeaderMap::new(), &t1));
    }
}
