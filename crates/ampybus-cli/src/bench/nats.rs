//! `ampybus bench-nats`: JetStream publish throughput of ampybus against the raw async-nats
//! client on the same server, same subject, headers, payload size and number in flight, in
//! interleaved rounds (raw, ampybus, raw, …), best / median / worst and the per-round ratio.
//! The raw side's `HeaderMap`s are built before its clock starts. With `--tier best-effort`
//! both sides publish with core NATS (no PubAck) and flush once at the end of the run.
//!
//! `--mode consume`: one subject of its own (`ampy.dev.bars.v1.benchnatsc{pid}x{ms}.XNAS`) is
//! filled with `--messages` messages over `--keys` partition keys (untimed); every round reads
//! all of them three times, each with a durable consumer of its own: a raw JetStream pull
//! consumer (no-wait fetches of up to 1,024, `ack` each, a flush per fetch), the ampybus
//! consumer runtime without dedupe and with the default dedupe store (the KV bucket). Each side
//! is timed from its first message reaching user code (the raw loop's body, the handler) to
//! its last ack. The round's consumers are deleted afterwards and the subject purged at the end
//! (untimed).

use crate::bench::raw::{Consumed, RAW_FETCH, RawMode, shortfall};
use crate::error::{CliError, CliResult, EXIT_OK};
use ampybus::bus::{TransportKind, redact, transport_kind};
use ampybus::transport::nats::{NatsOptions, NatsTransport};
use ampybus::{Bus, Envelope, Topic};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use clap::Args;
use futures::StreamExt;
use serde_json::json;
use std::collections::VecDeque;
use std::time::Instant;

/// `ampybus bench-nats`.
#[derive(Debug, Args)]
pub struct BenchNatsArgs {
    /// Messages per round and side
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub messages: u64,
    /// Payload bytes per message
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub payload_bytes: usize,
    /// Unacknowledged publishes at most (both sides)
    #[arg(long, value_name = "N", default_value_t = 4000)]
    pub inflight: usize,
    #[command(flatten)]
    pub m: crate::bench::raw::RawBenchArgs,
    /// best_effort (or best-effort): --mode publish compares core publishes (no PubAck; each
    /// side flushes its client at the end of the run) instead of JetStream publishes
    #[arg(long, value_name = "TIER", value_parser = crate::util::parse_tier)]
    pub tier: Option<ampybus::tier::Tier>,
}

fn envelopes(n: u64, payload: usize, round: u64, side: &str) -> CliResult<Vec<Envelope>> {
    crate::bench::raw::envelopes(
        &format!("ampy.dev.bars.v1.benchnats.{side}{round}"),
        n,
        payload,
    )
}

/// Every header of `env` in a NATS header map (the raw sides' wire headers).
fn header_map(env: &Envelope) -> async_nats::HeaderMap {
    let mut hm = async_nats::HeaderMap::new();
    for (k, v) in env.headers.iter() {
        hm.insert(k, v);
    }
    hm
}

/// The raw side of a best-effort round: core publishes with the same header maps (built
/// before the clock starts), then one flush.
async fn raw_core_round(client: &async_nats::Client, envs: Vec<Envelope>) -> CliResult<f64> {
    let wire: Vec<_> = envs
        .into_iter()
        .map(|env| {
            let mut hm = header_map(&env);
            if let Some(id) = env.headers.message_id() {
                hm.insert("Nats-Msg-Id", id);
            }
            (env.topic.to_string(), hm, env.payload)
        })
        .collect();
    let start = Instant::now();
    let n = wire.len();
    for (subject, hm, payload) in wire {
        client
            .publish_with_headers(subject, hm, payload)
            .await
            .map_err(|e| CliError::transport(format!("raw core publish: {e}")))?;
    }
    client
        .flush()
        .await
        .map_err(|e| CliError::transport(format!("raw flush: {e}")))?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn raw_round(
    js: &async_nats::jetstream::Context,
    envs: Vec<Envelope>,
    inflight: usize,
) -> CliResult<f64> {
    // The wire form (subject, header map, message id, payload) is built before the clock starts.
    let wire: Vec<_> = envs
        .into_iter()
        .map(|env| {
            let hm = header_map(&env);
            let id = env.headers.message_id().unwrap_or_default().to_owned();
            (env.topic.to_string(), hm, id, env.payload)
        })
        .collect();
    let start = Instant::now();
    let mut pending = VecDeque::with_capacity(inflight);
    let n = wire.len();
    for (subject, hm, id, payload) in wire {
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(payload)
            .headers(hm)
            .message_id(id);
        if pending.len() >= inflight {
            let f: async_nats::jetstream::context::PublishAckFuture =
                pending.pop_front().expect("non-empty");
            f.await
                .map_err(|e| CliError::transport(format!("raw PubAck: {e}")))?;
        }
        pending.push_back(
            js.send_publish(subject, msg)
                .await
                .map_err(|e| CliError::transport(format!("raw publish: {e}")))?,
        );
    }
    for f in pending {
        f.await
            .map_err(|e| CliError::transport(format!("raw PubAck: {e}")))?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Runs `ampybus bench-nats`.
pub async fn run(url: &str, a: BenchNatsArgs) -> CliResult<u8> {
    if transport_kind(url).map_err(|e| CliError::bus("--url", &e))? != TransportKind::Nats {
        return Err(CliError::usage(format!(
            "bench-nats: --url {:?} is not a NATS URL",
            redact(url)
        )));
    }
    let mut opts = NatsOptions::from_url(url).map_err(|e| CliError::bus("--url", &e))?;
    opts.max_in_flight = a.inflight.max(1);
    let t = ampybus::transport::nats::NatsTransport::connect(opts.clone())
        .await
        .map_err(|e| CliError::bus("connecting", &e))?;
    let best_effort = a.tier == Some(ampybus::tier::Tier::BestEffort);
    if best_effort && a.m.mode == RawMode::Consume {
        return Err(CliError::usage(
            "bench-nats: --tier best-effort measures --mode publish (core publishes); --mode consume reads JetStream",
        ));
    }
    let bus = Bus::with_transport(std::sync::Arc::new(t.clone()), url);
    let bus = match a.tier {
        Some(tier) => bus.with_tier(ampybus::TopicPattern::parse(">").expect("pattern"), tier),
        None => bus,
    };
    // The raw side: its own plain client, JetStream context with the same in-flight bound.
    let client = async_nats::connect(opts.servers.clone())
        .await
        .map_err(|e| CliError::transport(format!("raw connect: {e}")))?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .max_ack_inflight(a.inflight.max(1))
        .backpressure_on_inflight(true)
        .build(client.clone());
    if a.m.mode == RawMode::Consume {
        return consume(&a, &t, &bus, &js, &opts).await;
    }
    // Make sure the stream exists before timing anything.
    t.ensure_stream_for(&Topic::parse("ampy.dev.bars.v1.benchnats.warm").expect("topic"))
        .await
        .map_err(|e| CliError::bus("stream", &e))?;
    let mut report = crate::bench::raw::RawVsBus::new("async-nats");
    for round in 0..a.m.rounds {
        let envs = envelopes(a.messages, a.payload_bytes, round, "raw")?;
        let r = if best_effort {
            raw_core_round(&client, envs).await?
        } else {
            raw_round(&js, envs, a.inflight.max(1)).await?
        };
        let envs = envelopes(a.messages, a.payload_bytes, round, "bus")?;
        let o = crate::bench::raw::bus_round(&bus, envs).await?;
        report.round(round, r, o);
    }
    report.print(
        a.m.json,
        json!({"mode": "publish", "messages": a.messages, "payload_bytes": a.payload_bytes,
            "inflight": a.inflight, "rounds": a.m.rounds,
            "tier": a.tier.map_or("at_least_once_dedupe (default)", |t| t.as_str())}),
    );
    Ok(EXIT_OK)
}

/// `--mode consume` (see the module docs).
async fn consume(
    a: &BenchNatsArgs,
    t: &NatsTransport,
    bus: &Bus,
    js: &async_nats::jetstream::Context,
    opts: &NatsOptions,
) -> CliResult<u8> {
    let run = crate::bench::raw::run_label();
    let subject = crate::bench::raw::consume_topic("nats", &run);
    let topic = Topic::parse(&subject).map_err(|e| CliError::bus("topic", &e))?;
    let stream = t
        .ensure_stream_for(&topic)
        .await
        .map_err(|e| CliError::bus("stream", &e))?;
    crate::bench::raw::fill(bus, &subject, a.messages, a.payload_bytes, a.m.keys).await?;
    let (st, sub, n) = (&stream, &subject, a.messages);
    let raw = |name: String| async move { raw_consume(js, st, sub, n, &name, opts).await };
    let report =
        crate::bench::raw::consume_rounds(bus, &subject, &a.m, n, &run, "async-nats", raw).await;
    // Untimed, whatever happened: the run's durable consumers and its messages go.
    for round in 0..a.m.rounds {
        for name in crate::bench::raw::consumer_names(&run, round) {
            let _ = js.delete_consumer_from_stream(&name, &stream).await;
        }
    }
    if let Ok(s) = js.get_stream(&stream).await {
        let _ = s.purge().filter(&subject).await;
    }
    let mut config = crate::bench::raw::consume_config(n, a.payload_bytes, &a.m);
    config["subject"] = json!(subject);
    report?.print(a.m.json, config);
    Ok(EXIT_OK)
}

/// The raw side of a consume round: a durable pull consumer `name` on `subject` (explicit
/// acks, the same `max_ack_pending` as the runtime's), no-wait fetches of up to
/// [`RAW_FETCH`], every message acked, the acks flushed after each fetch; timed from the first
/// message to the flush after the `n`-th ack.
async fn raw_consume(
    js: &async_nats::jetstream::Context,
    stream: &str,
    subject: &str,
    n: u64,
    name: &str,
    opts: &NatsOptions,
) -> CliResult<Consumed> {
    let err = |what: &str, e: &dyn std::fmt::Display| {
        CliError::transport(format!("raw consumer {name}: {what}: {e}"))
    };
    let consumer = js
        .create_consumer_on_stream(
            pull::Config {
                durable_name: Some(name.to_owned()),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                filter_subject: subject.to_owned(),
                max_ack_pending: opts.max_ack_pending,
                ..Default::default()
            },
            stream,
        )
        .await
        .map_err(|e| err("create", &e))?;
    let client = js.client();
    let mut got = 0u64;
    let mut first = None;
    let mut idle_since = Instant::now();
    while got < n {
        let batch = consumer
            .fetch()
            .max_messages(RAW_FETCH)
            .messages()
            .await
            .map_err(|e| err("fetch", &e))?;
        let mut batch = std::pin::pin!(batch);
        let before = got;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| err("fetch", &e))?;
            first.get_or_insert_with(Instant::now);
            m.ack().await.map_err(|e| err("ack", &e))?;
            got += 1;
        }
        if got > before {
            client.flush().await.map_err(|e| err("flush", &e))?;
            idle_since = Instant::now();
        } else if idle_since.elapsed() > crate::bench::raw::IDLE_LIMIT {
            return Err(shortfall(&format!("raw consumer {name}"), got, n));
        }
    }
    Ok(Consumed {
        read: got,
        secs: first.map_or(0.0, |f: Instant| f.elapsed().as_secs_f64()),
    })
}
