//! Where the Kafka test broker, tansu 0.6.0 (in-memory storage, started by
//! `scripts/brokers.sh start kafka`), answers differently from Kafka. Each test shows one
//! deviation through the public API, and what the Kafka tests do about it. They assert tansu's
//! answers, so a tansu that fixed one fails here: then drop the matching workaround.
//!
//! The binding itself has no tansu-specific code; the workarounds are settings in the test
//! URLs (`batch.num.messages=1`) and choices that are right on Kafka too (replay verifies the
//! record a timestamp lookup points at; a consumer joins its group at its first fetch).

use ampybus::transport::{StartAt, SubscribeSpec};
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
use std::time::Duration;

/// A bus on a namespace of its own, one partition per topic. `single_batch`: the ten records
/// published below go to the broker as one produce batch (at most 10 records per batch,
/// lingering until ten are there); otherwise one batch per record.
async fn bus(label: &str, single_batch: bool) -> (Bus, String) {
    ampybus_conformance::start_test_broker("kafka");
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let batching = if single_batch {
        "batch.num.messages=10&linger.ms=2000"
    } else {
        "batch.num.messages=1"
    };
    let url = format!(
        "kafka://127.0.0.1:9092?namespace=dev{label}{id}.&partitions=1&dedupe=off&{batching}"
    );
    (Bus::connect(&url).await.expect("connect"), url)
}

fn topic() -> Topic {
    Topic::parse("ampy.dev.news.v1.dev.a").unwrap()
}

async fn publish_ten(bus: &Bus) {
    let envs = (0..10)
        .map(|i| {
            let h = Headers::for_publish(ampybus::headers::RAW_BYTES_SCHEMA, "dev@1", "dev", "k");
            Envelope::new(&topic(), h, format!("m{i}").into_bytes())
        })
        .collect();
    bus.publish_wire(envs).await.expect("publish");
}

async fn messages(bus: &Bus) -> u64 {
    let stats = ampybus_conformance::all_topic_stats(bus).await;
    assert_eq!(stats.len(), 1, "{stats:?}");
    stats[0].messages
}

/// Records delivered to `spec` within `wait` (acknowledging each).
async fn drain(bus: &Bus, spec: SubscribeSpec, wait: Duration) -> Vec<String> {
    let mut sub = bus.subscribe(spec).await.expect("subscribe");
    let mut got = Vec::new();
    loop {
        let batch = sub.fetch(64, wait).await.expect("fetch");
        if batch.is_empty() {
            return got;
        }
        for d in batch {
            got.push(String::from_utf8_lossy(&d.envelope.payload).into_owned());
            d.ack().await.map_err(|(e, _)| e).unwrap();
        }
    }
}

/// Deviation 1: the end of a partition (ListOffsets "latest", the high watermark) is the
/// base offset of its last batch + 1, not the offset after its last record. Kafka: 10 both
/// times. Effect: topic counts and consumer lag too low. Workaround: one record per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_offset_is_the_last_batch_base_plus_one() {
    let (one_per_batch, _) = bus("end1", false).await;
    publish_ten(&one_per_batch).await;
    assert_eq!(messages(&one_per_batch).await, 10);

    let (one_batch, _) = bus("end10", true).await;
    publish_ten(&one_batch).await;
    assert_eq!(
        messages(&one_batch).await,
        1,
        "tansu fixed the high watermark?"
    );
    // Reading shows all ten are there.
    let all = drain(
        &one_batch,
        SubscribeSpec::ephemeral(
            TopicPattern::parse("ampy.dev.news.>").unwrap(),
            StartAt::Earliest,
        ),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(all.len(), 10, "{all:?}");
}

/// Deviation 2: a fetch from an offset inside a stored batch comes back empty, every time, so
/// a consumer group that committed in the middle of a batch never gets the rest. Kafka
/// returns the whole batch and the client skips the records before the offset. Workaround:
/// one record per batch (`batch.num.messages=1` in the test URLs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_from_inside_a_batch_returns_nothing() {
    let (bus, url) = bus("mid", true).await;
    publish_ten(&bus).await;
    let pattern = TopicPattern::parse("ampy.dev.news.>").unwrap();
    // Acknowledge the first five only: the group commits offset 5, inside the batch.
    {
        let mut sub = bus
            .subscribe(SubscribeSpec::durable(pattern.clone(), "mid"))
            .await
            .unwrap();
        let mut acked = 0;
        while acked < 5 {
            for d in sub.fetch(1, Duration::from_secs(10)).await.unwrap() {
                if acked < 5 {
                    d.ack().await.map_err(|(e, _)| e).unwrap();
                    acked += 1;
                }
            }
        }
    }
    bus.transport().close().await.unwrap();
    let bus = Bus::connect(&url).await.expect("reconnect");
    let rest = drain(
        &bus,
        SubscribeSpec::durable(pattern, "mid"),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        rest.is_empty(),
        "tansu fixed fetches inside a batch? {rest:?}"
    );
}

/// Deviation 3: a timestamp lookup (`offsets_for_times`) for a time after every record
/// answers offset 0 instead of "none" (-1; for times inside the log it can also answer too
/// early). The binding does not take a lookup's word: a group starting at a time reads forward
/// from the answer to the first record at or after the time (on Kafka, the record the lookup
/// found), and replay checks the record found the same way. So `StartAt::Time(future)` starts
/// at the end, as on Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_lookup_past_the_end_answers_zero() {
    use ampybus::transport::kafka::KafkaOptions;
    use ampybus::transport::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
    use ampybus::transport::kafka::rdkafka::{Offset, TopicPartitionList};
    let (bus, url) = bus("time", false).await;
    publish_ten(&bus).await;
    let opts = KafkaOptions::from_url(&url).unwrap();
    let kafka_topic = opts.kafka_topic(topic().as_str());
    let future = chrono::Utc::now() + chrono::Duration::hours(1);
    let answer = tokio::task::spawn_blocking(move || {
        let mut cfg = opts.client_config();
        cfg.set("group.id", "dev-lookup");
        let c: BaseConsumer = cfg.create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&kafka_topic, 0, Offset::Offset(future.timestamp_millis()))
            .unwrap();
        let found = c.offsets_for_times(tpl, Duration::from_secs(10)).unwrap();
        found.elements()[0].offset()
    })
    .await
    .unwrap();
    assert_eq!(
        answer,
        Offset::Offset(0),
        "tansu fixed time lookups past the end?"
    );

    let mut spec =
        SubscribeSpec::durable(TopicPattern::parse("ampy.dev.news.>").unwrap(), "future");
    spec.start = StartAt::Time(future);
    let got = drain(&bus, spec, Duration::from_secs(3)).await;
    assert!(got.is_empty(), "{got:?}");
}
