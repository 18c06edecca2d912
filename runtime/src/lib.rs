//! The runtime of the Home Widget Platform: the producer library that product services link,
//! and the three components (outbox-worker, ingester, core-api) of the `widget-runtime` binary.

pub mod acl;
pub mod admin;
pub mod api;
pub mod cache;
pub mod chunk;
pub mod config;
pub mod config_env;
pub mod connect;
pub mod dead_letters;
pub mod dev;
pub mod durability;
pub mod event;
pub mod ingest;
pub mod outbox;
pub mod repair;
pub mod retry;
pub mod server;
pub mod shutdown;
pub mod stats;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod warm;

pub use event::{Op, WidgetEvent};
pub use outbox::Outbox;
