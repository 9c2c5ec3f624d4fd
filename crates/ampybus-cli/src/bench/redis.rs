//! `ampybus bench-redis`: Redis Streams publish throughput of ampybus against the raw `redis`
//! client on the same server: same stream, fields (topic, headers, payload), payload size,
//! `MINID ~` trim and number of commands in flight (pipelines of up to 512 `XADD`s, as many
//! at once as the bound allows), in interleaved rounds (raw, ampybus, raw, …), best / median /
//! worst and the per-round ratio. Every round writes under a key prefix of its own
//! (`ampybench{pid}:` unless the URL sets one) and deletes its stream afterwards, untimed.
//! The raw side's fields are built before its clock starts.
//!
//! `--mode consume`: a stream under a key prefix of its own (the URL's prefix, then
//! `ampybench{pid}x{ms}:`) is filled with `--messages` messages over `--keys` partition keys
//! (untimed); every round reads all of them three times, each as a consumer group of its own:
//! a raw loop (`XGROUP CREATE … 0`, then `XREADGROUP … COUNT 1024 … >` and one `XACK` of what
//! came), the ampybus consumer runtime without dedupe and with the default dedupe store
//! (Redis keys). Each side is timed from its first message reaching user code (the raw loop's
//! body, the handler) to its last ack. Everything under the prefix is deleted at the end
//! (untimed).

use crate::bench::raw::{Consumed, IDLE_LIMIT, RAW_FETCH, RawMode, shortfall};
use crate::error::{CliError, CliResult, EXIT_OK};
use ampybus::bus::{TransportKind, redact, transport_kind};
use ampybus::transport::redis::{RedisOptions, RedisTransport};
use ampybus::{Bus, Envelope};
use clap::Args;
use futures::StreamExt;
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use serde_json::json;
use std::time::Instant;

/// `ampybus bench-redis`.
#[derive(Debug, Args)]
pub struct BenchRedisArgs {
    /// Messages per round and side
    #[arg(long, value_name = "N", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub messages: u64,
    /// Payload bytes per message
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub payload_bytes: usize,
    /// Commands in flight at most (both sides)
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub inflight: usize,
    #[command(flatten)]
    pub m: crate::bench::raw::RawBenchArgs,
}

/// One entry's fields as the raw side sends them: topic, headers, payload.
type Fields = (String, Vec<(String, String)>, bytes::Bytes);

async fn raw_round(
    conn: &redis::aio::MultiplexedConnection,
    key: &str,
    envs: Vec<Envelope>,
    inflight: usize,
) -> CliResult<f64> {
    let chunk = inflight.clamp(1, 512);
    let parallel = (inflight / chunk).max(1);
    let n = envs.len();
    // The fields (topic, headers, payload) are built before the clock starts.
    let wire: Vec<Fields> = envs
        .into_iter()
        .map(|env| {
            let fields = env
                .headers
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            (env.topic.to_string(), fields, env.payload)
        })
        .collect();
    let start = Instant::now();
    let minid = format!(
        "{}-0",
        chrono::Utc::now().timestamp_millis() - 7 * 86_400_000
    );
    let mut pipes = Vec::with_capacity(n.div_ceil(chunk));
    let mut it = wire.iter().peekable();
    while it.peek().is_some() {
        let mut p = redis::pipe();
        for (topic, fields, payload) in it.by_ref().take(chunk) {
            let c = p
                .cmd("XADD")
                .arg(key)
                .arg("MINID")
                .arg("~")
                .arg(&minid)
                .arg("*")
                .arg("topic")
                .arg(topic);
            for (k, v) in fields {
                c.arg(k).arg(v);
            }
            c.arg("payload").arg(payload.as_ref());
        }
        pipes.push(p);
    }
    let results = futures::stream::iter(pipes.into_iter().map(|p| {
        let mut c = conn.clone();
        async move { p.query_async::<Vec<redis::Value>>(&mut c).await }
    }))
    .buffered(parallel);
    let mut results = std::pin::pin!(results);
    while let Some(r) = results.next().await {
        r.map_err(|e| CliError::transport(format!("raw XADD pipeline: {e}")))?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Runs `ampybus bench-redis`.
pub async fn run(url: &str, a: BenchRedisArgs) -> CliResult<u8> {
    if transport_kind(url).map_err(|e| CliError::bus("--url", &e))? != TransportKind::Redis {
        return Err(CliError::usage(format!(
            "bench-redis: --url {:?} is not a Redis URL",
            redact(url)
        )));
    }
    let mut opts = RedisOptions::from_url(url).map_err(|e| CliError::bus("--url", &e))?;
    opts.max_in_flight = a.inflight.max(1);
    if a.m.mode == RawMode::Consume {
        // A stream of its own: the raw loop reads every entry of it.
        opts.key_prefix = format!(
            "{}ampybench{}:",
            opts.key_prefix,
            crate::bench::raw::run_label()
        );
    } else if opts.key_prefix.is_empty() {
        opts.key_prefix = format!("ampybench{}:", std::process::id());
    }
    let t = RedisTransport::connect(opts.clone())
        .await
        .map_err(|e| CliError::bus("connecting", &e))?;
    let bus = Bus::with_transport(std::sync::Arc::new(t.clone()), url);
    // The raw side: a plain multiplexed connection of its own.
    let mut raw_opts = opts.clone();
    raw_opts.key_prefix.clear();
    let client = redis::Client::open(redis_url(&raw_opts))
        .map_err(|e| CliError::transport(format!("raw client: {e}")))?;
    let cfg = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let raw = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(|e| CliError::transport(format!("raw connect: {e}")))?;
    let key = opts.stream_key("ampy.dev.bars.v1");
    let mut admin = t.connection();
    if a.m.mode == RawMode::Consume {
        let result = consume(&a, &bus, &raw, &key).await;
        // Untimed: everything under the run's own prefix goes, whatever happened.
        delete_prefix(&mut admin, &opts.key_prefix).await?;
        return result;
    }
    let mut report = crate::bench::raw::RawVsBus::new("redis");
    for round in 0..a.m.rounds {
        let envs = crate::bench::raw::publish_envelopes("redis", a.messages, a.payload_bytes)?;
        let r = raw_round(&raw, &key, envs, a.inflight.max(1)).await?;
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut admin)
            .await
            .map_err(|e| CliError::transport(format!("DEL: {e}")))?;
        let envs = crate::bench::raw::publish_envelopes("redis", a.messages, a.payload_bytes)?;
        let o = crate::bench::raw::bus_round(&bus, envs).await?;
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut admin)
            .await
            .map_err(|e| CliError::transport(format!("DEL: {e}")))?;
        report.round(round, r, o);
    }
    report.print(
        a.m.json,
        json!({"mode": "publish", "messages": a.messages, "payload_bytes": a.payload_bytes,
            "inflight": a.inflight, "rounds": a.m.rounds}),
    );
    Ok(EXIT_OK)
}

/// `--mode consume` (see the module docs) on the stream `key`.
async fn consume(
    a: &BenchRedisArgs,
    bus: &Bus,
    raw: &redis::aio::MultiplexedConnection,
    key: &str,
) -> CliResult<u8> {
    let run = crate::bench::raw::run_label();
    let topic = crate::bench::raw::consume_topic("redis", &run);
    crate::bench::raw::fill(bus, &topic, a.messages, a.payload_bytes, a.m.keys).await?;
    let n = a.messages;
    let raw_side = |group: String| async move { raw_consume(raw, key, n, &group).await };
    let report =
        crate::bench::raw::consume_rounds(bus, &topic, &a.m, n, &run, "redis", raw_side).await?;
    let mut config = crate::bench::raw::consume_config(n, a.payload_bytes, &a.m);
    config["stream"] = json!(key);
    report.print(a.m.json, config);
    Ok(EXIT_OK)
}

/// The raw side of a consume round: consumer group `group` created at `0`, then
/// `XREADGROUP GROUP group c COUNT 1024 STREAMS key >` and one `XACK` of the ids that came,
/// until `n` are acked; timed from the first reply with entries to the last `XACK`'s reply.
async fn raw_consume(
    conn: &redis::aio::MultiplexedConnection,
    key: &str,
    n: u64,
    group: &str,
) -> CliResult<Consumed> {
    let err = |what: &str, e: redis::RedisError| {
        CliError::transport(format!("raw consumer group {group}: {what}: {e}"))
    };
    let mut conn = conn.clone();
    let _: () = conn
        .xgroup_create(key, group, "0")
        .await
        .map_err(|e| err("XGROUP CREATE", e))?;
    let opts = StreamReadOptions::default()
        .group(group, "c")
        .count(RAW_FETCH)
        .block(100);
    let mut got = 0u64;
    let mut first = None;
    let mut idle_since = Instant::now();
    while got < n {
        let reply: StreamReadReply = conn
            .xread_options(&[key], &[">"], &opts)
            .await
            .map_err(|e| err("XREADGROUP", e))?;
        let ids: Vec<&str> = reply
            .keys
            .iter()
            .flat_map(|k| k.ids.iter().map(|e| e.id.as_str()))
            .collect();
        if !ids.is_empty() {
            first.get_or_insert_with(Instant::now);
        } else {
            if idle_since.elapsed() > IDLE_LIMIT {
                return Err(shortfall(&format!("raw consumer group {group}"), got, n));
            }
            continue;
        }
        let acked: u64 = conn
            .xack(key, group, &ids)
            .await
            .map_err(|e| err("XACK", e))?;
        got += acked;
        idle_since = Instant::now();
    }
    Ok(Consumed {
        read: got,
        secs: first.map_or(0.0, |f: Instant| f.elapsed().as_secs_f64()),
    })
}

/// Deletes every key under `prefix` (`SCAN MATCH` + `DEL`).
async fn delete_prefix(conn: &mut redis::aio::ConnectionManager, prefix: &str) -> CliResult<()> {
    let pattern = format!("{prefix}*");
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .map_err(|e| CliError::transport(format!("SCAN {pattern}: {e}")))?;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(conn)
                .await
                .map_err(|e| CliError::transport(format!("DEL: {e}")))?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// A plain `redis://` URL for the raw client (no ampybus options).
fn redis_url(o: &RedisOptions) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    let auth = match (&o.user, &o.password) {
        (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
        (None, Some(p)) => format!(":{}@", enc(p)),
        (Some(u), None) => format!("{}@", enc(u)),
        (None, None) => String::new(),
    };
    let scheme = if o.tls { "rediss" } else { "redis" };
    format!("{scheme}://{auth}{}/{}", o.server_shown(), o.db)
}
