//! What `bench-nats`, `bench-redis` and `bench-kafka` share: the per-round throughput of a raw client and of
//! ampybus on the same broker, reported as best / median / worst with the per-round ratio;
//! for `--mode consume`, the pre-fill, the runtime's side of a round and the exact-count check.

use crate::bench::stats::{series, spread};
use crate::error::{CliError, CliResult};
use ampybus::runtime::{Consumer, Outcome, handler_sync};
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
use serde_json::{Value, json};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// What `bench-nats`, `bench-redis` and `bench-kafka` measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RawMode {
    /// Publish throughput: ampybus `publish_wire` against the raw client's publish loop
    Publish,
    /// Consume-and-ack throughput: the consumer runtime (without and with dedupe) against the
    /// raw client's fetch-and-ack loop over the same pre-filled messages
    Consume,
}

/// The flags `bench-nats`, `bench-redis` and `bench-kafka` share, after their own
/// `--messages`, `--payload-bytes` and `--inflight` (`#[command(flatten)]`).
#[derive(Debug, clap::Args)]
pub struct RawBenchArgs {
    /// Rounds (each: one raw run, one ampybus run; consume: raw, runtime, runtime with dedupe)
    #[arg(long, value_name = "R", default_value_t = 5)]
    pub rounds: u64,
    /// What to measure
    #[arg(long, value_enum, default_value_t = RawMode::Publish)]
    pub mode: RawMode,
    /// Distinct partition keys of the pre-filled messages (--mode consume)
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub keys: u64,
    /// Handler workers of the runtime (--mode consume)
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub workers: u64,
    /// One JSON object
    #[arg(long)]
    pub json: bool,
}

/// Records the raw consume loops ask for per fetch (the runtime's default `max_in_flight`).
pub const RAW_FETCH: usize = 1024;

/// A consume round that does not finish in this time is an error.
pub const ROUND_LIMIT: Duration = Duration::from_secs(600);

/// A side of a consume round that reads nothing for this long has fallen short: an error.
pub const IDLE_LIMIT: Duration = Duration::from_secs(10);

/// A label no other run uses (process id and milliseconds), for subjects, prefixes,
/// namespaces and consumer names of `--mode consume`.
pub fn run_label() -> String {
    format!(
        "{}x{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis()
    )
}

/// The topic `bench-{binding} --mode publish` writes: `ampy.dev.bars.v1.bench{binding}.XNAS`.
pub fn publish_topic(binding: &str) -> String {
    format!("ampy.dev.bars.v1.bench{binding}.XNAS")
}

/// The topic of a `bench-{binding} --mode consume` run labelled `run` ([`run_label`]), one of
/// its own: `ampy.dev.bars.v1.bench{binding}c{run}.XNAS`.
pub fn consume_topic(binding: &str, run: &str) -> String {
    publish_topic(&format!("{binding}c{run}"))
}

/// [`envelopes`] on [`publish_topic`]`(binding)`.
pub fn publish_envelopes(binding: &str, n: u64, payload: usize) -> CliResult<Vec<Envelope>> {
    envelopes(&publish_topic(binding), n, payload)
}

/// `n` bar envelopes on `topic` with `payload` bytes each, over 100 partition keys, headers
/// filled as a publish would (the same input for the raw client and for ampybus).
pub fn envelopes(topic: &str, n: u64, payload: usize) -> CliResult<Vec<Envelope>> {
    envelopes_over(topic, 0..n, payload, 100)
}

/// Bar envelopes number `range` on `topic` with `payload` bytes each; envelope `i` has
/// partition key `XNAS.S{i % keys}`.
pub fn envelopes_over(
    topic: &str,
    range: std::ops::Range<u64>,
    payload: usize,
    keys: u64,
) -> CliResult<Vec<Envelope>> {
    let topic = Topic::parse(topic).map_err(|e| CliError::bus("topic", &e))?;
    let body = vec![b'x'; payload];
    let keys = keys.max(1);
    Ok(range
        .map(|i| {
            let mut h = Headers::for_publish(
                "ampy.bars.v1.BarBatch",
                "bench@1",
                "bench",
                &format!("XNAS.S{}", i % keys),
            );
            h.fill_publish_defaults();
            Envelope::new(&topic, h, body.clone())
        })
        .collect())
}

/// The ampybus side of a round: `envs` through `bus.publish_wire`, in msg/s.
pub async fn bus_round(bus: &ampybus::Bus, envs: Vec<Envelope>) -> CliResult<f64> {
    let n = envs.len();
    let start = std::time::Instant::now();
    bus.publish_wire(envs)
        .await
        .map_err(|e| CliError::bus("ampybus publish", &e))?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Pre-fills the broker for `--mode consume` (untimed): `n` messages on `topic` over `keys`
/// partition keys, through `publish_wire` in chunks of 5,000.
pub async fn fill(bus: &Bus, topic: &str, n: u64, payload: usize, keys: u64) -> CliResult<()> {
    let mut done = 0;
    while done < n {
        let k = (n - done).min(5000);
        bus.publish_wire(envelopes_over(topic, done..done + k, payload, keys)?)
            .await
            .map_err(|e| CliError::bus("pre-fill", &e))?;
        done += k;
    }
    Ok(())
}

/// What one side of a consume round read, and in how long.
#[derive(Debug, Clone, Copy)]
pub struct Consumed {
    /// Messages read and acknowledged.
    pub read: u64,
    /// Seconds from the start of its [`Clock`] to the last acknowledgement.
    pub secs: f64,
}

impl Consumed {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.read as f64 / self.secs
    }
}

/// Where a consume side's clock starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// When the consumer is created (its subscribe, group join, … are timed).
    AtStart,
    /// When the first message reaches user code (the handler; the raw loop's body): creating
    /// the consumer and joining its group are not timed.
    AtFirstMessage,
}

/// The runtime's side of a consume round: a [`Consumer`] named `name` on `pattern` with
/// `workers` workers and a no-op handler (dedupe with the bus's default store, or off), timed
/// from `clock` until `n` messages are handled and every one of them is settled (acked, and
/// recorded when dedupe is on). Fewer than `n` (nothing new for [`IDLE_LIMIT`], or not all
/// within [`ROUND_LIMIT`]), more, or any duplicate skipped is an error.
pub async fn runtime_consume(
    bus: &Bus,
    pattern: &TopicPattern,
    n: u64,
    workers: u64,
    name: &str,
    dedupe: bool,
    clock: Clock,
) -> CliResult<Consumed> {
    let started = Instant::now();
    let first = Arc::new(OnceLock::new());
    // A no-op that answers at once (`handler_sync`): the runtime's own cost is measured, not
    // an async closure's (an owned copy of the message and a boxed future per message).
    let handler = {
        let first = first.clone();
        handler_sync(move |_m| {
            first.get_or_init(Instant::now);
            Outcome::Ok
        })
    };
    let mut builder = Consumer::builder(bus.clone(), pattern.clone(), name)
        .handler(handler)
        .workers(workers as usize);
    if !dedupe {
        builder = builder.without_dedupe();
    }
    let handle = builder
        .start()
        .await
        .map_err(|e| CliError::bus("consumer", &e))?;
    let from = match clock {
        Clock::AtStart => None,
        Clock::AtFirstMessage => Some(first),
    };
    settle(handle, n, name, started, from).await
}

/// Waits until a started consumer handled `n` messages and settled every one of them, and
/// times it from `started` (or from the instant `first` holds, when given). Fewer than `n`
/// (nothing new for [`IDLE_LIMIT`], or not all within [`ROUND_LIMIT`]), more, or any
/// duplicate skipped is an error.
pub async fn settle(
    handle: ampybus::ConsumerHandle,
    n: u64,
    name: &str,
    started: Instant,
    first: Option<Arc<OnceLock<Instant>>>,
) -> CliResult<Consumed> {
    let (mut last, mut idle_since) = (0, Instant::now());
    loop {
        let s = handle.stats();
        if s.handled_ok >= n && s.in_flight == 0 {
            break;
        }
        if s.handled_ok != last {
            (last, idle_since) = (s.handled_ok, Instant::now());
        } else if idle_since.elapsed() > IDLE_LIMIT || started.elapsed() > ROUND_LIMIT {
            let e = shortfall(&format!("runtime consumer {name}"), s.handled_ok, n);
            handle.shutdown(Duration::from_secs(5)).await;
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = match first {
        None => started.elapsed(),
        Some(f) => f.get().copied().unwrap_or(started).elapsed(),
    }
    .as_secs_f64();
    let s = handle.shutdown(Duration::from_secs(30)).await;
    if s.handled_ok != n || s.skipped_duplicates != 0 || s.dead_lettered_total() != 0 {
        return Err(CliError::transport(format!(
            "runtime consumer {name}: expected exactly {n} handled, got {s:?}"
        )));
    }
    Ok(Consumed {
        read: s.handled_ok,
        secs,
    })
}

/// The consumer names (raw, runtime without dedupe, runtime with dedupe) of round `round` of
/// the consume run `label`.
pub fn consumer_names(label: &str, round: u64) -> [String; 3] {
    ["raw", "plain", "dedupe"].map(|s| format!("benchc{label}-{round}-{s}"))
}

/// The interleaved rounds of a consume run over `topic` (already filled with `messages`):
/// per round the raw loop (`raw`, given its consumer name), then the runtime without and with
/// dedupe, each with a fresh consumer name ([`consumer_names`]) and timed from its first
/// message.
pub async fn consume_rounds<F, Fut>(
    bus: &Bus,
    topic: &str,
    m: &RawBenchArgs,
    messages: u64,
    label: &str,
    raw_name: &'static str,
    mut raw: F,
) -> CliResult<RawVsBus>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = CliResult<Consumed>>,
{
    let pattern = TopicPattern::parse(topic).map_err(|e| CliError::bus("pattern", &e))?;
    let mut report = RawVsBus::new(raw_name);
    let first = Clock::AtFirstMessage;
    for round in 0..m.rounds {
        let [r, o, d] = consumer_names(label, round);
        let r = raw(r).await?;
        let o = runtime_consume(bus, &pattern, messages, m.workers, &o, false, first).await?;
        let d = runtime_consume(bus, &pattern, messages, m.workers, &d, true, first).await?;
        report.consume_round(round, messages, r, o, d)?;
    }
    Ok(report)
}

/// The report fields of a consume run every `bench-*` shares.
pub fn consume_config(messages: u64, payload_bytes: usize, m: &RawBenchArgs) -> Value {
    json!({"mode": "consume", "messages": messages, "payload_bytes": payload_bytes,
        "keys": m.keys, "workers": m.workers, "rounds": m.rounds, "raw_fetch": RAW_FETCH})
}

/// A consume loop's "not all there" error: `got` of `n`, then nothing for [`IDLE_LIMIT`].
pub fn shortfall(what: &str, got: u64, n: u64) -> CliError {
    CliError::transport(format!(
        "{what}: read only {got} of {n} messages, then nothing for {IDLE_LIMIT:?}"
    ))
}

/// Rounds of raw client vs ampybus, msg/s.
pub struct RawVsBus {
    raw_name: &'static str,
    raw: Vec<f64>,
    ours: Vec<f64>,
    ratios: Vec<f64>,
    /// `--mode consume`: the runtime with dedupe and its ratio to the raw loop.
    dedupe: Vec<f64>,
    dedupe_ratios: Vec<f64>,
    /// `--mode consume`: messages read per round by the raw loop, the runtime without and with
    /// dedupe.
    read: [Vec<u64>; 3],
}

impl RawVsBus {
    /// `raw_name` names the raw client (`async-nats`, `redis`) in the report.
    pub fn new(raw_name: &'static str) -> Self {
        RawVsBus {
            raw_name,
            raw: Vec::new(),
            ours: Vec::new(),
            ratios: Vec::new(),
            dedupe: Vec::new(),
            dedupe_ratios: Vec::new(),
            read: [Vec::new(), Vec::new(), Vec::new()],
        }
    }

    /// Records one round and reports it on stderr.
    pub fn round(&mut self, round: u64, raw: f64, ours: f64) {
        eprintln!(
            "round {round}: raw {} {raw:.0} msg/s, ampybus {ours:.0} msg/s, ratio {:.3}",
            self.raw_name,
            ours / raw
        );
        self.round_series(raw, ours);
    }

    /// Records one consume round (the raw loop, the runtime without dedupe, the runtime with
    /// dedupe) and reports it on stderr. A side that did not read exactly `n` messages is an
    /// error.
    pub fn consume_round(
        &mut self,
        round: u64,
        n: u64,
        raw: Consumed,
        ours: Consumed,
        dedupe: Consumed,
    ) -> CliResult<()> {
        let sides = [
            (format!("raw {}", self.raw_name), raw),
            ("runtime without dedupe".to_owned(), ours),
            ("runtime with dedupe".to_owned(), dedupe),
        ];
        for (side, c) in &sides {
            if c.read != n {
                return Err(CliError::transport(format!(
                    "round {round}: {side} read {} messages, expected exactly {n}",
                    c.read
                )));
            }
        }
        let (r, o, d) = (raw.rate(), ours.rate(), dedupe.rate());
        eprintln!(
            "round {round}: raw {} {r:.0} msg/s, runtime {o:.0} msg/s (ratio {:.3}), runtime with dedupe {d:.0} msg/s (ratio {:.3})",
            self.raw_name,
            o / r,
            d / r
        );
        self.round_series(r, o);
        self.dedupe.push(d);
        self.dedupe_ratios.push(d / r);
        for (i, (_, c)) in sides.iter().enumerate() {
            self.read[i].push(c.read);
        }
        Ok(())
    }

    fn round_series(&mut self, raw: f64, ours: f64) {
        self.raw.push(raw);
        self.ours.push(ours);
        self.ratios.push(ours / raw);
    }

    /// Prints the report on stdout: one JSON object (`config` fields plus the series: raw,
    /// ampybus, ratio; in consume mode also ampybus with dedupe, its ratio and the messages
    /// read) or a table.
    pub fn print(&self, as_json: bool, config: Value) {
        let consume = !self.dedupe.is_empty();
        if as_json {
            let mut v = config;
            v[format!("raw_{}_msg_s", self.raw_name.replace('-', "_"))] = series(&self.raw);
            v["ampybus_msg_s"] = series(&self.ours);
            v["ratio"] = series(&self.ratios);
            if consume {
                v["ampybus_dedupe_msg_s"] = series(&self.dedupe);
                v["ratio_dedupe"] = series(&self.dedupe_ratios);
                v["messages_read"] = json!({"raw": self.read[0], "ampybus": self.read[1],
                    "ampybus_dedupe": self.read[2]});
            }
            crate::util::outln!("{v}");
        } else {
            let (rb, rm, rw) = spread(&self.raw, true);
            let (ob, om, ow) = spread(&self.ours, true);
            let (xb, xm, xw) = spread(&self.ratios, true);
            let raw_label = format!("raw {} msg/s", self.raw_name);
            crate::util::outln!("{:<22} {:>12} {:>12} {:>12}", "", "best", "median", "worst");
            crate::util::outln!("{raw_label:<22} {rb:>12.0} {rm:>12.0} {rw:>12.0}");
            crate::util::outln!("{:<22} {ob:>12.0} {om:>12.0} {ow:>12.0}", "ampybus msg/s");
            if consume {
                let (db, dm, dw) = spread(&self.dedupe, true);
                crate::util::outln!(
                    "{:<22} {db:>12.0} {dm:>12.0} {dw:>12.0}",
                    "ampybus+dedupe msg/s"
                );
            }
            crate::util::outln!(
                "{:<22} {xb:>12.3} {xm:>12.3} {xw:>12.3}",
                "ratio ampybus/raw"
            );
            if consume {
                let (db, dm, dw) = spread(&self.dedupe_ratios, true);
                crate::util::outln!(
                    "{:<22} {db:>12.3} {dm:>12.3} {dw:>12.3}",
                    "ratio dedupe/raw"
                );
            }
        }
    }
}
