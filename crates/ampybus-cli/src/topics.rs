//! `ampybus topics`: what the log or broker holds per topic and how far behind consumers are
//! (any transport with the [`Inspect`] capability: the embedded log, NATS, Redis, Kafka).

use crate::error::{CliError, CliResult, EXIT_OK};
use crate::util;
use ampybus::bus::{TransportKind, redact, transport_kind};
use ampybus::transport::embedded::EmbeddedOptions;
use ampybus::transport::{ConsumerStats, Inspect, TopicStats};
use ampybus::{Domain, TopicPattern};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// `ampybus topics`.
#[derive(Debug, Args)]
pub struct TopicsArgs {
    #[command(subcommand)]
    pub command: TopicsCommand,
}

/// The `topics` subcommands.
#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// One row per stored topic: messages, bytes, sequences, store times
    #[command(after_help = "\
Examples:
  ampybus topics list
  ampybus topics list --pattern 'ampy.prod.bars.>' --json")]
    List {
        /// Only topics matching this pattern
        #[arg(long, value_name = "PAT", default_value = ">")]
        pattern: String,
        /// One JSON object per topic per line
        #[arg(long)]
        json: bool,
    },
    /// Totals of a topic or pattern, its oldest stored message, the retention in force and
    /// the durable consumers reading it, with their lag
    #[command(after_help = "\
Examples:
  ampybus topics describe ampy.dev.news.v1.raw
  ampybus topics describe 'ampy.prod.>' --json

Retention (embedded log): per domain of the described topics, as the URL's options set it
(each process applies its own URL's retention, and only after its first publish).")]
    Describe {
        /// A concrete topic or a pattern
        #[arg(value_name = "TOPIC_OR_PATTERN")]
        target: String,
        /// One JSON object
        #[arg(long)]
        json: bool,
    },
    /// Durable consumers: cursor, in-flight leases, lag
    #[command(after_help = "\
Examples:
  ampybus topics lag
  ampybus topics lag --consumer audit --json

Lag: messages after the cursor matching the consumer's pattern, not yet acknowledged.")]
    Lag {
        /// Only this consumer
        #[arg(long, value_name = "NAME")]
        consumer: Option<String>,
        /// One JSON object per consumer per line
        #[arg(long)]
        json: bool,
    },
}

/// Runs `ampybus topics …` on any transport that can be inspected (embedded log, NATS, Redis,
/// Kafka).
pub async fn run(url: &str, args: TopicsArgs) -> CliResult<u8> {
    let bus = util::connect_existing(url).await?;
    let result = match bus.transport().inspect() {
        Some(inspect) => dispatch(url, inspect, args.command).await,
        None => Err(CliError::usage(format!(
            "--url {:?}: topics list/describe/lag is not available on the {} transport",
            redact(url),
            bus.transport().name()
        ))),
    };
    let closed = bus
        .close()
        .await
        .map_err(|e| CliError::bus("closing the bus", &e));
    let code = result?;
    closed?;
    Ok(code)
}

/// The retention in force per domain of the described topics (and of the pattern's literal
/// domain), on the embedded log: as the URL's options (and the registry, when given) set it. `None` on a broker, where the
/// broker holds it (NATS: `streams describe`; Kafka: the topic's `retention.ms`).
fn retention_rows(
    url: &str,
    pattern: &TopicPattern,
    topics: &[TopicStats],
) -> Option<Vec<(Domain, ampybus::transport::embedded::DomainRetention)>> {
    if transport_kind(url).ok()? != TransportKind::Embedded {
        return None;
    }
    let mut opts = EmbeddedOptions::from_url(url).ok()?;
    // With a registry, its retention is what the log applies (see `Bus::connect_with_registry`).
    if let Some(reg) = util::registry() {
        opts.apply_registry_retention(&reg.unit_retentions());
    }
    let domain_of = |s: &str| s.split('.').nth(2).and_then(|d| d.parse::<Domain>().ok());
    let mut domains: Vec<Domain> = topics
        .iter()
        .filter_map(|t| domain_of(&t.topic))
        .chain(domain_of(pattern.as_str()))
        .collect();
    domains.sort_by_key(|d| d.as_str());
    domains.dedup();
    Some(
        domains
            .into_iter()
            .map(|d| (d, opts.retention_for(d)))
            .collect(),
    )
}

fn pattern_arg(flag: &str, s: &str) -> CliResult<TopicPattern> {
    TopicPattern::parse(s).map_err(|e| CliError::bus(format!("{flag} {s:?}"), &e))
}

async fn dispatch(url: &str, log: &dyn Inspect, cmd: TopicsCommand) -> CliResult<u8> {
    let bus_err = |e: ampybus::Error| CliError::bus("reading statistics", &e);
    match cmd {
        TopicsCommand::List { pattern, json } => {
            let pattern = pattern_arg("--pattern", &pattern)?;
            let topics = log.topic_stats(&pattern).await.map_err(bus_err)?;
            let reg = util::registry();
            let mut out = String::new();
            if json {
                for t in &topics {
                    let mut v = topic_json(t);
                    if let Some(r) = &reg {
                        v["registry"] = r
                            .entry_for(&t.topic)
                            .map(crate::registry::entry_info)
                            .into();
                    }
                    out.push_str(&v.to_string());
                    out.push('\n');
                }
            } else {
                out.push_str(&topic_table(&topics, reg.as_ref()));
            }
            print(&out)?;
        }
        TopicsCommand::Describe { target, json } => {
            let pattern = pattern_arg("TOPIC_OR_PATTERN", &target)?;
            let topics = log.topic_stats(&pattern).await.map_err(bus_err)?;
            let consumers: Vec<ConsumerStats> = log
                .consumer_stats()
                .await
                .map_err(bus_err)?
                .into_iter()
                .filter(|c| reads(c, &pattern, &topics))
                .collect();
            let messages: u64 = topics.iter().map(|t| t.messages).sum();
            let bytes: Option<u64> = topics.iter().map(|t| t.bytes).sum();
            let oldest = topics.iter().filter_map(|t| t.oldest).min();
            let retention = retention_rows(url, &pattern, &topics);
            let (tier, tier_source) = ampybus::tier::of_pattern(
                util::registry().as_ref(),
                &ampybus::tier::TierTable::default(),
                &pattern,
                None,
            );
            let out = if json {
                let v = json!({
                    "pattern": pattern.as_str(),
                    "topics": topics.iter().map(topic_json).collect::<Vec<_>>(),
                    "messages": messages,
                    "bytes": bytes,
                    "oldest": oldest.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)),
                    "retention": retention.as_ref().map(|rows| rows.iter().map(|(d, r)| json!({
                        "domain": d.as_str(),
                        "max_age_seconds": r.max_age.map(|a| a.as_secs()),
                        "max_bytes": r.max_bytes,
                        "text": r.to_string(),
                    })).collect::<Vec<_>>()),
                    "consumers": consumers.iter().map(consumer_json).collect::<Vec<_>>(),
                    "registry": registry_entry(&pattern),
                    "tier": {"tier": tier.as_str(), "source": tier_source.as_str()},
                });
                format!("{v}\n")
            } else {
                let mut s = format!(
                    "pattern   {}\ntopics    {}\nmessages  {messages}\nbytes     {}\noldest    {}\n",
                    pattern.as_str(),
                    topics.len(),
                    opt(bytes),
                    time(oldest)
                );
                match &retention {
                    None => s.push_str("retention held by the broker (NATS: `streams describe`; Kafka: the topic's retention.ms; Redis: the publishers' max_age_days)\n"),
                    Some(rows) if rows.is_empty() => s.push_str("retention -\n"),
                    Some(rows) => {
                        for (i, (d, r)) in rows.iter().enumerate() {
                            let label = if i == 0 { "retention" } else { "" };
                            s.push_str(&format!("{label:<9} {}: {r}\n", d.as_str()));
                        }
                    }
                }
                if tier_source != ampybus::tier::TierSource::Registry {
                    s.push_str(&format!(
                        "tier      {tier} ({}; best_effort only by a registry entry or --tier)\n",
                        tier_source.as_str()
                    ));
                }
                if let Some(e) = registry_entry(&pattern) {
                    s.push_str(&format!(
                        "owner     {}\nschemas   {}\ntier      {}\nregistry retention {} days (entry {})\n",
                        e["owner"].as_str().unwrap_or("-"),
                        e["schemas"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default(),
                        e["tier"].as_str().unwrap_or("-"),
                        e["retention_days"],
                        e["pattern"].as_str().unwrap_or("-"),
                    ));
                }
                s.push('\n');
                s.push_str(&topic_table(&topics, util::registry().as_ref()));
                s.push('\n');
                s.push_str(&consumer_table(&consumers));
                s
            };
            print(&out)?;
        }
        TopicsCommand::Lag { consumer, json } => {
            let all = log.consumer_stats().await.map_err(bus_err)?;
            let consumers: Vec<ConsumerStats> = match &consumer {
                Some(name) => all.into_iter().filter(|c| &c.name == name).collect(),
                None => all,
            };
            if let Some(name) = &consumer
                && consumers.is_empty()
            {
                return Err(CliError::usage(format!(
                    "--consumer {name:?}: no durable consumer of that name"
                )));
            }
            let mut out = String::new();
            if json {
                for c in &consumers {
                    out.push_str(&consumer_json(c).to_string());
                    out.push('\n');
                }
            } else {
                out.push_str(&consumer_table(&consumers));
            }
            print(&out)?;
        }
    }
    Ok(EXIT_OK)
}

/// Whether the consumer reads the described topic(s): its pattern matches the literal topic
/// or one of the stored topics (or streams) the pattern selects.
fn reads(c: &ConsumerStats, pattern: &TopicPattern, topics: &[TopicStats]) -> bool {
    let Ok(cp) = TopicPattern::parse(&c.pattern) else {
        // Not a pattern: the stream names a consumer reads (Kafka: the topics its group
        // committed on, comma-separated), which are rows themselves.
        return c
            .pattern
            .split(',')
            .any(|name| topics.iter().any(|t| t.topic == name));
    };
    // A row that is not a concrete topic stands for a whole stream (Redis: one per
    // `ampy.{env}.{domain}.{version}`): read when the consumer's pattern covers the stream.
    let reads_stream = |t: &str| {
        ampybus::Topic::parse(t).is_err()
            && TopicPattern::parse(&format!("{t}.>")).is_ok_and(|tp| tp.is_within(&cp))
    };
    (pattern.is_literal() && cp.matches(pattern.as_str()))
        || topics
            .iter()
            .any(|t| cp.matches(&t.topic) || reads_stream(&t.topic))
}

fn print(s: &str) -> CliResult<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| CliError::transport(format!("writing stdout: {e}")))
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true))
        .unwrap_or_else(|| "-".into())
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn topic_json(t: &TopicStats) -> Value {
    json!({
        "topic": t.topic,
        "messages": t.messages,
        "bytes": t.bytes,
        "first_seq": t.first_seq,
        "last_seq": t.last_seq,
        "oldest": t.oldest.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)),
        "newest": t.newest.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)),
    })
}

fn consumer_json(c: &ConsumerStats) -> Value {
    json!({
        "name": c.name,
        "pattern": c.pattern,
        "cursor": c.cursor,
        "in_flight": c.in_flight,
        "lag": c.lag,
        "newest_seq": c.newest_seq,
    })
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut s = String::new();
    let mut line = |cells: Vec<&str>| {
        let l: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.push_str(l.join("  ").trim_end());
        s.push('\n');
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    s
}

/// The registry entry of a described topic (a literal topic, or the entry claiming every
/// topic of the pattern), when a registry is given.
fn registry_entry(pattern: &TopicPattern) -> Option<Value> {
    let reg = util::registry()?;
    let e = reg
        .entries()
        .iter()
        .find(|e| pattern.is_within(&e.pattern))?;
    Some(crate::registry::entry_info(e))
}

fn topic_table(topics: &[TopicStats], reg: Option<&ampybus::registry::Registry>) -> String {
    let mut header = vec![
        "TOPIC",
        "MESSAGES",
        "BYTES",
        "FIRST_SEQ",
        "LAST_SEQ",
        "OLDEST",
        "NEWEST",
    ];
    if reg.is_some() {
        header.extend(["OWNER", "SCHEMAS", "TIER", "RETENTION_DAYS"]);
    }
    table(
        &header,
        topics
            .iter()
            .map(|t| {
                let mut row = vec![
                    t.topic.clone(),
                    t.messages.to_string(),
                    opt(t.bytes),
                    t.first_seq.to_string(),
                    t.last_seq.to_string(),
                    time(t.oldest),
                    time(t.newest),
                ];
                if let Some(r) = reg {
                    match r.entry_for(&t.topic) {
                        Some(e) => row.extend([
                            e.owner.clone(),
                            e.schemas.join(","),
                            e.tier.to_string(),
                            e.retention_days.to_string(),
                        ]),
                        None => row.extend(["-", "-", "-", "-"].map(String::from)),
                    }
                }
                row
            })
            .collect(),
    )
}

fn consumer_table(consumers: &[ConsumerStats]) -> String {
    table(
        &[
            "CONSUMER",
            "PATTERN",
            "CURSOR",
            "IN_FLIGHT",
            "LAG",
            "NEWEST_SEQ",
        ],
        consumers
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    c.pattern.clone(),
                    opt(c.cursor),
                    c.in_flight.to_string(),
                    c.lag.to_string(),
                    opt(c.newest_seq),
                ]
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], vec![vec!["long".into(), "1".into()]]);
        assert_eq!(t, "A     BB\nlong  1\n");
    }
}
