//! The produce side: the transactional outbox a product service writes (`producer`) and the
//! outbox-worker that relays its rows to the Redis Stream (`worker`).

mod producer;
pub mod worker;

pub use producer::{Outbox, OutboxError};

/// The outbox table created by `widget-runtime migrate product`.
pub const DEFAULT_TABLE: &str = "widget_outbox";
