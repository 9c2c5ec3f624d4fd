//! `ampybus dlq`: inspect, redrive and purge dead-lettered messages (DESIGN §2).
//!
//! Redrive checks every selected entry before it sends any, and records each entry it sent in
//! the transport's dedupe store (consumer [`REDRIVE_CONSUMER`]), so a repeated redrive sends
//! only what was not sent. It does not delete the DLQ entries: `dlq purge` does.

use crate::decoder::ProtoDecoder;
use crate::error::{CliError, CliResult, EXIT_OK, EXIT_USAGE};
use crate::util::{self, Out};
use ampybus::bus::TransportKind;
use ampybus::headers::names;
use ampybus::runtime::{ORIGINAL_MESSAGE_ID, REDRIVE_CONSUMER, plan_redrive, record_redriven};
use ampybus::transport::embedded::{EmbeddedLog, EmbeddedOptions};
use ampybus::transport::{StoredMessage, Transport, WindowQuery};
use ampybus::{Bus, Domain, PayloadDecoder, Topic, TopicPattern};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

const DEFAULT_PATTERN: &str = "ampy.*.dlq.v1.>";

/// `ampybus dlq`.
#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// The `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead-lettered messages
    #[command(after_help = "\
Examples:
  ampybus dlq inspect
  ampybus dlq inspect --pattern 'ampy.prod.dlq.v1.orders' --reason decode_error --json")]
    Inspect(InspectArgs),
    /// Publish dead-lettered messages back to their original topic
    #[command(after_help = "\
Examples:
  ampybus dlq redrive --reason handler_error --dry-run
  ampybus dlq redrive --pattern 'ampy.prod.dlq.v1.orders' --rate 50
  ampybus dlq redrive --reason handler_error --skip-invalid

Each message is published to its `original_topic` with a new message_id, `redrive_of` = the
original id and retry_count + 1; one audit line per message on stdout. Every selected entry
is checked first: entries that cannot be redriven (e.g. no `original_topic`) are listed on
stderr and the run is refused (exit 2, nothing sent) unless --skip-invalid. Each entry sent
is recorded in the transport's dedupe store (consumer `ampybus-redrive`) once its publish
is confirmed, so running the same redrive again sends only what was not sent. The DLQ
entries are kept: `dlq purge` removes them.")]
    Redrive(RedriveArgs),
    /// Delete dead-lettered messages from the embedded log
    #[command(after_help = "\
Examples:
  ampybus dlq purge --reason decode_error --yes
  ampybus dlq purge --before 2025-09-01T00:00:00Z

Only dlq topics can be purged, on the embedded log only. Without --yes asks for confirmation
on a terminal and refuses (exit 2) when stdin is not a terminal.")]
    Purge(PurgeArgs),
}

/// The selection shared by the subcommands.
#[derive(Debug, Args)]
pub struct Select {
    /// DLQ topic pattern (every env by default)
    #[arg(long, value_name = "P", default_value = DEFAULT_PATTERN)]
    pub pattern: String,
    /// Only messages whose `dlq_reason` code is CODE (e.g. decode_error, handler_error)
    #[arg(long, value_name = "CODE")]
    pub reason: Option<String>,
}

/// `ampybus dlq inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub select: Select,
    /// Only messages stored at or after T (RFC3339)
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// One JSON object per line (the `sub --json` form, with payload_json when decodable)
    #[arg(long)]
    pub json: bool,
}

/// `ampybus dlq redrive`.
#[derive(Debug, Args)]
pub struct RedriveArgs {
    #[command(flatten)]
    pub select: Select,
    /// Only messages stored at or after T (RFC3339)
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Messages per second
    #[arg(long, value_name = "N", default_value_t = 100.0)]
    pub rate: f64,
    /// Print what would be redriven (and list what cannot be); publish nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Send the entries that can be redriven and skip (list) those that cannot
    #[arg(long)]
    pub skip_invalid: bool,
}

/// `ampybus dlq purge`.
#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub select: Select,
    /// Only messages stored before T (RFC3339)
    #[arg(long, value_name = "T")]
    pub before: Option<String>,
    /// Do not ask for confirmation
    #[arg(long)]
    pub yes: bool,
}

/// Runs `dlq`.
pub async fn run(url: &str, args: DlqArgs) -> CliResult<u8> {
    match args.command {
        DlqCommand::Inspect(a) => inspect(url, a).await,
        DlqCommand::Redrive(a) => redrive(url, a).await,
        DlqCommand::Purge(a) => purge(url, a).await,
    }
}

struct Filter {
    pattern: TopicPattern,
    reason: Option<String>,
}

impl Filter {
    fn new(s: &Select) -> CliResult<Filter> {
        let pattern = TopicPattern::parse(&s.pattern)
            .map_err(|e| CliError::bus(format!("--pattern {:?}", s.pattern), &e))?;
        let reason = match &s.reason {
            Some(r) => {
                let code = ampybus::DlqCode::ALL
                    .iter()
                    .find(|c| c.as_str() == r.trim())
                    .ok_or_else(|| {
                        let all: Vec<&str> =
                            ampybus::DlqCode::ALL.iter().map(|c| c.as_str()).collect();
                        CliError::usage(format!(
                            "--reason {r:?}: not a DLQ reason code (one of {})",
                            all.join(", ")
                        ))
                    })?;
                Some(code.as_str().to_owned())
            }
            None => None,
        };
        Ok(Filter { pattern, reason })
    }

    fn keep(&self, m: &StoredMessage) -> bool {
        keep(&self.pattern, self.reason.as_deref(), m)
    }
}

fn keep(pattern: &TopicPattern, reason: Option<&str>, m: &StoredMessage) -> bool {
    let is_dlq = Topic::parse(&m.envelope.topic).is_ok_and(|t| t.domain() == Domain::Dlq);
    if !is_dlq || !pattern.matches(&m.envelope.topic) {
        return false;
    }
    match reason {
        None => true,
        Some(code) => reason_code(m) == code,
    }
}

/// The `code` of `dlq_reason: code: detail`.
fn reason_code(m: &StoredMessage) -> &str {
    let r = m
        .envelope
        .headers
        .get(names::DLQ_REASON)
        .unwrap_or_default();
    r.split_once(':').map_or(r, |(c, _)| c).trim()
}

fn parse_time(flag: &str, v: Option<&str>) -> CliResult<Option<DateTime<Utc>>> {
    v.map(|s| {
        ampybus::ids::parse_time(s.trim()).ok_or_else(|| {
            CliError::usage(format!(
                "{flag} {s:?}: not an RFC3339 time with offset, e.g. 2025-09-05T13:30:00Z"
            ))
        })
    })
    .transpose()
}

/// Every selected DLQ message stored in `[since, …)`, in log order.
async fn select(
    bus: &Bus,
    f: &Filter,
    since: Option<DateTime<Utc>>,
) -> CliResult<Vec<StoredMessage>> {
    let mut q = WindowQuery::new(f.pattern.clone());
    q.start = since;
    q.limit = 1000;
    let mut out = Vec::new();
    util::each_stored_page(bus, q, "dlq", "reading the DLQ", |page| {
        out.extend(page.into_iter().filter(|m| f.keep(m)));
    })
    .await?;
    Ok(out)
}

async fn inspect(url: &str, a: InspectArgs) -> CliResult<u8> {
    let f = Filter::new(&a.select)?;
    let since = parse_time("--since", a.since.as_deref())?;
    let bus = util::connect_existing(url).await?;
    let result = select(&bus, &f, since).await;
    let close = util::close(&bus).await;
    let msgs = result?;
    close?;
    let mut out = Out::new();
    for m in &msgs {
        let text = if a.json {
            m.envelope
                .to_json_line(Some(&ProtoDecoder as &dyn PayloadDecoder))
        } else {
            pretty(m)
        };
        if !out.line(&text)? {
            return Ok(EXIT_OK);
        }
    }
    out.flush()?;
    eprintln!("{} DLQ message(s)", msgs.len());
    Ok(EXIT_OK)
}

fn pretty(m: &StoredMessage) -> String {
    use std::fmt::Write as _;
    let h = &m.envelope.headers;
    let g = |n: &str| h.get(n).unwrap_or("-").to_owned();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "── {}  (seq {}, stored {})",
        m.envelope.topic,
        m.sequence,
        ampybus::ids::format_time(m.stored_at)
    );
    let original_topic = h
        .get(names::ORIGINAL_TOPIC)
        .or_else(|| h.get(ampybus::runtime::ORIGINAL_TOPIC_RAW))
        .unwrap_or("-");
    for (k, v) in [
        ("original_topic", original_topic.to_owned()),
        ("dlq_reason", g(names::DLQ_REASON)),
        ("dlq_at", g(names::DLQ_AT)),
        ("consumer", g(names::DLQ_CONSUMER)),
        ("retry_count", g(names::RETRY_COUNT)),
        ("message_id", g(names::MESSAGE_ID)),
        ("original_id", g(ORIGINAL_MESSAGE_ID)),
        ("schema", g(names::SCHEMA_FQDN)),
    ] {
        let _ = writeln!(s, "  {:<15} {v}", format!("{k}:"));
    }
    let _ = write!(s, "  {:<15} {} bytes", "payload:", m.envelope.payload.len());
    let fqdn = h.schema_fqdn().unwrap_or_default();
    if h.get(names::CONTENT_ENCODING).is_none()
        && let Some(Ok(v)) = ProtoDecoder.decode_json(fqdn, &m.envelope.payload)
    {
        let text = serde_json::to_string_pretty(&v).unwrap_or_default();
        for line in text.lines() {
            let _ = write!(s, "\n  {line}");
        }
    }
    s
}

async fn redrive(url: &str, a: RedriveArgs) -> CliResult<u8> {
    let f = Filter::new(&a.select)?;
    let since = parse_time("--since", a.since.as_deref())?;
    if !(a.rate.is_finite() && a.rate > 0.0) {
        return Err(CliError::usage(format!(
            "--rate {}: must be a positive number of messages per second",
            a.rate
        )));
    }
    let bus = util::connect(url).await?;
    let result = redrive_selected(&bus, &f, since, &a).await;
    let close = util::close(&bus).await;
    let code = result?;
    close?;
    Ok(code)
}

/// Checks the whole selection, then (unless refused or a dry run) sends the entries not yet
/// redriven, recording each one after its publish was confirmed.
async fn redrive_selected(
    bus: &Bus,
    f: &Filter,
    since: Option<DateTime<Utc>>,
    a: &RedriveArgs,
) -> CliResult<u8> {
    let store = bus.transport().dedupe_store().ok_or_else(|| {
        CliError::usage(format!(
            "dlq redrive: the {} transport at {} has no dedupe store to record redriven entries in, so a repeated redrive would send them again; configure one (Kafka: option `dedupe=sqlite:PATH` or `dedupe=redis://…`)",
            bus.transport().name(),
            bus.url_redacted()
        ))
    })?;
    let msgs = select(bus, f, since).await?;
    let entries: Vec<ampybus::Envelope> = msgs.iter().map(|m| m.envelope.clone()).collect();
    let plan = plan_redrive(&entries, Some(store.as_ref()))
        .await
        .map_err(|e| CliError::bus("dlq redrive: reading the dedupe store", &e))?;
    let id_of = |i: usize| msgs[i].envelope.headers.message_id().unwrap_or("-");
    for (i, e) in &plan.invalid {
        let m = &msgs[*i];
        eprintln!(
            "cannot redrive {} (seq {}, {}): {e}",
            id_of(*i),
            m.sequence,
            m.envelope.topic
        );
    }
    let refused = !plan.invalid.is_empty() && !a.skip_invalid;
    if refused && !a.dry_run {
        return Err(CliError::usage(format!(
            "dlq redrive: {} of {} selected DLQ entries cannot be redriven (listed above); nothing sent. Fix or purge them, narrow the selection, or pass --skip-invalid to send the {} that can be",
            plan.invalid.len(),
            msgs.len(),
            plan.ready.len()
        )));
    }
    let mut out = Out::new();
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(plan.ready.len() as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    pb.set_style(
        indicatif::ProgressStyle::with_template("redrive [{bar:30}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let to_send = plan.ready.len();
    let mut n = 0u64;
    let mut signals = util::Signals::new()?;
    let mut stopped_by = None;
    for (i, env) in plan.ready {
        // A signal stops the job between two entries: what was sent is recorded.
        if let Some(s) = signals.received() {
            stopped_by = Some(s);
            break;
        }
        let dlq_id = id_of(i);
        let new_id = env.headers.message_id().unwrap_or("-").to_owned();
        let topic = env.topic.clone();
        let line = if a.dry_run {
            format!("would redrive {dlq_id} -> {topic} as {new_id}")
        } else {
            tick.tick().await;
            let sent = n;
            let stopped = |what: String, e: &ampybus::Error| {
                pb.finish_and_clear();
                let mut err = CliError::bus(what, e);
                err.message.push_str(&format!(
                    " (after redriving {sent} of {to_send}; running the same redrive again sends only the rest)"
                ));
                err
            };
            bus.publish_wire(vec![env])
                .await
                .map_err(|e| stopped(format!("redriving {dlq_id} to {topic}"), &e))?;
            record_redriven(store.as_ref(), &msgs[i].envelope)
                .await
                .map_err(|e| {
                    stopped(
                        format!(
                            "{dlq_id} was redriven to {topic} as {new_id} but could not be recorded as redriven, so a later run would send it again"
                        ),
                        &e,
                    )
                })?;
            format!("redrive {dlq_id} -> {topic} as {new_id}")
        };
        n += 1;
        pb.inc(1);
        if !out.line(&line)? || !out.flush()? {
            break;
        }
    }
    pb.finish_and_clear();
    let skipped = format!(
        "{} already redriven (recorded under consumer `{REDRIVE_CONSUMER}`), {} invalid",
        plan.already.len(),
        plan.invalid.len()
    );
    if a.dry_run {
        eprintln!("would redrive {n} message(s), skip {skipped}; nothing published");
        if refused {
            return Err(CliError::usage(format!(
                "dlq redrive --dry-run: {} of {} selected DLQ entries cannot be redriven (listed above), so the run would be refused; pass --skip-invalid to send the {to_send} that can be",
                plan.invalid.len(),
                msgs.len(),
            )));
        }
    } else {
        eprintln!(
            "redrove {n} message(s), skipped {skipped}; the DLQ entries are kept (remove them with `ampybus dlq purge`)"
        );
    }
    if let Some(s) = stopped_by {
        eprintln!(
            "stopped by {} after {n} of {to_send}; running the same redrive again sends only the rest",
            s.name()
        );
        return Ok(s.job_code());
    }
    Ok(EXIT_OK)
}

async fn purge(url: &str, a: PurgeArgs) -> CliResult<u8> {
    let f = Filter::new(&a.select)?;
    let before = parse_time("--before", a.before.as_deref())?;
    let domain = f.pattern.as_str().split('.').nth(2).unwrap_or_default();
    if !matches!(domain, "dlq" | "*" | ">") {
        return Err(CliError::usage(format!(
            "--pattern {:?}: purge deletes dlq topics only (ampy.{{env}}.dlq.v1.…)",
            a.select.pattern
        )));
    }
    let kind = ampybus::bus::transport_kind(url)
        .map_err(|e| CliError::bus(format!("--url {:?}", ampybus::bus::redact(url)), &e))?;
    if !matches!(kind, TransportKind::Embedded) {
        return Err(CliError::usage(
            "purge is supported on the embedded log only",
        ));
    }
    let bus = util::connect(url).await?;
    let result = select(&bus, &f, None).await;
    let close = util::close(&bus).await;
    let mut msgs = result?;
    close?;
    msgs.retain(|m| before.is_none_or(|b| m.stored_at < b));
    if msgs.is_empty() {
        eprintln!("no DLQ message selected; nothing purged");
        return Ok(EXIT_OK);
    }
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError {
                code: EXIT_USAGE,
                message: format!(
                    "purge would delete {} DLQ message(s); stdin is not a terminal, pass --yes to confirm",
                    msgs.len()
                ),
            });
        }
        eprint!(
            "delete {} DLQ message(s) matching {}? [y/N] ",
            msgs.len(),
            f.pattern.as_str()
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            eprintln!("aborted; nothing purged");
            return Ok(EXIT_USAGE);
        }
    }
    let opts = EmbeddedOptions::from_url(url)
        .map_err(|e| CliError::bus(format!("--url {:?}", ampybus::bus::redact(url)), &e))?;
    let log = EmbeddedLog::open(opts).map_err(|e| CliError::bus("opening the embedded log", &e))?;
    let (pattern, reason) = (f.pattern.clone(), f.reason.clone());
    let result = log
        .purge(&f.pattern, move |m| {
            keep(&pattern, reason.as_deref(), m) && before.is_none_or(|b| m.stored_at < b)
        })
        .await;
    let close = log.close().await;
    let gone = result.map_err(|e| CliError::bus("purge", &e))?;
    close.map_err(|e| CliError::bus("closing the embedded log", &e))?;
    let mut out = Out::new();
    for m in &gone {
        let id = m.envelope.headers.message_id().unwrap_or("-");
        if !out.line(&format!("purged {id} from {}", m.envelope.topic))? {
            break;
        }
    }
    out.flush()?;
    eprintln!("purged {} DLQ message(s)", gone.len());
    Ok(EXIT_OK)
}
