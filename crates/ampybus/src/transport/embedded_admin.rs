//! Read-only statistics of the embedded log: per-topic counts and per-consumer lag.
//!
//! Used by `ampybus topics`. Every query runs on its own read connection in
//! `spawn_blocking`, so it never holds the writer.

use crate::error::{Error, Result};
use crate::topic::TopicPattern;
use crate::transport::embedded::EmbeddedLog;
use chrono::{DateTime, Utc};
use rusqlite::Connection;
use std::collections::BTreeMap;

pub use super::{ConsumerStats, TopicStats};

/// An error of `conn`'s database file, keeping SQLite's cause and the path in the message.
fn sql_at(conn: &Connection, what: &str, e: rusqlite::Error) -> Error {
    let db = std::path::Path::new(conn.path().unwrap_or("(in memory)"));
    crate::transport::embedded::storage(db, what, e)
}

fn us_to_time(us: i64) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_micros(us)
}

fn topic_rows(conn: &Connection, pattern: &TopicPattern) -> Result<Vec<TopicStats>> {
    let mut stmt = conn
        .prepare(
            "SELECT topic, COUNT(*), COALESCE(SUM(size), 0), MIN(log_us), MAX(log_us), \
             MIN(seq), MAX(seq) FROM messages GROUP BY topic ORDER BY topic",
        )
        .map_err(|e| sql_at(conn, "topic stats", e))?;
    let rows = stmt
        .query_map([], |r| {
            Ok(TopicStats {
                topic: r.get(0)?,
                messages: r.get::<_, i64>(1)? as u64,
                bytes: Some(r.get::<_, i64>(2)? as u64),
                oldest: us_to_time(r.get(3)?),
                newest: us_to_time(r.get(4)?),
                first_seq: r.get::<_, i64>(5)? as u64,
                last_seq: r.get::<_, i64>(6)? as u64,
            })
        })
        .map_err(|e| sql_at(conn, "topic stats", e))?;
    let mut out = Vec::new();
    for row in rows {
        let row = row.map_err(|e| sql_at(conn, "topic stats", e))?;
        if pattern.matches(&row.topic) {
            out.push(row);
        }
    }
    Ok(out)
}

/// Sums per-topic counts over the topics `pattern` matches.
fn sum_matching(
    conn: &Connection,
    query: &str,
    params: impl rusqlite::Params,
    pattern: &TopicPattern,
) -> Result<(u64, u64)> {
    let mut stmt = conn
        .prepare(query)
        .map_err(|e| sql_at(conn, "consumer stats", e))?;
    let mut rows = stmt
        .query(params)
        .map_err(|e| sql_at(conn, "consumer stats", e))?;
    let (mut count, mut max_seq) = (0u64, 0u64);
    while let Some(r) = rows.next().map_err(|e| sql_at(conn, "consumer stats", e))? {
        let topic: String = r.get(0).map_err(|e| sql_at(conn, "consumer stats", e))?;
        if pattern.matches(&topic) {
            count += r
                .get::<_, i64>(1)
                .map_err(|e| sql_at(conn, "consumer stats", e))? as u64;
            max_seq = max_seq.max(
                r.get::<_, i64>(2)
                    .map_err(|e| sql_at(conn, "consumer stats", e))? as u64,
            );
        }
    }
    Ok((count, max_seq))
}

fn consumer_rows(conn: &Connection) -> Result<Vec<ConsumerStats>> {
    let mut stmt = conn
        .prepare("SELECT name, pattern, cursor FROM consumers ORDER BY name")
        .map_err(|e| sql_at(conn, "consumer stats", e))?;
    let consumers: Vec<(String, String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(|e| sql_at(conn, "consumer stats", e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| sql_at(conn, "consumer stats", e))?;
    // Topic list with newest seq, once: for `newest_seq`.
    let mut newest: BTreeMap<String, i64> = BTreeMap::new();
    {
        let mut s = conn
            .prepare("SELECT topic, MAX(seq) FROM messages GROUP BY topic")
            .map_err(|e| sql_at(conn, "consumer stats", e))?;
        let rows = s
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(|e| sql_at(conn, "consumer stats", e))?;
        for row in rows {
            let (t, m) = row.map_err(|e| sql_at(conn, "consumer stats", e))?;
            newest.insert(t, m);
        }
    }
    let mut out = Vec::with_capacity(consumers.len());
    for (name, pattern_s, cursor) in consumers {
        let Ok(pattern) = TopicPattern::parse(&pattern_s) else {
            continue;
        };
        let (after_cursor, _) = sum_matching(
            conn,
            "SELECT topic, COUNT(*), MAX(seq) FROM messages WHERE seq > ?1 GROUP BY topic",
            [cursor],
            &pattern,
        )?;
        let (acked, _) = sum_matching(
            conn,
            "SELECT m.topic, COUNT(*), MAX(m.seq) FROM pending p JOIN messages m ON m.seq = p.seq \
             WHERE p.consumer = ?1 AND p.acked != 0 AND p.seq > ?2 GROUP BY m.topic",
            rusqlite::params![name, cursor],
            &pattern,
        )?;
        // Leased (held or expired) or waiting out a retry delay; a message released for
        // redelivery now (nack without delay) is held by nobody.
        let in_flight: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM pending WHERE consumer = ?1 AND acked = 0 \
                 AND (owner IS NOT NULL OR not_before_us > ?2)",
                rusqlite::params![name, chrono::Utc::now().timestamp_micros()],
                |r| r.get(0),
            )
            .map_err(|e| sql_at(conn, "consumer stats", e))?;
        let newest_seq = newest
            .iter()
            .filter(|(t, _)| pattern.matches(t))
            .map(|(_, m)| *m as u64)
            .max()
            .unwrap_or(0);
        out.push(ConsumerStats {
            name,
            pattern: pattern_s,
            cursor: Some(cursor.max(0) as u64),
            in_flight: in_flight as u64,
            lag: after_cursor.saturating_sub(acked),
            newest_seq: Some(newest_seq),
        });
    }
    Ok(out)
}

impl EmbeddedLog {
    /// Per-topic statistics of the topics `pattern` matches, sorted by topic.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Headers, Topic, TopicPattern};
    /// use ampybus::transport::embedded::{EmbeddedLog, EmbeddedOptions};
    /// use std::sync::Arc;
    /// let dir = tempfile::tempdir().unwrap();
    /// let log = EmbeddedLog::open(EmbeddedOptions::new(dir.path())).unwrap();
    /// let bus = Bus::with_transport(Arc::new(log.clone()), dir.path().to_str().unwrap());
    /// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    /// let h = Headers::for_publish("ampy.news.v1.Raw", "me@host", "cli", "n-1");
    /// bus.publish(&topic, h, b"hello".to_vec()).await.unwrap();
    /// let stats = log.topic_stats(&TopicPattern::parse(">").unwrap()).await.unwrap();
    /// assert_eq!(stats.len(), 1);
    /// assert_eq!(stats[0].messages, 1);
    /// assert!(stats[0].bytes.unwrap() > 0);
    /// bus.close().await.unwrap();
    /// # });
    /// ```
    pub async fn topic_stats(&self, pattern: &TopicPattern) -> Result<Vec<TopicStats>> {
        let conn = self.inner.reader()?;
        let pattern = pattern.clone();
        tokio::task::spawn_blocking(move || topic_rows(&conn, &pattern))
            .await
            .map_err(|e| self.inner.task_failed("topic stats task", e))?
    }

    /// Position, in-flight leases and lag of every durable consumer, sorted by name.
    ///
    /// Lag counts the messages after the cursor whose topic matches the consumer's pattern,
    /// minus those already acknowledged out of order.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::transport::embedded::{EmbeddedLog, EmbeddedOptions};
    /// let dir = tempfile::tempdir().unwrap();
    /// let log = EmbeddedLog::open(EmbeddedOptions::new(dir.path())).unwrap();
    /// assert!(log.consumer_stats().await.unwrap().is_empty());
    /// # });
    /// ```
    pub async fn consumer_stats(&self) -> Result<Vec<ConsumerStats>> {
        let conn = self.inner.reader()?;
        tokio::task::spawn_blocking(move || consumer_rows(&conn))
            .await
            .map_err(|e| self.inner.task_failed("consumer stats task", e))?
    }
}

#[async_trait::async_trait]
impl crate::transport::Inspect for EmbeddedLog {
    async fn topic_stats(&self, pattern: &TopicPattern) -> Result<Vec<TopicStats>> {
        EmbeddedLog::topic_stats(self, pattern).await
    }

    async fn consumer_stats(&self) -> Result<Vec<ConsumerStats>> {
        EmbeddedLog::consumer_stats(self).await
    }
}

#[async_trait::async_trait]
impl crate::transport::ConsumerLag for EmbeddedLog {
    /// The lag and in-flight count of [`EmbeddedLog::consumer_stats`] for one consumer.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::transport::ConsumerLag;
    /// use ampybus::transport::embedded::{EmbeddedLog, EmbeddedOptions};
    /// let dir = tempfile::tempdir().unwrap();
    /// let log = EmbeddedLog::open(EmbeddedOptions::new(dir.path())).unwrap();
    /// assert!(log.lag("nobody").await.unwrap().is_none());
    /// # });
    /// ```
    async fn lag(&self, consumer: &str) -> Result<Option<crate::transport::Lag>> {
        Ok(self
            .consumer_stats()
            .await?
            .into_iter()
            .find(|c| c.name == consumer)
            .map(|c| crate::transport::Lag {
                pending: c.lag,
                in_flight: c.in_flight,
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::embedded::SCHEMA;

    #[test]
    fn lag_subtracts_out_of_order_acks() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        for (i, topic) in [
            "ampy.dev.news.v1.a",
            "ampy.dev.news.v1.a",
            "ampy.dev.bars.v1.b",
        ]
        .iter()
        .cycle()
        .take(9)
        .enumerate()
        {
            conn.execute(
                "INSERT INTO messages(topic, domain, pkey, message_id, log_us, size, headers, payload) \
                 VALUES (?1, 'news', 'k', ?2, ?3, 10, x'', x'')",
                rusqlite::params![topic, format!("m{i}"), i as i64],
            )
            .unwrap();
        }
        // seqs 1..=9; news at 1,2,4,5,7,8; bars at 3,6,9.
        conn.execute(
            "INSERT INTO consumers(name, pattern, cursor, created_us) VALUES ('c', 'ampy.dev.news.>', 2, 0)",
            [],
        )
        .unwrap();
        // 5 and 8 acked out of order, 4 in flight, 7 released (nacked without delay).
        for (seq, acked) in [(4, 0), (5, 1), (8, 1)] {
            conn.execute(
                "INSERT INTO pending(consumer, seq, pkey, owner, not_before_us, deliveries, acked) \
                 VALUES ('c', ?1, 'k', 'o', 0, 1, ?2)",
                [seq, acked],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO pending(consumer, seq, pkey, owner, not_before_us, deliveries, acked) \
             VALUES ('c', 7, 'k', NULL, 0, 1, 0)",
            [],
        )
        .unwrap();
        let stats = consumer_rows(&conn).unwrap();
        assert_eq!(stats.len(), 1);
        let c = &stats[0];
        // After cursor 2 the news messages are 4, 5, 7, 8; 5 and 8 are acked.
        assert_eq!(c.lag, 2);
        assert_eq!(c.in_flight, 1);
        assert_eq!(c.cursor, Some(2));
        assert_eq!(c.newest_seq, Some(8));
        let topics = topic_rows(&conn, &TopicPattern::parse("ampy.dev.news.>").unwrap()).unwrap();
        assert_eq!(topics.len(), 1);
        assert_eq!((topics[0].messages, topics[0].bytes), (6, Some(60)));
        assert_eq!((topics[0].first_seq, topics[0].last_seq), (1, 8));
    }
}
