//! The status the operator writes: component readiness from the Deployments, kstatus-compatible
//! conditions (`Ready`, `Progressing`, `Degraded`, each with `observedGeneration`) and the live
//! signals. Pure functions; the controller decides whether the result differs enough to patch.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use widget_crds::{ComponentStatus, LiveStatus, WidgetPipelineStatus, condition};

use crate::render::{LABEL_COMPONENT, LABEL_SOURCE};

/// The status is re-written with an unchanged body at most this often, so `lastProbeTime`
/// shows that the figures are still being read.
pub const PROBE_HEARTBEAT: Duration = Duration::from_secs(300);

/// Why the pipeline cannot be healthy, most important first; empty when nothing is wrong.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Problems(pub Vec<(&'static str, String)>);

impl Problems {
    pub fn push(&mut self, reason: &'static str, message: impl Into<String>) {
        self.0.push((reason, message.into()));
    }
    pub fn first(&self) -> Option<&(&'static str, String)> {
        self.0.first()
    }
}

/// What one reconcile observed.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    pub generation: Option<i64>,
    pub paused: bool,
    /// Deployments the pipeline should have (names), in render order.
    pub expected: &'a [String],
    /// The live Deployments of the pipeline.
    pub deployments: &'a [Deployment],
    pub problems: &'a Problems,
    pub config_hash: Option<String>,
    pub live: Option<LiveStatus>,
    pub now: Timestamp,
}

pub fn component_status(d: &Deployment) -> ComponentStatus {
    let labels = d.labels();
    let status = d.status.clone().unwrap_or_default();
    ComponentStatus {
        name: d.name_any(),
        component: labels.get(LABEL_COMPONENT).cloned().unwrap_or_default(),
        source: labels.get(LABEL_SOURCE).cloned(),
        desired_replicas: d.spec.replicas.unwrap_or(1),
        ready_replicas: status.ready_replicas.unwrap_or(0),
        updated_replicas: status.updated_replicas.unwrap_or(0),
    }
}

/// Whether the Deployment controller has finished rolling out the current template.
fn rolled_out(d: &Deployment) -> bool {
    let c = component_status(d);
    let observed = d.status.as_ref().and_then(|s| s.observed_generation);
    observed >= d.metadata.generation
        && c.updated_replicas >= c.desired_replicas
        && c.ready_replicas >= c.desired_replicas
        && d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0) <= c.desired_replicas
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Timestamp,
    previous: &[Condition],
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    // The transition time moves only when the status does.
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(*now));
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The full status for what was observed; `previous` keeps transition times stable.
pub fn build(o: &Observed<'_>, previous: Option<&WidgetPipelineStatus>) -> WidgetPipelineStatus {
    let prev_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let components: Vec<ComponentStatus> = o
        .expected
        .iter()
        .map(|name| {
            o.deployments
                .iter()
                .find(|d| &d.name_any() == name)
                .map(component_status)
                .unwrap_or_else(|| ComponentStatus {
                    name: name.clone(),
                    ..ComponentStatus::default()
                })
        })
        .collect();
    let missing: Vec<&str> = o
        .expected
        .iter()
        .filter(|n| !o.deployments.iter().any(|d| &d.name_any() == *n))
        .map(String::as_str)
        .collect();
    let rolling: Vec<String> = o
        .deployments
        .iter()
        .filter(|d| o.expected.contains(&d.name_any()) && !rolled_out(d))
        .map(|d| {
            let c = component_status(d);
            format!(
                "{} {}/{} ready",
                c.name, c.ready_replicas, c.desired_replicas
            )
        })
        .collect();

    let degraded = o.problems.first();
    let progressing = !o.paused && (!rolling.is_empty() || !missing.is_empty());
    let (progressing_reason, progressing_message) = if o.paused {
        (
            "Paused",
            "spec.paused is true: children are not changed".to_string(),
        )
    } else if !missing.is_empty() {
        ("Creating", format!("waiting for {}", missing.join(", ")))
    } else if !rolling.is_empty() {
        ("RollingOut", rolling.join(", "))
    } else {
        (
            "RolloutComplete",
            "every Deployment runs the current template".to_string(),
        )
    };
    let ready = degraded.is_none() && missing.is_empty() && rolling.is_empty();
    let (ready_reason, ready_message) = match degraded {
        Some((reason, message)) => (*reason, message.clone()),
        None if !missing.is_empty() => ("Missing", format!("missing {}", missing.join(", "))),
        None if !rolling.is_empty() => ("RollingOut", rolling.join(", ")),
        None => ("PipelineReady", "all components are ready".to_string()),
    };
    let (degraded_reason, degraded_message) = match degraded {
        Some((reason, message)) => (*reason, message.clone()),
        None => ("AsExpected", "no problems found".to_string()),
    };
    let conditions = vec![
        condition(
            condition::READY,
            ready,
            ready_reason,
            ready_message,
            o.generation,
            &o.now,
            prev_conditions,
        ),
        condition(
            condition::PROGRESSING,
            progressing,
            progressing_reason,
            progressing_message,
            o.generation,
            &o.now,
            prev_conditions,
        ),
        condition(
            condition::DEGRADED,
            degraded.is_some(),
            degraded_reason,
            degraded_message,
            o.generation,
            &o.now,
            prev_conditions,
        ),
    ];
    // Without a fresh reading keep the last figures (and their probe time): the Degraded
    // condition says why they are not current.
    let (live, last_probe_time) = match &o.live {
        Some(live) => (Some(live.clone()), Some(Time(o.now))),
        None => (
            previous.and_then(|p| p.live.clone()),
            previous.and_then(|p| p.last_probe_time.clone()),
        ),
    };
    WidgetPipelineStatus {
        observed_generation: o.generation,
        conditions,
        components,
        config_hash: o.config_hash.clone(),
        live,
        last_probe_time,
    }
}

/// Whether `new` must be written over `old`: anything but the probe time changed, or the last
/// written probe time is older than [`PROBE_HEARTBEAT`].
pub fn needs_patch(
    old: Option<&WidgetPipelineStatus>,
    new: &WidgetPipelineStatus,
    now: Timestamp,
) -> bool {
    let Some(old) = old else { return true };
    let mut a = old.clone();
    let mut b = new.clone();
    a.last_probe_time = None;
    b.last_probe_time = None;
    if a != b {
        return true;
    }
    match (&old.last_probe_time, &new.last_probe_time) {
        (Some(o), Some(n)) if o != n => {
            let age = now.duration_since(o.0);
            age >= k8s_openapi::jiff::SignedDuration::try_from(PROBE_HEARTBEAT).unwrap_or_default()
        }
        (None, Some(_)) => true,
        _ => false,
    }
}
