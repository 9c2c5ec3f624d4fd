//! The per-key scheduler: one FIFO per partition key, ready keys handed to workers.

use super::*;

/// A delivered message on its way through the runtime, boxed: it moves between the fetcher,
/// its key's queue, a worker and the acker several times, as one pointer.
pub(super) type Item = Box<ItemData>;

/// What an [`Item`] holds.
pub(super) struct ItemData {
    pub(super) delivery: Delivery,
    pub(super) local_attempts: u32,
    pub(super) msg: Option<Message>,
    /// Topic and normalised headers (parsed by the preparer when dedupe is on, else by the
    /// worker).
    pub(super) prepared: Option<(Topic, crate::headers::Headers)>,
    /// The envelope's headers were moved into `prepared`/`msg` (they needed no rewrite).
    pub(super) headers_moved: bool,
    /// The envelope's payload was moved into `msg` (carried inline, not compressed): no
    /// second reference to the transport's buffer, whose count the fetcher's core is
    /// raising for the next messages meanwhile.
    pub(super) payload_moved: bool,
    /// Metric handles of the message's domain-level topic (observability on, topic parsed).
    pub(super) metrics: Option<TopicSlot>,
    /// Dedupe keys (empty with dedupe off).
    pub(super) keys: Keys,
    /// The batch lookup this message waits for and the index of its first key in it.
    pub(super) lookup: Option<(Arc<Lookup>, u32)>,
    pub(super) dedupe_checked: bool,
    pub(super) last_error: String,
    /// When the lease was last taken or extended.
    pub(super) refreshed: Instant,
    /// Put back at the head of its key's queue by a strict retry.
    pub(super) parked_head: bool,
}

impl ItemData {
    /// The message's headers wherever they are now (moved into the prepared form or the
    /// message when they needed no rewrite).
    pub(super) fn headers(&self) -> &crate::headers::Headers {
        match (&self.msg, &self.prepared) {
            (Some(m), _) if self.headers_moved => &m.headers,
            (None, Some((_, h))) if self.headers_moved => h,
            _ => &self.delivery.envelope.headers,
        }
    }

    /// Gives a moved payload and moved headers back to the envelope (a dead letter carries
    /// the envelope).
    pub(super) fn restore_envelope(&mut self) {
        if self.payload_moved {
            if let Some(m) = self.msg.as_mut() {
                self.delivery.envelope.payload = std::mem::take(&mut m.payload);
            }
            self.payload_moved = false;
        }
        if !self.headers_moved {
            return;
        }
        let h = match (self.msg.take(), self.prepared.take()) {
            (Some(m), _) => m.headers,
            (None, Some((_, h))) => h,
            (None, None) => return,
        };
        self.delivery.envelope.headers = h;
        self.headers_moved = false;
    }

    pub(super) fn new(delivery: Delivery, at: Instant) -> Item {
        Box::new(ItemData::fresh(delivery, at))
    }

    pub(super) fn fresh(delivery: Delivery, at: Instant) -> ItemData {
        ItemData {
            delivery,
            local_attempts: 0,
            msg: None,
            prepared: None,
            headers_moved: false,
            payload_moved: false,
            metrics: None,
            keys: Keys::default(),
            lookup: None,
            dedupe_checked: false,
            last_error: String::new(),
            refreshed: at,
            parked_head: false,
        }
    }

    /// Not waiting for its batch's dedupe lookup.
    pub(super) fn runnable(&self) -> bool {
        self.lookup
            .as_ref()
            .is_none_or(|(l, _)| l.done.get().is_some())
    }
}

/// One partition key's FIFO. Slots are kept while idle (so a busy key costs no allocation
/// per message) and swept when there are many.
pub(super) struct KeyState {
    pub(super) queue: VecDeque<Item>,
    pub(super) busy: bool,
    pub(super) parked: bool,
    /// The refresher has the queue out to extend leases.
    pub(super) refreshing: bool,
    pub(super) in_ready: bool,
    /// Non-strict retries of this key waiting out their delay.
    pub(super) delayed: u32,
}

impl KeyState {
    pub(super) fn idle(&self) -> bool {
        !self.busy
            && !self.parked
            && !self.refreshing
            && !self.in_ready
            && self.delayed == 0
            && self.queue.is_empty()
    }
}

/// Recorded dedupe keys a consumer keeps at most (see [`KeyBook`]; normally it holds about
/// what is in flight).
pub(super) const KEY_BOOK_CAP: usize = 1 << 20;

/// Finished items' boxes kept for reuse.
pub(super) const SPARE_ITEMS: usize = 1024;

/// Idle key slots kept before a sweep (at least; a sweep sets the next bound to twice what
/// is left).
pub(super) const KEY_SWEEP_MIN: usize = 8192;

pub(super) struct Sched {
    pub(super) slots: Vec<KeyState>,
    pub(super) index: FastMap<Arc<str>, u32>,
    pub(super) free: Vec<u32>,
    pub(super) ready: VecDeque<u32>,
    pub(super) delayed: HashMap<u64, (u32, Item)>,
    pub(super) next_id: u64,
    pub(super) sweep_at: usize,
}

impl Sched {
    pub(super) fn new() -> Sched {
        Sched {
            slots: Vec::new(),
            index: HashMap::with_hasher(FastHash::new()),
            free: Vec::new(),
            ready: VecDeque::new(),
            delayed: HashMap::new(),
            next_id: 0,
            sweep_at: KEY_SWEEP_MIN,
        }
    }

    /// The slot of `key`, made if needed.
    pub(super) fn slot(&mut self, key: &str) -> u32 {
        if let Some(&id) = self.index.get(key) {
            return id;
        }
        if self.index.len() >= self.sweep_at {
            self.sweep();
        }
        let name: Arc<str> = Arc::from(key);
        let ks = KeyState {
            queue: VecDeque::new(),
            busy: false,
            parked: false,
            refreshing: false,
            in_ready: false,
            delayed: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = ks;
                id
            }
            None => {
                self.slots.push(ks);
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(name, id);
        id
    }

    /// Forgets idle keys.
    pub(super) fn sweep(&mut self) {
        let Sched {
            slots, index, free, ..
        } = self;
        index.retain(|_, id| {
            let ks = &mut slots[*id as usize];
            if ks.idle() {
                ks.queue = VecDeque::new();
                free.push(*id);
                false
            } else {
                true
            }
        });
        self.sweep_at = (2 * self.index.len()).max(KEY_SWEEP_MIN);
    }

    /// Queues key `id` for a worker if it can run now; true if it was queued.
    pub(super) fn make_ready(&mut self, id: u32) -> bool {
        let Some(ks) = self.slots.get_mut(id as usize) else {
            return false;
        };
        if !ks.busy
            && !ks.parked
            && !ks.refreshing
            && !ks.in_ready
            && ks.queue.front().is_some_and(|i| i.runnable())
        {
            ks.in_ready = true;
            self.ready.push_back(id);
            return true;
        }
        false
    }

    pub(super) fn push(&mut self, id: u32, item: Item) -> bool {
        self.slots[id as usize].queue.push_back(item);
        self.make_ready(id)
    }

    pub(super) fn take(&mut self) -> Option<(u32, Item)> {
        while let Some(id) = self.ready.pop_front() {
            let Some(ks) = self.slots.get_mut(id as usize) else {
                continue;
            };
            ks.in_ready = false;
            if ks.busy || ks.parked || ks.refreshing {
                continue;
            }
            if !ks.queue.front().is_some_and(|i| i.runnable()) {
                continue;
            }
            if let Some(mut item) = ks.queue.pop_front() {
                item.parked_head = false;
                ks.busy = true;
                return Some((id, item));
            }
        }
        None
    }

    /// Key `id` finished a message: frees it and queues it again if it has more.
    pub(super) fn finish(&mut self, id: u32) -> bool {
        if let Some(ks) = self.slots.get_mut(id as usize) {
            ks.busy = false;
        }
        self.make_ready(id)
    }

    /// Everything queued or delayed, for release at shutdown.
    pub(super) fn drain_all(&mut self) -> Vec<Item> {
        let mut items = Vec::new();
        for ks in self.slots.iter_mut() {
            items.extend(ks.queue.drain(..));
            ks.in_ready = false;
        }
        items.extend(self.delayed.drain().map(|(_, (_, it))| it));
        self.ready.clear();
        items
    }
}
