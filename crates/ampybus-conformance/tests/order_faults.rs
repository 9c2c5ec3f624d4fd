//! Per-key order across instances under faults, on NATS JetStream and Redis Streams (the
//! transports where one active instance per durable name is kept by a lease in the broker):
//! the conformance flow of `order_across_instances` (three instances of one durable consumer,
//! 12 interleaved keys, seeded retries in strict mode) with, a third of the way through,
//!
//! * the active instance killed — a standby takes over within the lease time plus the ack
//!   deadline (asserted with a generous bound; the time is printed),
//! * the broker killed -9 and restarted on the same port and store,
//! * the consumer's lease removed from the broker (the holder notices at its next renewal and
//!   stops; a successor waits out the holder's validity and its deliveries' deadline first),
//!
//! each asserting what the case asserts: every key's messages first completed in publish
//! order, nothing lost, repeats only where an ack was cut and then in order, no two handlers
//! of one key at once. Each test spawns a private server.

use ampybus::Bus;
use ampybus::dedupe::DedupeStore;
use ampybus::transport::nats::NatsKvDedupeStore;
use ampybus::transport::redis::RedisDedupeStore;
use ampybus_conformance::{
    Capabilities, CaseStatus, Disruption, KillActive, NatsServer, RedisServer, TestContext,
    TransportFactory, order_with_disruption,
};
use async_trait::async_trait;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The case's ack deadline (3 s) gives a lease time of 1 s: a takeover after a kill needs at
/// most about 1 s (the lease runs out) + 0.25 s (a standby notices on NATS) + 3 s (the killed
/// instance's deliveries come back) + 1 s (redelivery slack). Bound with room for a loaded
/// machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(15);

struct Private {
    name: &'static str,
    url: String,
}

#[async_trait]
impl TransportFactory for Private {
    fn name(&self) -> &str {
        self.name
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    async fn new_bus(&self, ctx: &TestContext) -> Bus {
        self.reopen_bus(ctx).await
    }
    async fn reopen_bus(&self, _ctx: &TestContext) -> Bus {
        Bus::connect(&self.url).await.expect("connect")
    }
    async fn dedupe_store(&self, _ctx: &TestContext) -> Arc<dyn DedupeStore> {
        if self.name == "nats" {
            Arc::new(
                NatsKvDedupeStore::connect(&self.url)
                    .await
                    .expect("KV dedupe store"),
            )
        } else {
            Arc::new(
                RedisDedupeStore::connect(&self.url)
                    .await
                    .expect("redis dedupe store"),
            )
        }
    }
}

fn passed(status: CaseStatus) -> String {
    match status {
        CaseStatus::Passed(d) => d,
        other => panic!("{other:?}"),
    }
}

/// The takeover time from a case report (`first completion after it {t} later`).
fn takeover(detail: &str) -> Duration {
    let t = detail
        .split("first completion after it ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .expect("takeover time in the report");
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap());
    let v: f64 = num.parse().unwrap();
    match unit {
        "s" => Duration::from_secs_f64(v),
        "ms" => Duration::from_secs_f64(v / 1e3),
        "µs" | "us" => Duration::from_secs_f64(v / 1e6),
        other => panic!("unit {other}"),
    }
}

fn lease_key_part(consumer: &str) -> String {
    data_encoding::BASE64URL_NOPAD.encode(consumer.as_bytes())
}

enum Broker {
    Nats(NatsServer),
    Redis(RedisServer),
}

struct Restart(Mutex<Option<Broker>>);

#[async_trait]
impl Disruption for Restart {
    fn label(&self) -> String {
        "the broker killed -9 and restarted".to_owned()
    }
    async fn disrupt(&self, _consumer: &str) {
        let mut b = self.0.lock().unwrap().take().expect("server");
        let b = tokio::task::spawn_blocking(move || {
            match &mut b {
                Broker::Nats(s) => s.restart(),
                Broker::Redis(s) => {
                    s.kill();
                    s.spawn();
                }
            }
            b
        })
        .await
        .unwrap();
        *self.0.lock().unwrap() = Some(b);
    }
}

/// Removes the consumer's lease from the broker (as an operator or a stray script would).
struct RemoveLease {
    url: String,
    nats_prefix: Option<&'static str>,
}

#[async_trait]
impl Disruption for RemoveLease {
    fn label(&self) -> String {
        "the lease removed from the broker".to_owned()
    }
    async fn disrupt(&self, consumer: &str) {
        let key = lease_key_part(consumer);
        match self.nats_prefix {
            Some(prefix) => {
                let addr = self.url.trim_start_matches("nats://");
                let addr = addr.split('?').next().unwrap();
                let c = async_nats::connect(addr).await.expect("connect");
                let js = async_nats::jetstream::new(c);
                let kv = js
                    .get_key_value(format!("{prefix}_leases"))
                    .await
                    .expect("lease bucket");
                kv.delete(&key).await.expect("delete the lease");
            }
            None => {
                let client = redis::Client::open(self.url.split('?').next().unwrap()).unwrap();
                let mut c = client.get_multiplexed_async_connection().await.unwrap();
                let prefix = self
                    .url
                    .split("key_prefix=")
                    .nth(1)
                    .unwrap()
                    .split('&')
                    .next()
                    .unwrap();
                let n: i64 = redis::cmd("DEL")
                    .arg(format!("{prefix}ampy:lease:{key}"))
                    .query_async(&mut c)
                    .await
                    .unwrap();
                assert_eq!(n, 1, "the lease key existed");
            }
        }
    }
}

const NATS_QUERY: &str = "?stream_prefix=ORD&max_age_days=1";
const REDIS_QUERY: &str = "?key_prefix=ord:&max_age_days=1";

#[derive(Clone, Copy)]
enum Fault {
    Kill,
    Restart,
    RemoveLease,
}

/// Spawns a private server of `kind` (NATS with a JetStream store, Redis with an fsynced
/// append-only file), runs the flow with `fault` and returns the case's report.
async fn run(kind: &'static str, fault: Fault) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (broker, url) = if kind == "nats" {
        let store = dir.path().join("js");
        let s = NatsServer::start(dir.path(), &["-js", "-sd", store.to_str().unwrap()]);
        let url = s.url("nats", NATS_QUERY);
        (Broker::Nats(s), url)
    } else {
        let s = RedisServer::start(
            dir.path(),
            &["--appendonly", "yes", "--appendfsync", "always"],
        );
        let url = s.url("", REDIS_QUERY);
        (Broker::Redis(s), url)
    };
    let f = Private {
        name: kind,
        url: url.clone(),
    };
    let restart = Restart(Mutex::new(Some(broker)));
    let remove = RemoveLease {
        url,
        nats_prefix: (kind == "nats").then_some("ORD"),
    };
    let d: &dyn Disruption = match fault {
        Fault::Kill => &KillActive,
        Fault::Restart => &restart,
        Fault::RemoveLease => &remove,
    };
    let detail = passed(order_with_disruption(&f, d).await);
    eprintln!("[{kind}] {detail}");
    detail
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_active_instance_killed_standby_takes_over_in_order() {
    let d = run("nats", Fault::Kill).await;
    assert!(takeover(&d) < TAKEOVER_BOUND, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_active_instance_killed_standby_takes_over_in_order() {
    let d = run("redis", Fault::Kill).await;
    assert!(takeover(&d) < TAKEOVER_BOUND, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_broker_restart_during_a_lease_keeps_order() {
    run("nats", Fault::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_restart_during_a_lease_keeps_order() {
    run("redis", Fault::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_lease_removed_holder_stops_and_order_holds() {
    run("nats", Fault::RemoveLease).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lease_removed_holder_stops_and_order_holds() {
    run("redis", Fault::RemoveLease).await;
}
