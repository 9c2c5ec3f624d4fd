//! Deleting dead-lettered messages from the embedded log (`ampybus dlq purge`).

use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::topic::{Domain, Topic, TopicPattern};
use crate::transport::StoredMessage;
use crate::transport::decode_headers;
use crate::transport::embedded::EmbeddedLog;
use bytes::Bytes;
use chrono::DateTime;
use rusqlite::{Connection, params};

impl EmbeddedLog {
    /// Deletes the stored messages on DLQ topics (`ampy.{env}.dlq.v1.…`) that match `pattern`
    /// and for which `filter` returns true; returns the deleted messages (in log order).
    ///
    /// Only the dlq domain can be purged: a pattern whose domain token is a literal other than
    /// `dlq` is refused (`Config` error), and non-DLQ topics are never deleted. Pending
    /// deliveries of the deleted messages are removed with them, in one transaction.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::transport::{Transport, embedded::{EmbeddedLog, EmbeddedOptions}};
    /// use ampybus::{Envelope, Headers, Topic, TopicPattern};
    /// let dir = tempfile::tempdir().unwrap();
    /// let log = EmbeddedLog::open(EmbeddedOptions::new(dir.path())).unwrap();
    /// let t = Topic::parse("ampy.dev.dlq.v1.orders").unwrap();
    /// let h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
    /// log.publish_batch(vec![Envelope::new(&t, h, b"x".to_vec())]).await.unwrap();
    /// let gone = log.purge(&TopicPattern::parse("ampy.*.dlq.v1.>").unwrap(), |_| true).await.unwrap();
    /// assert_eq!(gone.len(), 1);
    /// assert!(log.purge(&TopicPattern::parse("ampy.dev.orders.>").unwrap(), |_| true).await.is_err());
    /// log.close().await.unwrap();
    /// # });
    /// ```
    pub async fn purge(
        &self,
        pattern: &TopicPattern,
        filter: impl Fn(&StoredMessage) -> bool + Send + 'static,
    ) -> Result<Vec<StoredMessage>> {
        let domain_tok = pattern.as_str().split('.').nth(2).unwrap_or_default();
        if !matches!(domain_tok, "dlq" | "*" | ">") {
            return Err(Error::config(format!(
                "purge: pattern {:?} does not select dlq topics (only ampy.{{env}}.dlq.v1.… can be purged)",
                pattern.as_str()
            )));
        }
        let db = self.db_path().to_path_buf();
        let busy = self.options().busy_timeout;
        let pattern = pattern.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<StoredMessage>> {
            let storage = |what: &str, e: rusqlite::Error| {
                crate::transport::embedded::storage(&db, &format!("purge: {what}"), e)
            };
            let mut conn = Connection::open(&db).map_err(|e| storage("open", e))?;
            conn.busy_timeout(busy).map_err(|e| storage("busy timeout", e))?;
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| storage("begin", e))?;
            let mut selected = Vec::new();
            {
                let mut st = tx
                    .prepare("SELECT seq, topic, log_us, headers, payload FROM messages WHERE domain = ?1 ORDER BY seq")
                    .map_err(|e| storage("select", e))?;
                let rows = st
                    .query_map(params![Domain::Dlq.as_str()], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, Vec<u8>>(3)?,
                            r.get::<_, Vec<u8>>(4)?,
                        ))
                    })
                    .map_err(|e| storage("select", e))?;
                for row in rows {
                    let (seq, topic, log_us, headers, payload) =
                        row.map_err(|e| storage("select", e))?;
                    let is_dlq = Topic::parse(&topic).is_ok_and(|t| t.domain() == Domain::Dlq);
                    if !is_dlq || !pattern.matches(&topic) {
                        continue;
                    }
                    // A damaged row stops the purge (nothing is deleted): its reason and ids
                    // cannot be checked against the selection.
                    let headers = decode_headers(&headers).map_err(|e| {
                        crate::transport::embedded::damaged_row(&db, seq, &topic, &e)
                    })?;
                    let m = StoredMessage {
                        sequence: seq as u64,
                        stored_at: DateTime::from_timestamp_micros(log_us).unwrap_or_default(),
                        envelope: Envelope {
                            topic,
                            headers,
                            payload: Bytes::from(payload),
                        },
                    };
                    if filter(&m) {
                        selected.push(m);
                    }
                }
            }
            {
                let mut del = tx
                    .prepare("DELETE FROM messages WHERE seq = ?1")
                    .map_err(|e| storage("delete", e))?;
                let mut del_pending = tx
                    .prepare("DELETE FROM pending WHERE seq = ?1")
                    .map_err(|e| storage("delete pending", e))?;
                for m in &selected {
                    del.execute([m.sequence as i64])
                        .map_err(|e| storage("delete", e))?;
                    del_pending
                        .execute([m.sequence as i64])
                        .map_err(|e| storage("delete pending", e))?;
                }
            }
            tx.commit().map_err(|e| storage("commit", e))?;
            Ok(selected)
        })
        .await
        .map_err(|e| self.inner.task_failed("purge task", e))?
    }
}
