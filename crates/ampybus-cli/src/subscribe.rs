//! `ampybus sub`.

use crate::decoder::ProtoDecoder;
use crate::error::{CliError, CliResult, EXIT_OK};
use crate::follow::{self, Limits, Sink};
use crate::util::{self, Out, Signal, Signals};
use ampybus::headers::names;
use ampybus::ops::ReaderCounter;
use ampybus::transport::{Delivery, StartAt, SubscribeSpec, WindowQuery};
use ampybus::{Bus, Envelope, PayloadDecoder, TopicPattern};
use chrono::{DateTime, Utc};
use clap::Args;
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;

/// `ampybus sub`.
#[derive(Debug, Args)]
pub struct SubArgs {
    /// Topic pattern: `*` matches one token, `>` (last) the rest, e.g. ampy.prod.bars.>
    #[arg(long, value_name = "PAT")]
    pub pattern: String,
    /// Durable consumer name: resume where it stopped and ack what was printed
    #[arg(long, value_name = "NAME", conflicts_with_all = ["since", "until"])]
    pub durable: Option<String>,
    /// Exit after this many messages
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max: Option<u64>,
    /// Exit after this many seconds without a message (fractions allowed)
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = crate::util::parse_secs)]
    pub timeout: f64,
    /// One JSON object per message per line: {"topic","headers","payload_base64"}; blob-stored
    /// payloads are inlined (see --blob-pointers)
    #[arg(long)]
    pub json: bool,
    /// With --json: add payload_json when the schema is known and the payload decodes (why not: on stderr)
    #[arg(long, requires = "json")]
    pub decode: bool,
    /// With --json: print blob-stored payloads as their pointer (blob_ref, blob_hash, blob_size)
    /// instead of inlining the stored bytes
    #[arg(long, requires = "json")]
    pub blob_pointers: bool,
    /// Print the stored window from this time (RFC3339, inclusive) and exit
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Print the stored window up to this time (RFC3339, exclusive) and exit
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Durability tier of every topic of the command: best_effort (or best-effort),
    /// at_least_once, at_least_once_dedupe [default: the registry's, else at_least_once_dedupe].
    /// A registry entry wins
    #[arg(long, value_name = "TIER", value_parser = crate::util::parse_tier)]
    pub tier: Option<ampybus::tier::Tier>,
}

/// How many deliveries one fetch asks for.
const FETCH: u64 = 256;

/// The `consumer` label (and `/stats` name) of a `sub` without `--durable`.
pub const EPHEMERAL_NAME: &str = "sub";

/// Runs `sub`.
pub async fn run(url: &str, args: SubArgs) -> CliResult<u8> {
    let pattern = TopicPattern::parse(&args.pattern)
        .map_err(|e| CliError::bus(format!("--pattern {:?}", args.pattern), &e))?;
    let since = parse_time_flag("--since", args.since.as_deref())?;
    let until = parse_time_flag("--until", args.until.as_deref())?;
    if let (Some(s), Some(u)) = (since, until)
        && u < s
    {
        return Err(CliError::usage(format!(
            "--until {:?} is before --since {:?}",
            args.until.as_deref().unwrap_or(""),
            args.since.as_deref().unwrap_or("")
        )));
    }
    if let Some(name) = &args.durable
        && (name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(CliError::usage(format!(
            "--durable {name:?}: a consumer name must be non-empty, without whitespace"
        )));
    }
    let bus = if args.durable.is_some() {
        util::connect(url).await?
    } else {
        util::connect_existing(url).await?
    };
    // With --metrics-addr: bus_consumed_total and /stats count what this read consumed.
    let counter = ReaderCounter::register(
        &bus,
        args.durable.as_deref().unwrap_or(EPHEMERAL_NAME),
        pattern.clone(),
        args.durable.is_some(),
        FETCH as usize,
    );
    let mut printer = Printer {
        counter,
        out: Out::new(),
        json: args.json,
        decode: args.decode,
        blob_pointers: args.blob_pointers,
        unknown_schemas: HashSet::new(),
    };
    let windowed = since.is_some() || until.is_some();
    let result = match Signals::new() {
        Err(e) => Err(e),
        Ok(mut signals) if windowed => {
            window(
                &bus,
                pattern,
                since,
                until,
                args.max,
                &mut printer,
                &mut signals,
            )
            .await
        }
        Ok(mut signals) => follow(&bus, pattern, &args, &mut printer, &mut signals).await,
    };
    let close = util::close(&bus).await;
    let stopped = result?;
    close?;
    let n = printer.count();
    let Some(signal) = stopped else {
        eprintln!("received {n} message(s)");
        return Ok(EXIT_OK);
    };
    eprintln!("received {n} message(s); stopped by {}", signal.name());
    // Without --max and outside a stored window the read is open-ended.
    Ok(follow::signal_code(signal, args.max.is_none() && !windowed))
}

fn parse_time_flag(flag: &str, v: Option<&str>) -> CliResult<Option<DateTime<Utc>>> {
    v.map(|s| {
        ampybus::ids::parse_time(s.trim()).ok_or_else(|| {
            CliError::usage(format!(
                "{flag} {s:?}: not an RFC3339 time with offset, e.g. 2025-09-05T13:30:00Z"
            ))
        })
    })
    .transpose()
}

/// Prints the stored window `[since, until)` page by page; `Some(signal)` when a signal
/// stopped it between pages.
async fn window(
    bus: &Bus,
    pattern: TopicPattern,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    max: Option<u64>,
    p: &mut Printer,
    signals: &mut Signals,
) -> CliResult<Option<Signal>> {
    let replay = bus.replay().ok_or_else(|| {
        CliError::usage(format!(
            "--since/--until: the transport at {} cannot read stored windows",
            bus.url_redacted()
        ))
    })?;
    let mut q = WindowQuery::new(pattern);
    q.start = since;
    q.end = until;
    loop {
        if let Some(s) = signals.received() {
            return Ok(Some(s));
        }
        if let Some(m) = max {
            q.limit = (m - p.count()).min(1000) as usize;
            if q.limit == 0 {
                break;
            }
        }
        let page = replay
            .read_page(&q)
            .await
            .map_err(|e| CliError::bus("reading the stored window", &e))?;
        if page.messages.is_empty() {
            break;
        }
        q.cursor = Some(page.next);
        let page = page.messages;
        let before = p.out.lines_written();
        let written = async {
            for m in &page {
                p.print(bus, &m.envelope, m.sequence, m.stored_at, 1)
                    .await?;
            }
            p.out.flush()
        }
        .await;
        let accepted = (p.out.lines_written() - before) as usize;
        for m in page.iter().take(accepted) {
            p.counter.consumed(&m.envelope.topic);
        }
        if let Err(e) = written {
            return Err(p.stdout_error(e, None));
        }
    }
    Ok(None)
}

/// Subscribes (durable or ephemeral from the start) and prints until --max, idle --timeout
/// or a signal (`Some(signal)`). A durable reader acks exactly the messages whose whole line
/// `write(2)` accepted and releases (nack, no delay) what it fetched and did not print.
async fn follow(
    bus: &Bus,
    pattern: TopicPattern,
    args: &SubArgs,
    p: &mut Printer,
    signals: &mut Signals,
) -> CliResult<Option<Signal>> {
    let spec = match &args.durable {
        Some(name) => SubscribeSpec::durable(pattern, name.clone()),
        None => SubscribeSpec::ephemeral(pattern, StartAt::Earliest),
    };
    let mut sub = bus.subscribe(spec).await.map_err(|e| match &args.durable {
        Some(n) => CliError::bus(format!("--durable {n:?}"), &e),
        None => CliError::bus("subscribe", &e),
    })?;
    let limits = Limits {
        max: args.max,
        idle: Duration::from_secs_f64(args.timeout),
        fetch: FETCH,
        durable: args.durable.is_some(),
    };
    let counter = p.counter.clone();
    let mut sink = PrintSink { bus, p };
    follow::follow(&mut sub, &limits, &mut sink, &counter, signals)
        .await
        .1
}

/// `sub`'s [`Sink`]: prints each delivery; finished = lines `write(2)` accepted whole.
struct PrintSink<'a> {
    bus: &'a Bus,
    p: &'a mut Printer,
}

impl Sink for PrintSink<'_> {
    async fn take(&mut self, got: &[Delivery], _signals: &mut Signals) -> (usize, CliResult<()>) {
        let p = &mut *self.p;
        let before = p.out.lines_written();
        let written = async {
            for d in got {
                let i = &d.info;
                p.print(
                    self.bus,
                    &d.envelope,
                    i.sequence,
                    i.stored_at,
                    i.delivery_count,
                )
                .await?;
            }
            p.out.flush()
        }
        .await;
        let accepted = (p.out.lines_written() - before) as usize;
        (accepted, written.map(|_| ()))
    }

    fn stop_error(&self, e: CliError, acked: Option<u64>) -> CliError {
        self.p.stdout_error(e, acked)
    }
}

struct Printer {
    /// Counts consumed messages for `/metrics` and `/stats`.
    counter: ReaderCounter,
    out: Out,
    json: bool,
    decode: bool,
    /// `--blob-pointers`: print blob-stored payloads as their pointer headers.
    blob_pointers: bool,
    /// Schemas `--decode` does not know, each noted once on stderr.
    unknown_schemas: HashSet<String>,
}

impl Printer {
    /// Messages printed: lines `write(2)` accepted whole.
    fn count(&self) -> u64 {
        self.out.lines_written()
    }

    /// Queues one message's line (written out at the flush or when the buffer fills). A
    /// blob-stored payload that cannot be inlined is an error naming the message, returned
    /// after what was queued before it is flushed (so a durable reader acks exactly that).
    async fn print(
        &mut self,
        bus: &Bus,
        env: &Envelope,
        seq: u64,
        stored_at: DateTime<Utc>,
        delivery_count: u32,
    ) -> CliResult<()> {
        let text = if self.json {
            let inlined;
            let env = match env.headers.blob_ref() {
                Some(blob_ref) if !self.blob_pointers => match bus.codec().inline_blob(env).await {
                    Ok(e) => {
                        inlined = e;
                        &inlined
                    }
                    Err(e) => {
                        let id = env.headers.message_id().unwrap_or("-");
                        self.out.flush()?;
                        return Err(CliError::bus(
                            format!(
                                "message {id}: blob_ref {blob_ref}: not printed, its payload cannot be inlined (--blob-pointers prints the pointer instead)"
                            ),
                            &e,
                        ));
                    }
                },
                _ => env,
            };
            let mut json = env.to_json(None);
            if self.decode {
                json.payload_json = self.payload_json(bus, env).await;
            }
            serde_json::to_string(&json).expect("envelope JSON serialises")
        } else {
            readable(bus, env, seq, stored_at, delivery_count).await
        };
        self.out.line(&text)?;
        Ok(())
    }

    /// The error to end with after a failed write: on a closed stdout, how far it got.
    fn stdout_error(&self, e: CliError, acked: Option<u64>) -> CliError {
        if !self.out.is_closed() {
            return e;
        }
        CliError::transport(match acked {
            Some(n) => format!("stdout closed after acking {n} message(s)"),
            None => format!("stdout closed after {} message(s)", self.count()),
        })
    }

    /// `--decode`: the payload as JSON, or `None` with the reason on stderr — per message
    /// when the payload cannot be read or does not decode as its known schema, once per
    /// schema when the schema is unknown to this build.
    async fn payload_json(&mut self, bus: &Bus, env: &Envelope) -> Option<Value> {
        let fqdn = env.headers.schema_fqdn().unwrap_or_default();
        let id = env.headers.message_id().unwrap_or("-");
        let raw = match bus.decode_payload(env).await {
            Ok(raw) => raw,
            Err(e) => {
                eprintln!("message {id}: payload_json omitted: the payload cannot be read: {e}");
                return None;
            }
        };
        match ProtoDecoder.decode_json(fqdn, &raw) {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                eprintln!("message {id}: payload_json omitted: does not decode as {fqdn}: {e}");
                None
            }
            None => {
                if self.unknown_schemas.insert(fqdn.to_owned()) {
                    eprintln!(
                        "payload_json omitted for schema_fqdn {fqdn:?}: not a schema this build knows (said once per schema)"
                    );
                }
                None
            }
        }
    }
}

const KEY_HEADERS: [&str; 13] = [
    names::MESSAGE_ID,
    names::SCHEMA_FQDN,
    names::SCHEMA_VERSION,
    names::CONTENT_TYPE,
    names::CONTENT_ENCODING,
    names::PRODUCED_AT,
    names::PRODUCER,
    names::SOURCE,
    names::RUN_ID,
    names::PARTITION_KEY,
    names::DEDUPE_KEY,
    names::TRACEPARENT,
    names::BLOB_REF,
];

/// The human-readable block of one message.
async fn readable(
    bus: &Bus,
    env: &Envelope,
    seq: u64,
    stored_at: DateTime<Utc>,
    delivery_count: u32,
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let redelivered = if delivery_count > 1 {
        format!(", delivery {delivery_count}")
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        "── {}  (seq {seq}, stored {}{redelivered})",
        env.topic,
        ampybus::ids::format_time(stored_at)
    );
    for name in KEY_HEADERS {
        if let Some(v) = env.headers.get(name) {
            let _ = writeln!(s, "  {:<15} {v}", format!("{name}:"));
        }
    }
    let others: Vec<String> = env
        .headers
        .iter()
        .filter(|(k, _)| !KEY_HEADERS.contains(k) && *k != names::TRACE_ID && *k != names::SPAN_ID)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !others.is_empty() {
        let _ = writeln!(s, "  {:<15} {}", "other:", others.join(" "));
    }
    let fqdn = env.headers.schema_fqdn().unwrap_or_default();
    match bus.decode_payload(env).await {
        Err(e) => {
            let _ = writeln!(
                s,
                "  {:<15} {} bytes as carried; cannot decode: {e}",
                "payload:",
                env.payload.len()
            );
            let _ = write!(s, "  {}", preview(&env.payload));
        }
        Ok(raw) => {
            let carried = if raw.len() != env.payload.len() {
                format!(" ({} bytes as carried)", env.payload.len())
            } else {
                String::new()
            };
            let _ = writeln!(s, "  {:<15} {} bytes{carried}", "payload:", raw.len());
            match ProtoDecoder.decode_json(fqdn, &raw) {
                Some(Ok(v)) => {
                    let pretty = serde_json::to_string_pretty(&v).unwrap_or_default();
                    for line in pretty.lines() {
                        let _ = writeln!(s, "  {line}");
                    }
                    s.pop();
                }
                Some(Err(e)) => {
                    let _ = writeln!(s, "  (does not decode as {fqdn}: {e})");
                    let _ = write!(s, "  {}", preview(&raw));
                }
                None => {
                    let _ = write!(s, "  {}", preview(&raw));
                }
            }
        }
    }
    s
}

/// Hex of the first 64 bytes, plus the text when the bytes are printable UTF-8.
fn preview(b: &[u8]) -> String {
    if b.is_empty() {
        return "(empty)".into();
    }
    let head = &b[..b.len().min(64)];
    let more = if b.len() > head.len() { " …" } else { "" };
    let mut s = format!("hex: {}{more}", util::encode_hex(head));
    if let Ok(t) = std::str::from_utf8(b)
        && !t.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        let shown: String = t.chars().take(120).collect();
        let more = if shown.len() < t.len() { "…" } else { "" };
        s.push_str(&format!("\n  text: {shown:?}{more}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews() {
        assert_eq!(preview(b""), "(empty)");
        assert_eq!(preview(b"hi"), "hex: 6869\n  text: \"hi\"");
        assert_eq!(preview(&[0xff, 0]), "hex: ff00");
        assert!(preview(&[1u8; 100]).contains(" …"));
    }

    #[test]
    fn time_flags() {
        assert!(parse_time_flag("--since", None).unwrap().is_none());
        assert!(
            parse_time_flag("--since", Some("2025-09-05T13:30:00Z"))
                .unwrap()
                .is_some()
        );
        let e = parse_time_flag("--until", Some("yesterday")).unwrap_err();
        assert!(e.message.starts_with("--until \"yesterday\""), "{e}");
    }
}
