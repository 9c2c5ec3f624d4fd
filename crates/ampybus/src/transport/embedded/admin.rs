//! Read-only statistics of the embedded log: per-topic counts and per-consumer lag (used by
//! `ampybus topics`). Each is a scan of the logs in `spawn_blocking`; it never holds the
//! writer.

use super::group::{self, GroupState, Meta, slot};
use super::log::DomainReader;
use super::log::us_to_time;
use super::replay::domains_of;
use super::{EmbeddedLog, Inner};
use crate::error::Result;
use crate::topic::TopicPattern;
use std::collections::BTreeMap;
use std::ops::ControlFlow;

pub use crate::transport::{ConsumerStats, TopicStats};

fn topic_rows(inner: &Inner, pattern: &TopicPattern) -> Result<Vec<TopicStats>> {
    let snap = inner.shared.snapshot();
    let mut by_topic: BTreeMap<String, TopicStats> = BTreeMap::new();
    for d in domains_of(pattern) {
        let e = snap.domains[d];
        if e.last_seq == 0 {
            continue;
        }
        DomainReader::new(&inner.dir, d, 0).scan(&e, |rec| {
            if !pattern.matches(&rec.topic) {
                return Ok(ControlFlow::Continue(()));
            }
            let t = by_topic
                .entry(rec.topic.to_string())
                .or_insert_with(|| TopicStats {
                    topic: rec.topic.to_string(),
                    messages: 0,
                    bytes: Some(0),
                    oldest: us_to_time_opt(rec.log_us),
                    newest: None,
                    first_seq: rec.seq,
                    last_seq: rec.seq,
                });
            t.messages += 1;
            t.bytes = Some(t.bytes.unwrap_or(0) + u64::from(rec.stored));
            t.newest = us_to_time_opt(rec.log_us);
            t.last_seq = rec.seq;
            Ok(ControlFlow::Continue(()))
        })?;
    }
    Ok(by_topic.into_values().collect())
}

fn us_to_time_opt(us: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    Some(us_to_time(us))
}

/// Lag of one group: messages of its pattern after its positions and not acked; in flight:
/// those of them handed out already.
fn group_row(inner: &Inner, meta: &Meta, st: &GroupState) -> Result<Option<ConsumerStats>> {
    let Ok(pattern) = TopicPattern::parse(&meta.pattern) else {
        return Ok(None);
    };
    let snap = inner.shared.snapshot();
    let (mut lag, mut in_flight, mut newest) = (0u64, 0u64, 0u64);
    let cursor = st.positions.iter().copied().min().unwrap_or(0);
    // Partitions held by a live instance: only their handed-out messages are in flight (the
    // others' are delivered again to the next owner).
    let now = super::log::now_us();
    let held: u64 = st
        .leases
        .values()
        .filter(|l| l.expires_us > now)
        .fold(0, |m, l| m | l.mask);
    for d in domains_of(&pattern) {
        let e = snap.domains[d];
        if e.last_seq == 0 {
            continue;
        }
        let low = (0..group::PARTITIONS)
            .map(|p| st.positions[slot(d, p)])
            .min()
            .unwrap_or(0);
        DomainReader::new(&inner.dir, d, low).scan(&e, |rec| {
            if !pattern.matches(&rec.topic) {
                return Ok(ControlFlow::Continue(()));
            }
            newest = newest.max(rec.seq);
            let s = slot(d, rec.key_hash);
            if rec.seq <= st.positions[s] || st.acked.contains(s, rec.seq) {
                return Ok(ControlFlow::Continue(()));
            }
            lag += 1;
            if rec.seq <= st.delivered[s] && held & (1 << group::partition_of(s)) != 0 {
                in_flight += 1;
            }
            Ok(ControlFlow::Continue(()))
        })?;
    }
    Ok(Some(ConsumerStats {
        name: meta.name.clone(),
        pattern: meta.pattern.clone(),
        cursor: Some(cursor),
        in_flight,
        lag,
        newest_seq: Some(newest),
    }))
}

/// The row of one group, through this handle's journal of it (opened once, then caught up:
/// a lag poll must not replay a whole journal each time).
fn named_row(inner: &Inner, name: &str) -> Result<Option<ConsumerStats>> {
    let dir = group::group_dir(&inner.dir, name);
    let Some(meta) = Meta::read(&dir)? else {
        return Ok(None);
    };
    if meta.pattern.is_empty() {
        return Ok(None);
    }
    let j = inner.group(name, || Ok(meta.clone()))?;
    let state = {
        let mut j = j.lock().unwrap_or_else(|p| p.into_inner());
        j.catch_up(false)?;
        // Positions, acks, deliveries and leases; not the dedupe records.
        GroupState {
            positions: j.state.positions.clone(),
            delivered: j.state.delivered.clone(),
            acked: j.state.acked.clone(),
            nacked: Default::default(),
            leases: j.state.leases.clone(),
            dedupe: Default::default(),
        }
    };
    group_row(
        inner,
        &j.lock().unwrap_or_else(|p| p.into_inner()).meta.clone(),
        &state,
    )
}

fn consumer_rows(inner: &Inner) -> Result<Vec<ConsumerStats>> {
    let root = inner.dir.join("groups");
    let rd = match std::fs::read_dir(&root) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(super::shared::io_error(&root, "listing consumer groups", e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| super::shared::io_error(&root, "listing consumer groups", e))?;
        let Some(meta) = Meta::read(&ent.path())? else {
            continue;
        };
        if let Some(row) = named_row(inner, &meta.name)? {
            out.push(row);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
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
        let inner = self.inner.clone();
        let pattern = pattern.clone();
        tokio::task::spawn_blocking(move || topic_rows(&inner, &pattern))
            .await
            .map_err(|e| self.inner.task_failed("topic stats task", e))?
    }

    /// Position (the lowest of its partitions'), in-flight count and lag of every durable
    /// consumer, sorted by name.
    ///
    /// Lag counts the messages after the positions whose topic matches the consumer's pattern,
    /// minus those already acknowledged out of order; in flight are those of them already
    /// handed out.
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
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || consumer_rows(&inner))
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
        let inner = self.inner.clone();
        let name = consumer.to_owned();
        let row = tokio::task::spawn_blocking(move || named_row(&inner, &name))
            .await
            .map_err(|e| self.inner.task_failed("consumer lag task", e))??;
        Ok(row.map(|c| crate::transport::Lag {
            pending: c.lag,
            in_flight: c.in_flight,
        }))
    }
}
