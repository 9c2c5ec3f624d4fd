//! `ampybus bench-redis`: Redis Streams publish throughput of ampybus against the raw `redis`
//! client on the same server: same stream, fields (topic, headers, payload), payload size,
//! `MINID ~` trim and number of commands in flight (pipelines of up to 512 `XADD`s, as many
//! at once as the bound allows), in interleaved rounds (raw, ampybus, raw, …), best / median /
//! worst and the per-round ratio. Every round writes under a key prefix of its own
//! (`ampybench{pid}:` unless the URL sets one) and deletes its stream afterwards, untimed.

use crate::error::{CliError, CliResult, EXIT_OK};
use ampybus::bus::{TransportKind, redact, transport_kind};
use ampybus::transport::redis::{RedisOptions, RedisTransport};
use ampybus::{Bus, Envelope};
use clap::Args;
use futures::StreamExt;
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
    /// Rounds (each: one raw run, one ampybus run)
    #[arg(long, value_name = "R", default_value_t = 5)]
    pub rounds: u64,
    /// One JSON object
    #[arg(long)]
    pub json: bool,
}

const TOPIC: &str = "ampy.dev.bars.v1.benchredis.XNAS";

fn envelopes(n: u64, payload: usize) -> CliResult<Vec<Envelope>> {
    crate::bench_raw::envelopes(TOPIC, n, payload)
}

async fn raw_round(
    conn: &redis::aio::MultiplexedConnection,
    key: &str,
    envs: Vec<Envelope>,
    inflight: usize,
) -> CliResult<f64> {
    let chunk = inflight.clamp(1, 512);
    let parallel = (inflight / chunk).max(1);
    let n = envs.len();
    let start = Instant::now();
    let minid = format!(
        "{}-0",
        chrono::Utc::now().timestamp_millis() - 7 * 86_400_000
    );
    let mut pipes = Vec::with_capacity(n.div_ceil(chunk));
    let mut it = envs.into_iter().peekable();
    while it.peek().is_some() {
        let mut p = redis::pipe();
        for env in it.by_ref().take(chunk) {
            let c = p
                .cmd("XADD")
                .arg(key)
                .arg("MINID")
                .arg("~")
                .arg(&minid)
                .arg("*")
                .arg("topic")
                .arg(&env.topic);
            for (k, v) in env.headers.iter() {
                c.arg(k).arg(v);
            }
            c.arg("payload").arg(env.payload.as_ref());
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
    if opts.key_prefix.is_empty() {
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
    let mut report = crate::bench_raw::RawVsBus::new("redis");
    for round in 0..a.rounds {
        let envs = envelopes(a.messages, a.payload_bytes)?;
        let r = raw_round(&raw, &key, envs, a.inflight.max(1)).await?;
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut admin)
            .await
            .map_err(|e| CliError::transport(format!("DEL: {e}")))?;
        let envs = envelopes(a.messages, a.payload_bytes)?;
        let o = crate::bench_raw::bus_round(&bus, envs).await?;
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut admin)
            .await
            .map_err(|e| CliError::transport(format!("DEL: {e}")))?;
        report.round(round, r, o);
    }
    report.print(
        a.json,
        json!({"messages": a.messages, "payload_bytes": a.payload_bytes, "inflight": a.inflight,
            "rounds": a.rounds}),
    );
    Ok(EXIT_OK)
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
