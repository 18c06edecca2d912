//! `GET /v1/screens/{screen}[?user=ID]`: a configured screen's widgets in order.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use super::{ApiError, ApiState, ScreenKeys};
use crate::config::USER_PLACEHOLDER;

#[derive(Debug, Deserialize)]
pub struct ScreenQuery {
    pub user: Option<String>,
}

/// The request's keys: `{user}` replaced by the verified user id; `None` when the screen
/// needs a user and the request has none.
pub fn resolve_keys(keys: &ScreenKeys, user: Option<&str>) -> Option<Vec<String>> {
    if !keys.needs_user {
        return Some(keys.keys.clone());
    }
    let user = user?;
    Some(
        keys.keys
            .iter()
            .map(|k| k.replace(USER_PLACEHOLDER, user))
            .collect(),
    )
}

pub async fn get_screen(
    State(state): State<ApiState>,
    screen: Result<Path<String>, PathRejection>,
    query: Result<Query<ScreenQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(screen) = screen.map_err(|e| ApiError::bad_request("bad_path", e.body_text()))?;
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let shared = &state.0;
    let Some(screen_keys) = shared.screen_keys(&screen) else {
        return Err(ApiError::not_found(
            "unknown_screen",
            format!("no screen named `{}` is configured", truncate(&screen)),
        ));
    };
    let user = shared
        .settings
        .identity
        .user(&headers, query.user.as_deref())?;
    if screen_keys.needs_user && user.is_none() {
        return Err(shared.settings.identity.required());
    }
    // Only a personalised screen differs by user.
    let user = user.filter(|_| screen_keys.needs_user);
    if let Some(whole) = shared.local.screen(&screen, user.as_deref()) {
        return Ok(super::response::respond(&whole, &headers));
    }
    let mut keys = resolve_keys(screen_keys, user.as_deref())
        .ok_or_else(|| shared.settings.identity.required())?;
    // A configured list may repeat a key; ask for each once, keep the first position.
    dedupe(&mut keys);
    super::answer(shared, Some((&screen, user.as_deref())), &keys, &headers).await
}

/// Removes later duplicates, keeping order.
pub fn dedupe(keys: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    keys.retain(|k| seen.insert(k.clone()));
}

/// Echoes at most 64 characters of client input in error messages.
pub fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_placeholder_is_filled() {
        let keys = ScreenKeys {
            keys: vec!["deals.top".into(), "loyalty.points:{user}".into()],
            needs_user: true,
        };
        assert_eq!(
            resolve_keys(&keys, Some("u-42")).expect("filled"),
            vec!["deals.top".to_string(), "loyalty.points:u-42".into()]
        );
        assert_eq!(resolve_keys(&keys, None), None);
        let public = ScreenKeys {
            keys: vec!["deals.top".into()],
            needs_user: false,
        };
        assert_eq!(
            resolve_keys(&public, None),
            Some(vec!["deals.top".to_string()])
        );
    }
}
