//! The state every task of one consumer shares, and the topics it has parsed.

use super::*;

/// Finished messages waiting for the acker's next batch: one shard of them (see
/// [`AckShard`]).
#[derive(Default)]
pub(super) struct AckBuf {
    pub(super) deliveries: Vec<Delivery>,
    pub(super) keys: Vec<DKey>,
    /// Boxes of finished items, for the fetcher to reuse (at most [`SPARE_ITEMS`] per
    /// shard; the fetcher takes from its own thread's shard first, then the others).
    pub(super) spare: Vec<Item>,
    /// The acker has stopped (set in every shard at once, under all their locks).
    pub(super) closed: bool,
}

/// Shards of the acker's buffer. A worker puts a finished message into its thread's shard,
/// so the two cores do not take one lock per message in turn (a profile of the embedded
/// consume bench had that lock's cache line at half of `Shared::done`); the acker drains
/// every shard into one batch.
pub(super) const ACK_SHARDS: usize = 4;

/// One shard of the acker's buffer, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
pub(super) struct AckShard(pub(super) Mutex<AckBuf>);

/// The acker shard of the current thread.
pub(super) fn ack_shard_index() -> usize {
    crate::obs::thread_number() % ACK_SHARDS
}

pub(super) struct Shared {
    /// Unique in the process (see [`TOPICS_HERE`]).
    pub(super) id: u64,
    /// Fetch marks for the lag in seconds (`runtime::lag`).
    pub(super) lag_clock: Arc<crate::runtime::lag::LagClock>,
    /// Metrics and spans recorded (the bus handle's setting).
    pub(super) obs_on: bool,
    pub(super) tracer: BusTracer,
    /// The slot of each domain-level topic's metric handles in `handles`.
    pub(super) topic_metrics: RwLock<HashMap<String, TopicSlot>>,
    /// The metric handles themselves, read by slot without a lock (see [`HandleTable`]).
    pub(super) handles: HandleTable,
    pub(super) inflight_gauge: Gauge,
    pub(super) lag_gauge: Gauge,
    /// Unix micros of the last handler start (0: none).
    pub(super) last_message_us: AtomicI64,
    pub(super) stopped: AtomicBool,
    pub(super) max_in_flight: usize,
    pub(super) bus: Bus,
    pub(super) pattern: TopicPattern,
    pub(super) name: String,
    pub(super) handler: Arc<dyn Handler>,
    /// The handler's last answer came without waiting — from [`Handler::handle_now`], or from
    /// a future that finished in its first poll: workers take runs of messages ([`RUN_MAX`])
    /// instead of one at a time (a message of a run that has to wait hands the rest of the run
    /// back first, see `run_worker`).
    pub(super) answers_at_once: AtomicBool,
    pub(super) retry: RetryPolicy,
    /// `Some`: every message; `None`: by the message's domain (see [`strict_domain`]).
    pub(super) strict: Option<bool>,
    pub(super) ack_deadline: Duration,
    pub(super) max_payload: usize,
    pub(super) dedupe: Option<Arc<dyn DedupeStore>>,
    /// The registry's schema check (a bus opened with a registry).
    pub(super) schemas: Option<crate::registry::SchemaGate>,
    /// The dedupe keys this process is handling, has applied and not recorded yet, or has
    /// recorded while a batch looked up before the record is still in the runtime (so that a
    /// batch lookup made at fetch time cannot miss what was applied here since).
    pub(super) book: Mutex<KeyBook>,
    /// Topics already parsed, by their text, with their metric handles: a consumer sees few
    /// distinct topics, so each is parsed and validated once (bounded by
    /// [`TOPIC_CACHE_MAX`]; cleared when full).
    pub(super) topics: Mutex<FastMap<String, TopicEntry>>,
    pub(super) sched: Mutex<Sched>,
    pub(super) notify: Notify,
    pub(super) counters: Counters,
    /// Room for messages in flight (fetched, not settled); taken by the fetcher, given back
    /// when messages are settled.
    pub(super) permits: Semaphore,
    pub(super) phase: watch::Receiver<Phase>,
    pub(super) acks: [AckShard; ACK_SHARDS],
    /// No more messages will come: the acker flushes and stops.
    pub(super) ack_closing: AtomicBool,
    pub(super) ack_notify: Notify,
    /// A shard holds an eighth of the in-flight limit waiting for its ack: the acker stops
    /// lingering.
    pub(super) ack_full: Notify,
}

/// A parsed topic and the slot of its metric handles (observability on).
pub(super) type TopicEntry = (Topic, Option<TopicSlot>);

/// The number of a domain-level topic's metric handles in a consumer's [`HandleTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TopicSlot(pub(super) u32);

/// Slots per chunk of a [`HandleTable`], and chunks: at most 4,096 domain-level topics
/// (`ampy.{env}.{domain}.{version}`) per consumer have metric handles; a message of any
/// further one is handled without them.
const HANDLE_CHUNK: usize = 64;
const HANDLE_CHUNKS: usize = 64;

/// The metric handles of the domain-level topics a consumer has met, numbered in order of
/// first sight and read by number without a lock or a reference count. A message carries its
/// topic's [`TopicSlot`], not a clone of an `Arc`: that count, one per domain-level topic, was
/// written by every worker on every core per message. Slots are filled once, under
/// `Shared::topic_metrics`'s write lock, and kept while the consumer exists.
pub(super) struct HandleTable {
    chunks: [std::sync::OnceLock<Box<[std::sync::OnceLock<ConsumerTopic>]>>; HANDLE_CHUNKS],
}

impl HandleTable {
    pub(super) fn new() -> HandleTable {
        HandleTable {
            chunks: std::array::from_fn(|_| std::sync::OnceLock::new()),
        }
    }

    /// The handles in `slot`.
    #[inline]
    pub(super) fn get(&self, slot: TopicSlot) -> Option<&ConsumerTopic> {
        let i = slot.0 as usize;
        self.chunks
            .get(i / HANDLE_CHUNK)?
            .get()?
            .get(i % HANDLE_CHUNK)?
            .get()
    }

    /// Puts `handles` in `slot`; false when the table has no such slot or it is taken.
    pub(super) fn set(&self, slot: TopicSlot, handles: ConsumerTopic) -> bool {
        let i = slot.0 as usize;
        let Some(chunk) = self.chunks.get(i / HANDLE_CHUNK) else {
            return false;
        };
        let chunk = chunk.get_or_init(|| (0..HANDLE_CHUNK).map(|_| Default::default()).collect());
        chunk[i % HANDLE_CHUNK].set(handles).is_ok()
    }
}

/// Entries [`Shared::topic_of_name`] keeps per thread (over every consumer on the thread;
/// cleared when full).
pub(super) const TOPICS_HERE_MAX: usize = 4096;

/// (consumer id, address of the topic's shared text) → the name and its entry.
pub(super) type TopicsHere = FastMap<(u64, usize), (crate::envelope::TopicName, TopicEntry)>;

thread_local! {
    pub(super) static TOPICS_HERE: std::cell::RefCell<TopicsHere> =
        std::cell::RefCell::new(HashMap::with_hasher(FastHash::new()));
}

/// Numbers consumers for [`TOPICS_HERE`] (an address could be reused by a later consumer).
pub(super) static NEXT_CONSUMER_ID: AtomicU64 = AtomicU64::new(1);

impl Shared {
    pub(super) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub(super) fn count_dlq(&self, code: DlqCode) {
        self.counters.dead_lettered[code.index()].fetch_add(1, Ordering::SeqCst);
    }

    /// The slot of one domain-level topic's metric handles, made once (`None`: the consumer
    /// has met more domain-level topics than [`HandleTable`] holds).
    pub(super) fn topic_metrics(&self, topic: &str) -> Option<TopicSlot> {
        let key = crate::obs::domain_topic(topic);
        if let Some(slot) = self
            .topic_metrics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Some(*slot);
        }
        let mut slots = self
            .topic_metrics
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(key) {
            return Some(*slot);
        }
        let slot = TopicSlot(u32::try_from(slots.len()).ok()?);
        if !self
            .handles
            .set(slot, self.bus.metrics().consumer_topic(key, &self.name))
        {
            return None;
        }
        slots.insert(key.to_owned(), slot);
        Some(slot)
    }

    /// The topic of a delivered message, parsed once per distinct topic, with its metric
    /// handles.
    pub(super) fn topic_of(&self, raw: &str) -> Result<TopicEntry> {
        if let Some(hit) = self
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(raw)
        {
            return Ok(hit.clone());
        }
        let t = Topic::parse(raw)?;
        let m = if self.obs_on {
            self.topic_metrics(t.as_str())
        } else {
            None
        };
        let mut c = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if c.len() >= TOPIC_CACHE_MAX {
            c.clear();
        }
        c.insert(raw.to_owned(), (t.clone(), m));
        Ok((t, m))
    }

    /// [`Shared::topic_of`] through entries kept per thread, found by the address of the
    /// name's shared text (the embedded log and NATS hand out one text per topic): no lock,
    /// and no hashing or comparing of the topic's text, per message on the workers.
    pub(super) fn topic_of_name(&self, name: &crate::envelope::TopicName) -> Result<TopicEntry> {
        if name.is_empty() {
            return self.topic_of(name);
        }
        let key = (self.id, name.addr());
        let hit = TOPICS_HERE.with(|c| c.borrow().get(&key).map(|(_, e)| e.clone()));
        if let Some(e) = hit {
            return Ok(e);
        }
        let e = self.topic_of(name)?;
        TOPICS_HERE.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= TOPICS_HERE_MAX {
                c.clear();
            }
            // The name is kept with its entry: its text, and so its address, stays this
            // topic's while the entry exists.
            c.insert(key, (name.clone(), e.clone()));
        });
        Ok(e)
    }

    /// Parses the topic and normalises the headers of a delivered message, and takes its
    /// dedupe keys (dedupe on).
    pub(super) fn prepare(&self, item: &mut Item) -> Result<()> {
        let env = &mut item.delivery.envelope;
        let (topic, metrics) = self.topic_of_name(&env.topic)?;
        item.metrics = metrics;
        let h = &env.headers;
        let headers = if h.message_uuid().is_some()
            && h.produced_at_micros().is_some()
            && h.trace_ids().is_some()
        {
            // Canonical already (parsed when the transport built the headers): normalising
            // would rewrite nothing, so the message takes these headers instead of a copy;
            // `restore_headers` gives them back to the envelope before a dead letter.
            let mut headers = std::mem::take(&mut env.headers);
            if let Err(e) = headers.normalize_for_consume() {
                // A failed check changes nothing: the envelope gets them back as they came.
                env.headers = headers;
                return Err(e);
            }
            item.headers_moved = true;
            headers
        } else {
            let mut headers = env.headers.clone();
            headers.normalize_for_consume()?;
            headers
        };
        if self.dedupe.is_some() {
            item.keys = Keys::of(&headers, topic.domain());
        }
        item.prepared = Some((topic, headers));
        Ok(())
    }
}
