//! [`FeedMonitor`]: staleness per source and per partition key, gaps and duplicates from the
//! `sequence` header, late data (a message older than the lag threshold when it arrives, per
//! domain-level topic) — a plain state machine fed messages and clock readings, so its event
//! sequences are exact and testable without sleeping.

use super::clock::Now;
use crate::headers::Headers;
use crate::obs::domain_topic;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Wire name of the `sequence` extension header (unsigned decimal, per producer run and
/// partition key, from 1).
pub const SEQUENCE: &str = crate::headers::names::SEQUENCE;

/// What a [`FeedMonitor`] watches and its thresholds.
///
/// ```
/// use ampybus::runtime::feeds::FeedConfig;
/// use std::time::Duration;
/// let c = FeedConfig::new(Duration::from_secs(5));
/// assert_eq!(c.key_threshold(), Some(Duration::from_secs(5))); // keys: the same threshold
/// let c = c.key_stale_after(None).sequence(false);
/// assert_eq!((c.key_threshold(), c.checks_sequence()), (None, false));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedConfig {
    stale_after: Duration,
    key_stale_after: Option<Duration>,
    sequence: bool,
    lag_after: Option<Duration>,
}

impl FeedConfig {
    /// A source is stale after `stale_after` without a message (heartbeats count); a
    /// partition key after the same time without one of its messages; gaps are checked.
    pub fn new(stale_after: Duration) -> FeedConfig {
        FeedConfig {
            stale_after,
            key_stale_after: Some(stale_after),
            sequence: true,
            lag_after: Some(crate::runtime::lag::DEFAULT_LAG_ALERT),
        }
    }

    /// A message that arrives this much after its `produced_at` makes its domain-level topic
    /// lag (one [`FeedEventKind::Lag`] event, then [`FeedEventKind::LagRecovered`] with the
    /// first message under it again); default 30 s (seed 002's alert), `None` checks nothing.
    ///
    /// ```
    /// use ampybus::runtime::feeds::FeedConfig;
    /// use std::time::Duration;
    /// let c = FeedConfig::new(Duration::from_secs(5));
    /// assert_eq!(c.lag_threshold(), Some(Duration::from_secs(30)));
    /// assert_eq!(c.lag_after(None).lag_threshold(), None);
    /// ```
    pub fn lag_after(mut self, after: Option<Duration>) -> FeedConfig {
        self.lag_after = after;
        self
    }

    /// The late-data threshold, if checked.
    pub fn lag_threshold(&self) -> Option<Duration> {
        self.lag_after
    }

    /// The threshold for partition keys; `None` tracks no key (sources only).
    pub fn key_stale_after(mut self, after: Option<Duration>) -> FeedConfig {
        self.key_stale_after = after;
        self
    }

    /// Whether the `sequence` header is checked for gaps and duplicates (default on).
    pub fn sequence(mut self, on: bool) -> FeedConfig {
        self.sequence = on;
        self
    }

    /// The threshold for sources.
    pub fn source_threshold(&self) -> Duration {
        self.stale_after
    }

    /// The threshold for partition keys, if keys are tracked.
    pub fn key_threshold(&self) -> Option<Duration> {
        self.key_stale_after
    }

    /// Whether gaps and duplicates are reported.
    pub fn checks_sequence(&self) -> bool {
        self.sequence
    }

    /// The shortest threshold (how often a watcher must look).
    pub(crate) fn shortest(&self) -> Duration {
        self.key_stale_after
            .map_or(self.stale_after, |k| k.min(self.stale_after))
    }
}

/// What happened to a feed.
///
/// ```
/// use ampybus::runtime::feeds::FeedEventKind;
/// assert_eq!(FeedEventKind::Recovered.as_str(), "recovered");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeedEventKind {
    /// A source (no `key`) or a partition key went silent past its threshold.
    Stale,
    /// A stale source or key delivered a message again.
    Recovered,
    /// Sequence numbers were skipped (`missing` holds the range).
    Gap,
    /// A sequence number at or below the last one seen arrived again.
    Duplicate,
    /// A message arrived later after its `produced_at` than the lag threshold (`lag` holds
    /// how late); once per domain-level topic until it recovers.
    Lag,
    /// A lagging topic delivered a message under the threshold again.
    LagRecovered,
    /// A [`GapHealer`](super::GapHealer) asked its consumer to replay a gap's range (`missing`;
    /// `heal` holds the request id).
    HealRequested,
    /// The replay of a heal completed (`heal` holds what it read, applied and skipped).
    Healed,
    /// The replay of a heal was rejected, failed or got no final report (`heal.error` says
    /// why).
    HealFailed,
}

impl FeedEventKind {
    /// The `event` field of the JSON form.
    pub fn as_str(self) -> &'static str {
        match self {
            FeedEventKind::Stale => "stale",
            FeedEventKind::Recovered => "recovered",
            FeedEventKind::Gap => "gap",
            FeedEventKind::Duplicate => "duplicate",
            FeedEventKind::Lag => "lag",
            FeedEventKind::LagRecovered => "lag_recovered",
            FeedEventKind::HealRequested => "heal_requested",
            FeedEventKind::Healed => "healed",
            FeedEventKind::HealFailed => "heal_failed",
        }
    }
}

/// One feed-health event. `key` is absent on a source's stale/recovered events; `source` is
/// the source of the last message seen.
///
/// ```
/// use ampybus::runtime::feeds::{FeedEvent, FeedEventKind};
/// let e = FeedEvent {
///     kind: FeedEventKind::Gap,
///     topic: "ampy.dev.ticks.v1.trade.MSFT".into(),
///     key: Some("MSFT.XNAS".into()),
///     source: Some("feed-a".into()),
///     at: "2026-01-02T03:04:05Z".parse().unwrap(),
///     silent_for: None,
///     producer: Some("md@feed-a".into()),
///     run_id: Some("r1".into()),
///     missing: Some((3, 4)),
///     sequence: Some(5),
///     lag: None,
///     since: None,
///     heal: None,
/// };
/// assert_eq!(e.to_json()["event"], "gap");
/// assert_eq!(e.to_json()["at"], "2026-01-02T03:04:05.000000Z");
/// assert_eq!(e.to_string(),
///     "2026-01-02T03:04:05.000000Z gap topic=ampy.dev.ticks.v1.trade.MSFT key=MSFT.XNAS source=feed-a missing=3-4 sequence=5 producer=md@feed-a run_id=r1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEvent {
    /// What happened.
    pub kind: FeedEventKind,
    /// The topic of the last message seen (stale/recovered) or of the message (gap/duplicate).
    pub topic: String,
    /// The partition key, on key events, gaps and duplicates.
    pub key: Option<String>,
    /// The source.
    pub source: Option<String>,
    /// When it was noticed.
    pub at: DateTime<Utc>,
    /// Stale: time since the last message; recovered: how long it was silent.
    pub silent_for: Option<Duration>,
    /// Gap/duplicate: the `producer` header.
    pub producer: Option<String>,
    /// Gap/duplicate: the `run_id` header.
    pub run_id: Option<String>,
    /// Gap: the first and last missing sequence numbers.
    pub missing: Option<(u64, u64)>,
    /// Gap/duplicate: the sequence number that arrived.
    pub sequence: Option<u64>,
    /// Lag/lag recovered: receive time − `produced_at` of the message.
    pub lag: Option<Duration>,
    /// Gap: when the last message before the gap was stored (given to
    /// [`FeedMonitor::observe_stored`]), else its `produced_at` — where a replay of the
    /// missing range starts.
    pub since: Option<DateTime<Utc>>,
    /// Heal events: the replay request and its outcome.
    pub heal: Option<HealReport>,
}

/// The replay behind a heal event ([`FeedEventKind::HealRequested`], [`FeedEventKind::Healed`],
/// [`FeedEventKind::HealFailed`]).
///
/// ```
/// let r = ampybus::runtime::feeds::HealReport { request_id: "r1".into(), ..Default::default() };
/// assert_eq!((r.applied, r.error.as_deref()), (0, None));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealReport {
    /// The `ReplayRequest`'s id.
    pub request_id: String,
    /// Stored messages the replay read (healed, final events).
    pub read: u64,
    /// Messages the consumer's handler applied through the replay.
    pub applied: u64,
    /// Messages skipped as already applied.
    pub skipped: u64,
    /// Why the heal failed.
    pub error: Option<String>,
}

impl FeedEvent {
    pub(super) fn new(kind: FeedEventKind, topic: &str, at: DateTime<Utc>) -> FeedEvent {
        FeedEvent {
            kind,
            topic: topic.to_owned(),
            key: None,
            source: None,
            at,
            silent_for: None,
            producer: None,
            run_id: None,
            missing: None,
            sequence: None,
            lag: None,
            since: None,
            heal: None,
        }
    }

    /// One JSON object: `event`, `topic`, `at`, and `key`, `source`, `silent_ms`,
    /// `producer`, `run_id`, `first_missing`, `last_missing`, `sequence`, `lag_ms` where they
    /// apply.
    pub fn to_json(&self) -> Value {
        let mut o = json!({
            "event": self.kind.as_str(),
            "topic": self.topic,
            "at": crate::ids::format_time(self.at),
        });
        let m = o.as_object_mut().expect("an object");
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_owned(), v);
            }
        };
        put("key", self.key.clone().map(Value::from));
        put("source", self.source.clone().map(Value::from));
        put(
            "silent_ms",
            self.silent_for.map(|d| Value::from(d.as_millis() as u64)),
        );
        put("producer", self.producer.clone().map(Value::from));
        put("run_id", self.run_id.clone().map(Value::from));
        put("first_missing", self.missing.map(|m| Value::from(m.0)));
        put("last_missing", self.missing.map(|m| Value::from(m.1)));
        put("sequence", self.sequence.map(Value::from));
        put(
            "lag_ms",
            self.lag.map(|d| Value::from(d.as_millis() as u64)),
        );
        if let Some(h) = &self.heal {
            put("request_id", Some(Value::from(h.request_id.clone())));
            if self.kind == FeedEventKind::Healed {
                put("read", Some(Value::from(h.read)));
                put("applied", Some(Value::from(h.applied)));
                put("skipped", Some(Value::from(h.skipped)));
            }
            put("error", h.error.clone().map(Value::from));
        }
        o
    }
}

impl std::fmt::Display for FeedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} topic={}",
            crate::ids::format_time(self.at),
            self.kind.as_str(),
            self.topic
        )?;
        if let Some(k) = &self.key {
            write!(f, " key={k}")?;
        }
        if let Some(s) = &self.source {
            write!(f, " source={s}")?;
        }
        if let Some(d) = self.silent_for {
            write!(f, " silent_ms={}", d.as_millis())?;
        }
        if let Some((a, b)) = self.missing {
            write!(f, " missing={a}-{b}")?;
        }
        if let Some(s) = self.sequence {
            write!(f, " sequence={s}")?;
        }
        if let Some(d) = self.lag {
            write!(f, " lag_ms={}", d.as_millis())?;
        }
        if let Some(p) = &self.producer {
            write!(f, " producer={p}")?;
        }
        if let Some(r) = &self.run_id {
            write!(f, " run_id={r}")?;
        }
        if let Some(h) = &self.heal {
            write!(f, " request_id={}", h.request_id)?;
            if self.kind == FeedEventKind::Healed {
                write!(
                    f,
                    " read={} applied={} skipped={}",
                    h.read, h.applied, h.skipped
                )?;
            }
            if let Some(e) = &h.error {
                write!(f, " error={e:?}")?;
            }
        }
        Ok(())
    }
}

/// Counters of a [`FeedMonitor`] and what is stale now.
///
/// ```
/// let s = ampybus::runtime::feeds::FeedStats::default();
/// assert_eq!(s.gaps + s.duplicates, 0);
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FeedStats {
    /// Sources seen.
    pub sources: usize,
    /// Sources stale now, by name.
    pub stale_sources: Vec<String>,
    /// Partition keys seen (per domain-level topic).
    pub keys: usize,
    /// Partition keys stale now.
    pub stale_keys: usize,
    /// Gap events.
    pub gaps: u64,
    /// Sequence numbers reported missing, over every gap.
    pub missing: u64,
    /// Duplicate events.
    pub duplicates: u64,
    /// Messages whose `sequence` header was not an integer ≥ 1 (not checked).
    pub bad_sequence: u64,
    /// Seconds since the last message, per domain-level topic.
    pub seconds_since_last: BTreeMap<String, f64>,
}

impl FeedStats {
    /// The JSON form served on `/stats`.
    pub fn to_json(&self) -> Value {
        json!({
            "sources": self.sources,
            "stale_sources": self.stale_sources,
            "keys": self.keys,
            "stale_keys": self.stale_keys,
            "gaps": self.gaps,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "bad_sequence": self.bad_sequence,
            "seconds_since_last": self.seconds_since_last,
        })
    }
}

#[derive(Debug)]
struct Track {
    topic: String,
    source: Option<String>,
    last: Now,
    stale: bool,
}

#[derive(Debug)]
struct SeqTrack {
    run_id: String,
    last: u64,
    /// When the message numbered `last` was stored (or produced).
    last_at: Option<DateTime<Utc>>,
}

/// Feed health as a state machine: [`observe`](FeedMonitor::observe) each message,
/// [`tick`](FeedMonitor::tick) now and then; both return the events in a fixed order.
///
/// * **Staleness.** Every message refreshes its `source`; every message except heartbeats
///   (`ampy.{env}.ticks.v1.heartbeat.{source}`, whose key is the source id) refreshes its
///   partition key (tracked per domain-level topic and key). A tick finds each source, then
///   each key, silent for at least its threshold and not yet stale: one `stale` event each,
///   sources first, each group in name order. The next message of a stale source or key
///   emits `recovered` (source before key) before anything else. Only what was seen is
///   tracked: a feed that never spoke is not stale.
/// * **Sequence.** Per (`producer`, partition key) the last `sequence` of the current
///   `run_id` is kept. The first message of a run sets the baseline (no event, whatever its
///   number: messages before it were not seen). `last + 1` advances it; more skips: a `gap`
///   event with the missing range, and the baseline moves to the new number; `≤ last`: a
///   `duplicate` event, the baseline stays. A new `run_id` starts a new baseline. Messages
///   delivered by a replay (`replay_request_id`) are not checked; a malformed `sequence` is
///   counted in [`FeedStats::bad_sequence`] and not checked.
/// * **Memory.** One entry per source, per (domain-level topic, key) and per (producer, key)
///   seen; nothing is forgotten while the monitor lives.
///
/// ```
/// use ampybus::Headers;
/// use ampybus::runtime::feeds::{Clock, FeedConfig, FeedEventKind, FeedMonitor, ManualClock};
/// use std::time::Duration;
/// let clock = ManualClock::starting_at("2026-01-02T03:04:05Z".parse().unwrap());
/// let mut m = FeedMonitor::new(FeedConfig::new(Duration::from_secs(2)).key_stale_after(None));
/// let h = Headers::for_publish("ampy.ticks.v1.TradeBatch", "md@a", "feed-a", "MSFT.XNAS");
/// assert!(m.observe(clock.now(), "ampy.dev.ticks.v1.trade.MSFT", &h).is_empty());
/// clock.advance(Duration::from_secs(2));
/// let ev = m.tick(clock.now());
/// assert_eq!((ev.len(), ev[0].kind, ev[0].source.as_deref()), (1, FeedEventKind::Stale, Some("feed-a")));
/// let ev = m.observe(clock.now(), "ampy.dev.ticks.v1.trade.MSFT", &h);
/// assert_eq!(ev[0].kind, FeedEventKind::Recovered);
/// ```
#[derive(Debug)]
pub struct FeedMonitor {
    config: FeedConfig,
    sources: BTreeMap<String, Track>,
    keys: BTreeMap<(String, String), Track>,
    sequences: HashMap<(String, String), SeqTrack>,
    last_by_topic: BTreeMap<String, Now>,
    /// Domain-level topics whose last message came later than the lag threshold.
    lagging: BTreeMap<String, bool>,
    gaps: u64,
    missing: u64,
    duplicates: u64,
    bad_sequence: u64,
}

/// True for `ampy.{env}.ticks.v1.heartbeat.…`.
pub(crate) fn is_heartbeat_topic(topic: &str) -> bool {
    let mut t = topic.split('.');
    t.nth(2) == Some("ticks") && t.nth(1) == Some("heartbeat")
}

impl FeedMonitor {
    /// A monitor with nothing seen yet.
    pub fn new(config: FeedConfig) -> FeedMonitor {
        FeedMonitor {
            config,
            sources: BTreeMap::new(),
            keys: BTreeMap::new(),
            sequences: HashMap::new(),
            last_by_topic: BTreeMap::new(),
            lagging: BTreeMap::new(),
            gaps: 0,
            missing: 0,
            duplicates: 0,
            bad_sequence: 0,
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &FeedConfig {
        &self.config
    }

    /// Takes one message (its topic as carried and its headers) seen at `now`.
    pub fn observe(&mut self, now: Now, topic: &str, headers: &Headers) -> Vec<FeedEvent> {
        self.observe_stored(now, topic, headers, None)
    }

    /// [`observe`](FeedMonitor::observe) with the time the message was stored, when known
    /// (a consumer's delivery): a gap's [`since`](FeedEvent::since) is then the store time of
    /// the message before it, the time base of a replay window.
    pub fn observe_stored(
        &mut self,
        now: Now,
        topic: &str,
        headers: &Headers,
        stored_at: Option<DateTime<Utc>>,
    ) -> Vec<FeedEvent> {
        let mut out = Vec::new();
        let source = headers.source().filter(|s| !s.is_empty());
        let key = headers.partition_key().filter(|k| !k.is_empty());
        self.last_by_topic
            .insert(domain_topic(topic).to_owned(), now);
        if let Some(limit) = self.config.lag_after {
            self.check_lag(now, topic, headers, limit, &mut out);
        }
        if let Some(s) = source {
            let t = self.sources.entry(s.to_owned()).or_insert_with(|| Track {
                topic: topic.to_owned(),
                source: Some(s.to_owned()),
                last: now,
                stale: false,
            });
            refresh(t, now, topic, Some(s), None, &mut out);
        }
        if let (Some(k), Some(_)) = (key, self.config.key_stale_after)
            && !is_heartbeat_topic(topic)
        {
            let t = self
                .keys
                .entry((domain_topic(topic).to_owned(), k.to_owned()))
                .or_insert_with(|| Track {
                    topic: topic.to_owned(),
                    source: source.map(str::to_owned),
                    last: now,
                    stale: false,
                });
            refresh(t, now, topic, source, Some(k), &mut out);
        }
        if self.config.sequence
            && let Some(raw) = headers.get(SEQUENCE)
            && headers
                .get(crate::headers::names::REPLAY_REQUEST_ID)
                .is_none()
        {
            match raw.parse::<u64>() {
                Ok(seq) if seq >= 1 && raw.bytes().all(|b| b.is_ascii_digit()) => {
                    let at = stored_at.or_else(|| headers.produced_at_time());
                    self.check_sequence(now, topic, headers, key.unwrap_or(""), (seq, at), &mut out)
                }
                _ => {
                    self.bad_sequence += 1;
                    tracing::debug!(
                        topic,
                        sequence = raw,
                        "feed monitor: malformed sequence header not checked"
                    );
                }
            }
        }
        out
    }

    /// Late data: the message's age at `now` against `limit`, per domain-level topic.
    fn check_lag(
        &mut self,
        now: Now,
        topic: &str,
        headers: &Headers,
        limit: Duration,
        out: &mut Vec<FeedEvent>,
    ) {
        let Some(produced) = headers
            .produced_at_micros()
            .or_else(|| headers.produced_at_time().map(|t| t.timestamp_micros()))
        else {
            return;
        };
        let late_us = now.wall.timestamp_micros().saturating_sub(produced).max(0);
        let late = Duration::from_micros(late_us as u64);
        let over = late >= limit;
        let domain = domain_topic(topic);
        let was = self.lagging.get(domain).copied().unwrap_or(false);
        if over == was {
            return;
        }
        self.lagging.insert(domain.to_owned(), over);
        let kind = if over {
            FeedEventKind::Lag
        } else {
            FeedEventKind::LagRecovered
        };
        let mut e = FeedEvent::new(kind, topic, now.wall);
        e.key = headers.partition_key().map(str::to_owned);
        e.source = headers.source().map(str::to_owned);
        e.lag = Some(late);
        out.push(e);
    }

    fn check_sequence(
        &mut self,
        now: Now,
        topic: &str,
        headers: &Headers,
        key: &str,
        (seq, at): (u64, Option<DateTime<Utc>>),
        out: &mut Vec<FeedEvent>,
    ) {
        let producer = headers.producer().unwrap_or_default();
        let run = headers.run_id().unwrap_or_default();
        let id = (producer.to_owned(), key.to_owned());
        let Some(slot) = self.sequences.get_mut(&id) else {
            // The first message of this producer and key seen: the baseline.
            self.sequences.insert(
                id,
                SeqTrack {
                    run_id: run.to_owned(),
                    last: seq,
                    last_at: at,
                },
            );
            return;
        };
        if slot.run_id != run {
            // A new run numbers from 1 again: a new baseline.
            run.clone_into(&mut slot.run_id);
            slot.last = seq;
            slot.last_at = at;
            return;
        }
        let kind = if seq == slot.last + 1 {
            slot.last = seq;
            slot.last_at = at;
            return;
        } else if seq <= slot.last {
            self.duplicates += 1;
            FeedEventKind::Duplicate
        } else {
            self.gaps += 1;
            self.missing += seq - slot.last - 1;
            FeedEventKind::Gap
        };
        let mut e = FeedEvent::new(kind, topic, now.wall);
        e.key = (!key.is_empty()).then(|| key.to_owned());
        e.source = headers.source().map(str::to_owned);
        e.producer = Some(producer.to_owned());
        e.run_id = Some(run.to_owned());
        e.sequence = Some(seq);
        if kind == FeedEventKind::Gap {
            e.missing = Some((slot.last + 1, seq - 1));
            e.since = slot.last_at;
            slot.last = seq;
            slot.last_at = at;
        }
        out.push(e);
    }

    /// Looks for sources and keys that went silent; see [`FeedMonitor`] for the order.
    pub fn tick(&mut self, now: Now) -> Vec<FeedEvent> {
        let mut out = Vec::new();
        let src = self.config.stale_after;
        for (name, t) in self.sources.iter_mut() {
            if let Some(e) = went_stale(t, now, src, Some(name.as_str()), None) {
                out.push(e);
            }
        }
        if let Some(limit) = self.config.key_stale_after {
            for ((_, key), t) in self.keys.iter_mut() {
                let source = t.source.clone();
                if let Some(e) = went_stale(t, now, limit, source.as_deref(), Some(key.as_str())) {
                    out.push(e);
                }
            }
        }
        out
    }

    /// Counters and what is stale, with the seconds since the last message per
    /// domain-level topic as of `now`.
    pub fn stats(&self, now: Now) -> FeedStats {
        FeedStats {
            sources: self.sources.len(),
            stale_sources: self
                .sources
                .iter()
                .filter(|(_, t)| t.stale)
                .map(|(n, _)| n.clone())
                .collect(),
            keys: self.keys.len(),
            stale_keys: self.keys.values().filter(|t| t.stale).count(),
            gaps: self.gaps,
            missing: self.missing,
            duplicates: self.duplicates,
            bad_sequence: self.bad_sequence,
            seconds_since_last: self
                .last_by_topic
                .iter()
                .map(|(t, last)| (t.clone(), now.since(*last).as_secs_f64()))
                .collect(),
        }
    }
}

/// Records a message on a track; a stale track recovers.
fn refresh(
    t: &mut Track,
    now: Now,
    topic: &str,
    source: Option<&str>,
    key: Option<&str>,
    out: &mut Vec<FeedEvent>,
) {
    if t.stale {
        let mut e = FeedEvent::new(FeedEventKind::Recovered, topic, now.wall);
        e.key = key.map(str::to_owned);
        e.source = source.map(str::to_owned);
        e.silent_for = Some(now.since(t.last));
        out.push(e);
        t.stale = false;
    }
    t.last = now;
    if t.topic != topic {
        topic.clone_into(&mut t.topic);
    }
    if source.is_some() && t.source.as_deref() != source {
        t.source = source.map(str::to_owned);
    }
}

fn went_stale(
    t: &mut Track,
    now: Now,
    limit: Duration,
    source: Option<&str>,
    key: Option<&str>,
) -> Option<FeedEvent> {
    let silent = now.since(t.last);
    if t.stale || silent < limit {
        return None;
    }
    t.stale = true;
    let mut e = FeedEvent::new(FeedEventKind::Stale, &t.topic, now.wall);
    e.key = key.map(str::to_owned);
    e.source = source.map(str::to_owned);
    e.silent_for = Some(silent);
    Some(e)
}
