//! Consuming: one Kafka consumer (librdkafka `StreamConsumer`) per subscription, in the group
//! named after the durable name.
//!
//! * **Topics.** A pattern naming one stream subscribes to its Kafka topic by name (created
//!   if missing); a pattern spanning streams (`ampy.dev.>`) subscribes by regular expression,
//!   and topics created later join within about a second (metadata refresh).
//! * **Start.** A new group starts at the earliest retained offset (`StartAt::Latest`: the
//!   end; `StartAt::Time`: the first record at or after the time, by `offsets_for_times`).
//!   At subscribe, before joining, the group commits that start on every partition of the
//!   matching topics it has no offset for (so a durable group exists, and has a lag, from the
//!   moment it was first subscribed, and `Latest` means "after the subscribe", not "after the
//!   join"); topics created later start at their beginning. An existing group resumes at its
//!   committed offsets.
//! * **Commits.** Never automatic. Every delivered offset is tracked per partition; the
//!   committed offset of a partition is the first one the runtime has not acknowledged yet
//!   (records skipped because their logical topic does not match count as acknowledged). An
//!   ack commits synchronously; acks out of order wait for the gap to close. A crash
//!   therefore redelivers from the first unacknowledged record of each partition (the
//!   runtime's dedupe store skips what was applied).
//! * **Redelivery in process.** Kafka has no per-record redelivery, so the subscription keeps
//!   what it handed out until it is acknowledged: a `nack(delay)` hands the record out again
//!   once the delay passed, and a record neither acknowledged nor extended (`in_progress`)
//!   within the ack deadline is handed out again (its delivery count raised).
//! * **Rebalance.** Before partitions are revoked, what is acknowledged is committed. A
//!   partition assigned back keeps its tracking (records fetched again that are still handed
//!   out are not handed out twice); one that went to another member is forgotten, and late
//!   acks for it are ignored (the new owner gets its unacknowledged records again).
//! * **Joining.** The consumer joins its group at the first `fetch`, not at `subscribe`: a
//!   subscription created and dropped unread never takes partitions from the group.
//! * **Ephemeral** readers (`durable: None`) join a group of their own
//!   (`{namespace}ampy-reader-{uuid}`) and never commit.
//! * **Close.** [`crate::transport::Transport::close`] drops every consumer of the transport
//!   (each leaves its group); their subscriptions then fail with `Closed`.

use super::{Shared, TOPIC_HEADER, kafka_error, pack_offset, unpack_offset};
use crate::envelope::{Envelope, TopicName};
use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::topic::TopicPattern;
use crate::transport::{Delivery, DeliveryInfo, Settler, StartAt, SubscribeSpec, Subscription};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

type Key = (String, i32);

/// One record handed out and not yet committed.
struct Entry {
    acked: bool,
    /// `None` once acknowledged, or for a record that was skipped.
    envelope: Option<Envelope>,
    stored_at: DateTime<Utc>,
    delivery_count: u32,
    /// Handed out again after this instant unless acknowledged or extended.
    lease_until: Instant,
    /// A nack asked for it again at this instant.
    nacked_due: Option<Instant>,
}

#[derive(Default)]
struct Part {
    out: BTreeMap<i64, Entry>,
    /// Every offset below is settled.
    commit_to: Option<i64>,
    /// The offset last committed.
    committed: Option<i64>,
}

#[derive(Default)]
pub(crate) struct Tracker {
    parts: HashMap<Key, Part>,
}

impl Tracker {
    fn ack(&mut self, topic: &str, seqs: &[u64]) {
        for s in seqs {
            let (p, o) = unpack_offset(*s);
            if let Some(part) = self.parts.get_mut(&(topic.to_owned(), p))
                && let Some(e) = part.out.get_mut(&o)
            {
                e.acked = true;
                e.envelope = None;
            }
        }
        for ((t, _), part) in self.parts.iter_mut() {
            if t != topic {
                continue;
            }
            while let Some(entry) = part.out.first_entry() {
                if !entry.get().acked {
                    break;
                }
                let off = *entry.key();
                entry.remove();
                part.commit_to = Some(off + 1);
            }
        }
    }

    /// Offsets to commit (advanced beyond what was committed), for the given partitions or all.
    fn to_commit(&self, only: Option<&HashSet<Key>>) -> Vec<(Key, i64)> {
        self.parts
            .iter()
            .filter(|(k, _)| only.is_none_or(|o| o.contains(*k)))
            .filter_map(|(k, p)| match (p.commit_to, p.committed) {
                (Some(c), Some(d)) if c <= d => None,
                (Some(c), _) => Some((k.clone(), c)),
                _ => None,
            })
            .collect()
    }

    fn committed(&mut self, done: &[(Key, i64)]) {
        for (k, off) in done {
            if let Some(p) = self.parts.get_mut(k) {
                p.committed = Some(p.committed.map_or(*off, |c| c.max(*off)));
            }
        }
    }

    fn unsettled(&self) -> u64 {
        self.parts
            .values()
            .map(|p| p.out.values().filter(|e| !e.acked).count() as u64)
            .sum()
    }
}

fn tpl_of(items: &[(Key, i64)]) -> Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), off) in items {
        tpl.add_partition_offset(t, *p, Offset::Offset(*off))
            .map_err(|e| Error::transport(format!("kafka: offset {off} of {t}/{p}"), e))?;
    }
    Ok(tpl)
}

/// The consumer context: commits before a revoke, forgets partitions gone elsewhere.
pub(crate) struct Ctx {
    tracker: Arc<Mutex<Tracker>>,
    durable: bool,
    where_: String,
}

impl ClientContext for Ctx {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
        super::Quiet.log(level, fac, msg)
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        super::Quiet.error(error, reason)
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance
            && self.durable
        {
            let revoked: HashSet<Key> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            let items = self
                .tracker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .to_commit(Some(&revoked));
            if items.is_empty() {
                return;
            }
            match tpl_of(&items).map(|t| base.commit(&t, CommitMode::Sync)) {
                Ok(Ok(())) => self
                    .tracker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .committed(&items),
                Ok(Err(e)) => {
                    tracing::warn!(where_ = %self.where_, error = %e, "kafka: commit before revoke failed")
                }
                Err(e) => {
                    tracing::warn!(where_ = %self.where_, error = %e, "kafka: commit before revoke")
                }
            }
        }
    }

    fn post_rebalance(&self, _base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let assigned: HashSet<Key> = tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            let mut t = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
            t.parts.retain(|k, _| assigned.contains(k));
            tracing::debug!(where_ = %self.where_, partitions = assigned.len(), "kafka: partitions assigned");
        }
    }
}

type KConsumer = StreamConsumer<Ctx>;

/// What a subscription's settlers and the transport share.
pub(crate) struct SubShared {
    consumer: RwLock<Option<Arc<KConsumer>>>,
    tracker: Arc<Mutex<Tracker>>,
    commit_lock: tokio::sync::Mutex<()>,
    pub(crate) group: String,
    durable: bool,
    ack_deadline: Duration,
    where_: String,
}

impl SubShared {
    fn consumer(&self) -> Result<Arc<KConsumer>> {
        self.consumer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Closed,
                    format!("{}: the transport was closed", self.where_),
                )
            })
    }

    /// Records handed out and not acknowledged (for lag reports).
    pub(crate) fn unsettled(&self) -> u64 {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unsettled()
    }

    async fn commit(&self) -> Result<()> {
        if !self.durable {
            return Ok(());
        }
        let _one = self.commit_lock.lock().await;
        let items = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .to_commit(None);
        if items.is_empty() {
            return Ok(());
        }
        let tpl = tpl_of(&items)?;
        let consumer = self.consumer()?;
        let where_ = self.where_.clone();
        let res = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| Error::transport("kafka: commit task failed", e))?;
        if let Err(e) = res {
            use rdkafka::types::RDKafkaErrorCode as C;
            if matches!(
                e.rdkafka_error_code(),
                Some(C::RebalanceInProgress | C::IllegalGeneration | C::UnknownMemberId)
            ) {
                // A rebalance took (some of) the partitions: their records go to the new
                // owner again; what stays ours is committed by the next ack.
                tracing::debug!(where_ = %where_, error = %e, "kafka: commit during a rebalance skipped");
                return Ok(());
            }
            return Err(kafka_error(&where_, "commit", e));
        }
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .committed(&items);
        Ok(())
    }
}

/// Settles the records of one Kafka topic of a subscription.
struct TopicSettler {
    sub: Arc<SubShared>,
    topic: String,
}

impl TopicSettler {
    /// Changes the tracked record of `sequence`, when it is still tracked.
    fn with_entry(&self, sequence: u64, f: impl FnOnce(&mut Entry)) {
        let (p, o) = unpack_offset(sequence);
        let mut t = self.sub.tracker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = t
            .parts
            .get_mut(&(self.topic.clone(), p))
            .and_then(|part| part.out.get_mut(&o))
        {
            f(e);
        }
    }
}

#[async_trait]
impl Settler for TopicSettler {
    async fn ack(&self, sequences: &[u64]) -> Result<()> {
        self.sub
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ack(&self.topic, sequences);
        self.sub.commit().await
    }

    async fn nack(&self, sequence: u64, delay: Duration) -> Result<()> {
        self.with_entry(sequence, |e| e.nacked_due = Some(Instant::now() + delay));
        Ok(())
    }

    async fn in_progress(&self, sequence: u64) -> Result<()> {
        let deadline = self.sub.ack_deadline;
        self.with_entry(sequence, |e| e.lease_until = Instant::now() + deadline);
        Ok(())
    }
}

struct KafkaSubscription {
    sub: Arc<SubShared>,
    pattern: TopicPattern,
    namespace: String,
    /// One shared name per topic for the records read.
    names: crate::envelope::TopicNames,
    settlers: HashMap<String, Arc<TopicSettler>>,
    last_lease_scan: Instant,
    /// What to subscribe to, until the first fetch joins the group: a subscription that is
    /// never read never takes partitions from the group's other members (a member whose
    /// join is cut short can hold its partitions until the session timeout).
    join: Option<String>,
    /// Subscribed by regular expression (a pattern spanning streams).
    by_pattern: bool,
}

/// How often handed-out records are checked for an expired lease.
fn lease_scan_every(deadline: Duration) -> Duration {
    (deadline / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

impl KafkaSubscription {
    fn settler(&mut self, topic: &str) -> Arc<dyn Settler> {
        self.settlers
            .entry(topic.to_owned())
            .or_insert_with(|| {
                Arc::new(TopicSettler {
                    sub: self.sub.clone(),
                    topic: topic.to_owned(),
                })
            })
            .clone()
    }

    /// Records to hand out again: nacked ones past their delay, leases expired.
    fn take_due(&mut self, max: usize, out: &mut Vec<Delivery>) {
        let now = Instant::now();
        let scan_leases =
            now.duration_since(self.last_lease_scan) >= lease_scan_every(self.sub.ack_deadline);
        if scan_leases {
            self.last_lease_scan = now;
        }
        let mut again: Vec<(String, u64, Envelope, DeliveryInfo)> = Vec::new();
        {
            let mut t = self.sub.tracker.lock().unwrap_or_else(|p| p.into_inner());
            'parts: for ((topic, p), part) in t.parts.iter_mut() {
                for (off, e) in part.out.iter_mut() {
                    if out.len() + again.len() >= max {
                        break 'parts;
                    }
                    if e.acked {
                        continue;
                    }
                    let Some(env) = &e.envelope else { continue };
                    let due = match e.nacked_due {
                        Some(d) => d <= now,
                        None => scan_leases && e.lease_until <= now,
                    };
                    if !due {
                        continue;
                    }
                    e.nacked_due = None;
                    e.delivery_count += 1;
                    e.lease_until = now + self.sub.ack_deadline;
                    let seq = pack_offset(*p, *off);
                    again.push((
                        topic.clone(),
                        seq,
                        env.clone(),
                        DeliveryInfo {
                            sequence: seq,
                            delivery_count: e.delivery_count,
                            stored_at: e.stored_at,
                        },
                    ));
                }
            }
        }
        for (topic, _, env, info) in again {
            let s = self.settler(&topic);
            out.push(Delivery::new(env, info, s));
        }
    }

    /// Tracks a fetched record and hands it out when it is new and matches.
    fn take_record(&mut self, m: &BorrowedMessage<'_>, out: &mut Vec<Delivery>) {
        let topic = m.topic().to_owned();
        let (p, off) = (m.partition(), m.offset());
        let envelope = to_envelope(m, &self.namespace, &mut self.names);
        let stored_at = m
            .timestamp()
            .to_millis()
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or_else(Utc::now);
        let matches = self.pattern.matches(&envelope.topic);
        {
            let mut t = self.sub.tracker.lock().unwrap_or_else(|p| p.into_inner());
            let part = t.parts.entry((topic.clone(), p)).or_default();
            if part.out.contains_key(&off) || part.commit_to.is_some_and(|c| off < c) {
                // Fetched again after a rebalance gave the partition back: already handed out
                // (or settled).
                return;
            }
            part.out.insert(
                off,
                Entry {
                    acked: !matches,
                    envelope: matches.then(|| envelope.clone()),
                    stored_at,
                    delivery_count: 1,
                    lease_until: Instant::now() + self.sub.ack_deadline,
                    nacked_due: None,
                },
            );
            if !matches {
                t.ack(&topic, &[pack_offset(p, off)]);
                return;
            }
        }
        let seq = pack_offset(p, off);
        let s = self.settler(&topic);
        out.push(Delivery::new(
            envelope,
            DeliveryInfo {
                sequence: seq,
                delivery_count: 1,
                stored_at,
            },
            s,
        ));
    }
}

/// The envelope of a record: the `topic` header (else the Kafka topic without the namespace;
/// one shared name per topic from `names`), the other headers, the payload.
pub(crate) fn to_envelope(
    m: &BorrowedMessage<'_>,
    namespace: &str,
    names: &mut crate::envelope::TopicNames,
) -> Envelope {
    let mut topic = None;
    let headers = match m.headers() {
        Some(hs) => {
            for h in hs.iter() {
                if h.key == TOPIC_HEADER {
                    let v = h.value.unwrap_or_default();
                    topic = Some(
                        names
                            .get_utf8(v)
                            .unwrap_or_else(|_| TopicName::from(&*String::from_utf8_lossy(v))),
                    );
                }
            }
            Headers::from_wire_pairs(
                hs.iter()
                    .filter(|h| h.key != TOPIC_HEADER)
                    .map(|h| (h.key.as_bytes(), h.value.unwrap_or_default())),
            )
        }
        None => Headers::new(),
    };
    let topic =
        topic.unwrap_or_else(|| names.get(m.topic().strip_prefix(namespace).unwrap_or(m.topic())));
    Envelope {
        topic,
        headers,
        payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let max = max.max(1);
        let consumer = self.sub.consumer()?;
        if let Some(expr) = &self.join {
            consumer
                .subscribe(&[expr])
                .map_err(|e| kafka_error(&self.sub.where_, &format!("subscribe to {expr}"), e))?;
            self.join = None;
        }
        let mut out = Vec::new();
        self.take_due(max, &mut out);
        let deadline = Instant::now() + wait;
        while out.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Wake at least every 100 ms to hand out records that became due.
            match tokio::time::timeout(left.min(Duration::from_millis(100)), consumer.recv()).await
            {
                Err(_) => self.take_due(max, &mut out),
                Ok(Ok(m)) => self.take_record(&m, &mut out),
                Ok(Err(e)) if self.by_pattern && not_there_yet(&e) => {
                    // A pattern no topic matches yet: topics created later join within the
                    // metadata refresh interval.
                    tracing::debug!(where_ = %self.sub.where_, error = %e, "kafka: no topic matches yet");
                }
                Ok(Err(e)) => return Err(kafka_error(&self.sub.where_, "fetch", e)),
            }
        }
        while out.len() < max {
            match consumer.recv().now_or_never() {
                Some(Ok(m)) => self.take_record(&m, &mut out),
                Some(Err(e)) if self.by_pattern && not_there_yet(&e) => break,
                Some(Err(e)) => {
                    if out.is_empty() {
                        return Err(kafka_error(&self.sub.where_, "fetch", e));
                    }
                    break;
                }
                None => break,
            }
        }
        Ok(out)
    }
}

/// The error a pattern subscription reports while no topic matches it.
fn not_there_yet(e: &rdkafka::error::KafkaError) -> bool {
    e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if "\\^$.|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What to subscribe to: `Ok(topic)` for one Kafka topic by name, `Err(regex)` otherwise.
fn subscription_target(
    shared: &Shared,
    pattern: &TopicPattern,
) -> std::result::Result<String, String> {
    let toks: Vec<&str> = pattern.as_str().split('.').collect();
    let ns = &shared.opts.namespace;
    if toks.len() >= 5 && toks[..4].iter().all(|t| *t != "*" && *t != ">") {
        let stream = toks[..4].join(".");
        if !shared.opts.full_topics.contains(&stream) {
            return Ok(format!("{ns}{stream}"));
        }
    }
    let mut re = format!("^{}", regex_escape(ns));
    let mut open_end = false;
    for (i, t) in toks.iter().take(4).enumerate() {
        if i > 0 {
            re.push_str("\\.");
        }
        match *t {
            ">" => {
                re.push_str(".+");
                open_end = true;
                break;
            }
            "*" => re.push_str("[^.]+"),
            t => re.push_str(&regex_escape(t)),
        }
    }
    if !open_end && !shared.opts.full_topics.is_empty() {
        re.push_str(".*");
    }
    re.push('$');
    Err(re)
}

pub(crate) async fn subscribe(
    shared: &Arc<Shared>,
    spec: SubscribeSpec,
) -> Result<Box<dyn Subscription>> {
    let opts = &shared.opts;
    let durable = spec.durable.is_some();
    let group = match &spec.durable {
        Some(d) => {
            if d.trim().is_empty() {
                return Err(Error::config("kafka: empty durable consumer name"));
            }
            opts.group_id(d)
        }
        None => format!(
            "{}ampy-reader-{}",
            opts.namespace,
            uuid::Uuid::new_v4().simple()
        ),
    };
    let where_ = format!("{} group {group}", shared.where_());
    let target = subscription_target(shared, &spec.pattern);
    if let Ok(t) = &target {
        shared.ensure_topics(std::slice::from_ref(t)).await?;
    }
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let mut cfg = opts.client_config();
    cfg.set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // Partitions without a committed offset start at their beginning: those of topics that
        // existed at subscribe got their start committed below; a topic created later holds
        // only what was published after the subscribe.
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            opts.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (opts.session_timeout.as_millis() / 4).max(100).to_string(),
        )
        .set("max.poll.interval.ms", "600000")
        .set("topic.metadata.refresh.interval.ms", "1000");
    let ctx = Ctx {
        tracker: tracker.clone(),
        durable,
        where_: where_.clone(),
    };
    let consumer: KConsumer = cfg
        .create_with_context(ctx)
        .map_err(|e| kafka_error(&where_, "invalid consumer settings", e))?;
    let consumer = Arc::new(consumer);
    if durable || spec.start != StartAt::Earliest {
        commit_start(shared, &consumer, &spec.pattern, spec.start, &where_).await?;
    }
    let by_pattern = target.is_err();
    let expr = match target {
        Ok(t) | Err(t) => t,
    };
    let sub = Arc::new(SubShared {
        consumer: RwLock::new(Some(consumer)),
        tracker,
        commit_lock: tokio::sync::Mutex::new(()),
        group,
        durable,
        ack_deadline: spec.ack_deadline.max(Duration::from_millis(100)),
        where_,
    });
    {
        let mut subs = shared.subs.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|w| w.strong_count() > 0);
        subs.push(Arc::downgrade(&sub));
    }
    Ok(Box::new(KafkaSubscription {
        sub,
        pattern: spec.pattern,
        namespace: opts.namespace.clone(),
        names: Default::default(),
        settlers: HashMap::new(),
        last_lease_scan: Instant::now(),
        join: Some(expr),
        by_pattern,
    }))
}

/// Commits, for partitions of the matching topics the group has no offset for, where the
/// group starts: the low watermark (`Earliest`), the high watermark (`Latest`) or the offset
/// of the first record at or after the time (`Time`, the high watermark when there is none).
/// A durable consumer created now thereby exists, with everything published later as its
/// backlog, even before it joined (a Kafka group without offsets vanishes when it empties).
async fn commit_start(
    shared: &Arc<Shared>,
    consumer: &Arc<KConsumer>,
    pattern: &TopicPattern,
    start: StartAt,
    where_: &str,
) -> Result<()> {
    let topics = shared.topics_for(pattern).await?;
    if topics.is_empty() {
        return Ok(());
    }
    let consumer = consumer.clone();
    let timeout = shared.opts.request_timeout;
    let where_ = where_.to_owned();
    let shared_for_reads = shared.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut all = TopicPartitionList::new();
        for (topic, n) in &topics {
            for p in 0..*n as i32 {
                all.add_partition(topic, p);
            }
        }
        let committed = consumer
            .committed_offsets(all, timeout)
            .map_err(|e| kafka_error(&where_, "committed offsets", e))?;
        let fresh: Vec<(String, i32)> = committed
            .elements()
            .iter()
            .filter(|e| !matches!(e.offset(), Offset::Offset(_)))
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let watermark = |topic: &str, p: i32, high: bool| -> Result<i64> {
            let (lo, hi) = consumer
                .fetch_watermarks(topic, p, timeout)
                .map_err(|err| kafka_error(&where_, "watermarks", err))?;
            Ok(if high { hi } else { lo })
        };
        let mut items: Vec<(Key, i64)> = Vec::with_capacity(fresh.len());
        match start {
            StartAt::Earliest | StartAt::Latest => {
                for (t, p) in fresh {
                    let off = watermark(&t, p, start == StartAt::Latest)?;
                    items.push(((t, p), off));
                }
            }
            StartAt::Time(t) => {
                let ms = t.timestamp_millis();
                let mut times = TopicPartitionList::new();
                for (topic, p) in &fresh {
                    times
                        .add_partition_offset(topic, *p, Offset::Offset(ms))
                        .map_err(|e| kafka_error(&where_, "offsets", e))?;
                }
                let found = consumer
                    .offsets_for_times(times, timeout)
                    .map_err(|e| kafka_error(&where_, "offsets for times", e))?;
                for e in found.elements() {
                    let off = match e.offset() {
                        Offset::Offset(o) => first_at_or_after(
                            &shared_for_reads,
                            e.topic(),
                            e.partition(),
                            o,
                            ms,
                            &where_,
                        )?,
                        // Nothing at or after the time: start at the end.
                        _ => watermark(e.topic(), e.partition(), true)?,
                    };
                    items.push(((e.topic().to_owned(), e.partition()), off));
                }
            }
        }
        consumer
            .commit(&tpl_of(&items)?, CommitMode::Sync)
            .map_err(|e| kafka_error(&where_, "commit start offsets", e))
    })
    .await
    .map_err(|e| Error::transport("kafka: start offsets task failed", e))?
}

/// The offset of the first record of `topic/partition` at or after `ms`, from `from` (what a
/// timestamp lookup answered): reads forward from it to the first record whose timestamp is
/// at or after `ms`, or to the end. On Kafka the record at `from` already is that record (one
/// fetch); a broker whose lookup answers too early (tansu 0.6.0 answers offset 0 for times
/// inside the log) costs a longer read but still gets the right start.
fn first_at_or_after(
    shared: &Shared,
    topic: &str,
    partition: i32,
    from: i64,
    ms: i64,
    where_: &str,
) -> Result<i64> {
    let reader = shared.reader()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))
        .map_err(|e| kafka_error(where_, "offsets", e))?;
    reader
        .assign(&tpl)
        .map_err(|e| kafka_error(where_, "assign", e))?;
    let overall = shared.opts.request_timeout * 3;
    let mut last_progress = Instant::now();
    loop {
        match reader.poll(Duration::from_millis(100)) {
            None if last_progress.elapsed() > overall => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{where_}: start offset of {topic}/{partition}: no answer within {overall:?}"
                    ),
                ));
            }
            None => {}
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {
                return Ok(reader
                    .position()
                    .ok()
                    .and_then(|p| {
                        p.find_partition(topic, partition)
                            .and_then(|e| e.offset().to_raw())
                    })
                    .filter(|o| *o >= 0)
                    .unwrap_or(from));
            }
            Some(Err(e)) => return Err(kafka_error(where_, "start offset read", e)),
            Some(Ok(m)) => {
                last_progress = Instant::now();
                if m.offset() >= from && m.timestamp().to_millis().is_some_and(|t| t >= ms) {
                    return Ok(m.offset());
                }
            }
        }
    }
}

/// Drops every consumer of the transport (each leaves its group).
pub(crate) fn close_all(shared: &Shared) {
    let subs: Vec<Arc<SubShared>> = shared
        .subs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
        .filter_map(|w| w.upgrade())
        .collect();
    for s in subs {
        let c = s.consumer.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = c {
            c.unsubscribe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_out_of_order_commit_the_settled_prefix() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let part = t.parts.entry(("t".into(), 0)).or_default();
        for off in 10..14 {
            part.out.insert(
                off,
                Entry {
                    acked: false,
                    envelope: None,
                    stored_at: Utc::now(),
                    delivery_count: 1,
                    lease_until: now,
                    nacked_due: None,
                },
            );
        }
        t.ack("t", &[pack_offset(0, 11), pack_offset(0, 12)]);
        assert!(t.to_commit(None).is_empty(), "10 is not settled yet");
        assert_eq!(t.unsettled(), 2);
        t.ack("t", &[pack_offset(0, 10)]);
        assert_eq!(t.to_commit(None), vec![(("t".into(), 0), 13)]);
        t.committed(&[(("t".into(), 0), 13)]);
        assert!(t.to_commit(None).is_empty());
        // An ack of a partition or offset not tracked (revoked) is ignored.
        t.ack("t", &[pack_offset(5, 1), pack_offset(0, 99)]);
        assert_eq!(t.unsettled(), 1);
    }
}
