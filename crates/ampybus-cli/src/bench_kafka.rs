//! `ampybus bench-kafka`: Kafka publish throughput of ampybus against a raw rdkafka
//! `FutureProducer` on the same broker, in interleaved rounds (raw, ampybus, raw, …): same
//! producer settings ([`KafkaOptions::producer_config`]), Kafka topic, record key, headers,
//! payload size and bound on unconfirmed records; best / median / worst and the per-round ratio.

use crate::error::{CliError, CliResult, EXIT_OK};
use ampybus::bus::{TransportKind, redact, transport_kind};
use ampybus::transport::kafka::rdkafka::message::{Header, OwnedHeaders};
use ampybus::transport::kafka::rdkafka::producer::future_producer::OwnedDeliveryResult;
use ampybus::transport::kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use ampybus::transport::kafka::{KafkaOptions, KafkaTransport, TOPIC_HEADER};
use ampybus::{Bus, Envelope};
use clap::Args;
use serde_json::json;
use std::collections::VecDeque;
use std::time::Instant;

/// `ampybus bench-kafka`.
#[derive(Debug, Args)]
pub struct BenchKafkaArgs {
    /// Messages per round and side
    #[arg(long, value_name = "N", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub messages: u64,
    /// Payload bytes per message
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub payload_bytes: usize,
    /// Unconfirmed records at most (both sides)
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub inflight: usize,
    /// Rounds (each: one raw run, one ampybus run)
    #[arg(long, value_name = "R", default_value_t = 5)]
    pub rounds: u64,
    /// One JSON object
    #[arg(long)]
    pub json: bool,
}

const TOPIC: &str = "ampy.dev.bars.v1.benchkafka.XNAS";

fn envelopes(n: u64, payload: usize) -> CliResult<Vec<Envelope>> {
    crate::bench_raw::envelopes(TOPIC, n, payload)
}

/// The raw side: every record sent as a plain rdkafka user would (key, headers, payload),
/// at most `inflight` delivery reports outstanding, every report checked.
async fn raw_round(
    producer: &FutureProducer,
    kafka_topic: &str,
    envs: Vec<Envelope>,
    inflight: usize,
) -> CliResult<f64> {
    let n = envs.len();
    let start = Instant::now();
    let mut pending = VecDeque::with_capacity(inflight.min(n));
    for env in &envs {
        if pending.len() >= inflight {
            check(pending.pop_front().expect("pending").await)?;
        }
        let mut headers = OwnedHeaders::new_with_capacity(env.headers.len() + 1);
        for (k, v) in env.headers.iter() {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        headers = headers.insert(Header {
            key: TOPIC_HEADER,
            value: Some(env.topic.as_bytes()),
        });
        let key = env.headers.partition_key().unwrap_or("");
        let mut record = FutureRecord::to(kafka_topic)
            .payload(env.payload.as_ref())
            .key(key)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err((e, back)) => {
                    // Local queue full: wait for the oldest report.
                    record = back;
                    match pending.pop_front() {
                        Some(f) => check(f.await)?,
                        None => return Err(CliError::transport(format!("raw send: {e}"))),
                    }
                }
            }
        }
    }
    for f in pending {
        check(f.await)?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

type Report = Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>;

fn check(r: Report) -> CliResult<()> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(CliError::transport(format!("raw delivery: {e}"))),
        Err(_) => Err(CliError::transport("raw delivery: producer went away")),
    }
}

/// Runs `ampybus bench-kafka`.
pub async fn run(url: &str, a: BenchKafkaArgs) -> CliResult<u8> {
    if transport_kind(url).map_err(|e| CliError::bus("--url", &e))? != TransportKind::Kafka {
        return Err(CliError::usage(format!(
            "bench-kafka: --url {:?} is not a Kafka URL",
            redact(url)
        )));
    }
    let mut opts = KafkaOptions::from_url(url).map_err(|e| CliError::bus("--url", &e))?;
    opts.max_in_flight = a.inflight.max(1);
    if opts.namespace.is_empty() {
        opts.namespace = format!("ampybench{}.", std::process::id());
    }
    opts.dedupe = ampybus::transport::kafka::KafkaDedupe::Off;
    let t = KafkaTransport::connect(opts.clone())
        .await
        .map_err(|e| CliError::bus("connecting", &e))?;
    let bus = Bus::with_transport(std::sync::Arc::new(t), url);
    // Creates the topic, untimed.
    bus.publish_wire(envelopes(1, a.payload_bytes)?)
        .await
        .map_err(|e| CliError::bus("ampybus publish", &e))?;
    let raw: FutureProducer = opts
        .producer_config()
        .create()
        .map_err(|e| CliError::transport(format!("raw producer: {e}")))?;
    let kafka_topic = opts.kafka_topic(TOPIC);
    // The raw producer connects and learns the topic's metadata, untimed, as the bus did.
    raw_round(&raw, &kafka_topic, envelopes(1, a.payload_bytes)?, 1).await?;
    let mut report = crate::bench_raw::RawVsBus::new("rdkafka");
    for round in 0..a.rounds {
        let envs = envelopes(a.messages, a.payload_bytes)?;
        let r = raw_round(&raw, &kafka_topic, envs, a.inflight.max(1)).await?;
        let envs = envelopes(a.messages, a.payload_bytes)?;
        let o = crate::bench_raw::bus_round(&bus, envs).await?;
        report.round(round, r, o);
    }
    report.print(
        a.json,
        json!({"messages": a.messages, "payload_bytes": a.payload_bytes, "inflight": a.inflight,
            "rounds": a.rounds, "kafka_topic": kafka_topic}),
    );
    Ok(EXIT_OK)
}
