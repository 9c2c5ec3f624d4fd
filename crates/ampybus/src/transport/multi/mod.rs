//! Reading a pattern that spans several streams, written once for the broker bindings: the
//! streams of a NATS pattern, the stream keys of a Redis pattern, the partitions of the Kafka
//! topics of a pattern. Live subscriptions (discovery of new streams and the merged fetch) are
//! in `live` ([`LiveStreams`], [`join_streams`], [`fetch_merged`]); replay pages are here.
//!
//! A binding only translates (see [`StreamSource`]): it names the streams a pattern spans now
//! (asked again on every page, so a stream created between two pages is found) and reads one
//! page of each stream from where [`Start`] says, in the stream's own order, keeping what the
//! [`Filter`] keeps (the window, the pattern, the keys: checked here, on the client). This
//! module merges those pages into one stream of [`StoredMessage`]s with one tie rule, and
//! tells where the next page starts with an opaque [`ReplayCursor`].
//!
//! **The tie rule.** Messages are merged by `(store time, producer time, message id, stream,
//! sequence)`: store time first; among messages stored in the same tick of the broker's clock
//! (one millisecond on Kafka and Redis) the producer's `produced_at` (so a batch keeps its
//! publish order across partitions), then its `message_id` (a UUIDv7, increasing within one
//! producing process: two messages of a batch produced in the same microsecond); then the
//! stream's name; then the sequence within the stream.
//! Each stream's own order is kept as it is (the merge takes the smallest head), so a stream
//! whose store times are not monotonic (Kafka producer timestamps) is still read in order.
//!
//! **The cursor** remembers the position in every stream (the last sequence taken from it), so
//! the next page resumes every stream exactly after what was returned: paging never skips and
//! never repeats a message, whatever the store times (two messages of different streams stored
//! in the same nanosecond on a page boundary are both returned, one per page).
//!
//! **`after_sequence` paging** (the older interface: the caller passes the last message's
//! `sequence`) stays lossless under one rule: with one stream `sequence` is the stream's own
//! sequence; with several it is the store time in nanoseconds since the epoch, and a page never
//! ends inside a run of messages with the same store time (it may then hold more than `limit`).
//! That assumes store times do not go backwards within a stream; the cursor does not.

use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::names;
use crate::topic::TopicPattern;
use crate::transport::{StoredMessage, WindowQuery};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::str::FromStr;

mod live;
// Only the NATS and Redis bindings read live streams this way: a build without either (e.g.
// `cargo build -p ampybus` on its own) has no user of these outside the module's tests.
#[cfg(any(feature = "nats", feature = "redis"))]
pub(crate) use live::{LiveState, LiveStreams, fetch as fetch_merged, join_streams};

/// The page size when a query's `limit` is 0.
pub(crate) const DEFAULT_LIMIT: usize = 1000;

/// The page size of `q` (`limit`, or [`DEFAULT_LIMIT`] when 0).
pub(crate) fn limit_of(q: &WindowQuery) -> usize {
    if q.limit == 0 { DEFAULT_LIMIT } else { q.limit }
}

/// The first whole millisecond at or after `t` (for brokers storing whole milliseconds).
#[cfg_attr(not(any(feature = "redis", feature = "kafka")), allow(dead_code))]
pub(crate) fn ceil_ms(t: DateTime<Utc>) -> i64 {
    let ms = t.timestamp_millis();
    if t.timestamp_subsec_nanos().is_multiple_of(1_000_000) {
        ms
    } else {
        ms + 1
    }
}

/// Nanoseconds since the epoch (0 before it; saturating after 2262).
pub(crate) fn nanos(t: DateTime<Utc>) -> u64 {
    match t.timestamp_nanos_opt() {
        Some(n) => u64::try_from(n).unwrap_or(0),
        None if t.timestamp() > 0 => u64::MAX,
        None => 0,
    }
}

/// The time `n` nanoseconds after the epoch.
fn from_nanos(n: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Where the next page of a replay starts: what [`ReplayPage::next`] returns, to put in
/// [`WindowQuery::cursor`]. Opaque; valid only for the query that produced it (same pattern,
/// window and keys). Its text form (`Display` / `FromStr`) lets a caller keep it.
///
/// On the embedded log (one sequence for every topic) it is a sequence; on a broker it holds
/// the position in every stream the pattern spans.
///
/// ```
/// use ampybus::transport::ReplayCursor;
/// let c = ReplayCursor::after_sequence(41);
/// assert_eq!(c.sequence(), Some(41));
/// let back: ReplayCursor = c.to_string().parse().unwrap();
/// assert_eq!(back, c);
/// assert!("nonsense".parse::<ReplayCursor>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplayCursor {
    pos: Pos,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pos {
    /// After this sequence of a log with one sequence (or an `after_sequence`).
    Sequence(u64),
    /// After these positions per stream; a stream not named starts at the window's start,
    /// or after `floor` (store time in nanoseconds) when set.
    Streams {
        floor: Option<u64>,
        at: BTreeMap<String, u64>,
    },
}

impl Default for Pos {
    fn default() -> Self {
        Pos::Sequence(0)
    }
}

impl ReplayCursor {
    /// The cursor after `sequence` of a log with one sequence (what `after_sequence` means).
    pub fn after_sequence(sequence: u64) -> ReplayCursor {
        ReplayCursor {
            pos: Pos::Sequence(sequence),
        }
    }

    /// The sequence, for a cursor of a log with one sequence; `None` for a per-stream cursor.
    pub fn sequence(&self) -> Option<u64> {
        match self.pos {
            Pos::Sequence(s) => Some(s),
            Pos::Streams { .. } => None,
        }
    }

    fn streams(floor: Option<u64>, at: BTreeMap<String, u64>) -> ReplayCursor {
        ReplayCursor {
            pos: Pos::Streams { floor, at },
        }
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

impl fmt::Display for ReplayCursor {
    /// `seq:N`, or `streams:FLOOR;NAME=SEQ,…` (floor `-` when unset; names in hex).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pos {
            Pos::Sequence(s) => write!(f, "seq:{s}"),
            Pos::Streams { floor, at } => {
                write!(f, "streams:")?;
                match floor {
                    Some(n) => write!(f, "{n}")?,
                    None => write!(f, "-")?,
                }
                write!(f, ";")?;
                for (i, (name, seq)) in at.iter().enumerate() {
                    if i > 0 {
                        write!(f, ",")?;
                    }
                    write!(f, "{}={seq}", hex(name))?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for ReplayCursor {
    type Err = Error;

    fn from_str(s: &str) -> Result<ReplayCursor> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::Config,
                format!("replay cursor `{s}`: {why} (a cursor is what a page's `next` printed)"),
            )
        };
        if let Some(n) = s.strip_prefix("seq:") {
            let n = n
                .parse()
                .map_err(|_| bad("`seq:` must be followed by a number"))?;
            return Ok(ReplayCursor::after_sequence(n));
        }
        let Some(rest) = s.strip_prefix("streams:") else {
            return Err(bad("must start with `seq:` or `streams:`"));
        };
        let (floor, list) = rest
            .split_once(';')
            .ok_or_else(|| bad("`streams:` needs `FLOOR;` before the positions"))?;
        let floor = match floor {
            "-" => None,
            n => Some(
                n.parse()
                    .map_err(|_| bad("the floor must be `-` or a number"))?,
            ),
        };
        let mut at = BTreeMap::new();
        for item in list.split(',').filter(|i| !i.is_empty()) {
            let (name, seq) = item
                .split_once('=')
                .ok_or_else(|| bad("each position must be `NAME=SEQ`"))?;
            let name = unhex(name).ok_or_else(|| bad("a stream name must be hex UTF-8"))?;
            let seq = seq
                .parse()
                .map_err(|_| bad("a position's sequence must be a number"))?;
            at.insert(name, seq);
        }
        Ok(ReplayCursor::streams(floor, at))
    }
}

/// One page of a replay: the messages, and where the next page starts.
///
/// ```
/// use ampybus::transport::{ReplayCursor, ReplayPage};
/// let p = ReplayPage { messages: Vec::new(), next: ReplayCursor::after_sequence(0) };
/// assert!(p.messages.is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayPage {
    /// The messages, in store order (an empty page means the end of the window).
    pub messages: Vec<StoredMessage>,
    /// Put it in [`WindowQuery::cursor`] to read the next page.
    pub next: ReplayCursor,
}

/// Where one stream's read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// Right after this sequence of the stream.
    After(u64),
    /// At its first message stored at or after this time; `None`: its oldest.
    Time(Option<DateTime<Utc>>),
}

/// One stream to read: the binding's handle of it and where to start.
#[derive(Debug, Clone)]
pub(crate) struct StreamRead<S> {
    pub(crate) stream: S,
    pub(crate) from: Start,
}

/// One message a binding read from a stream.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Its sequence within the stream (what [`Start::After`] takes).
    pub(crate) seq: u64,
    /// When the broker stored it.
    pub(crate) stored_at: DateTime<Utc>,
    /// The message.
    pub(crate) envelope: Envelope,
}

/// What a binding does with a message it scanned: see [`Filter::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Keep it (it counts towards the page).
    Keep,
    /// Skip it and go on.
    Skip,
    /// Stop reading this stream (stored at or after the window's end).
    Stop,
}

/// The client-side filter of a read: the window `[start, end)` (the start raised past the
/// `after_sequence` of an older-style page), the pattern, the keys.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pattern: TopicPattern,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    keys: Option<Vec<String>>,
}

impl Filter {
    /// The filter of `q`.
    pub(crate) fn of(q: &WindowQuery) -> Filter {
        Filter {
            pattern: q.pattern.clone(),
            start: q.start,
            end: q.end,
            keys: q.keys.clone(),
        }
    }

    /// The window's end (exclusive), for a binding that can bound its read on the broker.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn end(&self) -> Option<DateTime<Utc>> {
        self.end
    }

    /// Whether the store time alone rules a message out ([`Verdict::Stop`] at or after the
    /// end, [`Verdict::Skip`] before the start).
    pub(crate) fn check_time(&self, stored_at: DateTime<Utc>) -> Verdict {
        if self.end.is_some_and(|e| stored_at >= e) {
            return Verdict::Stop;
        }
        if self.start.is_some_and(|s| stored_at < s) {
            return Verdict::Skip;
        }
        Verdict::Keep
    }

    /// Whether the topic and the partition key are asked for (the pattern, then the keys).
    pub(crate) fn check_envelope(&self, envelope: &Envelope) -> bool {
        self.pattern.matches(&envelope.topic)
            && self.keys.as_ref().is_none_or(|keys| {
                let k = envelope.headers.get(names::PARTITION_KEY).unwrap_or("");
                keys.iter().any(|x| x == k)
            })
    }

    /// [`Filter::check_time`], then [`Filter::check_envelope`].
    pub(crate) fn check(&self, stored_at: DateTime<Utc>, envelope: &Envelope) -> Verdict {
        match self.check_time(stored_at) {
            Verdict::Keep if !self.check_envelope(envelope) => Verdict::Skip,
            v => v,
        }
    }
}

/// What a broker binding translates for a replay: which streams a pattern spans, and one page
/// of each.
#[async_trait]
pub(crate) trait StreamSource: Send + Sync {
    /// The binding's handle of one stream.
    type Stream: Clone + Send + Sync + 'static;

    /// The streams `pattern` spans now (discovery; asked on every page, so streams created
    /// meanwhile are found). An empty list means nothing to read.
    async fn streams(&self, pattern: &TopicPattern) -> Result<Vec<Self::Stream>>;

    /// The name of a stream: unique, stable, and its place in the tie rule.
    fn name(stream: &Self::Stream) -> String;

    /// Reads each stream from its start, in the stream's order, keeping what `filter` keeps
    /// ([`Filter::check`]) and stopping at [`Verdict::Stop`], at the end of what the stream
    /// held when the read began, or after `limit` kept messages. One result per read, in the
    /// same order. Fewer than `limit` kept messages must mean the stream has no more.
    async fn read(
        &self,
        reads: Vec<StreamRead<Self::Stream>>,
        filter: &Filter,
        limit: usize,
    ) -> Result<Vec<Vec<Entry>>>;
}

/// One stream's entries for [`merge`].
#[derive(Debug)]
pub(crate) struct StreamPage {
    pub(crate) name: String,
    pub(crate) entries: Vec<Entry>,
    /// The stream may hold more after these (it returned as many as it was asked for).
    pub(crate) more: bool,
}

/// What [`merge`] took.
#[derive(Debug)]
pub(crate) struct Merged {
    pub(crate) messages: Vec<StoredMessage>,
    /// The position in every stream after the page.
    pub(crate) at: BTreeMap<String, u64>,
    /// The page stopped where a stream had no more entries in hand but may hold more, so
    /// what comes next is not known from these pages.
    pub(crate) open: bool,
}

/// The merge key of the tie rule: `(store time ns, produced_at µs, message_id, stream,
/// sequence)`. The message id (a UUIDv7, increasing within one producing process) orders two
/// messages of one batch produced in the same microsecond.
fn key<'a>(name: &'a str, e: &'a Entry) -> (u64, i64, &'a str, &'a str, u64) {
    let produced = e
        .envelope
        .headers
        .produced_at_time()
        .map_or(i64::MAX, |t| t.timestamp_micros());
    let id = e.envelope.headers.message_id().unwrap_or_default();
    (nanos(e.stored_at), produced, id, name, e.seq)
}

/// Merges per-stream pages (each in its stream's order, kept as it is) by the tie rule of the
/// heads: at most `limit` messages, or, with `close_ties`, also every further message stored
/// in the same nanosecond as the last one taken. `at` is the position per stream before the
/// page and comes back advanced. `sequence` is the stream's own sequence when `multi` is
/// false, else the store time in nanoseconds.
pub(crate) fn merge(
    pages: Vec<StreamPage>,
    mut at: BTreeMap<String, u64>,
    limit: usize,
    multi: bool,
    close_ties: bool,
) -> Merged {
    let mut heads: Vec<(String, VecDeque<Entry>, bool)> = pages
        .into_iter()
        .map(|p| (p.name, p.entries.into(), p.more))
        .collect();
    let mut messages: Vec<StoredMessage> = Vec::new();
    let mut open = false;
    loop {
        let best = heads
            .iter()
            .enumerate()
            .filter_map(|(i, (name, q, _))| q.front().map(|e| (key(name, e), i)))
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(k, i)| (k.0, i));
        // A stream with nothing left in hand that may hold more: its next message could come
        // before any head, so the page ends here.
        if heads.iter().any(|(_, q, more)| q.is_empty() && *more) {
            open = true;
            break;
        }
        let Some((time, i)) = best else { break };
        if messages.len() >= limit {
            let tie = close_ties && messages.last().is_some_and(|m| nanos(m.stored_at) == time);
            if !tie {
                break;
            }
        }
        let (name, q, _) = &mut heads[i];
        let Some(e) = q.pop_front() else { break };
        at.insert(name.clone(), e.seq);
        messages.push(StoredMessage {
            sequence: if multi { nanos(e.stored_at) } else { e.seq },
            stored_at: e.stored_at,
            envelope: e.envelope,
        });
    }
    Merged { messages, at, open }
}

/// One page of `q` from `src`: the streams discovered now (or `known`, discovered by the same
/// call), each read from its position in the cursor (or `after_sequence`), merged by the tie
/// rule. Also answers the floor, the streams, and whether there are several.
async fn page<S: StreamSource + ?Sized>(
    src: &S,
    q: &WindowQuery,
    close_ties: bool,
    known: Option<Vec<S::Stream>>,
) -> Result<(Merged, Option<u64>, Vec<S::Stream>)> {
    let limit = limit_of(q);
    let mut filter = Filter::of(q);
    let (floor, at) = match q.cursor.as_ref().map(|c| &c.pos) {
        Some(Pos::Streams { floor, at }) => (*floor, at.clone()),
        Some(Pos::Sequence(s)) => (None, legacy(*s)),
        None => (None, legacy(q.after_sequence)),
    };
    let empty = |at: BTreeMap<String, u64>| Merged {
        messages: Vec::new(),
        at,
        open: false,
    };
    if let (Some(s), Some(e)) = (q.start, q.end)
        && s >= e
    {
        return Ok((empty(at), floor, Vec::new()));
    }
    let streams = match known {
        Some(s) => s,
        None => src.streams(&q.pattern).await?,
    };
    let multi = streams.len() > 1;
    // `after_sequence` N: with one stream its sequence; with several a store time.
    let (floor, at) = match at.get(LEGACY) {
        Some(&n) if multi => (Some(n), BTreeMap::new()),
        Some(&n) => (
            None,
            streams
                .iter()
                .map(|s| (S::name(s), n))
                .collect::<BTreeMap<_, _>>(),
        ),
        None => (floor, at),
    };
    if streams.is_empty() {
        return Ok((empty(at), floor, streams));
    }
    // After a store time: from the next nanosecond (whole milliseconds round up to the next).
    let start = match (q.start, floor) {
        (s, None) => s,
        (None, Some(f)) => Some(from_nanos(f.saturating_add(1))),
        (Some(s), Some(f)) => Some(s.max(from_nanos(f.saturating_add(1)))),
    };
    filter.start = start;
    let reads: Vec<StreamRead<S::Stream>> = streams
        .iter()
        .map(|s| StreamRead {
            stream: s.clone(),
            from: match at.get(&S::name(s)) {
                Some(&seq) => Start::After(seq),
                None => Start::Time(start),
            },
        })
        .collect();
    let got = src.read(reads, &filter, limit).await?;
    let pages = streams
        .iter()
        .zip(got)
        .map(|(s, entries)| StreamPage {
            name: S::name(s),
            more: entries.len() >= limit,
            entries,
        })
        .collect();
    Ok((merge(pages, at, limit, multi, close_ties), floor, streams))
}

/// The position map standing for an `after_sequence` until the streams are known.
const LEGACY: &str = "\0after_sequence";

fn legacy(after: u64) -> BTreeMap<String, u64> {
    if after == 0 {
        BTreeMap::new()
    } else {
        BTreeMap::from([(LEGACY.to_owned(), after)])
    }
}

/// [`crate::transport::ReplayByTime::read_page`] over a binding's streams.
pub(crate) async fn read_page<S: StreamSource + ?Sized>(
    src: &S,
    q: &WindowQuery,
) -> Result<ReplayPage> {
    let (m, floor, _) = page(src, q, false, None).await?;
    Ok(ReplayPage {
        messages: m.messages,
        next: ReplayCursor::streams(floor, m.at),
    })
}

/// [`crate::transport::ReplayByTime::read_window`] over a binding's streams: a page for
/// `after_sequence` paging (see the module's notes), its last store time never cut in two.
pub(crate) async fn read_window<S: StreamSource + ?Sized>(
    src: &S,
    q: &WindowQuery,
) -> Result<Vec<StoredMessage>> {
    let (mut m, mut floor, streams) = page(src, q, true, None).await?;
    let mut out = std::mem::take(&mut m.messages);
    if streams.len() < 2 || out.len() < limit_of(q) {
        return Ok(out);
    }
    // The page ended where a stream's next message is not in hand: take one message at a
    // time while it was stored in the same nanosecond as the last.
    let Some(last) = out.last().map(|l| nanos(l.stored_at)) else {
        return Ok(out);
    };
    let mut open = m.open;
    let mut at = m.at;
    while open {
        let mut pq = q.clone();
        pq.cursor = Some(ReplayCursor::streams(floor, at.clone()));
        pq.limit = 1;
        let (next, f, _) = page(src, &pq, false, Some(streams.clone())).await?;
        match next.messages.into_iter().next() {
            Some(n) if nanos(n.stored_at) == last => {
                out.push(n);
                (at, floor, open) = (next.at, f, true);
            }
            _ => open = false,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::Headers;
    use std::sync::Mutex;

    fn t(ns: u64) -> DateTime<Utc> {
        from_nanos(1_700_000_000_000_000_000 + ns)
    }

    fn env(topic: &str, key: &str, body: &str) -> Envelope {
        Envelope {
            topic: topic.into(),
            headers: Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", key),
            payload: body.as_bytes().to_vec().into(),
        }
    }

    /// One stored message: (sequence, store time ns, topic, key, body).
    type Row = (u64, u64, String, String, String);

    /// Streams held in memory: name → rows.
    struct Mem {
        streams: Mutex<BTreeMap<String, Vec<Row>>>,
        reads: Mutex<usize>,
    }

    impl Mem {
        fn new(data: &[(&str, u64, u64, &str)]) -> Mem {
            let mut streams: BTreeMap<String, Vec<_>> = BTreeMap::new();
            for (s, seq, ns, body) in data {
                streams.entry((*s).to_owned()).or_default().push((
                    *seq,
                    *ns,
                    format!("ampy.dev.{s}.v1.x"),
                    format!("k-{body}"),
                    (*body).to_owned(),
                ));
            }
            Mem {
                streams: Mutex::new(streams),
                reads: Mutex::new(0),
            }
        }
    }

    #[async_trait]
    impl StreamSource for Mem {
        type Stream = String;
        async fn streams(&self, pattern: &TopicPattern) -> Result<Vec<String>> {
            Ok(self
                .streams
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, ms)| ms.iter().any(|m| pattern.matches(&m.2)))
                .map(|(s, _)| s.clone())
                .collect())
        }
        fn name(stream: &String) -> String {
            stream.clone()
        }
        async fn read(
            &self,
            reads: Vec<StreamRead<String>>,
            filter: &Filter,
            limit: usize,
        ) -> Result<Vec<Vec<Entry>>> {
            *self.reads.lock().unwrap() += 1;
            let streams = self.streams.lock().unwrap();
            Ok(reads
                .iter()
                .map(|r| {
                    let mut out = Vec::new();
                    for (seq, ns, topic, key, body) in &streams[&r.stream] {
                        let ok = match r.from {
                            Start::After(a) => *seq > a,
                            Start::Time(None) => true,
                            Start::Time(Some(s)) => t(*ns) >= s,
                        };
                        if !ok {
                            continue;
                        }
                        let e = env(topic, key, body);
                        match filter.check(t(*ns), &e) {
                            Verdict::Stop => break,
                            Verdict::Skip => continue,
                            Verdict::Keep => {}
                        }
                        out.push(Entry {
                            seq: *seq,
                            stored_at: t(*ns),
                            envelope: e,
                        });
                        if out.len() >= limit {
                            break;
                        }
                    }
                    out
                })
                .collect())
        }
    }

    fn bodies(ms: &[StoredMessage]) -> Vec<String> {
        ms.iter()
            .map(|m| String::from_utf8_lossy(&m.envelope.payload).into_owned())
            .collect()
    }

    fn all() -> WindowQuery {
        WindowQuery::new(TopicPattern::parse("ampy.dev.>").unwrap())
    }

    async fn by_cursor(src: &Mem, mut q: WindowQuery) -> (Vec<String>, usize) {
        let mut out = Vec::new();
        let mut pages = 0;
        loop {
            let p = read_page(src, &q).await.unwrap();
            if p.messages.is_empty() {
                return (out, pages);
            }
            assert!(p.messages.len() <= limit_of(&q));
            pages += 1;
            out.extend(bodies(&p.messages));
            // Through the text form, as a caller keeping it would.
            q.cursor = Some(p.next.to_string().parse().unwrap());
        }
    }

    async fn by_sequence(src: &Mem, mut q: WindowQuery) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let p = read_window(src, &q).await.unwrap();
            let Some(last) = p.last() else { return out };
            q.after_sequence = last.sequence;
            out.extend(bodies(&p));
        }
    }

    /// Two messages of different streams stored in the same nanosecond fall on a page
    /// boundary: the old NATS merge (continue after the last store time) lost the second.
    #[tokio::test]
    async fn same_nanosecond_on_a_page_boundary_loses_nothing() {
        let src = Mem::new(&[
            ("bars", 1, 10, "b1"),
            ("news", 1, 20, "n1"),
            ("bars", 2, 30, "b2"),
            ("news", 2, 30, "n2"),
            ("news", 3, 40, "n3"),
        ]);
        let want = ["b1", "n1", "b2", "n2", "n3"];
        for limit in 1..=5 {
            let mut q = all();
            q.limit = limit;
            let (got, pages) = by_cursor(&src, q.clone()).await;
            assert_eq!(got, want, "cursor, limit {limit}");
            assert_eq!(pages, 5_usize.div_ceil(limit), "limit {limit}");
            assert_eq!(
                by_sequence(&src, q).await,
                want,
                "after_sequence, limit {limit}"
            );
        }
    }

    /// The case the old NATS merge lost: a page ends at `b2` (store time 30) while `n1` of
    /// another stream has the same store time. The cursor goes on with `n1`; an
    /// `after_sequence` page takes `n1` with `b2`.
    #[tokio::test]
    async fn the_second_of_a_tie_is_the_next_page() {
        let src = Mem::new(&[
            ("bars", 1, 10, "b1"),
            ("bars", 2, 30, "b2"),
            ("news", 1, 30, "n1"),
        ]);
        let mut q = all();
        q.limit = 2;
        let first = read_page(&src, &q).await.unwrap();
        assert_eq!(bodies(&first.messages), ["b1", "b2"]);
        assert_eq!(
            bodies(&read_window(&src, &q).await.unwrap()),
            ["b1", "b2", "n1"]
        );
        q.cursor = Some(first.next);
        assert_eq!(bodies(&read_page(&src, &q).await.unwrap().messages), ["n1"]);
    }

    /// A stream whose store times go backwards (Kafka producer timestamps) is read in its own
    /// order with the cursor, nothing skipped.
    #[tokio::test]
    async fn store_time_going_backwards_in_a_stream() {
        let src = Mem::new(&[
            ("bars", 0, 100, "b0"),
            ("bars", 1, 50, "b1"),
            ("news", 0, 75, "n0"),
        ]);
        let mut q = all();
        q.limit = 2;
        let (got, _) = by_cursor(&src, q).await;
        assert_eq!(got, ["n0", "b0", "b1"]);
    }

    /// Ties: store time, then the stream's name, then its sequence.
    #[test]
    fn tie_rule_orders_by_time_then_stream_then_sequence() {
        let e = |seq, ns| Entry {
            seq,
            stored_at: t(ns),
            envelope: Envelope {
                topic: "ampy.dev.news.v1.x".into(),
                headers: Headers::new(),
                payload: format!("{seq}@{ns}").into_bytes().into(),
            },
        };
        let pages = vec![
            StreamPage {
                name: "b".into(),
                entries: vec![e(1, 5), e(2, 5)],
                more: false,
            },
            StreamPage {
                name: "a".into(),
                entries: vec![e(7, 5), e(8, 9)],
                more: false,
            },
        ];
        let m = merge(pages, BTreeMap::new(), 10, true, false);
        assert_eq!(bodies(&m.messages), ["7@5", "1@5", "2@5", "8@9"]);
        assert_eq!(m.at, BTreeMap::from([("a".into(), 8), ("b".into(), 2)]));
        assert!(!m.open);
        assert!(m.messages.iter().all(|x| x.sequence == nanos(x.stored_at)));
    }

    /// Two messages of one batch stored in the same tick and produced in the same microsecond
    /// on two streams come in the order of their message ids (UUIDv7: publish order within a
    /// process), whatever the streams' names.
    #[test]
    fn a_tie_in_produced_at_is_broken_by_the_message_id() {
        let e = |seq, id: &str| Entry {
            seq,
            stored_at: t(5),
            envelope: Envelope {
                topic: "ampy.dev.news.v1.x".into(),
                headers: Headers::new()
                    .with("produced_at", "2026-12-06T05:00:00.000001Z")
                    .with("message_id", id),
                payload: format!("{seq}").into_bytes().into(),
            },
        };
        let pages = vec![
            StreamPage {
                name: "a".into(),
                entries: vec![e(1, "019aa9a0-0000-7001-8000-000000000000")],
                more: false,
            },
            StreamPage {
                name: "b".into(),
                entries: vec![e(2, "019aa9a0-0000-7000-8000-000000000000")],
                more: false,
            },
        ];
        let m = merge(pages, BTreeMap::new(), 10, true, false);
        assert_eq!(bodies(&m.messages), ["2", "1"]);
    }

    /// A stream that may hold more than it returned stops the merge when it runs out.
    #[test]
    fn a_stream_run_dry_that_may_hold_more_ends_the_page() {
        let e = |seq, ns| Entry {
            seq,
            stored_at: t(ns),
            envelope: env("ampy.dev.news.v1.x", "k", &format!("{seq}")),
        };
        let pages = vec![
            StreamPage {
                name: "a".into(),
                entries: vec![e(1, 1)],
                more: true,
            },
            StreamPage {
                name: "b".into(),
                entries: vec![e(1, 2), e(2, 3)],
                more: false,
            },
        ];
        let m = merge(pages, BTreeMap::new(), 5, true, true);
        assert_eq!(m.messages.len(), 1);
        assert!(m.open);
    }

    /// A window, keys, the pattern, and a stream created between two pages (rediscovery).
    #[tokio::test]
    async fn window_keys_and_rediscovery() {
        let src = Mem::new(&[
            ("bars", 1, 10, "b1"),
            ("bars", 2, 20, "b2"),
            ("bars", 3, 30, "b3"),
            ("news", 1, 15, "n1"),
            ("news", 2, 35, "n2"),
        ]);
        let mut q = all();
        q.start = Some(t(15));
        q.end = Some(t(35));
        q.limit = 2;
        assert_eq!(by_cursor(&src, q.clone()).await.0, ["n1", "b2", "b3"]);
        assert_eq!(by_sequence(&src, q.clone()).await, ["n1", "b2", "b3"]);
        let mut k = q.clone();
        k.keys = Some(vec!["k-b3".into(), "k-n1".into()]);
        assert_eq!(by_cursor(&src, k).await.0, ["n1", "b3"]);
        let mut p = q.clone();
        p.pattern = TopicPattern::parse("ampy.dev.news.>").unwrap();
        assert_eq!(by_cursor(&src, p).await.0, ["n1"]);

        // First page, then a third stream appears: it is read from the window's start.
        let first = read_page(&src, &q).await.unwrap();
        assert_eq!(bodies(&first.messages), ["n1", "b2"]);
        src.streams.lock().unwrap().insert(
            "fills".into(),
            vec![(1, 16, "ampy.dev.fills.v1.x".into(), "k".into(), "f1".into())],
        );
        q.cursor = Some(first.next);
        assert_eq!(by_cursor(&src, q).await.0, ["f1", "b3"]);
    }

    /// One stream: `sequence` is the stream's own and `after_sequence` is read as one.
    #[tokio::test]
    async fn one_stream_pages_by_its_own_sequence() {
        let src = Mem::new(&[
            ("bars", 5, 10, "b5"),
            ("bars", 6, 10, "b6"),
            ("bars", 9, 11, "b9"),
        ]);
        let mut q = all();
        q.limit = 1;
        let p = read_window(&src, &q).await.unwrap();
        assert_eq!((p.len(), p[0].sequence), (1, 5));
        assert_eq!(by_sequence(&src, q.clone()).await, ["b5", "b6", "b9"]);
        q.after_sequence = 6;
        assert_eq!(by_sequence(&src, q).await, ["b9"]);
    }

    /// A run of one store time longer than a page stays whole on `after_sequence` paging.
    #[tokio::test]
    async fn after_sequence_page_never_cuts_a_store_time() {
        let src = Mem::new(&[
            ("bars", 1, 10, "b1"),
            ("bars", 2, 10, "b2"),
            ("bars", 3, 10, "b3"),
            ("news", 1, 10, "n1"),
            ("news", 2, 11, "n2"),
        ]);
        let mut q = all();
        q.limit = 2;
        let p = read_window(&src, &q).await.unwrap();
        assert_eq!(bodies(&p), ["b1", "b2", "b3", "n1"]);
        assert_eq!(by_sequence(&src, q).await, ["b1", "b2", "b3", "n1", "n2"]);
    }

    #[test]
    fn cursor_text_round_trip_and_errors() {
        let c = ReplayCursor::streams(
            Some(7),
            BTreeMap::from([("RPL_dev_news".into(), 3), ("a=b,c;d".into(), u64::MAX)]),
        );
        assert_eq!(c.to_string().parse::<ReplayCursor>().unwrap(), c);
        let none = ReplayCursor::streams(None, BTreeMap::new());
        assert_eq!(none.to_string(), "streams:-;");
        assert_eq!(none.to_string().parse::<ReplayCursor>().unwrap(), none);
        assert_eq!(c.sequence(), None);
        for bad in ["seq:x", "streams:1", "streams:-;zz=1", "streams:-;61", "x"] {
            let e = bad.parse::<ReplayCursor>().unwrap_err();
            assert!(e.to_string().contains("replay cursor"), "{e}");
        }
    }

    #[test]
    fn ceil_ms_rounds_up_only_partial_milliseconds() {
        let whole = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        assert_eq!(ceil_ms(whole), 1_700_000_000_123);
        let part = whole + chrono::Duration::nanoseconds(1);
        assert_eq!(ceil_ms(part), 1_700_000_000_124);
    }

    #[test]
    fn filter_checks_window_pattern_and_keys() {
        let mut q = all();
        q.start = Some(t(10));
        q.end = Some(t(20));
        q.keys = Some(vec!["k1".into()]);
        let f = Filter::of(&q);
        let e = env("ampy.dev.news.v1.x", "k1", "x");
        assert_eq!(f.check(t(9), &e), Verdict::Skip);
        assert_eq!(f.check(t(10), &e), Verdict::Keep);
        assert_eq!(f.check(t(20), &e), Verdict::Stop);
        assert_eq!(
            f.check(t(10), &env("ampy.dev.news.v1.x", "k2", "x")),
            Verdict::Skip
        );
        assert_eq!(
            f.check(t(10), &env("ampy.prod.news.v1.x", "k1", "x")),
            Verdict::Skip
        );
    }
}
