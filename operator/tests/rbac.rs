//! The shipped RBAC grants exactly `operator/src/rbac.rs` (which the reconcile tests' mock API
//! server holds every request to): a verb added to a manifest without code that needs it, or
//! missing from one, fails here.

use std::collections::BTreeSet;

use serde_yaml::Value;
use widget_operator::rbac::{LEASE_RULES, RULES, Rule};

type Grants = BTreeSet<(String, String, String)>;

fn docs(path: &str) -> Vec<Value> {
    let full = format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn granted(role: &Value) -> Grants {
    let mut out = Grants::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    out
}

fn needed(rules: &[Rule]) -> Grants {
    rules
        .iter()
        .flat_map(|r| {
            r.verbs
                .iter()
                .map(|v| (r.group.to_string(), r.resource.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn the_cluster_install_grants_exactly_what_the_code_uses() {
    let rbac = docs("manifests/operator/rbac.yaml");
    assert_eq!(
        granted(find(&rbac, "ClusterRole", "widget-operator")),
        needed(RULES)
    );
    assert_eq!(
        granted(find(&rbac, "Role", "widget-operator-leader-election")),
        needed(LEASE_RULES)
    );
    let secrets: Vec<_> = needed(RULES)
        .into_iter()
        .filter(|(_, r, _)| r == "secrets")
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(secrets, ["get"], "Secrets are read by name only");
}

#[test]
fn the_namespaced_install_grants_the_same_in_one_namespace_and_nothing_cluster_wide() {
    let role = docs("manifests/operator-namespaced/role.yaml");
    let r = find(&role, "Role", "widget-operator");
    assert_eq!(granted(r), needed(RULES));
    let binding = find(&role, "RoleBinding", "widget-operator");
    assert_eq!(binding["metadata"]["namespace"], r["metadata"]["namespace"]);
    let kustomization = docs("manifests/operator-namespaced/kustomization.yaml");
    let patches = kustomization[0]["patches"].as_sequence().expect("patches");
    for deleted in ["ClusterRole", "ClusterRoleBinding"] {
        assert!(
            patches.iter().any(|p| p["target"]["kind"] == deleted
                && p["target"]["name"] == "widget-operator"
                && p["patch"]
                    .as_str()
                    .is_some_and(|t| t.contains("$patch: delete"))),
            "the overlay deletes the {deleted}"
        );
    }
    let text = serde_yaml::to_string(&kustomization[0]).expect("yaml");
    assert!(text.contains("WATCH_NAMESPACE"), "{text}");
}

#[test]
fn editors_and_viewers_get_aggregated_roles() {
    let roles = docs("manifests/operator/user-roles.yaml");
    let editor = find(&roles, "ClusterRole", "widgetpipelines-editor");
    assert_eq!(
        editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"],
        "true"
    );
    let viewer = find(&roles, "ClusterRole", "widgetpipelines-viewer");
    assert_eq!(
        viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    let verbs: BTreeSet<String> = granted(viewer).into_iter().map(|(_, _, v)| v).collect();
    assert_eq!(verbs, ["get", "list", "watch"].map(String::from).into());
    let kustomization = docs("manifests/operator/kustomization.yaml");
    assert!(strings(&kustomization[0]["resources"]).contains(&"user-roles.yaml".to_string()));
}
