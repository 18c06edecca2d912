//! The WidgetPipeline controller.
//!
//! reconcile = read + validate -> render (pure) -> server-side apply of what differs -> prune the
//! Deployments of removed sources -> probe Redis (and the problems its figures show) -> status
//! (patched only when it changed).
//! Live figures refresh by requeueing every [`Context::refresh`]; the primary watch passes only
//! generation changes, so the operator's own status writes never trigger a reconcile.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use widget_crds::{WidgetPipeline, WidgetPipelineStatus, condition};

use crate::metrics::Metrics;
use crate::render::{self, LABEL_PIPELINE, SecretVersions};
use crate::status::{self, Observed, Problems};
use crate::{Error, FIELD_MANAGER, Result, probe, quantity, tenancy};

/// Default period of the live refresh.
pub const REFRESH: Duration = Duration::from_secs(15);
const BACKOFF_BASE: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

type Guarded = DeserializeGuard<WidgetPipeline>;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object (`namespace/name`), for `error_policy` backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    pub refresh: Duration,
    /// Image prefixes a pipeline may run (`--allowed-images`); empty: any image.
    pub allowed_images: Vec<String>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance,
            },
        );
        Self {
            client,
            recorder,
            metrics,
            failures: Mutex::new(HashMap::new()),
            refresh: REFRESH,
            allowed_images: Vec::new(),
        }
    }

    /// Only images starting with one of `prefixes` may run (e.g. `ghcr.io/example/widget-runtime:`).
    pub fn with_allowed_images(mut self, prefixes: Vec<String>) -> Self {
        self.allowed_images = prefixes.into_iter().filter(|p| !p.is_empty()).collect();
        self
    }

    /// Whether `image` may run.
    pub fn image_allowed(&self, image: &str) -> bool {
        self.allowed_images.is_empty()
            || self
                .allowed_images
                .iter()
                .any(|p| image.starts_with(p.as_str()))
    }

    async fn event(
        &self,
        wp: &impl Resource<DynamicType = ()>,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &wp.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish event");
        }
    }
}

fn key<K: Resource>(obj: &K) -> String {
    format!(
        "{}/{}",
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

/// The reconciler the Controller runs: reconcile, then record metrics, backoff state and a
/// Warning event for a failure.
pub async fn reconcile(obj: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = match &obj.0 {
        Ok(wp) => reconcile_pipeline(wp, &ctx).await,
        Err(invalid) => Err(Error::InvalidObject(invalid.error.clone())),
    };
    ctx.metrics
        .observe(started.elapsed(), result.as_ref().err().map(Error::reason));
    match &result {
        Ok(_) => {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(&key(&*obj));
            }
        }
        Err(e) => {
            tracing::warn!(object = %key(&*obj), reason = e.reason(), error = %e, "reconcile failed");
            ctx.event(&*obj, EventType::Warning, e.reason(), e.to_string())
                .await;
        }
    }
    result
}

/// Per-object exponential backoff (5 s doubling to 5 min); an invalid object waits for a change.
pub fn error_policy(obj: Arc<Guarded>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_permanent() {
        return Action::await_change();
    }
    let failures = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(key(&*obj)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    Action::requeue(backoff(failures))
}

/// Delay after the `failures`-th consecutive failure.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << exp).min(BACKOFF_MAX)
}

/// Whether every field of `desired` is present with the same value in `live` (lists compare
/// element by element and must have the same length). Fields the apiserver defaulted or other
/// managers added are ignored; quantities under `resources` compare by value, because the
/// apiserver rewrites them in canonical form.
pub fn is_subset(desired: &Value, live: &Value) -> bool {
    subset(desired, live, false)
}

fn subset(desired: &Value, live: &Value, quantities: bool) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, v)| {
            l.get(k)
                .is_some_and(|lv| subset(v, lv, quantities || k == "resources"))
        }),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(a, b)| subset(a, b, quantities))
        }
        (Value::String(d), Value::String(l)) if quantities => quantity::same(d, l),
        (d, l) => d == l,
    }
}

fn needs_apply<T: Serialize>(desired: &T, live: Option<&T>) -> Result<bool> {
    let Some(live) = live else { return Ok(true) };
    let ser = |v: &T| {
        serde_json::to_value(v).map_err(|e| Error::Serialize {
            what: "child object",
            message: e.to_string(),
        })
    };
    Ok(!is_subset(&ser(desired)?, &ser(live)?))
}

fn owned_by<K: Resource>(obj: &K, wp: &WidgetPipeline) -> bool {
    let uid = wp.meta().uid.as_deref();
    obj.meta().owner_references.as_ref().is_some_and(|refs| {
        refs.iter()
            .any(|r| Some(r.uid.as_str()) == uid && r.controller == Some(true))
    })
}

/// Children of `wp` of one kind: labelled with the pipeline and controlled by it.
async fn children<K>(api: &Api<K>, wp: &WidgetPipeline) -> Result<Vec<K>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let lp = ListParams::default().labels(&format!("{LABEL_PIPELINE}={}", wp.name_any()));
    Ok(api
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|o| owned_by(o, wp))
        .collect())
}

/// Applies `desired` when it differs from `live` (this pipeline's child of that name, if any);
/// returns the object as the server has it. An object of that name that belongs to someone
/// else (another pipeline, or nobody) is left alone and reported as `NameConflict`: forcing it
/// would take it over, and a failing apply must not stop the rest of the pipeline.
async fn apply<K>(
    api: &Api<K>,
    desired: &K,
    live: Option<&K>,
    ctx: &Context,
    applied: &mut Vec<String>,
    problems: &mut Problems,
) -> Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    if let Some(live) = live.filter(|_| !needs_apply(desired, live).unwrap_or(true)) {
        return Ok(Some(live.clone()));
    }
    let name = desired.meta().name.clone().unwrap_or_default();
    if live.is_none()
        && let Some(existing) = api.get_opt(&name).await?
        && !desired
            .meta()
            .owner_references
            .iter()
            .flatten()
            .any(|want| {
                existing
                    .meta()
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|r| r.uid == want.uid && r.controller == Some(true))
            })
    {
        problems.push(
            "NameConflict",
            format!(
                "{} {name} exists and belongs to someone else; it is left alone",
                K::kind(&())
            ),
        );
        return Ok(None);
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let obj = api.patch(&name, &pp, &Patch::Apply(desired)).await?;
    ctx.metrics.applies.inc();
    applied.push(name);
    Ok(Some(obj))
}

struct SecretReadings {
    versions: SecretVersions,
    redis_url: Option<String>,
    redis_ca: Option<Vec<u8>>,
}

/// Reads the referenced Secrets: resource versions for the pod hashes, the Redis URL for the
/// probe, and a problem for each Secret or key that is missing.
async fn read_secrets(
    wp: &WidgetPipeline,
    api: &Api<Secret>,
    problems: &mut Problems,
) -> Result<SecretReadings> {
    let refs = wp.secret_refs();
    let names: BTreeSet<&str> = refs.iter().map(|r| r.name.as_str()).collect();
    let mut found: HashMap<&str, Secret> = HashMap::new();
    let mut missing = Vec::new();
    for name in names {
        match api.get_opt(name).await? {
            Some(secret) => {
                found.insert(name, secret);
            }
            None => missing.push(name),
        }
    }
    if !missing.is_empty() {
        problems.push(
            "SecretNotFound",
            format!("Secret {} not found", missing.join(", ")),
        );
    }
    let value = |name: &str, key: &str| -> Option<&ByteString> {
        found
            .get(name)
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(key))
    };
    let mut missing_keys: Vec<String> = refs
        .iter()
        .filter(|r| found.contains_key(r.name.as_str()) && value(&r.name, &r.key).is_none())
        .map(|r| format!("{}/{}", r.name, r.key))
        .collect();
    missing_keys.dedup();
    if !missing_keys.is_empty() {
        problems.push(
            "SecretKeyNotFound",
            format!("Secret key {} not found", missing_keys.join(", ")),
        );
    }
    let redis = &wp.spec.redis.url_secret_ref;
    let redis_url =
        value(&redis.name, &redis.key).and_then(|b| String::from_utf8(b.0.clone()).ok());
    let redis_ca = wp
        .spec
        .redis
        .ca_secret_ref
        .as_ref()
        .and_then(|r| value(&r.name, &r.key))
        .map(|b| b.0.clone());
    let versions = found
        .iter()
        .map(|(name, s)| (name.to_string(), s.resource_version().unwrap_or_default()))
        .collect();
    Ok(SecretReadings {
        versions,
        redis_url,
        redis_ca,
    })
}

async fn reconcile_pipeline(wp: &WidgetPipeline, ctx: &Context) -> Result<Action> {
    if wp.meta().deletion_timestamp.is_some() {
        // Owner references let the garbage collector delete the children.
        return Ok(Action::await_change());
    }
    let ns = wp
        .namespace()
        .ok_or_else(|| Error::InvalidObject("WidgetPipeline has no namespace".into()))?;
    let client = ctx.client.clone();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let mut problems = Problems::default();

    match render::runtime_config(wp) {
        Ok(_) => {}
        Err(e @ Error::InvalidSpec(_)) => {
            // Report it in status, then wait for the user to change the object.
            problems.push("InvalidSpec", e.to_string());
            let live = children(&deployments, wp).await?;
            write_status(wp, ctx, &problems, &[], &live, None, None, false).await?;
            return Err(e);
        }
        Err(e) => return Err(e),
    }

    // Whoever may create a pipeline runs its image with the namespace's Secrets; an allow-list
    // keeps that to the images the platform team publishes.
    if !ctx.image_allowed(&wp.spec.image) {
        problems.push(
            "ImageNotAllowed",
            format!(
                "image `{}` is not allowed by this operator (--allowed-images); nothing is applied",
                wp.spec.image
            ),
        );
        let live = children(&deployments, wp).await?;
        write_status(wp, ctx, &problems, &[], &live, None, None, true).await?;
        return Ok(Action::await_change());
    }

    let secrets = read_secrets(wp, &Api::namespaced(client.clone(), &ns), &mut problems).await?;
    let rendered = render::render(wp, &secrets.versions)?;
    // One connection for the claim and the probe.
    let mut redis = match &secrets.redis_url {
        Some(url) => {
            Some(probe::connect(url, secrets.redis_ca.as_deref(), rendered.config.redis.mode).await)
        }
        None => None,
    };
    let names = match &mut redis {
        Some(Ok(con)) => claim_names(wp, &ns, con, &rendered.config, ctx).await,
        Some(Err(e)) => Names::Unclaimed(e.reason),
        // No Redis URL yet (its Secret is missing): the pods cannot start without it, so the
        // children are applied as before and the names are claimed once the URL is readable.
        None => Names::Ours,
    };
    // Unclaimed: nothing new is applied (the names may be another pipeline's) and nothing is
    // pruned; the claim is tried again on the next reconcile.
    let (conflict, hold) = match &names {
        Names::Ours => (None, false),
        Names::Conflict(message) => {
            problems.push("Conflict", message.clone());
            (Some(message.clone()), true)
        }
        // Reported after the probe: when Redis is unreachable, that is the cause to show.
        Names::Unclaimed(_) => (None, true),
    };
    // A pipeline refused for a conflict runs nothing: its workers would write into another
    // pipeline's stream, its API serve another pipeline's cache.
    let expected: Vec<String> = match conflict {
        Some(_) => Vec::new(),
        None => rendered.deployments.iter().map(|d| d.name_any()).collect(),
    };

    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let existing = children(&deployments, wp).await?;
    let mut live_deployments = existing.clone();

    let mut applied = Vec::new();
    if !wp.spec.paused && !hold {
        let live_cms = children(&config_maps, wp).await?;
        let live_svcs = children(&services, wp).await?;
        let find =
            |list: &[ConfigMap], name: &str| list.iter().find(|o| o.name_any() == name).cloned();
        let live_cm = find(&live_cms, &rendered.config_map.name_any());
        let config_applied = apply(
            &config_maps,
            &rendered.config_map,
            live_cm.as_ref(),
            ctx,
            &mut applied,
            &mut problems,
        )
        .await?
        .is_some();
        let mut after = Vec::with_capacity(rendered.deployments.len());
        // Pods must never mount a config someone else wrote under the pipeline's name.
        let deployments_to_apply = if config_applied {
            rendered.deployments.as_slice()
        } else {
            after.extend(live_deployments.iter().cloned());
            &[]
        };
        for desired in deployments_to_apply {
            let live = live_deployments
                .iter()
                .find(|d| d.name_any() == desired.name_any());
            let applied_one = apply(
                &deployments,
                desired,
                live,
                ctx,
                &mut applied,
                &mut problems,
            )
            .await?;
            after.extend(applied_one);
        }
        let live_svc = live_svcs
            .iter()
            .find(|s| s.name_any() == rendered.service.name_any());
        apply(
            &services,
            &rendered.service,
            live_svc,
            ctx,
            &mut applied,
            &mut problems,
        )
        .await?;
        live_deployments = after;
    }

    if !wp.spec.paused && !matches!(names, Names::Unclaimed(_)) {
        let mut pruned = Vec::new();
        for stale in existing
            .iter()
            .filter(|d| !expected.contains(&d.name_any()))
        {
            let name = stale.name_any();
            match deployments.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            ctx.metrics.prunes.inc();
            pruned.push(name);
        }
        if !applied.is_empty() {
            tracing::info!(pipeline = %key(wp), ?applied, "applied");
            ctx.event(
                wp,
                EventType::Normal,
                "Applied",
                format!("applied {}", applied.join(", ")),
            )
            .await;
        }
        if !pruned.is_empty() {
            tracing::info!(pipeline = %key(wp), ?pruned, "pruned");
            ctx.event(
                wp,
                EventType::Normal,
                "Pruned",
                match conflict {
                    Some(_) => format!("deleted {} (Conflict: see the status)", pruned.join(", ")),
                    None => format!("deleted {} (source removed)", pruned.join(", ")),
                },
            )
            .await;
        }
        live_deployments.retain(|d| expected.contains(&d.name_any()));
    }

    let probed = match redis {
        // A conflicting pipeline's stream and stats are another pipeline's figures.
        Some(_) if conflict.is_some() => None,
        Some(Ok(mut con)) => Some(probe::read(&mut con, &rendered.config).await),
        Some(Err(e)) => Some(Err(e)),
        None => None,
    };
    let live = match probed {
        Some(Ok(live)) => {
            status::live_problems(&live, &mut problems);
            Some(live)
        }
        Some(Err(e)) => {
            tracing::warn!(pipeline = %key(wp), error = %e.detail, "probe failed");
            problems.push(
                "RedisUnreachable",
                format!("cannot read stats from Redis: {e}"),
            );
            None
        }
        None => None,
    };
    if let Names::Unclaimed(why) = names {
        problems.push(
            "NamesUnclaimed",
            format!(
                "cannot claim the stream and cache prefix on Redis ({why}); nothing new is applied"
            ),
        );
    }
    write_status(
        wp,
        ctx,
        &problems,
        &expected,
        &live_deployments,
        Some(rendered.config_hash),
        live,
        true,
    )
    .await?;
    Ok(Action::requeue(ctx.refresh))
}

/// What the claim of a pipeline's names found.
enum Names {
    Ours,
    /// Another live pipeline (or something else) holds one: the message says which.
    Conflict(String),
    /// The claim could not be made (Redis unreachable, or the user may not run it).
    Unclaimed(&'static str),
}

/// Claims the pipeline's stream and cache prefix on its Redis ([`tenancy`]). A claim held by a
/// pipeline that is gone (deleted, or re-created with a new uid) is taken over, that claim
/// only: each key is checked the same way, so a dead pipeline's stream never carries a live
/// pipeline's prefix with it.
async fn claim_names(
    wp: &WidgetPipeline,
    ns: &str,
    con: &mut widget_runtime::connect::Conn,
    config: &widget_runtime::config::Config,
    ctx: &Context,
) -> Names {
    let owner = tenancy::Owner {
        namespace: ns.to_string(),
        name: wp.name_any(),
        uid: wp.uid().unwrap_or_default(),
    };
    let mut stale: Option<tenancy::Owner> = None;
    // One round per claimed key at most (a stream and a prefix), and one to write.
    for _ in 0..3 {
        let (held, by) = match tenancy::claim(con, config, &owner, stale.as_ref()).await {
            Ok(tenancy::Claim::Ours) => {
                if let Some(previous) = &stale {
                    tracing::info!(pipeline = %key(wp), %previous, "took over names of a pipeline that is gone");
                }
                return Names::Ours;
            }
            Ok(tenancy::Claim::Taken { key, by }) => (key, by),
            Err(e) => {
                tracing::warn!(pipeline = %key(wp), error = %e.detail, "claiming the pipeline's names failed");
                return Names::Unclaimed(e.reason);
            }
        };
        if by.namespace.is_empty() {
            return Names::Conflict(format!(
                "`{held}` on this pipeline's Redis is held by something other than a pipeline: \
                 set a distinct stream.name and cache.keyPrefix"
            ));
        }
        let api: Api<WidgetPipeline> = Api::namespaced(ctx.client.clone(), &by.namespace);
        let alive = match api.get_opt(&by.name).await {
            Ok(Some(other)) => other.uid().as_deref() == Some(by.uid.as_str()),
            Ok(None) => false,
            // Not allowed to look (a namespaced install) or not answered: assume it lives.
            Err(_) => true,
        };
        if alive {
            return Names::Conflict(format!(
                "`{held}` on this pipeline's Redis is held by pipeline {by}: set a distinct \
                 stream.name and cache.keyPrefix (the defaults are unique per namespace and name)"
            ));
        }
        stale = Some(by);
    }
    Names::Unclaimed("claims keep changing")
}

/// Builds the status and patches it (server-side apply on the status subresource) when it
/// changed; with `warn`, a newly Degraded pipeline also gets a Warning event (a failing
/// reconcile gets its Warning event from [`reconcile`]).
#[allow(clippy::too_many_arguments)]
async fn write_status(
    wp: &WidgetPipeline,
    ctx: &Context,
    problems: &Problems,
    expected: &[String],
    deployments: &[Deployment],
    config_hash: Option<String>,
    live: Option<widget_crds::LiveStatus>,
    warn: bool,
) -> Result<()> {
    let now = Timestamp::now();
    let previous = wp.status.as_ref();
    let observed = Observed {
        generation: wp.meta().generation,
        paused: wp.spec.paused,
        sources: i32::try_from(wp.spec.sources.len()).unwrap_or(i32::MAX),
        expected,
        deployments,
        problems,
        config_hash,
        live,
        now,
    };
    let new: WidgetPipelineStatus = status::build(&observed, previous);
    if !status::needs_patch(previous, &new, now) {
        return Ok(());
    }
    let api: Api<WidgetPipeline> =
        Api::namespaced(ctx.client.clone(), &wp.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": WidgetPipeline::api_version(&()),
        "kind": WidgetPipeline::kind(&()),
        "status": new,
    });
    api.patch_status(
        &wp.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    ctx.metrics.status_patches.inc();
    if let Some((reason, message)) = problems.first().filter(|_| warn) {
        let was = wp
            .condition(condition::DEGRADED)
            .is_some_and(|c| c.status == "True" && c.reason == *reason);
        if !was {
            ctx.event(wp, EventType::Warning, reason, message.clone())
                .await;
        }
    }
    Ok(())
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `shutdown` completes (then finishes in-flight reconciles).
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let pipelines: Api<Guarded> = scoped(&client, ns);
    let (reader, writer) = reflector::store();
    let primary = watcher(pipelines, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let owned =
        watcher::Config::default().labels(&format!("{}={FIELD_MANAGER}", render::LABEL_MANAGED_BY));
    Controller::for_stream(primary, reader)
        .owns(scoped::<Deployment>(&client, ns), owned.clone())
        .owns(scoped::<ConfigMap>(&client, ns), owned.clone())
        .owns(scoped::<Service>(&client, ns), owned)
        // Secrets are not watched: that would need `list` and `watch` on every Secret in the
        // cluster (RBAC cannot limit them to a metadata view). Each periodic reconcile `get`s
        // the referenced Secrets instead, so a rotation rolls the pods within `refresh` (15 s).
        .with_config(
            controller::Config::default()
                .concurrency(8)
                .debounce(Duration::from_millis(500)),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "controller event"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let delays: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
