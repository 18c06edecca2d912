//! Who is asking: the user a personalised screen is filled in for comes from a verified
//! credential, never from what the client merely says (see `docs/api.md#identity`).
//!
//! - `jwt`: `Authorization: Bearer <token>`, validated here (signature by a configured public
//!   key or JWKS, `iss`, `aud`, `exp`, `nbf`; the user from a configured claim).
//! - `header`: a header a trusted gateway in front of core-api sets after its own check.
//! - `query`: `?user=ID` as the client says it; for local use (the demo) only.
//! - no `identity` block: personalised widgets are not served to anyone (401).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

use super::ApiError;
use crate::config::{IdentityConfig, IdentityMode, JwtConfig};
use crate::event::is_valid_param;

/// Where a `jwt` identity's keys come from when `keyFile` is not set.
pub const KEYS_ENV: &str = "IDENTITY_JWT_KEYS";

const INVALID_TOKEN: &str = "Bearer error=\"invalid_token\"";

/// How often a `keyFile` is checked for a new version (a rotated, mounted Secret).
const KEY_FILE_CHECK: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity.jwt: no keys: set keyFile or the {KEYS_ENV} environment variable")]
    NoKeys,
    #[error("identity.jwt.keyFile {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error("identity.jwt keys: {0}")]
    Keys(String),
}

/// The identity of a request, as configured.
#[derive(Clone)]
pub enum Identity {
    /// No `identity` block: nobody is anyone.
    Anonymous,
    Query,
    Header(HeaderName),
    Jwt(Arc<JwtVerifier>),
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Identity::Anonymous => "Anonymous",
            Identity::Query => "Query",
            Identity::Header(_) => "Header",
            Identity::Jwt(_) => "Jwt",
        })
    }
}

impl Identity {
    /// Builds the identity of `config`; `env_keys` is the value of [`KEYS_ENV`], if set.
    pub fn from_config(
        config: Option<&IdentityConfig>,
        env_keys: Option<String>,
    ) -> Result<Identity, IdentityError> {
        let Some(config) = config else {
            return Ok(Identity::Anonymous);
        };
        Ok(match config.mode {
            IdentityMode::Query => {
                tracing::warn!(
                    "identity mode `query`: `?user=` is taken on trust, so anyone can read any \
                     user's personalised widgets; use it only locally"
                );
                Identity::Query
            }
            IdentityMode::Header => {
                // Validated with the config.
                let name = config.header.as_deref().unwrap_or_default();
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|e| IdentityError::Keys(e.to_string()))?;
                Identity::Header(name)
            }
            IdentityMode::Jwt => {
                let jwt = config.jwt.as_ref().ok_or(IdentityError::NoKeys)?;
                Identity::Jwt(Arc::new(JwtVerifier::new(jwt, env_keys)?))
            }
        })
    }

    /// The verified user of a request: `Ok(None)` when it carries no credential, an error
    /// when it carries one that does not hold, or when it names the user the wrong way.
    pub fn user(
        &self,
        headers: &HeaderMap,
        query_user: Option<&str>,
    ) -> Result<Option<String>, ApiError> {
        if !matches!(self, Identity::Query) && query_user.is_some() {
            return Err(ApiError::bad_request(
                "user_param_not_accepted",
                "the user comes from the request's credential here; remove ?user=",
            ));
        }
        match self {
            Identity::Anonymous => Ok(None),
            Identity::Query => match query_user {
                None => Ok(None),
                Some(u) => checked(u).map(Some).ok_or_else(|| {
                    ApiError::bad_request(
                        "bad_user",
                        format!(
                            "`user` must be 1-{} characters of [A-Za-z0-9_-]",
                            crate::event::MAX_PARAM_LEN
                        ),
                    )
                }),
            },
            Identity::Header(name) => match headers.get(name) {
                None => Ok(None),
                Some(v) => v.to_str().ok().and_then(checked).map(Some).ok_or_else(|| {
                    unauthorized("bad_identity", "the identity header is not a user id")
                }),
            },
            Identity::Jwt(verifier) => match bearer(headers) {
                Ok(None) => Ok(None),
                Ok(Some(token)) => verifier.verify(token).map(Some),
                Err(e) => Err(e),
            }
            .map_err(|e| e.with_challenge(INVALID_TOKEN)),
        }
    }

    /// The 401 for a personalised widget asked for without a credential.
    pub fn required(&self) -> ApiError {
        match self {
            Identity::Anonymous => unauthorized(
                "unauthenticated",
                "personalised widgets need a verified identity, and this pipeline has none \
                 configured (`identity` in the pipeline config)",
            ),
            Identity::Query => ApiError::bad_request(
                "user_required",
                "this screen has personalised widgets: pass ?user=ID",
            ),
            Identity::Header(_) => unauthorized(
                "unauthenticated",
                "personalised widgets need the identity the gateway sets",
            ),
            Identity::Jwt(_) => unauthorized(
                "unauthenticated",
                "personalised widgets need `Authorization: Bearer <token>`",
            )
            .with_challenge("Bearer"),
        }
    }
}

fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

fn checked(user: &str) -> Option<String> {
    is_valid_param(user).then(|| user.to_owned())
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| unauthorized("invalid_token", "the Authorization header is not text"))?;
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() => {
            Ok(Some(token.trim()))
        }
        _ => Err(unauthorized(
            "invalid_token",
            "expected `Authorization: Bearer <token>`",
        )),
    }
}

/// One verification key: from a JWK (with its `kid` and `alg`, if given) or a PEM key.
struct Key {
    kid: Option<String>,
    alg: Option<Algorithm>,
    key: DecodingKey,
}

/// A `keyFile`, with the modification time of the version loaded and when it was last checked.
struct KeyFile {
    path: PathBuf,
    seen: RwLock<(Option<SystemTime>, std::time::Instant)>,
}

/// Validates bearer tokens against the configured issuer, audience and keys.
pub struct JwtVerifier {
    validation: Validation,
    user_claim: String,
    keys: RwLock<Arc<Vec<Key>>>,
    file: Option<KeyFile>,
    check_every: Duration,
}

impl JwtVerifier {
    pub fn new(config: &JwtConfig, env_keys: Option<String>) -> Result<Self, IdentityError> {
        let algorithms: Vec<Algorithm> = config
            .algorithms
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let mut validation =
            Validation::new(algorithms.first().copied().unwrap_or(Algorithm::RS256));
        validation.algorithms = algorithms;
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();
        let (keys, file) = match &config.key_file {
            Some(path) => {
                let (keys, modified) = read_key_file(path)?;
                let file = KeyFile {
                    path: path.clone(),
                    seen: RwLock::new((modified, std::time::Instant::now())),
                };
                (keys, Some(file))
            }
            None => {
                let text = env_keys
                    .filter(|t| !t.trim().is_empty())
                    .ok_or(IdentityError::NoKeys)?;
                (parse_keys(&text).map_err(IdentityError::Keys)?, None)
            }
        };
        Ok(Self {
            validation,
            user_claim: config.user_claim.clone(),
            keys: RwLock::new(Arc::new(keys)),
            file,
            check_every: KEY_FILE_CHECK,
        })
    }

    /// The user a valid token names, or why the token is refused.
    pub fn verify(&self, token: &str) -> Result<String, ApiError> {
        let invalid = |why: &str| unauthorized("invalid_token", format!("the token {why}"));
        let head = decode_header(token).map_err(|e| invalid(&reason(&e)))?;
        if !self.validation.algorithms.contains(&head.alg) {
            return Err(invalid("is signed with an algorithm that is not accepted"));
        }
        self.reload_if_changed();
        let keys = self.keys.read().map(|k| k.clone()).unwrap_or_default();
        let candidates = keys.iter().filter(|k| {
            k.alg.is_none_or(|a| a == head.alg)
                && match (&head.kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                }
        });
        // jsonwebtoken refuses a key unless every algorithm of the validation is of the key's
        // family: validate with the token's own algorithm (checked above to be accepted), so
        // a list mixing RSA and EC algorithms, or a JWKS mixing RSA and EC keys, works.
        let mut validation = self.validation.clone();
        validation.algorithms = vec![head.alg];
        let mut last = None;
        for k in candidates {
            match decode::<serde_json::Map<String, serde_json::Value>>(token, &k.key, &validation) {
                Ok(data) => {
                    return match data.claims.get(&self.user_claim) {
                        Some(serde_json::Value::String(s)) => checked(s),
                        Some(serde_json::Value::Number(n)) => checked(&n.to_string()),
                        _ => None,
                    }
                    .ok_or_else(|| {
                        invalid(&format!(
                            "has no usable `{}` claim (a user id of [A-Za-z0-9_-])",
                            self.user_claim
                        ))
                    });
                }
                // A wrong key (a JWKS without kids, or a key of another family) is the only
                // reason to try the next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        jsonwebtoken::errors::ErrorKind::InvalidSignature
                            | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
                    ) =>
                {
                    last = Some(e);
                }
                Err(e) => return Err(invalid(&reason(&e))),
            }
        }
        Err(invalid(&match last {
            Some(e) => reason(&e),
            None => "is signed by no configured key".into(),
        }))
    }

    /// Re-reads the key file (at most every [`KEY_FILE_CHECK`]) when its modification time
    /// changed; a file that no longer parses keeps the keys loaded before, loudly.
    fn reload_if_changed(&self) {
        let Some(KeyFile { path, seen: state }) = &self.file else {
            return;
        };
        let due = state
            .read()
            .map(|s| s.1.elapsed() >= self.check_every)
            .unwrap_or(false);
        if !due {
            return;
        }
        let Ok(mut s) = state.write() else { return };
        s.1 = std::time::Instant::now();
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified == s.0 {
            return;
        }
        match read_key_file(path) {
            Ok((keys, modified)) => {
                if let Ok(mut k) = self.keys.write() {
                    *k = Arc::new(keys);
                }
                s.0 = modified;
                tracing::info!(path = %path.display(), "identity keys reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "identity key file unusable; keeping the keys loaded before");
            }
        }
    }
}

/// A refusal as a client may read it: the kind of failure, never key material.
fn reason(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "has expired".into(),
        K::ImmatureSignature => "is not valid yet (nbf)".into(),
        K::InvalidIssuer => "has the wrong issuer".into(),
        K::InvalidAudience => "has the wrong audience".into(),
        K::InvalidSignature => "has an invalid signature".into(),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => {
            "is signed with an algorithm that is not accepted".into()
        }
        K::MissingRequiredClaim(c) => format!("lacks the `{c}` claim"),
        _ => "is malformed".into(),
    }
}

fn read_key_file(path: &std::path::Path) -> Result<(Vec<Key>, Option<SystemTime>), IdentityError> {
    let err = |message: String| IdentityError::KeyFile {
        path: path.display().to_string(),
        message,
    };
    // The time first: a file replaced between the two (a Secret's symlink swap) is then read
    // in its new version under the old time, and read again at the next check.
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    Ok((parse_keys(&text).map_err(err)?, modified))
}

/// A JWKS document (`{"keys": [...]}`) or one PEM public key (RSA, EC or Ed25519).
fn parse_keys(text: &str) -> Result<Vec<Key>, String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        let set: JwkSet = serde_json::from_str(trimmed).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("a JWK: {e}"))?;
            // Symmetric keys are refused: whoever can read them could mint tokens.
            if matches!(
                jwk.algorithm,
                jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
            ) {
                return Err("symmetric (`oct`) keys are not accepted".into());
            }
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                alg: jwk
                    .common
                    .key_algorithm
                    .and_then(|a| a.to_string().parse().ok()),
                key,
            });
        }
        if keys.is_empty() {
            return Err("the JWKS has no keys".into());
        }
        return Ok(keys);
    }
    let bytes = text.as_bytes();
    let key = DecodingKey::from_rsa_pem(bytes)
        .or_else(|_| DecodingKey::from_ec_pem(bytes))
        .or_else(|_| DecodingKey::from_ed_pem(bytes))
        .map_err(|_| "neither a JWKS nor a PEM public key (RSA, EC or Ed25519)".to_string())?;
    Ok(vec![Key {
        kid: None,
        alg: None,
        key,
    }])
}

/// Personalised keys that can also be asked for by name (`/v1/widgets?keys=...`): each screen
/// key with `{user}` is a template whose filled-in value names its owner.
#[derive(Debug, Clone, Default)]
pub struct PersonalKeys {
    templates: Vec<(String, String)>,
}

impl PersonalKeys {
    pub fn new<'a>(screen_keys: impl IntoIterator<Item = &'a str>) -> Self {
        let mut templates: Vec<(String, String)> = screen_keys
            .into_iter()
            .filter_map(|k| k.split_once(crate::config::USER_PLACEHOLDER))
            .map(|(p, s)| (p.to_owned(), s.to_owned()))
            .collect();
        templates.sort();
        templates.dedup();
        Self { templates }
    }

    /// The user `key` belongs to, if it is a personalised key.
    pub fn owner<'k>(&self, key: &'k str) -> Option<&'k str> {
        self.templates.iter().find_map(|(prefix, suffix)| {
            let rest = key
                .strip_prefix(prefix.as_str())?
                .strip_suffix(suffix.as_str())?;
            is_valid_param(rest).then_some(rest)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    fn key() -> (EncodingKey, serde_json::Value) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("pair");
        let p = pair.public_key().as_ref();
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "alg": "ES256",
            "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65])});
        (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
    }

    fn token(key: &EncodingKey) -> String {
        let exp = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() + 300)
            .unwrap_or(0);
        let claims = serde_json::json!({"iss": "i", "aud": "a", "sub": "u1", "exp": exp});
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, key).expect("sign")
    }

    fn write_jwks(path: &std::path::Path, jwk: &serde_json::Value) {
        let before = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        loop {
            std::fs::write(path, serde_json::json!({"keys": [jwk]}).to_string()).expect("write");
            // A new modification time is how a rotation is seen.
            if std::fs::metadata(path).and_then(|m| m.modified()).ok() != before {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A rotated key file (a mounted Secret updated in place) is picked up; a broken one
    /// keeps the keys loaded before.
    #[test]
    fn key_file_rotation_is_picked_up_and_a_broken_file_is_not() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("jwks.json");
        let ((old, old_jwk), (new, new_jwk)) = (key(), key());
        write_jwks(&path, &old_jwk);
        let config = JwtConfig {
            issuer: "i".into(),
            audience: "a".into(),
            user_claim: "sub".into(),
            algorithms: vec!["ES256".into()],
            key_file: Some(path.clone()),
            leeway: Duration::from_secs(5),
        };
        let mut v = JwtVerifier::new(&config, None).expect("verifier");
        v.check_every = Duration::ZERO;
        assert_eq!(v.verify(&token(&old)).ok().as_deref(), Some("u1"));
        assert!(v.verify(&token(&new)).is_err());

        write_jwks(&path, &new_jwk);
        assert_eq!(
            v.verify(&token(&new)).ok().as_deref(),
            Some("u1"),
            "rotated in"
        );
        assert!(v.verify(&token(&old)).is_err(), "the old key is gone");

        std::fs::write(&path, "{ not json").expect("break");
        assert_eq!(v.verify(&token(&new)).ok().as_deref(), Some("u1"), "kept");
    }

    #[test]
    fn symmetric_keys_and_junk_are_refused() {
        let oct = r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}]}"#;
        assert!(parse_keys(oct).is_err());
        assert!(parse_keys("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----").is_err());
        assert!(parse_keys(r#"{"keys": []}"#).is_err());
    }

    #[test]
    fn personalised_templates_name_the_owner() {
        let p = PersonalKeys::new(["deals.top", "loyalty.points:{user}", "a.{user}-x"]);
        assert_eq!(p.owner("loyalty.points:42"), Some("42"));
        assert_eq!(p.owner("a.u7-x"), Some("u7"));
        assert_eq!(p.owner("deals.top"), None);
        assert_eq!(p.owner("loyalty.points:"), None);
        assert_eq!(p.owner("loyalty.other:42"), None);
    }
}
