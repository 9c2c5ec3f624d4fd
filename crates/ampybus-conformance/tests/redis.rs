//! The conformance suite on Redis Streams, against the real server on 127.0.0.1:6379
//! (`scripts/brokers.sh start redis` is run first; it reuses a server already there).
//!
//! Isolation: every case gets a key prefix of its own, `conf{unix seconds}{id}:`, so its
//! streams, groups and dedupe keys are its alone (the DLQ stream too). Keys of cases older than
//! an hour (earlier runs) are deleted when a test process starts. The broker restart case runs
//! on a `redis-server` of its own (append-only file with fsync always, in the case's
//! directory), killed -9 and started again on the same port.

use ampybus::Bus;
use ampybus::dedupe::DedupeStore;
use ampybus::transport::redis::RedisDedupeStore;
use ampybus_conformance::{Capabilities, OwnBrokers, RedisServer, TestContext, TransportFactory};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// The shared server, and a `redis-server` of its own (append-only file, fsync always, in the
/// case's directory) for a case that restarts its broker.
#[derive(Default)]
struct Redis {
    own: OwnBrokers<RedisServer>,
}

impl Redis {
    fn url(&self, ctx: &TestContext) -> String {
        let own = |server: &RedisServer| {
            server.url(
                "",
                "?max_age_days=1&request_timeout_ms=2000&connect_timeout_ms=1000",
            )
        };
        self.own.url(ctx, own).unwrap_or_else(|| shared_url(ctx))
    }
}

fn shared_url(ctx: &TestContext) -> String {
    static STARTED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let secs = *STARTED.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    });
    format!(
        "redis://127.0.0.1:6379?key_prefix=conf{secs}{}:&max_age_days=1",
        ctx.id()
    )
}

/// Deletes keys of cases started more than an hour ago (`conf{secs}…:`): housekeeping for a
/// shared server, so at most one test process sweeps every ten minutes (a `SET NX` marker), and
/// a sweep that fails or is slow never fails a test (dedupe keys also expire after a day).
async fn sweep_old_runs() {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        if let Err(e) = sweep().await {
            eprintln!("note: sweeping old conformance keys stopped: {e}");
        }
    })
    .await;
}

async fn sweep() -> redis::RedisResult<()> {
    let client = redis::Client::open("redis://127.0.0.1:6379")?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mine: Option<String> = redis::cmd("SET")
        .arg("ampybus-conformance:sweep")
        .arg(now)
        .arg("NX")
        .arg("EX")
        .arg(600)
        .query_async(&mut c)
        .await?;
    if mine.is_none() {
        return Ok(());
    }
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("conf*:*")
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut c)
            .await?;
        let old: Vec<&String> = keys
            .iter()
            .filter(|k| {
                k.get(4..14)
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|s| s + 3600 < now)
            })
            .collect();
        if !old.is_empty() {
            let _: i64 = redis::cmd("UNLINK").arg(&old).query_async(&mut c).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

#[async_trait]
impl TransportFactory for Redis {
    fn name(&self) -> &str {
        "redis"
    }

    fn capabilities(&self) -> Capabilities {
        // Replay by time and keys (XRANGE); the best-effort tier is the runtime's Producer,
        // and its lag sub-case runs (XINFO GROUPS). Streams created later are found (a scan
        // every second).
        Capabilities {
            broker_restart: true,
            ..Capabilities::default()
        }
    }

    async fn new_bus(&self, ctx: &TestContext) -> Bus {
        if ctx.wants_own_broker() {
            let dir = ctx.dir().to_owned();
            let start = move || {
                RedisServer::start(&dir, &["--appendonly", "yes", "--appendfsync", "always"])
            };
            self.own.start(ctx, start).await;
        } else {
            tokio::task::spawn_blocking(|| ampybus_conformance::start_test_broker("redis"))
                .await
                .expect("brokers");
            sweep_old_runs().await;
        }
        self.reopen_bus(ctx).await
    }

    async fn reopen_bus(&self, ctx: &TestContext) -> Bus {
        Bus::connect(&self.url(ctx)).await.expect("connect redis")
    }

    async fn shared_work_bus(&self, ctx: &TestContext) -> Bus {
        Bus::connect(&format!("{}&order=per_instance", self.url(ctx)))
            .await
            .expect("connect redis")
    }

    async fn restart_broker(&self, ctx: &TestContext) {
        self.own.restart(ctx).await;
    }

    async fn dedupe_store(&self, ctx: &TestContext) -> Arc<dyn DedupeStore> {
        let store = RedisDedupeStore::connect(&self.url(ctx))
            .await
            .expect("redis dedupe store")
            .with_window(Duration::from_secs(86_400));
        Arc::new(store)
    }
}

ampybus_conformance::conformance_tests!(Redis::default());
