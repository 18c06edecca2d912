//! The committed CRD matches the types, and its schema (structural rules and CEL rules) accepts
//! the documented sample and rejects what a user must be told about at `kubectl apply` time.

use std::path::PathBuf;

use serde_json::{Value, json};
use widget_crds::{CRD_FILE, WidgetPipeline, crd_yaml};

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(CRD_FILE)
}

/// Regenerate with `UPDATE_CRD=1 cargo nextest run -p widget-crds` (or `widget-operator crd`).
#[test]
fn committed_crd_matches_the_types() {
    let generated = crd_yaml();
    let path = committed_path();
    if std::env::var_os("UPDATE_CRD").is_some() {
        std::fs::write(&path, &generated).expect("write CRD file");
    }
    let committed =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        committed == generated,
        "{CRD_FILE} is out of date; regenerate it with `widget-operator crd > {CRD_FILE}`"
    );
}

/// The openAPIV3Schema of the committed file (not of the types: what the apiserver gets).
fn committed_schema() -> Value {
    let text = std::fs::read_to_string(committed_path()).expect("read CRD file");
    let crd: Value = serde_yaml::from_str(&text).expect("CRD file is YAML");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The OpenAPI v3 subset Kubernetes uses, as JSON Schema: `nullable: true` means null is also
/// allowed; `x-kubernetes-*` keywords are ignored by the validator.
fn as_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let v = match k.as_str() {
                    "properties" | "patternProperties" => Value::Object(
                        v.as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| (k.clone(), as_json_schema(v)))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    ),
                    _ => as_json_schema(v),
                };
                out.insert(k.clone(), v);
            }
            if let (Some(Value::Bool(true)), Some(Value::String(t))) =
                (out.get("nullable"), out.get("type").cloned())
            {
                out.insert("type".into(), json!([t, "null"]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(as_json_schema).collect()),
        other => other.clone(),
    }
}

fn sample() -> Value {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/samples/widgetpipeline.yaml"),
    )
    .expect("read sample");
    serde_yaml::from_str(&text).expect("sample is YAML")
}

/// Every problem the committed schema finds in `object`: JSON-schema errors, then CEL errors.
fn schema_errors(object: &Value) -> Vec<String> {
    let schema = committed_schema();
    let validator = jsonschema::draft4::new(&as_json_schema(&schema)).expect("schema compiles");
    let mut errors: Vec<String> = validator
        .iter_errors(object)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    if let Err(cel) = kube::core::cel::Validator::new().validate(&schema, object, None) {
        errors.extend(cel.into_vec().into_iter().map(|e| e.to_string()));
    }
    errors
}

#[test]
fn sample_is_valid_and_parses_into_the_types() {
    let sample = sample();
    assert_eq!(schema_errors(&sample), Vec::<String>::new());
    let wp: WidgetPipeline = serde_json::from_value(sample).expect("sample deserializes");
    assert_eq!(wp.spec.sources[0].name, "deals");
    wp.validate_cel().expect("sample passes the CEL rules");
}

#[test]
fn duplicate_source_names_are_rejected_by_the_cel_rule() {
    let mut wp = sample();
    let first = wp["spec"]["sources"][0].clone();
    wp["spec"]["sources"]
        .as_array_mut()
        .expect("sources is a list")
        .push(first);
    let errors = schema_errors(&wp);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("source names must be unique")),
        "{errors:?}"
    );
    // The rule is really in the committed schema the apiserver evaluates.
    let schema = committed_schema();
    let rules = &schema["properties"]["spec"]["properties"]["sources"]["x-kubernetes-validations"];
    assert_eq!(
        rules[0]["rule"],
        "self.all(s, self.exists_one(t, t.name == s.name))"
    );
}

#[test]
fn distinct_source_names_pass_the_cel_rule() {
    let mut wp = sample();
    let mut second = wp["spec"]["sources"][0].clone();
    second["name"] = json!("loyalty");
    wp["spec"]["sources"]
        .as_array_mut()
        .expect("sources is a list")
        .push(second);
    assert_eq!(schema_errors(&wp), Vec::<String>::new());
}

#[test]
fn bad_durations_are_rejected() {
    for (path, bad) in [
        ("/spec/sources/0/pollInterval", "soon"),
        ("/spec/reclaim/minIdle", "30 seconds"),
        ("/spec/cache/ingestTtl", "7"),
        ("/spec/sources/0/retention", "one day"),
    ] {
        let mut wp = sample();
        *wp.pointer_mut(path).expect("field exists in the sample") = json!(bad);
        let errors = schema_errors(&wp);
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(path) && e.contains("does not match")),
            "{path}={bad}: {errors:?}"
        );
    }
}

#[test]
fn names_sizes_and_secret_refs_are_checked() {
    let cases: Vec<(&str, Value)> = vec![
        ("/spec/sources/0/name", json!("Deals")),
        ("/spec/sources/0/batchSize", json!(0)),
        ("/spec/stream/maxLength", json!(10)),
        ("/spec/reclaim/maxDeliveries", json!(0)),
        ("/spec/sources/0/maxRetainedRows", json!(999)),
        ("/spec/cache/warmRate", json!(-1)),
        ("/spec/sources/0/outboxTable", json!("x; drop table y")),
        ("/spec/sources", json!([])),
    ];
    for (path, bad) in cases {
        let mut wp = sample();
        *wp.pointer_mut(path).expect("field exists in the sample") = bad.clone();
        let errors = schema_errors(&wp);
        assert!(
            errors.iter().any(|e| e.starts_with(path)),
            "{path}={bad}: {errors:?}"
        );
    }
    let mut wp = sample();
    wp["spec"]["redis"]
        .as_object_mut()
        .expect("redis is an object")
        .remove("urlSecretRef");
    let errors = schema_errors(&wp);
    assert!(
        errors.iter().any(|e| e.contains("urlSecretRef")),
        "{errors:?}"
    );
}

#[test]
fn metadata_name_is_limited_by_a_cel_rule() {
    let mut wp = sample();
    wp["metadata"]["name"] = json!("a-very-long-pipeline-name-that-is-over-forty-chars");
    let errors = schema_errors(&wp);
    assert!(
        errors.iter().any(|e| e.contains("metadata.name must be")),
        "{errors:?}"
    );
}

#[test]
fn defaults_in_the_schema_match_the_runtime() {
    let schema = committed_schema();
    let spec = &schema["properties"]["spec"]["properties"];
    let source = &spec["sources"]["items"]["properties"];
    assert_eq!(source["outboxTable"]["default"], "widget_outbox");
    assert_eq!(source["batchSize"]["default"], 500);
    assert_eq!(source["pollInterval"]["default"], "250ms");
    assert_eq!(source["retention"]["default"], "24h");
    assert_eq!(source["maxRetainedRows"]["default"], 1_000_000);
    assert_eq!(source["maxRetainedRows"]["minimum"], 1000.0);
    assert_eq!(spec["cache"]["properties"]["warmRate"]["minimum"], 0.0);
    assert_eq!(
        spec["reclaim"]["default"],
        json!({"minIdle": "30s", "interval": "15s", "maxDeliveries": 5, "idleConsumerTtl": "1h"})
    );
    assert_eq!(
        spec["cache"]["default"],
        json!({"ingestTtl": "7d", "fallbackTtl": "1h", "warmRate": 5000})
    );
    assert_eq!(
        spec["stream"]["default"],
        json!({"consumerGroup": "core-ingester", "maxLength": 1000000})
    );
    // The operator's render test checks these equal the runtime's own defaults.
    assert_eq!(
        spec["timeouts"]["default"],
        json!({
            "database": {"connectTimeout": "5s", "statementTimeout": "10s",
                         "idleInTransactionTimeout": "60s", "idleTimeout": "5m", "keepalive": "30s"},
            "redis": {"connectTimeout": "1s", "responseTimeout": "2s", "keepalive": "30s"},
        })
    );
}

#[test]
fn crd_has_the_printer_columns_short_name_and_status_subresource() {
    let text = std::fs::read_to_string(committed_path()).expect("read CRD file");
    let crd: Value = serde_yaml::from_str(&text).expect("CRD file is YAML");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["wp"]));
    assert_eq!(crd["spec"]["names"]["categories"], json!(["homewidgets"]));
    let version = &crd["spec"]["versions"][0];
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        ["Ready", "Sources", "Lag", "Pending", "Reclaimed", "Age"]
    );
    let conditions =
        &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

/// Every CEL rule location in `schema`, with the rules found there.
fn rule_sites(schema: &Value, out: &mut Vec<(Value, Vec<String>)>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Array(rules)) = map.get("x-kubernetes-validations") {
                let rules = rules
                    .iter()
                    .filter_map(|r| r["rule"].as_str().map(str::to_string))
                    .collect();
                out.push((schema.clone(), rules));
            }
            map.values().for_each(|v| rule_sites(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| rule_sites(v, out)),
        _ => {}
    }
}

#[test]
fn cel_rules_compile_and_stay_within_the_apiserver_cost_budget() {
    use kube::core::cel::{compile_schema, estimate_rule_cost};
    let mut sites = Vec::new();
    rule_sites(&committed_schema(), &mut sites);
    // The root rule on metadata.name, the two uniqueness rules and the identity modes.
    assert_eq!(sites.len(), 4, "{sites:?}");
    for (schema, rules) in &sites {
        let compiled = compile_schema(schema);
        assert!(
            !compiled.has_errors(),
            "{:?}",
            compiled.compilation_errors()
        );
        for rule in rules {
            let warnings = estimate_rule_cost(rule, &compiled);
            assert!(warnings.is_empty(), "{rule}: {warnings:?}");
        }
    }
    // The bound is what keeps the quadratic uniqueness rule affordable: without maxItems the
    // same estimate warns.
    let (sources, rules) = sites
        .iter()
        .find(|(s, _)| s["items"]["properties"]["outboxTable"].is_object())
        .expect("the sources list carries a rule");
    let mut unbounded = sources.clone();
    unbounded
        .as_object_mut()
        .expect("object")
        .remove("maxItems");
    assert!(!estimate_rule_cost(&rules[0], &compile_schema(&unbounded)).is_empty());
}

#[test]
fn identity_modes_need_their_settings() {
    let with_identity = |identity: Value| {
        let mut wp = sample();
        wp["spec"]["coreApi"] = json!({"identity": identity});
        wp
    };
    let jwt = json!({"mode": "jwt", "jwt": {"issuer": "https://auth/", "audience": "home",
        "keysSecretRef": {"name": "jwks", "key": "jwks.json"}}});
    let wp = with_identity(jwt);
    assert!(schema_errors(&wp).is_empty(), "{:?}", schema_errors(&wp));
    let parsed: WidgetPipeline = serde_json::from_value(wp).expect("parses");
    assert!(parsed.spec.core_api.identity.is_some());
    let bad = with_identity(json!({"mode": "jwt", "jwt": {"issuer": "i", "audience": "a"}}));
    assert!(
        !schema_errors(&bad).is_empty(),
        "jwt without keys is refused"
    );
    let bad = with_identity(json!({"mode": "header"}));
    assert!(
        schema_errors(&bad)
            .iter()
            .any(|e| e.contains("mode header needs header")),
        "{:?}",
        schema_errors(&bad)
    );
    let bad = with_identity(json!({"mode": "cookie"}));
    assert!(!schema_errors(&bad).is_empty(), "unknown mode is refused");
}

#[test]
fn a_name_with_the_reserved_outbox_segment_is_refused() {
    for (name, ok) in [
        ("a-outbox", false),
        ("a-outbox-b", false),
        ("outboxes", true),
        ("a-outboxes", true),
    ] {
        let mut wp = sample();
        wp["metadata"]["name"] = json!(name);
        let errors = schema_errors(&wp);
        assert_eq!(errors.is_empty(), ok, "{name}: {errors:?}");
        if !ok {
            assert!(
                errors.iter().any(|e| e.contains("'-outbox'")),
                "{name}: {errors:?}"
            );
        }
    }
}
