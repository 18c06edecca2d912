//! Rendering is a pure function of the resource: these tests pin the objects a sample pipeline
//! produces, and prove the ConfigMap is the runtime's own config format.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use widget_crds::WidgetPipeline;
use widget_operator::Error;
use widget_operator::render::{self, Rendered, SecretVersions};
use widget_runtime::config::Config;

const SAMPLE: &str = include_str!("../../manifests/samples/widgetpipeline.yaml");

fn sample() -> WidgetPipeline {
    let mut wp: WidgetPipeline = serde_yaml::from_str(SAMPLE).expect("sample parses");
    wp.metadata.uid = Some("6f1c1d1e-0000-4000-8000-000000000001".into());
    wp.metadata.generation = Some(1);
    wp
}

fn versions() -> SecretVersions {
    BTreeMap::from([
        ("redis".to_string(), "101".to_string()),
        ("core-db".to_string(), "102".to_string()),
        ("deals-db".to_string(), "103".to_string()),
    ])
}

fn rendered(wp: &WidgetPipeline) -> Rendered {
    render::render(wp, &versions()).expect("sample renders")
}

fn deployment<'a>(r: &'a Rendered, name: &str) -> &'a Deployment {
    r.deployments
        .iter()
        .find(|d| d.name_any() == name)
        .unwrap_or_else(|| panic!("no Deployment {name}"))
}

fn container(d: &Deployment) -> &Container {
    let pod = d.spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.containers.len(), 1);
    &pod.containers[0]
}

fn pod_annotation(d: &Deployment, key: &str) -> String {
    d.spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(key))
        .cloned()
        .unwrap_or_else(|| panic!("no pod annotation {key}"))
}

/// (name, secret name, secret key) of every env var read from a Secret.
/// A connection whose URL is the `url` key of the Secret `name`.
fn conn(name: &str) -> widget_crds::Connection {
    widget_crds::Connection {
        url_secret_ref: widget_crds::SecretKeyRef {
            name: name.into(),
            key: "url".into(),
        },
    }
}

fn secret_env(c: &Container) -> Vec<(String, String, String)> {
    c.env
        .iter()
        .flatten()
        .filter_map(|e| {
            let s = e.value_from.as_ref()?.secret_key_ref.as_ref()?;
            Some((e.name.clone(), s.name.clone(), s.key.clone()))
        })
        .collect()
}

#[test]
fn sample_renders_one_worker_per_source_the_ingester_and_the_api() {
    let r = rendered(&sample());
    let names: Vec<String> = r.deployments.iter().map(|d| d.name_any()).collect();
    assert_eq!(
        names,
        ["home-outbox-deals", "home-ingester", "home-core-api"]
    );
    assert_eq!(r.config_map.name_any(), "home-runtime-config");
    assert_eq!(r.service.name_any(), "home-core-api");
    for d in &r.deployments {
        assert_eq!(d.namespace().as_deref(), Some("widgets"));
        let owners = d.owner_references();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "WidgetPipeline");
        assert_eq!(owners[0].name, "home");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(d.labels()["homewidgets.io/pipeline"], "home");
        assert_eq!(
            d.labels()["app.kubernetes.io/managed-by"],
            "widget-operator"
        );
        // Selector labels are a subset of the pod labels (the apiserver requires it).
        let selector = d.spec.selector.match_labels.as_ref().expect("selector");
        let pod_labels = d
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .expect("labels");
        for (k, v) in selector {
            assert_eq!(pod_labels.get(k), Some(v), "{k}");
        }
    }
    assert_eq!(
        deployment(&r, "home-outbox-deals").labels()["homewidgets.io/source"],
        "deals"
    );
}

#[test]
fn config_map_is_the_runtime_config_format() {
    let r = rendered(&sample());
    let text = &r.config_map.data.as_ref().expect("data")["config.yaml"];
    let config = Config::from_yaml_str(text).expect("the runtime loads the rendered config");
    assert_eq!(config, r.config);
    assert_eq!(config.pipeline, "home");
    assert_eq!(config.stream_name(), "home.widget-events");
    assert_eq!(config.stream.consumer_group, "core-ingester");
    assert_eq!(config.key_prefix(), "hw:home:");
    assert_eq!(config.cache.ingest_ttl, Duration::from_secs(7 * 86_400));
    assert_eq!(config.reclaim.min_idle, Duration::from_secs(30));
    assert_eq!(config.reclaim.max_deliveries, 5);
    assert_eq!(config.sources.len(), 1);
    assert_eq!(config.sources[0].poll_interval, Duration::from_millis(250));
    assert_eq!(config.sources[0].retention, Duration::from_secs(24 * 3600));
    assert_eq!(config.sources[0].max_retained_rows, 1_000_000);
    assert_eq!(config.cache.warm_rate, 5000);
    assert_eq!(
        config.screens[0].widgets,
        ["deals.top-picks", "loyalty.points:{user}"]
    );
}

#[test]
fn sub_millisecond_durations_survive_the_config_map() {
    let mut wp = sample();
    // Sub-millisecond precision above the 10ms floor.
    wp.spec.sources[0].poll_interval = "10500us".into();
    let r = rendered(&wp);
    let text = &r.config_map.data.as_ref().expect("data")["config.yaml"];
    let config = Config::from_yaml_str(text).expect("the runtime loads the rendered config");
    assert_eq!(config, r.config);
    assert_eq!(
        config.sources[0].poll_interval,
        Duration::from_micros(10_500)
    );
}

#[test]
fn retention_and_warm_rate_reach_the_runtime_config() {
    let mut wp = sample();
    wp.spec.sources[0].retention = "1h30m".into();
    wp.spec.sources[0].max_retained_rows = 50_000;
    wp.spec.cache.warm_rate = 200;
    let r = rendered(&wp);
    let text = &r.config_map.data.as_ref().expect("data")["config.yaml"];
    let config = Config::from_yaml_str(text).expect("the runtime loads the rendered config");
    assert_eq!(config, r.config);
    assert_eq!(config.sources[0].retention, Duration::from_secs(5400));
    assert_eq!(config.sources[0].max_retained_rows, 50_000);
    assert_eq!(config.cache.warm_rate, 200);
}

#[test]
fn timeouts_reach_the_runtime_config_and_too_small_ones_are_invalid() {
    let mut wp = sample();
    wp.spec.timeouts.database.statement_timeout = "3s".into();
    wp.spec.timeouts.redis.response_timeout = "750ms".into();
    let r = rendered(&wp);
    let text = &r.config_map.data.as_ref().expect("data")["config.yaml"];
    let config = Config::from_yaml_str(text).expect("the runtime loads the rendered config");
    assert_eq!(config.database.statement_timeout, Duration::from_secs(3));
    assert_eq!(config.redis.response_timeout, Duration::from_millis(750));

    let mut wp = sample();
    wp.spec.timeouts.redis.response_timeout = "1ms".into();
    let e = render::render(&wp, &versions()).expect_err("a 1ms response timeout");
    assert!(
        matches!(e, Error::InvalidSpec(ref m) if m.contains("redis.responseTimeout") && m.contains("at least 100ms")),
        "{e}"
    );
}

#[test]
fn core_api_serves_admin_routes_on_its_own_port_and_gets_its_identity_keys_from_a_secret() {
    let mut wp = sample();
    wp.spec.core_api.identity = Some(widget_crds::IdentitySpec {
        mode: widget_crds::IdentityModeSpec::Jwt,
        header: None,
        jwt: Some(widget_crds::JwtSpec {
            issuer: "https://auth.example/".into(),
            audience: "home".into(),
            user_claim: Some("uid".into()),
            algorithms: vec!["ES256".into()],
            keys_secret_ref: widget_crds::SecretKeyRef {
                name: "jwks".into(),
                key: "jwks.json".into(),
            },
            leeway: Some("10s".into()),
        }),
    });
    wp.spec.core_api.http.max_requests = 64;
    wp.spec.core_api.local_cache.max_bytes = 16 * 1024 * 1024;
    let r = rendered(&wp);
    let api = deployment(&r, "home-core-api");
    let c = container(api);
    let args = c.args.clone().unwrap_or_default();
    assert!(
        args.windows(2)
            .any(|w| w == ["--admin-listen", "0.0.0.0:9090"]),
        "{args:?}"
    );
    let ports: Vec<(String, i32)> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [("http".to_string(), 8080), ("admin".to_string(), 9090)]
    );
    for probe in [&c.liveness_probe, &c.readiness_probe] {
        let port = &probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("http probe")
            .port;
        assert_eq!(
            *port,
            IntOrString::String("admin".into()),
            "probes on the admin port"
        );
    }
    assert!(
        secret_env(c).contains(&(
            "IDENTITY_JWT_KEYS".into(),
            "jwks".into(),
            "jwks.json".into()
        )),
        "{:?}",
        secret_env(c)
    );
    let text = &r.config_map.data.as_ref().expect("data")["config.yaml"];
    let config = Config::from_yaml_str(text).expect("the runtime loads it");
    let identity = config.identity.expect("identity rendered");
    let jwt = identity.jwt.expect("jwt");
    assert_eq!(
        (jwt.issuer.as_str(), jwt.user_claim.as_str()),
        ("https://auth.example/", "uid")
    );
    assert_eq!(
        jwt.key_file, None,
        "keys come from the env, never the ConfigMap"
    );
    assert_eq!(config.http.max_requests, 64);
    assert!(config.local_cache.enabled, "on by default");
    assert_eq!(config.local_cache.max_bytes, 16 * 1024 * 1024);
    // The Service still exposes only the API port.
    let ports = r
        .service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!(
        ports[0].target_port,
        Some(IntOrString::String("http".into()))
    );
}

#[test]
fn same_named_pipelines_in_two_namespaces_get_distinct_streams_and_caches() {
    let mut a = sample();
    a.metadata.namespace = Some("team-a".into());
    let mut b = sample();
    b.metadata.namespace = Some("team-b".into());
    for wp in [&mut a, &mut b] {
        wp.spec.stream.name = None;
        wp.spec.cache.key_prefix = None;
    }
    let (ca, cb) = (rendered(&a).config, rendered(&b).config);
    assert_eq!(ca.stream_name(), "team-a.home.widget-events");
    assert_eq!(cb.stream_name(), "team-b.home.widget-events");
    assert_ne!(ca.key_prefix(), cb.key_prefix());
    assert_ne!(ca.stats_key(), cb.stats_key());
    assert_ne!(ca.dead_letter_stream(), cb.dead_letter_stream());
    // An explicit name is kept as written (e.g. to keep a stream made before the defaults).
    let mut c = sample();
    c.spec.stream.name = Some("home.widget-events".into());
    c.spec.cache.key_prefix = Some("hw:home:".into());
    let cc = rendered(&c).config;
    assert_eq!(
        (cc.stream_name().as_str(), cc.key_prefix().as_str()),
        ("home.widget-events", "hw:home:")
    );
}

#[test]
fn a_name_with_an_outbox_segment_is_invalid() {
    // `a-outbox` + core-api would render `a-outbox-core-api`, pipeline `a`'s worker of a
    // source named `core-api`.
    for name in ["a-outbox", "a-outbox-x"] {
        let mut wp = sample();
        wp.metadata.name = Some(name.into());
        let e = render::render(&wp, &versions()).expect_err("reserved segment");
        assert!(
            matches!(e, Error::InvalidSpec(ref m) if m.contains("-outbox")),
            "{e}"
        );
    }
    let mut wp = sample();
    wp.metadata.name = Some("outboxes".into());
    assert!(
        render::render(&wp, &versions()).is_ok(),
        "only the segment is reserved"
    );
}

#[test]
fn each_component_can_have_its_own_redis_user() {
    let mut wp = sample();
    wp.spec.sources[0].redis = Some(conn("redis-worker-deals"));
    wp.spec.ingester.redis = Some(conn("redis-ingester"));
    wp.spec.core_api.redis = Some(conn("redis-core-api"));
    let refs: Vec<&str> = wp.secret_refs().iter().map(|r| r.name.as_str()).collect();
    for name in ["redis-worker-deals", "redis-ingester", "redis-core-api"] {
        assert!(
            refs.contains(&name),
            "{name} is read for the hashes: {refs:?}"
        );
    }
    let r = rendered(&wp);
    for (name, secret) in [
        ("home-outbox-deals", "redis-worker-deals"),
        ("home-ingester", "redis-ingester"),
        ("home-core-api", "redis-core-api"),
    ] {
        let env = secret_env(container(deployment(&r, name)));
        assert!(
            env.contains(&("REDIS_URL".into(), secret.into(), "url".into())),
            "{name}: {env:?}"
        );
    }
}

#[test]
fn omitted_fields_render_the_runtime_defaults() {
    let minimal = r#"
apiVersion: homewidgets.io/v1alpha1
kind: WidgetPipeline
metadata: {name: shop, namespace: widgets, uid: u-1}
spec:
  image: widget-runtime:dev
  redis: {urlSecretRef: {name: redis, key: url}}
  coreDatabase: {urlSecretRef: {name: core-db, key: url}}
  sources:
    - {name: deals, database: {urlSecretRef: {name: deals-db, key: url}}}
"#;
    let wp: WidgetPipeline = serde_yaml::from_str(minimal).expect("parses");
    let r = render::render(&wp, &SecretVersions::new()).expect("renders");
    let text = &r.config_map.data.as_ref().expect("data")["config.yaml"];
    // The runtime's defaults, but for the stream and the cache prefix: those are derived from
    // namespace and name, so pipelines of one name in two namespaces never share them.
    let runtime_defaults = Config::from_yaml_str(
        "pipeline: shop\nstream: {name: widgets.shop.widget-events}\n\
         cache: {keyPrefix: \"hw:widgets:shop:\"}\nsources: [{name: deals}]\n",
    )
    .expect("runtime parses");
    assert_eq!(
        Config::from_yaml_str(text).expect("loads"),
        runtime_defaults
    );
    // No replicas in the spec: the operator does not own the field (an HPA may).
    for d in &r.deployments {
        assert_eq!(d.spec.replicas, None, "{}", d.name_any());
    }
}

#[test]
fn containers_run_the_runtime_cli_with_secret_env_probes_and_a_locked_down_context() {
    let r = rendered(&sample());

    let worker = deployment(&r, "home-outbox-deals");
    let c = container(worker);
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/example/widget-runtime:0.1.0")
    );
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        [
            "outbox-worker",
            "--config",
            "/etc/widget-runtime/config.yaml",
            "--source",
            "deals",
            "--admin-listen",
            "0.0.0.0:9090",
            "--log-format",
            "json"
        ]
    );
    assert_eq!(
        secret_env(c),
        [
            ("REDIS_URL".into(), "redis".into(), "url".into()),
            (
                "SOURCE_DATABASE_URL".into(),
                "deals-db".into(),
                "url".into()
            )
        ]
    );
    assert_eq!(worker.spec.replicas, Some(1));

    let ingester = deployment(&r, "home-ingester");
    let c = container(ingester);
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        [
            "ingester",
            "--config",
            "/etc/widget-runtime/config.yaml",
            "--consumer",
            "$(POD_NAME)",
            "--admin-listen",
            "0.0.0.0:9090",
            "--log-format",
            "json"
        ]
    );
    let env = c.env.clone().unwrap_or_default();
    assert_eq!(env[0].name, "POD_NAME", "POD_NAME must precede its use");
    let field = env[0]
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("downward API");
    assert_eq!(field.field_path, "metadata.name");
    assert_eq!(
        secret_env(c),
        [
            ("REDIS_URL".into(), "redis".into(), "url".into()),
            ("CORE_DATABASE_URL".into(), "core-db".into(), "url".into())
        ]
    );
    assert_eq!(ingester.spec.replicas, Some(2));

    let api = deployment(&r, "home-core-api");
    let c = container(api);
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        [
            "core-api",
            "--config",
            "/etc/widget-runtime/config.yaml",
            "--listen",
            "0.0.0.0:8080",
            "--admin-listen",
            "0.0.0.0:9090",
            "--log-format",
            "json"
        ]
    );
    assert_eq!(api.spec.replicas, Some(3));

    for d in &r.deployments {
        let c = container(d);
        let port = &c.ports.as_ref().expect("ports")[0];
        let expected = if d.name_any() == "home-core-api" {
            ("http", 8080)
        } else {
            ("admin", 9090)
        };
        assert_eq!(
            (
                port.name.as_deref().unwrap_or_default(),
                port.container_port
            ),
            expected
        );
        let live = c
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("liveness");
        let ready = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("readiness");
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        // Every component, core-api included, answers probes on its admin port.
        assert_eq!(live.port, IntOrString::String("admin".into()));
        assert_eq!(ready.port, IntOrString::String("admin".into()));
        let sc = c.security_context.as_ref().expect("security context");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.run_as_user, Some(65532));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        let mounts = c.volume_mounts.clone().unwrap_or_default();
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_path == "/etc/widget-runtime" && m.read_only == Some(true))
        );
    }
}

#[test]
fn service_exposes_the_core_api_on_port_80() {
    let r = rendered(&sample());
    let spec = r.service.spec.as_ref().expect("service spec");
    let port = &spec.ports.as_ref().expect("ports")[0];
    assert_eq!(port.port, 80);
    assert_eq!(port.name.as_deref(), Some("http"));
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into()))
    );
    let api = deployment(&r, "home-core-api");
    assert_eq!(
        spec.selector.as_ref(),
        api.spec.selector.match_labels.as_ref()
    );
}

#[test]
fn resources_from_the_spec_reach_the_containers() {
    let mut wp = sample();
    let resources = ResourceRequirements {
        requests: Some(BTreeMap::from([(
            "cpu".to_string(),
            Quantity("250m".into()),
        )])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("256Mi".into()),
        )])),
        ..ResourceRequirements::default()
    };
    wp.spec.ingester.resources = Some(resources.clone());
    let r = rendered(&wp);
    assert_eq!(
        container(deployment(&r, "home-ingester"))
            .resources
            .as_ref(),
        Some(&resources)
    );
    assert_eq!(container(deployment(&r, "home-core-api")).resources, None);
}

#[test]
fn config_and_secret_hashes_roll_exactly_the_affected_pods() {
    let wp = sample();
    let before = rendered(&wp);

    // A config change changes every pod template's config hash.
    let mut changed = wp.clone();
    changed.spec.reclaim.max_deliveries = 9;
    let after = rendered(&changed);
    assert_ne!(before.config_hash, after.config_hash);
    for (a, b) in before.deployments.iter().zip(&after.deployments) {
        let key = render::ANNOTATION_CONFIG_HASH;
        assert_eq!(pod_annotation(a, key), before.config_hash);
        assert_ne!(pod_annotation(a, key), pod_annotation(b, key));
    }

    // Rotating the deals database Secret rolls only the deals worker.
    let mut rotated = versions();
    rotated.insert("deals-db".into(), "999".into());
    let after = render::render(&wp, &rotated).expect("renders");
    let key = render::ANNOTATION_SECRETS_HASH;
    for (a, b) in before.deployments.iter().zip(&after.deployments) {
        let changed = pod_annotation(a, key) != pod_annotation(b, key);
        assert_eq!(
            changed,
            a.name_any() == "home-outbox-deals",
            "{}",
            a.name_any()
        );
    }

    // A Secret that appears later also changes the hash.
    let mut missing = versions();
    missing.remove("redis");
    let without = render::render(&wp, &missing).expect("renders");
    assert_ne!(
        pod_annotation(&without.deployments[1], key),
        pod_annotation(&before.deployments[1], key)
    );

    // Same input, same output: rendering is deterministic.
    assert_eq!(rendered(&wp), before);
}

#[test]
fn removing_a_source_removes_its_deployment() {
    let mut wp = sample();
    let mut loyalty = wp.spec.sources[0].clone();
    loyalty.name = "loyalty".into();
    wp.spec.sources.push(loyalty);
    let two = rendered(&wp);
    assert!(
        two.deployments
            .iter()
            .any(|d| d.name_any() == "home-outbox-loyalty")
    );
    wp.spec.sources.retain(|s| s.name != "loyalty");
    let one = rendered(&wp);
    let names: Vec<String> = one.deployments.iter().map(|d| d.name_any()).collect();
    assert_eq!(
        names,
        ["home-outbox-deals", "home-ingester", "home-core-api"]
    );
    assert_eq!(one.config.sources.len(), 1);
}

#[test]
fn specs_the_runtime_would_refuse_are_invalid() {
    let mut wp = sample();
    wp.spec.sources[0].poll_interval = "soon".into();
    let e = render::render(&wp, &versions()).expect_err("bad duration");
    assert!(
        matches!(e, Error::InvalidSpec(ref m) if m.contains("sources[0].pollInterval")),
        "{e}"
    );

    // The schema accepts any duration; the runtime's minimum of 1m is checked here.
    let mut wp = sample();
    wp.spec.sources[0].retention = "30s".into();
    let e = render::render(&wp, &versions()).expect_err("retention under 1m");
    assert!(
        matches!(e, Error::InvalidSpec(ref m) if m.contains("sources[0].retention") && m.contains("at least 1m")),
        "{e}"
    );

    let mut wp = sample();
    wp.spec.sources[0].retention = "a day".into();
    let e = render::render(&wp, &versions()).expect_err("bad duration");
    assert!(
        matches!(e, Error::InvalidSpec(ref m) if m.contains("sources[0].retention")),
        "{e}"
    );

    // Below the schema's minimums: rejected whatever the runtime version accepts.
    let mut wp = sample();
    wp.spec.sources[0].max_retained_rows = 10;
    let e = render::render(&wp, &versions()).expect_err("too few retained rows");
    assert!(
        matches!(e, Error::InvalidSpec(ref m) if m.contains("sources[0].maxRetainedRows")),
        "{e}"
    );
    // warmRate 0 is valid: it turns the re-warm off.
    let mut wp = sample();
    wp.spec.cache.warm_rate = 0;
    let rendered = render::render(&wp, &versions()).expect("warm rate 0 renders");
    assert_eq!(rendered.config.cache.warm_rate, 0);

    let mut wp = sample();
    let dup = wp.spec.sources[0].clone();
    wp.spec.sources.push(dup);
    let e = render::render(&wp, &versions()).expect_err("duplicate source");
    assert!(
        matches!(e, Error::InvalidSpec(ref m) if m.contains("duplicate")),
        "{e}"
    );

    let mut wp = sample();
    wp.metadata.uid = None;
    assert!(matches!(
        render::render(&wp, &versions()),
        Err(Error::InvalidObject(_))
    ));
}

#[test]
fn a_redis_ca_reaches_every_component_from_its_secret() {
    let mut wp = sample();
    let r = rendered(&wp);
    for d in &r.deployments {
        let env = secret_env(container(d));
        assert!(
            env.iter().all(|(name, _, _)| name != "REDIS_CA_PEM"),
            "no CA unless asked: {env:?}"
        );
    }
    wp.spec.redis.ca_secret_ref = Some(widget_crds::SecretKeyRef {
        name: "redis-tls".into(),
        key: "ca.crt".into(),
    });
    assert!(
        wp.secret_refs().iter().any(|r| r.name == "redis-tls"),
        "the CA Secret is read (for the hashes and the probe)"
    );
    let r = rendered(&wp);
    assert_eq!(r.deployments.len(), wp.spec.sources.len() + 2);
    for d in &r.deployments {
        let env = secret_env(container(d));
        assert!(
            env.contains(&("REDIS_CA_PEM".into(), "redis-tls".into(), "ca.crt".into())),
            "{}: {env:?}",
            d.name_any()
        );
    }
}

#[test]
fn read_replicas_reach_only_core_api() {
    let mut wp = sample();
    wp.spec.core_api.database_read = Some(conn("core-db-replica"));
    wp.spec.core_api.redis_read = Some(conn("redis-replica"));
    let r = rendered(&wp);
    let redis_read = (
        "REDIS_READ_URL".to_string(),
        "redis-replica".to_string(),
        "url".to_string(),
    );
    assert!(secret_env(container(deployment(&r, "home-core-api"))).contains(&redis_read));
    for other in ["home-ingester", "home-outbox-deals"] {
        let env = secret_env(container(deployment(&r, other)));
        assert!(
            !env.contains(&redis_read),
            "{other} reads and writes the primary: {env:?}"
        );
    }
    let read = (
        "CORE_DATABASE_READ_URL".to_string(),
        "core-db-replica".to_string(),
        "url".to_string(),
    );
    assert!(secret_env(container(deployment(&r, "home-core-api"))).contains(&read));
    let ingester = secret_env(container(deployment(&r, "home-ingester")));
    assert!(
        !ingester.contains(&read),
        "the ingester keeps the primary: {ingester:?}"
    );
}

#[test]
fn redis_cluster_mode_reaches_the_runtime_config_with_a_hash_tagged_stream() {
    let mut wp = sample();
    assert_eq!(
        rendered(&wp).config.redis.mode,
        widget_runtime::config::RedisMode::Standalone
    );
    wp.spec.redis.mode = widget_crds::RedisModeSpec::Cluster;
    // An explicit stream name without a hash tag is an invalid spec, said in the status.
    wp.spec.stream.name = Some("home.widget-events".into());
    let err = render::render(&wp, &versions()).expect_err("untagged stream in a cluster");
    assert!(err.to_string().contains("needs a hash tag"), "{err}");
    wp.spec.stream.name = None;
    let r = rendered(&wp);
    assert_eq!(
        r.config.redis.mode,
        widget_runtime::config::RedisMode::Cluster
    );
    let stream = r.config.stream_name();
    let tag = widget_runtime::config::hash_tag(&stream).expect("tagged stream");
    assert!(stream.starts_with(&format!("{{{tag}}}")), "{stream}");
    assert_eq!(
        widget_runtime::config::hash_tag(&r.config.key_prefix()),
        None
    );
    let text = r
        .config_map
        .data
        .as_ref()
        .and_then(|d| d.values().next())
        .expect("config text");
    let parsed = widget_runtime::config::Config::from_yaml_str(text).expect("runtime parses it");
    assert_eq!(
        parsed.redis.mode,
        widget_runtime::config::RedisMode::Cluster
    );
    assert_eq!(parsed.stream_name(), stream);
}
