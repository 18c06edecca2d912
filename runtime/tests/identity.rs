//! Verified identity for personalised screens, attacked with real signed tokens (ES256 keys
//! generated here with ring; the public key reaches core-api as a JWKS file, as a mounted
//! Secret would): valid, expired, not yet valid, wrong issuer, wrong audience, wrong
//! signature, `alg: none`, an HMAC token (algorithm confusion), a missing claim; then a
//! trusted gateway's header, and a pipeline without any identity.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use support::{HttpResponse, RunningApi, Stack, http_get, start_api_on};

const SCREENS: &str = r#"
pipeline: test
sources:
  - {name: deals}
  - {name: loyalty}
screens:
  - {name: home, widgets: ["deals.top-picks", "loyalty.points:{user}"]}
  - {name: deals, widgets: ["deals.top-picks"]}
"#;

const ISSUER: &str = "https://auth.example.test/";
const AUDIENCE: &str = "home-api";

/// An ES256 key pair made for this test run.
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

fn signing_key(kid: &str) -> SigningKey {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("pair");
    // An uncompressed point: 0x04, then x and y (32 bytes each).
    let point = pair.public_key().as_ref();
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
    });
    SigningKey {
        kid: kid.into(),
        encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk,
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn claims(sub: &str) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now(), "exp": now() + 300})
}

fn token(key: &SigningKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding).expect("sign")
}

async fn get(api: &RunningApi, path: &str, token: Option<&str>) -> HttpResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    http_get(&api.addr, path, &headers)
        .await
        .unwrap_or_else(|| panic!("GET {path}: no answer"))
}

fn error_code(r: &HttpResponse) -> String {
    r.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn seed(stack: &Stack) {
    let core = stack.pool(&stack.core_url).await;
    sqlx::query(
        "INSERT INTO widgets (widget_key, widget_type, source, data_version, content) VALUES
           ('deals.top-picks', 'card', 'deals', 1, '{\"t\": 1}'),
           ('loyalty.points:42', 'points', 'loyalty', 1, '{\"points\": 42}'),
           ('loyalty.points:7', 'points', 'loyalty', 1, '{\"points\": 7}')",
    )
    .execute(&core)
    .await
    .expect("seed");
}

fn keys_of(r: &HttpResponse) -> Vec<String> {
    r.json()["widgets"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter_map(|w| w["key"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_identity_serves_only_the_verified_user() {
    let trusted = signing_key("k1");
    let stranger = signing_key("k1"); // same kid, another key: a forged signature
    let dir = tempfile::tempdir().expect("tempdir");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [trusted.jwk]}).to_string()).expect("jwks");
    // The default algorithms (RS256 and ES256): a list mixing key families must work.
    let config = format!(
        "{SCREENS}identity:\n  mode: jwt\n  jwt: {{issuer: \"{ISSUER}\", audience: {AUDIENCE}, \
         leeway: 5s, keyFile: {}}}\n",
        jwks.display()
    );
    let stack = Stack::with_config(&config).await;
    seed(&stack).await;
    let api = start_api_on(&stack, &stack.redis.url()).await;

    // A valid token for user 42: its screen, with its points.
    let r = get(
        &api,
        "/v1/screens/home",
        Some(&token(&trusted, &claims("42"))),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(keys_of(&r), vec!["deals.top-picks", "loyalty.points:42"]);

    // No credential: public screens are served, personalised ones are not.
    let r = get(&api, "/v1/screens/deals", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = get(&api, "/v1/screens/home", None).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "unauthenticated"),
        "{}",
        r.body
    );
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(r.header("content-type"), Some("application/json"));

    // The user comes from the token, never from the query.
    let r = get(
        &api,
        "/v1/screens/home?user=7",
        Some(&token(&trusted, &claims("42"))),
    )
    .await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (400, "user_param_not_accepted")
    );

    let t = now();
    let mut cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            token(
                &trusted,
                &json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "42", "exp": t - 60}),
            ),
            "has expired",
        ),
        (
            "not yet valid",
            token(
                &trusted,
                &json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "42", "nbf": t + 600, "exp": t + 900}),
            ),
            "not valid yet",
        ),
        (
            "wrong issuer",
            token(
                &trusted,
                &json!({"iss": "https://evil.test/", "aud": AUDIENCE, "sub": "42", "exp": t + 300}),
            ),
            "wrong issuer",
        ),
        (
            "wrong audience",
            token(
                &trusted,
                &json!({"iss": ISSUER, "aud": "other-api", "sub": "42", "exp": t + 300}),
            ),
            "wrong audience",
        ),
        (
            "wrong signature",
            token(&stranger, &claims("42")),
            "invalid signature",
        ),
        (
            "missing claim",
            token(
                &trusted,
                &json!({"iss": ISSUER, "aud": AUDIENCE, "exp": t + 300}),
            ),
            "`sub`",
        ),
        (
            "user id of the wrong shape",
            token(&trusted, &claims("a b")),
            "`sub`",
        ),
        ("garbage", "not.a.token".into(), "malformed"),
    ];
    // `alg: none`: a header and claims, and no signature at all.
    let unsigned = format!(
        "{}.{}.",
        B64.encode(json!({"alg": "none", "typ": "JWT"}).to_string()),
        B64.encode(claims("42").to_string())
    );
    cases.push(("alg none", unsigned, ""));
    // Algorithm confusion: an HMAC token keyed with the public key's bytes.
    let public_as_secret = trusted.jwk.to_string();
    let hmac = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("42"),
        &EncodingKey::from_secret(public_as_secret.as_bytes()),
    )
    .expect("hmac");
    cases.push(("HS256 with the public key", hmac, "algorithm"));
    for (what, bad, says) in &cases {
        let r = get(&api, "/v1/screens/home", Some(bad)).await;
        assert_eq!(r.status, 401, "{what}: {}", r.body);
        assert_eq!(error_code(&r), "invalid_token", "{what}");
        assert!(r.body.contains(says), "{what}: {}", r.body);
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer error=\"invalid_token\""),
            "{what}"
        );
        assert!(!r.body.contains("points"), "{what}: nothing personal leaks");
    }
    let r = get(&api, "/v1/screens/home", None).await;
    assert_eq!(r.status, 401);
    let r = http_get(
        &api.addr,
        "/v1/screens/home",
        &[("authorization", "Basic YTpi")],
    )
    .await
    .expect("answer");
    assert_eq!((r.status, error_code(&r).as_str()), (401, "invalid_token"));

    // By name: one's own personalised widget, never another user's.
    let mine = token(&trusted, &claims("42"));
    let r = get(
        &api,
        "/v1/widgets?keys=loyalty.points:42,deals.top-picks",
        Some(&mine),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(keys_of(&r), vec!["loyalty.points:42", "deals.top-picks"]);
    let r = get(&api, "/v1/widgets?keys=loyalty.points:7", Some(&mine)).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (403, "not_your_widget"),
        "{}",
        r.body
    );
    assert!(!r.body.contains("points\":"), "{}", r.body);
    let r = get(&api, "/v1/widgets?keys=loyalty.points:7", None).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "unauthenticated")
    );
    let r = get(&api, "/v1/widgets?keys=deals.top-picks", None).await;
    assert_eq!(r.status, 200, "public widgets need no credential");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_identity_block_personalised_widgets_are_never_served() {
    let stack = Stack::with_config(SCREENS).await;
    seed(&stack).await;
    let api = start_api_on(&stack, &stack.redis.url()).await;
    let r = get(&api, "/v1/screens/home", None).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "unauthenticated"),
        "{}",
        r.body
    );
    let r = get(&api, "/v1/screens/home?user=42", None).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (400, "user_param_not_accepted"),
        "{}",
        r.body
    );
    let r = get(&api, "/v1/widgets?keys=loyalty.points:42", None).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "unauthenticated"),
        "{}",
        r.body
    );
    let r = get(&api, "/v1/screens/deals", None).await;
    assert_eq!(r.status, 200, "public screens are served");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_gateway_header_names_the_user() {
    let stack = Stack::with_config(&format!(
        "{SCREENS}identity: {{mode: header, header: x-user-id}}\n"
    ))
    .await;
    seed(&stack).await;
    let api = start_api_on(&stack, &stack.redis.url()).await;
    let r = http_get(&api.addr, "/v1/screens/home", &[("x-user-id", "7")])
        .await
        .expect("answer");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(keys_of(&r), vec!["deals.top-picks", "loyalty.points:7"]);
    let r = get(&api, "/v1/screens/home", None).await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "unauthenticated")
    );
    assert_eq!(
        r.header("www-authenticate"),
        None,
        "no bearer challenge in header mode"
    );
    let r = http_get(&api.addr, "/v1/screens/home", &[("x-user-id", "../42")])
        .await
        .expect("answer");
    assert_eq!((r.status, error_code(&r).as_str()), (401, "bad_identity"));
    let r = http_get(
        &api.addr,
        "/v1/widgets?keys=loyalty.points:42",
        &[("x-user-id", "7")],
    )
    .await
    .expect("answer");
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (403, "not_your_widget")
    );
    api.stop().await;
}
