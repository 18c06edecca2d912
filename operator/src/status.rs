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

/// Degraded reason: Redis may evict keys without a TTL (the stream, its markers).
pub const REDIS_EVICTION_UNSAFE: &str = "RedisEvictionUnsafe";
/// Degraded reason: a source deletes relayed rows the core side has not confirmed.
pub const RETENTION_EXCEEDED: &str = "RetentionExceeded";

pub use widget_runtime::durability::eviction_unsafe;

/// The problems a successful probe shows, appended after those found before it (spec, Secrets,
/// Redis reachability), which matter more.
pub fn live_problems(live: &LiveStatus, problems: &mut Problems) {
    // The operator's own reading is current; the runtime's gauge stands in where the operator
    // may not run CONFIG GET (the runtime may have been allowed, or read it earlier).
    let eviction = match live.maxmemory_policy.as_deref() {
        Some(policy) => eviction_unsafe(policy).then(|| format!("maxmemory-policy is {policy}")),
        None => live
            .redis_eviction_unsafe
            .then(|| "the runtime reports an allkeys-* maxmemory-policy".to_string()),
    };
    if let Some(what) = eviction {
        problems.push(
            REDIS_EVICTION_UNSAFE,
            format!(
                "Redis {what}: under memory pressure it may evict the stream and its markers \
                 (events then wait for a replay from the outbox); use noeviction or a volatile-* \
                 policy"
            ),
        );
    }
    let capped: Vec<&str> = live
        .outbox_backlog
        .iter()
        .filter(|b| b.retention_capped)
        .map(|b| b.source.as_str())
        .collect();
    if !capped.is_empty() {
        let (noun, verb) = if capped.len() == 1 {
            ("source", "deletes")
        } else {
            ("sources", "delete")
        };
        problems.push(
            RETENTION_EXCEEDED,
            format!(
                "{noun} {} {verb} relayed rows the core side has not confirmed (past retention \
                 or maxRetainedRows): they can no longer be replayed if Redis loses data; check \
                 the ingester, or raise the limits",
                capped.join(", ")
            ),
        );
    }
}

/// What one reconcile observed.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    pub generation: Option<i64>,
    pub paused: bool,
    /// Number of sources in the spec.
    pub sources: i32,
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
        sources: Some(o.sources),
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::jiff::SignedDuration;

    use super::*;

    fn deployment(name: &str, desired: i32, ready: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some(name.into()),
                generation: Some(2),
                ..ObjectMeta::default()
            },
            spec: DeploymentSpec {
                replicas: Some(desired),
                ..DeploymentSpec::default()
            },
            status: Some(DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(desired),
                ready_replicas: Some(ready),
                updated_replicas: Some(desired),
                ..DeploymentStatus::default()
            }),
        }
    }

    fn observe<'a>(
        expected: &'a [String],
        deployments: &'a [Deployment],
        problems: &'a Problems,
        now: Timestamp,
    ) -> Observed<'a> {
        Observed {
            generation: Some(3),
            paused: false,
            sources: 1,
            expected,
            deployments,
            problems,
            config_hash: Some("abc".into()),
            live: Some(LiveStatus::default()),
            now,
        }
    }

    fn get<'a>(s: &'a WidgetPipelineStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition")
    }

    #[test]
    fn ready_when_every_deployment_is_rolled_out_and_nothing_is_wrong() {
        let expected = vec!["a".to_string(), "b".to_string()];
        let deps = vec![deployment("a", 2, 2), deployment("b", 1, 1)];
        let problems = Problems::default();
        let s = build(
            &observe(&expected, &deps, &problems, Timestamp::now()),
            None,
        );
        assert_eq!(get(&s, condition::READY).status, "True");
        assert_eq!(get(&s, condition::PROGRESSING).status, "False");
        assert_eq!(get(&s, condition::DEGRADED).status, "False");
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
        assert_eq!(s.components[0].ready_replicas, 2);

        let deps = vec![deployment("a", 2, 1), deployment("b", 1, 1)];
        let s = build(
            &observe(&expected, &deps, &problems, Timestamp::now()),
            None,
        );
        assert_eq!(get(&s, condition::READY).reason, "RollingOut");
        assert_eq!(get(&s, condition::PROGRESSING).status, "True");
        assert!(
            get(&s, condition::PROGRESSING)
                .message
                .contains("a 1/2 ready")
        );
    }

    fn problems_of(live: &LiveStatus) -> Problems {
        let mut p = Problems::default();
        live_problems(live, &mut p);
        p
    }

    fn source(name: &str, capped: bool) -> widget_crds::SourceBacklog {
        widget_crds::SourceBacklog {
            source: name.into(),
            rows: 0,
            retained: Some(10),
            retention_capped: capped,
            observed_at: None,
        }
    }

    #[test]
    fn an_allkeys_policy_is_redis_eviction_unsafe_and_names_the_policy() {
        let live = LiveStatus {
            maxmemory_policy: Some("allkeys-lru".into()),
            ..LiveStatus::default()
        };
        let p = problems_of(&live);
        let (reason, message) = p.first().expect("a problem");
        assert_eq!(*reason, REDIS_EVICTION_UNSAFE);
        assert!(message.contains("allkeys-lru"), "{message}");
        assert!(
            message.contains("noeviction") && message.contains("volatile-*"),
            "{message}"
        );

        for safe in ["noeviction", "volatile-lru", "volatile-ttl"] {
            let live = LiveStatus {
                maxmemory_policy: Some(safe.into()),
                ..LiveStatus::default()
            };
            assert_eq!(problems_of(&live), Problems::default(), "{safe}");
        }
    }

    #[test]
    fn the_runtime_gauge_counts_only_when_the_operator_cannot_read_the_policy() {
        let unknown = LiveStatus {
            redis_eviction_unsafe: true,
            ..LiveStatus::default()
        };
        let p = problems_of(&unknown);
        assert_eq!(p.first().map(|(r, _)| *r), Some(REDIS_EVICTION_UNSAFE));
        assert!(p.0[0].1.contains("allkeys-*"), "{}", p.0[0].1);
        // A current reading of a safe policy wins over a gauge not yet refreshed.
        let fixed = LiveStatus {
            redis_eviction_unsafe: true,
            maxmemory_policy: Some("noeviction".into()),
            ..LiveStatus::default()
        };
        assert_eq!(problems_of(&fixed), Problems::default());
    }

    #[test]
    fn capped_sources_are_retention_exceeded_and_named() {
        let live = LiveStatus {
            outbox_backlog: vec![
                source("deals", true),
                source("loyalty", false),
                source("news", true),
            ],
            ..LiveStatus::default()
        };
        let p = problems_of(&live);
        assert_eq!(p.0.len(), 1);
        let (reason, message) = &p.0[0];
        assert_eq!(*reason, RETENTION_EXCEEDED);
        assert!(message.contains("deals, news"), "{message}");
        assert!(!message.contains("loyalty"), "{message}");

        let fine = LiveStatus {
            outbox_backlog: vec![source("deals", false)],
            ..LiveStatus::default()
        };
        assert_eq!(problems_of(&fine), Problems::default());
    }

    #[test]
    fn live_problems_come_after_the_more_important_ones() {
        let live = LiveStatus {
            maxmemory_policy: Some("allkeys-lfu".into()),
            outbox_backlog: vec![source("deals", true)],
            ..LiveStatus::default()
        };
        let mut problems = Problems::default();
        problems.push("SecretKeyNotFound", "Secret key core-db/url not found");
        live_problems(&live, &mut problems);
        let reasons: Vec<&str> = problems.0.iter().map(|(r, _)| *r).collect();
        assert_eq!(
            reasons,
            [
                "SecretKeyNotFound",
                REDIS_EVICTION_UNSAFE,
                RETENTION_EXCEEDED
            ]
        );

        // Alone, the first live problem is what Degraded and Ready say.
        let mut problems = Problems::default();
        live_problems(&live, &mut problems);
        let expected = vec!["a".to_string()];
        let deps = vec![deployment("a", 1, 1)];
        let mut o = observe(&expected, &deps, &problems, Timestamp::now());
        o.live = Some(live);
        let s = build(&o, None);
        let degraded = get(&s, condition::DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", REDIS_EVICTION_UNSAFE)
        );
        assert_eq!(get(&s, condition::READY).reason, REDIS_EVICTION_UNSAFE);
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let expected = vec!["a".to_string()];
        let healthy = vec![deployment("a", 1, 1)];
        let t0 = Timestamp::now();
        let problems = Problems::default();
        let first = build(&observe(&expected, &healthy, &problems, t0), None);
        let t1 = t0 + SignedDuration::from_secs(60);
        let again = build(&observe(&expected, &healthy, &problems, t1), Some(&first));
        assert_eq!(get(&again, condition::READY).last_transition_time, Time(t0));
        let mut broken = Problems::default();
        broken.push("RedisUnreachable", "connection refused");
        let flipped = build(&observe(&expected, &healthy, &broken, t1), Some(&again));
        let ready = get(&flipped, condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "RedisUnreachable")
        );
        assert_eq!(ready.last_transition_time, Time(t1));
    }

    #[test]
    fn a_failed_probe_keeps_the_last_figures_and_their_time() {
        let expected = vec!["a".to_string()];
        let deps = vec![deployment("a", 1, 1)];
        let t0 = Timestamp::now();
        let problems = Problems::default();
        let mut o = observe(&expected, &deps, &problems, t0);
        o.live = Some(LiveStatus {
            stream_length: 9,
            ..LiveStatus::default()
        });
        let first = build(&o, None);
        let mut later = observe(
            &expected,
            &deps,
            &problems,
            t0 + SignedDuration::from_secs(30),
        );
        later.live = None;
        let second = build(&later, Some(&first));
        assert_eq!(second.live.as_ref().map(|l| l.stream_length), Some(9));
        assert_eq!(second.last_probe_time, Some(Time(t0)));
    }

    #[test]
    fn only_real_changes_or_the_heartbeat_cause_a_patch() {
        let expected = vec!["a".to_string()];
        let deps = vec![deployment("a", 1, 1)];
        let problems = Problems::default();
        let t0 = Timestamp::now();
        let old = build(&observe(&expected, &deps, &problems, t0), None);
        assert!(needs_patch(None, &old, t0));
        let t1 = t0 + SignedDuration::from_secs(15);
        let same = build(&observe(&expected, &deps, &problems, t1), Some(&old));
        assert!(
            !needs_patch(Some(&old), &same, t1),
            "only the probe time moved"
        );
        let t2 = t0 + SignedDuration::from_secs(301);
        let stale = build(&observe(&expected, &deps, &problems, t2), Some(&old));
        assert!(needs_patch(Some(&old), &stale, t2), "heartbeat");
        let mut o = observe(&expected, &deps, &problems, t1);
        o.live = Some(LiveStatus {
            pending: 1,
            ..LiveStatus::default()
        });
        let changed = build(&o, Some(&old));
        assert!(needs_patch(Some(&old), &changed, t1));
    }
}
