//! Topic and consumer statistics and lag, from watermarks and committed offsets.
//!
//! * A topic row is one Kafka topic of the namespace (name without the namespace):
//!   `messages` = Σ (high − low watermark) over its partitions, `first_seq`/`last_seq` the
//!   lowest low watermark and the highest offset (offsets of different partitions are not
//!   comparable; `bytes` and the store times are not reported).
//! * A consumer is a consumer group of the namespace (ephemeral readers' groups excluded);
//!   its lag = Σ (high watermark − committed offset) over the partitions it committed on,
//!   `in_flight` = records this process's subscriptions of the group handed out and did not
//!   acknowledge yet, `pattern` = the Kafka topics it committed on.

use super::{KafkaTransport, Shared, kafka_error};
use crate::error::{Error, Result};
use crate::topic::TopicPattern;
use crate::transport::{ConsumerLag, ConsumerStats, Inspect, Lag, TopicStats};
use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;

/// A consumer for admin reads in `group` (never subscribes, never commits).
fn admin_consumer(shared: &Shared, group: &str) -> Result<BaseConsumer<super::Quiet>> {
    let mut cfg = shared.opts.client_config();
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    cfg.create_with_context(super::Quiet)
        .map_err(|e| kafka_error(&shared.where_(), "invalid consumer settings", e))
}

/// `(topics committed on, Σ high − committed)` of `group` over the namespace's topics.
fn group_lag(
    shared: &Shared,
    group: &str,
    topics: &[(String, usize)],
) -> Result<Option<(Vec<String>, u64)>> {
    let where_ = format!("{} group {group}", shared.where_());
    let timeout = shared.opts.request_timeout;
    let consumer = admin_consumer(shared, group)?;
    let mut tpl = TopicPartitionList::new();
    for (t, n) in topics {
        for p in 0..*n as i32 {
            tpl.add_partition(t, p);
        }
    }
    if tpl.count() == 0 {
        return Ok(None);
    }
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .map_err(|e| kafka_error(&where_, "committed offsets", e))?;
    let mut lag = 0u64;
    let mut on: Vec<String> = Vec::new();
    for e in committed.elements() {
        let Offset::Offset(c) = e.offset() else {
            continue;
        };
        let (_, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .map_err(|err| kafka_error(&where_, "watermarks", err))?;
        lag += u64::try_from(high - c).unwrap_or(0);
        if !on.iter().any(|t| t == e.topic()) {
            on.push(e.topic().to_owned());
        }
    }
    if on.is_empty() {
        return Ok(None);
    }
    on.sort();
    Ok(Some((on, lag)))
}

impl KafkaTransport {
    /// Records handed out and not acknowledged by this process's subscriptions of `group`,
    /// and whether there is any.
    fn local_in_flight(&self, group: &str) -> (bool, u64) {
        let subs = self.shared.subs.lock().unwrap_or_else(|p| p.into_inner());
        let mut any = false;
        let mut n = 0;
        for s in subs.iter().filter_map(|w| w.upgrade()) {
            if s.group == group {
                any = true;
                n += s.unsettled();
            }
        }
        (any, n)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let shared: Arc<Shared> = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| Error::transport("kafka: admin task failed", e))?
    }

    async fn namespace_topics(&self) -> Result<Vec<(String, usize)>> {
        let everything = TopicPattern::parse(">")?;
        self.shared.topics_for(&everything).await
    }
}

#[async_trait]
impl Inspect for KafkaTransport {
    async fn topic_stats(&self, pattern: &TopicPattern) -> Result<Vec<TopicStats>> {
        let topics = self.shared.topics_for(pattern).await?;
        self.blocking(move |shared| {
            let consumer = admin_consumer(shared, "ampy-inspect")?;
            let timeout = shared.opts.request_timeout;
            let mut out = Vec::new();
            for (t, n) in &topics {
                let mut messages = 0u64;
                let mut first: Option<i64> = None;
                let mut last: i64 = -1;
                for p in 0..*n as i32 {
                    let (low, high) = consumer.fetch_watermarks(t, p, timeout).map_err(|e| {
                        kafka_error(&shared.where_(), &format!("watermarks of {t}/{p}"), e)
                    })?;
                    messages += u64::try_from(high - low).unwrap_or(0);
                    if high > low {
                        first = Some(first.map_or(low, |f| f.min(low)));
                        last = last.max(high - 1);
                    }
                }
                out.push(TopicStats {
                    topic: t
                        .strip_prefix(&shared.opts.namespace)
                        .unwrap_or(t)
                        .to_owned(),
                    messages,
                    bytes: None,
                    oldest: None,
                    newest: None,
                    first_seq: u64::try_from(first.unwrap_or(0)).unwrap_or(0),
                    last_seq: u64::try_from(last.max(0)).unwrap_or(0),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn consumer_stats(&self) -> Result<Vec<ConsumerStats>> {
        let topics = self.namespace_topics().await?;
        let ns = self.shared.opts.namespace.clone();
        let groups: Vec<String> = self
            .blocking(move |shared| {
                let consumer = admin_consumer(shared, "ampy-inspect")?;
                let list = consumer
                    .fetch_group_list(None, shared.opts.request_timeout)
                    .map_err(|e| kafka_error(&shared.where_(), "list groups", e))?;
                let mut g: Vec<String> = list
                    .groups()
                    .iter()
                    .map(|g| g.name().to_owned())
                    .filter(|g| {
                        g.starts_with(&ns)
                            && !g[ns.len()..].starts_with("ampy-reader-")
                            && !g[ns.len()..].starts_with("ampy-replay-")
                            && !g[ns.len()..].starts_with("ampy-inspect")
                    })
                    .collect();
                g.sort();
                g.dedup();
                Ok(g)
            })
            .await?;
        let mut out = Vec::new();
        for group in groups {
            let (_, in_flight) = self.local_in_flight(&group);
            let t = topics.clone();
            let g = group.clone();
            let lag = self
                .blocking(move |shared| group_lag(shared, &g, &t))
                .await?;
            let ns = &self.shared.opts.namespace;
            let (on, lag) = lag.unwrap_or_default();
            out.push(ConsumerStats {
                name: group.strip_prefix(ns.as_str()).unwrap_or(&group).to_owned(),
                pattern: on
                    .iter()
                    .map(|t| t.strip_prefix(ns.as_str()).unwrap_or(t))
                    .collect::<Vec<_>>()
                    .join(","),
                cursor: None,
                in_flight,
                lag: lag.max(in_flight),
                newest_seq: None,
            });
        }
        Ok(out)
    }
}

#[async_trait]
impl ConsumerLag for KafkaTransport {
    async fn lag(&self, consumer: &str) -> Result<Option<Lag>> {
        let group = self.shared.opts.group_id(consumer);
        let (local, in_flight) = self.local_in_flight(&group);
        let topics = self.namespace_topics().await?;
        let g = group.clone();
        let lag = self
            .blocking(move |shared| group_lag(shared, &g, &topics))
            .await?;
        Ok(match lag {
            Some((_, pending)) => Some(Lag {
                pending: pending.max(in_flight),
                in_flight,
            }),
            None if local => Some(Lag {
                pending: in_flight,
                in_flight,
            }),
            None => None,
        })
    }
}
