//! Reclaim: taking over entries that sat unacknowledged longer than `reclaim.minIdle` (their
//! consumer crashed, hung, or hit an entry the database keeps refusing).
//!
//! One pass follows the XAUTOCLAIM cursor from `0-0` until it comes back to `0-0`. For every
//! claimed entry the delivery count comes from XPENDING (XAUTOCLAIM itself already counted this
//! claim as a delivery); an entry delivered more than `reclaim.maxDeliveries` times is
//! dead-lettered with reason `max-deliveries`, the rest are processed like new entries.

use redis::Value;
use redis::aio::ConnectionLike;
use tokio_util::sync::CancellationToken;

use super::consumer::{self, Entry, as_text, parse_entries};
use super::consumers;
use super::dead_letter::{self, DeadLetter};
use super::{Halt, Worker};
use crate::connect::Deadline;
use crate::stats;

/// One page of XAUTOCLAIM.
#[derive(Debug, Default)]
pub struct ClaimPage {
    /// Cursor for the next call; `0-0` when the scan is complete.
    pub next: String,
    pub claimed: Vec<Entry>,
    /// Pending entries that no longer exist in the stream (trimmed); Redis >= 7 has already
    /// removed them from the pending list.
    pub deleted: Vec<String>,
}

/// `XAUTOCLAIM stream group consumer min-idle cursor COUNT n`.
pub async fn claim_page<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    consumer: &str,
    min_idle_ms: u64,
    cursor: &str,
    count: usize,
) -> redis::RedisResult<ClaimPage> {
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(min_idle_ms)
        .arg(cursor)
        .arg("COUNT")
        .arg(count.max(1))
        .query_async(conn)
        .await?;
    Ok(parse_claim_reply(reply))
}

pub fn parse_claim_reply(reply: Value) -> ClaimPage {
    let Value::Array(items) = reply else {
        return ClaimPage {
            next: "0-0".into(),
            ..ClaimPage::default()
        };
    };
    let mut it = items.into_iter();
    let next = it.next().and_then(as_text).unwrap_or_else(|| "0-0".into());
    let claimed = it.next().map(parse_entries).unwrap_or_default();
    let deleted = match it.next() {
        Some(Value::Array(ids)) => ids.into_iter().filter_map(as_text).collect(),
        _ => Vec::new(),
    };
    ClaimPage {
        next,
        claimed,
        deleted,
    }
}

/// Delivery counts of entries, one `XPENDING stream group id id 1` each, in one pipeline.
/// An entry no longer pending gets `None`.
pub async fn delivery_counts<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    ids: &[&str],
) -> redis::RedisResult<Vec<Option<u64>>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("XPENDING")
            .arg(stream)
            .arg(group)
            .arg(*id)
            .arg(*id)
            .arg(1);
    }
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    Ok(replies.into_iter().map(parse_times_delivered).collect())
}

/// The extended XPENDING form: `[[id, consumer, idle-ms, times-delivered]]`.
fn parse_times_delivered(reply: Value) -> Option<u64> {
    let Value::Array(rows) = reply else {
        return None;
    };
    let Value::Array(row) = rows.into_iter().next()? else {
        return None;
    };
    match row.into_iter().nth(3)? {
        Value::Int(n) => u64::try_from(n).ok(),
        other => as_text(other)?.parse().ok(),
    }
}

impl Worker {
    /// One reclaim pass over the whole pending list.
    ///
    /// Runs only while the database answers: during an outage nothing could be applied anyway,
    /// and claiming would only raise delivery counts until good entries were dead-lettered.
    pub(super) async fn reclaim_pass(&mut self, cancel: &CancellationToken) -> Result<(), Halt> {
        if let Err(e) = sqlx::query("SELECT 1")
            .execute(&self.pool)
            .deadline(self.s.db_deadline)
            .await
        {
            self.links.db_failed(&e, "reclaim health check");
            return Ok(());
        }
        self.links.db_ok();
        let min_idle_ms = self.s.min_idle.as_millis() as u64;
        let mut cursor = "0-0".to_string();
        loop {
            let page = {
                let mut conn = match self.links.manager().await {
                    Ok(c) => c,
                    Err(e) => {
                        self.links.redis_failed(&e, "reclaim");
                        return Ok(());
                    }
                };
                claim_page(
                    &mut conn,
                    &self.s.stream,
                    &self.s.group,
                    &self.consumer,
                    min_idle_ms,
                    &cursor,
                    self.reader.page_count,
                )
                .await
            };
            self.reader
                .adapt_page(page.as_ref().map(|p| p.claimed.len() + p.deleted.len()));
            let page = match page {
                Ok(p) => p,
                Err(e) if consumer::is_nogroup(&e) => {
                    self.group_ready = false;
                    return Ok(());
                }
                Err(e) => {
                    self.links.redis_failed(&e, "reclaim");
                    return Ok(());
                }
            };
            self.links.redis_ok();
            if !page.deleted.is_empty() {
                self.metrics
                    .reclaim_deleted
                    .inc_by(page.deleted.len() as u64);
                tracing::warn!(count = page.deleted.len(), first = %page.deleted[0],
                    "pending entries were trimmed from the stream before they were acknowledged");
            }
            if !page.claimed.is_empty() {
                self.handle_claimed(page.claimed, cancel).await?;
            }
            if cancel.is_cancelled() {
                return Ok(());
            }
            if page.next == "0-0" {
                self.remove_idle_consumers().await;
                return Ok(());
            }
            cursor = page.next;
        }
    }

    /// Removes consumers that are gone (see `consumers`); a failure only waits for the next pass.
    async fn remove_idle_consumers(&mut self) {
        let Ok(mut conn) = self.links.manager().await else {
            return;
        };
        let idle_ms = self.s.idle_consumer_ttl.as_millis() as u64;
        match consumers::remove_idle(
            &mut conn,
            &self.s.stream,
            &self.s.group,
            &self.consumer,
            idle_ms,
        )
        .await
        {
            Ok(removed) if removed.is_empty() => {}
            Ok(removed) => {
                self.metrics.consumers_removed.inc_by(removed.len() as u64);
                tracing::info!(consumers = ?removed, idle_ms,
                    "removed idle consumers with nothing pending from the group");
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not remove idle consumers; next pass retries")
            }
        }
    }

    /// Dead-letters claimed entries past `maxDeliveries` and processes the others.
    async fn handle_claimed(
        &mut self,
        claimed: Vec<Entry>,
        cancel: &CancellationToken,
    ) -> Result<(), Halt> {
        let n = claimed.len() as u64;
        self.metrics.reclaimed.inc_by(n);
        self.stats.add(stats::field::RECLAIMED, n);
        tracing::info!(count = n, consumer = %self.consumer, "reclaimed idle pending entries");
        let ids: Vec<&str> = claimed.iter().map(|e| e.id.as_str()).collect();
        let (stream, group, ids_ref) = (self.s.stream.as_str(), self.s.group.as_str(), &ids);
        let counts = self
            .links
            .redis(cancel, "delivery counts", move |mut conn| async move {
                delivery_counts(&mut conn, stream, group, ids_ref).await
            })
            .await?;
        let max = u64::from(self.s.max_deliveries);
        let mut dead = Vec::new();
        let mut again = Vec::with_capacity(claimed.len());
        for (entry, count) in claimed.into_iter().zip(counts) {
            match count {
                // No longer pending: another consumer acknowledged it meanwhile.
                None => {}
                Some(_)
                    if crate::stream::entry_size(&entry.fields)
                        > crate::stream::MAX_ENTRY_BYTES =>
                {
                    let size = crate::stream::entry_size(&entry.fields);
                    dead.push(DeadLetter::oversized(&entry, size));
                }
                Some(times) if times > max => dead.push(
                    DeadLetter::new(
                        &entry,
                        dead_letter::MAX_DELIVERIES,
                        format!(
                            "delivered {times} times, more than reclaim.maxDeliveries ({max}); \
                         processing kept failing"
                        ),
                    )
                    .with_deliveries(times),
                ),
                Some(_) => again.push(entry),
            }
        }
        self.process(again, dead, cancel).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn claim_reply_parses_with_and_without_deleted_ids() {
        let reply = Value::Array(vec![
            bulk("9-0"),
            Value::Array(vec![Value::Array(vec![
                bulk("5-0"),
                Value::Array(vec![bulk("k"), bulk("v")]),
            ])]),
            Value::Array(vec![bulk("4-0")]),
        ]);
        let page = parse_claim_reply(reply);
        assert_eq!(page.next, "9-0");
        assert_eq!(page.claimed.len(), 1);
        assert_eq!(page.deleted, vec!["4-0".to_string()]);

        let old = Value::Array(vec![bulk("0-0"), Value::Array(vec![])]);
        let page = parse_claim_reply(old);
        assert_eq!(page.next, "0-0");
        assert!(page.claimed.is_empty() && page.deleted.is_empty());
    }

    #[test]
    fn times_delivered_parses() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("5-0"),
            bulk("pod-a"),
            Value::Int(1200),
            Value::Int(4),
        ])]);
        assert_eq!(parse_times_delivered(reply), Some(4));
        assert_eq!(parse_times_delivered(Value::Array(vec![])), None);
    }
}
