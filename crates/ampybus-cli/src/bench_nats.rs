//! `ampybus bench-nats`: JetStream publish throughput of ampybus against the raw async-nats
//! client on the same server, same subject, headers, payload size and number in flight, in
//! interleaved rounds (raw, ampybus, raw, …), best / median / worst and the per-round ratio.

use crate::error::{CliError, CliResult, EXIT_OK};
use ampybus::bus::{TransportKind, redact, transport_kind};
use ampybus::transport::nats::NatsOptions;
use ampybus::{Bus, Envelope, Topic};
use clap::Args;
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
    /// Rounds (each: one raw run, one ampybus run)
    #[arg(long, value_name = "R", default_value_t = 5)]
    pub rounds: u64,
    /// One JSON object
    #[arg(long)]
    pub json: bool,
}

fn envelopes(n: u64, payload: usize, round: u64, side: &str) -> CliResult<Vec<Envelope>> {
    crate::bench_raw::envelopes(
        &format!("ampy.dev.bars.v1.benchnats.{side}{round}"),
        n,
        payload,
    )
}

async fn raw_round(
    js: &async_nats::jetstream::Context,
    envs: Vec<Envelope>,
    inflight: usize,
) -> CliResult<f64> {
    let start = Instant::now();
    let mut pending = VecDeque::with_capacity(inflight);
    let n = envs.len();
    for env in envs {
        let mut hm = async_nats::HeaderMap::new();
        for (k, v) in env.headers.iter() {
            hm.insert(k, v);
        }
        let id = env.headers.message_id().unwrap_or_default().to_owned();
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(env.payload)
            .headers(hm)
            .message_id(id);
        if pending.len() >= inflight {
            let f: async_nats::jetstream::context::PublishAckFuture =
                pending.pop_front().expect("non-empty");
            f.await
                .map_err(|e| CliError::transport(format!("raw PubAck: {e}")))?;
        }
        pending.push_back(
            js.send_publish(env.topic, msg)
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
    let bus = Bus::with_transport(std::sync::Arc::new(t.clone()), url);
    // The raw side: its own plain client, JetStream context with the same in-flight bound.
    let client = async_nats::connect(opts.servers.clone())
        .await
        .map_err(|e| CliError::transport(format!("raw connect: {e}")))?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .max_ack_inflight(a.inflight.max(1))
        .backpressure_on_inflight(true)
        .build(client);
    // Make sure the stream exists before timing anything.
    t.ensure_stream_for(&Topic::parse("ampy.dev.bars.v1.benchnats.warm").expect("topic"))
        .await
        .map_err(|e| CliError::bus("stream", &e))?;
    let mut report = crate::bench_raw::RawVsBus::new("async-nats");
    for round in 0..a.rounds {
        let envs = envelopes(a.messages, a.payload_bytes, round, "raw")?;
        let r = raw_round(&js, envs, a.inflight.max(1)).await?;
        let envs = envelopes(a.messages, a.payload_bytes, round, "bus")?;
        let o = crate::bench_raw::bus_round(&bus, envs).await?;
        report.round(round, r, o);
    }
    report.print(
        a.json,
        json!({"messages": a.messages, "payload_bytes": a.payload_bytes, "inflight": a.inflight,
            "rounds": a.rounds}),
    );
    Ok(EXIT_OK)
}
