//! Consumer lag and per-topic statistics from JetStream stream and consumer info: the NATS
//! side of [`ConsumerLag`] and [`Inspect`] (`ampybus topics list|describe|lag`).
//!
//! The streams asked are those this binding publishes to and reads from: the ones named with
//! its `stream_prefix`, and any other stream that captures a whole `ampy.{env}.{domain}.>`
//! (the seed's `AMPY` on `ampy.>`, or another namespace's stream that was there first: the
//! binding then uses it, see [`streams`]). A durable consumer whose pattern spans several domains
//! has one JetStream consumer per stream; its figures are summed over them.

use super::{NatsTransport, consume, streams};
use crate::error::{Error, ErrorKind, Result};
use crate::topic::TopicPattern;
use crate::transport::{ConsumerLag, ConsumerStats, Inspect, Lag, TopicStats};
use async_nats::jetstream::{consumer, stream};
use async_trait::async_trait;
use futures::TryStreamExt;
use std::collections::BTreeMap;

impl NatsTransport {
    /// The streams this binding uses: named with its prefix, or capturing a whole domain.
    async fn own_streams(&self) -> Result<Vec<stream::Info>> {
        let prefix = self.shared.opts.stream_prefix.as_str();
        Ok(streams::list(&self.shared.js)
            .await?
            .into_iter()
            .filter(|i| {
                i.config.name.starts_with(prefix)
                    || i.config.subjects.iter().any(|s| captures_a_domain(s))
            })
            .collect())
    }

    fn info_err(&self, what: String, e: impl Into<crate::error::BoxError>) -> Error {
        Error::with_source(
            ErrorKind::Transport,
            format!("{}: {what}", self.shared.where_()),
            e,
        )
    }
}

/// One durable consumer's figures, summed over the streams it has a JetStream consumer on.
#[derive(Default)]
struct Sum {
    filters: Vec<String>,
    streams: u32,
    cursor: u64,
    newest: u64,
    lag: Lag,
}

impl Sum {
    fn add(&mut self, ci: &consumer::Info) {
        self.streams += 1;
        let filter = &ci.config.filter_subject;
        if !filter.is_empty() && !self.filters.contains(filter) {
            self.filters.push(filter.clone());
        }
        self.lag.pending += ci.num_pending + ci.num_ack_pending as u64;
        self.lag.in_flight += ci.num_ack_pending as u64;
        self.cursor = ci.ack_floor.stream_sequence;
        self.newest = ci.delivered.stream_sequence + ci.num_pending;
    }

    fn stats(self, name: String) -> ConsumerStats {
        let single = self.streams == 1;
        ConsumerStats {
            name,
            pattern: self.filters.join(","),
            cursor: single.then_some(self.cursor),
            in_flight: self.lag.in_flight,
            lag: self.lag.pending,
            newest_seq: single.then_some(self.newest),
        }
    }
}

/// True for a stream subject that holds every topic of some env and domain: `ampy.>`,
/// `ampy.{env}.>`, `ampy.{env}.{domain}.>` (tokens may be `*`).
fn captures_a_domain(subject: &str) -> bool {
    let tokens: Vec<&str> = subject.split('.').collect();
    tokens.len() <= 4 && tokens.first() == Some(&"ampy") && tokens.last() == Some(&">")
}

fn not_found(e: &impl std::fmt::Display) -> bool {
    e.to_string().to_lowercase().contains("not found")
}

/// Lag of a durable consumer from JetStream consumer info, summed over every stream of the
/// namespace that has a consumer of that name: `pending` = `num_pending` (not yet delivered) +
/// `num_ack_pending` (delivered, not acked), `in_flight` = `num_ack_pending`. `None` when no
/// stream has it.
#[async_trait]
impl ConsumerLag for NatsTransport {
    async fn lag(&self, consumer: &str) -> Result<Option<Lag>> {
        let name = consume::consumer_name(consumer);
        let mut sum: Option<Sum> = None;
        for info in self.own_streams().await? {
            let Ok(stream) = self.shared.js.get_stream(&info.config.name).await else {
                continue;
            };
            match stream.consumer_info(&name).await {
                Ok(ci) => sum.get_or_insert_with(Sum::default).add(&ci),
                Err(e) if not_found(&e) => {}
                Err(e) => {
                    let what = format!("consumer info of `{name}` on stream {}", info.config.name);
                    return Err(self.info_err(what, e));
                }
            }
        }
        Ok(sum.map(|s| s.lag))
    }
}

/// Topics are the subjects the namespace's streams hold (JetStream reports message counts per
/// subject; sizes only per stream, so `bytes` is `None`); first and last sequence and time are
/// read from the first and last message of each subject. Consumers are the durable JetStream
/// consumers on those streams, summed by name.
#[async_trait]
impl Inspect for NatsTransport {
    async fn topic_stats(&self, pattern: &TopicPattern) -> Result<Vec<TopicStats>> {
        let mut out = Vec::new();
        for info in self.own_streams().await? {
            let name = info.config.name.clone();
            let captures = info
                .config
                .subjects
                .iter()
                .any(|s| streams::subject_intersection(s, pattern.as_str()).is_some());
            if !captures || info.state.messages == 0 {
                continue;
            }
            let stream = self
                .shared
                .js
                .get_stream(&name)
                .await
                .map_err(|e| self.info_err(format!("stream {name}"), e))?;
            let counts: Vec<(String, usize)> = stream
                .info_with_subjects(pattern.as_str())
                .await
                .map_err(|e| self.info_err(format!("subjects of stream {name}"), e))?
                .try_collect()
                .await
                .map_err(|e| self.info_err(format!("subjects of stream {name}"), e))?;
            for (subject, messages) in counts {
                if !pattern.matches(&subject) {
                    continue;
                }
                let first = stream
                    .get_first_raw_message_by_subject(&subject, info.state.first_sequence)
                    .await
                    .map_err(|e| self.info_err(format!("first message of {subject}"), e))?;
                let last = stream
                    .get_last_raw_message_by_subject(&subject)
                    .await
                    .map_err(|e| self.info_err(format!("last message of {subject}"), e))?;
                out.push(TopicStats {
                    topic: subject,
                    messages: messages as u64,
                    bytes: None,
                    oldest: Some(first.time),
                    newest: Some(last.time),
                    first_seq: first.sequence,
                    last_seq: last.sequence,
                });
            }
        }
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        Ok(out)
    }

    async fn consumer_stats(&self) -> Result<Vec<ConsumerStats>> {
        let mut by_name: BTreeMap<String, Sum> = BTreeMap::new();
        for info in self.own_streams().await? {
            let name = info.config.name.clone();
            let stream = match self.shared.js.get_stream(&name).await {
                Ok(s) => s,
                Err(e) if not_found(&e) => continue,
                Err(e) => return Err(self.info_err(format!("stream {name}"), e)),
            };
            let consumers: Vec<consumer::Info> = stream
                .consumers()
                .try_collect()
                .await
                .map_err(|e| self.info_err(format!("consumers of stream {name}"), e))?;
            for ci in consumers {
                if ci.config.durable_name.is_none() {
                    continue;
                }
                by_name.entry(ci.name.clone()).or_default().add(&ci);
            }
        }
        Ok(by_name.into_iter().map(|(n, s)| s.stats(n)).collect())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn which_subjects_capture_a_domain() {
        for s in ["ampy.>", "ampy.dev.>", "ampy.dev.news.>", "ampy.*.news.>"] {
            assert!(super::captures_a_domain(s), "{s}");
        }
        for s in [
            "ampy.dev.news.v1.>",
            "ampy.dev.news.v1.raw",
            "other.>",
            ">",
            "ampy.dev.news",
        ] {
            assert!(!super::captures_a_domain(s), "{s}");
        }
    }
}
