//! The conformance suite on NATS JetStream, against the real server on 127.0.0.1:4222
//! (`scripts/brokers.sh start nats` is run first; it reuses a server already there).
//!
//! Isolation: every case's topics carry its unique id (`ampy.dev.{domain}.v1.c{id}.…`) and its
//! consumers are named after it, so cases share the per-domain streams (created with the
//! `AMPYCONF` prefix and a 1-day max age when missing) without seeing each other's messages;
//! the DLQ case filters the shared DLQ stream by `original_topic`. The dedupe store is the KV
//! bucket `AMPYCONF_dedupe`, keyed by consumer name. The broker restart case runs on a
//! `nats-server` of its own (JetStream store in the case's directory), killed -9 and started
//! again on the same port.

use ampybus::Bus;
use ampybus::dedupe::DedupeStore;
use ampybus::transport::nats::NatsKvDedupeStore;
use ampybus_conformance::{Capabilities, NatsServer, OwnBrokers, TestContext, TransportFactory};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

const URL: &str =
    "nats://127.0.0.1:4222?stream_prefix=AMPYCONF&max_age_days=1&consumer_inactive_s=600";

/// What a case with a broker of its own connects with (a short request timeout: the broker
/// restart case waits out an outage).
const OWN_QUERY: &str = "?stream_prefix=AMPYCONF&max_age_days=1&request_timeout_ms=2000";

/// The shared server, and a `nats-server` of its own (JetStream store in the case's
/// directory) for a case that restarts its broker.
#[derive(Default)]
struct Nats {
    own: OwnBrokers<NatsServer>,
}

impl Nats {
    fn url(&self, ctx: &TestContext) -> String {
        let own = |server: &NatsServer| server.url("nats", OWN_QUERY);
        self.own.url(ctx, own).unwrap_or_else(|| URL.to_owned())
    }
}

#[async_trait]
impl TransportFactory for Nats {
    fn name(&self) -> &str {
        "nats"
    }

    fn capabilities(&self) -> Capabilities {
        // Replay by time and keys; the best-effort tier is the runtime's Producer, above any
        // transport (its lag sub-case runs where the transport reports consumer lag). New
        // streams are joined: a durable consumer creates them when it subscribes, an
        // ephemeral reader lists them again every second.
        Capabilities {
            broker_restart: true,
            ..Capabilities::default()
        }
    }

    async fn new_bus(&self, ctx: &TestContext) -> Bus {
        if ctx.wants_own_broker() {
            let store = ctx.dir().join("js");
            let args = ["-js", "-sd", store.to_str().expect("utf-8 path")].map(String::from);
            let dir = ctx.dir().to_owned();
            let start = move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                NatsServer::start(&dir, &args)
            };
            self.own.start(ctx, start).await;
        } else {
            tokio::task::spawn_blocking(|| ampybus_conformance::start_test_broker("nats"))
                .await
                .expect("brokers");
        }
        self.reopen_bus(ctx).await
    }

    async fn reopen_bus(&self, ctx: &TestContext) -> Bus {
        Bus::connect(&self.url(ctx)).await.expect("connect nats")
    }

    async fn shared_work_bus(&self, ctx: &TestContext) -> Bus {
        Bus::connect(&format!("{}&order=per_instance", self.url(ctx)))
            .await
            .expect("connect nats")
    }

    async fn restart_broker(&self, ctx: &TestContext) {
        self.own.restart(ctx).await;
    }

    async fn dedupe_store(&self, ctx: &TestContext) -> Arc<dyn DedupeStore> {
        let store = NatsKvDedupeStore::connect(&self.url(ctx))
            .await
            .expect("KV dedupe store")
            .with_window(Duration::from_secs(86_400));
        Arc::new(store)
    }
}

ampybus_conformance::conformance_tests!(Nats::default());
