//! Reconcile against kube's mocked API service (the controller-rs fixtures approach): a scripted
//! apiserver asserts every request's method and path, in order, answers it, and fails the test
//! on any request the script does not expect. Redis is real (testkit) or a closed port.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::client::Body;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use testkit::RedisServer;
use widget_crds::{WidgetPipeline, WidgetPipelineStatus};
use widget_operator::Error;
use widget_operator::controller::{self, Context};
use widget_operator::metrics::Metrics;

const SAMPLE: &str = include_str!("../../manifests/samples/widgetpipeline.yaml");
const UID: &str = "6f1c1d1e-0000-4000-8000-000000000001";
const NS_PATH: &str = "/api/v1/namespaces/widgets";
const APPS_PATH: &str = "/apis/apps/v1/namespaces/widgets";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/widgets/events";
const STATUS: &str = "/apis/homewidgets.io/v1alpha1/namespaces/widgets/widgetpipelines/home/status";

fn pipeline() -> WidgetPipeline {
    let mut wp: WidgetPipeline = serde_yaml::from_str(SAMPLE).expect("sample parses");
    wp.metadata.uid = Some(UID.into());
    wp.metadata.generation = Some(1);
    wp.metadata.resource_version = Some("10".into());
    wp
}

/// One expected request and the answer to it.
struct Step {
    method: Method,
    /// The path must equal this; the query must contain every `&`-separated part of `query`.
    path: String,
    query: &'static str,
    reply: Reply,
}

enum Reply {
    Json(Value),
    /// Answer with the request body (what an apply returns for an unchanged object).
    Echo,
    /// Answer with the request body merged into this object (status patches).
    EchoInto(Value),
    NotFound,
    /// An apiserver error with this HTTP status.
    Failure(u16, &'static str),
}

fn step(method: Method, path: impl Into<String>, query: &'static str, reply: Reply) -> Step {
    Step {
        method,
        path: path.into(),
        query,
        reply,
    }
}

/// A request as the mock apiserver saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Serves `script` in order, then asserts the client sends nothing else before it is dropped.
async fn serve(mut handle: Handle, script: Vec<Step>) -> Vec<Seen> {
    let mut seen = Vec::new();
    for (i, step) in script.into_iter().enumerate() {
        let next = tokio::time::timeout(Duration::from_secs(10), handle.next_request()).await;
        let (request, send) = match next {
            Ok(Some(r)) => r,
            Ok(None) => panic!(
                "step {i}: client finished, expected {} {}",
                step.method, step.path
            ),
            Err(_) => panic!(
                "step {i}: no request, expected {} {}",
                step.method, step.path
            ),
        };
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("request body is JSON")
        };
        assert_eq!(
            (&method, path.as_str()),
            (&step.method, step.path.as_str()),
            "step {i}: unexpected request (query {query})"
        );
        // Every request the operator makes must be one its RBAC grants.
        let (group, resource, verb) =
            widget_operator::rbac::request_verb(method.as_str(), &path, &query)
                .unwrap_or_else(|| panic!("step {i}: {method} {path} maps to no RBAC verb"));
        assert!(
            widget_operator::rbac::allows(&group, &resource, &verb),
            "step {i}: {verb} on {group}/{resource} is not in operator/src/rbac.rs"
        );
        for part in step.query.split('&').filter(|p| !p.is_empty()) {
            assert!(
                query.contains(part),
                "step {i}: {path}?{query} lacks {part}"
            );
        }
        let (status, reply) = match step.reply {
            Reply::Json(v) => (StatusCode::OK, v),
            Reply::Echo => (StatusCode::OK, body.clone()),
            Reply::EchoInto(mut base) => {
                merge(&mut base, &body);
                (StatusCode::OK, base)
            }
            Reply::Failure(code, reason) => (
                StatusCode::from_u16(code).expect("status code"),
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "reason": reason, "code": code, "message": reason}),
            ),
            Reply::NotFound => (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
            ),
        };
        let response = Response::builder()
            .status(status)
            .body(Body::from(
                serde_json::to_vec(&reply).expect("reply serializes"),
            ))
            .expect("response");
        send.send_response(response);
        seen.push(Seen {
            method,
            path,
            query,
            body,
        });
    }
    if let Ok(Some((request, _))) =
        tokio::time::timeout(Duration::from_secs(10), handle.next_request()).await
    {
        panic!(
            "unexpected extra request {} {}",
            request.method(),
            request.uri()
        );
    }
    seen
}

struct Run {
    result: Result<Action, Error>,
    seen: Vec<Seen>,
    metrics: Arc<Metrics>,
}

impl Run {
    /// The object applied at `path` in this run, as the API server would return it later.
    fn stored(&self, path: &str) -> Value {
        let s = self
            .seen
            .iter()
            .find(|s| s.method == Method::PATCH && s.path.ends_with(path))
            .unwrap_or_else(|| panic!("{path} was not applied"));
        as_stored(s.body.clone())
    }
}

async fn run(wp: WidgetPipeline, script: Vec<Step>) -> Run {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, script));
    let client = Client::new(service, "default");
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::new(client, metrics.clone(), Some("test".into())));
    let result = controller::reconcile(Arc::new(DeserializeGuard(Ok(wp))), ctx.clone()).await;
    drop(ctx);
    let seen = server
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    Run {
        result,
        seen,
        metrics,
    }
}

fn secret(name: &str, url: &str) -> Value {
    use base64_like::encode;
    json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": name, "namespace": "widgets", "resourceVersion": format!("rv-{name}")},
           "data": {"url": encode(url.as_bytes())}})
}

/// Minimal base64 so the test does not need another dependency.
mod base64_like {
    pub fn encode(bytes: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

fn list(kind: &str, api_version: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "50"}, "items": items})
}

fn secret_steps(redis_url: &str) -> Vec<Step> {
    vec![
        step(
            Method::GET,
            format!("{NS_PATH}/secrets/core-db"),
            "",
            Reply::Json(secret("core-db", "postgres://core")),
        ),
        step(
            Method::GET,
            format!("{NS_PATH}/secrets/deals-db"),
            "",
            Reply::Json(secret("deals-db", "postgres://deals")),
        ),
        step(
            Method::GET,
            format!("{NS_PATH}/secrets/redis"),
            "",
            Reply::Json(secret("redis", redis_url)),
        ),
    ]
}

const SELECTOR: &str = "labelSelector=homewidgets.io%2Fpipeline%3Dhome";

fn list_steps(deployments: Vec<Value>, config_maps: Vec<Value>, services: Vec<Value>) -> Vec<Step> {
    vec![
        deployments_step(deployments),
        step(
            Method::GET,
            format!("{NS_PATH}/configmaps"),
            SELECTOR,
            Reply::Json(list("ConfigMapList", "v1", config_maps)),
        ),
        step(
            Method::GET,
            format!("{NS_PATH}/services"),
            SELECTOR,
            Reply::Json(list("ServiceList", "v1", services)),
        ),
    ]
}

/// The list of the pipeline's Deployments (read for the status even when nothing is applied).
fn deployments_step(items: Vec<Value>) -> Step {
    step(
        Method::GET,
        format!("{APPS_PATH}/deployments"),
        SELECTOR,
        Reply::Json(list("DeploymentList", "apps/v1", items)),
    )
}

/// The deletion of one Deployment.
fn delete_step(name: &str) -> Step {
    step(
        Method::DELETE,
        format!("{APPS_PATH}/deployments/{name}"),
        "",
        Reply::Json(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        ),
    )
}

const APPLY: &str = "fieldManager=widget-operator&force=true";

/// The first apply of every child: each name is looked up first (an object of that name that
/// belongs to someone else is left alone), then applied.
fn apply_steps(sources: &[&str]) -> Vec<Step> {
    let mut paths = vec![format!("{NS_PATH}/configmaps/home-runtime-config")];
    for s in sources {
        paths.push(format!("{APPS_PATH}/deployments/home-outbox-{s}"));
    }
    paths.push(format!("{APPS_PATH}/deployments/home-ingester"));
    paths.push(format!("{APPS_PATH}/deployments/home-core-api"));
    paths.push(format!("{NS_PATH}/services/home-core-api"));
    paths
        .into_iter()
        .flat_map(|path| {
            [
                step(Method::GET, path.clone(), "", Reply::NotFound),
                step(Method::PATCH, path, APPLY, Reply::Echo),
            ]
        })
        .collect()
}

fn event_step() -> Step {
    step(Method::POST, EVENTS, "", Reply::Echo)
}

fn status_step(wp: &WidgetPipeline) -> Step {
    step(
        Method::PATCH,
        STATUS,
        APPLY,
        Reply::EchoInto(serde_json::to_value(wp).expect("pipeline serializes")),
    )
}

fn patched_status(seen: &[Seen]) -> WidgetPipelineStatus {
    let patch = seen
        .iter()
        .find(|s| s.path == STATUS)
        .expect("a status patch");
    assert_eq!(patch.body["apiVersion"], "homewidgets.io/v1alpha1");
    assert_eq!(patch.body["kind"], "WidgetPipeline");
    serde_json::from_value(patch.body["status"].clone()).expect("status body")
}

fn cond<'a>(status: &'a WidgetPipelineStatus, type_: &str) -> &'a Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"))
}

/// What the apiserver would return for an applied object: the body plus server fields and
/// defaults (which the no-change check must ignore).
fn as_stored(mut applied: Value) -> Value {
    merge(
        &mut applied,
        &json!({"metadata": {"uid": "child-uid", "resourceVersion": "77", "generation": 1,
                             "creationTimestamp": "2026-01-01T00:00:00Z",
                             "managedFields": [{"manager": "widget-operator", "operation": "Apply"}]}}),
    );
    if applied["kind"] == "Deployment" {
        merge(
            &mut applied,
            &json!({"spec": {"progressDeadlineSeconds": 600,
                             "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}}}),
        );
        if let Some(c) = applied.pointer_mut("/spec/template/spec/containers/0") {
            merge(
                c,
                &json!({"terminationMessagePath": "/dev/termination-log", "imagePullPolicy": "IfNotPresent"}),
            );
        }
    }
    applied
}

/// First pass against an empty namespace: returns the run and the applied bodies.
async fn first_pass(redis_url: &str) -> Run {
    let wp = pipeline();
    let mut script = secret_steps(redis_url);
    script.extend(list_steps(vec![], vec![], vec![]));
    script.extend(apply_steps(&["deals"]));
    script.push(event_step());
    script.push(status_step(&wp));
    run(wp, script).await
}

#[tokio::test]
async fn first_apply_creates_every_child_with_one_field_manager_and_writes_status() {
    let redis = RedisServer::start().await.expect("redis");
    let run = first_pass(&redis.url()).await;
    assert_eq!(
        run.result.expect("reconcile succeeds"),
        Action::requeue(Duration::from_secs(15))
    );

    let applied: Vec<&Seen> = run
        .seen
        .iter()
        .filter(|s| s.method == Method::PATCH && s.path != STATUS)
        .collect();
    assert_eq!(applied.len(), 5);
    for a in &applied {
        assert!(
            a.query.contains("fieldManager=widget-operator"),
            "{}",
            a.query
        );
        assert!(
            a.body["apiVersion"].is_string() && a.body["kind"].is_string(),
            "{}",
            a.path
        );
        assert_eq!(a.body["metadata"]["ownerReferences"][0]["uid"], UID);
    }
    let event = run
        .seen
        .iter()
        .find(|s| s.path == EVENTS)
        .expect("an event");
    assert_eq!(event.body["type"], "Normal");
    assert_eq!(event.body["reason"], "Applied");

    let status = patched_status(&run.seen);
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.sources, Some(1));
    let ready = cond(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RollingOut")
    );
    assert_eq!(ready.observed_generation, Some(1));
    assert_eq!(cond(&status, "Progressing").status, "True");
    let degraded = cond(&status, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("False", "AsExpected")
    );
    let names: Vec<&str> = status.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["home-outbox-deals", "home-ingester", "home-core-api"]
    );
    assert_eq!(status.components[1].desired_replicas, 2);
    let live = status.live.as_ref().expect("live figures from Redis");
    assert_eq!(
        (live.stream_length, live.pending, live.reclaimed),
        (0, 0, 0)
    );
    assert!(status.last_probe_time.is_some());
    assert!(status.config_hash.is_some());
    assert_eq!(run.metrics.applies.get(), 5);
    assert_eq!(run.metrics.status_patches.get(), 1);
}

#[tokio::test]
async fn second_pass_with_nothing_changed_writes_nothing() {
    let redis = RedisServer::start().await.expect("redis");
    let first = first_pass(&redis.url()).await;
    assert!(first.result.is_ok(), "first pass: {:?}", first.result);
    let stored = |path: &str| first.stored(path);
    let deployments = vec![
        stored("/deployments/home-outbox-deals"),
        stored("/deployments/home-ingester"),
        stored("/deployments/home-core-api"),
    ];
    let mut wp = pipeline();
    wp.status = Some(patched_status(&first.seen));

    let mut script = secret_steps(&redis.url());
    script.extend(list_steps(
        deployments,
        vec![stored("/configmaps/home-runtime-config")],
        vec![stored("/services/home-core-api")],
    ));
    let second = run(wp, script).await;
    assert_eq!(
        second.result.expect("second pass"),
        Action::requeue(Duration::from_secs(15))
    );
    assert!(
        second.seen.iter().all(|s| s.method == Method::GET),
        "only reads: {:?}",
        second
            .seen
            .iter()
            .map(|s| format!("{} {}", s.method, s.path))
            .collect::<Vec<_>>()
    );
    assert_eq!(second.metrics.status_patches.get(), 0);
}

#[tokio::test]
async fn drift_in_an_owned_field_is_applied_again() {
    let redis = RedisServer::start().await.expect("redis");
    let first = first_pass(&redis.url()).await;
    assert!(first.result.is_ok(), "first pass: {:?}", first.result);
    let stored = |path: &str| first.stored(path);
    let mut edited = stored("/deployments/home-ingester");
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = json!("someone/else:latest");
    let mut wp = pipeline();
    wp.status = Some(patched_status(&first.seen));
    let mut script = secret_steps(&redis.url());
    script.extend(list_steps(
        vec![
            stored("/deployments/home-outbox-deals"),
            edited,
            stored("/deployments/home-core-api"),
        ],
        vec![stored("/configmaps/home-runtime-config")],
        vec![stored("/services/home-core-api")],
    ));
    script.push(step(
        Method::PATCH,
        format!("{APPS_PATH}/deployments/home-ingester"),
        APPLY,
        Reply::Echo,
    ));
    script.push(event_step());
    let run = run(wp, script).await;
    run.result.expect("reconcile");
    assert_eq!(run.metrics.applies.get(), 1);
}

#[tokio::test]
async fn deployments_of_removed_sources_are_pruned_and_foreign_ones_kept() {
    let redis = RedisServer::start().await.expect("redis");
    let first = first_pass(&redis.url()).await;
    assert!(first.result.is_ok(), "first pass: {:?}", first.result);
    let stored = |path: &str| first.stored(path);
    let mut removed = stored("/deployments/home-outbox-deals");
    removed["metadata"]["name"] = json!("home-outbox-loyalty");
    let mut foreign = removed.clone();
    foreign["metadata"]["name"] = json!("home-outbox-legacy");
    foreign["metadata"]["ownerReferences"][0]["uid"] = json!("some-other-owner");

    let wp = pipeline();
    let mut script = secret_steps(&redis.url());
    script.extend(list_steps(
        vec![
            stored("/deployments/home-outbox-deals"),
            removed,
            foreign,
            stored("/deployments/home-ingester"),
            stored("/deployments/home-core-api"),
        ],
        vec![stored("/configmaps/home-runtime-config")],
        vec![stored("/services/home-core-api")],
    ));
    script.push(step(
        Method::DELETE,
        format!("{APPS_PATH}/deployments/home-outbox-loyalty"),
        "",
        Reply::Json(json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})),
    ));
    script.push(event_step());
    script.push(status_step(&wp));
    let run = run(wp, script).await;
    run.result.expect("reconcile");
    let event = run.seen.iter().find(|s| s.path == EVENTS).expect("event");
    assert_eq!(event.body["reason"], "Pruned");
    assert!(
        event.body["note"]
            .as_str()
            .unwrap_or_default()
            .contains("home-outbox-loyalty")
    );
    assert_eq!(run.metrics.prunes.get(), 1);
    let status = patched_status(&run.seen);
    assert_eq!(status.components.len(), 3);
}

#[tokio::test]
async fn paused_pipeline_changes_no_children_and_says_so() {
    let redis = RedisServer::start().await.expect("redis");
    let mut wp = pipeline();
    wp.spec.paused = true;
    let mut script = secret_steps(&redis.url());
    // Only the Deployments are read (for status); nothing is applied or pruned.
    script.push(deployments_step(vec![]));
    script.push(status_step(&wp));
    let run = run(wp, script).await;
    run.result.expect("reconcile");
    let status = patched_status(&run.seen);
    let progressing = cond(&status, "Progressing");
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("False", "Paused")
    );
    assert_eq!(cond(&status, "Ready").status, "False");
    assert_eq!(run.metrics.applies.get(), 0);
}

#[tokio::test]
async fn missing_secret_degrades_the_pipeline_with_a_warning() {
    let wp = pipeline();
    let mut script = secret_steps("redis://unused");
    // The Redis Secret (the last one read) does not exist.
    if let Some(redis) = script.last_mut() {
        redis.reply = Reply::NotFound;
    }
    script.extend(list_steps(vec![], vec![], vec![]));
    script.extend(apply_steps(&["deals"]));
    script.push(event_step());
    script.push(status_step(&wp));
    script.push(event_step());
    let run = run(wp, script).await;
    run.result
        .expect("a missing Secret is reported, not retried as an error");
    let status = patched_status(&run.seen);
    let degraded = cond(&status, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "SecretNotFound")
    );
    assert!(degraded.message.contains("redis"), "{}", degraded.message);
    let ready = cond(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SecretNotFound")
    );
    assert_eq!(status.live, None, "no Redis URL, no figures");
    let warning = run
        .seen
        .iter()
        .rev()
        .find(|s| s.path == EVENTS)
        .expect("warning event");
    assert_eq!(warning.body["type"], "Warning");
    assert_eq!(warning.body["reason"], "SecretNotFound");
}

#[tokio::test]
async fn unreachable_redis_degrades_but_the_rest_of_the_status_is_written() {
    // A port nothing listens on: connection refused at once.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let wp = pipeline();
    let mut script = secret_steps(&format!("redis://127.0.0.1:{closed}/"));
    // The names cannot be claimed: nothing new is applied, nothing pruned (the Deployments
    // are only listed for the status), until Redis answers.
    script.push(deployments_step(vec![]));
    script.push(status_step(&wp));
    script.push(event_step());
    let run = run(wp, script).await;
    run.result.expect("reconcile");
    let status = patched_status(&run.seen);
    let degraded = cond(&status, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "RedisUnreachable")
    );
    // A reason code, never the driver's text with the host and port it dialled.
    assert!(
        degraded.message.ends_with("connection refused"),
        "{}",
        degraded.message
    );
    assert!(
        !degraded.message.contains(&closed.to_string()),
        "{}",
        degraded.message
    );
    assert!(
        !degraded.message.contains("127.0.0.1"),
        "{}",
        degraded.message
    );
    assert_eq!(status.components.len(), 3);
    assert_eq!(status.observed_generation, Some(1));
    assert!(status.config_hash.is_some());
}

#[tokio::test]
async fn an_allkeys_eviction_policy_degrades_with_a_warning_but_the_reconcile_succeeds() {
    let redis = RedisServer::start().await.expect("redis");
    let mut con = redis.connection().await.expect("connect");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lfu")
        .query_async(&mut con)
        .await
        .expect("config set");
    let wp = pipeline();
    let mut script = secret_steps(&redis.url());
    script.extend(list_steps(vec![], vec![], vec![]));
    script.extend(apply_steps(&["deals"]));
    script.push(event_step());
    script.push(status_step(&wp));
    script.push(event_step());
    let run = run(wp, script).await;
    assert_eq!(
        run.result.expect("reconcile"),
        Action::requeue(Duration::from_secs(15))
    );
    let status = patched_status(&run.seen);
    let degraded = cond(&status, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "RedisEvictionUnsafe")
    );
    assert!(
        degraded.message.contains("allkeys-lfu"),
        "{}",
        degraded.message
    );
    let live = status.live.as_ref().expect("live figures");
    assert_eq!(live.maxmemory_policy.as_deref(), Some("allkeys-lfu"));
    let warning = run
        .seen
        .iter()
        .rev()
        .find(|s| s.path == EVENTS)
        .expect("warning event");
    assert_eq!(warning.body["type"], "Warning");
    assert_eq!(warning.body["reason"], "RedisEvictionUnsafe");
}

#[tokio::test]
async fn invalid_spec_is_reported_and_waits_for_a_change() {
    let mut wp = pipeline();
    wp.spec.sources[0].poll_interval = "soon".into();
    let script = vec![deployments_step(vec![]), status_step(&wp), event_step()];
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, script));
    let ctx = Arc::new(Context::new(
        Client::new(service, "default"),
        Arc::new(Metrics::default()),
        None,
    ));
    let obj = Arc::new(DeserializeGuard(Ok(wp)));
    let err = controller::reconcile(obj.clone(), ctx.clone())
        .await
        .expect_err("invalid spec");
    assert!(matches!(err, Error::InvalidSpec(_)), "{err}");
    assert_eq!(
        controller::error_policy(obj, &err, ctx.clone()),
        Action::await_change()
    );
    drop(ctx);
    let seen = server.await.expect("server");
    let status = patched_status(&seen);
    let degraded = cond(&status, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "InvalidSpec")
    );
    assert!(
        degraded.message.contains("pollInterval"),
        "{}",
        degraded.message
    );
    let event = seen.iter().find(|s| s.path == EVENTS).expect("warning");
    assert_eq!(
        (event.body["type"].as_str(), event.body["reason"].as_str()),
        (Some("Warning"), Some("InvalidSpec"))
    );
}

#[tokio::test]
async fn api_failures_back_off_exponentially_per_object() {
    let wp = pipeline();
    let script = vec![
        step(
            Method::GET,
            format!("{NS_PATH}/secrets/core-db"),
            "",
            Reply::Failure(403, "Forbidden"),
        ),
        event_step(),
    ];
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, script));
    let ctx = Arc::new(Context::new(
        Client::new(service, "default"),
        Arc::new(Metrics::default()),
        None,
    ));
    let obj = Arc::new(DeserializeGuard(Ok(wp)));
    let err = controller::reconcile(obj.clone(), ctx.clone())
        .await
        .expect_err("forbidden");
    assert_eq!(err.reason(), "Forbidden");
    let delays: Vec<Action> = (0..4)
        .map(|_| controller::error_policy(obj.clone(), &err, ctx.clone()))
        .collect();
    assert_eq!(
        delays,
        [5, 10, 20, 40].map(|s| Action::requeue(Duration::from_secs(s)))
    );
    assert_eq!(controller::backoff(30), Duration::from_secs(300));
    assert!(
        ctx.metrics
            .encode()
            .contains("widget_operator_reconcile_failures_total{reason=\"Forbidden\"} 1")
    );
    drop(ctx);
    server.await.expect("server");
}

#[tokio::test]
async fn a_malformed_object_is_an_invalid_object_error_not_a_crash() {
    let bad = json!({"apiVersion": "homewidgets.io/v1alpha1", "kind": "WidgetPipeline",
                     "metadata": {"name": "home", "namespace": "widgets", "uid": UID},
                     "spec": {"image": 42}});
    let guard: DeserializeGuard<WidgetPipeline> =
        serde_json::from_value(bad).expect("the guard always deserializes");
    assert!(guard.0.is_err());
    assert_eq!(guard.name_any(), "home");
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, vec![event_step()]));
    let ctx = Arc::new(Context::new(
        Client::new(service, "default"),
        Arc::new(Metrics::default()),
        None,
    ));
    let obj = Arc::new(guard);
    let err = controller::reconcile(obj.clone(), ctx.clone())
        .await
        .expect_err("invalid");
    assert!(matches!(err, Error::InvalidObject(_)));
    assert_eq!(
        controller::error_policy(obj, &err, ctx.clone()),
        Action::await_change()
    );
    drop(ctx);
    let seen = server.await.expect("server");
    assert_eq!(seen[0].body["reason"], "InvalidObject");
}

#[test]
fn subset_check_ignores_defaults_but_not_changes() {
    use controller::is_subset;
    let desired = json!({"a": 1, "l": [{"x": 1}], "m": {"k": "v"}});
    assert!(is_subset(
        &desired,
        &json!({"a": 1, "b": 2, "l": [{"x": 1, "y": 0}], "m": {"k": "v", "j": 1}})
    ));
    assert!(!is_subset(
        &desired,
        &json!({"a": 2, "l": [{"x": 1}], "m": {"k": "v"}})
    ));
    assert!(!is_subset(
        &desired,
        &json!({"a": 1, "l": [{"x": 1}, {"x": 2}], "m": {"k": "v"}})
    ));
    assert!(!is_subset(&desired, &json!({"a": 1, "l": [{"x": 1}]})));
}

#[test]
fn resources_compare_by_value_as_the_apiserver_rewrites_them() {
    use controller::is_subset;
    // What the user wrote, and what the apiserver stores for it.
    let desired = json!({"containers": [{"image": "x", "resources": {
        "requests": {"cpu": "1000m", "memory": "1024Mi"}, "limits": {"cpu": "0.5"}}}]});
    let stored = json!({"containers": [{"image": "x", "resources": {
        "requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "500m"}}}]});
    assert!(
        is_subset(&desired, &stored),
        "no re-apply for the same values"
    );
    let changed = json!({"containers": [{"image": "x", "resources": {
        "requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": "500m"}}}]});
    assert!(!is_subset(&desired, &changed), "a real change is applied");
    // Only under `resources`: elsewhere strings compare as written.
    assert!(!is_subset(
        &json!({"env": [{"value": "1000m"}]}),
        &json!({"env": [{"value": "1"}]})
    ));
}

/// Holds this pipeline's stream and cache prefix on `redis` for `owner` (as the operator of
/// another pipeline would have claimed them).
async fn claim_for(redis: &RedisServer, owner: &str) {
    let config = widget_operator::render::runtime_config(&pipeline()).expect("config");
    let mut con = redis.connection().await.expect("connect");
    for key in widget_operator::tenancy::claim_keys(&config) {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(owner)
            .query_async(&mut con)
            .await
            .expect("set");
    }
}

const OTHER: &str = "/apis/homewidgets.io/v1alpha1/namespaces/team-a/widgetpipelines/home";

fn other_pipeline(uid: &str) -> Value {
    let mut other = serde_json::to_value(pipeline()).expect("serializes");
    other["metadata"]["namespace"] = json!("team-a");
    other["metadata"]["uid"] = json!(uid);
    other
}

#[tokio::test]
async fn a_stream_another_live_pipeline_holds_on_the_same_redis_is_a_conflict_and_nothing_runs() {
    let redis = RedisServer::start().await.expect("redis");
    // The pipeline ran before the other one's claim was seen (e.g. both predate claims).
    let first = first_pass(&redis.url()).await;
    assert!(first.result.is_ok(), "first pass: {:?}", first.result);
    claim_for(&redis, "team-a/home/uid-a").await;
    let wp = pipeline();
    let mut script = secret_steps(&redis.url());
    // The claimant still exists with that uid.
    script.push(step(
        Method::GET,
        OTHER,
        "",
        Reply::Json(other_pipeline("uid-a")),
    ));
    // Its own Deployments are listed and deleted; nothing is applied.
    let names = ["home-outbox-deals", "home-ingester", "home-core-api"];
    let existing = names
        .iter()
        .map(|n| first.stored(&format!("/deployments/{n}")))
        .collect();
    script.push(deployments_step(existing));
    for n in names {
        script.push(delete_step(n));
    }
    script.push(event_step());
    script.push(status_step(&wp));
    script.push(event_step());
    let run = run(wp, script).await;
    run.result.expect("reconcile");
    let status = patched_status(&run.seen);
    let ready = cond(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Conflict")
    );
    assert!(ready.message.contains("team-a/home"), "{}", ready.message);
    assert!(!ready.message.contains("uid-a"), "{}", ready.message);
    assert_eq!(
        status.live, None,
        "another pipeline's figures are not shown"
    );
    assert!(
        run.seen
            .iter()
            .all(|s| s.method != Method::PATCH || s.path == STATUS),
        "no child applied"
    );
    // The claim stays the other pipeline's.
    let mut con = redis.connection().await.expect("connect");
    let config = widget_operator::render::runtime_config(&pipeline()).expect("config");
    let [stream_key, _] = widget_operator::tenancy::claim_keys(&config);
    let holder: String = redis::cmd("GET")
        .arg(&stream_key)
        .query_async(&mut con)
        .await
        .expect("get");
    assert_eq!(holder, "team-a/home/uid-a");
}

#[tokio::test]
async fn a_claim_whose_pipeline_is_gone_is_taken_over() {
    let redis = RedisServer::start().await.expect("redis");
    claim_for(&redis, "team-a/home/uid-old").await;
    let wp = pipeline();
    let mut script = secret_steps(&redis.url());
    // Re-created since: another uid.
    script.push(step(
        Method::GET,
        OTHER,
        "",
        Reply::Json(other_pipeline("uid-new")),
    ));
    script.extend(list_steps(vec![], vec![], vec![]));
    script.extend(apply_steps(&["deals"]));
    script.push(event_step());
    script.push(status_step(&wp));
    let run = run(wp, script).await;
    run.result.expect("reconcile");
    let status = patched_status(&run.seen);
    assert_eq!(cond(&status, "Degraded").status, "False");
    let config = widget_operator::render::runtime_config(&pipeline()).expect("config");
    let mut con = redis.connection().await.expect("connect");
    for key in widget_operator::tenancy::claim_keys(&config) {
        let holder: String = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut con)
            .await
            .expect("get");
        assert_eq!(holder, format!("widgets/home/{UID}"), "{key}");
    }
}

#[tokio::test]
async fn a_child_name_someone_else_owns_is_reported_and_the_rest_is_applied() {
    let redis = RedisServer::start().await.expect("redis");
    let first = first_pass(&redis.url()).await;
    assert!(first.result.is_ok(), "first pass: {:?}", first.result);
    let mut squatter = first.stored("/deployments/home-ingester");
    squatter["metadata"]["ownerReferences"][0]["uid"] = json!("another-pipeline");

    let wp = pipeline();
    let mut script = secret_steps(&redis.url());
    script.extend(list_steps(vec![], vec![], vec![]));
    for step_ in apply_steps(&["deals"]) {
        if step_.path.ends_with("/deployments/home-ingester") {
            // Looked up, found to be someone else's: not applied.
            if step_.method == Method::GET {
                script.push(step(
                    Method::GET,
                    step_.path,
                    "",
                    Reply::Json(squatter.clone()),
                ));
            }
            continue;
        }
        script.push(step_);
    }
    script.push(event_step());
    script.push(status_step(&wp));
    script.push(event_step());
    let run = run(wp, script).await;
    run.result.expect("the reconcile goes on");
    let status = patched_status(&run.seen);
    let degraded = cond(&status, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "NameConflict")
    );
    assert!(
        degraded.message.contains("home-ingester"),
        "{}",
        degraded.message
    );
    let applied: Vec<&str> = run
        .seen
        .iter()
        .filter(|s| s.method == Method::PATCH && s.path != STATUS)
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(applied.len(), 4, "{applied:?}");
}

#[tokio::test]
async fn an_image_outside_the_allow_list_is_refused_and_nothing_is_applied() {
    let wp = pipeline();
    assert!(
        !wp.spec.image.starts_with("registry.internal/"),
        "{}",
        wp.spec.image
    );
    let script = vec![deployments_step(vec![]), status_step(&wp), event_step()];
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, script));
    let ctx = Arc::new(
        Context::new(
            Client::new(service, "default"),
            Arc::new(Metrics::default()),
            None,
        )
        .with_allowed_images(vec!["registry.internal/".into()]),
    );
    let action = controller::reconcile(Arc::new(DeserializeGuard(Ok(wp))), ctx.clone())
        .await
        .expect("reported, not failed");
    assert_eq!(action, Action::await_change());
    drop(ctx);
    let seen = server.await.expect("server");
    let status = patched_status(&seen);
    let ready = cond(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ImageNotAllowed")
    );
    let event = seen.iter().find(|s| s.path == EVENTS).expect("warning");
    assert_eq!(event.body["reason"], "ImageNotAllowed");
    assert!(
        seen.iter()
            .all(|s| s.method != Method::PATCH || s.path == STATUS)
    );
}

/// The other half of the RBAC check (`tests/rbac.rs` holds the manifests to
/// `operator/src/rbac.rs`, the mock server holds every request to it): every verb granted
/// there is one the operator really uses, seen here across a first apply, a prune and a
/// conflict's takeover check. Only the controller's watches (`list`, `watch`) and kube's
/// repeated-event `patch` are exercised elsewhere (the kind suite).
#[tokio::test]
async fn every_granted_verb_is_used() {
    let redis = RedisServer::start().await.expect("redis");
    let first = first_pass(&redis.url()).await;
    assert!(first.result.is_ok(), "{:?}", first.result);
    let mut seen = first.seen.clone();

    // A prune: the worker of a removed source is deleted.
    let mut removed = first.stored("/deployments/home-outbox-deals");
    removed["metadata"]["name"] = json!("home-outbox-loyalty");
    let stored = |p: &str| first.stored(p);
    let mut script = secret_steps(&redis.url());
    script.extend(list_steps(
        vec![
            stored("/deployments/home-outbox-deals"),
            removed,
            stored("/deployments/home-ingester"),
            stored("/deployments/home-core-api"),
        ],
        vec![stored("/configmaps/home-runtime-config")],
        vec![stored("/services/home-core-api")],
    ));
    script.push(delete_step("home-outbox-loyalty"));
    script.push(event_step());
    script.push(status_step(&pipeline()));
    let prune = run(pipeline(), script).await;
    assert!(prune.result.is_ok(), "{:?}", prune.result);
    seen.extend(prune.seen);

    // A claim held by another pipeline: its holder is looked up.
    claim_for(&redis, "team-a/home/uid-old").await;
    let mut script = secret_steps(&redis.url());
    script.push(step(Method::GET, OTHER, "", Reply::NotFound));
    script.extend(list_steps(
        vec![
            stored("/deployments/home-outbox-deals"),
            stored("/deployments/home-ingester"),
            stored("/deployments/home-core-api"),
        ],
        vec![stored("/configmaps/home-runtime-config")],
        vec![stored("/services/home-core-api")],
    ));
    script.push(status_step(&pipeline()));
    let takeover = run(pipeline(), script).await;
    assert!(takeover.result.is_ok(), "{:?}", takeover.result);
    seen.extend(takeover.seen);

    let used: std::collections::BTreeSet<(String, String, String)> = seen
        .iter()
        .filter_map(|s| widget_operator::rbac::request_verb(s.method.as_str(), &s.path, &s.query))
        .collect();
    for rule in widget_operator::rbac::RULES {
        for verb in rule.verbs {
            let elsewhere = matches!(*verb, "list" | "watch")
                || (rule.resource == "events" && *verb == "patch");
            if elsewhere {
                continue;
            }
            // A server-side apply that creates an object is authorized as `create` too.
            let key = |v: &str| {
                (
                    rule.group.to_string(),
                    rule.resource.to_string(),
                    v.to_string(),
                )
            };
            let ok =
                used.contains(&key(verb)) || (*verb == "create" && used.contains(&key("patch")));
            assert!(
                ok,
                "{verb} on {}/{} is granted but never used",
                rule.group, rule.resource
            );
        }
    }
}

/// A dead pipeline's stream claim must not carry a live pipeline's cache prefix with it: the
/// take-over replaces only the claims of the pipeline found gone.
#[tokio::test]
async fn taking_over_a_dead_claim_never_takes_a_live_pipelines_prefix() {
    let redis = RedisServer::start().await.expect("redis");
    let config = widget_operator::render::runtime_config(&pipeline()).expect("config");
    let [stream_key, prefix_key] = widget_operator::tenancy::claim_keys(&config);
    let mut con = redis.connection().await.expect("connect");
    for (key, holder) in [
        (&stream_key, "team-a/home/uid-dead"),
        (&prefix_key, "team-b/victim/uid-v"),
    ] {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(holder)
            .query_async(&mut con)
            .await
            .expect("set");
    }
    let mut victim = other_pipeline("uid-v");
    victim["metadata"]["namespace"] = json!("team-b");
    victim["metadata"]["name"] = json!("victim");
    let wp = pipeline();
    let mut script = secret_steps(&redis.url());
    script.push(step(Method::GET, OTHER, "", Reply::NotFound));
    script.push(step(
        Method::GET,
        "/apis/homewidgets.io/v1alpha1/namespaces/team-b/widgetpipelines/victim",
        "",
        Reply::Json(victim),
    ));
    script.push(deployments_step(vec![]));
    script.push(status_step(&wp));
    script.push(event_step());
    let run = run(wp, script).await;
    run.result.expect("reconcile");
    let status = patched_status(&run.seen);
    let ready = cond(&status, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Conflict")
    );
    assert!(ready.message.contains("team-b/victim"), "{}", ready.message);
    for (key, holder) in [
        (&stream_key, "team-a/home/uid-dead"),
        (&prefix_key, "team-b/victim/uid-v"),
    ] {
        let now: String = redis::cmd("GET")
            .arg(key)
            .query_async(&mut con)
            .await
            .expect("get");
        assert_eq!(now, holder, "{key} is untouched");
    }
}

/// A ConfigMap of the pipeline's name that someone else owns: the Deployments are not applied,
/// so no pod mounts a config the pipeline did not write.
#[tokio::test]
async fn a_foreign_config_map_stops_the_deployments() {
    let redis = RedisServer::start().await.expect("redis");
    let first = first_pass(&redis.url()).await;
    assert!(first.result.is_ok(), "first pass: {:?}", first.result);
    let mut foreign = first.stored("/configmaps/home-runtime-config");
    foreign["metadata"]["ownerReferences"] = json!([]);
    foreign["data"]["config.yaml"] =
        json!("pipeline: home\nidentity: {mode: query}\nsources: [{name: deals}]\n");
    let wp = pipeline();
    let mut script = secret_steps(&redis.url());
    script.extend(list_steps(vec![], vec![], vec![]));
    script.push(step(
        Method::GET,
        format!("{NS_PATH}/configmaps/home-runtime-config"),
        "",
        Reply::Json(foreign),
    ));
    // No Deployment is looked up or applied; the Service still is.
    script.push(step(
        Method::GET,
        format!("{NS_PATH}/services/home-core-api"),
        "",
        Reply::NotFound,
    ));
    script.push(step(
        Method::PATCH,
        format!("{NS_PATH}/services/home-core-api"),
        APPLY,
        Reply::Echo,
    ));
    script.push(event_step());
    script.push(status_step(&wp));
    script.push(event_step());
    let run = run(wp, script).await;
    run.result.expect("reconcile");
    let status = patched_status(&run.seen);
    let degraded = cond(&status, "Degraded");
    assert_eq!(degraded.reason, "NameConflict");
    assert!(
        degraded.message.contains("ConfigMap"),
        "{}",
        degraded.message
    );
    assert!(
        run.seen.iter().all(|s| !s.path.contains("/deployments/")),
        "no Deployment touched"
    );
}
