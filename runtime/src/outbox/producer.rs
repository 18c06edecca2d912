//! What a product service links: events written in the caller's own transaction.

use sqlx::{Postgres, Transaction};

use crate::config::{check_identifier, quote_identifier};
use crate::event::{EventError, WidgetEvent};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("event {index} is invalid: {source}")]
    Invalid {
        index: usize,
        #[source]
        source: EventError,
    },
    #[error("outbox table name: {0}")]
    Table(String),
    #[error("writing the outbox row failed: {0}")]
    Database(#[from] sqlx::Error),
}

/// A product database's outbox table. The NOTIFY channel that wakes the outbox-worker has the
/// table's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbox {
    table: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Self {
            table: super::DEFAULT_TABLE.into(),
        }
    }
}

impl Outbox {
    /// An outbox in a table of another name (same columns as the `widget_outbox` migration).
    pub fn with_table(table: &str) -> Result<Self, OutboxError> {
        check_identifier("outboxTable", table).map_err(|e| OutboxError::Table(e.to_string()))?;
        Ok(Self {
            table: table.into(),
        })
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Adds one event to the default outbox inside `tx`: the event exists if and only if the
    /// caller's transaction commits. Returns the outbox row id.
    pub async fn enqueue(
        tx: &mut Transaction<'_, Postgres>,
        event: &WidgetEvent,
    ) -> Result<i64, OutboxError> {
        Self::default().push(tx, event).await
    }

    /// Adds many events to the default outbox inside `tx`, in order, with one INSERT.
    pub async fn enqueue_all(
        tx: &mut Transaction<'_, Postgres>,
        events: &[WidgetEvent],
    ) -> Result<Vec<i64>, OutboxError> {
        Self::default().push_all(tx, events).await
    }

    /// The next version of `key`: the per-key counter of `widget_next_version` (installed by
    /// the product migrations), bumped under its row lock in `tx`. Versions then grow in
    /// commit order and can never go backwards, unlike timestamps from several producer
    /// replicas' clocks (or a `now()` taken at transaction start), which a later commit may
    /// carry smaller and so be dropped as stale.
    pub async fn next_version(
        tx: &mut Transaction<'_, Postgres>,
        key: &str,
    ) -> Result<i64, OutboxError> {
        Ok(sqlx::query_scalar("SELECT widget_next_version($1)")
            .bind(key)
            .fetch_one(&mut **tx)
            .await?)
    }

    pub async fn push(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &WidgetEvent,
    ) -> Result<i64, OutboxError> {
        let ids = self.push_all(tx, std::slice::from_ref(event)).await?;
        ids.into_iter()
            .next()
            .ok_or_else(|| OutboxError::Database(sqlx::Error::RowNotFound))
    }

    /// Validates every event first (nothing is written when one is invalid), then inserts them
    /// all with one statement inside the caller's transaction.
    pub async fn push_all(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[WidgetEvent],
    ) -> Result<Vec<i64>, OutboxError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let n = events.len();
        let (mut keys, mut types, mut versions) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut ops, mut contents) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (index, e) in events.iter().enumerate() {
            let content = e
                .validate()
                .map_err(|source| OutboxError::Invalid { index, source })?;
            keys.push(e.widget_key.as_str());
            types.push(e.widget_type.as_str());
            versions.push(e.data_version);
            ops.push(e.op.as_str());
            contents.push(content);
        }
        // The table name is a validated identifier, quoted for reserved words; WITH ORDINALITY
        // keeps ids in input order.
        let sql = format!(
            "INSERT INTO {} (widget_key, widget_type, data_version, op, content)
             SELECT k, t, v, o, c::jsonb
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[])
                  WITH ORDINALITY AS u(k, t, v, o, c, n)
             ORDER BY n
             RETURNING id",
            quote_identifier(&self.table)
        );
        let ids: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(&keys)
            .bind(&types)
            .bind(&versions)
            .bind(&ops)
            .bind(&contents)
            .fetch_all(&mut **tx)
            .await?;
        // No NOTIFY here: the outbox's statement trigger wakes the worker for every INSERT,
        // this one and those of producers in other languages alike.
        Ok(ids)
    }
}
