//! `ampybus topics` on a `redis://` bus: streams are per env + domain + version, so rows are
//! per stream (entries, first/last entry, store times) and per consumer group (= durable
//! consumer) on each stream (consumers, pending, lag, last delivered id).

use crate::error::{CliError, CliResult, EXIT_OK};
use crate::topics::{TopicsCommand, print, table};
use ampybus::TopicPattern;
use ampybus::transport::redis::{RedisTransport, StreamStats};
use chrono::SecondsFormat;
use serde_json::{Value, json};

/// Runs `ampybus topics …` against Redis.
pub async fn run(url: &str, cmd: TopicsCommand) -> CliResult<u8> {
    let t = RedisTransport::connect_url(url)
        .await
        .map_err(|e| CliError::bus("connecting to Redis", &e))?;
    let bus_err = |e: ampybus::Error| CliError::bus("reading Redis", &e);
    let parse = |flag: &str, s: &str| {
        TopicPattern::parse(s).map_err(|e| CliError::bus(format!("{flag} {s:?}"), &e))
    };
    match cmd {
        TopicsCommand::List { pattern, json } => {
            let p = parse("--pattern", &pattern)?;
            let streams = t.stream_stats(&p).await.map_err(bus_err)?;
            let mut out = String::new();
            if json {
                for s in &streams {
                    out.push_str(&stream_json(s).to_string());
                    out.push('\n');
                }
            } else {
                out.push_str(&stream_table(&streams));
            }
            print(&out)?;
        }
        TopicsCommand::Describe { target, json } => {
            let p = parse("TOPIC_OR_PATTERN", &target)?;
            let streams = t.stream_stats(&p).await.map_err(bus_err)?;
            let entries: u64 = streams.iter().map(|s| s.length).sum();
            let out = if json {
                format!(
                    "{}\n",
                    json!({
                        "pattern": p.as_str(),
                        "streams": streams.iter().map(stream_json).collect::<Vec<_>>(),
                        "entries": entries,
                    })
                )
            } else {
                let mut s = format!(
                    "pattern   {}\nstreams   {}\nentries   {entries}\n\n",
                    p.as_str(),
                    streams.len()
                );
                s.push_str(&stream_table(&streams));
                s.push('\n');
                s.push_str(&group_table(&streams, None));
                s
            };
            print(&out)?;
        }
        TopicsCommand::Lag { consumer, json } => {
            let all = TopicPattern::parse(">").expect("pattern");
            let streams = t.stream_stats(&all).await.map_err(bus_err)?;
            let found = streams.iter().any(|s| {
                s.groups
                    .iter()
                    .any(|g| consumer.as_ref().is_none_or(|c| *c == g.name))
            });
            if let Some(name) = &consumer
                && !found
            {
                return Err(CliError::usage(format!(
                    "--consumer {name:?}: no consumer group of that name"
                )));
            }
            let mut out = String::new();
            if json {
                for s in &streams {
                    for g in &s.groups {
                        if consumer.as_ref().is_none_or(|c| *c == g.name) {
                            out.push_str(&group_json(s, g).to_string());
                            out.push('\n');
                        }
                    }
                }
            } else {
                out.push_str(&group_table(&streams, consumer.as_deref()));
            }
            print(&out)?;
        }
    }
    Ok(EXIT_OK)
}

fn id_time(id: &Option<String>) -> String {
    id.as_ref()
        .and_then(|id| ampybus::transport::redis::pack_id(id))
        .and_then(|s| chrono::DateTime::from_timestamp_millis((s >> 20) as i64))
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| "-".into())
}

fn stream_json(s: &StreamStats) -> Value {
    json!({
        "stream": s.stream,
        "key": s.key,
        "entries": s.length,
        "first_id": s.first_id,
        "last_id": s.last_id,
        "oldest": (s.first_id.is_some()).then(|| id_time(&s.first_id)),
        "newest": (s.last_id.is_some()).then(|| id_time(&s.last_id)),
        "groups": s.groups.iter().map(|g| group_json(s, g)).collect::<Vec<_>>(),
    })
}

fn group_json(s: &StreamStats, g: &ampybus::transport::redis::GroupStats) -> Value {
    json!({
        "consumer": g.name,
        "stream": s.stream,
        "consumers": g.consumers,
        "pending": g.pending,
        "lag": g.lag,
        "last_delivered_id": g.last_delivered_id,
    })
}

fn stream_table(streams: &[StreamStats]) -> String {
    table(
        &[
            "STREAM", "ENTRIES", "FIRST_ID", "LAST_ID", "OLDEST", "NEWEST", "GROUPS",
        ],
        streams
            .iter()
            .map(|s| {
                vec![
                    s.stream.clone(),
                    s.length.to_string(),
                    s.first_id.clone().unwrap_or_else(|| "-".into()),
                    s.last_id.clone().unwrap_or_else(|| "-".into()),
                    id_time(&s.first_id),
                    id_time(&s.last_id),
                    s.groups.len().to_string(),
                ]
            })
            .collect(),
    )
}

fn group_table(streams: &[StreamStats], only: Option<&str>) -> String {
    let mut rows = Vec::new();
    for s in streams {
        for g in &s.groups {
            if only.is_none_or(|c| c == g.name) {
                rows.push(vec![
                    g.name.clone(),
                    s.stream.clone(),
                    g.consumers.to_string(),
                    g.pending.to_string(),
                    g.lag.to_string(),
                    g.last_delivered_id.clone(),
                ]);
            }
        }
    }
    table(
        &[
            "CONSUMER",
            "STREAM",
            "INSTANCES",
            "IN_FLIGHT",
            "LAG",
            "LAST_DELIVERED",
        ],
        rows,
    )
}
