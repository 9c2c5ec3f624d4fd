//! Consuming: a consumer group per stream a pattern spans, merged into one [`Subscription`].
//!
//! * **Groups.** `SubscribeSpec::durable` names the group on every stream. A group is created
//!   at `0` (a new consumer reads from the earliest retained entry), at `$` for
//!   `StartAt::Latest`, at the last id before the time for `StartAt::Time`; an existing group
//!   resumes where it was. A durable subscription on a pattern naming one stream creates the
//!   stream (`MKSTREAM`); a pattern spanning several (`ampy.dev.>`) finds them with
//!   `SCAN … TYPE stream`, listed again by the multi-stream layer (`transport::multi`) every
//!   second, so streams created later are read too (their groups are created at `0`:
//!   everything in them is newer than the subscription).
//! * **Consumers.** Every subscription is a consumer of its own in the group,
//!   `{durable}:{12 hex}`, so instances share the work and a crashed one is recognised by its
//!   pending entries going idle.
//! * **Fetch.** First `XAUTOCLAIM` takes over entries pending (in any consumer of the group)
//!   for longer than the ack deadline, at most every quarter of the deadline (their delivery
//!   count read with `XPENDING`); then the multi-stream layer's merged fetch: `XREADGROUP … >`
//!   without blocking on every stream, starting each fetch at the next; when nothing came, one
//!   `XREADGROUP BLOCK` over every stream (one entry each) on the subscription's own
//!   connection, then a non-blocking read for the rest of the streams that woke. After a read
//!   that failed (the server may have added entries to this consumer's pending list and died,
//!   or the reply was cut), the stream's next read is `XREADGROUP … <last id handed out>`:
//!   this consumer's own pending entries after it, which would otherwise come back only
//!   after the ack deadline, behind newer ones. Entries whose topic
//!   does not match the pattern are acknowledged at once and not handed out.
//! * **Settling.** `ack` = `XACK`. `in_progress` = `XCLAIM … JUSTID` by the same consumer
//!   (resets the idle time without counting a delivery). Redis has no delayed redelivery:
//!   `nack(delay)` leaves the entry pending and sets its idle time to `ack_deadline − delay`
//!   (`XCLAIM … IDLE … JUSTID`), so `XAUTOCLAIM` of any instance takes it again once `delay`
//!   has passed (a delay longer than the ack deadline is cut to it). The runtime itself parks
//!   retried keys with backoff in process, so only shutdown releases (zero delay) use it.
//! * **Gone consumers** (nothing pending, idle for an hour) are removed from the group by any
//!   live instance, at most once a minute.
//! * **One active instance per durable name** (default, [`crate::transport::InstanceOrder`]):
//!   a durable subscription reads only while it holds the consumer's lease (`super::lease`,
//!   rules in `transport::lease`), blocking reads cut to the lease's validity. After taking it
//!   over from an instance that stopped without releasing, it reads once nothing of the group
//!   is pending or an ack deadline has passed, and then claims every entry idle past the
//!   deadline (`XAUTOCLAIM` to the end of the pending list) before it reads anything new, so
//!   the previous holder's entries come first, in id order.
//! * **Ephemeral** readers (`durable: None`) use `XREAD` from a position kept in memory and
//!   settle nothing.

use super::{Shared, command_error, wire};
use crate::error::{Error, ErrorKind, Result};
use crate::transport::InstanceOrder;
use crate::transport::lease::{Admit, Exclusive, LeaseRef};
use crate::transport::multi::{self, LiveState, LiveStreams};
use crate::transport::{Delivery, DeliveryInfo, Settler, StartAt, SubscribeSpec, Subscription};
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a subscription removes consumers of its group that are gone (nothing pending,
/// idle for longer than [`GONE_AFTER`]).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A consumer of the group idle this long with nothing pending is removed (a live one is
/// created again by its next read).
const GONE_AFTER: Duration = Duration::from_secs(3600);

struct PartSettler {
    shared: Arc<Shared>,
    key: String,
    group: String,
    consumer: String,
    ack_deadline: Duration,
    durable: bool,
    /// The consumer's lease, when one instance is active at a time.
    lease: Option<LeaseRef>,
}

impl PartSettler {
    async fn claim(&self, sequence: u64, idle_ms: Option<u64>) -> Result<()> {
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.key)
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(0)
            .arg(wire::unpack_id(sequence));
        if let Some(ms) = idle_ms {
            cmd.arg("IDLE").arg(ms);
        }
        cmd.arg("JUSTID");
        let _: redis::Value = self
            .shared
            .query(&format!("stream {}: XCLAIM", self.key), &cmd)
            .await?;
        Ok(())
    }
}

impl PartSettler {
    /// `XACK` (not counted as settled deliveries: also used for skipped entries).
    async fn xack(&self, sequences: &[u64]) -> Result<()> {
        if !self.durable || sequences.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&self.key).arg(&self.group);
        for s in sequences {
            cmd.arg(wire::unpack_id(*s));
        }
        let _: i64 = self
            .shared
            .query(
                &format!("stream {}: XACK of {} entries", self.key, sequences.len()),
                &cmd,
            )
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Settler for PartSettler {
    async fn ack(&self, sequences: &[u64]) -> Result<()> {
        self.xack(sequences).await?;
        if let Some(l) = &self.lease {
            l.settled(sequences.len());
        }
        Ok(())
    }

    async fn nack(&self, sequence: u64, delay: Duration) -> Result<()> {
        if !self.durable {
            return Ok(());
        }
        let idle = self.ack_deadline.saturating_sub(delay).as_millis() as u64;
        self.claim(sequence, Some(idle)).await?;
        if let Some(l) = &self.lease {
            l.settled(1);
        }
        Ok(())
    }

    async fn in_progress(&self, sequence: u64) -> Result<()> {
        if !self.durable {
            return Ok(());
        }
        if self.lease.as_ref().is_some_and(|l| !l.may_extend()) {
            // The lease is gone: a successor counts on this entry's idle time.
            tracing::debug!(
                seq = sequence,
                "redis: not extending a delivery (lease not held)"
            );
            return Ok(());
        }
        self.claim(sequence, None).await
    }
}

struct Part {
    key: String,
    settler: Arc<PartSettler>,
    /// The last id read (ephemeral readers read after it; a durable one reads its own
    /// pending entries after it when `recheck` is set).
    last_id: String,
    /// A read of this stream failed, so the server may have delivered entries to this
    /// consumer whose reply was lost (a server killed after writing them to the consumer's
    /// pending list, a reply cut by a disconnect or a timeout): the next read asks for this
    /// consumer's own pending entries after `last_id` instead of new ones, so they come
    /// first, in order, instead of after the ack deadline behind newer ones.
    recheck: bool,
    last_reclaim: Option<Instant>,
    reclaim_cursor: String,
    last_sweep: Instant,
}

pub(crate) struct RedisSubscription {
    shared: Arc<Shared>,
    spec: SubscribeSpec,
    /// The subscription's own connection, for blocking reads.
    blocking: ConnectionManager,
    consumer: String,
    parts: Vec<Part>,
    /// The pattern names one stream (no discovery needed).
    single: Option<String>,
    /// The merged fetch over the parts (`transport::multi`).
    live: LiveState,
    where_: String,
    /// One shared name per topic for the entries read (taken once per batch).
    names: std::sync::Mutex<crate::envelope::TopicNames>,
    /// One active instance per durable name (dropped last: it releases the lease).
    exclusive: Option<Exclusive>,
}

pub(crate) async fn subscribe(
    shared: &Arc<Shared>,
    spec: SubscribeSpec,
) -> Result<Box<dyn Subscription>> {
    if let Some(d) = &spec.durable
        && d.is_empty()
    {
        return Err(Error::config("subscribe: empty durable consumer name"));
    }
    let blocking = shared.opts.connect_manager(None).await?;
    let single = single_stream(&spec);
    let consumer = match &spec.durable {
        Some(d) => format!("{d}:{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        None => String::new(),
    };
    let exclusive = match &spec.durable {
        Some(d) if shared.opts.order == InstanceOrder::AcrossInstances => Some(Exclusive::new(
            Arc::new(super::lease::RedisLease::new(shared, d)),
            spec.ack_deadline.max(Duration::from_millis(100)),
            d.clone(),
        )),
        _ => None,
    };
    let mut sub = RedisSubscription {
        exclusive,
        shared: shared.clone(),
        blocking,
        consumer,
        parts: Vec::new(),
        single: single.map(|s| shared.opts.stream_key(&s)),
        live: LiveState::default(),
        where_: shared.where_(),
        spec,
        names: Default::default(),
    };
    let keys = match &sub.single {
        Some(k) if sub.spec.durable.is_some() => vec![k.clone()],
        Some(k) => sub
            .shared
            .existing_streams(&sub.spec.pattern)
            .await?
            .into_iter()
            .filter(|x| x == k)
            .collect(),
        None => sub.shared.existing_streams(&sub.spec.pattern).await?,
    };
    for k in keys {
        sub.add_part(k, true).await?;
    }
    Ok(Box::new(sub))
}

/// The one stream a pattern names when its first four tokens are literal.
fn single_stream(spec: &SubscribeSpec) -> Option<String> {
    let toks: Vec<&str> = spec.pattern.as_str().split('.').collect();
    if toks.len() < 4 || toks[..4].iter().any(|t| *t == "*" || *t == ">") {
        return None;
    }
    Some(toks[..4].join("."))
}

/// The id just before the first entry stored at or after `t`.
fn id_before(t: chrono::DateTime<chrono::Utc>) -> String {
    let ms = wire::ceil_ms(t);
    if ms <= 0 {
        "0-0".to_owned()
    } else {
        format!("{}-{}", ms - 1, u64::MAX)
    }
}

impl RedisSubscription {
    async fn add_part(&mut self, key: String, at_subscribe: bool) -> Result<()> {
        let durable = self.spec.durable.clone();
        let start_id = if !at_subscribe {
            "0-0".to_owned()
        } else {
            match self.spec.start {
                StartAt::Earliest => "0-0".to_owned(),
                StartAt::Latest if durable.is_some() => "$".to_owned(),
                StartAt::Latest => {
                    let v: redis::Value = self
                        .shared
                        .query(
                            "XREVRANGE",
                            redis::cmd("XREVRANGE")
                                .arg(&key)
                                .arg("+")
                                .arg("-")
                                .arg("COUNT")
                                .arg(1),
                        )
                        .await?;
                    wire::parse_entries(&v)
                        .into_iter()
                        .next()
                        .map(|e| e.id)
                        .unwrap_or_else(|| "0-0".to_owned())
                }
                StartAt::Time(t) => id_before(t),
            }
        };
        if let Some(group) = &durable {
            let r: Result<redis::Value> = self
                .shared
                .query(
                    &format!("stream {key}: creating consumer group {group}"),
                    redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(&key)
                        .arg(group)
                        .arg(&start_id)
                        .arg("MKSTREAM"),
                )
                .await;
            match r {
                Ok(_) => {
                    tracing::debug!(stream = %key, group = %group, start = %start_id, "redis: consumer group created")
                }
                Err(e) if e.message().contains("BUSYGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        self.parts.push(Part {
            settler: Arc::new(PartSettler {
                shared: self.shared.clone(),
                key: key.clone(),
                group: durable.clone().unwrap_or_default(),
                consumer: self.consumer.clone(),
                ack_deadline: self.spec.ack_deadline.max(Duration::from_millis(100)),
                durable: durable.is_some(),
                lease: self.exclusive.as_ref().map(Exclusive::handle),
            }),
            key,
            last_id: start_id,
            recheck: false,
            last_reclaim: None,
            reclaim_cursor: "0-0".to_owned(),
            last_sweep: Instant::now(),
        });
        Ok(())
    }

    /// Converts entries of part `i`: matching ones become deliveries, the others (other
    /// topics, malformed, deleted) are collected to be acknowledged.
    fn convert(
        &self,
        i: usize,
        entries: Vec<wire::Entry>,
        counts: Option<&std::collections::HashMap<String, u32>>,
        out: &mut Vec<Delivery>,
        skip: &mut Vec<String>,
    ) {
        let p = &self.parts[i];
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        for e in entries {
            let Some(fields) = &e.fields else {
                skip.push(e.id);
                continue;
            };
            let Some(env) = wire::to_envelope(fields, &mut names) else {
                tracing::warn!(stream = %p.key, id = %e.id, "redis: an entry without a `topic` field was skipped (not written by ampybus)");
                skip.push(e.id);
                continue;
            };
            if !self.spec.pattern.matches(&env.topic) {
                skip.push(e.id);
                continue;
            }
            let Some(sequence) = wire::pack_id(&e.id) else {
                skip.push(e.id);
                continue;
            };
            let delivery_count = counts.and_then(|c| c.get(&e.id).copied()).unwrap_or(1);
            if let Some(l) = &p.settler.lease {
                l.handed(1);
            }
            let info = DeliveryInfo {
                sequence,
                delivery_count: delivery_count.max(1),
                stored_at: wire::id_time(&e.id),
            };
            out.push(Delivery::new(env, info, p.settler.clone()));
        }
    }

    async fn ack_skipped(&self, i: usize, skip: Vec<String>) -> Result<()> {
        if skip.is_empty() || self.spec.durable.is_none() {
            return Ok(());
        }
        let seqs: Vec<u64> = skip.iter().filter_map(|id| wire::pack_id(id)).collect();
        if seqs.len() < skip.len() {
            // Ids that do not pack: acknowledge them by id.
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&self.parts[i].key)
                .arg(&self.parts[i].settler.group);
            for id in &skip {
                cmd.arg(id);
            }
            let _: i64 = self.shared.query("XACK", &cmd).await?;
            return Ok(());
        }
        self.parts[i].settler.xack(&seqs).await
    }

    /// Removes consumers of the group that are gone: nothing pending (so nothing can be lost),
    /// idle for longer than [`GONE_AFTER`] (and ten ack deadlines). Best effort.
    async fn sweep(&mut self, i: usize) {
        if self.parts[i].last_sweep.elapsed() < SWEEP_EVERY {
            return;
        }
        self.parts[i].last_sweep = Instant::now();
        let (key, group) = (
            self.parts[i].key.clone(),
            self.parts[i].settler.group.clone(),
        );
        let gone = GONE_AFTER.max(self.spec.ack_deadline * 10).as_millis() as i64;
        let v: Result<redis::Value> = self
            .shared
            .query(
                "XINFO CONSUMERS",
                redis::cmd("XINFO").arg("CONSUMERS").arg(&key).arg(&group),
            )
            .await;
        let Ok(redis::Value::Array(rows)) = v else {
            return;
        };
        for r in rows {
            let redis::Value::Array(kv) = r else { continue };
            let get = |name: &str| {
                kv.chunks(2)
                    .find(|c| c.first().and_then(wire::string_of).as_deref() == Some(name))
                    .and_then(|c| c.get(1).cloned())
            };
            let (Some(n), Some(redis::Value::Int(pending)), Some(redis::Value::Int(idle))) = (
                get("name").as_ref().and_then(wire::string_of),
                get("pending"),
                get("idle"),
            ) else {
                continue;
            };
            if n != self.consumer && pending == 0 && idle > gone {
                let r: Result<i64> = self
                    .shared
                    .query(
                        "XGROUP DELCONSUMER",
                        redis::cmd("XGROUP")
                            .arg("DELCONSUMER")
                            .arg(&key)
                            .arg(&group)
                            .arg(&n),
                    )
                    .await;
                match r {
                    Ok(_) => {
                        tracing::debug!(stream = %key, group = %group, consumer = %n, "redis: removed a consumer that is gone")
                    }
                    Err(e) => tracing::debug!(error = %e, "redis: removing a gone consumer failed"),
                }
            }
        }
    }

    /// Takes over entries idle for longer than the ack deadline (part `i`).
    async fn reclaim(&mut self, i: usize, max: usize) -> Result<Vec<Delivery>> {
        self.sweep(i).await;
        let deadline = self.parts[i].settler.ack_deadline;
        let every = (deadline / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        if self.parts[i]
            .last_reclaim
            .is_some_and(|t| t.elapsed() < every)
        {
            return Ok(Vec::new());
        }
        self.parts[i].last_reclaim = Some(Instant::now());
        let (key, group) = (
            self.parts[i].key.clone(),
            self.parts[i].settler.group.clone(),
        );
        let v: redis::Value = self
            .shared
            .query(
                &format!("stream {key}: XAUTOCLAIM"),
                redis::cmd("XAUTOCLAIM")
                    .arg(&key)
                    .arg(&group)
                    .arg(&self.consumer)
                    .arg(deadline.as_millis() as u64)
                    .arg(&self.parts[i].reclaim_cursor)
                    .arg("COUNT")
                    .arg(max),
            )
            .await?;
        let redis::Value::Array(items) = &v else {
            return Ok(Vec::new());
        };
        let next = items
            .first()
            .and_then(wire::string_of)
            .unwrap_or_else(|| "0-0".to_owned());
        let entries = items.get(1).map(wire::parse_entries).unwrap_or_default();
        self.parts[i].reclaim_cursor = next.clone();
        if next != "0-0" {
            // More to scan: go on at the next fetch.
            self.parts[i].last_reclaim = None;
        }
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // Delivery counts (XAUTOCLAIM counted this one) from XPENDING over the claimed range.
        let first = entries.first().map(|e| e.id.clone()).unwrap_or_default();
        let last = entries.last().map(|e| e.id.clone()).unwrap_or_default();
        let pend: redis::Value = self
            .shared
            .query(
                &format!("stream {key}: XPENDING"),
                redis::cmd("XPENDING")
                    .arg(&key)
                    .arg(&group)
                    .arg(&first)
                    .arg(&last)
                    .arg(entries.len().max(1) * 4)
                    .arg(&self.consumer),
            )
            .await?;
        let mut counts = std::collections::HashMap::new();
        if let redis::Value::Array(rows) = &pend {
            for r in rows {
                if let redis::Value::Array(f) = r
                    && let (Some(id), Some(redis::Value::Int(n))) =
                        (f.first().and_then(wire::string_of), f.get(3))
                {
                    counts.insert(id, u32::try_from(*n).unwrap_or(u32::MAX));
                }
            }
        }
        tracing::info!(stream = %key, group = %group, claimed = entries.len(), "redis: took over entries pending longer than the ack deadline");
        let mut out = Vec::new();
        let mut skip = Vec::new();
        self.convert(i, entries, Some(&counts), &mut out, &mut skip);
        self.ack_skipped(i, skip).await?;
        Ok(out)
    }

    /// One read over the given parts: `XREADGROUP` (durable) or `XREAD`, `count` per stream,
    /// blocking up to `block` on the subscription's own connection when given.
    /// Reads up to `count` entries of each of `parts` (blocking up to `block` when nothing is
    /// there); the parts that had entries are added to `woke`.
    async fn read_streams(
        &mut self,
        parts: &[usize],
        count: usize,
        block: Option<Duration>,
        woke: &mut Vec<usize>,
    ) -> Result<Vec<Delivery>> {
        let mut cmd;
        if let Some(group) = &self.spec.durable {
            cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg(group).arg(&self.consumer);
        } else {
            cmd = redis::cmd("XREAD");
        }
        cmd.arg("COUNT").arg(count.max(1));
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS");
        for &i in parts {
            cmd.arg(&self.parts[i].key);
        }
        let mut rechecked = Vec::new();
        for &i in parts {
            let p = &self.parts[i];
            if self.spec.durable.is_none() {
                cmd.arg(&p.last_id);
            } else if p.recheck {
                // This consumer's own pending entries after the last one it was handed (all
                // of them when it has been handed none).
                rechecked.push(i);
                cmd.arg(if p.last_id == "$" {
                    "0-0"
                } else {
                    p.last_id.as_str()
                });
            } else {
                cmd.arg(">");
            }
        }
        let what = format!(
            "reading {} stream(s) ({})",
            parts.len(),
            self.parts[parts[0]].key
        );
        let v: redis::Value = match block {
            None => self.shared.query(&what, &cmd).await?,
            Some(b) => {
                let limit = b + self.shared.opts.request_timeout;
                let mut c = self.blocking.clone();
                match tokio::time::timeout(limit, cmd.query_async::<redis::Value>(&mut c)).await {
                    Ok(Ok(v)) => v,
                    Ok(Err(e)) => return Err(command_error(&self.where_, &what, e)),
                    Err(_) => {
                        return Err(Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "{}: {what}: blocking read not answered within {limit:?}",
                                self.where_
                            ),
                        ));
                    }
                }
            }
        };
        if let redis::Value::ServerError(se) = &v {
            return Err(command_error(
                &self.where_,
                &what,
                redis::RedisError::from(se.clone()),
            ));
        }
        let mut out = Vec::new();
        for (key, entries) in wire::parse_read_reply(&v) {
            let Some(i) = self.parts.iter().position(|p| p.key == key) else {
                continue;
            };
            if let Some(last) = entries.last() {
                self.parts[i].last_id = last.id.clone();
                woke.push(i);
            }
            let mut skip = Vec::new();
            self.convert(i, entries, None, &mut out, &mut skip);
            if let Err(e) = self.ack_skipped(i, skip).await {
                // What was converted is handed out all the same; the skipped entries stay
                // pending and are skipped again when they are reclaimed.
                tracing::warn!(stream = %self.parts[i].key, error = %e, "redis: acknowledging skipped entries failed");
            }
        }
        for i in rechecked {
            let p = &mut self.parts[i];
            p.recheck = false;
            tracing::debug!(stream = %p.key, "redis: read back this consumer's pending entries after a failed read");
        }
        Ok(out)
    }

    /// Entries of the group pending in any consumer, over every stream (`XPENDING` summary).
    async fn backlog(&self) -> Result<u64> {
        let Some(group) = &self.spec.durable else {
            return Ok(0);
        };
        let mut n = 0u64;
        for p in &self.parts {
            let v: redis::Value = self
                .shared
                .query(
                    &format!("stream {}: XPENDING", p.key),
                    redis::cmd("XPENDING").arg(&p.key).arg(group),
                )
                .await?;
            if let redis::Value::Array(f) = &v
                && let Some(redis::Value::Int(c)) = f.first()
            {
                n += (*c).max(0) as u64;
            }
        }
        Ok(n)
    }

    async fn ensure_groups(&mut self, err: &Error) -> Result<()> {
        // NOGROUP: the stream (and its group) was deleted, or the server restarted without
        // persistence. Create them again, at 0.
        if !err.message().contains("NOGROUP") {
            return Ok(());
        }
        let Some(group) = self.spec.durable.clone() else {
            return Ok(());
        };
        for p in &self.parts {
            let r: Result<redis::Value> = self
                .shared
                .query(
                    "recreating a consumer group",
                    redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(&p.key)
                        .arg(&group)
                        .arg("0")
                        .arg("MKSTREAM"),
                )
                .await;
            if let Err(e) = r
                && !e.message().contains("BUSYGROUP")
            {
                return Err(e);
            }
        }
        tracing::warn!(group = %group, "redis: consumer group was missing (stream deleted or server restarted without persistence); created again at 0");
        Ok(())
    }
}

#[async_trait]
impl LiveStreams for RedisSubscription {
    type Found = String;

    fn live(&mut self) -> &mut LiveState {
        &mut self.live
    }

    fn len(&self) -> usize {
        self.parts.len()
    }

    /// A durable subscription to one stream created it when it subscribed.
    fn discovers(&self) -> bool {
        !(self.single.is_some() && self.spec.durable.is_some())
    }

    fn name(found: &String) -> &str {
        found
    }

    fn is_open(&self, name: &str) -> bool {
        self.parts.iter().any(|p| p.key == name)
    }

    async fn spanned(&mut self) -> Result<Vec<String>> {
        let mut found = self.shared.existing_streams(&self.spec.pattern).await?;
        if let Some(one) = &self.single {
            found.retain(|k| k == one);
        }
        Ok(found)
    }

    async fn open(&mut self, key: String) -> Result<()> {
        self.add_part(key, false).await
    }

    fn may_read(&self) -> bool {
        self.exclusive.as_ref().is_none_or(Exclusive::may_fetch)
    }

    async fn read(&mut self, i: usize, max: usize) -> Result<Vec<Delivery>> {
        self.read_streams(&[i], max, None, &mut Vec::new()).await
    }

    /// One blocking read of every stream, for one entry; a durable one blocks at most a
    /// quarter of the ack deadline (a reclaim may come due meanwhile).
    async fn wait_any(
        &mut self,
        streams: &[usize],
        wait: Duration,
    ) -> Result<(Vec<Delivery>, Vec<usize>)> {
        let cap = if self.spec.durable.is_some() {
            (self.spec.ack_deadline / 4).max(Duration::from_millis(50))
        } else {
            wait
        };
        let mut woke = Vec::new();
        let got = self
            .read_streams(streams, 1, Some(wait.min(cap)), &mut woke)
            .await?;
        Ok((got, woke))
    }

    /// The failed read may have been carried out with its reply lost: the stream(s) read
    /// back this consumer's pending entries first (`recheck`). A stream (and its group)
    /// deleted, or a server restarted without persistence: the groups are created again.
    async fn recover(&mut self, i: Option<usize>, e: &Error) -> Result<()> {
        if self.spec.durable.is_some() {
            match i {
                Some(i) => self.parts[i].recheck = true,
                None => self.parts.iter_mut().for_each(|p| p.recheck = true),
            }
        }
        self.ensure_groups(e).await
    }
}

#[async_trait]
impl Subscription for RedisSubscription {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        multi::join_streams(self, wait).await?;
        if self.parts.is_empty() {
            return Ok(Vec::new());
        }
        let mut wait = wait;
        if let Some(ex) = &self.exclusive {
            let left = wait.saturating_sub(started.elapsed());
            let admit = ex.admit(left, || self.backlog()).await?;
            match admit {
                Admit::Idle => return Ok(Vec::new()),
                Admit::Go { budget, took_over } => {
                    wait = wait.min(started.elapsed() + budget);
                    if took_over {
                        // Claim everything idle past the deadline before reading new entries.
                        for p in &mut self.parts {
                            p.last_reclaim = None;
                            p.reclaim_cursor = "0-0".to_owned();
                        }
                    }
                }
            }
        }
        let mut out = Vec::new();
        if self.spec.durable.is_some() {
            for i in 0..self.parts.len() {
                if out.len() >= max || !self.may_read() {
                    break;
                }
                let got = self.reclaim(i, max - out.len()).await?;
                out.extend(got);
            }
        }
        if self.exclusive.is_some() && self.parts.iter().any(|p| p.reclaim_cursor != "0-0") {
            // Entries left to claim come before anything new (order across instances).
            return Ok(out);
        }
        let left = wait.saturating_sub(started.elapsed());
        multi::fetch_merged(self, out, max, left).await
    }
}

/// The consumer groups of a stream (`XINFO GROUPS`), with the lag counted by hand when the
/// server cannot say (`lag` nil after deletions).
pub(crate) async fn groups_of(shared: &Shared, key: &str) -> Result<Vec<super::GroupStats>> {
    let v: redis::Value = shared
        .query(
            &format!("stream {key}: XINFO GROUPS"),
            redis::cmd("XINFO").arg("GROUPS").arg(key),
        )
        .await?;
    let redis::Value::Array(groups) = v else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for g in groups {
        let pairs: Vec<(String, redis::Value)> = match g {
            redis::Value::Array(kv) => kv
                .chunks(2)
                .filter_map(|c| Some((wire::string_of(c.first()?)?, c.get(1)?.clone())))
                .collect(),
            redis::Value::Map(m) => m
                .into_iter()
                .filter_map(|(k, v)| Some((wire::string_of(&k)?, v)))
                .collect(),
            _ => continue,
        };
        let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        let int = |name: &str| match get(name) {
            Some(redis::Value::Int(n)) => Some((*n).max(0) as u64),
            Some(other) => wire::string_of(other).and_then(|s| s.parse().ok()),
            None => None,
        };
        let name = get("name").and_then(wire::string_of).unwrap_or_default();
        let last = get("last-delivered-id")
            .and_then(wire::string_of)
            .unwrap_or_else(|| "0-0".to_owned());
        let lag = match int("lag") {
            Some(l) => l,
            None => count_after(shared, key, &last).await?,
        };
        out.push(super::GroupStats {
            name,
            consumers: int("consumers").unwrap_or(0),
            pending: int("pending").unwrap_or(0),
            lag,
            last_delivered_id: last,
        });
    }
    Ok(out)
}

/// Entries after `id` (exclusive), counted in pages.
async fn count_after(shared: &Shared, key: &str, id: &str) -> Result<u64> {
    let mut from = format!("({id}");
    let mut n = 0u64;
    loop {
        let v: redis::Value = shared
            .query(
                "XRANGE (lag count)",
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg(&from)
                    .arg("+")
                    .arg("COUNT")
                    .arg(10_000),
            )
            .await?;
        let e = wire::parse_entries(&v);
        n += e.len() as u64;
        match e.last() {
            Some(l) if e.len() == 10_000 => from = format!("({}", l.id),
            _ => return Ok(n),
        }
    }
}
