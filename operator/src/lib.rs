//! widget-operator: runs `WidgetPipeline` resources.
//!
//! - [`render`]: the desired ConfigMap, Deployments and Service, a pure function of the resource.
//! - [`controller`]: the kube-runtime Controller, `reconcile` and `error_policy`.
//! - [`status`]: conditions and component readiness from what was observed.
//! - [`probe`]: the live signals read from Redis (the runtime's stream and stats hash).
//! - [`metrics`], [`admin`]: Prometheus metrics and the `/healthz`, `/readyz`, `/metrics` server.
//! - [`leader`]: leader election with a Lease.

pub mod admin;
pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod probe;
pub mod quantity;
pub mod rbac;
pub mod render;
pub mod status;
pub mod tenancy;

pub use error::{Error, Result};

/// Field manager of every server-side apply (children and status).
pub const FIELD_MANAGER: &str = "widget-operator";
