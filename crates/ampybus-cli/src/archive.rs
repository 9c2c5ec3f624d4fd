//! `ampybus archive`: a durable reader that writes every message into PostgreSQL (schema
//! `ampybus`, see `ampybus::archive`) and acks only after the batch is committed; `archive
//! migrate` and `archive verify`.

use crate::archive_rows;
use crate::error::{CliError, CliResult, EXIT_INVALID, EXIT_OK};
use crate::follow::{self, Limits};
use crate::util::{self, Signal, Signals};
use ampybus::archive::{ArchiveBatch, ArchiveReader, ArchiveWriter, WriteReport};
use ampybus::ops::ReaderCounter;
use ampybus::transport::{Delivery, SubscribeSpec, Subscription, WindowQuery};
use ampybus::{Bus, TopicPattern};
use clap::{Args, Subcommand};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// `ampybus archive`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ArchiveArgs {
    #[command(subcommand)]
    pub command: Option<ArchiveCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `ampybus archive --pattern P --to URL`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Topic pattern to archive, e.g. 'ampy.prod.>'
    #[arg(long, value_name = "PAT", required = true)]
    pub pattern: Option<String>,
    /// The archive database: postgres://user:password@host:port/database
    #[arg(long, value_name = "URL", required = true, env = "AMPYBUS_ARCHIVE_URL")]
    pub to: Option<String>,
    /// Durable consumer name (its position on the bus)
    #[arg(long, value_name = "NAME", default_value = "archive")]
    pub durable: String,
    /// Exit after this many messages were archived
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max: Option<u64>,
    /// Exit after this many seconds without a message [default: run until a signal]
    #[arg(long, value_name = "SECS", value_parser = crate::util::parse_secs)]
    pub timeout: Option<f64>,
    /// Messages per transaction, at most
    #[arg(long, value_name = "N", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch: u64,
    /// Ack deadline of the subscription: after a crash, what the dead archiver held is
    /// delivered again (to the next instance) after this long
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = crate::util::parse_secs)]
    pub ack_deadline: f64,
}

/// Subcommands of `archive`.
#[derive(Debug, Subcommand)]
pub enum ArchiveCommand {
    /// Create or migrate schema `ampybus` in the database, then exit
    #[command(after_help = "\
Examples:
  ampybus archive migrate --to postgres://postgres@127.0.0.1/ampy

Creates schema ampybus (or brings it to this build's version) in one transaction; a schema of a
newer version is refused (exit 2) and left unchanged.")]
    Migrate(MigrateArgs),
    /// Compare the bus and the archive over a window: counts and payload hashes per topic
    #[command(after_help = "\
Examples:
  ampybus --url ./ampybus-data archive verify --to postgres://postgres@127.0.0.1/ampy \\
      --since 2025-09-05T00:00:00Z --until 2025-09-06T00:00:00Z --pattern 'ampy.prod.>'

One line per topic (OK or DIFF, the counts on the bus and in the archive); exit 1 when any
topic differs, 0 when all agree. The window is by store time on the bus.")]
    Verify(VerifyArgs),
}

/// `ampybus archive migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The archive database: postgres://user:password@host:port/database
    #[arg(long, value_name = "URL", env = "AMPYBUS_ARCHIVE_URL")]
    pub to: String,
}

/// `ampybus archive verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The archive database: postgres://user:password@host:port/database
    #[arg(long, value_name = "URL", env = "AMPYBUS_ARCHIVE_URL")]
    pub to: String,
    /// Topic pattern to compare
    #[arg(long, value_name = "PAT", default_value = ">")]
    pub pattern: String,
    /// Window start (RFC3339, inclusive, by store time on the bus)
    #[arg(long, value_name = "TIME")]
    pub since: String,
    /// Window end (RFC3339, exclusive)
    #[arg(long, value_name = "TIME")]
    pub until: String,
    /// One JSON object per topic on stdout instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Runs `archive`, `archive migrate` or `archive verify`.
pub async fn run(url: &str, args: ArchiveArgs) -> CliResult<u8> {
    match args.command {
        Some(ArchiveCommand::Migrate(m)) => migrate(&m.to).await,
        Some(ArchiveCommand::Verify(v)) => verify(url, v).await,
        None => archive(url, args.run).await,
    }
}

fn to_error(to: &str, e: &ampybus::Error) -> CliError {
    let shown = ampybus::bus::redact(to);
    let mut err = CliError::bus(format!("--to {shown:?}"), e);
    if to != shown {
        err.message = err.message.replace(to, &shown);
    }
    err
}

async fn migrate(to: &str) -> CliResult<u8> {
    let writer = ArchiveWriter::connect(to)
        .await
        .map_err(|e| to_error(to, &e))?;
    let (found, now) = writer.schema_versions();
    if found == now {
        eprintln!(
            "archive schema ampybus at {} is at version {now} already",
            writer.url_redacted()
        );
    } else {
        eprintln!(
            "archive schema ampybus at {}: version {found} -> {now}",
            writer.url_redacted()
        );
    }
    Ok(EXIT_OK)
}

async fn archive(url: &str, args: RunArgs) -> CliResult<u8> {
    let raw = args.pattern.unwrap_or_default();
    let pattern =
        TopicPattern::parse(&raw).map_err(|e| CliError::bus(format!("--pattern {raw:?}"), &e))?;
    let name = args.durable;
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CliError::usage(format!(
            "--durable {name:?}: a consumer name must be non-empty, without whitespace"
        )));
    }
    let to = args.to.unwrap_or_default();
    let writer = ArchiveWriter::connect(&to)
        .await
        .map_err(|e| to_error(&to, &e))?;
    let bus = util::connect(url).await?;
    let counter = ReaderCounter::register(&bus, &name, pattern.clone(), true, args.batch as usize);
    let mut signals = Signals::new()?;
    let mut spec = SubscribeSpec::durable(pattern, name.clone());
    spec.ack_deadline = Duration::from_secs_f64(args.ack_deadline.max(0.5));
    let mut sub = bus
        .subscribe(spec)
        .await
        .map_err(|e| CliError::bus(format!("--durable {name:?}"), &e))?;
    let limits = Limits {
        max: args.max,
        idle: args.timeout.map_or(Duration::MAX, Duration::from_secs_f64),
        fetch: args.batch,
        durable: true,
    };
    let mut sink = Archiver::new(&bus, writer, counter);
    let (n, result) = sink.run(&mut sub, &limits, &mut signals).await;
    drop(sub);
    let close = util::close(&bus).await;
    let s = &sink.stats;
    let summary = format!(
        "archived {n} message(s): {} new, {} already archived, {} typed row(s), {} undecodable",
        s.envelopes_new, s.envelopes_known, s.rows_new, sink.undecodable
    );
    let stopped = match result {
        Ok(stopped) => stopped,
        Err(e) => {
            eprintln!("{summary}");
            return Err(e);
        }
    };
    close?;
    match stopped {
        None => {
            eprintln!("{summary}");
            Ok(EXIT_OK)
        }
        Some(signal) => {
            eprintln!("{summary}; stopped by {}", signal.name());
            Ok(follow::signal_code(signal, args.max.is_none()))
        }
    }
}

/// The archiving loop: each fetched batch is written in one transaction by a task of its own
/// while the next batch is fetched and its rows built, and acked only once that transaction
/// committed.
///
/// At most one transaction is in flight. Its deliveries stay held (unacked) until its commit
/// returned; a batch whose write fails is held (leases extended) while the database is away
/// and written again, so after any crash what was not acked is either not in the archive or
/// skipped as already archived when it comes again.
pub struct Archiver<'a> {
    bus: &'a Bus,
    counter: ReaderCounter,
    /// `None` only while the write task has it.
    writer: Option<ArchiveWriter>,
    /// The batch buffer not in use by the write task.
    spare: ArchiveBatch,
    /// The transaction being written, with the deliveries it holds.
    in_flight: Option<InFlight>,
    /// Totals of the writes.
    pub stats: WriteReport,
    /// Messages whose payload did not decode (archived without typed rows).
    pub undecodable: u64,
}

/// A batch being written by its task.
struct InFlight {
    task: tokio::task::JoinHandle<(ArchiveWriter, ArchiveBatch, ampybus::Result<WriteReport>)>,
    held: Vec<Delivery>,
    undecodable: u64,
}

/// Backoff bounds while the database is away.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl<'a> Archiver<'a> {
    /// An archiver writing through `writer`, counting on `counter`.
    pub fn new(bus: &'a Bus, writer: ArchiveWriter, counter: ReaderCounter) -> Self {
        Archiver {
            bus,
            counter,
            writer: Some(writer),
            spare: ArchiveBatch::new(),
            in_flight: None,
            stats: WriteReport::default(),
            undecodable: 0,
        }
    }

    /// Reads `sub` until `--max` (`limits.max`) messages are archived, `limits.idle` passed
    /// without a message, or a signal came (`Some(signal)`); returns the number of messages
    /// archived and acked with it. Whatever it returns, nothing is left in flight: a batch
    /// being written is waited for (and acked when committed), anything else is released.
    pub async fn run(
        &mut self,
        sub: &mut Box<dyn Subscription>,
        limits: &Limits,
        signals: &mut Signals,
    ) -> (u64, CliResult<Option<Signal>>) {
        let mut done = 0u64;
        let result = self.run_inner(sub, limits, signals, &mut done).await;
        // An early return leaves at most the in-flight batch; finish it.
        let settled = self.settle(&mut done, signals).await;
        let result = match (result, settled) {
            (Err(e), _) => Err(e),
            (Ok(_), Err(Stopped::Failed(e))) => Err(e),
            (Ok(None), Err(Stopped::Signal)) => Ok(signals.received()),
            (Ok(s), _) => Ok(s),
        };
        (done, result)
    }

    async fn run_inner(
        &mut self,
        sub: &mut Box<dyn Subscription>,
        limits: &Limits,
        signals: &mut Signals,
        done: &mut u64,
    ) -> CliResult<Option<Signal>> {
        let mut active = Instant::now();
        loop {
            // No new work after a signal.
            if let Some(s) = signals.received() {
                return Ok(Some(s));
            }
            let pending = self.in_flight.as_ref().map_or(0, |f| f.held.len() as u64);
            let want = match limits.max {
                Some(m) if *done + pending >= m => return Ok(None),
                Some(m) => (m - *done - pending).min(limits.fetch),
                None => limits.fetch,
            };
            // Short fetches (a fetch is not cancelled midway: it may hold leases by then).
            let wait = limits
                .idle
                .saturating_sub(active.elapsed())
                .min(follow::FETCH_SLICE);
            let got = sub
                .fetch(want as usize, wait)
                .await
                .map_err(|e| CliError::bus("fetch", &e))?;
            if got.is_empty() {
                // Nothing new: what is in flight is acked as soon as it is committed.
                match self.settle(done, signals).await {
                    Ok(()) => {}
                    Err(Stopped::Signal) => return Ok(signals.received()),
                    Err(Stopped::Failed(e)) => return Err(e),
                }
                if active.elapsed() >= limits.idle {
                    return Ok(None);
                }
                continue;
            }
            if let Some(s) = signals.received() {
                follow::release(got).await;
                return Ok(Some(s));
            }
            // The rows of this batch are built while the one before it is written.
            let mut batch = std::mem::take(&mut self.spare);
            let undecodable = fill(self.bus, &self.counter, &mut batch, &got).await;
            let committed = match self.complete(&got, signals).await {
                Ok(c) => c,
                Err(stop) => {
                    self.spare = batch;
                    follow::release(got).await;
                    return match stop {
                        Stopped::Signal => Ok(signals.received()),
                        Stopped::Failed(e) => Err(e),
                    };
                }
            };
            let Some(mut writer) = self.writer.take() else {
                follow::release(got).await;
                return Err(CliError::transport("archive: the writer was lost"));
            };
            let task = tokio::spawn(async move {
                let r = writer.write(&batch).await;
                (writer, batch, r)
            });
            self.in_flight = Some(InFlight {
                task,
                held: got,
                undecodable,
            });
            if let Some(held) = committed {
                self.ack(held, done).await?;
            }
            active = Instant::now();
        }
    }

    /// Waits for the in-flight batch (if any) to commit, writing it again while the database
    /// is away (leases of its deliveries and of `also_held` kept meanwhile); returns its
    /// deliveries, now safe to ack. On `Stopped`, its deliveries are released.
    async fn complete(
        &mut self,
        also_held: &[Delivery],
        signals: &mut Signals,
    ) -> Result<Option<Vec<Delivery>>, Stopped> {
        let Some(f) = self.in_flight.take() else {
            return Ok(None);
        };
        let (mut writer, batch, first) = match f.task.await {
            Ok(t) => t,
            Err(e) => {
                follow::release(f.held).await;
                return Err(Stopped::Failed(CliError::transport(format!(
                    "archive: the write task failed: {e}"
                ))));
            }
        };
        let written = match first {
            Err(e) if ampybus::archive::is_retryable(&e) => {
                write_retrying(&mut writer, &batch, &[&f.held, also_held], signals).await
            }
            Err(e) => Err(Stopped::Failed(CliError::bus(
                format!("--to {:?}", writer.url_redacted()),
                &e,
            ))),
            Ok(r) => Ok(r),
        };
        self.writer = Some(writer);
        self.spare = batch;
        match written {
            Ok(r) => {
                self.stats.envelopes_new += r.envelopes_new;
                self.stats.envelopes_known += r.envelopes_known;
                self.stats.rows_new += r.rows_new;
                self.undecodable += f.undecodable;
                Ok(Some(f.held))
            }
            Err(stop) => {
                follow::release(f.held).await;
                Err(stop)
            }
        }
    }

    /// Acks committed deliveries (counted as consumed and in `done`).
    async fn ack(&mut self, mut held: Vec<Delivery>, done: &mut u64) -> CliResult<()> {
        let n = held.len() as u64;
        // The topics are moved out (an ack goes by sequence), counted once acked.
        let topics: Vec<ampybus::TopicName> = held
            .iter_mut()
            .map(|d| std::mem::take(&mut d.envelope.topic))
            .collect();
        if let Err((e, unacked)) = Delivery::ack_all(held).await {
            follow::release(unacked).await;
            return Err(CliError::bus("ack", &e));
        }
        *done += n;
        for t in &topics {
            self.counter.consumed(t);
        }
        Ok(())
    }

    /// Finishes the in-flight batch: waits for its commit, then acks it.
    async fn settle(&mut self, done: &mut u64, signals: &mut Signals) -> Result<(), Stopped> {
        if let Some(held) = self.complete(&[], signals).await? {
            self.ack(held, done).await.map_err(Stopped::Failed)?;
        }
        Ok(())
    }
}

/// Fills `batch` from the deliveries: every envelope, typed rows of the payloads that decode;
/// returns how many did not decode (each counted on `counter` and logged).
async fn fill(
    bus: &Bus,
    counter: &ReaderCounter,
    batch: &mut ArchiveBatch,
    got: &[Delivery],
) -> u64 {
    batch.clear();
    let mut undecodable = 0;
    for d in got {
        let env = &d.envelope;
        let failed = push_message(bus, batch, env, d.info.stored_at, d.info.sequence).await;
        if let Some(reason) = failed {
            undecodable += 1;
            counter.decode_failed(&env.topic);
            let id = env.headers.message_id().unwrap_or("");
            tracing::warn!(message_id = id, topic = %env.topic, reason = %reason, "archive: payload archived without typed rows");
        }
    }
    undecodable
}

/// How a write that would not go through ended.
enum Stopped {
    /// A signal came while waiting for the database.
    Signal,
    /// An error retrying cannot fix.
    Failed(CliError),
}

/// Writes `batch`, holding it (leases of `held` extended) and retrying with backoff while the
/// database is unreachable.
async fn write_retrying(
    writer: &mut ArchiveWriter,
    batch: &ArchiveBatch,
    held: &[&[Delivery]],
    signals: &mut Signals,
) -> Result<WriteReport, Stopped> {
    let mut delay = RETRY_MIN;
    let mut outage: Option<std::time::Instant> = None;
    loop {
        match writer.write(batch).await {
            Ok(r) => {
                if let Some(t) = outage {
                    tracing::warn!(
                        after_ms = t.elapsed().as_millis() as u64,
                        "archive: PostgreSQL is back; batch committed"
                    );
                }
                return Ok(r);
            }
            Err(e) if ampybus::archive::is_retryable(&e) => {
                if outage.is_none() {
                    outage = Some(std::time::Instant::now());
                    tracing::warn!(error = %e, "archive: cannot write; holding the batch and retrying until PostgreSQL answers");
                }
                // Keep the leases while waiting.
                for d in held.iter().flat_map(|h| h.iter()) {
                    let _ = d.in_progress().await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = signals.recv() => return Err(Stopped::Signal),
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
            Err(e) => {
                let to = writer.url_redacted().to_owned();
                return Err(Stopped::Failed(CliError::bus(format!("--to {to:?}"), &e)));
            }
        }
    }
}

/// Adds one message to `batch`: its envelope, and the typed rows of its payload when it
/// decodes; returns why it did not (the envelope's `decode_error`).
pub async fn push_message(
    bus: &Bus,
    batch: &mut ArchiveBatch,
    env: &ampybus::Envelope,
    stored_at: chrono::DateTime<chrono::Utc>,
    sequence: u64,
) -> Option<String> {
    let id = env.headers.message_id().unwrap_or("");
    let fqdn = env.headers.schema_fqdn().unwrap_or("");
    // Typed tables hold the records of their own domains: a dead-lettered message (domain
    // `dlq`, the original payload) is kept in `envelopes` only.
    let dead_lettered = env.topic.split('.').nth(2) == Some("dlq");
    let rows = if dead_lettered {
        Ok(Vec::new())
    } else {
        match bus.decode_payload(env).await {
            Ok(raw) => archive_rows::rows(fqdn, id, &raw),
            Err(e) => Err(format!("the payload cannot be read: {e}")),
        }
    };
    let failed = match rows {
        Ok(rows) => batch
            .push_rows(rows)
            .err()
            .map(|e| format!("decode_error: {}", e.message())),
        Err(reason) => Some(format!("decode_error: {reason}")),
    };
    batch.push_envelope(env, stored_at, sequence, failed.as_deref());
    failed
}

async fn verify(url: &str, args: VerifyArgs) -> CliResult<u8> {
    let pattern = TopicPattern::parse(&args.pattern)
        .map_err(|e| CliError::bus(format!("--pattern {:?}", args.pattern), &e))?;
    let time = |flag: &str, s: &str| {
        ampybus::ids::parse_time(s.trim()).ok_or_else(|| {
            CliError::usage(format!(
                "{flag} {s:?}: not an RFC3339 time with offset, e.g. 2025-09-05T13:30:00Z"
            ))
        })
    };
    let (since, until) = (time("--since", &args.since)?, time("--until", &args.until)?);
    if until < since {
        return Err(CliError::usage(format!(
            "--until {:?} is before --since {:?}",
            args.until, args.since
        )));
    }
    let reader = ArchiveReader::connect(&args.to)
        .await
        .map_err(|e| to_error(&args.to, &e))?;
    let archived = reader
        .digest(&pattern, Some(since), Some(until))
        .await
        .map_err(|e| to_error(&args.to, &e))?;
    let bus = util::connect_existing(url).await?;
    let on_bus = bus_digest(&bus, &pattern, since, until).await;
    util::close(&bus).await?;
    let on_bus = on_bus?;
    let topics: std::collections::BTreeSet<&String> =
        archived.keys().chain(on_bus.keys()).collect();
    let mut differ = 0;
    let mut out = util::Out::new();
    for t in topics {
        let a = archived.get(t);
        let b = on_bus.get(t);
        let same = a == b;
        if !same {
            differ += 1;
        }
        let count = |x: Option<&(u64, String)>| x.map_or(0, |x| x.0);
        let line = if args.json {
            serde_json::json!({
                "topic": t,
                "bus": count(b),
                "archive": count(a),
                "same": same,
            })
            .to_string()
        } else {
            format!(
                "{} {t}: bus {}, archive {}{}",
                if same { "OK  " } else { "DIFF" },
                count(b),
                count(a),
                if !same && count(a) == count(b) {
                    " (payload hashes differ)"
                } else {
                    ""
                }
            )
        };
        out.line(&line)?;
    }
    out.flush()?;
    if differ > 0 {
        eprintln!("{differ} topic(s) differ between the bus and the archive");
        return Ok(EXIT_INVALID);
    }
    eprintln!("the bus and the archive agree over the window");
    Ok(EXIT_OK)
}

/// The bus's side of `verify`: counts and the hash of the sorted payload hashes per topic,
/// the same digest `ArchiveReader::digest` computes.
async fn bus_digest(
    bus: &Bus,
    pattern: &TopicPattern,
    since: chrono::DateTime<chrono::Utc>,
    until: chrono::DateTime<chrono::Utc>,
) -> CliResult<BTreeMap<String, (u64, String)>> {
    let mut q = WindowQuery::new(pattern.clone());
    q.start = Some(since);
    q.end = Some(until);
    let mut per_topic: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    util::each_stored_page(
        bus,
        q,
        "archive verify",
        "reading the stored window",
        |page| {
            for m in page {
                let e = m.envelope;
                let id = e.headers.message_id().unwrap_or("").to_owned();
                per_topic
                    .entry(e.topic.to_string())
                    .or_default()
                    .push((id, ampybus::codec::sha256_tag(&e.payload)));
            }
        },
    )
    .await?;
    Ok(per_topic
        .into_iter()
        .map(|(t, mut v)| {
            // The archive orders by message_id in the database's collation (C for ids).
            v.sort();
            v.dedup_by(|a, b| a.0 == b.0);
            let joined: Vec<&str> = v.iter().map(|(_, h)| h.as_str()).collect();
            let digest = ampybus::codec::sha256_tag(joined.join(",").as_bytes());
            let hex = digest.trim_start_matches("sha256:").to_owned();
            (t, (v.len() as u64, hex))
        })
        .collect())
}
