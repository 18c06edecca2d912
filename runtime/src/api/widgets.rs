//! `GET /v1/widgets?keys=k1,k2,...`: an explicit list of widgets.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::identity::Identity;
use super::screens::{dedupe, truncate};
use super::{ApiError, ApiState, MAX_KEYS};
use crate::event::WidgetKey;

#[derive(Debug, Deserialize)]
pub struct WidgetsQuery {
    pub keys: Option<String>,
}

/// Splits and checks the `keys` parameter: 1 to [`MAX_KEYS`] valid widget keys.
pub fn parse_keys(raw: Option<&str>) -> Result<Vec<String>, ApiError> {
    let raw = raw.unwrap_or_default();
    if raw.is_empty() {
        return Err(ApiError::bad_request(
            "missing_keys",
            "pass the widget keys as ?keys=k1,k2,...",
        ));
    }
    let parts: Vec<&str> = raw.split(',').collect();
    if parts.len() > MAX_KEYS {
        return Err(ApiError::bad_request(
            "too_many_keys",
            format!("at most {MAX_KEYS} keys per request, got {}", parts.len()),
        ));
    }
    let mut keys = Vec::with_capacity(parts.len());
    for part in parts {
        WidgetKey::parse(part)
            .map_err(|e| ApiError::bad_request("bad_key", format!("`{}`: {e}", truncate(part))))?;
        keys.push(part.to_owned());
    }
    dedupe(&mut keys);
    Ok(keys)
}

pub async fn get_widgets(
    State(state): State<ApiState>,
    query: Result<Query<WidgetsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let keys = parse_keys(query.keys.as_deref())?;
    let shared = &state.0;
    // A key no configured source can publish is never looked up (nor remembered as absent).
    if let Some(k) = keys.iter().find(|k| {
        let source = k.split_once('.').map_or(k.as_str(), |(s, _)| s);
        !shared.settings.sources.iter().any(|s| s == source)
    }) {
        return Err(ApiError::bad_request(
            "unknown_source",
            format!("`{}`: no configured source publishes this key", truncate(k)),
        ));
    }
    // A personalised key asked for by name is its owner's only, as on a screen (`query`
    // mode takes every caller at its word anyway).
    let owners: Vec<&str> = match shared.settings.identity {
        Identity::Query => Vec::new(),
        _ => keys
            .iter()
            .filter_map(|k| shared.personal.owner(k))
            .collect(),
    };
    if !owners.is_empty() {
        let user = shared
            .settings
            .identity
            .user(&headers, None)?
            .ok_or_else(|| shared.settings.identity.required())?;
        if owners.iter().any(|o| *o != user) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not_your_widget",
                "a personalised widget of another user was asked for",
            ));
        }
    }
    super::answer(shared, None, &keys, &headers).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_and_checked() {
        assert_eq!(
            parse_keys(Some("a.b,c.d:u1,a.b")).expect("ok"),
            vec!["a.b".to_string(), "c.d:u1".into()]
        );
        assert_eq!(parse_keys(None).expect_err("none").code, "missing_keys");
        assert_eq!(
            parse_keys(Some("a.b,,c.d")).expect_err("empty").code,
            "bad_key"
        );
        assert_eq!(parse_keys(Some("Nope")).expect_err("bad").code, "bad_key");
        let many = vec!["a.b"; MAX_KEYS + 1].join(",");
        assert_eq!(
            parse_keys(Some(&many)).expect_err("many").code,
            "too_many_keys"
        );
    }
}
