//! The operator in a real cluster: apply the CRD and the sample pipeline, wait for Ready, check
//! the children and the live status figures, then add and remove a source and watch the
//! operator create and prune its Deployment.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;
use widget_crds::{WidgetPipeline, condition};
use widget_e2e::{eventually, skip_reason};

const NS: &str = "widgets";
const MANAGER: &str = "widget-e2e";
const SAMPLE: &str = include_str!("../../manifests/samples/widgetpipeline.yaml");

fn sample() -> anyhow::Result<WidgetPipeline> {
    let mut wp: WidgetPipeline = serde_yaml::from_str(SAMPLE)?;
    if let Ok(image) = std::env::var("WIDGET_RUNTIME_IMAGE") {
        wp.spec.image = image;
    }
    Ok(wp)
}

async fn apply_pipeline(api: &Api<WidgetPipeline>, wp: &WidgetPipeline) -> anyhow::Result<()> {
    let mut body = serde_json::to_value(wp)?;
    if let Some(meta) = body.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.retain(|k, _| k == "name" || k == "namespace");
    }
    if let Some(obj) = body.as_object_mut() {
        obj.remove("status");
    }
    api.patch(
        &wp.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn operator_runs_the_sample_pipeline() -> anyhow::Result<()> {
    if let Some(reason) = skip_reason() {
        println!("skipping the kind e2e suite: {reason}");
        return Ok(());
    }
    let client = Client::try_default().await?;

    // The CRD, exactly as the operator generates it.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = WidgetPipeline::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await?;
    eventually(Duration::from_secs(60), "the CRD to be established", || {
        let crds = crds.clone();
        async move {
            let crd = crds.get("widgetpipelines.homewidgets.io").await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(established.then_some(()))
        }
    })
    .await?;

    let pipelines: Api<WidgetPipeline> = Api::namespaced(client.clone(), NS);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let mut wp = sample()?;
    apply_pipeline(&pipelines, &wp).await?;

    // Ready, observed at the current generation (what `kubectl wait --for=condition=Ready` sees).
    let ready = eventually(Duration::from_secs(300), "the pipeline to be Ready", || {
        let pipelines = pipelines.clone();
        async move {
            let wp = pipelines.get("home").await?;
            let ok = wp
                .condition(condition::READY)
                .is_some_and(|c| c.status == "True")
                && wp.status.as_ref().and_then(|s| s.observed_generation) == wp.metadata.generation;
            Ok(ok.then_some(wp))
        }
    })
    .await?;

    for name in ["home-outbox-deals", "home-ingester", "home-core-api"] {
        let d = deployments.get(name).await?;
        let owner = &d.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("WidgetPipeline", "home")
        );
        let ready = d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        assert!(ready >= 1, "{name} has no ready replica");
    }

    // Live figures from Redis.
    let status = ready.status.clone().unwrap_or_default();
    let live = status.live.as_ref().expect("live figures in status");
    assert!(live.stream_length >= 0 && live.pending >= 0);
    // The dev Redis runs the image's default policy, which cannot evict the stream; the
    // operator reads it itself (a Ready pipeline also means no RedisEvictionUnsafe).
    assert_eq!(live.maxmemory_policy.as_deref(), Some("noeviction"));
    assert!(status.last_probe_time.is_some());
    assert_eq!(status.components.len(), 3);
    assert!(status.components.iter().all(|c| c.ready_replicas >= 1));

    // A new source gets its worker ...
    let mut loyalty = wp.spec.sources[0].clone();
    loyalty.name = "loyalty".into();
    wp.spec.sources.push(loyalty);
    apply_pipeline(&pipelines, &wp).await?;
    eventually(
        Duration::from_secs(60),
        "the loyalty worker Deployment",
        || {
            let deployments = deployments.clone();
            async move { Ok(deployments.get_opt("home-outbox-loyalty").await?) }
        },
    )
    .await?;

    // ... and removing it prunes the worker.
    wp.spec.sources.retain(|s| s.name != "loyalty");
    apply_pipeline(&pipelines, &wp).await?;
    eventually(
        Duration::from_secs(60),
        "the loyalty worker to be pruned",
        || {
            let deployments = deployments.clone();
            async move {
                let gone = match deployments.get_opt("home-outbox-loyalty").await? {
                    None => true,
                    Some(d) => d.metadata.deletion_timestamp.is_some(),
                };
                Ok(gone.then_some(()))
            }
        },
    )
    .await?;
    assert!(deployments.get_opt("home-outbox-deals").await?.is_some());

    // Pausing shows in a condition.
    let patch = json!({"apiVersion": "homewidgets.io/v1alpha1", "kind": "WidgetPipeline", "spec": {"paused": true}});
    pipelines
        .patch(
            "home",
            &PatchParams::apply("widget-e2e-pause"),
            &Patch::Apply(&patch),
        )
        .await?;
    eventually(Duration::from_secs(60), "the Paused condition", || {
        let pipelines = pipelines.clone();
        async move {
            let wp = pipelines.get("home").await?;
            Ok(wp
                .condition(condition::PROGRESSING)
                .is_some_and(|c| c.reason == "Paused")
                .then_some(()))
        }
    })
    .await?;
    let unpause = json!({"apiVersion": "homewidgets.io/v1alpha1", "kind": "WidgetPipeline", "spec": {"paused": false}});
    pipelines
        .patch(
            "home",
            &PatchParams::apply("widget-e2e-pause").force(),
            &Patch::Apply(&unpause),
        )
        .await?;
    Ok(())
}

/// The real API server enforces the schema, CEL rules included (the unit tests validate the
/// same schema with a JSON-schema library, which cannot evaluate CEL).
#[tokio::test]
async fn the_api_server_rejects_invalid_pipelines() -> anyhow::Result<()> {
    if let Some(reason) = skip_reason() {
        println!("skipping the kind e2e suite: {reason}");
        return Ok(());
    }
    let client = Client::try_default().await?;
    let pipelines: Api<WidgetPipeline> = Api::namespaced(client, NS);
    let base = serde_json::to_value(sample()?)?;
    let cases: [(&str, serde_json::Value, &str); 4] = [
        (
            "duplicate source names",
            json!({"sources": [base["spec"]["sources"][0], base["spec"]["sources"][0]]}),
            "unique",
        ),
        (
            "a bad duration",
            json!({"cache": {"ingestTtl": "seven days"}}),
            "ingestTtl",
        ),
        (
            "a retention row cap under the minimum",
            json!({"sources": [{"name": "deals", "database": base["spec"]["sources"][0]["database"], "maxRetainedRows": 10}]}),
            "maxRetainedRows",
        ),
        (
            "a bad source name",
            json!({"sources": [{"name": "Deals_Service", "database": base["spec"]["sources"][0]["database"]}]}),
            "name",
        ),
    ];
    for (what, spec_patch, expect) in cases {
        let mut body = base.clone();
        body["metadata"] = json!({"name": "invalid", "namespace": NS});
        if let (Some(spec), Some(patch)) = (body["spec"].as_object_mut(), spec_patch.as_object()) {
            for (k, v) in patch {
                spec.insert(k.clone(), v.clone());
            }
        }
        if let Some(obj) = body.as_object_mut() {
            obj.remove("status");
        }
        // Dry run: validated in full, never stored.
        let result = pipelines
            .patch(
                "invalid",
                &PatchParams::apply(MANAGER).force().dry_run(),
                &Patch::Apply(&body),
            )
            .await;
        match result {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{what}: {status:?}");
                assert!(
                    status.message.contains(expect),
                    "{what}: the message names the problem: {}",
                    status.message
                );
            }
            other => anyhow::bail!("{what}: expected a 422 from the API server, got {other:?}"),
        }
    }
    Ok(())
}
