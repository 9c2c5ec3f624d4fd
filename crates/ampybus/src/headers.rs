//! Envelope headers: the wire names, typed accessors, builders and the validation rules of the
//! contract (strict on publish, liberal but safe on consume).

use crate::error::{Error, Result, show};
use crate::ids::{self, TraceContext, TraceIds};
use crate::partition;
use crate::topic::{Domain, Topic};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Wire names of every header the contract defines.
pub mod names {
    /// UUIDv7 (publish) / any UUID (consume).
    pub const MESSAGE_ID: &str = "message_id";
    /// Fully-qualified payload type, e.g. `ampy.bars.v1.BarBatch`.
    pub const SCHEMA_FQDN: &str = "schema_fqdn";
    /// Semver of the payload schema.
    pub const SCHEMA_VERSION: &str = "schema_version";
    /// `application/x-protobuf` or `application/json`.
    pub const CONTENT_TYPE: &str = "content_type";
    /// Absent or `gzip`.
    pub const CONTENT_ENCODING: &str = "content_encoding";
    /// RFC3339 UTC creation time.
    pub const PRODUCED_AT: &str = "produced_at";
    /// Logical service instance.
    pub const PRODUCER: &str = "producer";
    /// Upstream system.
    pub const SOURCE: &str = "source";
    /// Pipeline run id.
    pub const RUN_ID: &str = "run_id";
    /// W3C traceparent.
    pub const TRACEPARENT: &str = "traceparent";
    /// Older trace id header (32 hex).
    pub const TRACE_ID: &str = "trace_id";
    /// Older span id header (16 hex).
    pub const SPAN_ID: &str = "span_id";
    /// Ordering/sharding key.
    pub const PARTITION_KEY: &str = "partition_key";
    /// Domain idempotency key.
    pub const DEDUPE_KEY: &str = "dedupe_key";
    /// Deliveries/republishes so far.
    pub const RETRY_COUNT: &str = "retry_count";
    /// `code: detail` on dead-lettered messages.
    pub const DLQ_REASON: &str = "dlq_reason";
    /// Hash of the payload schema.
    pub const SCHEMA_HASH: &str = "schema_hash";
    /// Object-store pointer for oversized payloads.
    pub const BLOB_REF: &str = "blob_ref";
    /// `sha256:<hex>` of the stored blob.
    pub const BLOB_HASH: &str = "blob_hash";
    /// Size of the stored blob in bytes.
    pub const BLOB_SIZE: &str = "blob_size";
    /// Extension: the topic a dead-lettered message was published to.
    pub const ORIGINAL_TOPIC: &str = "original_topic";
    /// Extension: when the message was dead-lettered.
    pub const DLQ_AT: &str = "dlq_at";
    /// Extension: the consumer that dead-lettered it.
    pub const DLQ_CONSUMER: &str = "dlq_consumer";
    /// Extension: `sha256:<hex>` of the payload bytes as carried.
    pub const PAYLOAD_HASH: &str = "payload_hash";
    /// Extension: the replay request that caused this delivery.
    pub const REPLAY_REQUEST_ID: &str = "replay_request_id";
    /// Extension: the message id a redriven message replaces.
    pub const REDRIVE_OF: &str = "redrive_of";
    /// Extension: the message's number per producer run and partition key, from 1 (gap
    /// detection; see `runtime::feeds`).
    pub const SEQUENCE: &str = "sequence";

    /// Headers that must be present on every message.
    pub const REQUIRED: [&str; 9] = [
        MESSAGE_ID,
        SCHEMA_FQDN,
        SCHEMA_VERSION,
        CONTENT_TYPE,
        PRODUCED_AT,
        PRODUCER,
        SOURCE,
        RUN_ID,
        PARTITION_KEY,
    ];
}

use names::*;

/// `application/x-protobuf`.
pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";
/// `application/json` (diagnostics).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Schema used when a publisher gives none: opaque bytes.
pub const RAW_BYTES_SCHEMA: &str = "ampy.raw.v1.Bytes";
/// Largest value of one header on publish, in bytes: 64 KiB.
pub const MAX_HEADER_VALUE_BYTES: usize = 64 * 1024;
/// Largest sum of every header's name and value on publish, in bytes: 256 KiB.
pub const MAX_HEADERS_BYTES: usize = 256 * 1024;

/// The header map of an envelope: wire name → string value, with a typed core.
///
/// The contract's known headers live in fixed slots and extension headers in a small sorted
/// side list; values are UTF-8 text held in shared [`Bytes`] (a slice of the buffer a message
/// arrived in, a static string, or an owned string), so cloning costs reference counts, not
/// copies. `message_id`, `produced_at` and `traceparent` are parsed once when they are set (see
/// [`Headers::message_uuid`], [`Headers::produced_at_micros`], [`Headers::trace_ids`]) and
/// never again. Unknown headers are carried through untouched; iteration is in name order.
///
/// ```
/// use ampybus::Headers;
/// let h = Headers::for_publish("ampy.bars.v1.BarBatch", "yfinance-go@ingest-1", "yfinance-go", "XNAS.AAPL");
/// assert_eq!(h.schema_fqdn(), Some("ampy.bars.v1.BarBatch"));
/// assert_eq!(h.get("schema_version"), Some("1.0.0"));
/// let topic = ampybus::Topic::parse("ampy.prod.bars.v1.XNAS.AAPL").unwrap();
/// h.validate_for_publish(&topic).unwrap();
/// ```
#[derive(Clone, Default)]
pub struct Headers {
    /// Behind one pointer so that a `Headers` (and every envelope, delivery and message
    /// holding one) moves as a pointer, and shared by reference count so that a clone (e.g.
    /// the owned message a [`crate::runtime::handler_fn`] closure receives) copies nothing:
    /// a change to a shared map copies it first. `None` while empty (no allocation).
    inner: Option<std::sync::Arc<Inner>>,
}

/// The map's storage. Every value is a span of one of three places: `base` (the buffer the
/// message arrived in, shared), `arena` (small values written here: generated ids and times,
/// the text of binary ids, values set one by one) or one of `extra` (larger values set one
/// by one). Decoding a message therefore copies and counts no per-header references.
struct Inner {
    base: Bytes,
    extra: Vec<Bytes>,
    arena_len: u16,
    arena: [u8; ARENA],
    known: Slots,
    /// Extension headers (name, value), sorted by name, names unique.
    ext: Vec<(Span, Span)>,
    parsed: Parsed,
    /// The text of values that arrived in binary form, written on first read.
    lazy: LazyText,
    /// Known to pass the consume-side rules as it is ([`Headers::decode_generated`] found
    /// so); any change through [`Headers::m`] clears it.
    consume_ready: bool,
}

/// The text forms of `message_id`, `produced_at` and `traceparent` when they arrived in
/// binary (compact) form: written from [`Parsed`] the first time a span of them is read, so
/// a consumer that never reads the text never formats it.
#[derive(Clone)]
struct LazyText {
    id: std::sync::OnceLock<[u8; 36]>,
    time: std::sync::OnceLock<[u8; 27]>,
    trace: std::sync::OnceLock<[u8; 55]>,
}

/// Bytes of small values a map holds inline.
const ARENA: usize = 384;

/// Buffers of values set one by one a map keeps before it copies its live values together.
const MAX_EXTRA: usize = 32;

/// Where a value's bytes are: `buf` 0 absent, 1 `base`, 2 `arena`, 3/4/5 the lazily written
/// text of the binary id/time/trace context, 6 ([`DEFAULTS`]) the shared text of the publish
/// defaults, [`EXTRA0`] + n `extra[n]`.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    buf: u16,
    start: u32,
    len: u32,
}

/// The `buf` numbers of the lazily written texts, and the first of `extra`.
const LAZY_ID: u16 = 3;
const LAZY_TIME: u16 = 4;
const LAZY_TRACE: u16 = 5;
/// The `buf` of a default [`Headers::fill_publish_defaults`] wrote (see [`defaults_text`]).
const DEFAULTS: u16 = 6;
const EXTRA0: u16 = 7;

/// The text of the values [`Headers::fill_publish_defaults`] writes when they are missing,
/// one buffer for the process: `schema_version` `1.0.0`, `content_type` protobuf and `run_id`
/// the process run id, at the spans [`DEFAULT_SPANS`] gives. A map points at it instead of
/// copying it; a span of it stands only in the slot it was written to, so it is known to pass
/// that slot's publish rules and is not checked again.
fn defaults_text() -> &'static [u8] {
    static TEXT: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        let mut t = Vec::new();
        t.extend_from_slice(b"1.0.0");
        t.extend_from_slice(CONTENT_TYPE_PROTOBUF.as_bytes());
        t.extend_from_slice(ids::process_run_id().as_bytes());
        t.into_boxed_slice()
    })
}

/// The compact forms (tag, length, text; see [`Headers::encode_compact`]) of the defaults
/// `content_type`, `run_id` and `schema_version`, made once for the process: a map of the
/// [`Inner::generated_shape`] copies them as they are.
fn defaults_compact() -> &'static [Box<[u8]>; 3] {
    static FORMS: std::sync::OnceLock<[Box<[u8]>; 3]> = std::sync::OnceLock::new();
    FORMS.get_or_init(|| {
        let [version, content_type, run_id] = default_spans();
        let form = |slot: usize, sp: Span| {
            let text = &defaults_text()[sp.start as usize..(sp.start + sp.len) as usize];
            let mut b = Vec::with_capacity(6 + text.len());
            let mut w = Cursor {
                buf: b.spare_capacity_mut(),
                at: 0,
            };
            w.byte(slot as u8);
            w.text(text);
            let n = w.at;
            // SAFETY: the cursor wrote the first `n` bytes of the spare capacity, in order.
            unsafe { b.set_len(n) };
            b.into_boxed_slice()
        };
        [
            form(K_CONTENT_TYPE, content_type),
            form(K_RUN_ID, run_id),
            form(K_SCHEMA_VERSION, version),
        ]
    })
}

/// The spans of `schema_version`, `content_type` and `run_id` in [`defaults_text`].
fn default_spans() -> [Span; 3] {
    let ct = CONTENT_TYPE_PROTOBUF.len() as u32;
    let run = defaults_text().len() as u32 - 5 - ct;
    [
        Span {
            buf: DEFAULTS,
            start: 0,
            len: 5,
        },
        Span {
            buf: DEFAULTS,
            start: 5,
            len: ct,
        },
        Span {
            buf: DEFAULTS,
            start: 5 + ct,
            len: run,
        },
    ]
}

impl Span {
    /// All of a lazily written text.
    fn lazy(buf: u16, len: u32) -> Span {
        Span { buf, start: 0, len }
    }

    const NONE: Span = Span {
        buf: 0,
        start: 0,
        len: 0,
    };

    fn is_some(self) -> bool {
        self.buf != 0
    }

    /// A text written on first read from a value that arrived in binary form.
    fn is_lazy(self) -> bool {
        (LAZY_ID..=LAZY_TRACE).contains(&self.buf)
    }

    /// A publish default of the shared [`defaults_text`]: valid for its slot by construction.
    fn is_default(self) -> bool {
        self.buf == DEFAULTS
    }

    fn sub(self, from: u32, len: u32) -> Span {
        Span {
            buf: self.buf,
            start: self.start + from,
            len,
        }
    }
}

/// The spans of the known headers by slot, and which of them are present (bit `i` for slot
/// `i`), so that a pass over the headers visits only those. Written only through
/// [`Slots::set`], which keeps the two in step.
#[derive(Clone, Copy)]
struct Slots {
    spans: [Span; KNOWN_COUNT],
    present: u32,
}

impl Slots {
    const EMPTY: Slots = Slots {
        spans: [Span::NONE; KNOWN_COUNT],
        present: 0,
    };

    #[inline]
    fn set(&mut self, i: usize, v: Span) {
        self.spans[i] = v;
        if v.is_some() {
            self.present |= 1 << i;
        } else {
            self.present &= !(1 << i);
        }
    }

    /// The present slots and their spans, in slot order.
    #[inline]
    fn present(&self) -> impl Iterator<Item = (usize, Span)> + '_ {
        let mut bits = self.present;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some((i, self.spans[i]))
        })
    }

    fn iter(&self) -> std::slice::Iter<'_, Span> {
        self.spans.iter()
    }
}

impl std::ops::Index<usize> for Slots {
    type Output = Span;

    #[inline(always)]
    fn index(&self, i: usize) -> &Span {
        &self.spans[i]
    }
}

/// What an empty map reads as.
static EMPTY: Inner = Inner::new();

/// The storage of header maps that were dropped, kept for the next map instead of freed: a
/// consumer decodes one map per message on the fetching thread and drops it on a worker's,
/// so the allocator's per-thread caches overflow and every map cost a trip through its
/// shared arenas (≈ 500 instructions per message, callgrind). Each thread keeps up to
/// [`pool::LOCAL`] cleared maps and moves half of them to (or takes a handful from) one
/// shared list under one lock per [`pool::MOVE`] maps. A map goes back only when its last
/// holder drops it, emptied (its buffers released at once), so nothing read through one map
/// is ever seen through another.
mod pool {
    use super::Inner;
    use std::cell::RefCell;
    use std::sync::{Arc, Mutex};

    /// Cleared maps one thread keeps.
    pub(super) const LOCAL: usize = 64;
    /// Maps moved between a thread and the shared list at a time.
    pub(super) const MOVE: usize = 32;
    /// Cleared maps the shared list keeps (≈ 1 KB each).
    const SHARED: usize = 2048;

    static SHARED_LIST: Mutex<Vec<Arc<Inner>>> = Mutex::new(Vec::new());

    thread_local! {
        static MINE: RefCell<Vec<Arc<Inner>>> = const { RefCell::new(Vec::new()) };
    }

    /// A cleared map: this thread's, else a few from the shared list, else a new one.
    pub(super) fn take() -> Arc<Inner> {
        let got = MINE
            .try_with(|m| {
                let mut m = m.try_borrow_mut().ok()?;
                if m.is_empty() {
                    let mut shared = SHARED_LIST.lock().unwrap_or_else(|p| p.into_inner());
                    let from = shared.len().saturating_sub(MOVE);
                    m.extend(shared.drain(from..));
                }
                m.pop()
            })
            .ok()
            .flatten();
        got.unwrap_or_else(|| Arc::new(Inner::new()))
    }

    /// Keeps `inner` for a later map when this was its last holder; otherwise (or when the
    /// lists are full, or the thread is ending) it is dropped as usual.
    pub(super) fn give(mut inner: Arc<Inner>) {
        let Some(m) = Arc::get_mut(&mut inner) else {
            return;
        };
        m.clear();
        let _ = MINE.try_with(|mine| {
            let Ok(mut mine) = mine.try_borrow_mut() else {
                return;
            };
            if mine.len() >= LOCAL {
                let from = mine.len() - MOVE;
                let mut shared = SHARED_LIST.lock().unwrap_or_else(|p| p.into_inner());
                let room = SHARED.saturating_sub(shared.len());
                let moved = mine.drain(from..);
                shared.extend(moved.take(room));
            }
            mine.push(inner);
        });
    }
}

impl Drop for Headers {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            pool::give(inner);
        }
    }
}

impl Clone for Inner {
    fn clone(&self) -> Inner {
        let mut copy = Inner::new();
        copy.clone_from(self);
        copy
    }

    /// In place, into a map of the pool: copies only the used part of the arena and keeps the
    /// side lists' capacity.
    fn clone_from(&mut self, src: &Inner) {
        self.base = src.base.clone();
        self.extra.clone_from(&src.extra);
        let n = usize::from(src.arena_len);
        self.arena_len = src.arena_len;
        self.arena[..n].copy_from_slice(&src.arena[..n]);
        self.known = src.known;
        self.ext.clone_from(&src.ext);
        self.parsed = src.parsed;
        self.lazy.clone_from(&src.lazy);
        self.consume_ready = src.consume_ready;
    }
}

impl Inner {
    /// Empties the map for reuse: the buffers it points into are released; the arena's bytes
    /// stay as they are (nothing reads past `arena_len`), the side lists keep their capacity.
    fn clear(&mut self) {
        self.base = Bytes::new();
        self.extra.clear();
        self.arena_len = 0;
        self.known = Slots::EMPTY;
        self.ext.clear();
        self.parsed = Parsed {
            id: None,
            produced_us: None,
            trace: None,
        };
        self.consume_ready = false;
        // Cells never written (the usual publish) are empty already.
        if self.lazy.id.get().is_some() {
            self.lazy.id = std::sync::OnceLock::new();
        }
        if self.lazy.time.get().is_some() {
            self.lazy.time = std::sync::OnceLock::new();
        }
        if self.lazy.trace.get().is_some() {
            self.lazy.trace = std::sync::OnceLock::new();
        }
    }

    const fn new() -> Inner {
        Inner {
            base: Bytes::new(),
            extra: Vec::new(),
            arena_len: 0,
            arena: [0; ARENA],
            known: Slots::EMPTY,
            ext: Vec::new(),
            parsed: Parsed {
                id: None,
                produced_us: None,
                trace: None,
            },
            lazy: LazyText {
                id: std::sync::OnceLock::new(),
                time: std::sync::OnceLock::new(),
                trace: std::sync::OnceLock::new(),
            },
            consume_ready: false,
        }
    }

    /// The text of a span. The two places nearly every value is (`base` on consume, the
    /// arena on publish) are read inline; the others through [`Inner::buffer`].
    #[inline(always)]
    fn str(&self, s: Span) -> &str {
        let b: &[u8] = match s.buf {
            1 => &self.base,
            2 => &self.arena,
            _ => self.buffer(s.buf),
        };
        let b = &b[s.start as usize..(s.start + s.len) as usize];
        // SAFETY: a span only ever covers bytes copied from a `&str`, or bytes of `base` or
        // `extra` that passed `std::str::from_utf8` before the span was made; neither
        // buffer is written after that.
        unsafe { std::str::from_utf8_unchecked(b) }
    }

    /// The buffer `buf` names, other than `base` and the arena (see [`Span`]).
    #[inline(never)]
    fn buffer(&self, buf: u16) -> &[u8] {
        match buf {
            0 => &[],
            1 => &self.base,
            2 => &self.arena,
            LAZY_ID..=LAZY_TRACE => self.lazy_bytes(buf),
            DEFAULTS => defaults_text(),
            n => &self.extra[usize::from(n - EXTRA0)],
        }
    }

    /// The lazily written text of a binary id (3), time (4) or trace context (5).
    #[cold]
    #[inline(never)]
    fn lazy_bytes(&self, buf: u16) -> &[u8] {
        match buf {
            LAZY_ID => self.lazy.id.get_or_init(|| {
                let mut t = [0u8; 36];
                ids::uuid_text(&self.parsed.id.unwrap_or_default(), &mut t);
                t
            }),
            LAZY_TIME => self.lazy.time.get_or_init(|| {
                let mut t = [0u8; 27];
                ids::write_canonical_time(self.parsed.produced_us.unwrap_or_default(), &mut t);
                t
            }),
            _ => self.lazy.trace.get_or_init(|| {
                self.parsed
                    .trace
                    .map(|t| t.traceparent_text())
                    .unwrap_or([b'0'; 55])
            }),
        }
    }

    fn opt(&self, s: Span) -> Option<&str> {
        s.is_some().then(|| self.str(s))
    }

    /// Room for `n` bytes in the arena: their span, or `None` when full.
    fn reserve(&mut self, n: usize) -> Option<Span> {
        let at = usize::from(self.arena_len);
        if n > ARENA - at {
            return None;
        }
        self.arena_len = (at + n) as u16;
        Some(Span {
            buf: 2,
            start: at as u32,
            len: n as u32,
        })
    }

    /// Copies text in (the arena when it fits, else a buffer of its own).
    fn store(&mut self, s: &str) -> Span {
        match self.reserve(s.len()) {
            Some(sp) => {
                let at = sp.start as usize;
                self.arena[at..at + s.len()].copy_from_slice(s.as_bytes());
                sp
            }
            None => self.store_bytes(Bytes::copy_from_slice(s.as_bytes())),
        }
    }

    /// Keeps a buffer whose bytes are known to be UTF-8; the span covers all of it.
    fn store_bytes(&mut self, b: Bytes) -> Span {
        let len = b.len() as u32;
        let buf = if self.base.is_empty() && self.extra.is_empty() {
            self.base = b;
            1
        } else {
            self.extra.push(b);
            self.extra.len() as u16 - 1 + EXTRA0
        };
        Span { buf, start: 0, len }
    }

    /// Values overwritten again and again leave their old bytes behind: once `extra` holds
    /// [`MAX_EXTRA`] buffers, copies what is live into one buffer, so a map set in a loop
    /// stays bounded. Called only where no span is held outside the map (at the start of an
    /// operation that stores), since it moves every value.
    fn tidy(&mut self) {
        if self.extra.len() >= MAX_EXTRA {
            self.rebuild();
        }
    }

    /// Copies every live value into one new `base` and empties the arena and `extra`.
    fn rebuild(&mut self) {
        let mut buf = Vec::new();
        let copy = |buf: &mut Vec<u8>, s: &str| {
            let start = buf.len() as u32;
            buf.extend_from_slice(s.as_bytes());
            Span {
                buf: 1,
                start,
                len: s.len() as u32,
            }
        };
        let mut known = Slots::EMPTY;
        for (i, sp) in self.known.present() {
            known.set(i, copy(&mut buf, self.str(sp)));
        }
        let ext: Vec<(Span, Span)> = self
            .ext
            .iter()
            .map(|(k, v)| (copy(&mut buf, self.str(*k)), copy(&mut buf, self.str(*v))))
            .collect();
        self.base = Bytes::from(buf);
        self.extra.clear();
        self.arena_len = 0;
        self.known = known;
        self.ext = ext;
    }

    /// Makes `v` the value of `name` (a known slot, or an extension header added in order).
    fn link(&mut self, name: &str, v: Span) {
        match known_index(name) {
            Some(i) => self.put(i, v),
            None => match self.ext_position(name) {
                Ok(i) => self.ext[i].1 = v,
                Err(i) => {
                    let n = self.store(name);
                    self.ext.insert(i, (n, v));
                }
            },
        }
    }

    /// Before the parsed value behind lazy cell `buf` changes: writes the cell's text if a
    /// span still shows it, so that span keeps reading what it read before.
    fn freeze(&self, buf: u16) {
        if self.known.iter().any(|s| s.buf == buf) {
            let _ = self.lazy_bytes(buf);
        }
    }

    /// The lazy cell that slot `i`'s parsed value feeds, if any.
    fn lazy_cell(i: usize) -> Option<u16> {
        match i {
            K_MESSAGE_ID => Some(LAZY_ID),
            K_PRODUCED_AT => Some(LAZY_TIME),
            K_TRACEPARENT => Some(LAZY_TRACE),
            _ => None,
        }
    }

    /// Stores a known header's span and parses what the typed core holds.
    fn put(&mut self, i: usize, v: Span) {
        if let Some(cell) = Inner::lazy_cell(i) {
            self.freeze(cell);
        }
        let text = self.str(v);
        match i {
            K_MESSAGE_ID => self.parsed.id = canonical_uuid(text),
            K_PRODUCED_AT => self.parsed.produced_us = ids::canonical_time_micros(text),
            K_TRACEPARENT => self.parsed.trace = TraceIds::parse(text),
            _ => {}
        }
        self.known.set(i, v);
    }

    fn take(&mut self, i: usize) -> Span {
        if let Some(cell) = Inner::lazy_cell(i) {
            self.freeze(cell);
        }
        match i {
            K_MESSAGE_ID => self.parsed.id = None,
            K_PRODUCED_AT => self.parsed.produced_us = None,
            K_TRACEPARENT => self.parsed.trace = None,
            _ => {}
        }
        let old = self.known[i];
        self.known.set(i, Span::NONE);
        old
    }

    fn ext_position(&self, name: &str) -> std::result::Result<usize, usize> {
        self.ext.binary_search_by(|(n, _)| self.str(*n).cmp(name))
    }

    /// Whether the map is what [`Headers::for_publish`] makes, its generated values as they
    /// were generated: exactly the [`PUBLISH_SHAPE`] headers; `message_id`, `produced_at`
    /// and `traceparent` held parsed (their text not yet written), `trace_id` and `span_id`
    /// the parts of that traceparent; `schema_version`, `content_type` and `run_id` the
    /// shared defaults. The rules hold for all of these by construction and their compact
    /// forms are fixed, so publishing such a map reads only the caller's four values (see
    /// [`Headers::publish_shape_valid`] and [`Inner::encode_generated`]).
    #[inline]
    fn generated_shape(&self) -> bool {
        let k = &self.known;
        let tp = k[K_TRACEPARENT];
        k.present == PUBLISH_SHAPE
            && self.ext.is_empty()
            && k[K_MESSAGE_ID].buf == LAZY_ID
            && self.parsed.id.is_some()
            && k[K_PRODUCED_AT].buf == LAZY_TIME
            && self.parsed.produced_us.is_some()
            && tp.buf == LAZY_TRACE
            && self.parsed.trace.is_some()
            && k[K_TRACE_ID] == tp.sub(3, 32)
            && k[K_SPAN_ID] == tp.sub(36, 16)
            && k[K_SCHEMA_VERSION].is_default()
            && k[K_CONTENT_TYPE].is_default()
            && k[K_RUN_ID].is_default()
    }

    /// [`Headers::encode_compact`] of a map of the [`Inner::generated_shape`]: the same bytes
    /// as the general loop writes (in slot order), written in one straight pass.
    fn encode_generated(&self, out: &mut Vec<u8>) {
        let k = &self.known;
        const TEXT: [usize; 7] = [
            K_CONTENT_TYPE,
            K_PARTITION_KEY,
            K_PRODUCER,
            K_RUN_ID,
            K_SCHEMA_FQDN,
            K_SCHEMA_VERSION,
            K_SOURCE,
        ];
        // The format byte, the binary id (17), time (9) and trace context (26), the two
        // one-byte trace/span id tags, and per text value a tag and a length of at most 5.
        let mut room = 1 + 17 + 9 + 26 + 2;
        for i in TEXT {
            room += 6 + k[i].len as usize;
        }
        out.reserve(room);
        let mut w = Cursor {
            buf: &mut out.spare_capacity_mut()[..room],
            at: 0,
        };
        #[inline(always)]
        fn text(w: &mut Cursor<'_>, inner: &Inner, i: usize) {
            w.byte(i as u8);
            w.text(inner.str(inner.known[i]).as_bytes());
        }
        let [content_type, run_id, version] = defaults_compact();
        let t = self.parsed.trace.unwrap_or_else(TraceIds::new_root);
        w.byte(COMPACT_V1);
        w.bytes(content_type);
        w.byte(TAG_ID_BIN);
        w.bytes(&self.parsed.id.unwrap_or_default());
        text(&mut w, self, K_PARTITION_KEY);
        w.byte(TAG_TIME_BIN);
        w.bytes(&self.parsed.produced_us.unwrap_or_default().to_le_bytes());
        text(&mut w, self, K_PRODUCER);
        w.bytes(run_id);
        text(&mut w, self, K_SCHEMA_FQDN);
        w.bytes(version);
        text(&mut w, self, K_SOURCE);
        w.byte(TAG_SPAN_ID_SAME);
        w.byte(TAG_TRACE_ID_SAME);
        w.byte(TAG_TRACE_BIN);
        w.bytes(&t.trace_id);
        w.bytes(&t.span_id);
        w.byte(t.flags);
        let n = w.at;
        // SAFETY: as in `encode_compact`: the cursor wrote the first `n` bytes of the spare
        // capacity, in order from the start.
        unsafe { out.set_len(out.len() + n) };
    }
}

/// What was parsed when the text was set; `None` where the text is absent or not in its
/// canonical form (the rules then read the text).
#[derive(Clone, Copy)]
struct Parsed {
    /// `message_id` when it is a UUID written lowercase and hyphenated.
    id: Option<[u8; 16]>,
    /// `produced_at` when it is in the canonical form.
    produced_us: Option<i64>,
    /// `traceparent` when it is valid.
    trace: Option<TraceIds>,
}

/// Number of headers the contract names.
const KNOWN_COUNT: usize = 26;

/// The contract's headers in name order (the slot order of [`Headers`]).
const KNOWN: [&str; KNOWN_COUNT] = [
    BLOB_HASH,
    BLOB_REF,
    BLOB_SIZE,
    CONTENT_ENCODING,
    CONTENT_TYPE,
    DEDUPE_KEY,
    DLQ_AT,
    DLQ_CONSUMER,
    DLQ_REASON,
    MESSAGE_ID,
    ORIGINAL_TOPIC,
    PARTITION_KEY,
    PAYLOAD_HASH,
    PRODUCED_AT,
    PRODUCER,
    REDRIVE_OF,
    REPLAY_REQUEST_ID,
    RETRY_COUNT,
    RUN_ID,
    SCHEMA_FQDN,
    SCHEMA_HASH,
    SCHEMA_VERSION,
    SOURCE,
    SPAN_ID,
    TRACE_ID,
    TRACEPARENT,
];

/// The lengths of the names in [`KNOWN`].
const KNOWN_LEN: [u8; KNOWN_COUNT] = {
    let mut t = [0u8; KNOWN_COUNT];
    let mut i = 0;
    while i < KNOWN_COUNT {
        t[i] = KNOWN[i].len() as u8;
        i += 1;
    }
    t
};

/// Slots of the known headers (indexes into [`KNOWN`]).
const K_BLOB_HASH: usize = 0;
const K_BLOB_REF: usize = 1;
const K_BLOB_SIZE: usize = 2;
const K_CONTENT_ENCODING: usize = 3;
const K_CONTENT_TYPE: usize = 4;
const K_DEDUPE_KEY: usize = 5;
const K_DLQ_AT: usize = 6;
const K_DLQ_CONSUMER: usize = 7;
const K_DLQ_REASON: usize = 8;
const K_MESSAGE_ID: usize = 9;
const K_ORIGINAL_TOPIC: usize = 10;
const K_PARTITION_KEY: usize = 11;
const K_PAYLOAD_HASH: usize = 12;
const K_PRODUCED_AT: usize = 13;
const K_PRODUCER: usize = 14;
const K_REDRIVE_OF: usize = 15;
const K_REPLAY_REQUEST_ID: usize = 16;
const K_RETRY_COUNT: usize = 17;
const K_RUN_ID: usize = 18;
const K_SCHEMA_FQDN: usize = 19;
const K_SCHEMA_HASH: usize = 20;
const K_SCHEMA_VERSION: usize = 21;
const K_SOURCE: usize = 22;
const K_SPAN_ID: usize = 23;
const K_TRACE_ID: usize = 24;
const K_TRACEPARENT: usize = 25;

/// The slots of [`REQUIRED`], in its order.
const REQUIRED_SLOTS: [usize; 9] = [
    K_MESSAGE_ID,
    K_SCHEMA_FQDN,
    K_SCHEMA_VERSION,
    K_CONTENT_TYPE,
    K_PRODUCED_AT,
    K_PRODUCER,
    K_SOURCE,
    K_RUN_ID,
    K_PARTITION_KEY,
];

/// The slots of the headers whose rules [`Headers::validate_optional`] checks when present.
const OPTIONAL_SLOTS: [usize; 13] = [
    K_DEDUPE_KEY,
    K_RETRY_COUNT,
    K_DLQ_REASON,
    K_SCHEMA_HASH,
    K_BLOB_HASH,
    K_PAYLOAD_HASH,
    K_BLOB_REF,
    K_BLOB_SIZE,
    K_ORIGINAL_TOPIC,
    K_DLQ_AT,
    K_DLQ_CONSUMER,
    K_REPLAY_REQUEST_ID,
    K_REDRIVE_OF,
];

/// [`REQUIRED_SLOTS`] as a mask of [`Slots::present`] bits.
const REQUIRED_MASK: u32 = mask_of(&REQUIRED_SLOTS);

/// [`OPTIONAL_SLOTS`] as a mask of [`Slots::present`] bits.
const OPTIONAL_MASK: u32 = mask_of(&OPTIONAL_SLOTS);

/// The known headers [`Headers::for_publish`] fills, and no others: what nearly every
/// published message carries (see [`Inner::generated_shape`]).
const PUBLISH_SHAPE: u32 = mask_of(&[
    K_CONTENT_TYPE,
    K_MESSAGE_ID,
    K_PARTITION_KEY,
    K_PRODUCED_AT,
    K_PRODUCER,
    K_RUN_ID,
    K_SCHEMA_FQDN,
    K_SCHEMA_VERSION,
    K_SOURCE,
    K_SPAN_ID,
    K_TRACE_ID,
    K_TRACEPARENT,
]);

const fn mask_of(slots: &[usize]) -> u32 {
    let mut m = 0;
    let mut i = 0;
    while i < slots.len() {
        m |= 1 << slots[i];
        i += 1;
    }
    m
}

/// The slot of a known header name.
fn known_index(name: &str) -> Option<usize> {
    Some(match name {
        BLOB_HASH => 0,
        BLOB_REF => 1,
        BLOB_SIZE => 2,
        CONTENT_ENCODING => 3,
        CONTENT_TYPE => 4,
        DEDUPE_KEY => 5,
        DLQ_AT => 6,
        DLQ_CONSUMER => 7,
        DLQ_REASON => 8,
        MESSAGE_ID => 9,
        ORIGINAL_TOPIC => 10,
        PARTITION_KEY => 11,
        PAYLOAD_HASH => 12,
        PRODUCED_AT => 13,
        PRODUCER => 14,
        REDRIVE_OF => 15,
        REPLAY_REQUEST_ID => 16,
        RETRY_COUNT => 17,
        RUN_ID => 18,
        SCHEMA_FQDN => 19,
        SCHEMA_HASH => 20,
        SCHEMA_VERSION => 21,
        SOURCE => 22,
        SPAN_ID => 23,
        TRACE_ID => 24,
        TRACEPARENT => 25,
        _ => return None,
    })
}

/// A UUID written lowercase and hyphenated, as its 16 bytes.
pub(crate) fn canonical_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
        return None;
    }
    let mut hex = [0u8; 32];
    hex[..8].copy_from_slice(&b[..8]);
    hex[8..12].copy_from_slice(&b[9..13]);
    hex[12..16].copy_from_slice(&b[14..18]);
    hex[16..20].copy_from_slice(&b[19..23]);
    hex[20..].copy_from_slice(&b[24..]);
    let mut out = [0u8; 16];
    ids::unhex_lower(&hex, &mut out)?;
    Some(out)
}

macro_rules! getters {
    ($($fn:ident => $name:ident),* $(,)?) => {
        $(
            #[doc = concat!("The `", stringify!($fn), "` header, if present.")]
            pub fn $fn(&self) -> Option<&str> { self.slot($name) }
        )*
    };
}

impl Headers {
    fn i(&self) -> &Inner {
        self.inner.as_deref().unwrap_or(&EMPTY)
    }

    fn m(&mut self) -> &mut Inner {
        let inner = self.inner.get_or_insert_with(pool::take);
        // One holder (this one) cannot become two meanwhile; no `Weak` of a map is ever made.
        if std::sync::Arc::strong_count(inner) != 1 {
            // Shared (a clone of a common map about to get its own values): copy it into a
            // cleared map of the pool rather than into a fresh allocation.
            let mut own = pool::take();
            match std::sync::Arc::get_mut(&mut own) {
                Some(o) => o.clone_from(inner),
                None => own = std::sync::Arc::new(Inner::clone(inner)),
            }
            *inner = own;
        }
        let inner = std::sync::Arc::make_mut(inner);
        inner.consume_ready = false;
        inner
    }

    /// [`Headers::m`] for an operation that is about to store values: tidies first.
    fn m_store(&mut self) -> &mut Inner {
        let inner = self.m();
        inner.tidy();
        inner
    }

    /// A known header's value by slot.
    #[inline(always)]
    fn slot(&self, i: usize) -> Option<&str> {
        let inner = self.inner.as_deref()?;
        inner.opt(inner.known[i])
    }

    /// An empty header map.
    ///
    /// ```
    /// assert!(ampybus::Headers::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Headers::default()
    }

    /// Headers for a new publish: fills `message_id` (UUIDv7), `produced_at` (now),
    /// `schema_version` `1.0.0`, `content_type` protobuf, `run_id` (the process run id),
    /// and a fresh `traceparent` with `trace_id`/`span_id` for older peers.
    ///
    /// ```
    /// let h = ampybus::Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
    /// assert_eq!(h.partition_key(), Some("co_1"));
    /// assert!(h.traceparent().is_some());
    /// ```
    pub fn for_publish(
        schema_fqdn: &str,
        producer: &str,
        source: &str,
        partition_key: &str,
    ) -> Self {
        let mut h = Headers::new();
        let inner = h.m_store();
        for (i, v) in [
            (K_SCHEMA_FQDN, schema_fqdn),
            (K_PRODUCER, producer),
            (K_SOURCE, source),
            (K_PARTITION_KEY, partition_key),
        ] {
            // None of these four is held parsed: the span is all there is to store.
            let sp = inner.store(v);
            inner.known.set(i, sp);
        }
        inner.fill_publish_defaults();
        h
    }

    /// Fills what a publish needs and the caller left out: `message_id`, `produced_at`,
    /// `schema_version`, `content_type`, `run_id`, `traceparent` (from `trace_id` when only
    /// that is given), `trace_id`/`span_id`. Existing values are kept. The generated values
    /// share one buffer.
    ///
    /// ```
    /// let mut h = ampybus::Headers::new();
    /// h.fill_publish_defaults();
    /// assert!(h.message_id().is_some() && h.produced_at().is_some() && h.traceparent().is_some());
    /// ```
    pub fn fill_publish_defaults(&mut self) {
        let given_trace = self.i().parsed.trace.is_some();
        let missing = |i: usize| !self.i().known[i].is_some();
        if !missing(K_TRACEPARENT)
            && !missing(K_MESSAGE_ID)
            && !missing(K_PRODUCED_AT)
            && !missing(K_SCHEMA_VERSION)
            && !missing(K_CONTENT_TYPE)
            && !missing(K_RUN_ID)
            && (!given_trace || (!missing(K_TRACE_ID) && !missing(K_SPAN_ID)))
        {
            // Filled already (e.g. by `for_publish`): nothing to write, no copy of a shared map.
            return;
        }
        self.m_store().fill_publish_defaults();
    }
}

impl Inner {
    /// [`Headers::fill_publish_defaults`] on the map's storage (taken and tidied already).
    fn fill_publish_defaults(&mut self) {
        let given_trace = self.parsed.trace.is_some();
        // One generator handle and one clock reading for every value made here.
        let mut rng = ids::IdRng;
        let trace = if self.known[K_TRACEPARENT].is_some() {
            None
        } else {
            Some(
                self.opt(self.known[K_TRACE_ID])
                    .and_then(|t| TraceContext::from_ids(t, self.opt(self.known[K_SPAN_ID])))
                    .and_then(|tc| TraceIds::parse(&tc.to_traceparent()))
                    .unwrap_or_else(|| TraceIds::new_root_from(&mut rng)),
            )
        };
        let now_us = ids::now_micros();
        let h = self;
        // Constant defaults point at the process's one copy of their text.
        let [version, content_type, run_id] = default_spans();
        if !h.known[K_SCHEMA_VERSION].is_some() {
            h.known.set(K_SCHEMA_VERSION, version);
        }
        if !h.known[K_CONTENT_TYPE].is_some() {
            h.known.set(K_CONTENT_TYPE, content_type);
        }
        if !h.known[K_RUN_ID].is_some() {
            h.known.set(K_RUN_ID, run_id);
        }
        // Generated values are held parsed; their text is written when first read (or, when
        // the map's lazy cell is taken already, in place now). No allocation either way.
        if !h.known[K_MESSAGE_ID].is_some() {
            let id = ids::new_message_uuid_at(now_us, &mut rng);
            let v = if h.lazy.id.get().is_none() {
                Span::lazy(LAZY_ID, 36)
            } else {
                let mut t = [0u8; 36];
                ids::uuid_text(id.as_bytes(), &mut t);
                h.store(std::str::from_utf8(&t).unwrap_or_default())
            };
            h.known.set(K_MESSAGE_ID, v);
            h.parsed.id = Some(*id.as_bytes());
        }
        if !h.known[K_PRODUCED_AT].is_some() {
            let us = now_us;
            let v = if h.lazy.time.get().is_none() {
                Span::lazy(LAZY_TIME, 27)
            } else {
                let mut t = [0u8; 27];
                ids::write_canonical_time(us, &mut t);
                h.store(std::str::from_utf8(&t).unwrap_or_default())
            };
            h.known.set(K_PRODUCED_AT, v);
            h.parsed.produced_us = Some(us);
        }
        if let Some(t) = trace {
            let tp = if h.lazy.trace.get().is_none() {
                Span::lazy(LAZY_TRACE, 55)
            } else {
                let text = t.traceparent_text();
                h.store(std::str::from_utf8(&text).unwrap_or_default())
            };
            h.known.set(K_TRACEPARENT, tp);
            h.parsed.trace = Some(t);
            h.known.set(K_TRACE_ID, tp.sub(3, 32));
            h.known.set(K_SPAN_ID, tp.sub(36, 16));
        } else if given_trace {
            // A valid traceparent was given: fill the older headers from it.
            let tp = h.known[K_TRACEPARENT];
            if !h.known[K_TRACE_ID].is_some() {
                h.known.set(K_TRACE_ID, tp.sub(3, 32));
            }
            if !h.known[K_SPAN_ID].is_some() {
                h.known.set(K_SPAN_ID, tp.sub(36, 16));
            }
        }
    }
}

impl Headers {
    /// Sets `traceparent`, `trace_id` and `span_id` from a trace context.
    ///
    /// ```
    /// let mut h = ampybus::Headers::new();
    /// let tc = ampybus::ids::TraceContext::new_root();
    /// h.set_trace_context(&tc);
    /// assert_eq!(h.trace_context(), Some(tc));
    /// ```
    pub fn set_trace_context(&mut self, tc: &TraceContext) {
        self.set(TRACEPARENT, tc.to_traceparent());
        self.set(TRACE_ID, tc.trace_id.clone());
        self.set(SPAN_ID, tc.span_id.clone());
    }

    /// The trace context: from `traceparent`, else from `trace_id`/`span_id`; `None` when
    /// absent, malformed or all-zero.
    ///
    /// ```
    /// let mut h = ampybus::Headers::new();
    /// h.set("trace_id", "00000000000000000000000000000000");
    /// assert!(h.trace_context().is_none());
    /// ```
    pub fn trace_context(&self) -> Option<TraceContext> {
        if let Some(t) = self.i().parsed.trace {
            return Some(t.to_context());
        }
        TraceContext::from_ids(self.slot(K_TRACE_ID)?, self.slot(K_SPAN_ID))
    }

    /// The `traceparent` as numbers, when it is present and valid (parsed when it was set).
    ///
    /// ```
    /// let h = ampybus::Headers::new()
    ///     .with("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    /// assert_eq!(h.trace_ids().unwrap().flags, 1);
    /// assert!(ampybus::Headers::new().with("traceparent", "nope").trace_ids().is_none());
    /// ```
    pub fn trace_ids(&self) -> Option<TraceIds> {
        self.i().parsed.trace
    }

    /// `message_id` as a UUID, when it is written lowercase and hyphenated (parsed when it
    /// was set).
    ///
    /// ```
    /// let h = ampybus::Headers::new().with("message_id", "018f5e2f-9b1c-76aa-8f7a-3b1d8f3ea0c2");
    /// assert_eq!(h.message_uuid().unwrap().get_version_num(), 7);
    /// ```
    pub fn message_uuid(&self) -> Option<uuid::Uuid> {
        self.i().parsed.id.map(uuid::Uuid::from_bytes)
    }

    /// `produced_at` in microseconds since the Unix epoch, when it is in the canonical form
    /// (parsed when it was set).
    ///
    /// ```
    /// let h = ampybus::Headers::new().with("produced_at", "1970-01-01T00:00:01.000000Z");
    /// assert_eq!(h.produced_at_micros(), Some(1_000_000));
    /// ```
    pub fn produced_at_micros(&self) -> Option<i64> {
        self.i().parsed.produced_us
    }

    /// A header value by wire name.
    pub fn get(&self, name: &str) -> Option<&str> {
        match known_index(name) {
            Some(i) => self.slot(i),
            None => {
                let inner = self.inner.as_deref()?;
                let at = inner.ext_position(name).ok()?;
                Some(inner.str(inner.ext[at].1))
            }
        }
    }

    fn put_str(&mut self, i: usize, v: &str) {
        let h = self.m_store();
        let sp = h.store(v);
        h.put(i, sp);
    }

    /// Sets a header, returning the previous value.
    pub fn set(&mut self, name: impl AsRef<str>, value: impl AsRef<str>) -> Option<String> {
        let name = name.as_ref();
        let prev = self.get(name).map(str::to_owned);
        let h = self.m_store();
        let v = h.store(value.as_ref());
        h.link(name, v);
        prev
    }

    /// Headers from `(name, value)` byte pairs as a broker client hands them over, copied
    /// into one buffer (one allocation for the whole map). Text that is not UTF-8 is taken
    /// lossily (the consume rules then judge it); a repeated name keeps its last value.
    ///
    /// ```
    /// let pairs = [(&b"partition_key"[..], &b"XNAS.AAPL"[..]), (b"x-desk", b"rates")];
    /// let h = ampybus::Headers::from_wire_pairs(pairs);
    /// assert_eq!(h.partition_key(), Some("XNAS.AAPL"));
    /// assert_eq!(h.get("x-desk"), Some("rates"));
    /// ```
    pub fn from_wire_pairs<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Headers {
        const INLINE: usize = 40;
        let mut buf: Vec<u8> = Vec::with_capacity(640);
        let mut spans = [(0u32, 0u32, 0u32); INLINE];
        let mut more: Vec<(u32, u32, u32)> = Vec::new();
        let mut n = 0;
        let push = |buf: &mut Vec<u8>, b: &[u8]| {
            if b.is_ascii() || std::str::from_utf8(b).is_ok() {
                buf.extend_from_slice(b);
            } else {
                buf.extend_from_slice(String::from_utf8_lossy(b).as_bytes());
            }
        };
        for (k, v) in pairs {
            let start = buf.len() as u32;
            push(&mut buf, k);
            let mid = buf.len() as u32;
            push(&mut buf, v);
            let span = (start, mid, buf.len() as u32);
            if n < INLINE {
                spans[n] = span;
            } else {
                more.push(span);
            }
            n += 1;
        }
        let mut h = Headers::new();
        if n == 0 {
            return h;
        }
        let inner = h.m();
        // Every piece of `buf` was pushed as a whole UTF-8 string.
        inner.base = Bytes::from(buf);
        let at = |a: u32, b: u32| Span {
            buf: 1,
            start: a,
            len: b - a,
        };
        for &(start, mid, end) in spans[..n.min(INLINE)].iter().chain(&more) {
            let (name, value) = (at(start, mid), at(mid, end));
            match known_index(inner.str(name)) {
                Some(i) => inner.put(i, value),
                None => match inner.ext_position(inner.str(name)) {
                    Ok(i) => inner.ext[i].1 = value,
                    Err(i) => inner.ext.insert(i, (name, value)),
                },
            }
        }
        h
    }

    /// Sets a header from bytes as they arrived (shared, not copied): the value must be
    /// UTF-8, and the error names the header.
    ///
    /// ```
    /// let mut h = ampybus::Headers::new();
    /// h.insert_bytes("partition_key", bytes::Bytes::from_static(b"XNAS.AAPL")).unwrap();
    /// assert_eq!(h.partition_key(), Some("XNAS.AAPL"));
    /// let err = h.insert_bytes("source", bytes::Bytes::from_static(b"\xff")).unwrap_err();
    /// assert!(err.to_string().contains("`source`"), "{err}");
    /// ```
    pub fn insert_bytes(&mut self, name: &str, value: Bytes) -> Result<()> {
        std::str::from_utf8(&value).map_err(|_| Error::header(name, "value is not valid UTF-8"))?;
        let h = self.m_store();
        let v = h.store_bytes(value);
        h.link(name, v);
        Ok(())
    }

    /// Sets a header and returns `self` (builder style).
    ///
    /// ```
    /// let h = ampybus::Headers::new().with("dedupe_key", "co_1");
    /// assert_eq!(h.dedupe_key(), Some("co_1"));
    /// ```
    pub fn with(mut self, name: impl AsRef<str>, value: impl AsRef<str>) -> Self {
        self.set(name, value);
        self
    }

    /// Removes a header, returning its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let prev = self.get(name)?.to_owned();
        let h = self.m();
        match known_index(name) {
            Some(i) => {
                h.take(i);
            }
            None => {
                if let Ok(i) = h.ext_position(name) {
                    h.ext.remove(i);
                }
            }
        }
        Some(prev)
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.i().known.present.count_ones() as usize + self.i().ext.len()
    }

    /// True when there are no headers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Iterates `(name, value)` in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        Iter {
            h: self,
            k: 0,
            e: 0,
        }
    }

    /// The headers as an ordered map of owned strings.
    ///
    /// ```
    /// let h = ampybus::Headers::new().with("b", "2").with("a", "1");
    /// assert_eq!(h.to_map().keys().collect::<Vec<_>>(), ["a", "b"]);
    /// ```
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    getters! {
        message_id => K_MESSAGE_ID,
        schema_fqdn => K_SCHEMA_FQDN,
        schema_version => K_SCHEMA_VERSION,
        content_type => K_CONTENT_TYPE,
        content_encoding => K_CONTENT_ENCODING,
        produced_at => K_PRODUCED_AT,
        producer => K_PRODUCER,
        source => K_SOURCE,
        run_id => K_RUN_ID,
        traceparent => K_TRACEPARENT,
        partition_key => K_PARTITION_KEY,
        dedupe_key => K_DEDUPE_KEY,
        dlq_reason => K_DLQ_REASON,
        schema_hash => K_SCHEMA_HASH,
        blob_ref => K_BLOB_REF,
        blob_hash => K_BLOB_HASH,
        original_topic => K_ORIGINAL_TOPIC,
        dlq_consumer => K_DLQ_CONSUMER,
        payload_hash => K_PAYLOAD_HASH,
        replay_request_id => K_REPLAY_REQUEST_ID,
        redrive_of => K_REDRIVE_OF,
    }

    /// `retry_count` as a number (absent → 0; unparsable → `None`).
    ///
    /// ```
    /// let h = ampybus::Headers::new().with("retry_count", "2");
    /// assert_eq!(h.retry_count(), Some(2));
    /// assert_eq!(ampybus::Headers::new().retry_count(), Some(0));
    /// ```
    pub fn retry_count(&self) -> Option<u32> {
        match self.slot(K_RETRY_COUNT) {
            None => Some(0),
            Some(v) => v.parse().ok(),
        }
    }

    /// `blob_size` as a number, if present and valid.
    pub fn blob_size(&self) -> Option<u64> {
        self.slot(K_BLOB_SIZE)?.parse().ok()
    }

    /// `produced_at` parsed (any RFC3339 accepted).
    pub fn produced_at_time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        if let Some(us) = self.i().parsed.produced_us {
            return chrono::DateTime::from_timestamp_micros(us);
        }
        ids::parse_time(self.produced_at()?)
    }

    /// Appends the compact binary form of these headers to `out` (what the embedded log
    /// stores): a format byte, then one entry per header — a tag byte, then the value.
    /// `message_id`, `produced_at` and `traceparent` in their canonical forms are written as
    /// 16, 8 and 25 bytes, and `trace_id`/`span_id` equal to the traceparent's ids as a tag
    /// alone; anything else as length-prefixed text. [`Headers::decode_compact`] gives back
    /// exactly the same headers.
    ///
    /// ```
    /// let h = ampybus::Headers::for_publish("ampy.bars.v1.BarBatch", "p@1", "p", "XNAS.AAPL")
    ///     .with("x-desk", "rates");
    /// let mut buf = Vec::new();
    /// h.encode_compact(&mut buf);
    /// let text: usize = h.iter().map(|(k, v)| k.len() + v.len()).sum();
    /// assert!(buf.len() < text / 2, "{} vs {text}", buf.len());
    /// assert_eq!(ampybus::Headers::decode_compact(&bytes::Bytes::from(buf)).unwrap(), h);
    /// ```
    pub fn encode_compact(&self, out: &mut Vec<u8>) {
        let inner = self.i();
        if inner.generated_shape() {
            return inner.encode_generated(out);
        }
        inner.encode_general(out);
    }
}

impl Inner {
    /// [`Headers::encode_compact`] of any map: header by header in slot order, then the
    /// extensions.
    fn encode_general(&self, out: &mut Vec<u8>) {
        let inner = self;
        // Room for the longest form, written through a cursor and cut to length at the end
        // (one capacity check instead of one per byte): per header a tag, a varint length of
        // at most 5 bytes and the value (a binary value is shorter than its text).
        let mut room = 1 + 6 * KNOWN_COUNT;
        for (_, sp) in inner.known.present() {
            room += sp.len as usize;
        }
        for (k, v) in &inner.ext {
            room += 11 + k.len as usize + v.len as usize;
        }
        out.reserve(room);
        let mut w = Cursor {
            buf: &mut out.spare_capacity_mut()[..room],
            at: 0,
        };
        w.byte(COMPACT_V1);
        let tp = inner.known[K_TRACEPARENT];
        // The traceparent's text is its canonical form when it is held parsed and lazy, or
        // (rarely) when the text given reads the same.
        let trace_text = match inner.parsed.trace {
            Some(_) if tp.is_lazy() => None,
            Some(t) => Some(t.traceparent_text()),
            None => None,
        };
        let canonical_tp = inner.parsed.trace.is_some()
            && (tp.is_lazy() || trace_text.is_some_and(|tt| tt == inner.str(tp).as_bytes()));
        // Whether a trace/span id header reads the same as its part of the traceparent.
        let same_part = |slot: Span, from: u32, len: u32| {
            canonical_tp
                && (slot == tp.sub(from, len)
                    || inner.str(slot).as_bytes()
                        == &inner.str(tp).as_bytes()[from as usize..(from + len) as usize])
        };
        for (i, slot) in inner.known.present() {
            let slot = &slot;
            match i {
                K_MESSAGE_ID if inner.parsed.id.is_some() => {
                    w.byte(TAG_ID_BIN);
                    w.bytes(&inner.parsed.id.unwrap_or_default());
                    continue;
                }
                K_PRODUCED_AT if inner.parsed.produced_us.is_some() => {
                    w.byte(TAG_TIME_BIN);
                    w.bytes(&inner.parsed.produced_us.unwrap_or_default().to_le_bytes());
                    continue;
                }
                K_TRACEPARENT if canonical_tp => {
                    let t = inner.parsed.trace.unwrap_or_else(TraceIds::new_root);
                    w.byte(TAG_TRACE_BIN);
                    w.bytes(&t.trace_id);
                    w.bytes(&t.span_id);
                    w.byte(t.flags);
                    continue;
                }
                K_TRACE_ID
                    if canonical_tp && (*slot == tp.sub(3, 32) || same_part(*slot, 3, 32)) =>
                {
                    w.byte(TAG_TRACE_ID_SAME);
                    continue;
                }
                K_SPAN_ID
                    if canonical_tp && (*slot == tp.sub(36, 16) || same_part(*slot, 36, 16)) =>
                {
                    w.byte(TAG_SPAN_ID_SAME);
                    continue;
                }
                _ => {}
            }
            w.byte(i as u8);
            w.text(inner.str(*slot).as_bytes());
        }
        for (k, v) in &inner.ext {
            w.byte(TAG_EXT);
            w.text(inner.str(*k).as_bytes());
            w.text(inner.str(*v).as_bytes());
        }
        let n = w.at;
        // SAFETY: the cursor wrote the first `n` bytes of the spare capacity (it writes only
        // in order, from the start, and `n` counts what it wrote).
        unsafe { out.set_len(out.len() + n) };
    }
}

impl Headers {
    /// Reads the compact binary form written by [`Headers::encode_compact`]. Text values are
    /// shared with `buf`, not copied (the binary ids are written out as text into one small
    /// buffer). Damaged input gives an `envelope` error naming the byte offset; it never
    /// panics.
    ///
    /// ```
    /// let err = ampybus::Headers::decode_compact(&bytes::Bytes::from_static(b"\xa1\x09\x05ab")).unwrap_err();
    /// assert!(err.to_string().contains("offset 2"), "{err}");
    /// ```
    pub fn decode_compact(buf: &Bytes) -> Result<Headers> {
        let b = buf.as_ref();
        let bad = |at: usize, what: &str| {
            Error::envelope(format!(
                "compact headers: {what} at offset {at} of {} bytes",
                b.len()
            ))
        };
        if b.first() != Some(&COMPACT_V1) {
            return Err(bad(0, "unknown format byte"));
        }
        if let Some(h) = Headers::decode_generated(buf) {
            return Ok(h);
        }
        let mut h = Headers::new();
        if b.len() == 1 {
            return Ok(h);
        }
        let inner = h.m();
        inner.base = buf.clone();
        let mut at = 1;
        let mut id: Option<[u8; 16]> = None;
        let mut time: Option<i64> = None;
        let mut trace: Option<TraceIds> = None;
        let (mut same_trace, mut same_span) = (false, false);
        // A length-prefixed UTF-8 text of `base`; an error as (offset, problem). Inlined: it
        // runs for every text header of every message consumed.
        #[inline(always)]
        fn text_at(b: &[u8], at: &mut usize) -> std::result::Result<Span, (usize, &'static str)> {
            let start = *at;
            // A length under 128 is one byte (nearly every header value).
            let n = match b.get(start) {
                Some(&c) if c < 0x80 => {
                    *at = start + 1;
                    usize::from(c)
                }
                _ => get_varint(b, at).ok_or((start, "bad length"))?,
            };
            if n > b.len() - *at {
                return Err((start, "length past the end"));
            }
            let t = &b[*at..*at + n];
            // Header text is nearly always ASCII: the word-at-a-time check settles it.
            if !t.is_ascii() && std::str::from_utf8(t).is_err() {
                return Err((*at, "text is not UTF-8"));
            }
            let sp = Span {
                buf: 1,
                start: *at as u32,
                len: n as u32,
            };
            *at += n;
            Ok(sp)
        }
        fn fixed<'b>(b: &'b [u8], at: &mut usize, n: usize) -> Option<&'b [u8]> {
            let s = b.get(*at..at.checked_add(n)?)?;
            *at += n;
            Some(s)
        }
        while at < b.len() {
            let tag_at = at;
            let tag = b[at];
            at += 1;
            match tag {
                t if usize::from(t) < KNOWN_COUNT => {
                    let v = text_at(b, &mut at).map_err(|(o, what)| bad(o, what))?;
                    if inner.known[usize::from(t)].is_some() {
                        return Err(bad(tag_at, "header repeated"));
                    }
                    match usize::from(t) {
                        // Text of a value the typed core parses.
                        i @ (K_MESSAGE_ID | K_PRODUCED_AT | K_TRACEPARENT) => inner.put(i, v),
                        i => inner.known.set(i, v),
                    }
                }
                TAG_ID_BIN => {
                    let mut v = [0u8; 16];
                    v.copy_from_slice(
                        fixed(b, &mut at, 16).ok_or_else(|| bad(tag_at, "value past the end"))?,
                    );
                    id = Some(v);
                }
                TAG_TIME_BIN => {
                    let mut v = [0u8; 8];
                    v.copy_from_slice(
                        fixed(b, &mut at, 8).ok_or_else(|| bad(tag_at, "value past the end"))?,
                    );
                    let us = i64::from_le_bytes(v);
                    if !(ids::MIN_CANONICAL_MICROS..=ids::MAX_CANONICAL_MICROS).contains(&us) {
                        return Err(bad(tag_at, "time out of range"));
                    }
                    time = Some(us);
                }
                TAG_TRACE_BIN => {
                    let v =
                        fixed(b, &mut at, 25).ok_or_else(|| bad(tag_at, "value past the end"))?;
                    let t = trace_from_compact(v).ok_or_else(|| bad(tag_at, "zero trace id"))?;
                    trace = Some(t);
                }
                TAG_TRACE_ID_SAME => same_trace = true,
                TAG_SPAN_ID_SAME => same_span = true,
                TAG_EXT => {
                    let k = text_at(b, &mut at).map_err(|(o, what)| bad(o, what))?;
                    let v = text_at(b, &mut at).map_err(|(o, what)| bad(o, what))?;
                    let name = inner.str(k);
                    if known_index(name).is_some() {
                        return Err(bad(tag_at, "known header written as an extension"));
                    }
                    match inner.ext_position(name) {
                        Ok(_) => return Err(bad(tag_at, "header repeated")),
                        Err(i) => inner.ext.insert(i, (k, v)),
                    }
                }
                _ => return Err(bad(tag_at, "unknown tag")),
            }
        }
        if (same_trace || same_span) && trace.is_none() {
            return Err(bad(b.len(), "trace id refers to a missing traceparent"));
        }
        let conflict = (id.is_some() && inner.known[K_MESSAGE_ID].is_some())
            || (time.is_some() && inner.known[K_PRODUCED_AT].is_some())
            || (trace.is_some() && inner.known[K_TRACEPARENT].is_some())
            || (same_trace && inner.known[K_TRACE_ID].is_some())
            || (same_span && inner.known[K_SPAN_ID].is_some());
        if conflict {
            return Err(bad(b.len(), "header repeated"));
        }
        // The binary values: held parsed; their text is written when first read.
        if id.is_some() {
            inner.known.set(K_MESSAGE_ID, Span::lazy(LAZY_ID, 36));
            inner.parsed.id = id;
        }
        if time.is_some() {
            inner.known.set(K_PRODUCED_AT, Span::lazy(LAZY_TIME, 27));
            inner.parsed.produced_us = time;
        }
        if trace.is_some() {
            let sp = Span::lazy(LAZY_TRACE, 55);
            inner.known.set(K_TRACEPARENT, sp);
            inner.parsed.trace = trace;
            if same_trace {
                inner.known.set(K_TRACE_ID, sp.sub(3, 32));
            }
            if same_span {
                inner.known.set(K_SPAN_ID, sp.sub(36, 16));
            }
        }
        Ok(h)
    }

    /// [`Headers::decode_compact`] of exactly the layout [`Inner::encode_generated`] writes
    /// (what nearly every message published through ampybus carries), in one straight pass:
    /// each tag where that layout has it, each text length a single byte and the text ASCII.
    /// `None` for anything else, which the general decoder then reads (and, when damaged,
    /// names). What it returns is what the general decoder returns for the same bytes.
    fn decode_generated(buf: &Bytes) -> Option<Headers> {
        let b = buf.as_ref();
        // A tag, a one-byte length and that many bytes (checked to be ASCII below). `ready`
        // ends false when the text is empty or starts with whitespace.
        #[inline(always)]
        fn text(b: &[u8], at: &mut usize, tag: usize, ready: &mut bool) -> Option<Span> {
            let (&t, &n) = (b.get(*at)?, b.get(*at + 1)?);
            if usize::from(t) != tag || n >= 0x80 {
                return None;
            }
            let start = *at + 2;
            let end = start + usize::from(n);
            if end > b.len() {
                return None;
            }
            *ready &= start < end && !b[start].is_ascii_whitespace();
            *at = end;
            Some(Span {
                buf: 1,
                start: start as u32,
                len: u32::from(n),
            })
        }
        // A tag and `N` bytes.
        #[inline(always)]
        fn fixed<const N: usize>(b: &[u8], at: &mut usize, tag: u8) -> Option<[u8; N]> {
            if *b.get(*at)? != tag {
                return None;
            }
            let v: [u8; N] = b.get(*at + 1..*at + 1 + N)?.try_into().ok()?;
            *at += 1 + N;
            Some(v)
        }
        let mut at = 1;
        let mut ready = true;
        let content_type = text(b, &mut at, K_CONTENT_TYPE, &mut ready)?;
        let id = fixed::<16>(b, &mut at, TAG_ID_BIN)?;
        let key = text(b, &mut at, K_PARTITION_KEY, &mut ready)?;
        let us = i64::from_le_bytes(fixed::<8>(b, &mut at, TAG_TIME_BIN)?);
        if !(ids::MIN_CANONICAL_MICROS..=ids::MAX_CANONICAL_MICROS).contains(&us) {
            return None;
        }
        let producer = text(b, &mut at, K_PRODUCER, &mut ready)?;
        let run_id = text(b, &mut at, K_RUN_ID, &mut ready)?;
        let fqdn = text(b, &mut at, K_SCHEMA_FQDN, &mut ready)?;
        let version = text(b, &mut at, K_SCHEMA_VERSION, &mut ready)?;
        let source = text(b, &mut at, K_SOURCE, &mut ready)?;
        // The texts are ASCII: three checks cover all seven, since the tags and lengths
        // between `producer` and `source` are ASCII bytes themselves.
        let range =
            |first: Span, last: Span| first.start as usize..(last.start + last.len) as usize;
        if !(b[range(content_type, content_type)].is_ascii()
            && b[range(key, key)].is_ascii()
            && b[range(producer, source)].is_ascii())
        {
            return None;
        }
        if b.get(at..at + 2)? != [TAG_SPAN_ID_SAME, TAG_TRACE_ID_SAME] {
            return None;
        }
        at += 2;
        let t = fixed::<25>(b, &mut at, TAG_TRACE_BIN)?;
        if at != b.len() {
            return None;
        }
        let trace = trace_from_compact(&t)?;
        let mut h = Headers::new();
        let inner = h.m();
        inner.base = buf.clone();
        let k = &mut inner.known;
        k.set(K_CONTENT_TYPE, content_type);
        k.set(K_PARTITION_KEY, key);
        k.set(K_PRODUCER, producer);
        k.set(K_RUN_ID, run_id);
        k.set(K_SCHEMA_FQDN, fqdn);
        k.set(K_SCHEMA_VERSION, version);
        k.set(K_SOURCE, source);
        k.set(K_MESSAGE_ID, Span::lazy(LAZY_ID, 36));
        k.set(K_PRODUCED_AT, Span::lazy(LAZY_TIME, 27));
        let tp = Span::lazy(LAZY_TRACE, 55);
        k.set(K_TRACEPARENT, tp);
        k.set(K_TRACE_ID, tp.sub(3, 32));
        k.set(K_SPAN_ID, tp.sub(36, 16));
        inner.parsed = Parsed {
            id: Some(id),
            produced_us: Some(us),
            trace: Some(trace),
        };
        // The consume rules (see `consume_ready`): every required text present and not
        // starting with whitespace (the generated ones are valid, no slow header is here).
        inner.consume_ready = ready;
        Some(h)
    }

    /// Checks every publish-side rule of the contract for a message on `topic`. The error
    /// names the header and the rule.
    ///
    /// ```
    /// let topic = ampybus::Topic::parse("ampy.prod.orders.v1.requests").unwrap();
    /// let mut h = ampybus::Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
    /// h.set("produced_at", "yesterday");
    /// let err = h.validate_for_publish(&topic).unwrap_err();
    /// assert!(err.to_string().contains("`produced_at`"), "{err}");
    /// ```
    pub fn validate_for_publish(&self, topic: &Topic) -> Result<()> {
        if self.publish_shape_valid(topic) {
            return Ok(());
        }
        self.validate_for_publish_general(topic)
    }

    /// [`Headers::validate_for_publish`] for any map: the per-value rules, then the fields.
    fn validate_for_publish_general(&self, topic: &Topic) -> Result<()> {
        let verified = match self.values_plainly_valid() {
            Some(v) => v,
            None => {
                self.check_values_in_order()?;
                0
            }
        };
        self.validate_for_publish_fields(topic, verified)
    }

    /// Every publish rule for a map of the [`Inner::generated_shape`] in one straight pass:
    /// the generated values and the defaults hold their rules by construction (the id is
    /// still checked to be a UUIDv7), so only the caller's four values are read: each within
    /// its limit, the dotted `schema_fqdn`, plain text `producer` and `source` (neither
    /// admits CR, LF or NUL), and the partition key's rules for `topic` (which admit no
    /// control character). `false` (any other map, or any rule failing) sends the caller to
    /// the general rules, which name the first problem as they always have.
    fn publish_shape_valid(&self, topic: &Topic) -> bool {
        let Some(inner) = self.inner.as_deref() else {
            return false;
        };
        if !inner.generated_shape() {
            return false;
        }
        let id = inner.parsed.id.unwrap_or_default();
        if id[6] >> 4 != 7 || id[8] & 0xC0 != 0x80 {
            return false;
        }
        let k = &inner.known;
        let fqdn = inner.str(k[K_SCHEMA_FQDN]);
        let producer = inner.str(k[K_PRODUCER]);
        let source = inner.str(k[K_SOURCE]);
        let key = inner.str(k[K_PARTITION_KEY]);
        // The generated values, the defaults and the names come to well under 1 KiB.
        let longest = fqdn
            .len()
            .max(producer.len())
            .max(source.len())
            .max(key.len());
        let caller = fqdn.len() + producer.len() + source.len() + key.len();
        longest <= MAX_HEADER_VALUE_BYTES
            && caller <= MAX_HEADERS_BYTES - 1024
            && fqdn_ok_cached(fqdn.as_bytes())
            && plain_text(producer.as_bytes())
            && plain_text(source.as_bytes())
            && partition::check_topic_key(topic, key).is_ok()
    }

    /// The common case of the per-value rules in one pass, in slot order: every value free
    /// of CR, LF and NUL (eight bytes at a time) and within its limit, every extension name
    /// valid, the total within its limit. Values held parsed (lazily written text) and the
    /// shared publish defaults are clean by construction and are not read. A value that
    /// passes its slot's own fast rule (plain text, dotted name, plain semver: each admits no
    /// CR, LF or NUL) is clean too, and its bit in the mask returned tells
    /// [`Headers::validate_for_publish_fields`] that its rule holds already. `None` sends the
    /// caller to [`Headers::check_values_in_order`], which finds the first problem in name
    /// order.
    fn values_plainly_valid(&self) -> Option<u32> {
        let inner = self.i();
        let mut total = 0usize;
        let mut verified = 0u32;
        for (i, sp) in inner.known.present() {
            let sp = &sp;
            total += usize::from(KNOWN_LEN[i]) + sp.len as usize;
            if sp.is_lazy() {
                continue;
            }
            if sp.is_default() {
                verified |= 1 << i;
                continue;
            }
            let v = inner.str(*sp).as_bytes();
            if v.len() > MAX_HEADER_VALUE_BYTES {
                return None;
            }
            let own_rule = match i {
                K_PRODUCER | K_SOURCE | K_RUN_ID => plain_text(v),
                K_SCHEMA_FQDN => fqdn_ok_cached(v),
                K_SCHEMA_VERSION => plain_semver(v),
                _ => false,
            };
            if own_rule {
                verified |= 1 << i;
            } else if has_cr_lf_nul(v) {
                return None;
            }
        }
        for (k, v) in &inner.ext {
            let (k, v) = (inner.str(*k), inner.str(*v).as_bytes());
            total += k.len() + v.len();
            if check_name(k).is_err() || v.len() > MAX_HEADER_VALUE_BYTES || has_cr_lf_nul(v) {
                return None;
            }
        }
        (total <= MAX_HEADERS_BYTES).then_some(verified)
    }

    /// The per-value rules header by header in name order: the first problem as an error.
    fn check_values_in_order(&self) -> Result<()> {
        let mut total = 0usize;
        let mut largest: Option<(&str, usize)> = None;
        let inner = self.i();
        for (k, v) in self.iter() {
            if !inner.ext.is_empty() && known_index(k).is_none() {
                check_name(k)?;
            }
            if v.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
                return Err(Error::header(k, "value must not contain CR, LF or NUL"));
            }
            if v.len() > MAX_HEADER_VALUE_BYTES {
                return Err(Error::header(
                    k,
                    format!(
                        "value is {} bytes, over the limit of {MAX_HEADER_VALUE_BYTES} bytes (64 KiB) per header value",
                        v.len()
                    ),
                ));
            }
            let size = k.len() + v.len();
            total += size;
            if largest.is_none_or(|(_, n)| size > n) {
                largest = Some((k, size));
            }
        }
        if total > MAX_HEADERS_BYTES
            && let Some((name, size)) = largest
        {
            return Err(Error::header(
                name,
                format!(
                    "the headers are {total} bytes in all (names and values), over the limit of {MAX_HEADERS_BYTES} bytes (256 KiB); this is the largest ({size} bytes)"
                ),
            ));
        }
        Ok(())
    }

    /// The rules of [`Headers::validate_for_publish`] on the fields themselves.
    /// `verified`: slots whose own rule is known to hold (see
    /// [`Headers::values_plainly_valid`]); their checks are skipped.
    fn validate_for_publish_fields(&self, topic: &Topic, verified: u32) -> Result<()> {
        let unchecked = |slot: usize| verified & (1 << slot) == 0;
        let inner = self.i();
        if inner.known.present & REQUIRED_MASK != REQUIRED_MASK {
            for (name, slot) in REQUIRED.iter().zip(REQUIRED_SLOTS) {
                if !inner.known[slot].is_some() {
                    return Err(Error::header(name, "required header is missing"));
                }
            }
        }
        let fast = self
            .i()
            .parsed
            .id
            .is_some_and(|b| b[6] >> 4 == 7 && b[8] & 0xC0 == 0x80);
        if !fast {
            let id = self.slot(K_MESSAGE_ID).unwrap_or_default();
            match uuid::Uuid::try_parse(id) {
                Ok(u)
                    if u.get_version_num() == 7
                        && u.get_variant() == uuid::Variant::RFC4122
                        && u.hyphenated().to_string() == id => {}
                Ok(_) => {
                    return Err(Error::header(
                        MESSAGE_ID,
                        format!(
                            "must be a UUIDv7, lowercase and hyphenated (got {})",
                            show(id)
                        ),
                    ));
                }
                Err(_) => {
                    return Err(Error::header(
                        MESSAGE_ID,
                        format!("not a UUID (got {})", show(id)),
                    ));
                }
            }
        }
        if unchecked(K_SCHEMA_FQDN) {
            check_fqdn(self.slot(K_SCHEMA_FQDN).unwrap_or_default())?;
        }
        if unchecked(K_SCHEMA_VERSION) {
            check_semver(self.slot(K_SCHEMA_VERSION).unwrap_or_default())?;
        }
        let ct = self.slot(K_CONTENT_TYPE).unwrap_or_default();
        if unchecked(K_CONTENT_TYPE) && ct != CONTENT_TYPE_PROTOBUF && ct != CONTENT_TYPE_JSON {
            return Err(Error::header(
                CONTENT_TYPE,
                format!(
                    "must be `{CONTENT_TYPE_PROTOBUF}` or `{CONTENT_TYPE_JSON}` (got {})",
                    show(ct)
                ),
            ));
        }
        if let Some(ce) = self.slot(K_CONTENT_ENCODING)
            && ce != "gzip"
        {
            return Err(Error::header(
                CONTENT_ENCODING,
                format!("must be absent or `gzip` (got {})", show(ce)),
            ));
        }
        if self.i().parsed.produced_us.is_none()
            && let pa = self.slot(K_PRODUCED_AT).unwrap_or_default()
            && !ids::is_canonical_time(pa)
        {
            return Err(Error::header(
                PRODUCED_AT,
                format!(
                    "must be RFC3339 UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ (got {})",
                    show(pa)
                ),
            ));
        }
        for (name, slot) in [
            (PRODUCER, K_PRODUCER),
            (SOURCE, K_SOURCE),
            (RUN_ID, K_RUN_ID),
        ] {
            if unchecked(slot) {
                check_text(name, self.slot(slot).unwrap_or_default())?;
            }
        }
        let tp_span = inner.known[K_TRACEPARENT];
        // A lazily written traceparent is valid and is not read here ("" stands for it).
        let tp_text = if tp_span.is_lazy() {
            Some("")
        } else {
            self.slot(K_TRACEPARENT)
        };
        match tp_text {
            None => {
                return Err(Error::header(
                    TRACEPARENT,
                    "required on publish (use fill_publish_defaults)",
                ));
            }
            Some(tp) => {
                if self.i().parsed.trace.is_none() {
                    return Err(Error::header(
                        TRACEPARENT,
                        format!(
                            "must be W3C `00-<32 hex>-<16 hex>-<2 hex>` with non-zero ids (got {})",
                            show(tp)
                        ),
                    ));
                }
                // A valid traceparent is 55 bytes: the ids are at fixed places. An id that is
                // a part of the traceparent's own text is equal by construction.
                let part = |slot: usize, from: u32, len: u32| {
                    let sp = inner.known[slot];
                    (sp.is_some() && sp != tp_span.sub(from, len)).then(|| {
                        let tp = if tp.is_empty() {
                            inner.str(tp_span)
                        } else {
                            tp
                        };
                        (inner.str(sp), &tp[from as usize..(from + len) as usize])
                    })
                };
                if inner.known[K_TRACE_ID] != tp_span.sub(3, 32)
                    && let Some((t, want)) = part(K_TRACE_ID, 3, 32)
                    && t != want
                {
                    return Err(Error::header(
                        TRACE_ID,
                        "must equal the trace id inside `traceparent`",
                    ));
                }
                if inner.known[K_SPAN_ID] != tp_span.sub(36, 16)
                    && let Some((s, want)) = part(K_SPAN_ID, 36, 16)
                    && s != want
                {
                    return Err(Error::header(
                        SPAN_ID,
                        "must equal the span id inside `traceparent`",
                    ));
                }
            }
        }
        partition::check_topic_key(topic, self.slot(K_PARTITION_KEY).unwrap_or_default())?;
        self.validate_optional()?;
        Ok(())
    }

    fn validate_optional(&self) -> Result<()> {
        // Every rule below is about a header that is present: a map with none of them (the
        // usual publish) passes at once.
        let inner = self.i();
        if inner.ext.is_empty() && inner.known.present & OPTIONAL_MASK == 0 {
            return Ok(());
        }
        if let Some(v) = self.slot(K_DEDUPE_KEY) {
            check_text(DEDUPE_KEY, v)?;
        }
        if let Some(v) = self.slot(K_RETRY_COUNT)
            && (!is_decimal(v) || v.parse::<u32>().is_err())
        {
            return Err(Error::header(
                RETRY_COUNT,
                format!("must be a non-negative integer (got {})", show(v)),
            ));
        }
        if let Some(v) = self.slot(K_DLQ_REASON) {
            let code = v.split(':').next().unwrap_or_default();
            if !v.contains(':')
                || code.is_empty()
                || !code.starts_with(|c: char| c.is_ascii_lowercase())
                || !code
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(Error::header(
                    DLQ_REASON,
                    format!(
                        "must be `code: detail` with a lower_snake code (got {})",
                        show(v)
                    ),
                ));
            }
        }
        if let Some(v) = self.slot(K_SCHEMA_HASH) {
            let hex = v
                .strip_prefix("nameonly:sha256:")
                .or_else(|| v.strip_prefix("sha256:"));
            if !hex.is_some_and(is_sha256_hex) {
                return Err(Error::header(
                    SCHEMA_HASH,
                    format!(
                        "must be `sha256:<64 hex>` or `nameonly:sha256:<64 hex>` (got {})",
                        show(v)
                    ),
                ));
            }
        }
        for (name, slot) in [(BLOB_HASH, K_BLOB_HASH), (PAYLOAD_HASH, K_PAYLOAD_HASH)] {
            if let Some(v) = self.slot(slot)
                && !v.strip_prefix("sha256:").is_some_and(is_sha256_hex)
            {
                return Err(Error::header(
                    name,
                    format!("must be `sha256:<64 lowercase hex>` (got {})", show(v)),
                ));
            }
        }
        let blob = [
            self.slot(K_BLOB_REF).is_some(),
            self.slot(K_BLOB_HASH).is_some(),
            self.slot(K_BLOB_SIZE).is_some(),
        ];
        if blob.iter().any(|b| *b) && !blob.iter().all(|b| *b) {
            return Err(Error::header(
                BLOB_REF,
                "`blob_ref`, `blob_hash` and `blob_size` go together: all three or none",
            ));
        }
        if let Some(v) = self.slot(K_BLOB_SIZE)
            && (!is_decimal(v) || v.parse::<u64>().is_err())
        {
            return Err(Error::header(
                BLOB_SIZE,
                format!("must be a non-negative integer (got {})", show(v)),
            ));
        }
        if let Some(v) = self.slot(K_BLOB_REF) {
            check_text(BLOB_REF, v)?;
        }
        if let Some(v) = self.slot(K_ORIGINAL_TOPIC) {
            Topic::parse(v).map_err(|e| Error::header(ORIGINAL_TOPIC, e.message()))?;
        }
        if let Some(v) = self.slot(K_DLQ_AT)
            && !ids::is_canonical_time(v)
        {
            return Err(Error::header(
                DLQ_AT,
                format!(
                    "must be RFC3339 UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ (got {})",
                    show(v)
                ),
            ));
        }
        if let Some(v) = self.slot(K_DLQ_CONSUMER) {
            check_text(DLQ_CONSUMER, v)?;
        }
        // An extension: looked up only when the message has extensions at all.
        if !self.i().ext.is_empty()
            && let Some(v) = self.get(SEQUENCE)
        {
            check_sequence(v)?;
        }
        for (name, slot) in [
            (REPLAY_REQUEST_ID, K_REPLAY_REQUEST_ID),
            (REDRIVE_OF, K_REDRIVE_OF),
        ] {
            if let Some(v) = self.slot(slot)
                && uuid::Uuid::try_parse(v).is_err()
            {
                return Err(Error::header(
                    name,
                    format!("must be a UUID (got {})", show(v)),
                ));
            }
        }
        Ok(())
    }

    /// Applies the liberal consume-side rules in place: required headers must be present and
    /// non-empty; `message_id` may be any UUID (normalised to lowercase hyphenated);
    /// `produced_at` any RFC3339 time with offset (normalised to UTC with microseconds); a
    /// missing or malformed `traceparent` is rebuilt from `trace_id`/`span_id` when those are
    /// valid and non-zero. The partition key is only required to be non-empty. Errors name the
    /// header and the rule; the caller dead-letters the message with `contract_violation`.
    ///
    /// ```
    /// let mut h = ampybus::Headers::new()
    ///     .with("message_id", "018F5E2F-9B1C-46AA-8F7A-3B1D8F3EA0C2")
    ///     .with("schema_fqdn", "ampy.bars.v1.BarBatch").with("schema_version", "1.0.0")
    ///     .with("content_type", "application/x-protobuf")
    ///     .with("produced_at", "2025-09-05T19:31:01+00:00")
    ///     .with("producer", "p").with("source", "s").with("run_id", "r")
    ///     .with("partition_key", "XNAS.AAPL")
    ///     .with("trace_id", "00000000000000000000000000000000");
    /// h.normalize_for_consume().unwrap();
    /// assert_eq!(h.message_id(), Some("018f5e2f-9b1c-46aa-8f7a-3b1d8f3ea0c2"));
    /// assert_eq!(h.produced_at(), Some("2025-09-05T19:31:01.000000Z"));
    /// assert!(h.trace_context().is_none());
    /// ```
    pub fn normalize_for_consume(&mut self) -> Result<()> {
        if self.consume_ready() {
            return Ok(());
        }
        // Everything is checked before anything is rewritten: on an error the headers are
        // exactly as they arrived (the dead letter carries them so).
        for (name, slot) in REQUIRED.iter().zip(REQUIRED_SLOTS) {
            if self.i().known[slot].is_lazy() {
                // Arrived in binary form: a valid value, written out on demand.
                continue;
            }
            match self.slot(slot) {
                None => return Err(Error::header(name, "required header is missing")),
                // A first byte that is not whitespace settles it without trimming.
                Some(v)
                    if v.as_bytes().first().is_none_or(u8::is_ascii_whitespace)
                        && v.trim().is_empty() =>
                {
                    return Err(Error::header(name, "must not be empty"));
                }
                _ => {}
            }
        }
        // Canonical text was parsed when it was set: the common case rewrites nothing.
        let new_id = match self.i().parsed.id {
            Some(_) => None,
            None => {
                let id = self.slot(K_MESSAGE_ID).unwrap_or_default();
                let u = uuid::Uuid::try_parse(id.trim()).map_err(|_| {
                    Error::header(MESSAGE_ID, format!("not a UUID (got {})", show(id)))
                })?;
                Some(u.hyphenated().to_string())
            }
        };
        let new_time = match self.i().parsed.produced_us {
            Some(_) => None,
            None => {
                let pa = self.slot(K_PRODUCED_AT).unwrap_or_default();
                let t = ids::parse_time(pa.trim()).ok_or_else(|| {
                    Error::header(
                        PRODUCED_AT,
                        format!("must be an RFC3339 time with offset (got {})", show(pa)),
                    )
                })?;
                (!is_canonical_time(pa)).then(|| ids::format_time(t))
            }
        };
        if let Some(ce) = self.slot(K_CONTENT_ENCODING)
            && !ce.is_empty()
            && !ce.eq_ignore_ascii_case("gzip")
            && !ce.eq_ignore_ascii_case("identity")
        {
            return Err(Error::header(
                CONTENT_ENCODING,
                format!(
                    "unsupported encoding {} (absent, `gzip` or `identity`)",
                    show(ce)
                ),
            ));
        }
        if let Some(v) = self.slot(K_RETRY_COUNT)
            && v.trim().parse::<u32>().is_err()
        {
            return Err(Error::header(
                RETRY_COUNT,
                format!("must be a non-negative integer (got {})", show(v)),
            ));
        }
        if let Some(id) = new_id {
            self.put_str(K_MESSAGE_ID, &id);
        }
        if let Some(t) = new_time {
            self.put_str(K_PRODUCED_AT, &t);
        }
        if self.i().parsed.trace.is_none() {
            if let Some(tc) = self
                .get(TRACE_ID)
                .and_then(|t| TraceContext::from_ids(t, self.slot(K_SPAN_ID)))
            {
                self.set(TRACEPARENT, tc.to_traceparent());
            } else if self
                .get(TRACE_ID)
                .is_some_and(|t| t.bytes().all(|b| b == b'0'))
            {
                // An all-zero trace id counts as absent.
                self.remove(TRACE_ID);
            }
        }
        Ok(())
    }

    /// The common case of [`Headers::normalize_for_consume`] in one pass over the slot mask:
    /// every required header present and not blank (held parsed, or text whose first byte
    /// is not whitespace), the id, time and trace context held parsed (so canonical: nothing
    /// to rewrite), and neither `content_encoding` nor `retry_count` present (their rules are
    /// left to the full check). True means the full check would pass and change nothing.
    #[inline]
    fn consume_ready(&self) -> bool {
        const SLOW: u32 = (1 << K_CONTENT_ENCODING) | (1 << K_RETRY_COUNT);
        let Some(inner) = self.inner.as_deref() else {
            return false;
        };
        if inner.consume_ready {
            return true;
        }
        let p = inner.known.present;
        if p & REQUIRED_MASK != REQUIRED_MASK
            || p & SLOW != 0
            || inner.parsed.id.is_none()
            || inner.parsed.produced_us.is_none()
            || inner.parsed.trace.is_none()
        {
            return false;
        }
        REQUIRED_SLOTS.iter().all(|&i| {
            let sp = inner.known[i];
            sp.is_lazy()
                || sp.is_default()
                || inner
                    .str(sp)
                    .as_bytes()
                    .first()
                    .is_some_and(|b| !b.is_ascii_whitespace())
        })
    }

    /// The dedupe scope key for this message's `dedupe_key` within `domain`
    /// (`"{domain}:{dedupe_key}"`), if it has one.
    ///
    /// ```
    /// let h = ampybus::Headers::new().with("dedupe_key", "co_1");
    /// assert_eq!(h.dedupe_scope(ampybus::Domain::Orders).as_deref(), Some("orders:co_1"));
    /// ```
    pub fn dedupe_scope(&self, domain: Domain) -> Option<String> {
        self.dedupe_key().map(|k| format!("{domain}:{k}"))
    }
}

/// Whether a time that parsed as RFC3339 is already in the emitted form
/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, microseconds), so normalising it would not change it.
fn is_canonical_time(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 27
        && b[10] == b'T'
        && b[19] == b'.'
        && b[26] == b'Z'
        && b[20..26].iter().all(u8::is_ascii_digit)
}

impl FromIterator<(String, String)> for Headers {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (k, v) in iter {
            h.set(k, v);
        }
        h
    }
}

impl From<BTreeMap<String, String>> for Headers {
    fn from(m: BTreeMap<String, String>) -> Self {
        m.into_iter().collect()
    }
}

fn is_decimal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 {
        return Err(Error::header(name, "header names must be 1–128 bytes"));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        return Err(Error::header(
            name,
            "header names must be printable ASCII without spaces or `:`",
        ));
    }
    Ok(())
}

/// Whether `b` holds a CR, LF or NUL byte (eight bytes at a time).
fn has_cr_lf_nul(b: &[u8]) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(LO) & !x & HI != 0;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        let x = u64::from_le_bytes(w.try_into().unwrap_or_default());
        if zero_byte(x) || zero_byte(x ^ (LO * 0x0d)) || zero_byte(x ^ (LO * 0x0a)) {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|c| matches!(c, b'\r' | b'\n' | 0))
}

/// Printable ASCII that starts and ends with a non-space: passes every rule of
/// [`check_text`] (and holds no CR, LF or NUL).
fn plain_text(b: &[u8]) -> bool {
    !b.is_empty() && b[0] != b' ' && b[b.len() - 1] != b' ' && all_printable(b)
}

/// Whether every byte of `b` is printable ASCII (0x20..=0x7e), eight bytes at a time.
fn all_printable(b: &[u8]) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // A byte below 0x20 (the borrow trick finds one exactly when there is one), at or above
    // 0x80 (its high bit), or 0x7f (+1 sets the high bit; a carry comes only out of 0xff,
    // found already).
    let bad = |x: u64| ((x.wrapping_sub(LO * 0x20) & !x) | x | x.wrapping_add(LO)) & HI != 0;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        if bad(u64::from_le_bytes(w.try_into().unwrap_or_default())) {
            return false;
        }
    }
    let rest = words.remainder();
    let mut last = [b'a'; 8];
    last[..rest.len()].copy_from_slice(rest);
    !bad(u64::from_le_bytes(last))
}

fn check_text(name: &str, v: &str) -> Result<()> {
    if plain_text(v.as_bytes()) {
        return Ok(());
    }
    if v.trim().is_empty() {
        return Err(Error::header(name, "must not be empty"));
    }
    if v.trim() != v {
        return Err(Error::header(
            name,
            format!("must not start or end with whitespace (got {})", show(v)),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(Error::header(name, "must not contain control characters"));
    }
    Ok(())
}

fn check_fqdn(v: &str) -> Result<()> {
    let ok = fqdn_ok(v.as_bytes());
    if ok {
        return Ok(());
    }
    let ok = v.split('.').count() >= 2
        && v.split('.').all(|t| {
            let mut c = t.chars();
            c.next()
                .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::header(
            SCHEMA_FQDN,
            format!(
                "must be a dotted protobuf name such as `ampy.bars.v1.BarBatch` (got {})",
                show(v)
            ),
        ))
    }
}

/// [`fqdn_ok`], remembering per thread the last name that passed: a producer publishes one
/// schema again and again, so the usual check is one comparison.
fn fqdn_ok_cached(b: &[u8]) -> bool {
    const KEEP: usize = 96;
    thread_local! {
        static LAST: std::cell::RefCell<(usize, [u8; KEEP])> =
            const { std::cell::RefCell::new((0, [0; KEEP])) };
    }
    if b.is_empty() || b.len() > KEEP {
        return fqdn_ok(b);
    }
    let seen = LAST
        .try_with(|l| {
            l.try_borrow()
                .is_ok_and(|l| l.0 == b.len() && &l.1[..l.0] == b)
        })
        .unwrap_or(false);
    if seen {
        return true;
    }
    let ok = fqdn_ok(b);
    if ok {
        let _ = LAST.try_with(|l| {
            if let Ok(mut l) = l.try_borrow_mut() {
                l.0 = b.len();
                l.1[..b.len()].copy_from_slice(b);
            }
        });
    }
    ok
}

/// Dotted identifiers, at least two: each starts with a letter or `_`, then letters, digits, `_`.
fn fqdn_ok(b: &[u8]) -> bool {
    /// Per byte: [`START`] a letter or `_`, [`INNER`] a digit; 0 anything else but `.`.
    const START: u8 = 1;
    const INNER: u8 = 2;
    const CLASS: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut c = 0;
        while c < 256 {
            let b = c as u8;
            t[c] = if b.is_ascii_alphabetic() || b == b'_' {
                START | INNER
            } else if b.is_ascii_digit() {
                INNER
            } else {
                0
            };
            c += 1;
        }
        t
    };
    let mut tokens = 0;
    let mut at_start = true;
    for &c in b {
        let class = CLASS[usize::from(c)];
        if at_start {
            // A token's first byte: a dot here would make an empty token.
            if class & START == 0 {
                return false;
            }
            at_start = false;
            tokens += 1;
        } else if c == b'.' {
            at_start = true;
        } else if class == 0 {
            return false;
        }
    }
    !at_start && tokens >= 2
}

/// `MAJOR.MINOR.PATCH` without a tail: three decimal numbers, no leading zeros.
fn plain_semver(b: &[u8]) -> bool {
    let mut parts = 0;
    let mut len = 0;
    let mut first = 0u8;
    for &c in b.iter().chain(std::iter::once(&b'.')) {
        if c == b'.' {
            if len == 0 || (len > 1 && first == b'0') {
                return false;
            }
            parts += 1;
            len = 0;
        } else if c.is_ascii_digit() {
            if len == 0 {
                first = c;
            }
            len += 1;
        } else {
            return false;
        }
    }
    parts == 3
}

/// `-pre.release` and/or `+build.meta`: non-empty dot-separated `[0-9A-Za-z-]` identifiers.
fn semver_tail_ok(tail: &str) -> bool {
    let idents_ok = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|id| {
                !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    let (pre, build) = match tail.split_once('+') {
        Some((pre, build)) => (pre, Some(build)),
        None => (tail, None),
    };
    let pre_ok = pre.is_empty() || pre.strip_prefix('-').is_some_and(idents_ok);
    pre_ok && build.is_none_or(idents_ok)
}

fn check_semver(v: &str) -> Result<()> {
    if plain_semver(v.as_bytes()) {
        return Ok(());
    }
    let core = v.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    let ok = parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p.len() == 1 || !p.starts_with('0'))
        })
        && semver_tail_ok(&v[core.len()..]);
    if ok {
        Ok(())
    } else {
        Err(Error::header(
            SCHEMA_VERSION,
            format!(
                "must be semver MAJOR.MINOR.PATCH such as `1.0.0` (got {})",
                show(v)
            ),
        ))
    }
}

/// Format byte of the compact binary header form, version 1.
const COMPACT_V1: u8 = 0xA1;
const TAG_ID_BIN: u8 = 0x40;
const TAG_TIME_BIN: u8 = 0x41;
const TAG_TRACE_BIN: u8 = 0x42;
const TAG_TRACE_ID_SAME: u8 = 0x43;
const TAG_SPAN_ID_SAME: u8 = 0x44;
const TAG_EXT: u8 = 0x7F;

/// Writes into the spare capacity of a buffer reserved beforehand (see
/// [`Headers::encode_compact`]): bytes in order from the start, `at` of them so far.
struct Cursor<'a> {
    buf: &'a mut [std::mem::MaybeUninit<u8>],
    at: usize,
}

impl Cursor<'_> {
    fn byte(&mut self, b: u8) {
        self.buf[self.at] = std::mem::MaybeUninit::new(b);
        self.at += 1;
    }

    fn bytes(&mut self, b: &[u8]) {
        let dst = &mut self.buf[self.at..self.at + b.len()];
        // SAFETY: `dst` is `b.len()` elements long and `MaybeUninit<u8>` is laid out as `u8`;
        // the two do not overlap (`dst` is spare capacity).
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), dst.as_mut_ptr().cast(), b.len()) };
        self.at += b.len();
    }

    /// A varint length, then the bytes.
    fn text(&mut self, b: &[u8]) {
        let mut n = b.len();
        while n >= 0x80 {
            self.byte((n as u8) | 0x80);
            n >>= 7;
        }
        self.byte(n as u8);
        self.bytes(b);
    }
}

/// The trace context of a `TAG_TRACE_BIN` value (trace id, span id, flags: 25 bytes); `None`
/// when either id is zero (or the value is not 25 bytes).
fn trace_from_compact(v: &[u8]) -> Option<TraceIds> {
    let v: &[u8; 25] = v.try_into().ok()?;
    let mut t = TraceIds {
        trace_id: [0; 16],
        span_id: [0; 8],
        flags: v[24],
    };
    t.trace_id.copy_from_slice(&v[..16]);
    t.span_id.copy_from_slice(&v[16..24]);
    (t.trace_id != [0; 16] && t.span_id != [0; 8]).then_some(t)
}

/// A LEB128 length of at most 32 bits.
fn get_varint(b: &[u8], at: &mut usize) -> Option<usize> {
    let mut v: u64 = 0;
    for shift in (0..35).step_by(7) {
        let c = *b.get(*at)?;
        *at += 1;
        v |= u64::from(c & 0x7F) << shift;
        if c & 0x80 == 0 {
            return usize::try_from(v).ok().filter(|&v| v <= u32::MAX as usize);
        }
    }
    None
}

struct Iter<'a> {
    h: &'a Headers,
    k: usize,
    e: usize,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        let inner = self.h.i();
        while self.k < KNOWN_COUNT && !inner.known[self.k].is_some() {
            self.k += 1;
        }
        let ext = inner
            .ext
            .get(self.e)
            .map(|(n, v)| (inner.str(*n), inner.str(*v)));
        let known = (self.k < KNOWN_COUNT).then(|| (KNOWN[self.k], inner.str(inner.known[self.k])));
        match (known, ext) {
            (Some(k), Some(e)) if e.0 < k.0 => {
                self.e += 1;
                Some(e)
            }
            (Some(k), _) => {
                self.k += 1;
                Some(k)
            }
            (None, Some(e)) => {
                self.e += 1;
                Some(e)
            }
            (None, None) => None,
        }
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Headers) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Headers {}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Headers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Headers, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Headers::from)
    }
}

/// The publish rule of the `sequence` header: an unsigned decimal integer from 1 (no sign,
/// no spaces, fits in 64 bits); also `ampybus::runtime::feeds::check_sequence`.
///
/// ```
/// use ampybus::headers::check_sequence;
/// check_sequence("1").unwrap();
/// check_sequence("18446744073709551615").unwrap();
/// for bad in ["0", "-1", "+1", " 1", "1.0", "", "18446744073709551616", "x"] {
///     let e = check_sequence(bad).unwrap_err();
///     assert!(e.to_string().contains("`sequence`"), "{e}");
/// }
/// ```
pub fn check_sequence(v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.bytes().all(|b| b.is_ascii_digit())
        && v.parse::<u64>().is_ok_and(|n| n >= 1);
    if ok {
        Ok(())
    } else {
        Err(Error::header(
            SEQUENCE,
            format!(
                "must be an unsigned decimal integer from 1 (per producer run and partition key) (got {})",
                crate::error::show(v)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_map_changed_through_one_clone_is_copied_whole_and_the_other_keeps_its_values() {
        // Values in the places a map set by hand keeps them: the arena (known headers and the
        // generated id and time), a separate buffer (a long value) and the extension list.
        let long = "x".repeat(500);
        let mut common = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "src", "k0");
        common.fill_publish_defaults();
        common.set("x-desk", "rates");
        common.set("x-long", &long);
        let id = common.message_id().map(str::to_owned);
        // Fill the pool with used maps, so the copy lands in one that held other values.
        for i in 0..(pool::LOCAL + 4) {
            let mut other =
                Headers::for_publish("ampy.other.v1.X", "q@2", "other", &format!("key-{i}"));
            other.set("x-other", "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz");
            drop(other);
        }
        let mut mine = common.clone();
        mine.set(PARTITION_KEY, "k1");
        mine.set("x-desk", "fx");
        assert_eq!(mine.partition_key(), Some("k1"));
        assert_eq!(mine.get("x-desk"), Some("fx"));
        assert_eq!(mine.get("x-long"), Some(long.as_str()));
        assert_eq!(mine.get("x-other"), None);
        assert_eq!(mine.producer(), Some("p@1"));
        assert_eq!(mine.message_id(), id.as_deref());
        assert_eq!(common.partition_key(), Some("k0"));
        assert_eq!(common.get("x-desk"), Some("rates"));
        assert_eq!(common.get("x-long"), Some(long.as_str()));
        assert_eq!(mine.len(), common.len());
        let mut back = mine.clone();
        back.set(PARTITION_KEY, "k0");
        back.set("x-desk", "rates");
        assert_eq!(back, common);
    }

    #[test]
    fn canonical_times_are_recognised_and_others_normalised() {
        assert!(is_canonical_time("2025-09-05T19:31:01.000000Z"));
        for t in [
            "2025-09-05t19:31:01.000000Z",
            "2025-09-05T19:31:01.000000z",
            "2025-09-05T19:31:01Z",
            "2025-09-05T19:31:01.000000+00:00",
            " 2025-09-05T19:31:01.00000Z",
        ] {
            assert!(!is_canonical_time(t), "{t}");
        }
        let mut h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
        h.fill_publish_defaults();
        h.set(PRODUCED_AT, "2025-09-05t19:31:01.5z");
        h.set(MESSAGE_ID, "018F5E2F-9B1C-46AA-8F7A-3B1D8F3EA0C2");
        h.normalize_for_consume().unwrap();
        assert_eq!(h.produced_at(), Some("2025-09-05T19:31:01.500000Z"));
        assert_eq!(h.message_id(), Some("018f5e2f-9b1c-46aa-8f7a-3b1d8f3ea0c2"));
        let before = h.clone();
        h.normalize_for_consume().unwrap();
        assert_eq!(h, before, "normalising a normal form changes nothing");
    }

    fn topic() -> Topic {
        Topic::parse("ampy.prod.bars.v1.XNAS.AAPL").unwrap()
    }

    fn good() -> Headers {
        Headers::for_publish(
            "ampy.bars.v1.BarBatch",
            "yfinance-go@ingest-1",
            "yfinance-go",
            "XNAS.AAPL",
        )
    }

    /// A dropped map's storage is reused by the next map on the thread (and through the shared
    /// list by other threads): the reused map reads only its own values, a map still shared
    /// by a clone is not reused, and the buffer a dropped map pointed into is released.
    #[test]
    fn reused_storage_reads_only_its_own_values() {
        let mut a = good();
        a.set("x_desk", "rates");
        a.set("dedupe_key", "fill-7");
        let mut wire_a = Vec::new();
        a.encode_compact(&mut wire_a);
        let a_id = a.message_id().unwrap().to_owned();
        let _ = a.traceparent().unwrap();
        let buf = bytes::Bytes::from(wire_a);
        let decoded = Headers::decode_compact(&buf).unwrap();
        assert_eq!(decoded.message_id(), Some(a_id.as_str()));
        let held = decoded.clone();
        drop(a);
        drop(decoded);
        // `held` still reads everything: its storage was not reused.
        assert_eq!(held.get("x_desk"), Some("rates"));
        assert_eq!(held.message_id(), Some(a_id.as_str()));
        drop(held);
        // The received buffer is no longer referenced by the dropped map.
        assert!(
            buf.is_unique(),
            "a dropped map kept the buffer it was decoded from"
        );

        for _ in 0..3 * pool::LOCAL {
            let b = Headers::for_publish("ampy.fx.v1.Rate", "p@1", "src", "EURUSD");
            let b_id = b.message_id().unwrap().to_owned();
            let mut wire_b = Vec::new();
            b.encode_compact(&mut wire_b);
            let back = Headers::decode_compact(&bytes::Bytes::from(wire_b)).unwrap();
            assert_eq!(back.message_id(), Some(b_id.as_str()));
            assert_ne!(back.message_id(), Some(a_id.as_str()));
            assert_eq!(back.get("x_desk"), None);
            assert_eq!(back.dedupe_key(), None);
            assert_eq!(back.partition_key(), Some("EURUSD"));
            assert_eq!(back.iter().count(), b.iter().count());
            assert_eq!(back, b);
        }
        // Across threads: maps dropped on one thread serve maps made on another.
        let made: Vec<Headers> = (0..2 * pool::LOCAL).map(|_| good()).collect();
        std::thread::spawn(move || drop(made)).join().unwrap();
        let fresh = Headers::new().with("source", "s");
        assert_eq!(fresh.iter().count(), 1);
        assert_eq!(fresh.message_id(), None);
    }

    #[test]
    fn publish_rules_name_header_and_rule() {
        good().validate_for_publish(&topic()).unwrap();
        let cases: Vec<(&str, Option<&str>, &str)> = vec![
            (MESSAGE_ID, None, "`message_id`: required header is missing"),
            (MESSAGE_ID, Some("not-a-uuid"), "`message_id`: not a UUID"),
            (
                MESSAGE_ID,
                Some("6ba7b810-9dad-41d1-80b4-00c04fd430c8"),
                "`message_id`: must be a UUIDv7",
            ),
            (
                MESSAGE_ID,
                Some("018F5E2F-9B1C-76AA-8F7A-3B1D8F3EA0C2"),
                "`message_id`: must be a UUIDv7, lowercase",
            ),
            (
                SCHEMA_FQDN,
                Some("BarBatch"),
                "`schema_fqdn`: must be a dotted",
            ),
            (
                SCHEMA_VERSION,
                Some("1.0"),
                "`schema_version`: must be semver",
            ),
            (
                SCHEMA_VERSION,
                Some("01.0.0"),
                "`schema_version`: must be semver",
            ),
            (CONTENT_TYPE, Some("text/plain"), "`content_type`: must be"),
            (
                CONTENT_ENCODING,
                Some("br"),
                "`content_encoding`: must be absent or `gzip`",
            ),
            (
                PRODUCED_AT,
                Some("2025-09-05T19:31:01Z"),
                "`produced_at`: must be RFC3339 UTC",
            ),
            (
                PRODUCED_AT,
                Some("2025-02-30T19:31:01.000000Z"),
                "`produced_at`: must be RFC3339 UTC",
            ),
            (PRODUCER, Some(""), "`producer`: must not be empty"),
            (
                SOURCE,
                Some(" x"),
                "`source`: must not start or end with whitespace",
            ),
            (
                RUN_ID,
                Some("a\tb"),
                "`run_id`: must not contain control characters",
            ),
            (
                TRACEPARENT,
                Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
                "`traceparent`: must be W3C",
            ),
            (TRACEPARENT, None, "`traceparent`: required on publish"),
            (
                TRACE_ID,
                Some("4b5b3f2a0f9d4e3db4c8a1f0e3a7c812"),
                "`trace_id`: must equal",
            ),
            (PARTITION_KEY, Some("AAPL"), "`partition_key`"),
            (
                RETRY_COUNT,
                Some("-1"),
                "`retry_count`: must be a non-negative integer",
            ),
            (
                DLQ_REASON,
                Some("oops"),
                "`dlq_reason`: must be `code: detail`",
            ),
            (SCHEMA_HASH, Some("md5:abc"), "`schema_hash`: must be"),
            (
                BLOB_REF,
                Some("file:///x"),
                "`blob_ref`: `blob_ref`, `blob_hash` and `blob_size` go together",
            ),
            (ORIGINAL_TOPIC, Some("ampy.prod.bars"), "`original_topic`"),
            (DLQ_AT, Some("now"), "`dlq_at`: must be RFC3339"),
            (REDRIVE_OF, Some("x"), "`redrive_of`: must be a UUID"),
            (
                RETRY_COUNT,
                Some("+1"),
                "`retry_count`: must be a non-negative integer",
            ),
            (
                SCHEMA_VERSION,
                Some("1.0.0-+"),
                "`schema_version`: must be semver",
            ),
            (
                MESSAGE_ID,
                Some("019a6b3c-1d2e-7f00-0a00-0123456789ab"),
                "`message_id`: must be a UUIDv7",
            ),
            (
                DLQ_REASON,
                Some("5xx: upstream"),
                "`dlq_reason`: must be `code: detail`",
            ),
            (
                "bad name",
                Some("x"),
                "header names must be printable ASCII",
            ),
            (DEDUPE_KEY, Some("a\nb"), "must not contain CR, LF or NUL"),
        ];
        for (name, value, want) in cases {
            let mut h = good();
            match value {
                Some(v) => h.set(name, v),
                None => h.remove(name),
            };
            let e = h.validate_for_publish(&topic()).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Header, "{name}");
            assert!(
                e.to_string().contains(want),
                "{name}={value:?}: {e} does not contain {want:?}"
            );
        }
    }

    #[test]
    fn tightened_rules_still_accept_valid_forms() {
        for (name, v) in [
            (SCHEMA_VERSION, "1.2.3-rc.1+build.7"),
            (DLQ_REASON, "http_500: upstream failed"),
            (RETRY_COUNT, "12"),
        ] {
            good().with(name, v).validate_for_publish(&topic()).unwrap();
        }
    }

    #[test]
    fn consume_rules_are_liberal_but_not_blind() {
        let mut h = good();
        h.set(PRODUCED_AT, "2025-09-05T19:31:01.462+00:00");
        h.remove(TRACEPARENT);
        h.set(TRACE_ID, "A0C1B2D3E4F5061728394A5B6C7D8E9F");
        h.remove(SPAN_ID);
        h.normalize_for_consume().unwrap();
        assert_eq!(h.produced_at(), Some("2025-09-05T19:31:01.462000Z"));
        assert_eq!(
            h.trace_context().unwrap().trace_id,
            "a0c1b2d3e4f5061728394a5b6c7d8e9f"
        );

        let mut h = good();
        h.set(PARTITION_KEY, "");
        assert!(
            h.normalize_for_consume()
                .unwrap_err()
                .to_string()
                .contains("`partition_key`: must not be empty")
        );
        let mut h = good();
        h.remove(SOURCE);
        assert!(
            h.normalize_for_consume()
                .unwrap_err()
                .to_string()
                .contains("`source`: required header is missing")
        );
        let mut h = good();
        h.set(PRODUCED_AT, "19:31");
        assert!(
            h.normalize_for_consume()
                .unwrap_err()
                .to_string()
                .contains("`produced_at`")
        );
    }

    #[test]
    fn known_slots_are_in_name_order_and_lookup_agrees() {
        let mut sorted = KNOWN;
        sorted.sort_unstable();
        assert_eq!(sorted, KNOWN);
        for (i, name) in KNOWN.iter().enumerate() {
            assert_eq!(known_index(name), Some(i), "{name}");
        }
        assert_eq!(known_index("x-desk"), None);
        assert_eq!(KNOWN[K_MESSAGE_ID], MESSAGE_ID);
        assert_eq!(KNOWN[K_PRODUCED_AT], PRODUCED_AT);
        assert_eq!(KNOWN[K_TRACEPARENT], TRACEPARENT);
        assert_eq!(KNOWN[K_TRACE_ID], TRACE_ID);
        assert_eq!(KNOWN[K_SPAN_ID], SPAN_ID);
        assert_eq!(KNOWN[K_CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(KNOWN[K_RUN_ID], RUN_ID);
        assert_eq!(KNOWN[K_SCHEMA_VERSION], SCHEMA_VERSION);
        for (name, slot) in REQUIRED.iter().zip(REQUIRED_SLOTS) {
            assert_eq!(KNOWN[slot], *name);
        }
    }

    #[test]
    fn iteration_merges_known_and_extension_headers_in_name_order() {
        let h = good()
            .with("zz-last", "1")
            .with("a-first", "2")
            .with("m-middle", "3")
            .with("dedupe_key", "d");
        let names: Vec<&str> = h.iter().map(|(k, _)| k).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        assert_eq!(names.len(), h.len());
        assert_eq!(names.first(), Some(&"a-first"));
        assert_eq!(names.last(), Some(&"zz-last"));
        assert_eq!(h.get("m-middle"), Some("3"));
        let mut h2 = h.clone();
        assert_eq!(h2.remove("m-middle").as_deref(), Some("3"));
        assert_eq!(h2.remove("m-middle"), None);
        assert_eq!(h2.len(), h.len() - 1);
        assert_ne!(h2, h);
        assert_eq!(h2.set("a-first", "9").as_deref(), Some("2"));
        assert_eq!(h2.get("a-first"), Some("9"));
    }

    #[test]
    fn parsed_core_follows_the_text() {
        let mut h = good();
        assert!(h.message_uuid().is_some());
        assert!(h.produced_at_micros().is_some());
        let tp = h.traceparent().unwrap().to_owned();
        assert_eq!(h.get(TRACE_ID), Some(&tp[3..35]));
        assert_eq!(h.get(SPAN_ID), Some(&tp[36..52]));
        assert_eq!(
            h.trace_ids().map(|t| t.traceparent_text().to_vec()),
            Some(tp.as_bytes().to_vec())
        );
        h.set(MESSAGE_ID, "018F5E2F-9B1C-76AA-8F7A-3B1D8F3EA0C2");
        assert_eq!(h.message_uuid(), None);
        h.set(PRODUCED_AT, "2025-09-05T21:31:01+02:00");
        assert_eq!(h.produced_at_micros(), None);
        assert_eq!(
            h.produced_at_time().map(ids::format_time).as_deref(),
            Some("2025-09-05T19:31:01.000000Z")
        );
        h.normalize_for_consume().unwrap();
        assert_eq!(h.message_id(), Some("018f5e2f-9b1c-76aa-8f7a-3b1d8f3ea0c2"));
        assert!(h.message_uuid().is_some());
        assert_eq!(h.produced_at(), Some("2025-09-05T19:31:01.000000Z"));
        assert!(h.produced_at_micros().is_some());
        h.remove(TRACEPARENT);
        assert_eq!(h.trace_ids(), None);
    }

    #[test]
    fn a_failed_normalisation_changes_nothing() {
        let mut h = good();
        h.set(MESSAGE_ID, "018F5E2F-9B1C-76AA-8F7A-3B1D8F3EA0C2");
        h.set(PRODUCED_AT, "not a time");
        let before = h.clone();
        let err = h.normalize_for_consume().unwrap_err();
        assert!(err.to_string().contains("`produced_at`"), "{err}");
        assert_eq!(h, before);
        assert_eq!(h.message_id(), Some("018F5E2F-9B1C-76AA-8F7A-3B1D8F3EA0C2"));
    }

    #[test]
    fn compact_form_round_trips_exactly() {
        let base = good().with("x-desk", "rates").with(DEDUPE_KEY, "co_1");
        let mut odd = base.clone();
        odd.set(MESSAGE_ID, "018F5E2F-9B1C-76AA-8F7A-3B1D8F3EA0C2");
        odd.set(PRODUCED_AT, "2025-09-05T21:31:01+02:00");
        odd.set(TRACE_ID, "4BF92F3577B34DA6A3CE929D0E0E4736");
        odd.set(SPAN_ID, "not-hex");
        let mut bad_tp = base.clone();
        bad_tp.set(TRACEPARENT, "00-zz");
        let empty = Headers::new();
        let unicode = Headers::new().with("x-ü", "€ and 😀").with(SOURCE, "");
        for h in [base, odd, bad_tp, empty, unicode] {
            let mut buf = Vec::new();
            h.encode_compact(&mut buf);
            let back = Headers::decode_compact(&Bytes::from(buf.clone())).unwrap();
            assert_eq!(back, h);
            assert_eq!(back.message_uuid(), h.message_uuid());
            assert_eq!(back.produced_at_micros(), h.produced_at_micros());
            assert_eq!(back.trace_ids(), h.trace_ids());
            let mut again = Vec::new();
            back.encode_compact(&mut again);
            assert_eq!(again, buf);
        }
        // The canonical ids take their binary forms: well under half the text.
        let h = good();
        let mut buf = Vec::new();
        h.encode_compact(&mut buf);
        let text: usize = h.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(buf.len() * 2 < text, "{} of {text}", buf.len());
    }

    /// Values held parsed (generated on publish, or binary in the compact form) read as the
    /// same text as before, keep reading it when the value behind them is replaced, and a
    /// later generated value reads as its own.
    #[test]
    fn values_held_parsed_read_as_their_text() {
        let h = Headers::for_publish("ampy.bars.v1.BarBatch", "p@1", "p", "XNAS.AAPL");
        let id = h.message_uuid().unwrap();
        let us = h.produced_at_micros().unwrap();
        let t = h.trace_ids().unwrap();
        let tp = String::from_utf8(t.traceparent_text().to_vec()).unwrap();
        let mut canonical_time = [0u8; 27];
        assert!(ids::write_canonical_time(us, &mut canonical_time));
        // Encoded and decoded before any text was read: binary forms both ways.
        let mut buf = Vec::new();
        h.encode_compact(&mut buf);
        let back = Headers::decode_compact(&Bytes::from(buf)).unwrap();
        for m in [&back, &h] {
            assert_eq!(
                m.get(MESSAGE_ID),
                Some(id.hyphenated().to_string().as_str())
            );
            assert_eq!(
                m.get(PRODUCED_AT).map(str::as_bytes),
                Some(&canonical_time[..])
            );
            assert_eq!(m.get(TRACEPARENT), Some(tp.as_str()));
            assert_eq!(m.get(TRACE_ID), Some(&tp[3..35]));
            assert_eq!(m.get(SPAN_ID), Some(&tp[36..52]));
        }
        assert_eq!(back, h);
        // Replacing the traceparent before its text was ever read: the older headers keep
        // the ids they had (as when the text was stored), the new one reads as given.
        let mut h2 = Headers::for_publish("ampy.bars.v1.BarBatch", "p@1", "p", "XNAS.AAPL");
        let first = h2.trace_ids().unwrap();
        let other = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h2.set(TRACEPARENT, other);
        let first_text = String::from_utf8(first.traceparent_text().to_vec()).unwrap();
        assert_eq!(h2.get(TRACEPARENT), Some(other));
        assert_eq!(h2.get(TRACE_ID), Some(&first_text[3..35]));
        assert_eq!(h2.get(SPAN_ID), Some(&first_text[36..52]));
        // Removed and generated again: the new values read as themselves.
        let mut h3 = Headers::for_publish("ampy.bars.v1.BarBatch", "p@1", "p", "XNAS.AAPL");
        let old_id = h3.get(MESSAGE_ID).unwrap().to_owned();
        h3.remove(MESSAGE_ID);
        h3.remove(TRACEPARENT);
        h3.remove(TRACE_ID);
        h3.remove(SPAN_ID);
        h3.fill_publish_defaults();
        let new_id = h3.message_uuid().unwrap().hyphenated().to_string();
        assert_ne!(new_id, old_id);
        assert_eq!(h3.get(MESSAGE_ID), Some(new_id.as_str()));
        let t3 = String::from_utf8(h3.trace_ids().unwrap().traceparent_text().to_vec()).unwrap();
        assert_eq!(h3.get(TRACEPARENT), Some(t3.as_str()));
        assert_eq!(h3.get(TRACE_ID), Some(&t3[3..35]));
        let topic = Topic::parse("ampy.prod.bars.v1.XNAS.AAPL").unwrap();
        h3.validate_for_publish(&topic).unwrap();
        // A cloned map reads the same text as its original.
        let c = Headers::for_publish("ampy.bars.v1.BarBatch", "p@1", "p", "XNAS.AAPL");
        let c2 = c.clone();
        assert_eq!(c.get(MESSAGE_ID), c2.get(MESSAGE_ID));
        assert_eq!(c.iter().count(), c2.iter().count());
    }

    /// The eight-bytes-at-a-time scan finds CR, LF and NUL at every position and nothing
    /// else, and the publish rules name the same header as the ordered check would.
    #[test]
    fn control_bytes_are_found_wherever_they_are() {
        for len in 0..40 {
            let clean: Vec<u8> = (0..len).map(|i| b' ' + (i % 90) as u8).collect();
            assert!(!has_cr_lf_nul(&clean), "{len}");
            for at in 0..len {
                for bad in [b'\r', b'\n', 0] {
                    let mut v = clean.clone();
                    v[at] = bad;
                    assert!(has_cr_lf_nul(&v), "{len} {at} {bad}");
                }
                let mut v = clean.clone();
                v[at] = 0x8d; // 0x0d with the high bit: not a CR
                assert!(!has_cr_lf_nul(&v), "{len} {at}");
            }
        }
        let topic = Topic::parse("ampy.prod.bars.v1.XNAS.AAPL").unwrap();
        let h = good().with("x-a", "ok\r").with(SOURCE, "bad\n");
        let err = h.validate_for_publish(&topic).unwrap_err();
        assert!(err.to_string().contains("source"), "{err}");
        assert!(err.to_string().contains("CR, LF or NUL"), "{err}");
    }

    /// The straight pass for maps as `for_publish` makes them writes exactly the bytes of
    /// the general loop, and a map that left that shape takes the general loop.
    #[test]
    fn the_generated_shape_encodes_as_the_general_loop_does() {
        let general = |h: &Headers| {
            let mut b = Vec::new();
            h.i().encode_general(&mut b);
            b
        };
        let compact = |h: &Headers| {
            let mut b = Vec::new();
            h.encode_compact(&mut b);
            b
        };
        let long_key = format!("X{}.XNAS", "A".repeat(300));
        for key in ["XNAS.AAPL", "k", long_key.as_str()] {
            let h = Headers::for_publish("ampy.bars.v1.BarBatch", "p@1", "src", key);
            assert!(h.i().generated_shape());
            let b = compact(&h);
            assert_eq!(b, general(&h));
            assert_eq!(Headers::decode_compact(&Bytes::from(b)).unwrap(), h);
            // Reading the generated text keeps the shape (the text is written aside).
            assert!(h.message_id().is_some() && h.traceparent().is_some());
            assert!(h.i().generated_shape());
            assert_eq!(compact(&h), general(&h));
        }
        let shapes: Vec<(Headers, bool)> = vec![
            (good(), true),
            (good().with(DEDUPE_KEY, "co_1"), false),
            (good().with("x-desk", "rates"), false),
            (good().with(SCHEMA_VERSION, "1.0.0"), false),
            (
                good().with(MESSAGE_ID, "018f5e2f-9b1c-76aa-8f7a-3b1d8f3ea0c2"),
                false,
            ),
            (
                good().with(TRACE_ID, "4bf92f3577b34da6a3ce929d0e0e4736"),
                false,
            ),
        ];
        for (h, shaped) in shapes {
            assert_eq!(h.i().generated_shape(), shaped, "{h:?}");
            assert_eq!(compact(&h), general(&h), "{h:?}");
        }
    }

    /// The straight decoder reads the generated layout as the general decoder does, and
    /// leaves every other input (every truncation, every changed byte) to it.
    #[test]
    fn the_generated_layout_decodes_as_the_general_decoder_does() {
        let general = |b: &[u8]| {
            // The general decoder alone: the same bytes behind a leading extension header
            // that the straight pass refuses, then compared without it.
            let mut v = vec![COMPACT_V1, TAG_EXT, 3, b'x', b'-', b'z', 0];
            v.extend_from_slice(&b[1..]);
            Headers::decode_compact(&Bytes::from(v)).map(|mut h| {
                h.remove("x-z");
                h
            })
        };
        let (mut straight, mut left) = (0, 0);
        for key in ["XNAS.AAPL", "k", "acct|co_1"] {
            let mut h = Headers::for_publish("ampy.bars.v1.BarBatch", "p@1", "src", key);
            // Fixed generated values, so that the counts below do not depend on the draw.
            h.m().parsed = Parsed {
                id: Some(*b"\x01\x8f\x5e\x2f\x9b\x1c\x76\xaa\x8f\x7a\x3b\x1d\x8f\x3e\xa0\xc2"),
                produced_us: Some(1_757_100_661_000_000),
                trace: TraceIds::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            };
            assert!(h.i().generated_shape());
            let mut buf = Vec::new();
            h.encode_compact(&mut buf);
            let fast = Headers::decode_generated(&Bytes::from(buf.clone())).unwrap();
            assert_eq!(fast, h);
            assert_eq!(fast, general(&buf).unwrap());
            assert_eq!(fast.message_uuid(), h.message_uuid());
            assert_eq!(fast.produced_at_micros(), h.produced_at_micros());
            assert_eq!(fast.trace_ids(), h.trace_ids());
            assert!(fast.consume_ready());
            // A change clears what the straight pass found; the rules judge the new value.
            let mut changed = fast.clone();
            changed.set(PRODUCER, " ");
            assert!(!changed.consume_ready());
            let err = changed.normalize_for_consume().unwrap_err();
            assert!(err.to_string().contains("`producer`"), "{err}");
            // A blank value read straight is not taken as ready either.
            let blank = Headers::for_publish("ampy.bars.v1.BarBatch", " ", "src", key);
            let mut b = Vec::new();
            blank.encode_compact(&mut b);
            let mut read = Headers::decode_generated(&Bytes::from(b)).unwrap();
            assert!(!read.consume_ready());
            assert!(read.normalize_for_consume().is_err());
            for cut in 1..buf.len() {
                assert!(Headers::decode_generated(&Bytes::copy_from_slice(&buf[..cut])).is_none());
            }
            for i in 1..buf.len() {
                for x in [0x00, 0x01, 0x20, 0x7f, 0x80, 0xff] {
                    let mut b = buf.clone();
                    b[i] = x;
                    match Headers::decode_generated(&Bytes::from(b.clone())) {
                        Some(f) => {
                            straight += 1;
                            assert_eq!(Some(&f), general(&b).as_ref().ok(), "{i} {x}");
                            assert_eq!(f.message_uuid(), general(&b).unwrap().message_uuid());
                        }
                        None => left += 1,
                    }
                }
            }
        }
        // Of the six changes to each byte of the three forms: those inside a text (to other
        // ASCII), the id, the time (within its range) and the trace context (not to zero)
        // decode straight; those to a tag, a length, or text out of ASCII are left. The
        // process run id (`run-<time>-<pid>`) is the one text whose length depends on the
        // process: of the six changes to each of its bytes in each form, four (to other ASCII)
        // decode straight and two are left, so they are counted apart.
        let run = crate::ids::process_run_id().len();
        assert_eq!((straight - 3 * 4 * run, left - 3 * 2 * run), (1595, 715));
    }

    /// The straight pass of the publish rules accepts only what the general rules accept,
    /// and all of it but text outside printable ASCII (which the general rules read char by
    /// char); what it refuses, the general rules judge, so the outcome and every error text
    /// stay theirs.
    #[test]
    fn the_generated_shape_passes_exactly_what_the_rules_pass() {
        let long = "p".repeat(MAX_HEADER_VALUE_BYTES + 1);
        let fqdns = [
            "ampy.bars.v1.BarBatch",
            "nodots",
            "ampy..x",
            "ampy.1bad",
            "",
        ];
        let texts = [
            "p@1",
            " p",
            "p ",
            "p\r",
            "",
            "p\u{e9}",
            "p\u{7f}",
            long.as_str(),
        ];
        let topics = [
            Topic::parse("ampy.prod.bars.v1.XNAS.AAPL").unwrap(),
            Topic::parse("ampy.prod.fills.v1.alpaca").unwrap(),
            Topic::parse("ampy.prod.ticks.v1.heartbeat.feed-1").unwrap(),
        ];
        let keys = [
            "XNAS.AAPL",
            "AAPL.XNAS",
            "acct|co_1",
            "feed-1",
            "bad key",
            "",
            "x\n",
        ];
        let (mut passed, mut general_only, mut refused) = (0, 0, 0);
        for topic in &topics {
            for fqdn in fqdns {
                for text in texts {
                    for key in keys {
                        for h in [
                            Headers::for_publish(fqdn, text, "src", key),
                            Headers::for_publish(fqdn, "p@1", text, key),
                        ] {
                            assert!(h.i().generated_shape());
                            let general = h.validate_for_publish_general(topic);
                            let fast = h.publish_shape_valid(topic);
                            assert!(!fast || general.is_ok(), "{topic} {h:?}");
                            let all = h.validate_for_publish(topic);
                            assert_eq!(
                                all.as_ref().map_err(|e| e.to_string()),
                                general.as_ref().map_err(|e| e.to_string())
                            );
                            passed += usize::from(fast);
                            general_only += usize::from(!fast && general.is_ok());
                            refused += usize::from(general.is_err());
                        }
                    }
                }
            }
        }
        // Valid: the good name, `p@1` and the key each topic takes (two on bars, one on
        // fills and on the heartbeat), as producer or as source: 8; with `pé` instead, valid
        // by the general rules only: 8; the other 1,664 of the 1,680 refused.
        assert_eq!((passed, general_only, refused), (8, 8, 1664));
    }

    #[test]
    fn damaged_compact_forms_are_refused_with_their_offset() {
        let mut buf = Vec::new();
        good().encode_compact(&mut buf);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "unknown format byte at offset 0"),
            (vec![0x00], "unknown format byte at offset 0"),
            (vec![COMPACT_V1, 0x99], "unknown tag at offset 1"),
            (
                vec![COMPACT_V1, 0x05, 0x09, b'a'],
                "length past the end at offset 2",
            ),
            (
                vec![COMPACT_V1, 0x05, 0x02, 0xff, 0xfe],
                "text is not UTF-8 at offset 3",
            ),
            (vec![COMPACT_V1, 0x05, 0x80], "bad length at offset 2"),
            (
                vec![COMPACT_V1, 0x05, 0x01, b'a', 0x05, 0x01, b'b'],
                "header repeated at offset 4",
            ),
            (
                vec![COMPACT_V1, TAG_ID_BIN, 1, 2],
                "value past the end at offset 1",
            ),
            (
                vec![COMPACT_V1, TAG_TRACE_ID_SAME],
                "refers to a missing traceparent",
            ),
            (
                vec![
                    COMPACT_V1, TAG_EXT, 0x0a, b'd', b'e', b'd', b'u', b'p', b'e', b'_', b'k',
                    b'e', b'y', 0x01, b'x',
                ],
                "known header written as an extension at offset 1",
            ),
            (buf[..buf.len() - 1].to_vec(), "past the end"),
        ];
        for (bytes, want) in cases {
            let err = Headers::decode_compact(&Bytes::from(bytes.clone())).unwrap_err();
            assert!(err.to_string().contains(want), "{bytes:?}: {err}");
        }
        // Every truncation and every single-byte change either decodes or is refused.
        for cut in 0..buf.len() {
            let _ = Headers::decode_compact(&Bytes::copy_from_slice(&buf[..cut]));
        }
        for i in 0..buf.len() {
            for x in [0x00, 0x7f, 0x80, 0xff] {
                let mut b = buf.clone();
                b[i] = x;
                let _ = Headers::decode_compact(&Bytes::from(b));
            }
        }
    }

    #[test]
    fn serde_form_is_a_plain_map() {
        let h = Headers::new().with("b", "2").with(MESSAGE_ID, "x");
        let j = serde_json::to_string(&h).unwrap();
        assert_eq!(j, r#"{"b":"2","message_id":"x"}"#);
        let back: Headers = serde_json::from_str(&j).unwrap();
        assert_eq!(back, h);
        assert_eq!(format!("{h:?}"), r#"{"b": "2", "message_id": "x"}"#);
    }

    #[test]
    fn a_map_set_in_a_loop_stays_bounded() {
        let mut h = good().with("x-note", "n");
        let long = "v".repeat(100);
        for i in 0..10_000 {
            h.set(DEDUPE_KEY, format!("{long}{i}"));
            h.set("x-note", format!("note {i}"));
            let inner = h.inner.as_deref().unwrap();
            assert!(inner.extra.len() <= MAX_EXTRA + 2, "{}", inner.extra.len());
        }
        assert_eq!(h.dedupe_key(), Some(format!("{long}9999").as_str()));
        assert_eq!(h.get("x-note"), Some("note 9999"));
        assert_eq!(h.len(), good().len() + 2);
        good().validate_for_publish(&topic()).unwrap();
        h.validate_for_publish(&topic()).unwrap();
    }

    #[test]
    fn fast_checks_agree_with_the_general_rules() {
        let slow_fqdn = |v: &str| {
            v.split('.').count() >= 2
                && v.split('.').all(|t| {
                    let mut c = t.chars();
                    c.next()
                        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
                })
        };
        for v in [
            "ampy.bars.v1.BarBatch",
            "a.b",
            "_a._b",
            "a",
            "a.",
            ".a",
            "a..b",
            "a.1b",
            "a.b-c",
            "a.b.",
            "",
            ".",
            "é.b",
            "a.b c",
        ] {
            assert_eq!(fqdn_ok(v.as_bytes()), slow_fqdn(v), "{v:?}");
            assert_eq!(check_fqdn(v).is_ok(), slow_fqdn(v), "{v:?}");
        }
        for (v, plain) in [
            ("1.0.0", true),
            ("10.20.30", true),
            ("0.0.0", true),
            ("01.0.0", false),
            ("1.0", false),
            ("1.0.0.0", false),
            ("1..0", false),
            ("1.0.0-rc.1", false),
            ("a.b.c", false),
            ("", false),
        ] {
            assert_eq!(plain_semver(v.as_bytes()), plain, "{v:?}");
        }
        assert!(check_semver("1.0.0-rc.1+b.2").is_ok());
        assert!(check_semver("01.0.0").is_err());
        for (v, ok) in [
            ("oms@host-1", true),
            (" oms", false),
            ("oms ", false),
            ("", false),
            ("   ", false),
            ("a\tb", false),
            ("a\u{7f}b", false),
            ("ünïcode ok", true),
            ("a b", true),
        ] {
            assert_eq!(check_text(PRODUCER, v).is_ok(), ok, "{v:?}");
        }
    }

    #[test]
    fn many_new_large_headers_keep_every_value() {
        // A value stored before its new name was (the fuzzer's case): no value may be moved
        // while the map is being written.
        let mut h = Headers::new();
        let value = |i: usize| format!("{i:03}{}", "x".repeat(120));
        for i in 0..200 {
            h.set(format!("x-h{i:03}"), value(i));
            h.set(MESSAGE_ID, value(i));
        }
        for i in 0..200 {
            assert_eq!(h.get(&format!("x-h{i:03}")), Some(value(i).as_str()), "{i}");
        }
        assert_eq!(h.message_id(), Some(value(199).as_str()));
        assert_eq!(h.len(), 201);
        let from_map: Headers = (0..200).map(|i| (format!("x-h{i:03}"), value(i))).collect();
        assert_eq!(from_map.len(), 200);
        assert_eq!(
            from_map
                .iter()
                .filter(|(k, v)| *v == value(k[3..].parse().unwrap()))
                .count(),
            200
        );
        let mut more = from_map.clone();
        more.insert_bytes("x-last", Bytes::from(value(7))).unwrap();
        more.fill_publish_defaults();
        assert_eq!(more.get("x-h150"), Some(value(150).as_str()));
        assert_eq!(more.get("x-last"), Some(value(7).as_str()));
    }
}
