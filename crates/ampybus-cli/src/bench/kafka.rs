//! `ampybus bench-kafka`: Kafka publish throughput of ampybus against a raw rdkafka
//! `FutureProducer` on the same broker, in interleaved rounds (raw, ampybus, raw, …): same
//! producer settings ([`KafkaOptions::producer_config`]), Kafka topic, record key, headers,
//! payload size and bound on unconfirmed records; best / median / worst and the per-round ratio.
//! The raw side's `OwnedHeaders` are built before its clock starts.
//!
//! `--mode consume`: a Kafka topic of its own (namespace: the URL's, then `ampybench{pid}x{ms}.`)
//! is filled with `--messages` messages over `--keys` partition keys (untimed); every round
//! reads all of them three times, each as a consumer group of its own: a raw rdkafka
//! `StreamConsumer` (`recv` each record, an async commit of the offsets read after every
//! 1,024 and a sync commit at the end), the ampybus consumer runtime without dedupe and with
//! the URL's dedupe store (by default a SQLite file in a temporary directory). Each side is
//! timed from its first record reaching user code (the raw loop's body, the handler) to its
//! last commit: joining a fresh group takes the broker's rebalance delay, which is no
//! per-message cost.

use crate::bench::raw::{Consumed, IDLE_LIMIT, RAW_FETCH, RawMode, shortfall};
use crate::error::{CliError, CliResult, EXIT_OK};
use ampybus::bus::{TransportKind, redact, transport_kind};
use ampybus::transport::kafka::rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use ampybus::transport::kafka::rdkafka::message::{Header, Message, OwnedHeaders};
use ampybus::transport::kafka::rdkafka::producer::future_producer::OwnedDeliveryResult;
use ampybus::transport::kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use ampybus::transport::kafka::rdkafka::{Offset, TopicPartitionList};
use ampybus::transport::kafka::{KafkaDedupe, KafkaOptions, KafkaTransport, TOPIC_HEADER};
use ampybus::{Bus, Envelope};
use clap::Args;
use serde_json::json;
use std::collections::{BTreeMap, VecDeque};
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
    #[command(flatten)]
    pub m: crate::bench::raw::RawBenchArgs,
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
    // The headers (the contract's plus `topic`) are built before the clock starts.
    let wire: Vec<OwnedHeaders> = envs
        .iter()
        .map(|env| {
            let mut headers = OwnedHeaders::new_with_capacity(env.headers.len() + 1);
            for (k, v) in env.headers.iter() {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            headers.insert(Header {
                key: TOPIC_HEADER,
                value: Some(env.topic.as_bytes()),
            })
        })
        .collect();
    let start = Instant::now();
    let mut pending = VecDeque::with_capacity(inflight.min(n));
    for (env, headers) in envs.iter().zip(wire) {
        if pending.len() >= inflight {
            check(pending.pop_front().expect("pending").await)?;
        }
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
    if a.m.mode == RawMode::Consume {
        return consume(&a, opts, url).await;
    }
    if opts.namespace.is_empty() {
        opts.namespace = format!("ampybench{}.", std::process::id());
    }
    opts.dedupe = KafkaDedupe::Off;
    let t = KafkaTransport::connect(opts.clone())
        .await
        .map_err(|e| CliError::bus("connecting", &e))?;
    let bus = Bus::with_transport(std::sync::Arc::new(t), url);
    // Creates the topic, untimed.
    bus.publish_wire(crate::bench::raw::publish_envelopes(
        "kafka",
        1,
        a.payload_bytes,
    )?)
    .await
    .map_err(|e| CliError::bus("ampybus publish", &e))?;
    let raw: FutureProducer = opts
        .producer_config()
        .create()
        .map_err(|e| CliError::transport(format!("raw producer: {e}")))?;
    let kafka_topic = opts.kafka_topic(&crate::bench::raw::publish_topic("kafka"));
    // The raw producer connects and learns the topic's metadata, untimed, as the bus did.
    raw_round(
        &raw,
        &kafka_topic,
        crate::bench::raw::publish_envelopes("kafka", 1, a.payload_bytes)?,
        1,
    )
    .await?;
    let mut report = crate::bench::raw::RawVsBus::new("rdkafka");
    for round in 0..a.m.rounds {
        let envs = crate::bench::raw::publish_envelopes("kafka", a.messages, a.payload_bytes)?;
        let r = raw_round(&raw, &kafka_topic, envs, a.inflight.max(1)).await?;
        let envs = crate::bench::raw::publish_envelopes("kafka", a.messages, a.payload_bytes)?;
        let o = crate::bench::raw::bus_round(&bus, envs).await?;
        report.round(round, r, o);
    }
    report.print(
        a.m.json,
        json!({"mode": "publish", "messages": a.messages, "payload_bytes": a.payload_bytes,
            "inflight": a.inflight, "rounds": a.m.rounds, "kafka_topic": kafka_topic}),
    );
    Ok(EXIT_OK)
}

/// `--mode consume` (see the module docs).
async fn consume(a: &BenchKafkaArgs, mut opts: KafkaOptions, url: &str) -> CliResult<u8> {
    let run = crate::bench::raw::run_label();
    // A Kafka topic of its own: the raw loop reads every record of it.
    opts.namespace = format!("{}ampybench{run}.", opts.namespace);
    let tmp = tempfile::tempdir().map_err(|e| CliError::transport(format!("temp dir: {e}")))?;
    match &opts.dedupe {
        KafkaDedupe::Off => {
            return Err(CliError::usage(
                "bench-kafka --mode consume: --url sets dedupe=off; the runtime with dedupe needs a store (dedupe=sqlite:PATH or dedupe=redis://…)",
            ));
        }
        d if *d == KafkaOptions::default().dedupe => {
            opts.dedupe = KafkaDedupe::Sqlite(tmp.path().join("dedupe.sqlite3"));
        }
        _ => {}
    }
    let t = KafkaTransport::connect(opts.clone())
        .await
        .map_err(|e| CliError::bus("connecting", &e))?;
    let bus = Bus::with_transport(std::sync::Arc::new(t), url);
    let topic = crate::bench::raw::consume_topic("kafka", &run);
    crate::bench::raw::fill(&bus, &topic, a.messages, a.payload_bytes, a.m.keys).await?;
    let kafka_topic = opts.kafka_topic(&topic);
    let (o, kt, n) = (&opts, &kafka_topic, a.messages);
    let raw = |name: String| async move { raw_consume(o, kt, n, &o.group_id(&name)).await };
    let report =
        crate::bench::raw::consume_rounds(&bus, &topic, &a.m, n, &run, "rdkafka", raw).await?;
    let mut config = crate::bench::raw::consume_config(n, a.payload_bytes, &a.m);
    config["kafka_topic"] = json!(kafka_topic);
    report.print(a.m.json, config);
    Ok(EXIT_OK)
}

/// The raw side of a consume round: a `StreamConsumer` in group `group` (the transport's client
/// settings, auto commit off, earliest offset) subscribed to `kafka_topic`, `recv` until `n`
/// records, an async commit of the offsets read after every [`RAW_FETCH`] and a sync one at
/// the end; timed from the first record to the end of the last commit.
async fn raw_consume(
    opts: &KafkaOptions,
    kafka_topic: &str,
    n: u64,
    group: &str,
) -> CliResult<Consumed> {
    let err = |what: &str, e: &dyn std::fmt::Display| {
        CliError::transport(format!("raw consumer group {group}: {what}: {e}"))
    };
    let mut cfg = opts.client_config();
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: StreamConsumer = cfg.create().map_err(|e| err("create", &e))?;
    // As the runtime's subscribe does (and untimed, as its is): the group's start committed on
    // every partition, so no partition waits for an offset reset after the join.
    tokio::task::block_in_place(|| {
        let md = consumer
            .fetch_metadata(Some(kafka_topic), opts.request_timeout)
            .map_err(|e| err("metadata", &e))?;
        let mut tpl = TopicPartitionList::new();
        for t in md.topics() {
            for p in t.partitions() {
                let (low, _) = consumer
                    .fetch_watermarks(kafka_topic, p.id(), opts.request_timeout)
                    .map_err(|e| err("watermarks", &e))?;
                tpl.add_partition_offset(kafka_topic, p.id(), Offset::Offset(low))
                    .map_err(|e| err("start", &e))?;
            }
        }
        consumer
            .commit(&tpl, CommitMode::Sync)
            .map_err(|e| err("committing the start", &e))
    })?;
    consumer
        .subscribe(&[kafka_topic])
        .map_err(|e| err("subscribe", &e))?;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let commit = |next: &BTreeMap<i32, i64>, mode: CommitMode| {
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next {
            tpl.add_partition_offset(kafka_topic, *p, Offset::Offset(*o))
                .map_err(|e| err("commit", &e))?;
        }
        consumer.commit(&tpl, mode).map_err(|e| err("commit", &e))
    };
    let mut got = 0u64;
    let mut first = None;
    while got < n {
        let m = match tokio::time::timeout(IDLE_LIMIT, consumer.recv()).await {
            Ok(m) => m.map_err(|e| err("recv", &e))?,
            Err(_) => return Err(shortfall(&format!("raw consumer group {group}"), got, n)),
        };
        first.get_or_insert_with(Instant::now);
        next.insert(m.partition(), m.offset() + 1);
        got += 1;
        if got.is_multiple_of(RAW_FETCH as u64) {
            commit(&next, CommitMode::Async)?;
        }
    }
    commit(&next, CommitMode::Sync)?;
    Ok(Consumed {
        read: got,
        secs: first.map_or(0.0, |f: Instant| f.elapsed().as_secs_f64()),
    })
}
