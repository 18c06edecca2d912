//! The desired children of a `WidgetPipeline`: a pure function of the resource and the resource
//! versions of the Secrets it references. No I/O here; everything is unit-tested.
//!
//! - ConfigMap `<p>-runtime-config` with `config.yaml`, the runtime's own `Config` serialized.
//! - Deployment `<p>-outbox-<source>` per source, `<p>-ingester`, `<p>-core-api`.
//! - Service `<p>-core-api` (port 80 -> 8080 `http`).
//!
//! Pod templates carry a hash of the rendered config and of the resource versions of the Secrets
//! that pod reads, so a config change or a rotated Secret rolls exactly the affected pods.
//! `spec.replicas` is left out when the pipeline does not set it, so an HPA can own it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};
use widget_crds::{IdentityModeSpec, RedisModeSpec, SecretKeyRef, WidgetPipeline};
use widget_runtime::config::{
    CacheConfig, Config, DatabaseConfig, HttpConfig, IdentityConfig, IdentityMode, JwtConfig,
    LocalCacheConfig, ReclaimConfig, RedisConfig, RedisMode, ScreenConfig, SourceConfig,
    StreamConfig, human_duration,
};

use crate::{Error, Result};

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Every child carries it; prune and status select children with it.
pub const LABEL_PIPELINE: &str = "homewidgets.io/pipeline";
pub const LABEL_SOURCE: &str = "homewidgets.io/source";
/// Hash of the rendered runtime config, on pod templates.
pub const ANNOTATION_CONFIG_HASH: &str = "homewidgets.io/config-hash";
/// Hash of the resource versions of the Secrets the pod reads, on pod templates.
pub const ANNOTATION_SECRETS_HASH: &str = "homewidgets.io/secrets-hash";
/// Hash of the whole rendered object, on every child: unchanged hash and no drift -> no apply.
pub const ANNOTATION_RENDER_HASH: &str = "homewidgets.io/render-hash";

pub const CONFIG_KEY: &str = "config.yaml";
pub const CONFIG_DIR: &str = "/etc/widget-runtime";
pub const ADMIN_PORT: i32 = 9090;
pub const HTTP_PORT: i32 = 8080;
pub const RUN_AS: i64 = 65532;

pub const COMPONENT_WORKER: &str = "outbox-worker";
pub const COMPONENT_INGESTER: &str = "ingester";
pub const COMPONENT_API: &str = "core-api";

/// Resource versions of the Secrets a pipeline references, by Secret name; a Secret that does
/// not exist is absent.
pub type SecretVersions = BTreeMap<String, String>;

/// Everything the operator applies for one pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub config: Config,
    pub config_hash: String,
    pub config_map: ConfigMap,
    pub deployments: Vec<Deployment>,
    pub service: Service,
}

pub fn config_map_name(pipeline: &str) -> String {
    format!("{pipeline}-runtime-config")
}
pub fn worker_name(pipeline: &str, source: &str) -> String {
    format!("{pipeline}-outbox-{source}")
}
pub fn ingester_name(pipeline: &str) -> String {
    format!("{pipeline}-ingester")
}
pub fn api_name(pipeline: &str) -> String {
    format!("{pipeline}-core-api")
}

/// Shortest `sources[].retention`: a shorter one would delete rows an ingester that merely
/// restarts has not confirmed yet. The operator holds specs to it whatever the runtime accepts.
pub const MIN_RETENTION: Duration = Duration::from_secs(60);
/// Smallest `sources[].maxRetainedRows` (also the CRD schema's minimum).
pub const MIN_RETAINED_ROWS: u64 = 1000;

/// Whether a pipeline name has `-outbox` as a whole segment (also refused by the CRD's CEL
/// rule): such a name could render the Deployment name of another pipeline's worker.
pub fn has_reserved_segment(name: &str) -> bool {
    name.contains("-outbox-") || name.ends_with("-outbox")
}

/// The pipeline's stream name and cache key prefix: as given in the spec, otherwise derived
/// from namespace and name, so two teams' pipelines of the same name on a shared Redis never
/// share a stream (splitting each other's events) or a cache (serving each other's widgets).
pub fn tenant_names(wp: &WidgetPipeline) -> (String, String) {
    let name = wp.name_any();
    let scope = match wp.namespace() {
        Some(ns) if !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.clone(),
    };
    let stream = wp
        .spec
        .stream
        .name
        .clone()
        .unwrap_or_else(|| match wp.spec.redis.mode {
            RedisModeSpec::Standalone => format!("{scope}.widget-events"),
            // The tag keeps the stream and the keys named after it in one cluster slot.
            RedisModeSpec::Cluster => format!("{{{scope}}}.widget-events"),
        });
    let prefix = wp
        .spec
        .cache
        .key_prefix
        .clone()
        .unwrap_or_else(|| format!("hw:{}:", scope.replace('.', ":")));
    (stream, prefix)
}

/// The runtime's config for this pipeline, validated by the runtime's own rules and the bounds
/// above (the operator's own, so a spec outside them is `InvalidSpec` whatever the runtime
/// version accepts).
pub fn runtime_config(wp: &WidgetPipeline) -> Result<Config> {
    let spec = &wp.spec;
    let duration = |field: &str, text: &str| {
        human_duration::parse(text).map_err(|e| Error::InvalidSpec(format!("{field}: {e}")))
    };
    let name = wp.name_any();
    if has_reserved_segment(&name) {
        return Err(Error::InvalidSpec(format!(
            "metadata.name `{name}` contains the segment `-outbox`, reserved for worker Deployments"
        )));
    }
    let (stream_name, key_prefix) = tenant_names(wp);
    let config = Config {
        pipeline: name,
        stream: StreamConfig {
            name: Some(stream_name),
            consumer_group: spec.stream.consumer_group.clone(),
            max_length: spec.stream.max_length,
        },
        cache: CacheConfig {
            key_prefix: Some(key_prefix),
            ingest_ttl: duration("cache.ingestTtl", &spec.cache.ingest_ttl)?,
            fallback_ttl: duration("cache.fallbackTtl", &spec.cache.fallback_ttl)?,
            warm_rate: spec.cache.warm_rate,
        },
        reclaim: ReclaimConfig {
            min_idle: duration("reclaim.minIdle", &spec.reclaim.min_idle)?,
            interval: duration("reclaim.interval", &spec.reclaim.interval)?,
            max_deliveries: spec.reclaim.max_deliveries,
            idle_consumer_ttl: duration(
                "reclaim.idleConsumerTtl",
                &spec.reclaim.idle_consumer_ttl,
            )?,
        },
        sources: spec
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let retention = duration(&format!("sources[{i}].retention"), &s.retention)?;
                if retention < MIN_RETENTION {
                    return Err(Error::InvalidSpec(format!(
                        "sources[{i}].retention: must be at least 1m (shorter would delete rows \
                         an ingester that merely restarts has not confirmed yet), got {}",
                        s.retention
                    )));
                }
                if s.max_retained_rows < MIN_RETAINED_ROWS {
                    return Err(Error::InvalidSpec(format!(
                        "sources[{i}].maxRetainedRows: must be at least {MIN_RETAINED_ROWS}, got {}",
                        s.max_retained_rows
                    )));
                }
                Ok(SourceConfig {
                    name: s.name.clone(),
                    outbox_table: s.outbox_table.clone(),
                    batch_size: s.batch_size,
                    poll_interval: duration(
                        &format!("sources[{i}].pollInterval"),
                        &s.poll_interval,
                    )?,
                    retention,
                    max_retained_rows: s.max_retained_rows,
                })
            })
            .collect::<Result<_>>()?,
        screens: spec
            .screens
            .iter()
            .map(|s| ScreenConfig {
                name: s.name.clone(),
                widgets: s.widgets.clone(),
            })
            .collect(),
        database: DatabaseConfig {
            connect_timeout: duration(
                "timeouts.database.connectTimeout",
                &spec.timeouts.database.connect_timeout,
            )?,
            statement_timeout: duration(
                "timeouts.database.statementTimeout",
                &spec.timeouts.database.statement_timeout,
            )?,
            idle_in_transaction_timeout: duration(
                "timeouts.database.idleInTransactionTimeout",
                &spec.timeouts.database.idle_in_transaction_timeout,
            )?,
            idle_timeout: duration(
                "timeouts.database.idleTimeout",
                &spec.timeouts.database.idle_timeout,
            )?,
            keepalive: duration("timeouts.database.keepalive", &spec.timeouts.database.keepalive)?,
        },
        redis: RedisConfig {
            mode: match spec.redis.mode {
                RedisModeSpec::Standalone => RedisMode::Standalone,
                RedisModeSpec::Cluster => RedisMode::Cluster,
            },
            connect_timeout: duration(
                "timeouts.redis.connectTimeout",
                &spec.timeouts.redis.connect_timeout,
            )?,
            response_timeout: duration(
                "timeouts.redis.responseTimeout",
                &spec.timeouts.redis.response_timeout,
            )?,
            keepalive: duration("timeouts.redis.keepalive", &spec.timeouts.redis.keepalive)?,
        },
        http: HttpConfig {
            header_timeout: duration("coreApi.http.headerTimeout", &spec.core_api.http.header_timeout)?,
            request_timeout: duration(
                "coreApi.http.requestTimeout",
                &spec.core_api.http.request_timeout,
            )?,
            write_timeout: duration("coreApi.http.writeTimeout", &spec.core_api.http.write_timeout)?,
            max_connections: spec.core_api.http.max_connections as usize,
            max_requests: spec.core_api.http.max_requests as usize,
        },
        identity: match &spec.core_api.identity {
            None => None,
            Some(id) => Some(IdentityConfig {
                mode: match id.mode {
                    IdentityModeSpec::Jwt => IdentityMode::Jwt,
                    IdentityModeSpec::Header => IdentityMode::Header,
                    IdentityModeSpec::Query => IdentityMode::Query,
                },
                header: id.header.clone(),
                jwt: match &id.jwt {
                    None => None,
                    // The keys reach the pod as IDENTITY_JWT_KEYS from the Secret (see render).
                    Some(j) => Some(JwtConfig {
                        issuer: j.issuer.clone(),
                        audience: j.audience.clone(),
                        user_claim: j.user_claim.clone().unwrap_or_else(|| "sub".into()),
                        algorithms: if j.algorithms.is_empty() {
                            vec!["RS256".into(), "ES256".into()]
                        } else {
                            j.algorithms.clone()
                        },
                        key_file: None,
                        leeway: match &j.leeway {
                            Some(l) => duration("coreApi.identity.jwt.leeway", l)?,
                            None => Duration::from_secs(30),
                        },
                    }),
                },
            }),
        },
        local_cache: LocalCacheConfig {
            enabled: spec.core_api.local_cache.enabled,
            max_bytes: spec.core_api.local_cache.max_bytes,
        },
    };
    config
        .validate()
        .map_err(|e| Error::InvalidSpec(e.to_string()))?;
    Ok(config)
}

fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// Hash of the resource versions of `names` (a missing Secret hashes as missing, so its
/// creation rolls the pods).
fn secrets_hash(versions: &SecretVersions, refs: &[&SecretKeyRef]) -> String {
    let mut names: Vec<&str> = refs.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let text: Vec<String> = names
        .iter()
        .map(|n| {
            format!(
                "{n}={}",
                versions.get(*n).map_or("<missing>", String::as_str)
            )
        })
        .collect();
    short_hash(text.join("\n").as_bytes())
}

/// Hash of a rendered object, stored on it as [`ANNOTATION_RENDER_HASH`].
pub fn object_hash<T: serde::Serialize>(obj: &T) -> Result<String> {
    let bytes = serde_json::to_vec(obj).map_err(|e| Error::Serialize {
        what: "rendered object",
        message: e.to_string(),
    })?;
    Ok(short_hash(&bytes))
}

fn stamp<T: Resource + serde::Serialize>(mut obj: T) -> Result<T> {
    let hash = object_hash(&obj)?;
    obj.meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_RENDER_HASH.into(), hash);
    Ok(obj)
}

struct Ctx<'a> {
    wp: &'a WidgetPipeline,
    name: String,
    namespace: String,
    owner: OwnerReference,
    config_hash: String,
}

impl Ctx<'_> {
    fn selector(&self, component: &str, source: Option<&str>) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            (LABEL_PIPELINE.to_string(), self.name.clone()),
            (LABEL_COMPONENT.to_string(), component.to_string()),
        ]);
        if let Some(source) = source {
            labels.insert(LABEL_SOURCE.into(), source.into());
        }
        labels
    }

    fn labels(&self, component: &str, source: Option<&str>) -> BTreeMap<String, String> {
        let mut labels = self.selector(component, source);
        labels.insert(LABEL_NAME.into(), "widget-runtime".into());
        labels.insert(LABEL_INSTANCE.into(), self.name.clone());
        labels.insert(LABEL_MANAGED_BY.into(), crate::FIELD_MANAGER.into());
        labels
    }

    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

fn secret_env(name: &str, secret: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, port: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port.into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

struct PodParts {
    component: &'static str,
    source: Option<String>,
    args: Vec<String>,
    env: Vec<EnvVar>,
    /// Named container ports; the probes use `admin`.
    ports: Vec<(&'static str, i32)>,
    secrets: Vec<SecretKeyRef>,
    replicas: Option<i32>,
    resources: Option<ResourceRequirements>,
}

fn deployment(
    ctx: &Ctx<'_>,
    name: String,
    parts: PodParts,
    versions: &SecretVersions,
) -> Result<Deployment> {
    let source = parts.source.as_deref();
    let labels = ctx.labels(parts.component, source);
    let refs: Vec<&SecretKeyRef> = parts.secrets.iter().collect();
    let annotations = BTreeMap::from([
        (ANNOTATION_CONFIG_HASH.to_string(), ctx.config_hash.clone()),
        (
            ANNOTATION_SECRETS_HASH.to_string(),
            secrets_hash(versions, &refs),
        ),
    ]);
    let mut args = vec![
        parts.component.to_string(),
        "--config".into(),
        format!("{CONFIG_DIR}/{CONFIG_KEY}"),
    ];
    args.extend(parts.args);
    args.extend(["--log-format".into(), "json".into()]);
    let container = Container {
        name: parts.component.into(),
        image: Some(ctx.wp.spec.image.clone()),
        command: Some(vec!["widget-runtime".into()]),
        args: Some(args),
        env: Some(parts.env),
        ports: Some(
            parts
                .ports
                .iter()
                .map(|(port_name, port)| ContainerPort {
                    name: Some((*port_name).into()),
                    container_port: *port,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                })
                .collect(),
        ),
        liveness_probe: Some(http_probe("/healthz", "admin", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", "admin", 5, 2)),
        resources: parts.resources,
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".into(),
                mount_path: CONFIG_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(30),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS),
            run_as_group: Some(RUN_AS),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        volumes: Some(vec![
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: config_map_name(&ctx.name),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "tmp".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    stamp(Deployment {
        metadata: ctx.meta(name, labels.clone()),
        spec: DeploymentSpec {
            replicas: parts.replicas,
            revision_history_limit: Some(3),
            selector: LabelSelector {
                match_labels: Some(ctx.selector(parts.component, source)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    })
}

/// Renders every child of `wp`. Fails only for an invalid spec or an object without the
/// metadata a stored object always has (namespace, uid).
pub fn render(wp: &WidgetPipeline, secrets: &SecretVersions) -> Result<Rendered> {
    let name = wp.name_any();
    let namespace = wp
        .namespace()
        .ok_or_else(|| Error::InvalidObject("WidgetPipeline has no namespace".into()))?;
    let owner = wp
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidObject("WidgetPipeline has no uid".into()))?;
    let config = runtime_config(wp)?;
    let config_yaml = serde_yaml::to_string(&config).map_err(|e| Error::Serialize {
        what: "runtime config",
        message: e.to_string(),
    })?;
    let config_hash = short_hash(config_yaml.as_bytes());
    let ctx = Ctx {
        wp,
        name: name.clone(),
        namespace,
        owner,
        config_hash: config_hash.clone(),
    };
    let spec = &wp.spec;

    let config_map = stamp(ConfigMap {
        metadata: ctx.meta(config_map_name(&name), ctx.labels("config", None)),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), config_yaml)])),
        ..ConfigMap::default()
    })?;

    let redis = &spec.redis.url_secret_ref;
    let core_db = &spec.core_database.url_secret_ref;
    // Every component verifies the Redis server with the same CA, whichever user it logs in as.
    let redis_ca = spec.redis.ca_secret_ref.as_ref();
    let with_ca = |env: &mut Vec<EnvVar>, secrets: &mut Vec<SecretKeyRef>| {
        if let Some(ca) = redis_ca {
            env.push(secret_env(widget_runtime::connect::REDIS_CA_PEM_ENV, ca));
            secrets.push(ca.clone());
        }
    };
    let admin = vec![
        "--admin-listen".to_string(),
        format!("0.0.0.0:{ADMIN_PORT}"),
    ];

    let mut deployments = Vec::with_capacity(spec.sources.len() + 2);
    for source in &spec.sources {
        let db = &source.database.url_secret_ref;
        let redis = source.redis.as_ref().map_or(redis, |c| &c.url_secret_ref);
        let mut args = vec!["--source".to_string(), source.name.clone()];
        args.extend(admin.clone());
        let mut env = vec![
            secret_env("REDIS_URL", redis),
            secret_env("SOURCE_DATABASE_URL", db),
        ];
        let mut refs = vec![redis.clone(), db.clone()];
        with_ca(&mut env, &mut refs);
        deployments.push(deployment(
            &ctx,
            worker_name(&name, &source.name),
            PodParts {
                component: COMPONENT_WORKER,
                source: Some(source.name.clone()),
                args,
                env,
                ports: vec![("admin", ADMIN_PORT)],
                secrets: refs,
                replicas: source.replicas,
                resources: source.resources.clone(),
            },
            secrets,
        )?);
    }

    let pod_name = EnvVar {
        name: "POD_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let ingester_redis = spec
        .ingester
        .redis
        .as_ref()
        .map_or(redis, |c| &c.url_secret_ref);
    let mut args = vec!["--consumer".to_string(), "$(POD_NAME)".into()];
    args.extend(admin.clone());
    // POD_NAME first: `$(POD_NAME)` expands only variables defined before use.
    let mut env = vec![
        pod_name,
        secret_env("REDIS_URL", ingester_redis),
        secret_env("CORE_DATABASE_URL", core_db),
    ];
    let mut refs = vec![ingester_redis.clone(), core_db.clone()];
    with_ca(&mut env, &mut refs);
    deployments.push(deployment(
        &ctx,
        ingester_name(&name),
        PodParts {
            component: COMPONENT_INGESTER,
            source: None,
            args,
            env,
            ports: vec![("admin", ADMIN_PORT)],
            secrets: refs,
            replicas: spec.ingester.replicas,
            resources: spec.ingester.resources.clone(),
        },
        secrets,
    )?);

    let api_redis = spec
        .core_api
        .redis
        .as_ref()
        .map_or(redis, |c| &c.url_secret_ref);
    let mut api_env = vec![
        secret_env("REDIS_URL", api_redis),
        secret_env("CORE_DATABASE_URL", core_db),
    ];
    let mut api_secrets = vec![api_redis.clone(), core_db.clone()];
    with_ca(&mut api_env, &mut api_secrets);
    for (var, read) in [
        ("CORE_DATABASE_READ_URL", &spec.core_api.database_read),
        ("REDIS_READ_URL", &spec.core_api.redis_read),
    ] {
        if let Some(read) = read {
            api_env.push(secret_env(var, &read.url_secret_ref));
            api_secrets.push(read.url_secret_ref.clone());
        }
    }
    if let Some(keys) = spec
        .core_api
        .identity
        .as_ref()
        .and_then(|i| i.jwt.as_ref())
        .map(|j| &j.keys_secret_ref)
    {
        api_env.push(secret_env(widget_runtime::api::identity::KEYS_ENV, keys));
        api_secrets.push(keys.clone());
    }
    deployments.push(deployment(
        &ctx,
        api_name(&name),
        PodParts {
            component: COMPONENT_API,
            source: None,
            args: [
                vec!["--listen".to_string(), format!("0.0.0.0:{HTTP_PORT}")],
                admin.clone(),
            ]
            .concat(),
            env: api_env,
            ports: vec![("http", HTTP_PORT), ("admin", ADMIN_PORT)],
            secrets: api_secrets,
            replicas: spec.core_api.replicas,
            resources: spec.core_api.resources.clone(),
        },
        secrets,
    )?);

    let service = stamp(Service {
        metadata: ctx.meta(api_name(&name), ctx.labels(COMPONENT_API, None)),
        spec: Some(ServiceSpec {
            selector: Some(ctx.selector(COMPONENT_API, None)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    })?;

    Ok(Rendered {
        config,
        config_hash,
        config_map,
        deployments,
        service,
    })
}
