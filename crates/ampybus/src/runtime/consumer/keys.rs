//! Dedupe keys as the runtime holds them, and the key book of what this process is handling
//! or has applied and not recorded yet.

use super::*;

/// One dedupe key as the runtime holds it: a canonical `message_id` as its 128 bits (no
/// allocation), or any other key text (`{domain}:{dedupe_key}`) shared by reference count.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub(super) enum DKey {
    Id(u128),
    Text(Arc<str>),
}

impl DKey {
    pub(super) fn parse(s: &str) -> DKey {
        match canonical_uuid(s) {
            Some(v) => DKey::Id(v),
            None => DKey::Text(Arc::from(s)),
        }
    }
}

/// The 128 bits of a UUID in canonical form (lowercase, hyphenated) — the form
/// `normalize_for_consume` leaves `message_id` in; `None` for any other text.
pub(super) fn canonical_uuid(s: &str) -> Option<u128> {
    crate::headers::canonical_uuid(s).map(u128::from_be_bytes)
}

/// Writes the text of a key into `buf` (for ids) and returns it.
pub(super) fn key_text<'a>(k: &'a DKey, buf: &'a mut [u8; 36]) -> &'a str {
    match k {
        DKey::Id(v) => {
            crate::ids::uuid_text(&v.to_be_bytes(), buf);
            // SAFETY: `uuid_text` writes 36 ASCII bytes.
            unsafe { std::str::from_utf8_unchecked(buf) }
        }
        DKey::Text(s) => s,
    }
}

/// The texts of `keys`, for a [`DedupeStore`] call.
pub(super) fn key_texts(keys: &[DKey]) -> Vec<String> {
    let mut buf = [0u8; 36];
    keys.iter()
        .map(|k| key_text(k, &mut buf).to_owned())
        .collect()
}

/// Room for the texts of a batch's dedupe keys handed to a [`DedupeStore`] call, kept by the
/// task that makes the calls: ids are written into `bufs`, and neither buffer is allocated
/// again per batch.
#[derive(Default)]
pub(super) struct KeyTexts {
    bufs: Vec<[u8; 36]>,
    /// Empty between calls; kept for its allocation.
    strs: Vec<&'static str>,
}

impl KeyTexts {
    /// The texts of `keys` borrowed (give the vector back with
    /// `let strs = relabel(strs); texts.keep(strs)`).
    pub(super) fn of<'a>(&'a mut self, keys: &'a [DKey]) -> Vec<&'a str> {
        let mut strs = relabel(std::mem::take(&mut self.strs));
        self.bufs.clear();
        self.bufs.resize(keys.len(), [0u8; 36]);
        strs.extend(
            keys.iter()
                .zip(self.bufs.iter_mut())
                .map(|(k, buf)| match k {
                    DKey::Id(v) => {
                        crate::ids::uuid_text(&v.to_be_bytes(), buf);
                        // SAFETY: `uuid_text` writes 36 ASCII bytes.
                        unsafe { std::str::from_utf8_unchecked(buf) }
                    }
                    DKey::Text(s) => &**s,
                }),
        );
        strs
    }

    /// Keeps the allocation of a vector [`KeyTexts::of`] gave, [`relabel`]led first.
    pub(super) fn keep(&mut self, strs: Vec<&'static str>) {
        self.strs = strs;
    }
}

/// An emptied vector of borrowed texts under another lifetime (`'static`: borrowing nothing
/// any more), in the same allocation (a `Vec` collected from its own `into_iter` keeps its
/// buffer when the element layout is the same).
pub(super) fn relabel<'b>(mut v: Vec<&str>) -> Vec<&'b str> {
    v.clear();
    v.into_iter().map(|_| "").collect()
}

/// The dedupe keys of one message (what [`crate::dedupe::dedupe_keys`] gives, held without allocating for
/// the `message_id`).
#[derive(Clone, Default)]
pub(super) struct Keys(pub(super) [Option<DKey>; 2]);

impl Keys {
    pub(super) fn of(headers: &crate::headers::Headers, domain: crate::topic::Domain) -> Keys {
        Keys([
            match headers.message_uuid() {
                Some(u) => Some(DKey::Id(u.as_u128())),
                None => headers.message_id().map(DKey::parse),
            },
            headers
                .dedupe_scope(domain)
                .map(|s| DKey::Text(Arc::from(s))),
        ])
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &DKey> {
        self.0.iter().flatten()
    }

    pub(super) fn len(&self) -> usize {
        self.iter().count()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }
}

/// The answer of one batch dedupe lookup: one flag per key of the batch (`None`: the lookup
/// failed, each message is then checked on its own). Set once; until then no message of the
/// batch is handled.
#[derive(Default)]
pub(super) struct Lookup {
    pub(super) done: std::sync::OnceLock<Option<Vec<bool>>>,
}

/// How long a message waits when another one with the same dedupe key is being handled.
pub(super) const CLAIM_WAIT: Duration = Duration::from_millis(5);

/// Where a dedupe key of this process stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Mark {
    /// A message with this key is being handled now, or was handled Ok and its dedupe record
    /// is not written yet: another message with the key waits (and then finds it recorded,
    /// or free again when the handling failed).
    Handling,
    /// Recorded while a message looked up before the record may still be in the runtime.
    Recorded,
}

/// What a claim on a message's keys found.
pub(super) enum Claimed<'a> {
    /// The keys are this message's until the claim is dropped, or recorded when it is kept.
    Taken(Claim<'a>),
    /// Another message with one of the keys is being handled: wait and claim again.
    Busy,
    /// One of the keys was applied and recorded by this process: skip the message.
    Applied,
}

/// The dedupe keys this process knows, one map under one lock: a key is `Handling` from its
/// claim until its record is written (`Recorded`), or until the claim is dropped (handling
/// failed: the key is forgotten). A recorded key matters only to a
/// message whose batch was looked up in the store before the record was written (the store
/// answered "not applied"); every later lookup finds the record in the store. So a recorded
/// key is kept while a batch opened before its record still has a message in the runtime
/// (a message holds its batch's [`Lookup`] until it leaves), and forgotten after — which
/// keeps the map about as large as what is in flight. `cap` bounds it whatever happens (a
/// message stuck behind a slow key for a long time): past it the oldest records go.
pub(super) struct KeyBook {
    pub(super) marks: FastMap<DKey, Mark>,
    /// Recorded keys with the newest batch open when they were recorded, oldest first.
    pub(super) order: VecDeque<(DKey, u64)>,
    /// Batches opened and not known to be finished, oldest first.
    pub(super) batches: VecDeque<(u64, std::sync::Weak<Lookup>)>,
    /// The newest batch opened.
    pub(super) last_epoch: u64,
    pub(super) cap: usize,
}

impl KeyBook {
    pub(super) fn new(cap: usize) -> KeyBook {
        KeyBook {
            marks: HashMap::with_hasher(FastHash::new()),
            order: VecDeque::new(),
            batches: VecDeque::new(),
            last_epoch: 0,
            cap,
        }
    }

    /// A new batch's lookup, numbered after every batch before it.
    pub(super) fn open_batch(&mut self) -> Arc<Lookup> {
        self.last_epoch += 1;
        // Records written after this are kept until the batch's last message has left.
        let l = Arc::new(Lookup::default());
        self.batches
            .push_back((self.last_epoch, Arc::downgrade(&l)));
        l
    }

    /// The oldest batch that still has a message in the runtime (or the next one).
    pub(super) fn oldest_live(&mut self) -> u64 {
        while let Some((_, w)) = self.batches.front() {
            if w.strong_count() > 0 {
                break;
            }
            self.batches.pop_front();
        }
        self.batches
            .front()
            .map_or(self.last_epoch + 1, |(epoch, _)| *epoch)
    }

    pub(super) fn mark(&self, k: &DKey) -> Option<Mark> {
        if self.marks.is_empty() {
            return None;
        }
        self.marks.get(k).copied()
    }

    /// True when one of `keys` was applied and recorded here.
    pub(super) fn applied(&self, keys: &Keys) -> bool {
        keys.iter().any(|k| self.mark(k) == Some(Mark::Recorded))
    }

    /// True when one of `keys` is known here in any state.
    pub(super) fn known(&self, keys: &[DKey]) -> bool {
        keys.iter().any(|k| self.mark(k).is_some())
    }

    /// Lets go of claimed keys that will not be recorded (their handling failed, or the
    /// message will not be acked here): another message with one of them may run.
    pub(super) fn release(&mut self, keys: &Keys) {
        for k in keys.iter() {
            if self.marks.get(k) == Some(&Mark::Handling) {
                self.marks.remove(k);
            }
        }
    }

    /// Keys whose records were written (or given up on); forgets the records no message in
    /// the runtime can need any more.
    pub(super) fn record(&mut self, keys: &[DKey]) {
        // Every batch opened so far may have been looked up before these records were
        // written; batches opened from now on are looked up after.
        let epoch = self.last_epoch;
        for k in keys {
            match self.marks.get_mut(k) {
                Some(m) if *m == Mark::Recorded => continue,
                Some(m) => *m = Mark::Recorded,
                None => {
                    self.marks.insert(k.clone(), Mark::Recorded);
                }
            }
            self.order.push_back((k.clone(), epoch));
        }
        let live = self.oldest_live();
        while let Some((_, at)) = self.order.front() {
            if *at >= live && self.order.len() <= self.cap {
                break;
            }
            if let Some((old, _)) = self.order.pop_front()
                && let std::collections::hash_map::Entry::Occupied(o) = self.marks.entry(old)
                && *o.get() == Mark::Recorded
            {
                o.remove();
            }
        }
    }
}

/// The claim of a message on its dedupe keys while it is handled: released on drop, or kept
/// (the keys stay `Handling` until [`KeyBook::record`]) when the message was handled Ok.
pub(super) struct Claim<'a> {
    pub(super) book: &'a Mutex<KeyBook>,
    pub(super) keys: Keys,
    pub(super) settled: bool,
}

impl<'a> Claim<'a> {
    pub(super) fn take(book: &'a Mutex<KeyBook>, keys: &Keys) -> Claimed<'a> {
        let mut b = book.lock().unwrap_or_else(|p| p.into_inner());
        if let [Some(k), None] = &keys.0 {
            // One key (a message with a `message_id` and no `dedupe_key`): one probe.
            match b.marks.entry(k.clone()) {
                std::collections::hash_map::Entry::Occupied(o) => {
                    return match o.get() {
                        Mark::Handling => Claimed::Busy,
                        _ => Claimed::Applied,
                    };
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Mark::Handling);
                }
            }
            return Claimed::Taken(Claim {
                book,
                keys: keys.clone(),
                settled: false,
            });
        }
        let mut applied = false;
        for k in keys.iter() {
            match b.mark(k) {
                Some(Mark::Handling) => return Claimed::Busy,
                Some(_) => applied = true,
                None => {}
            }
        }
        if applied {
            return Claimed::Applied;
        }
        for k in keys.iter() {
            b.marks.insert(k.clone(), Mark::Handling);
        }
        Claimed::Taken(Claim {
            book,
            keys: keys.clone(),
            settled: false,
        })
    }

    /// Handled Ok: the keys stay claimed until their record is written, so a twin arriving
    /// meanwhile waits and then finds them recorded. No lock: nothing changes in the book.
    pub(super) fn keep(mut self) {
        self.settled = true;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(&self.keys);
    }
}
