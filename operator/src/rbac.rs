//! What the operator may do in the Kubernetes API, and why: the one list
//! `manifests/operator/rbac.yaml` (and the namespaced overlay's Role) must grant exactly. A test
//! compares the manifests with it, and the reconcile tests' mock API server refuses any request
//! it does not cover, so neither can drift from what the code does.

/// One RBAC rule: verbs on a resource of an API group (`""` is the core group).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    pub why: &'static str,
}

/// The rules of the operator's (Cluster)Role.
pub const RULES: &[Rule] = &[
    Rule {
        group: "homewidgets.io",
        resource: "widgetpipelines",
        verbs: &["get", "list", "watch"],
        why: "the primary watch; get: whether the holder of a claimed stream still exists",
    },
    Rule {
        group: "homewidgets.io",
        resource: "widgetpipelines/status",
        verbs: &["patch"],
        why: "the status, by server-side apply",
    },
    Rule {
        group: "apps",
        resource: "deployments",
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
        why: "children: get before the first apply (owned by someone else?), create and patch \
              by server-side apply, delete: workers of removed sources and conflicting pipelines",
    },
    Rule {
        group: "",
        resource: "configmaps",
        verbs: &["get", "list", "watch", "create", "patch"],
        why: "the runtime config; deleted with the pipeline by the garbage collector",
    },
    Rule {
        group: "",
        resource: "services",
        verbs: &["get", "list", "watch", "create", "patch"],
        why: "core-api's Service; deleted with the pipeline by the garbage collector",
    },
    Rule {
        group: "",
        resource: "secrets",
        verbs: &["get"],
        why: "the referenced Secrets only, by name, on each reconcile: resource versions for the \
              pod hashes (rotation), the Redis URL for the probe. No list or watch: RBAC cannot \
              limit those to metadata, and they would expose every Secret's data",
    },
    Rule {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        why: "events; patch: a repeated event's count",
    },
];

/// The Role for the leader-election Lease in the operator's own namespace.
pub const LEASE_RULES: &[Rule] = &[Rule {
    group: "coordination.k8s.io",
    resource: "leases",
    verbs: &["get", "create", "patch"],
    why: "leader election",
}];

/// Whether `RULES` allow `verb` on `resource` of `group`.
pub fn allows(group: &str, resource: &str, verb: &str) -> bool {
    RULES
        .iter()
        .chain(LEASE_RULES)
        .any(|r| r.group == group && r.resource == resource && r.verbs.contains(&verb))
}

/// The (group, resource, verb) of a request path as the API server authorizes it:
/// `/api/v1/namespaces/ns/secrets/name` is `("", "secrets", "get")` for a GET.
pub fn request_verb(method: &str, path: &str, query: &str) -> Option<(String, String, String)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => return None,
    };
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) if query.contains("watch=true") => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    Some((group.to_string(), resource, verb.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_map_to_rbac_verbs() {
        let v = |m, p, q| request_verb(m, p, q).expect("maps");
        assert_eq!(
            v("GET", "/api/v1/namespaces/w/secrets/redis", ""),
            ("".into(), "secrets".into(), "get".into())
        );
        assert_eq!(
            v(
                "GET",
                "/apis/apps/v1/namespaces/w/deployments",
                "labelSelector=x"
            ),
            ("apps".into(), "deployments".into(), "list".into())
        );
        assert_eq!(
            v(
                "PATCH",
                "/apis/homewidgets.io/v1alpha1/namespaces/w/widgetpipelines/home/status",
                ""
            ),
            (
                "homewidgets.io".into(),
                "widgetpipelines/status".into(),
                "patch".into()
            )
        );
        assert!(allows("", "secrets", "get"));
        assert!(!allows("", "secrets", "list"));
        assert!(!allows("", "configmaps", "delete"));
    }
}
