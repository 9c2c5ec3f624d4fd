//! The factory a binding implements, the per-test context, and shared helpers.

use ampybus::dedupe::{DedupeStore, SqliteDedupeStore};
use ampybus::runtime::{ConsumerHandle, ConsumerStats};
use ampybus::transport::{Delivery, StartAt, SubscribeSpec};
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
use async_trait::async_trait;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a binding can do. A case that needs a capability the binding does not claim is
/// reported as not applicable, never as passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `bus.replay()` gives a [`ampybus::transport::ReplayByTime`] that honours
    /// `WindowQuery::start`/`end` (store time, `[start, end)`).
    pub replay_by_time: bool,
    /// The same reader honours `WindowQuery::keys` (partition keys).
    pub replay_by_keys: bool,
    /// Best-effort topics (drop / conflate latest-per-key under a full queue) work. The
    /// shedding is done by `runtime::Producer` above the transport, so every binding that
    /// publishes batches can claim it; the case also reads consumer lag when the bus can.
    pub best_effort_tier: bool,
    /// Acknowledgements settle only a prefix per partition (Kafka's committed offset): a
    /// message acknowledged after an earlier one of its partition that was not is delivered
    /// again to the next instance, which skips it as applied (dedupe store). Cases then accept
    /// such skips, bounded by what was in flight, but never a message applied twice.
    pub prefix_acks: bool,
    /// The factory can kill the broker of a case's namespace (storage kept) and start it again
    /// on the same address ([`TransportFactory::restart_broker`]), while the case's
    /// connections stay open and reconnect by themselves. Needs a broker of the case's own:
    /// the factory starts one for a [`TestContext::own_broker`] context.
    pub broker_restart: bool,
    /// A subscription (durable or ephemeral) over a pattern spanning several streams also
    /// reads a stream created after it subscribed.
    pub joins_new_streams: bool,
}

impl Capabilities {
    /// Every flag name, in declaration order.
    pub const FLAGS: [&'static str; 6] = [
        "replay_by_time",
        "replay_by_keys",
        "best_effort_tier",
        "prefix_acks",
        "broker_restart",
        "joins_new_streams",
    ];

    /// The value of the flag named `name` (a field name); `false` for an unknown name.
    ///
    /// ```
    /// let caps = ampybus_conformance::Capabilities::default();
    /// assert!(caps.flag("replay_by_time") && !caps.flag("broker_restart"));
    /// ```
    pub fn flag(&self, name: &str) -> bool {
        match name {
            "replay_by_time" => self.replay_by_time,
            "replay_by_keys" => self.replay_by_keys,
            "best_effort_tier" => self.best_effort_tier,
            "prefix_acks" => self.prefix_acks,
            "broker_restart" => self.broker_restart,
            "joins_new_streams" => self.joins_new_streams,
            _ => false,
        }
    }

    /// What a flag means, as a not-applicable report states it.
    ///
    /// ```
    /// let m = ampybus_conformance::Capabilities::meaning("broker_restart");
    /// assert!(m.contains("restart"));
    /// ```
    pub fn meaning(name: &str) -> &'static str {
        match name {
            "replay_by_time" => "no replay by store-time window",
            "replay_by_keys" => "no replay by partition keys",
            "best_effort_tier" => "best-effort tier not implemented",
            "prefix_acks" => "acks are not settled per partition prefix",
            "broker_restart" => "the factory has no broker restart hook",
            "joins_new_streams" => "streams created after a subscription are not read by it",
            _ => "unknown capability",
        }
    }
}

impl Default for Capabilities {
    /// Everything the embedded log does: replay by time and keys, the best-effort tier, new
    /// streams joined; no broker to restart.
    fn default() -> Self {
        Capabilities {
            replay_by_time: true,
            replay_by_keys: true,
            best_effort_tier: true,
            prefix_acks: false,
            broker_restart: false,
            joins_new_streams: true,
        }
    }
}

/// Builds buses for the suite. One [`TestContext`] per case: everything a case publishes lives
/// under its [`TestContext::topic`]s and consumer names carry its id, so cases never see each
/// other's messages even on a shared broker.
#[async_trait]
pub trait TransportFactory: Send + Sync {
    /// Short name shown in reports (`embedded`, `nats`, …).
    fn name(&self) -> &str;
    /// What this binding can do.
    fn capabilities(&self) -> Capabilities;
    /// A bus on a fresh, isolated namespace for `ctx` (a temp dir, a unique stream/topic
    /// prefix, …). Called once per case, first.
    async fn new_bus(&self, ctx: &TestContext) -> Bus;
    /// A new connection to the namespace [`TransportFactory::new_bus`] made for `ctx`:
    /// simulates a consumer process restarting after a crash.
    async fn reopen_bus(&self, ctx: &TestContext) -> Bus;
    /// Makes `bus` go away as a crashed process's connection would: its consumers stop being
    /// members of anything and their unacknowledged messages become deliverable to others.
    /// Default: drop it (brokers that redeliver after the ack deadline, the embedded log).
    /// Brokers that hand each partition to one member of a group (Kafka) close the transport,
    /// which is what the broker's session timeout does for a process that died.
    async fn crash(&self, bus: Bus) {
        drop(bus);
    }
    /// Why the binding does not claim the capability flag `flag`, when it can say more than
    /// the flag's meaning ([`Capabilities::meaning`]); shown in the not-applicable report.
    /// Default: `None`.
    fn why_not(&self, flag: &str) -> Option<String> {
        let _ = flag;
        None
    }
    /// A new connection to `ctx`'s namespace whose durable subscriptions share the work
    /// between instances of one name (every instance fetches). Default:
    /// [`TransportFactory::reopen_bus`] (the embedded log and Kafka share partitions out).
    /// NATS and Redis keep one active instance per name by default, so they connect with
    /// `order=per_instance` here.
    async fn shared_work_bus(&self, ctx: &TestContext) -> Bus {
        self.reopen_bus(ctx).await
    }
    /// Kills the broker of `ctx`'s namespace as a crash would (SIGKILL, storage kept) and
    /// starts it again on the same address; the connections already open must reconnect by
    /// themselves. Only called when [`Capabilities::broker_restart`] is claimed, and only for
    /// a context made with [`TestContext::own_broker`], for which [`TransportFactory::new_bus`]
    /// starts a broker of the case's own (a shared broker is never restarted). Default:
    /// panics (a factory claiming the flag overrides it).
    async fn restart_broker(&self, ctx: &TestContext) {
        panic!(
            "{}: restart_broker called for {} but the factory has no restart hook",
            self.name(),
            ctx.case()
        )
    }
    /// The durable dedupe store shared by every instance of a consumer in `ctx`'s namespace.
    /// Default: a [`SqliteDedupeStore`] in `ctx.dir()/dedupe.sqlite3` (the embedded default).
    async fn dedupe_store(&self, ctx: &TestContext) -> Arc<dyn DedupeStore> {
        let path = ctx.dir().join(ampybus::dedupe::DEFAULT_FILE);
        let store = tokio::task::spawn_blocking(move || SqliteDedupeStore::open(path))
            .await
            .expect("dedupe store: open task")
            .expect("dedupe store: open");
        Arc::new(store)
    }
}

/// One case's namespace: a unique id, a scratch directory (removed at the end) and topic names.
#[derive(Debug)]
pub struct TestContext {
    case: &'static str,
    id: String,
    dir: tempfile::TempDir,
    own_broker: bool,
}

impl TestContext {
    /// A new context for the case named `case`.
    pub fn new(case: &'static str) -> TestContext {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let dir = tempfile::Builder::new()
            .prefix(&format!("ampybus-conf-{case}-"))
            .tempdir()
            .expect("temp dir");
        TestContext {
            case,
            id,
            dir,
            own_broker: false,
        }
    }

    /// A context whose namespace lives on a broker of its own (one the case may restart,
    /// see [`TransportFactory::restart_broker`]).
    ///
    /// ```
    /// let ctx = ampybus_conformance::TestContext::new("x").own_broker();
    /// assert!(ctx.wants_own_broker());
    /// ```
    pub fn own_broker(mut self) -> TestContext {
        self.own_broker = true;
        self
    }

    /// True for a context made with [`TestContext::own_broker`]: the factory starts a broker
    /// for it (in [`TransportFactory::new_bus`]) and connects every bus of it there.
    ///
    /// ```
    /// assert!(!ampybus_conformance::TestContext::new("x").wants_own_broker());
    /// ```
    pub fn wants_own_broker(&self) -> bool {
        self.own_broker
    }

    /// The case's name.
    pub fn case(&self) -> &'static str {
        self.case
    }

    /// A short unique id (12 lowercase hex digits).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A scratch directory for this case (the embedded factory keeps its log here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ampy.dev.{domain}.v1.c{id}.{leaf}`: a topic only this case uses.
    pub fn topic(&self, domain: &str, leaf: &str) -> Topic {
        Topic::parse(&format!("ampy.dev.{domain}.v1.c{}.{leaf}", self.id)).expect("topic")
    }

    /// `ampy.dev.{domain}.v1.c{id}.>`: every topic of this case in `domain`.
    pub fn pattern(&self, domain: &str) -> TopicPattern {
        TopicPattern::parse(&format!("ampy.dev.{domain}.v1.c{}.>", self.id)).expect("pattern")
    }

    /// `ampy.dev.ticks.v1.{class}.c{id}.{leaf}`: a ticks topic only this case uses whose first
    /// subtopic token is `class` (`trade`, `quote`, `heartbeat`, …), as best-effort shedding
    /// classifies it.
    pub fn ticks_topic(&self, class: &str, leaf: &str) -> Topic {
        Topic::parse(&format!("ampy.dev.ticks.v1.{class}.c{}.{leaf}", self.id)).expect("topic")
    }

    /// `ampy.dev.ticks.v1.*.c{id}.>`: every [`TestContext::ticks_topic`] of this case.
    pub fn ticks_pattern(&self) -> TopicPattern {
        TopicPattern::parse(&format!("ampy.dev.ticks.v1.*.c{}.>", self.id)).expect("pattern")
    }

    /// A consumer name unique to this case: `{label}-{id}`.
    pub fn consumer(&self, label: &str) -> String {
        format!("{label}-{}", self.id)
    }
}

/// The `AMPYBUS_TEST_SCALE` environment variable (default 1).
pub fn scale() -> f64 {
    std::env::var("AMPYBUS_TEST_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0)
}

/// `n` scaled by [`scale`], at least `min`.
pub(crate) fn scaled(n: usize, min: usize) -> usize {
    ((n as f64 * scale()) as usize).max(min)
}

/// The headers of a raw-bytes message the fault tests publish (producer `faults@1`, source
/// `faults`), partition key `key`.
///
/// ```
/// let h = ampybus_conformance::fault_headers("k1");
/// assert_eq!(h.partition_key(), Some("k1"));
/// ```
pub fn fault_headers(key: &str) -> Headers {
    Headers::for_publish(
        ampybus::headers::RAW_BYTES_SCHEMA,
        "faults@1",
        "faults",
        key,
    )
}

/// Awaits `f`, panicking with `what` when it takes longer than `limit`; prints how long it
/// took (to stderr, as `what: 1.23s`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// let n = ampybus_conformance::timed("answer", Duration::from_secs(5), async { 42 }).await;
/// assert_eq!(n, 42);
/// # }
/// ```
pub async fn timed<T>(what: &str, limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let r = tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung for more than {limit:?}"));
    eprintln!("{what}: {:.2?}", start.elapsed());
    r
}

/// How long a wait may take before it counts as a hang: 300 s, times the scale when above 1.
pub fn hang_timeout() -> Duration {
    Duration::from_secs_f64(300.0 * scale().max(1.0))
}

/// Polls `cond` until it holds; panics naming `what` after [`hang_timeout`].
pub(crate) async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < hang_timeout(),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Asserts that every id in `ids` is recorded as applied for consumer `name` in `store`.
pub(crate) async fn assert_all_applied(
    store: &dyn ampybus::dedupe::DedupeStore,
    name: &str,
    ids: &[String],
) {
    for id in ids {
        assert!(
            store
                .is_applied(name, std::slice::from_ref(id))
                .await
                .unwrap(),
            "{id} not recorded as applied"
        );
    }
}

/// Polls a consumer's stats until `cond` holds; panics with the stats after [`hang_timeout`].
pub(crate) async fn wait_stats(
    what: &str,
    h: &ConsumerHandle,
    cond: impl Fn(&ConsumerStats) -> bool,
) -> ConsumerStats {
    let start = Instant::now();
    loop {
        let s = h.stats();
        if cond(&s) {
            return s;
        }
        assert!(
            start.elapsed() < hang_timeout(),
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until the wall clock is strictly past `t` (store times are wall-clock times; this
/// separates publish slices in time, it does not synchronise anything).
pub(crate) async fn clock_past(t: chrono::DateTime<chrono::Utc>) {
    while chrono::Utc::now() <= t {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A raw-bytes envelope with `partition_key = key` and `payload` as UTF-8.
///
/// ```
/// let t = ampybus::Topic::parse("ampy.dev.news.v1.x").unwrap();
/// let e = ampybus_conformance::raw(&t, "k", "hello");
/// assert_eq!(&e.payload[..], b"hello");
/// ```
pub fn raw(topic: &Topic, key: &str, payload: &str) -> Envelope {
    let h = Headers::for_publish(
        ampybus::headers::RAW_BYTES_SCHEMA,
        "conformance@1",
        "conformance",
        key,
    );
    Envelope::new(topic, h, payload.as_bytes().to_vec())
}

/// Publishes in batches of 1,000.
pub(crate) async fn publish_all(bus: &Bus, envs: Vec<Envelope>) {
    let mut it = envs.into_iter().peekable();
    while it.peek().is_some() {
        let chunk: Vec<Envelope> = it.by_ref().take(1000).collect();
        bus.publish_batch(chunk).await.expect("publish_batch");
    }
}

/// Reads what is on `pattern` (ephemeral, from the earliest) until `done` says the messages
/// collected so far are complete, then checks for `settle` that nothing more matching `keep`
/// arrives. Only messages for which `keep` is true are collected.
pub(crate) async fn read_until(
    bus: &Bus,
    pattern: &TopicPattern,
    keep: impl Fn(&Delivery) -> bool,
    done: impl Fn(&[Delivery]) -> bool,
    settle: Duration,
) -> Vec<Delivery> {
    let mut sub = bus
        .subscribe(SubscribeSpec::ephemeral(pattern.clone(), StartAt::Earliest))
        .await
        .expect("subscribe");
    let mut out: Vec<Delivery> = Vec::new();
    let start = Instant::now();
    while !done(&out) {
        assert!(
            start.elapsed() < hang_timeout(),
            "timed out reading {}: {} collected",
            pattern.as_str(),
            out.len()
        );
        let page = sub
            .fetch(100, Duration::from_millis(500))
            .await
            .expect("fetch");
        out.extend(page.into_iter().filter(|d| keep(d)));
    }
    let extra: Vec<Delivery> = sub
        .fetch(100, settle)
        .await
        .expect("fetch")
        .into_iter()
        .filter(|d| keep(d))
        .collect();
    assert!(
        extra.is_empty(),
        "more messages than expected on {}",
        pattern.as_str()
    );
    out
}

/// Headers that only make sense on a dead-lettered copy; [`redrive`] removes them.
pub use ampybus::runtime::DLQ_ONLY_HEADERS;

/// Redrives one dead-lettered message: publishes its original bytes back to its
/// `original_topic` with a NEW `message_id`, `redrive_of` = the DLQ'd message's
/// `original_message_id` (or its `message_id` when absent), `retry_count` + 1, and every
/// DLQ-only header removed, so that neither broker nor consumer dedupe swallows it. Returns
/// the envelope as published.
pub async fn redrive(bus: &Bus, dlq: &Envelope) -> ampybus::Result<Envelope> {
    let env = ampybus::runtime::redrive_envelope(dlq)?;
    bus.publish_wire(vec![env.clone()]).await?;
    Ok(env)
}

/// Starts (or finds) a test broker through `scripts/brokers.sh start <which>` once per test
/// process (idempotent: it reuses a server already listening on 127.0.0.1); panics with the
/// script's output when it fails.
///
/// ```no_run
/// ampybus_conformance::start_test_broker("nats");
/// ```
pub fn start_test_broker(which: &'static str) {
    static STARTED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut started = STARTED.lock().unwrap_or_else(|p| p.into_inner());
    if started.contains(&which) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/brokers.sh"))
        .args(["start", which])
        .output()
        .expect("run scripts/brokers.sh");
    assert!(
        out.status.success(),
        "scripts/brokers.sh start {which} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    started.push(which);
}

/// Every topic row the bus's [`ampybus::transport::Inspect`] reports (pattern `>`); panics
/// when the bus cannot inspect or the read fails (test helper).
///
/// ```no_run
/// # async fn f(bus: ampybus::Bus) {
/// let rows = ampybus_conformance::all_topic_stats(&bus).await;
/// assert!(rows.iter().all(|r| r.messages == 0));
/// # }
/// ```
pub async fn all_topic_stats(bus: &Bus) -> Vec<ampybus::transport::TopicStats> {
    bus.transport()
        .inspect()
        .expect("the bus can inspect")
        .topic_stats(&TopicPattern::parse(">").expect("pattern"))
        .await
        .expect("topic stats")
}

/// A `redis-server` child process on a free loopback port in a directory of its own (ACL
/// files, restarts), for tests that need a server of their own; killed (and reaped) on drop.
///
/// ```no_run
/// let dir = tempfile::tempdir().unwrap();
/// let server = ampybus_conformance::RedisServer::start(dir.path(), &[]);
/// let url = server.url("", "");
/// # let _ = url;
/// ```
pub struct RedisServer {
    child: Option<std::process::Child>,
    port: u16,
    dir: std::path::PathBuf,
    args: Vec<String>,
    log: std::path::PathBuf,
}

fn free_redis_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts `redis-server --bind 127.0.0.1 --port <free port> --dir <dir> <args…>` and waits
    /// until it accepts connections.
    pub fn start(dir: &Path, args: &[&str]) -> RedisServer {
        let mut s = RedisServer {
            child: None,
            port: free_redis_port(),
            dir: dir.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            log: dir.join("redis-server.log"),
        };
        s.spawn();
        s
    }

    /// Starts the server (again) on the same port with the same arguments.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--dir", self.dir.to_str().unwrap(), "--save", ""])
            .args(&self.args)
            .stdout(std::process::Stdio::from(log.try_clone().unwrap()))
            .stderr(std::process::Stdio::from(log))
            .spawn()
            .expect("spawn redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server did not listen on {}: {}",
                self.port,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash: the append-only file stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `redis://{userinfo}127.0.0.1:{port}{query}`.
    pub fn url(&self, userinfo: &str, query: &str) -> String {
        format!("redis://{userinfo}127.0.0.1:{}{query}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A broker process of a case's own that the case can crash and bring back on the same port:
/// [`NatsServer`](crate::NatsServer), [`RedisServer`].
///
/// ```no_run
/// use ampybus_conformance::{OwnServer, RedisServer};
/// let dir = tempfile::tempdir().unwrap();
/// let mut server = RedisServer::start(dir.path(), &[]);
/// OwnServer::kill(&mut server);
/// server.start_again();
/// assert_eq!(<RedisServer as OwnServer>::PROGRAM, "redis-server");
/// ```
pub trait OwnServer: Send + 'static {
    /// The program, as messages name it (`nats-server`).
    const PROGRAM: &'static str;
    /// SIGKILL, as a crash: what the server stored on disk stays.
    fn kill(&mut self);
    /// Starts it again (after [`OwnServer::kill`]) on the same port with the same arguments.
    fn start_again(&mut self);
}

impl OwnServer for crate::NatsServer {
    const PROGRAM: &'static str = "nats-server";
    fn kill(&mut self) {
        crate::NatsServer::kill(self)
    }
    fn start_again(&mut self) {
        self.restart()
    }
}

impl OwnServer for RedisServer {
    const PROGRAM: &'static str = "redis-server";
    fn kill(&mut self) {
        RedisServer::kill(self)
    }
    fn start_again(&mut self) {
        self.spawn()
    }
}

/// The brokers of their own that a factory's cases run ([`TestContext::wants_own_broker`]),
/// by case id: started for a case, its URL, and the restart of
/// [`TransportFactory::restart_broker`].
///
/// ```no_run
/// # async fn f(ctx: &ampybus_conformance::TestContext) {
/// use ampybus_conformance::{OwnBrokers, RedisServer};
/// let own = OwnBrokers::<RedisServer>::default();
/// let dir = ctx.dir().to_owned();
/// own.start(ctx, move || RedisServer::start(&dir, &[])).await;
/// own.restart(ctx).await;
/// assert!(own.url(ctx, |s| s.url("", "")).is_some());
/// # }
/// ```
pub struct OwnBrokers<S> {
    by_case: std::sync::Mutex<std::collections::HashMap<String, S>>,
}

impl<S> Default for OwnBrokers<S> {
    fn default() -> Self {
        OwnBrokers {
            by_case: Default::default(),
        }
    }
}

impl<S: OwnServer> OwnBrokers<S> {
    /// Starts the case's broker with `start` (blocking, on a blocking thread) and keeps it.
    pub async fn start(&self, ctx: &TestContext, start: impl FnOnce() -> S + Send + 'static) {
        let server = tokio::task::spawn_blocking(start)
            .await
            .unwrap_or_else(|e| panic!("start {}: {e}", S::PROGRAM));
        self.by_case
            .lock()
            .unwrap()
            .insert(ctx.id().to_owned(), server);
    }

    /// `url(server)` of the case's broker, if the case runs one.
    pub fn url(&self, ctx: &TestContext, url: impl FnOnce(&S) -> String) -> Option<String> {
        self.by_case.lock().unwrap().get(ctx.id()).map(url)
    }

    /// Restarts the case's broker: killed -9, down for half a second, started again on the
    /// same port with what it stored.
    pub async fn restart(&self, ctx: &TestContext) {
        let mut server = self
            .by_case
            .lock()
            .unwrap()
            .remove(ctx.id())
            .expect("a broker of the case's own");
        let server = tokio::task::spawn_blocking(move || {
            server.kill();
            // The outage itself, not a synchronisation.
            std::thread::sleep(Duration::from_millis(500));
            server.start_again();
            server
        })
        .await
        .unwrap_or_else(|e| panic!("restart {}: {e}", S::PROGRAM));
        self.by_case
            .lock()
            .unwrap()
            .insert(ctx.id().to_owned(), server);
    }
}

/// `GET path` on `addr` over HTTP/1.1 (chunked bodies joined): (status, body). A test
/// helper: it panics when the server does not answer with HTTP.
///
/// ```no_run
/// # async fn f(addr: std::net::SocketAddr) {
/// let (status, body) = ampybus_conformance::http_get(addr, "/health").await;
/// assert_eq!(status, 200, "{body}");
/// # }
/// ```
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (len, rest) = s.split_once("\r\n").expect("chunk size");
        let n = usize::from_str_radix(len.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}
