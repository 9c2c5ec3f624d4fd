//! The outbox relay: one per outbox table at a time, publishing committed rows in order.

use super::{CRASH_BEFORE_MARK, CRASH_BEFORE_PUBLISH, DEFAULT_SENT_RETENTION, crash_point, pause};
use crate::bus::Bus;
use crate::envelope::Envelope;
use crate::error::{ErrorKind, Result};
use crate::headers::Headers;
use crate::runtime::{DlqCode, build_dlq_envelope};
use crate::topic::Topic;
use crate::transport::PublishOutcome;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One unsent outbox row, as the relay reads it.
pub(crate) struct OutboxRow {
    pub(crate) id: i64,
    pub(crate) topic: String,
    pub(crate) headers: Vec<u8>,
    pub(crate) payload: Vec<u8>,
}

/// An outbox table as the relay sees it (one implementation per database).
#[async_trait]
pub(crate) trait RelayStore: Send + Sync + 'static {
    /// The `table` label of the metrics, e.g. `ampybus.outbox@orders`.
    fn table(&self) -> &str;
    /// Becomes (or stays) the table's active relay; `false`: another relay holds it.
    async fn try_lock(&self) -> Result<bool>;
    /// Committed unsent rows, oldest first (per key in `seq` order), at most `limit`.
    async fn unsent(&self, limit: usize) -> Result<Vec<OutboxRow>>;
    async fn mark_sent(&self, ids: &[i64]) -> Result<()>;
    async fn mark_dead_lettered(&self, id: i64, reason: &str) -> Result<()>;
    async fn purge_sent(&self, older_than: Duration) -> Result<u64>;
    /// Unsent rows and the age in seconds of the oldest (0 when none).
    async fn depth(&self) -> Result<(i64, f64)>;
}

/// How a relay runs.
///
/// ```
/// let o = ampybus::inbox::RelayOptions::default();
/// assert_eq!(o.batch, 500);
/// assert_eq!(o.purge_after, ampybus::inbox::DEFAULT_SENT_RETENTION);
/// ```
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Rows published per round (default 500).
    pub batch: usize,
    /// Pause when there is nothing to publish (default 20 ms).
    pub idle: Duration,
    /// How often a standby relay asks for the lock (default 1 s).
    pub standby_poll: Duration,
    /// Sent rows older than this are deleted (default [`DEFAULT_SENT_RETENTION`], 1 day).
    pub purge_after: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch: 500,
            idle: Duration::from_millis(20),
            standby_poll: Duration::from_secs(1),
            purge_after: DEFAULT_SENT_RETENTION,
        }
    }
}

/// What a relay did.
///
/// ```
/// let s = ampybus::inbox::RelayStats::default();
/// assert_eq!(s.published + s.dead_lettered, 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Rows published and marked sent.
    pub published: u64,
    /// Rows the bus refused for good, moved to the DLQ.
    pub dead_lettered: u64,
    /// Rounds that failed and were tried again.
    pub retried_rounds: u64,
}

/// Publishes an outbox table's committed rows ([`super::pg::PgInbox::relay`],
/// [`super::sqlite::SqliteInbox::relay`] make one; the CLI runs one as
/// `ampybus outbox relay --db … --url BUS`).
///
/// Rows are read oldest first: a key's rows were staged under the key's lock, so their ids and
/// `seq` follow their commit order, and the relay publishes them in that order. Each round
/// publishes up to [`RelayOptions::batch`] rows; confirmed rows are marked sent, unconfirmed
/// ones are tried again with the same `message_id` (a copy that did land is a duplicate the
/// consumer's inbox or dedupe skips). A row the bus refuses for good (an error other than
/// `transport`, `timeout` or `closed`) goes to `ampy.{env}.dlq.v1.{domain}` with
/// `dlq_reason` `other: outbox relay: …` and is marked sent with that reason.
///
/// ```no_run
/// # #[cfg(feature = "inbox-sqlite")]
/// # async fn f(bus: ampybus::Bus) -> ampybus::Result<()> {
/// use ampybus::inbox::{RelayOptions, sqlite::SqliteInbox};
/// let inbox = SqliteInbox::open("/var/lib/oms.sqlite3")?;
/// let relay = inbox.relay(bus, RelayOptions::default());
/// let stats = relay.run_until(async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// println!("published {}", stats.published);
/// # Ok(()) }
/// ```
pub struct OutboxRelay {
    store: Arc<dyn RelayStore>,
    bus: Bus,
    opts: RelayOptions,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("table", &self.store.table())
            .field("opts", &self.opts)
            .finish()
    }
}

/// How often the depth gauges are refreshed and sent rows purged.
const GAUGE_EVERY: Duration = Duration::from_secs(1);
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How long a round in progress when the relay is told to stop may still take to finish.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl OutboxRelay {
    pub(crate) fn new(store: Arc<dyn RelayStore>, bus: Bus, opts: RelayOptions) -> OutboxRelay {
        OutboxRelay { store, bus, opts }
    }

    /// The table this relay publishes (the `table` label of its metrics).
    pub fn table(&self) -> &str {
        self.store.table()
    }

    /// Publishes what is committed now, once (as the active relay: waits for the lock), and
    /// returns what it did; for tests, benchmarks and one-shot jobs.
    pub async fn drain(&self) -> Result<RelayStats> {
        while !self.store.try_lock().await? {
            tokio::time::sleep(self.opts.standby_poll).await;
        }
        let mut stats = RelayStats::default();
        loop {
            let n = self.round(&mut stats).await?;
            if n == 0 {
                return Ok(stats);
            }
        }
    }

    /// Runs until `stop` completes: waits for the table's lock, then publishes rows as they
    /// commit. Database and bus failures are logged and retried; the stats are returned at
    /// the end.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send,
    ) -> Result<RelayStats> {
        let mut stop = std::pin::pin!(stop);
        let mut stats = RelayStats::default();
        let mut st = LoopState {
            gauges: self.bus.metrics().outbox(self.store.table()),
            last_gauge: None,
            last_purge: None,
            active: false,
        };
        let mut tries = 0u32;
        loop {
            let r = {
                let work = self.step(&mut st, &mut stats);
                let mut work = std::pin::pin!(work);
                tokio::select! {
                    biased;
                    r = &mut work => r,
                    _ = &mut stop => {
                        // Asked to stop in the middle of a turn: the round finishes — publish,
                        // mark sent, count — so that what was published is not published
                        // again at the next start, unless it takes longer than STOP_GRACE.
                        match tokio::time::timeout(STOP_GRACE, &mut work).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => tracing::warn!(table = self.store.table(), error = %e, "outbox relay: the last round failed while stopping"),
                            Err(_) => tracing::warn!(table = self.store.table(), "outbox relay: stopped in the middle of a round (its rows are published again at the next start)"),
                        }
                        break;
                    }
                }
            };
            match r {
                Ok(wait) => {
                    tries = 0;
                    if !wait.is_zero() {
                        tokio::select! {
                            _ = &mut stop => break,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
                Err(e) => {
                    tries += 1;
                    stats.retried_rounds += 1;
                    tracing::warn!(table = self.store.table(), error = %e, tries, "outbox relay: round failed; trying again");
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tokio::time::sleep(pause(tries)) => {}
                    }
                }
            }
        }
        Ok(stats)
    }

    /// One turn of [`OutboxRelay::run_until`]: the lock, the gauges and the purge when due,
    /// one round. Returns how long to pause before the next turn (standing by, or idle).
    async fn step(&self, st: &mut LoopState, stats: &mut RelayStats) -> Result<Duration> {
        if !self.store.try_lock().await? {
            if st.active {
                tracing::warn!(
                    table = self.store.table(),
                    "outbox relay: lost the lock; standing by"
                );
            }
            st.active = false;
            return Ok(self.opts.standby_poll);
        }
        if !st.active {
            tracing::info!(table = self.store.table(), "outbox relay: active");
            st.active = true;
        }
        if st.last_gauge.is_none_or(|t| t.elapsed() >= GAUGE_EVERY) {
            let (depth, age) = self.store.depth().await?;
            st.gauges.0.set(depth);
            st.gauges.1.set(age);
            st.last_gauge = Some(Instant::now());
        }
        if st.last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY) {
            let n = self.store.purge_sent(self.opts.purge_after).await?;
            if n > 0 {
                tracing::info!(
                    table = self.store.table(),
                    rows = n,
                    "outbox relay: purged sent rows"
                );
            }
            st.last_purge = Some(Instant::now());
        }
        if self.round(stats).await? == 0 {
            return Ok(self.opts.idle);
        }
        Ok(Duration::ZERO)
    }

    /// One round: reads up to a batch, publishes it, marks what was confirmed. Returns the
    /// rows read; an error when some were not confirmed for a passing reason.
    async fn round(&self, stats: &mut RelayStats) -> Result<usize> {
        let rows = self.store.unsent(self.opts.batch).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let n = rows.len();
        crash_point(CRASH_BEFORE_PUBLISH);
        let mut envs = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        for r in rows {
            match Headers::decode_compact(&Bytes::from(r.headers)) {
                Ok(h) => {
                    envs.push(Envelope {
                        topic: r.topic.into(),
                        headers: h,
                        payload: Bytes::from(r.payload),
                    });
                    ids.push(r.id);
                }
                Err(e) => {
                    // Cannot happen with rows staged by this library; never dropped silently.
                    let reason = format!("outbox row {} has unreadable headers: {e}", r.id);
                    tracing::error!(table = self.store.table(), id = r.id, error = %e, "outbox relay: unreadable row kept unsent");
                    return Err(crate::Error::new(ErrorKind::Envelope, reason));
                }
            }
        }
        let out = self.bus.publish_batch_outcomes(envs.clone()).await;
        crash_point(CRASH_BEFORE_MARK);
        let confirmed: Vec<i64> = ids
            .iter()
            .zip(&out.outcomes)
            .filter(|(_, o)| matches!(o, PublishOutcome::Confirmed(_)))
            .map(|(id, _)| *id)
            .collect();
        if !confirmed.is_empty() {
            self.store.mark_sent(&confirmed).await?;
            stats.published += confirmed.len() as u64;
        }
        let Some(err) = out.error else {
            return Ok(n);
        };
        if confirmed.len() == n {
            return Ok(n);
        }
        if transient(err.kind()) {
            return Err(err);
        }
        // Refused for good somewhere in the batch: one by one, so only the refused row goes
        // to the DLQ and every other keeps its place.
        for (id, env) in ids
            .into_iter()
            .zip(envs)
            .zip(out.outcomes)
            .filter_map(|((id, env), o)| {
                (!matches!(o, PublishOutcome::Confirmed(_))).then_some((id, env))
            })
        {
            let one = self.bus.publish_batch_outcomes(vec![env.clone()]).await;
            match (one.outcomes.first(), one.error) {
                (Some(PublishOutcome::Confirmed(_)), _) => {
                    self.store.mark_sent(&[id]).await?;
                    stats.published += 1;
                }
                (_, Some(e)) if !transient(e.kind()) => {
                    self.dead_letter(id, &env, &e.to_string()).await?;
                    stats.dead_lettered += 1;
                }
                (_, e) => {
                    return Err(e.unwrap_or_else(|| {
                        crate::Error::new(ErrorKind::Transport, "publish not confirmed")
                    }));
                }
            }
        }
        Ok(n)
    }

    async fn dead_letter(&self, id: i64, env: &Envelope, why: &str) -> Result<()> {
        let reason = DlqCode::Other.reason(&format!("outbox relay: refused by the bus: {why}"));
        let dlq_topic = match Topic::parse(&env.topic) {
            Ok(t) => t.dlq_topic(),
            Err(_) => Topic::parse("ampy.prod.dlq.v1.control")?,
        };
        let consumer = format!("ampybus-outbox-relay:{}", self.store.table());
        let dlq = build_dlq_envelope(env, &dlq_topic, &reason, 0, &consumer);
        self.bus.publish_wire(vec![dlq]).await?;
        self.store.mark_dead_lettered(id, &reason).await?;
        tracing::warn!(table = self.store.table(), id, message_id = env.headers.message_id().unwrap_or_default(),
            dlq = %dlq_topic, reason = %reason, "outbox relay: row dead-lettered");
        Ok(())
    }
}

/// What [`OutboxRelay::run_until`] keeps between turns.
struct LoopState {
    gauges: (
        prometheus_client::metrics::gauge::Gauge,
        prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    ),
    last_gauge: Option<Instant>,
    last_purge: Option<Instant>,
    active: bool,
}

/// Errors worth trying again (the bus or the database may come back).
fn transient(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Transport | ErrorKind::Timeout | ErrorKind::Closed
    )
}
