//! The conformance suite on NATS JetStream, against the real server on 127.0.0.1:4222
//! (`scripts/brokers.sh start nats` is run first; it reuses a server already there).
//!
//! Isolation: every case's topics carry its unique id (`ampy.dev.{domain}.v1.c{id}.…`) and its
//! consumers are named after it, so cases share the per-domain streams (created with the
//! `AMPYCONF` prefix and a 1-day max age when missing) without seeing each other's messages;
//! the DLQ case filters the shared DLQ stream by `original_topic`. The dedupe store is the KV
//! bucket `AMPYCONF_dedupe`, keyed by consumer name.

use ampybus::Bus;
use ampybus::dedupe::DedupeStore;
use ampybus::transport::nats::NatsKvDedupeStore;
use ampybus_conformance::{Capabilities, TestContext, TransportFactory};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

const URL: &str =
    "nats://127.0.0.1:4222?stream_prefix=AMPYCONF&max_age_days=1&consumer_inactive_s=600";

struct Nats;

#[async_trait]
impl TransportFactory for Nats {
    fn name(&self) -> &str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        // Replay by time and keys; the best-effort tier is the runtime's Producer, above any
        // transport (its lag sub-case runs where the transport reports consumer lag).
        Capabilities::default()
    }

    async fn new_bus(&self, ctx: &TestContext) -> Bus {
        tokio::task::spawn_blocking(|| ampybus_conformance::start_test_broker("nats"))
            .await
            .expect("brokers");
        self.reopen_bus(ctx).await
    }

    async fn reopen_bus(&self, _ctx: &TestContext) -> Bus {
        Bus::connect(URL).await.expect("connect nats")
    }

    async fn dedupe_store(&self, _ctx: &TestContext) -> Arc<dyn DedupeStore> {
        let store = NatsKvDedupeStore::connect(URL)
            .await
            .expect("KV dedupe store")
            .with_window(Duration::from_secs(86_400));
        Arc::new(store)
    }
}

ampybus_conformance::conformance_tests!(Nats);
