//! Kafka fault and bad-input tests, against the Kafka-API broker on 127.0.0.1:9092
//! (`scripts/brokers.sh start kafka`: tansu 0.6.0 with in-memory storage in CI). Every test
//! uses a namespace of its own, so topics and groups never meet another test's. Only what is
//! specific to Kafka is here (its URL options, record checks, SASL against the test broker);
//! the flows every transport shares (a consumer crash mid-run, groups over several topics,
//! where a group starts, replay across topics) are conformance cases (`tests/kafka.rs`).

use ampybus::transport::kafka::KafkaOptions;
use ampybus::{Bus, Envelope, ErrorKind, Topic};
use ampybus_conformance::fault_headers as headers;
use std::time::{Duration, Instant};

/// `batch.num.messages=1`: one record per produce batch, because tansu 0.6.0 answers a fetch
/// from an offset inside a stored batch with nothing (a consumer resuming mid-batch would wait
/// forever; see `tansu_deviations.rs`). Real Kafka needs no such setting.
fn url(label: &str, dir: &std::path::Path, extra: &str) -> String {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
    format!(
        "kafka://127.0.0.1:9092?namespace=kf{label}{id}.&partitions=3&max_age_days=1&batch.num.messages=1&dedupe=sqlite:{}{extra}",
        dir.join("dedupe.sqlite3").display()
    )
}

fn start_shared() {
    ampybus_conformance::start_test_broker("kafka");
}

fn raw(topic: &Topic, key: &str, payload: &str) -> Envelope {
    Envelope::new(topic, headers(key), payload.as_bytes().to_vec())
}

async fn within<T>(what: &str, limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung for more than {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_unreachable_brokers_and_bad_records_fail_clearly() {
    // Unreachable (a clear timeout naming the broker, within the connect timeout and a
    // margin), garbage port, unknown option, misspelt scheme: the checks every broker shares.
    ampybus_conformance::bad_urls_fail_fast_and_clearly(ampybus_conformance::BadUrls {
        scheme: "kafka",
        unreachable_query: "?connect_timeout_ms=1500",
        missing_ca: None,
        unreachable_kinds: &[ErrorKind::Timeout],
        unreachable_text: "no broker answered",
        limit: Duration::from_secs(15),
    })
    .await;

    // Bad URLs: Config errors naming the option and the rule, never the password.
    for (u, needle) in [
        ("kafka://h:9092?bogus=1", "unknown option `bogus`"),
        ("kafka://h:notaport", "port `notaport`"),
        (
            "kafka://bob:s3cret@h:9092?group.id=x",
            "`group.id`: set by the binding",
        ),
        (
            "kafka://h:9092?partitions=0",
            "`partitions`: must be 1..=10000",
        ),
        ("kafka://h:9092/path", "no path"),
        ("kafka://h:9092?dedupe=mysql:x", "`dedupe`: must be"),
        ("kafka://h:9092?full_topics=ampy.dev", "`full_topics`"),
        ("kafka://h:9092?namespace=a/b", "`namespace`"),
        (
            "kafka://h:9092?sasl.username=",
            "`sasl.username`: empty value",
        ),
    ] {
        let e = KafkaOptions::from_url(u).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{u}: {e}");
        assert!(e.to_string().contains(needle), "{u}: {e}");
        assert!(!e.to_string().contains("s3cret"), "{u}: {e}");
    }

    start_shared();
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(&url("bad", dir.path(), "&full_topics=ampy.dev.news.v1"))
        .await
        .expect("connect");
    // A contract header may not be named `topic` (the record header of the logical topic).
    let topic = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
    let mut env = raw(&topic, "XNAS.AAPL", "x");
    env.headers.set("topic", "spoofed");
    let e = bus.publish_wire(vec![env]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Header, "{e}");
    assert!(e.to_string().contains("`topic`"), "{e}");
    // A full-topic stream whose subtopic holds a character Kafka forbids in topic names.
    let bad = Topic::parse("ampy.dev.news.v1.desk:a").unwrap();
    let e = bus
        .publish_wire(vec![raw(&bad, "k", "x")])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Topic, "{e}");
    assert!(e.to_string().contains("desk:a"), "{e}");
    // Nothing of either reached the broker.
    let stats = ampybus_conformance::all_topic_stats(&bus).await;
    assert!(stats.iter().all(|s| s.messages == 0), "{stats:?}");
}

/// What the test broker does with SASL credentials it was not configured for: tansu 0.6.0
/// has no authentication, so the client's SASL handshake is refused and the connect fails
/// with a clear error instead of hanging (on a real Kafka cluster wrong credentials fail the
/// same first metadata request, as `SaslAuthenticationFailed`, mapped to `Config`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_the_broker_cannot_check_fail_at_connect() {
    start_shared();
    let started = Instant::now();
    let r = within(
        "connect with SASL PLAIN",
        Duration::from_secs(30),
        Bus::connect("kafka://alice:s3cret@127.0.0.1:9092?connect_timeout_ms=3000&dedupe=off"),
    )
    .await;
    let e = r.expect_err("the test broker has no SASL; the connect must not pass");
    eprintln!(
        "SASL against the test broker: {e} after {:?}",
        started.elapsed()
    );
    assert!(
        matches!(e.kind(), ErrorKind::Config | ErrorKind::Timeout),
        "{e}"
    );
    assert!(!e.to_string().contains("s3cret"), "{e}");
}
