//! Subscriptions: ephemeral readers, and durable instances of a consumer group.

use super::Inner;
use super::format::Rec;
use super::group::{self, FastMap, Journal, Meta, PARTITIONS, frames, partition_of, slot};
use super::log::{DomainReader, envelope_of, headers_of, now_us, us_to_time};
use super::replay::{domains_of, seq_at_time};
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::topic::TopicPattern;
use crate::transport::{Delivery, DeliveryInfo, Settler, StartAt, SubscribeSpec, Subscription};
use crate::yield_lock::lock_yielding;
use async_trait::async_trait;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A pattern with the answer for the last topic it was asked about: records of a segment
/// share their topic's `Arc`, so most questions are a pointer comparison.
pub(crate) struct Matcher {
    pattern: TopicPattern,
    last: Option<(Arc<str>, bool)>,
}

impl Matcher {
    pub(crate) fn new(pattern: TopicPattern) -> Matcher {
        Matcher {
            pattern,
            last: None,
        }
    }

    pub(crate) fn matches(&mut self, topic: &Arc<str>) -> bool {
        if let Some((t, m)) = &self.last
            && (Arc::ptr_eq(t, topic) || **t == **topic)
        {
            return *m;
        }
        let m = self.pattern.matches(topic);
        self.last = Some((topic.clone(), m));
        m
    }
}

/// Records waiting in memory per instance before reading stops.
const MAX_PENDING: usize = 50_000;

/// The sequence after which a new reader starts.
async fn start_position(inner: &Arc<Inner>, start: StartAt) -> Result<u64> {
    match start {
        StartAt::Earliest => Ok(0),
        StartAt::Latest => Ok(inner.shared.committed_through()),
        StartAt::Time(t) => {
            let i = inner.clone();
            tokio::task::spawn_blocking(move || seq_at_time(&i, t.timestamp_micros()))
                .await
                .map_err(|e| inner.task_failed("start position", e))?
        }
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 200
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Error::config(format!(
            "durable consumer name {name:?}: must be 1–200 characters without whitespace"
        )));
    }
    Ok(())
}

pub(crate) async fn subscribe(
    inner: Arc<Inner>,
    spec: SubscribeSpec,
) -> Result<Box<dyn Subscription>> {
    let domains = domains_of(&spec.pattern);
    let Some(name) = spec.durable.clone() else {
        let after = start_position(&inner, spec.start).await?;
        let readers = domains
            .iter()
            .map(|d| DomainReader::new(&inner.dir, *d, after))
            .collect();
        return Ok(Box::new(Ephemeral {
            inner,
            pattern: Matcher::new(spec.pattern),
            readers,
            backlog: VecDeque::new(),
            settler: Arc::new(NoSettle),
        }));
    };
    check_name(&name)?;
    let pattern = spec.pattern.as_str().to_owned();
    let start = match group::Meta::read(&group::group_dir(&inner.dir, &name))? {
        Some(m) if !m.pattern.is_empty() => m.start,
        _ => start_position(&inner, spec.start).await?,
    };
    let define = |pattern: &str| Meta {
        name: name.clone(),
        pattern: pattern.to_owned(),
        start,
        created_us: now_us(),
    };
    let mut journal = inner.group(&name, || Ok(define(&pattern)))?;
    let existing = journal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .meta
        .pattern
        .clone();
    if existing.is_empty() {
        // Known so far only by its dedupe records: it becomes a consumer now.
        let dir = group::group_dir(&inner.dir, &name);
        define(&pattern).write(&dir)?;
        inner.forget_group(&name);
        journal = inner.group(&name, || Ok(define(&pattern)))?;
    } else if existing != pattern {
        return Err(Error::config(format!(
            "durable consumer {name:?} already exists with pattern {existing:?}, not {pattern:?}; use another name"
        )));
    }
    let deadline_us = i64::try_from(spec.ack_deadline.as_micros())
        .unwrap_or(i64::MAX / 4)
        .max(1_000);
    let readers = domains
        .iter()
        .map(|d| DomainReader::new(&inner.dir, *d, start))
        .collect();
    let inst = Arc::new(Mutex::new(Instance {
        inner: inner.clone(),
        owner: rand::random::<u128>() | 1,
        journal,
        pattern: Matcher::new(spec.pattern.clone()),
        domains,
        deadline_us,
        lease_us: deadline_us,
        mine: 0,
        lease_until: 0,
        next_maintain: 0,
        readers,
        pending: FastMap::default(),
        per_slot: vec![VecDeque::new(); group::SLOTS],
        live: vec![0; group::SLOTS],
        fresh: VecDeque::new(),
        waiting: BTreeSet::new(),
        timers: BTreeSet::new(),
        deadlines: VecDeque::new(),
        delayed_keys: HashMap::new(),
        read_through: vec![0; group::SLOTS],
    }));
    {
        let mut i = inst.lock().unwrap_or_else(|p| p.into_inner());
        i.maintain(now_us(), true)?;
    }
    let settler: Arc<dyn Settler> = Arc::new(DurableSettler { inst: inst.clone() });
    Ok(Box::new(Durable {
        inner,
        inst,
        settler,
    }))
}

/// Waits until a commit (in any process), `until`, or `give_up`; false when `give_up` passed.
async fn wait_commit(
    notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    until: Option<i64>,
    give_up: tokio::time::Instant,
) -> bool {
    let now = tokio::time::Instant::now();
    if now >= give_up {
        return false;
    }
    let mut t = give_up;
    if let Some(u) = until {
        let in_us = (u - now_us()).max(0) as u64;
        t = t.min(now + Duration::from_micros(in_us));
    }
    tokio::select! {
        _ = notified => {}
        _ = tokio::time::sleep_until(t) => {}
    }
    true
}

struct NoSettle;

#[async_trait]
impl Settler for NoSettle {
    async fn ack(&self, _: &[u64]) -> Result<()> {
        Ok(())
    }
    async fn nack(&self, _: u64, _: Duration) -> Result<()> {
        Ok(())
    }
    async fn in_progress(&self, _: u64) -> Result<()> {
        Ok(())
    }
}

/// An ephemeral subscription: reads from a start position, records nothing.
struct Ephemeral {
    inner: Arc<Inner>,
    pattern: Matcher,
    readers: Vec<DomainReader>,
    backlog: VecDeque<Rec>,
    settler: Arc<dyn Settler>,
}

impl Ephemeral {
    fn read(&mut self, max: usize) -> Result<()> {
        let snap = self.inner.shared.snapshot();
        let mut got = Vec::new();
        let mut failed = None;
        for r in &mut self.readers {
            let e = snap.domains[r.d];
            let start = got.len();
            // What was read before an error is kept (the reader's position moved past it);
            // the error is returned when nothing was read.
            let read = r.read(&e, &mut got, max);
            let pattern = &mut self.pattern;
            let mut i = start;
            got.retain(|rec: &Rec| {
                i += 1;
                i <= start || pattern.matches(&rec.topic)
            });
            if let Err(e) = read {
                failed.get_or_insert(e);
            }
        }
        got.sort_by_key(|r| r.seq);
        self.backlog.extend(got);
        match failed {
            Some(e) if self.backlog.is_empty() => Err(e),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Subscription for Ephemeral {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let inner = self.inner.clone();
        fetch_loop(&inner, max, wait, |max| {
            std::future::ready(self.take(max).map(|got| (got, None)))
        })
        .await
    }
}

impl Ephemeral {
    /// Up to `max` deliveries from the backlog, reading more when it is empty.
    fn take(&mut self, max: usize) -> Result<Vec<Delivery>> {
        if self.backlog.is_empty() {
            self.read(max)?;
        }
        let mut out = Vec::with_capacity(max.min(self.backlog.len()));
        while out.len() < max {
            let Some(rec) = self.backlog.front() else {
                break;
            };
            let env = match envelope_of(&self.inner, rec) {
                Ok(e) => e,
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => break,
            };
            let rec = self.backlog.pop_front().expect("front exists");
            out.push(Delivery::new(
                env,
                DeliveryInfo {
                    sequence: rec.seq,
                    delivery_count: 1,
                    stored_at: us_to_time(rec.log_us),
                },
                self.settler.clone(),
            ));
        }
        Ok(out)
    }
}

/// The fetch of both subscription kinds: `poll(max)` until it gives something, sleeping in
/// between until a commit (in any process), the time it names, or `wait` has passed.
async fn fetch_loop<P>(
    inner: &Arc<Inner>,
    max: usize,
    wait: Duration,
    mut poll: impl FnMut(usize) -> P,
) -> Result<Vec<Delivery>>
where
    P: std::future::Future<Output = Result<(Vec<Delivery>, Option<i64>)>>,
{
    let max = max.max(1);
    let give_up = tokio::time::Instant::now() + wait;
    loop {
        let notified = inner.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (out, next_due) = poll(max).await?;
        if !out.is_empty() {
            return Ok(out);
        }
        if !wait_commit(notified, next_due, give_up).await {
            return Ok(Vec::new());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Read, not yet handed out by this instance.
    Waiting,
    /// Handed out; redelivered after the deadline (µs).
    InFlight(i64),
    /// Released with a delay; delivered again at the due time (µs). Blocks its key.
    Delayed(i64),
}

/// A record handed out by [`Instance::poll`], to be decoded into a delivery.
struct Handed {
    rec: Rec,
    deliveries: u32,
    /// The ack deadline it was handed out with.
    deadline: i64,
}

struct Pend {
    slot: usize,
    rec: Rec,
    deliveries: u32,
    st: St,
    /// Its sequence is in `fresh` and that entry stands (it was read and has not been
    /// handed out, moved to `waiting` or delayed since).
    in_fresh: bool,
}

/// One instance of a consumer group in this process.
pub(crate) struct Instance {
    inner: Arc<Inner>,
    owner: u128,
    journal: Arc<Mutex<Journal>>,
    pattern: Matcher,
    domains: Vec<usize>,
    deadline_us: i64,
    lease_us: i64,
    /// Partitions held (bit mask).
    mine: u64,
    lease_until: i64,
    next_maintain: i64,
    readers: Vec<DomainReader>,
    /// Records read and not acked, by sequence.
    pending: FastMap<u64, Pend>,
    /// Per slot: the sequences read while this instance held the partition, in sequence
    /// order (records of a slot are read in order, and a slot's queue is emptied when its
    /// partition is lost). Settled ones are dropped lazily, when they reach the front.
    per_slot: Vec<VecDeque<u64>>,
    /// Per slot: how many of `per_slot`'s entries are still pending.
    live: Vec<u32>,
    /// Read and never handed out, in the order read (per domain, sequence order); an entry
    /// stands while its record's `in_fresh` is set.
    fresh: VecDeque<u64>,
    /// Waiting to be handed out again (expired, due after a delay, given back), and fresh
    /// records passed over because their key was blocked: in sequence order. For any key,
    /// every entry here precedes every entry of `fresh`, so handing these out first keeps
    /// per-key order.
    waiting: BTreeSet<u64>,
    /// (when, sequence) of handed-out records (their ack deadline) and delayed ones (their due
    /// time): what becomes deliverable again at a time.
    timers: BTreeSet<(i64, u64)>,
    /// (deadline, sequence) of handed-out records in hand-out order: deadlines only grow, so
    /// this is a queue; entries whose record was acked or re-timed since are skipped when they
    /// come up (and dropped in bulk when they outnumber the records).
    deadlines: VecDeque<(i64, u64)>,
    /// Keys with a delayed record not yet due (count per key): later records of them wait.
    delayed_keys: HashMap<(usize, u32), u32>,
    /// Per slot: the highest sequence examined while this instance held the partition.
    read_through: Vec<u64>,
}

impl Instance {
    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renews the lease and shares the partitions out among the live instances.
    fn maintain(&mut self, now: i64, force: bool) -> Result<()> {
        if !force && now < self.next_maintain {
            return Ok(());
        }
        let owner = self.owner;
        let lease_us = self.lease_us;
        let busy: u64 = self
            .pending
            .values()
            .filter(|p| p.st != St::Waiting)
            .fold(0, |m, p| m | (1u64 << partition_of(p.slot)));
        let cutoff_ms = now / 1000
            - i64::try_from(crate::transport::dedupe_store::DEFAULT_WINDOW.as_millis())
                .unwrap_or(i64::MAX / 2);
        let (mask, positions, delivered) = {
            let mut j = self.journal();
            j.with_lock(true, |j| {
                let st = &j.state;
                let mut others = 0u64;
                let mut live = 1usize;
                for (o, l) in &st.leases {
                    if *o != owner && l.expires_us > now {
                        others |= l.mask;
                        live += 1;
                    }
                }
                let target = (PARTITIONS as usize).div_ceil(live);
                let mut mask = st.leases.get(&owner).map_or(0, |l| l.mask) & !others;
                for p in 0..PARTITIONS {
                    if mask.count_ones() as usize >= target {
                        break;
                    }
                    if (others | mask) & (1 << p) == 0 {
                        mask |= 1 << p;
                    }
                }
                for p in (0..PARTITIONS).rev() {
                    if mask.count_ones() as usize <= target {
                        break;
                    }
                    if mask & (1 << p) != 0 && busy & (1 << p) == 0 {
                        mask &= !(1 << p);
                    }
                }
                j.append(
                    super::format::KIND_LEASE,
                    &frames::lease(owner, mask, now + lease_us),
                )?;
                j.maybe_compact(cutoff_ms)?;
                Ok((mask, j.state.positions.clone(), j.state.delivered.clone()))
            })?
        };
        let _ = delivered;
        let lost = self.mine & !mask;
        let gained = mask & !self.mine;
        if lost != 0 {
            let gone: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| lost & (1 << partition_of(p.slot)) != 0)
                .map(|(s, _)| *s)
                .collect();
            for s in gone {
                self.forget(s);
            }
            for (s, q) in self.per_slot.iter_mut().enumerate() {
                if lost & (1 << partition_of(s)) != 0 {
                    debug_assert_eq!(self.live[s], 0);
                    q.clear();
                }
            }
            let pending = &self.pending;
            self.fresh.retain(|s| pending.contains_key(s));
        }
        if gained != 0 {
            for (k, d) in self.domains.iter().enumerate() {
                let mut low = u64::MAX;
                for p in 0..PARTITIONS {
                    if gained & (1 << p) != 0 {
                        let s = slot(*d, p);
                        self.read_through[s] = positions[s];
                        low = low.min(positions[s]);
                    }
                }
                if low != u64::MAX && (low < self.readers[k].pos || self.mine == 0) {
                    self.readers[k] = DomainReader::new(&self.inner.dir, *d, low);
                }
            }
        }
        self.mine = mask;
        self.lease_until = now + lease_us;
        let every = if mask == 0 {
            (lease_us / 4).min(50_000)
        } else {
            lease_us / 3
        };
        self.next_maintain = now + every.max(1_000);
        Ok(())
    }

    /// The key a record is ordered by (domain, partition key hash).
    fn key_of(p: &Pend) -> (usize, u32) {
        (p.slot / PARTITIONS as usize, p.rec.key_hash)
    }

    /// True when a delayed record of `p`'s key is not due yet (`p` waits behind it).
    fn held_back(delayed_keys: &HashMap<(usize, u32), u32>, p: &Pend) -> bool {
        !delayed_keys.is_empty() && delayed_keys.contains_key(&Self::key_of(p))
    }

    /// Drops a record from every index (acked, or its partition lost).
    fn forget(&mut self, seq: u64) -> Option<Pend> {
        let p = self.pending.remove(&seq)?;
        self.live[p.slot] -= 1;
        match p.st {
            // An entry in `fresh` is dropped when it comes up.
            St::Waiting if p.in_fresh => {}
            St::Waiting => {
                self.waiting.remove(&seq);
            }
            // Its deadline entry is skipped when it comes up.
            St::InFlight(_) => {}
            St::Delayed(t) => {
                self.timers.remove(&(t, seq));
                self.unblock(Self::key_of(&p));
            }
        }
        Some(p)
    }

    fn unblock(&mut self, key: (usize, u32)) {
        if let Some(n) = self.delayed_keys.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.delayed_keys.remove(&key);
            }
        }
    }

    /// The lowest pending sequence of slot `s` (settled entries at the front are dropped;
    /// the queue is compacted when settled entries outnumber pending ones).
    fn first_pending(&mut self, s: usize) -> Option<u64> {
        let pending = &self.pending;
        let q = &mut self.per_slot[s];
        if q.len() > 2 * self.live[s] as usize + 1024 {
            q.retain(|seq| pending.contains_key(seq));
        }
        while let Some(&seq) = q.front() {
            if pending.contains_key(&seq) {
                return Some(seq);
            }
            q.pop_front();
        }
        None
    }

    /// Moves every fresh record to `waiting`.
    fn park_fresh(&mut self) {
        for seq in self.fresh.drain(..) {
            if let Some(p) = self.pending.get_mut(&seq)
                && p.in_fresh
            {
                p.in_fresh = false;
                self.waiting.insert(seq);
            }
        }
    }

    /// Reads newly committed records of this instance's partitions into `pending`.
    fn read_new(&mut self, max: usize, now: i64) -> Result<()> {
        if self.mine == 0
            || self.pending.len() >= MAX_PENDING
            || self.waiting.len() + self.fresh.len() >= max
        {
            return Ok(());
        }
        let snap = self.inner.shared.snapshot();
        let j = self.journal.clone();
        let j = j.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = Vec::new();
        for k in 0..self.readers.len() {
            let d = self.domains[k];
            self.readers[k].read(&snap.domains[d], &mut buf, max.max(256))?;
            for rec in buf.drain(..) {
                let s = slot(d, rec.key_hash);
                if self.mine & (1 << partition_of(s)) == 0 || rec.seq <= self.read_through[s] {
                    continue;
                }
                self.read_through[s] = rec.seq;
                if rec.seq <= j.state.positions[s]
                    || j.state.acked.contains(s, rec.seq)
                    || !self.pattern.matches(&rec.topic)
                {
                    continue;
                }
                let st = match j.state.nacked.get(&rec.seq) {
                    Some(due) if *due > now => St::Delayed(*due),
                    _ => St::Waiting,
                };
                let deliveries = u32::from(rec.seq <= j.state.delivered[s]);
                self.per_slot[s].push_back(rec.seq);
                self.live[s] += 1;
                let in_fresh = match st {
                    St::Delayed(due) => {
                        // Records read before it may be of its key (not settled before a
                        // crash, say): they go to the ordered set, where this one goes when
                        // due, so that it cannot overtake them.
                        self.park_fresh();
                        self.timers.insert((due, rec.seq));
                        *self.delayed_keys.entry((d, rec.key_hash)).or_default() += 1;
                        false
                    }
                    _ => {
                        self.fresh.push_back(rec.seq);
                        true
                    }
                };
                self.pending.insert(
                    rec.seq,
                    Pend {
                        slot: s,
                        rec,
                        deliveries,
                        st,
                        in_fresh,
                    },
                );
            }
        }
        Ok(())
    }

    /// Hands out up to `max` records: new ones, expired ones and delayed ones that are due,
    /// never one whose key has a delayed record before it. Returns them (in flight, noted
    /// delivered) and the next time something becomes due. Their headers are decoded by
    /// [`decode_handed`] after the instance's lock is let go, so that acks from other threads
    /// do not wait for the decoding; one that does not decode is given back with
    /// [`Instance::unhand`].
    fn poll(&mut self, max: usize) -> Result<(Vec<Handed>, Option<i64>)> {
        let now = now_us();
        self.maintain(now, false)?;
        // A read error is returned when nothing read before it can be handed out.
        let read_failed = self.read_new(max, now).err();
        let mut out = Vec::new();
        // Records whose time came: handed-out ones past their deadline, delayed ones now due.
        while let Some(&(t, seq)) = self.deadlines.front() {
            if t > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(p) = self.pending.get_mut(&seq)
                && p.st == St::InFlight(t)
            {
                p.st = St::Waiting;
                self.waiting.insert(seq);
            }
        }
        while let Some(&(t, seq)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            if let Some(p) = self.pending.get_mut(&seq) {
                if let St::Delayed(_) = p.st {
                    let key = Self::key_of(p);
                    p.st = St::Waiting;
                    self.unblock(key);
                } else {
                    p.st = St::Waiting;
                }
                self.waiting.insert(seq);
            }
        }
        let mut through: Vec<(usize, u64)> = Vec::new();
        let deadline = now + self.deadline_us;
        let hand = |p: &mut Pend, out: &mut Vec<Handed>, through: &mut Vec<(usize, u64)>| {
            p.deliveries += 1;
            p.st = St::InFlight(deadline);
            through.push((p.slot, p.rec.seq));
            out.push(Handed {
                rec: p.rec.clone(),
                deliveries: p.deliveries,
                deadline,
            });
        };
        // Waiting ones first: for any key they precede the fresh ones.
        for &seq in &self.waiting {
            if out.len() >= max {
                break;
            }
            let Some(p) = self.pending.get_mut(&seq) else {
                continue;
            };
            if Self::held_back(&self.delayed_keys, p) {
                continue;
            }
            hand(p, &mut out, &mut through);
        }
        for h in &out {
            self.waiting.remove(&h.rec.seq);
        }
        let mut blocked = Vec::new();
        while out.len() < max {
            let Some(seq) = self.fresh.pop_front() else {
                break;
            };
            let Some(p) = self.pending.get_mut(&seq) else {
                continue;
            };
            if !p.in_fresh {
                continue;
            }
            p.in_fresh = false;
            if Self::held_back(&self.delayed_keys, p) {
                blocked.push(seq);
                continue;
            }
            hand(p, &mut out, &mut through);
        }
        self.waiting.extend(blocked);
        for h in &out {
            self.deadlines.push_back((deadline, h.rec.seq));
        }
        if self.deadlines.len() > 2 * self.pending.len() + 1024 {
            let pending = &self.pending;
            self.deadlines
                .retain(|(t, seq)| pending.get(seq).is_some_and(|p| p.st == St::InFlight(*t)));
        }
        let mut next_due: Option<i64> =
            (self.mine == 0 || self.next_maintain > now).then_some(self.next_maintain);
        for t in [
            self.timers.first().map(|x| x.0),
            self.deadlines.front().map(|x| x.0),
        ]
        .into_iter()
        .flatten()
        {
            next_due = Some(next_due.map_or(t, |n| n.min(t)));
        }
        if let Some(e) = read_failed
            && out.is_empty()
        {
            return Err(e);
        }
        if !through.is_empty() {
            let mut j = self.journal();
            let mut last: Vec<(usize, u64)> = Vec::new();
            for (s, seq) in through {
                if seq > j.state.delivered[s] {
                    match last.iter_mut().find(|(x, _)| *x == s) {
                        Some(e) => e.1 = e.1.max(seq),
                        None => last.push((s, seq)),
                    }
                }
            }
            if !last.is_empty() {
                j.append_shared(super::format::KIND_DELIVERED, &frames::delivered(&last))?;
            }
        }
        Ok((out, next_due))
    }

    /// Gives back handed-out records that were not delivered (their headers did not
    /// decode): waiting again, their delivery not counted.
    fn unhand(&mut self, handed: &[Handed]) {
        for h in handed {
            if let Some(p) = self.pending.get_mut(&h.rec.seq)
                && p.st == St::InFlight(h.deadline)
            {
                p.deliveries -= 1;
                p.st = St::Waiting;
                self.waiting.insert(h.rec.seq);
            }
        }
    }

    /// Settles `seqs` (and records `keys` as applied) in one journal frame.
    pub(crate) fn ack(&mut self, seqs: &[u64], keys: &[u128]) -> Result<()> {
        let now = now_us();
        let mut touched: Vec<usize> = Vec::new();
        let mut acked: Vec<(Option<usize>, u64)> = Vec::with_capacity(seqs.len());
        for s in seqs {
            match self.forget(*s) {
                Some(p) => {
                    if !touched.contains(&p.slot) {
                        touched.push(p.slot);
                    }
                    acked.push((Some(p.slot), *s));
                }
                None => acked.push((None, *s)),
            }
        }
        let mut positions: Vec<(usize, u64)> = Vec::new();
        let j = self.journal.clone();
        let mut j = j.lock().unwrap_or_else(|p| p.into_inner());
        for s in touched {
            if self.mine & (1 << partition_of(s)) == 0 {
                continue;
            }
            let k = self
                .domains
                .iter()
                .position(|d| *d == s / PARTITIONS as usize)
                .unwrap_or(0);
            let examined = self.read_through[s].max(self.readers[k].pos);
            let pos = match self.first_pending(s) {
                Some(first) => first - 1,
                None => examined,
            };
            if pos > j.state.positions[s] {
                positions.push((s, pos));
            }
        }
        let above: Vec<(usize, u64)> = acked
            .iter()
            .filter_map(|(s, seq)| match s {
                Some(s) => positions
                    .iter()
                    .find(|(x, _)| x == s)
                    .is_none_or(|(_, p)| seq > p)
                    .then_some((*s, *seq)),
                None => Some((group::UNKNOWN_SLOT, *seq)),
            })
            .collect();
        let body = frames::ack(self.owner, now / 1000, &positions, &above, keys);
        j.append_shared(super::format::KIND_ACK, &body)?;
        drop(j);
        self.maintain(now, false)
    }

    fn nack(&mut self, seq: u64, delay: Duration) -> Result<()> {
        let due = now_us() + i64::try_from(delay.as_micros()).unwrap_or(i64::MAX / 4);
        let Some(p) = self.pending.get_mut(&seq) else {
            return Ok(());
        };
        let old = p.st;
        let in_fresh = std::mem::take(&mut p.in_fresh);
        p.st = St::Delayed(due);
        let (slot, key) = (p.slot, Self::key_of(p));
        match old {
            St::Waiting if in_fresh => {}
            St::Waiting => {
                self.waiting.remove(&seq);
            }
            St::InFlight(_) => {}
            St::Delayed(t) => {
                self.timers.remove(&(t, seq));
                self.unblock(key);
            }
        }
        self.timers.insert((due, seq));
        *self.delayed_keys.entry(key).or_default() += 1;
        let body = frames::nack(slot, seq, due);
        self.journal()
            .append_shared(super::format::KIND_NACK, &body)
    }

    fn in_progress(&mut self, seq: u64) -> Result<()> {
        let now = now_us();
        if let Some(p) = self.pending.get_mut(&seq)
            && let St::InFlight(t) = p.st
        {
            let t2 = now + self.deadline_us;
            if t2 != t {
                p.st = St::InFlight(t2);
                self.deadlines.push_back((t2, seq));
            }
        }
        self.maintain(now, false)
    }

    /// Gives the partitions up (the instance is going away).
    fn release(&mut self) {
        let owner = self.owner;
        let r = self.journal().with_lock(true, |j| {
            j.append(super::format::KIND_LEASE, &frames::lease(owner, 0, 0))
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "embedded log: releasing partitions failed; they expire instead");
        }
        self.mine = 0;
    }

    /// True when this instance is of group `name` on the log of `inner`.
    pub(crate) fn belongs_to(&self, inner: &Arc<Inner>, name: &str) -> bool {
        Arc::ptr_eq(&self.inner, inner) && self.journal().meta.name == name
    }

    /// True when `a` and `b` are the same instance.
    pub(crate) fn same(a: &Arc<Mutex<Instance>>, b: &Arc<Mutex<Instance>>) -> bool {
        Arc::ptr_eq(a, b)
    }
}

/// Settles deliveries of a durable instance.
pub(crate) struct DurableSettler {
    pub(crate) inst: Arc<Mutex<Instance>>,
}

impl DurableSettler {
    async fn inst(&self) -> MutexGuard<'_, Instance> {
        lock_yielding(&self.inst).await
    }
}

#[async_trait]
impl Settler for DurableSettler {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    async fn ack(&self, sequences: &[u64]) -> Result<()> {
        self.inst().await.ack(sequences, &[])
    }

    async fn nack(&self, sequence: u64, delay: Duration) -> Result<()> {
        self.inst().await.nack(sequence, delay)
    }

    async fn in_progress(&self, sequence: u64) -> Result<()> {
        self.inst().await.in_progress(sequence)
    }
}

/// A durable subscription: one instance of its consumer group.
struct Durable {
    inner: Arc<Inner>,
    inst: Arc<Mutex<Instance>>,
    settler: Arc<dyn Settler>,
}

/// The partitions are given up when the instance goes: after the subscription and every
/// delivery it handed out (each holds the settler) are gone — so the acks a consumer still
/// flushes after dropping its subscription land while it owns the partitions, not after
/// another instance has taken them over and handed the same messages out again.
impl Drop for Instance {
    fn drop(&mut self) {
        self.release();
    }
}

#[async_trait]
impl Subscription for Durable {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let (inner, inst, settler) = (&self.inner, &self.inst, &self.settler);
        fetch_loop(inner, max, wait, move |max| {
            decode_handed(inner, inst, settler, max)
        })
        .await
    }
}

/// One poll of a durable instance: records handed out under the instance's lock (taken
/// without stalling the thread), decoded into deliveries after it is let go.
async fn decode_handed(
    inner: &Arc<Inner>,
    inst: &Arc<Mutex<Instance>>,
    settler: &Arc<dyn Settler>,
    max: usize,
) -> Result<(Vec<Delivery>, Option<i64>)> {
    let (handed, next_due) = lock_yielding(inst).await.poll(max)?;
    // Decoded outside the lock (acks wait for it, not for this).
    let mut out = Vec::with_capacity(handed.len());
    let mut rest = handed.into_iter();
    while let Some(h) = rest.next() {
        let headers = match headers_of(inner, &h.rec) {
            Ok(headers) => headers,
            Err(e) => {
                // Damage: this record and the rest go back; what decoded is handed
                // out, and the error is returned when nothing did.
                let back: Vec<Handed> = std::iter::once(h).chain(rest).collect();
                inst.lock().unwrap_or_else(|p| p.into_inner()).unhand(&back);
                if out.is_empty() {
                    return Err(e);
                }
                break;
            }
        };
        let info = DeliveryInfo {
            sequence: h.rec.seq,
            delivery_count: h.deliveries,
            stored_at: us_to_time(h.rec.log_us),
        };
        let env = Envelope {
            topic: h.rec.topic.into(),
            headers,
            payload: h.rec.payload,
        };
        out.push(Delivery::new(env, info, settler.clone()));
    }
    Ok((out, next_due))
}
