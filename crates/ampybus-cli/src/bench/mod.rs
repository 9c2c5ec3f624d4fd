//! `ampybus bench` and its hidden consumer process.
//!
//! Every measurement uses a fresh temporary data directory. Envelopes for the throughput runs
//! are built before the clock starts, so the runs time the bus (validation, codec, group
//! commit, SQLite) and the raw loop times SQLite alone on the same rows.

pub(crate) mod archive;
pub(crate) mod consume;
pub(crate) mod inbox;
pub(crate) mod kafka;
pub(crate) mod nats;
pub(crate) mod raw;
pub(crate) mod redis;
pub(crate) mod stats;

use stats::{round, spread_json};

use crate::error::{CliError, CliResult, EXIT_OK, EXIT_TIMEOUT};
use crate::util;
use ampybus::headers::{RAW_BYTES_SCHEMA, names};
use ampybus::transport::{Delivery, PublishReceipt, SubscribeSpec};
use ampybus::{Envelope, Headers, Topic, TopicPattern};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

/// What `bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// Publish throughput only (batched and one-by-one)
    Publish,
    /// End-to-end latency to a consumer in another process only
    E2e,
    /// Both publish and e2e
    Both,
    /// Consume-and-ack throughput: the runtime (dedupe on, --workers) against a bare fetch/ack loop
    Consume,
    /// `ampybus archive` into PostgreSQL (--to) against a raw COPY of the same rows
    Archive,
    /// Consume through a transactional inbox (--db) against the default dedupe store, and
    /// the outbox relay's throughput
    Inbox,
}

impl BenchMode {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            BenchMode::Publish => "publish",
            BenchMode::E2e => "e2e",
            BenchMode::Both => "both",
            BenchMode::Consume => "consume",
            BenchMode::Archive => "archive",
            BenchMode::Inbox => "inbox",
        }
    }
}

/// Commit durability of the temporary logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyncArg {
    /// fsync the WAL on every publish commit
    Full,
    /// no fsync on commit
    Normal,
}

impl SyncArg {
    /// The URL option value.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncArg::Full => "full",
            SyncArg::Normal => "normal",
        }
    }
}

/// `ampybus bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Messages per batched publish run and per e2e run
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub messages: u64,
    /// Messages per one-by-one publish run [default: min(--messages, 5000)]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub single_messages: Option<u64>,
    /// Payload size in bytes
    #[arg(long, value_name = "BYTES", default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    pub payload_bytes: u64,
    /// Messages per publish_batch call (and per raw sqlite transaction)
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch: u64,
    /// Batches in flight in the batched run (1: await each publish_batch before the next)
    #[arg(long, value_name = "K", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub inflight: u64,
    /// Distinct partition keys
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub keys: u64,
    /// What to measure
    #[arg(long, value_enum, default_value_t = BenchMode::Both)]
    pub mode: BenchMode,
    /// Publish rate of the e2e run, messages per second
    #[arg(long, value_name = "MSG_PER_SEC", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub rate: u64,
    /// Concurrent publishers in the one-by-one run (each awaits every publish)
    #[arg(long, value_name = "C", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub concurrency: u64,
    /// Handler workers of the runtime in --mode consume and inbox [default: 8; --mode inbox:
    /// the inbox consumer's own default, 8]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub workers: Option<u64>,
    /// Interleaved rounds
    #[arg(long, value_name = "R", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub rounds: u64,
    /// Also time the storage floor: the same frames appended to one file with one fdatasync
    /// per batch (no writer thread, lock or envelopes), and print the ratio. With --mode e2e
    /// --tier best-effort on a nats:// URL: raw async-nats core publish/subscribe rounds
    /// interleaved with the ampybus rounds (`e2e_raw`, `e2e_p99_vs_raw` in --json)
    #[arg(long)]
    pub raw: bool,
    /// Commit durability of the temporary logs (sync= URL option)
    #[arg(long, value_enum, default_value_t = SyncArg::Full)]
    pub sync: SyncArg,
    /// Parent directory of the temporary data directories [default: the system temp dir]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Print the results as one JSON object on stdout
    #[arg(long)]
    pub json: bool,
    /// --mode archive: the PostgreSQL database to archive into (its ampybus tables are
    /// emptied before every round), postgres://user:password@host:port/database
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// Durability tier of every topic of the command: best_effort (or best-effort),
    /// at_least_once, at_least_once_dedupe [default: the registry's, else at_least_once_dedupe].
    /// A registry entry wins
    #[arg(long, value_name = "TIER", value_parser = crate::util::parse_tier)]
    pub tier: Option<ampybus::tier::Tier>,
    /// --mode inbox: the database of the inbox and outbox (its ampybus inbox and outbox
    /// tables are emptied before every round), postgres://… or sqlite:///path
    #[arg(long, value_name = "URL")]
    pub db: Option<String>,
}

impl BenchArgs {
    /// The runtime's workers outside `--mode inbox`: `--workers`, else 8.
    pub fn consume_workers(&self) -> u64 {
        self.workers.unwrap_or(8)
    }
}

/// `ampybus bench-consumer` (internal).
#[derive(Debug, Args)]
pub struct BenchConsumerArgs {
    /// Pattern to subscribe to
    #[arg(long)]
    pub pattern: String,
    /// Durable consumer name
    #[arg(long)]
    pub durable: String,
    /// Stop after this many distinct messages
    #[arg(long)]
    pub expect: u64,
    /// Stop after this many seconds without a message
    #[arg(long, default_value = "10", value_parser = crate::util::parse_secs)]
    pub idle_timeout: f64,
    /// Durability tier of every topic of the command: best_effort (or best-effort),
    /// at_least_once, at_least_once_dedupe [default: the registry's, else at_least_once_dedupe].
    /// A registry entry wins
    #[arg(long, value_name = "TIER", value_parser = crate::util::parse_tier)]
    pub tier: Option<ampybus::tier::Tier>,
    /// Read with a plain async-nats core subscription (queue group = --durable) instead of
    /// the bus: the raw side of `bench --mode e2e --raw --tier best-effort` on NATS
    #[arg(long)]
    pub raw: bool,
}

const TOPIC: &str = "ampy.dev.bars.v1.XNAS.BENCH";

/// One timed run of N messages.
#[derive(Debug, Clone, Copy)]
struct Run {
    messages: u64,
    payload_bytes: u64,
    secs: f64,
    /// Size of the data directory after the round (apparent bytes, as `du -sb`) per message,
    /// for rounds on the embedded log.
    stored_per_msg: Option<f64>,
}

impl Run {
    fn msg_per_sec(&self) -> f64 {
        self.messages as f64 / self.secs.max(1e-9)
    }
    fn mb_per_sec(&self) -> f64 {
        (self.messages * self.payload_bytes) as f64 / 1e6 / self.secs.max(1e-9)
    }
    fn json(&self) -> Value {
        json!({
            "messages": self.messages,
            "secs": round(self.secs, 6),
            "msg_per_sec": round(self.msg_per_sec(), 1),
            "mb_per_sec": round(self.mb_per_sec(), 3),
            "stored_bytes_per_msg": self.stored_per_msg.map(|b| round(b, 1)),
        })
    }
}

/// Apparent size of every file under `dir` (what `du -sb` counts, less directory entries).
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// One end-to-end round.
#[derive(Debug, Clone)]
struct E2e {
    sent: u64,
    publish_secs: f64,
    report: Value,
}

impl E2e {
    fn us(&self, key: &str) -> f64 {
        self.report
            .get(key)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    }
}

struct Setup {
    args: BenchArgs,
    parent: PathBuf,
    topic: Topic,
    keys: Vec<String>,
    payload: Bytes,
    run_id: String,
    single_messages: u64,
    log_level: Option<String>,
    /// A broker URL to run against instead of temporary embedded logs.
    broker: Option<String>,
    /// Distinguishes this invocation's topics on a broker.
    tag: String,
}

/// One benchmark message: the contract's headers for `key`, the run id, the payload.
fn bench_envelope(topic: &Topic, key: &str, run_id: &str, payload: &Bytes) -> Envelope {
    let mut h = Headers::for_publish(RAW_BYTES_SCHEMA, "bench@ampybus", "ampybus-bench", key);
    h.set(names::RUN_ID, run_id);
    Envelope::new(topic, h, payload.clone())
}

fn rand_tag() -> u32 {
    let id = ampybus::ids::new_message_id();
    let hex: String = id.chars().filter(char::is_ascii_hexdigit).collect();
    u32::from_str_radix(&hex[hex.len() - 8..], 16).unwrap_or(0)
}

impl Setup {
    fn envelopes(&self, topic: &Topic, n: u64) -> Vec<Envelope> {
        (0..n)
            .map(|i| self.envelope(topic, &self.keys[(i % self.keys.len() as u64) as usize]))
            .collect()
    }

    fn envelope(&self, topic: &Topic, key: &str) -> Envelope {
        bench_envelope(topic, key, &self.run_id, &self.payload)
    }

    /// The topic of one run: on the embedded log every run has a log of its own; on a broker
    /// every run gets a topic of its own (`…BENCH.{tag}r{round}{what}`), so a new durable
    /// consumer sees only its run's messages.
    fn topic(&self, round: u64, what: &str) -> CliResult<Topic> {
        match &self.broker {
            None => Ok(self.topic.clone()),
            Some(_) => {
                let t = format!("{TOPIC}.{}r{round}{what}", self.tag);
                Topic::parse(&t).map_err(|e| CliError::bus("bench topic", &e))
            }
        }
    }

    fn tempdir(&self, what: &str) -> CliResult<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(&format!("ampybus-bench-{what}-"))
            .tempdir_in(&self.parent)
            .map_err(|e| {
                CliError::usage(format!(
                    "--dir {:?}: cannot create a temporary directory: {e}",
                    self.parent.display()
                ))
            })
    }

    fn url(&self, dir: &Path) -> String {
        match &self.broker {
            Some(url) => url.clone(),
            None => format!("file://{}?sync={}", dir.display(), self.args.sync.as_str()),
        }
    }

    fn bar(&self, label: &str, len: u64) -> ProgressBar {
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let style =
            ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} {per_sec} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        pb.set_style(style);
        pb.set_prefix(label.to_owned());
        pb
    }
}

/// Runs `bench`.
///
/// `url` is the global `--url`: a broker URL (`nats://`, …) runs the publish and e2e rounds
/// against that broker, on topics of their own; an embedded URL is not touched (every round
/// uses a temporary log).
pub async fn run(url: &str, args: BenchArgs, log_level: Option<&str>) -> CliResult<u8> {
    let broker = match ampybus::bus::transport_kind(url).map_err(|e| CliError::bus("--url", &e))? {
        ampybus::bus::TransportKind::Embedded => None,
        _ => Some(url.to_owned()),
    };
    // `--raw --mode e2e` on NATS with the best-effort tier: raw async-nats core pub/sub rounds
    // interleaved with the ampybus rounds (the latency the client and server give).
    let raw_e2e = broker.is_some() && args.raw && args.mode == BenchMode::E2e;
    if raw_e2e
        && (ampybus::bus::transport_kind(url).ok() != Some(ampybus::bus::TransportKind::Nats)
            || args.tier != Some(ampybus::tier::Tier::BestEffort))
    {
        return Err(CliError::usage(format!(
            "--url {:?}: --raw with --mode e2e against a broker compares raw async-nats core publish/subscribe: it needs a nats:// URL and --tier best-effort",
            ampybus::bus::redact(url)
        )));
    }
    if broker.is_some()
        && ((args.raw && !raw_e2e)
            || matches!(
                args.mode,
                BenchMode::Consume | BenchMode::Archive | BenchMode::Inbox
            ))
    {
        return Err(CliError::usage(format!(
            "--url {:?}: --raw (except with --mode e2e --tier best-effort on NATS) and --mode consume measure the embedded log; against NATS use `ampybus bench-nats` for the raw-client comparison",
            ampybus::bus::redact(url)
        )));
    }
    let parent = match &args.dir {
        Some(d) => std::fs::canonicalize(d)
            .map_err(|e| CliError::usage(format!("--dir {:?}: {e}", d.display())))?,
        None => std::env::temp_dir(),
    };
    let topic = Topic::parse(TOPIC).map_err(|e| CliError::bus("bench topic", &e))?;
    let keys: Vec<String> = (0..args.keys)
        .map(|i| ampybus::partition::bars(&format!("S{i}"), "XNAS"))
        .collect();
    let payload: Bytes = (0..args.payload_bytes)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let single_messages = args.single_messages.unwrap_or(args.messages.min(5000));
    let setup = Setup {
        parent,
        topic,
        keys,
        payload,
        run_id: util::new_run_id(),
        single_messages,
        log_level: log_level.map(str::to_owned),
        broker,
        tag: format!("{:08x}", rand_tag()),
        args,
    };
    let a = &setup.args;
    if a.mode == BenchMode::Consume {
        return crate::bench::consume::run(a, &setup.parent).await;
    }
    if a.mode == BenchMode::Archive {
        return crate::bench::archive::run(a, &setup.parent).await;
    }
    if a.mode == BenchMode::Inbox {
        return crate::bench::inbox::run(a, &setup.parent).await;
    }
    let publish = matches!(a.mode, BenchMode::Publish | BenchMode::Both);
    let e2e = matches!(a.mode, BenchMode::E2e | BenchMode::Both);

    let mut raw_runs = Vec::new();
    let mut batched_runs = Vec::new();
    let mut single_runs = Vec::new();
    let mut e2e_runs = Vec::new();
    let mut e2e_raw_runs = Vec::new();
    for round in 1..=a.rounds {
        if publish {
            if a.raw {
                raw_runs.push(raw_round(&setup, round).await?);
            }
            batched_runs.push(batched_round(&setup, round).await?);
            single_runs.push(single_round(&setup, round).await?);
        }
        if e2e {
            if raw_e2e {
                e2e_raw_runs.push(e2e_round(&setup, round, true).await?);
            }
            e2e_runs.push(e2e_round(&setup, round, false).await?);
        }
    }

    let report = report_json(
        &setup,
        &raw_runs,
        &batched_runs,
        &single_runs,
        &e2e_runs,
        &e2e_raw_runs,
    );
    let mut out = util::Out::new();
    if a.json {
        out.line(&report.to_string())?;
    } else {
        out.line(&report_text(&setup, &report))?;
    }
    out.flush()?;
    Ok(EXIT_OK)
}

async fn raw_round(s: &Setup, round: u64) -> CliResult<Run> {
    let dir = s.tempdir("raw")?;
    let envs = s.envelopes(&s.topic, s.args.messages);
    let pb = s.bar(&format!("round {round}: raw file appends"), s.args.messages);
    let (path, batch, sync, pb2) = (
        dir.path().join("raw.seg"),
        s.args.batch as usize,
        s.args.sync,
        pb.clone(),
    );
    let secs = tokio::task::spawn_blocking(move || {
        ampybus::transport::embedded::raw_append_loop(
            &path,
            &envs,
            batch,
            matches!(sync, SyncArg::Full),
            |n| pb2.inc(n as u64),
        )
    })
    .await
    .map_err(|e| CliError::transport(format!("raw append task failed: {e}")))?
    .map_err(|e| CliError::bus("raw append loop", &e))?;
    pb.finish_and_clear();
    Ok(Run {
        messages: s.args.messages,
        payload_bytes: s.args.payload_bytes,
        secs,
        stored_per_msg: None,
    })
}

async fn batched_round(s: &Setup, round: u64) -> CliResult<Run> {
    let dir = s.tempdir("batched")?;
    let bus = util::connect(&s.url(dir.path())).await?;
    // Cut into batches before the clock starts (cutting a million-message Vec from the front
    // while timing would move the rest every time).
    let mut envs: std::collections::VecDeque<Vec<Envelope>> = {
        let mut all = s
            .envelopes(&s.topic(round, "b")?, s.args.messages)
            .into_iter();
        let batch = (s.args.batch as usize).max(1);
        let mut out = std::collections::VecDeque::new();
        loop {
            let chunk: Vec<Envelope> = all.by_ref().take(batch).collect();
            if chunk.is_empty() {
                break;
            }
            out.push_back(chunk);
        }
        out
    };
    let pb = s.bar(&format!("round {round}: ampybus batched"), s.args.messages);
    let inflight = s.args.inflight as usize;
    let started = Instant::now();
    let mut stored = 0u64;
    type Pending = tokio::task::JoinHandle<(u64, ampybus::Result<Vec<PublishReceipt>>)>;
    let mut pending: std::collections::VecDeque<Pending> =
        std::collections::VecDeque::with_capacity(inflight);
    loop {
        if pending.len() == inflight || (envs.is_empty() && !pending.is_empty()) {
            let Some(task) = pending.pop_front() else {
                break;
            };
            let (n, r) = task
                .await
                .map_err(|e| CliError::transport(format!("bench publisher task failed: {e}")))?;
            stored += r
                .map_err(|e| CliError::bus("bench publish_batch", &e))?
                .len() as u64;
            pb.inc(n);
            continue;
        }
        let Some(chunk) = envs.pop_front() else {
            break;
        };
        let bus = bus.clone();
        pending.push_back(tokio::spawn(async move {
            let n = chunk.len() as u64;
            (n, bus.publish_batch(chunk).await)
        }));
    }
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    util::close(&bus).await?;
    check_count("batched publish", stored, s.args.messages)?;
    let stored_per_msg = s
        .broker
        .is_none()
        .then(|| dir_bytes(dir.path()) as f64 / stored.max(1) as f64);
    Ok(Run {
        messages: stored,
        payload_bytes: s.args.payload_bytes,
        secs,
        stored_per_msg,
    })
}

async fn single_round(s: &Setup, round: u64) -> CliResult<Run> {
    let dir = s.tempdir("single")?;
    let bus = util::connect(&s.url(dir.path())).await?;
    let c = s.args.concurrency as usize;
    let mut parts: Vec<Vec<Envelope>> = vec![Vec::new(); c];
    for (i, e) in s
        .envelopes(&s.topic(round, "s")?, s.single_messages)
        .into_iter()
        .enumerate()
    {
        parts[i % c].push(e);
    }
    let pb = s.bar(
        &format!("round {round}: ampybus 1-by-1 c={c}"),
        s.single_messages,
    );
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(c);
    for part in parts {
        let (bus, pb) = (bus.clone(), pb.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            for env in part {
                bus.publish_envelope(env).await?;
                n += 1;
                pb.inc(1);
            }
            Ok::<u64, ampybus::Error>(n)
        }));
    }
    let mut stored = 0u64;
    for t in tasks {
        stored += t
            .await
            .map_err(|e| CliError::transport(format!("bench publisher task failed: {e}")))?
            .map_err(|e| CliError::bus("bench publish", &e))?;
    }
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    util::close(&bus).await?;
    check_count("one-by-one publish", stored, s.single_messages)?;
    Ok(Run {
        messages: stored,
        payload_bytes: s.args.payload_bytes,
        secs,
        stored_per_msg: None,
    })
}

fn check_count(what: &str, got: u64, want: u64) -> CliResult<()> {
    if got == want {
        Ok(())
    } else {
        Err(CliError::transport(format!(
            "bench {what}: {got} receipts for {want} messages"
        )))
    }
}

/// One end-to-end round: a consumer process, then messages published at `--rate`. `raw`: both
/// sides are plain async-nats core clients (same subject, same header map per message as the
/// best-effort tier writes, one flush per tick), so the round measures client and server alone.
async fn e2e_round(s: &Setup, round: u64, raw: bool) -> CliResult<E2e> {
    let n = s.args.messages;
    let rate = s.args.rate as f64;
    let dir = s.tempdir("e2e")?;
    let url = s.url(dir.path());
    let topic = s.topic(round, if raw { "x" } else { "e" })?;
    // Create the log before the consumer opens it.
    let bus = util::connect(&url).await?;
    let raw_client = match raw {
        true => Some(raw_nats(&url).await?),
        false => None,
    };
    let name = format!("bench-{}", ampybus::ids::new_message_id());
    let exe = std::env::current_exe()
        .map_err(|e| CliError::transport(format!("bench: cannot find own executable: {e}")))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--url").arg(&url);
    if let Some(l) = &s.log_level {
        cmd.arg("--log-level").arg(l);
    }
    cmd.args([
        "bench-consumer",
        "--pattern",
        topic.as_str(),
        "--durable",
        &name,
    ])
    .arg("--expect")
    .arg(n.to_string())
    .args(raw.then_some("--raw"))
    .args(s.args.tier.iter().flat_map(|t| ["--tier", t.as_str()]))
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        CliError::transport(format!("bench: cannot start the consumer process: {e}"))
    })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| CliError::transport("bench: consumer stdout missing"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let timeout_err = |what: &str| CliError {
        code: EXIT_TIMEOUT,
        message: format!("bench: the consumer process {what}"),
    };
    match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
        Ok(Ok(Some(l))) if l.trim() == "READY" => {}
        Ok(Ok(other)) => {
            return Err(CliError::transport(format!(
                "bench: the consumer process failed to start (said {other:?}); see its error above"
            )));
        }
        Ok(Err(e)) => {
            return Err(CliError::transport(format!(
                "bench: reading the consumer: {e}"
            )));
        }
        Err(_) => return Err(timeout_err("did not get ready within 60 s")),
    }

    let side = if raw { "raw e2e" } else { "e2e" };
    let pb = s.bar(&format!("round {round}: {side} @{} msg/s", s.args.rate), n);
    let batch = s.args.batch;
    // The publishing loop runs as a task of the runtime, as a service's producer does (not on
    // the thread that blocks on the command), so what it hands to the connection's tasks is
    // picked up by the same worker thread without waking another.
    let make = {
        let (keys, run_id, payload) = (s.keys.clone(), s.run_id.clone(), s.payload.clone());
        let topic = topic.clone();
        move |key: &mut usize| {
            *key = (*key + 1) % keys.len();
            bench_envelope(&topic, &keys[*key], &run_id, &payload)
        }
    };
    let (bus2, pb2) = (bus.clone(), pb.clone());
    let started = Instant::now();
    let sent = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut key = 0usize;
        while sent < n {
            let due = ((started.elapsed().as_secs_f64() * rate) as u64).min(n);
            if due <= sent {
                let at = started + Duration::from_secs_f64((sent + 1) as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                continue;
            }
            let k = (due - sent).min(batch);
            let envs: Vec<Envelope> = (0..k).map(|_| make(&mut key)).collect();
            match &raw_client {
                Some(c) => raw_publish(c, envs).await?,
                None => {
                    bus2.publish_batch(envs)
                        .await
                        .map_err(|e| CliError::bus("bench e2e publish", &e))?;
                }
            }
            sent += k;
            pb2.set_position(sent);
        }
        Ok::<u64, CliError>(sent)
    })
    .await
    .map_err(|e| CliError::transport(format!("bench e2e publisher task failed: {e}")))??;
    let publish_secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();

    let wait = Duration::from_secs(60);
    let report = match tokio::time::timeout(wait, lines.next_line()).await {
        Ok(Ok(Some(l))) => serde_json::from_str::<Value>(&l).map_err(|e| {
            CliError::transport(format!(
                "bench: the consumer's report is not JSON ({e}): {l}"
            ))
        })?,
        Ok(Ok(None)) => {
            return Err(CliError::transport(
                "bench: the consumer process exited without a report; see its error above",
            ));
        }
        Ok(Err(e)) => {
            return Err(CliError::transport(format!(
                "bench: reading the consumer: {e}"
            )));
        }
        Err(_) => {
            return Err(timeout_err(
                "did not report within 60 s after the last publish",
            ));
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    util::close(&bus).await?;
    Ok(E2e {
        sent,
        publish_secs,
        report,
    })
}

/// A plain async-nats client on the servers of a `nats://` URL (its ampybus options ignored).
async fn raw_nats(url: &str) -> CliResult<async_nats::Client> {
    let opts = ampybus::transport::nats::NatsOptions::from_url(url)
        .map_err(|e| CliError::bus("--url", &e))?;
    async_nats::connect(opts.servers.clone())
        .await
        .map_err(|e| CliError::transport(format!("raw connect: {e}")))
}

/// The raw side's publish of one tick: a core publish per message with the headers the
/// best-effort tier writes (`Nats-Msg-Id` included), then one flush.
async fn raw_publish(c: &async_nats::Client, envs: Vec<Envelope>) -> CliResult<()> {
    let fail = |e: &dyn std::fmt::Display| CliError::transport(format!("raw publish: {e}"));
    for env in envs {
        let mut hm = async_nats::HeaderMap::new();
        for (k, v) in env.headers.iter() {
            hm.insert(k, v);
        }
        if let Some(id) = env.headers.message_id() {
            hm.insert("Nats-Msg-Id", id);
        }
        c.publish_with_headers(env.topic.to_string(), hm, env.payload)
            .await
            .map_err(|e| fail(&e))?;
    }
    c.flush().await.map_err(|e| fail(&e))
}

/// What the consumer process reads from: the bus, or (`--raw`) a plain async-nats core
/// subscription in the queue group of the durable name.
enum E2eSource {
    Bus(Box<dyn ampybus::transport::Subscription>),
    Raw(async_nats::Subscriber),
}

/// One received message: its id and `produced_at` (µs), as each side reads them.
struct Seen {
    id: Option<String>,
    produced_us: Option<i64>,
}

impl E2eSource {
    /// Waits up to `idle` for a message, then takes what else is already there (up to 1,000);
    /// acks (bus side) once read.
    async fn next_batch(&mut self, idle: Duration) -> CliResult<Vec<Seen>> {
        use futures::{FutureExt, StreamExt};
        match self {
            E2eSource::Bus(sub) => {
                let got = sub
                    .fetch(1000, idle)
                    .await
                    .map_err(|e| CliError::bus("fetch", &e))?;
                let seen = got
                    .iter()
                    .map(|d| Seen {
                        id: d.envelope.headers.message_id().map(str::to_owned),
                        produced_us: d
                            .envelope
                            .headers
                            .produced_at_time()
                            .map(|t| t.timestamp_micros()),
                    })
                    .collect();
                Delivery::ack_all(got)
                    .await
                    .map_err(|(e, _)| CliError::bus("ack", &e))?;
                Ok(seen)
            }
            E2eSource::Raw(sub) => {
                let first = match tokio::time::timeout(idle, sub.next()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(CliError::transport("raw subscription closed")),
                    Err(_) => return Ok(Vec::new()),
                };
                let mut msgs = vec![first];
                while msgs.len() < 1000 {
                    match sub.next().now_or_never() {
                        Some(Some(m)) => msgs.push(m),
                        _ => break,
                    }
                }
                let header = |m: &async_nats::Message, name: &str| {
                    m.headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.as_str().to_owned())
                };
                Ok(msgs
                    .iter()
                    .map(|m| Seen {
                        id: header(m, names::MESSAGE_ID),
                        produced_us: header(m, names::PRODUCED_AT)
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                            .map(|t| t.timestamp_micros()),
                    })
                    .collect())
            }
        }
    }
}

/// The consumer process of the e2e run: prints `READY` once subscribed, then one JSON line
/// with the latency percentiles (receive time − `produced_at`, µs).
pub async fn consumer(url: &str, args: BenchConsumerArgs) -> CliResult<u8> {
    let pattern = TopicPattern::parse(&args.pattern)
        .map_err(|e| CliError::bus(format!("--pattern {:?}", args.pattern), &e))?;
    let bus = util::connect(url).await?;
    let mut source = if args.raw {
        let client = raw_nats(url).await?;
        let sub = client
            .queue_subscribe(args.pattern.clone(), args.durable.clone())
            .await
            .map_err(|e| CliError::transport(format!("raw subscribe: {e}")))?;
        // The subscription is live on the server once a flush has come back.
        client
            .flush()
            .await
            .map_err(|e| CliError::transport(format!("raw subscribe: {e}")))?;
        E2eSource::Raw(sub)
    } else {
        E2eSource::Bus(
            bus.subscribe(SubscribeSpec::durable(pattern, args.durable.clone()))
                .await
                .map_err(|e| CliError::bus(format!("--durable {:?}", args.durable), &e))?,
        )
    };
    let mut out = util::Out::new();
    out.line("READY")?;
    out.flush()?;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| CliError::usage(format!("histogram: {e}")))?;
    let mut seen: HashSet<String> = HashSet::with_capacity(args.expect as usize);
    let (mut received, mut no_time) = (0u64, 0u64);
    let idle = Duration::from_secs_f64(args.idle_timeout);
    let started = Instant::now();
    let mut first_at: Option<Instant> = None;
    while (seen.len() as u64) < args.expect {
        let got = source.next_batch(idle).await?;
        let now_us = chrono::Utc::now().timestamp_micros();
        if got.is_empty() {
            break;
        }
        first_at.get_or_insert_with(Instant::now);
        for d in got {
            received += 1;
            if !seen.insert(d.id.unwrap_or_default()) {
                continue;
            }
            match d.produced_us {
                Some(t) => hist.saturating_record((now_us - t).max(1) as u64),
                None => no_time += 1,
            }
        }
    }
    let secs = first_at.map_or(0.0, |f| f.elapsed().as_secs_f64());
    let report = json!({
        "received": received,
        "unique": seen.len(),
        "without_produced_at": no_time,
        "consume_secs": round(secs, 6),
        "wall_secs": round(started.elapsed().as_secs_f64(), 6),
        "min_us": hist.min(),
        "mean_us": round(hist.mean(), 1),
        "p50_us": hist.value_at_quantile(0.50),
        "p90_us": hist.value_at_quantile(0.90),
        "p99_us": hist.value_at_quantile(0.99),
        "p999_us": hist.value_at_quantile(0.999),
        "max_us": hist.max(),
    });
    out.line(&report.to_string())?;
    out.flush()?;
    util::close(&bus).await?;
    Ok(EXIT_OK)
}

fn runs_json(runs: &[Run], extra: Value) -> Value {
    let rates: Vec<f64> = runs.iter().map(Run::msg_per_sec).collect();
    let mbs: Vec<f64> = runs.iter().map(Run::mb_per_sec).collect();
    let mut v = json!({
        "messages": runs.first().map_or(0, |r| r.messages),
        "rounds": runs.iter().map(Run::json).collect::<Vec<_>>(),
        "msg_per_sec": spread_json(&rates, true, 1),
        "mb_per_sec": spread_json(&mbs, true, 3),
    });
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    v
}

fn report_json(
    s: &Setup,
    raw: &[Run],
    batched: &[Run],
    single: &[Run],
    e2e: &[E2e],
    e2e_raw: &[E2e],
) -> Value {
    let a = &s.args;
    let mut r = json!({
        "config": {
            "messages": a.messages,
            "single_messages": s.single_messages,
            "payload_bytes": a.payload_bytes,
            "batch": a.batch,
            "keys": a.keys,
            "mode": a.mode.as_str(),
            "rate": a.rate,
            "concurrency": a.concurrency,
            "inflight": a.inflight,
            "rounds": a.rounds,
            "raw": a.raw,
            "sync": a.sync.as_str(),
            "tier": a.tier.map_or("at_least_once_dedupe (default)", |t| t.as_str()),
            "transport": match &s.broker {
                Some(u) => ampybus::bus::redact(u),
                None => "embedded (temporary logs)".to_owned(),
            },
        },
        "machine": {
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        },
    });
    let m = r.as_object_mut().expect("object");
    if !batched.is_empty() {
        m.insert(
            "publish_batched".into(),
            runs_json(batched, json!({"batch": a.batch, "inflight": a.inflight})),
        );
        m.insert(
            "publish_single".into(),
            runs_json(single, json!({"concurrency": a.concurrency})),
        );
    }
    if !raw.is_empty() {
        m.insert("raw".into(), runs_json(raw, json!({"batch": a.batch})));
        let ratios: Vec<f64> = batched
            .iter()
            .zip(raw)
            .map(|(b, r)| b.msg_per_sec() / r.msg_per_sec())
            .collect();
        let mut ratio = spread_json(&ratios, true, 3);
        ratio["rounds"] = json!(ratios.iter().map(|x| round(*x, 3)).collect::<Vec<_>>());
        m.insert("ratio_batched_vs_raw".into(), ratio);
    }
    for (key, runs) in [("e2e", e2e), ("e2e_raw", e2e_raw)] {
        if !runs.is_empty() {
            m.insert(key.into(), e2e_json(a, runs));
        }
    }
    if !e2e_raw.is_empty() {
        // ampybus p99 ÷ raw p99 of the same round (lower is better; 1.0 = no cost).
        let ratios: Vec<f64> = e2e
            .iter()
            .zip(e2e_raw)
            .map(|(b, r)| b.us("p99_us") / r.us("p99_us"))
            .collect();
        let mut ratio = spread_json(&ratios, false, 3);
        ratio["rounds"] = json!(ratios.iter().map(|x| round(*x, 3)).collect::<Vec<_>>());
        m.insert("e2e_p99_vs_raw".into(), ratio);
    }
    r
}

fn e2e_json(a: &BenchArgs, runs: &[E2e]) -> Value {
    let pick = |k: &str| -> Vec<f64> { runs.iter().map(|x| x.us(k)).collect() };
    let rounds: Vec<Value> = runs
        .iter()
        .map(|x| {
            let mut v = x.report.clone();
            v["sent"] = json!(x.sent);
            v["publish_secs"] = json!(round(x.publish_secs, 6));
            v["achieved_rate"] = json!(round(x.sent as f64 / x.publish_secs.max(1e-9), 1));
            v
        })
        .collect();
    json!({
        "messages": a.messages,
        "rate": a.rate,
        "rounds": rounds,
        "p50_us": spread_json(&pick("p50_us"), false, 0),
        "p90_us": spread_json(&pick("p90_us"), false, 0),
        "p99_us": spread_json(&pick("p99_us"), false, 0),
        "max_us": spread_json(&pick("max_us"), false, 0),
    })
}

fn report_text(s: &Setup, r: &Value) -> String {
    use std::fmt::Write;
    let a = &s.args;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "ampybus bench on {}: {} msgs x {} B payload, batch {}, {} keys, sync={}, {} round(s), {} CPU(s)",
        r["config"]["transport"].as_str().unwrap_or("-"),
        a.messages,
        a.payload_bytes,
        a.batch,
        a.keys,
        a.sync.as_str(),
        a.rounds,
        r["machine"]["cpus"]
    );
    let _ = writeln!(
        t,
        "{:<44} {:>14} {:>14} {:>14}",
        "", "best", "median", "worst"
    );
    let num = |v: &Value| v.as_f64().map_or("-".into(), group_thousands);
    let row = |t: &mut String, label: &str, sec: &Value| {
        let _ = writeln!(
            t,
            "{label:<44} {:>14} {:>14} {:>14}   msg/s",
            num(&sec["msg_per_sec"]["best"]),
            num(&sec["msg_per_sec"]["median"]),
            num(&sec["msg_per_sec"]["worst"]),
        );
        let _ = writeln!(
            t,
            "{:<44} {:>14.1} {:>14.1} {:>14.1}   MB/s",
            "",
            sec["mb_per_sec"]["best"].as_f64().unwrap_or(f64::NAN),
            sec["mb_per_sec"]["median"].as_f64().unwrap_or(f64::NAN),
            sec["mb_per_sec"]["worst"].as_f64().unwrap_or(f64::NAN),
        );
    };
    if r.get("raw").is_some() {
        row(
            &mut t,
            &format!("raw file appends ({}/fdatasync)", a.batch),
            &r["raw"],
        );
    }
    if r.get("publish_batched").is_some() {
        row(
            &mut t,
            &if a.inflight > 1 {
                format!(
                    "ampybus batched ({}/batch, {} in flight)",
                    a.batch, a.inflight
                )
            } else {
                format!("ampybus batched ({}/batch)", a.batch)
            },
            &r["publish_batched"],
        );
        row(
            &mut t,
            &format!(
                "ampybus one-by-one (c={}, {} msgs)",
                a.concurrency, s.single_messages
            ),
            &r["publish_single"],
        );
    }
    if let Some(ratio) = r.get("ratio_batched_vs_raw") {
        let _ = writeln!(
            t,
            "{:<44} {:>14.3} {:>14.3} {:>14.3}",
            "ratio ampybus batched / raw",
            ratio["best"].as_f64().unwrap_or(f64::NAN),
            ratio["median"].as_f64().unwrap_or(f64::NAN),
            ratio["worst"].as_f64().unwrap_or(f64::NAN),
        );
    }
    for (key, side) in [("e2e_raw", "raw async-nats"), ("e2e", "ampybus")] {
        let Some(e) = r.get(key) else { continue };
        let _ = writeln!(
            t,
            "{side}: end-to-end latency at {} msg/s, consumer in another process (receive - produced_at):",
            a.rate
        );
        for k in ["p50_us", "p90_us", "p99_us", "max_us"] {
            let ms = |v: &Value| {
                v.as_f64()
                    .map_or("-".into(), |x| format!("{:.3} ms", x / 1000.0))
            };
            let _ = writeln!(
                t,
                "{:<44} {:>14} {:>14} {:>14}",
                format!("  {}", k.trim_end_matches("_us")),
                ms(&e[k]["best"]),
                ms(&e[k]["median"]),
                ms(&e[k]["worst"]),
            );
        }
        if let Some(rounds) = e["rounds"].as_array() {
            for (i, x) in rounds.iter().enumerate() {
                let _ = writeln!(
                    t,
                    "  round {}: received {} of {} sent, publish rate achieved {} msg/s",
                    i + 1,
                    x["unique"],
                    x["sent"],
                    num(&x["achieved_rate"])
                );
            }
        }
    }
    t.pop();
    t
}

fn group_thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads() {
        assert_eq!(stats::spread(&[3.0, 1.0, 2.0], true), (3.0, 2.0, 1.0));
        assert_eq!(stats::spread(&[3.0, 1.0, 2.0, 4.0], false), (1.0, 2.5, 4.0));
        assert!(stats::spread(&[], true).0.is_nan());
    }

    #[test]
    fn thousands() {
        assert_eq!(group_thousands(1234567.4), "1,234,567");
        assert_eq!(group_thousands(999.0), "999");
        assert_eq!(group_thousands(-1000.0), "-1,000");
    }
}
