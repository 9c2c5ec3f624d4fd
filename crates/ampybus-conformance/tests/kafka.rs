//! The conformance suite on Kafka, against the Kafka-API broker on 127.0.0.1:9092
//! (`scripts/brokers.sh start kafka` is run first: it reuses a broker already there, else
//! starts tansu 0.6.0 with its in-memory storage).
//!
//! Isolation: every case gets a namespace of its own, `conf{id}.`, that prefixes its Kafka
//! topics and consumer groups (the DLQ topic too). The runtime's dedupe store is SQLite in the
//! case's scratch directory.

use ampybus::Bus;
use ampybus_conformance::{Capabilities, TestContext, TransportFactory};
use async_trait::async_trait;

struct Kafka;

/// `batch.num.messages=1`: one record per produce batch, because tansu 0.6.0 answers a fetch
/// from an offset inside a stored batch with nothing and reports the end of a partition as
/// the last batch's base offset + 1 (see `tansu_deviations.rs`). Real Kafka needs neither.
fn url(ctx: &TestContext) -> String {
    format!(
        "kafka://127.0.0.1:9092?namespace=conf{}.&partitions=3&max_age_days=1&batch.num.messages=1&dedupe=sqlite:{}",
        ctx.id(),
        ctx.dir().join("kafka-dedupe.sqlite3").display()
    )
}

#[async_trait]
impl TransportFactory for Kafka {
    fn name(&self) -> &str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        // Replay by time and keys (offsets_for_times, keys on the client); the best-effort
        // tier is the runtime's Producer, and its lag sub-case runs (watermarks − committed).
        // Acks commit offsets: only the acknowledged prefix of each partition is settled.
        Capabilities {
            prefix_acks: true,
            ..Capabilities::default()
        }
    }

    fn why_not(&self, flag: &str) -> Option<String> {
        (flag == "broker_restart").then(|| {
            "the test broker (tansu) keeps its log in memory: a restart loses every topic".into()
        })
    }

    async fn new_bus(&self, ctx: &TestContext) -> Bus {
        // `RUST_LOG=ampybus=debug,librdkafka=info cargo nextest run … --no-capture` shows
        // what the binding and librdkafka do.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        tokio::task::spawn_blocking(|| ampybus_conformance::start_test_broker("kafka"))
            .await
            .expect("brokers");
        self.reopen_bus(ctx).await
    }

    async fn reopen_bus(&self, ctx: &TestContext) -> Bus {
        Bus::connect(&url(ctx)).await.expect("connect kafka")
    }

    async fn crash(&self, bus: Bus) {
        // A consumer process that died leaves its group when the broker's session timeout
        // passes; closing the transport makes its consumers leave now.
        bus.transport().close().await.expect("close");
    }
}

ampybus_conformance::conformance_tests!(Kafka);
