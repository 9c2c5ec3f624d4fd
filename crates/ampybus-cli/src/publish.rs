//! `ampybus pub`.

use crate::error::{CliError, CliResult, EXIT_OK, EXIT_TIMEOUT, EXIT_TRANSPORT};
use crate::util::{self, Out, Signal, Signals};
use ampybus::headers::names;
use ampybus::transport::PublishOutcome;
use ampybus::{Bus, Envelope, Headers, Topic};
use bytes::Bytes;
use clap::Args;
use std::io::Read;
use std::path::Path;
use std::path::PathBuf;
use std::time::Instant;

/// `ampybus pub`.
#[derive(Debug, Args)]
pub struct PubArgs {
    /// Concrete topic, e.g. ampy.dev.bars.v1.XNAS.AAPL
    #[arg(long, value_name = "TOPIC", required_unless_present = "json_envelope")]
    pub topic: Option<String>,
    /// `producer` header: the logical service instance, e.g. oms@host-1
    #[arg(long, value_name = "P", required_unless_present = "json_envelope")]
    pub producer: Option<String>,
    /// `source` header: the upstream system
    #[arg(long, value_name = "S", required_unless_present = "json_envelope")]
    pub source: Option<String>,
    /// `partition_key` header; its shape depends on the domain (bars: MIC.SYMBOL, …)
    #[arg(long, value_name = "KEY", required_unless_present = "json_envelope")]
    pub pk: Option<String>,
    /// `schema_fqdn` header
    #[arg(long, value_name = "FQDN", default_value = ampybus::headers::RAW_BYTES_SCHEMA)]
    pub schema: String,
    /// `schema_version` header (semver) [default: 1.0.0]
    #[arg(long, value_name = "SEMVER")]
    pub schema_version: Option<String>,
    /// `run_id` header [default: run-<utc>-<random>, one per invocation]
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,
    /// `dedupe_key` header
    #[arg(long, value_name = "K")]
    pub dedupe_key: Option<String>,
    /// Extra header NAME=VALUE (repeatable); overrides the value a flag or default would set
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
    /// Payload: the bytes of this file (`-` for stdin)
    #[arg(long, value_name = "FILE", group = "payload_src")]
    pub payload_file: Option<PathBuf>,
    /// Payload: hex bytes (whitespace and a leading 0x are ignored)
    #[arg(long, value_name = "HEX", group = "payload_src")]
    pub payload_hex: Option<String>,
    /// Payload: this UTF-8 string
    #[arg(long, value_name = "STRING", group = "payload_src")]
    pub payload: Option<String>,
    /// Publish the envelope(s) in this file (JSON form) as is
    #[arg(
        long,
        value_name = "FILE",
        group = "payload_src",
        conflicts_with_all = ["topic", "producer", "source", "pk", "schema_version", "run_id", "dedupe_key", "headers", "count"]
    )]
    pub json_envelope: Option<PathBuf>,
    /// Publish N messages (a fresh message_id each)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Messages per publish_batch call when --count > 1
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch: u64,
    /// Print the message_id of each message the transport confirmed on stdout, one per line
    #[arg(long)]
    pub print_ids: bool,
    /// Write every message not confirmed (unknown or unsent; after a signal or failure also
    /// the rest of the job) to FILE as JSON lines; `pub --json-envelope FILE` retries them
    /// with the same ids
    #[arg(long, value_name = "FILE")]
    pub unconfirmed: Option<PathBuf>,
    /// Durability tier of every topic of the command: best_effort (or best-effort),
    /// at_least_once, at_least_once_dedupe [default: the registry's, else at_least_once_dedupe].
    /// A registry entry wins
    #[arg(long, value_name = "TIER", value_parser = crate::util::parse_tier)]
    pub tier: Option<ampybus::tier::Tier>,
}

/// Runs `pub`.
pub async fn run(url: &str, args: PubArgs) -> CliResult<u8> {
    if let Some(path) = &args.json_envelope {
        return publish_envelope_file(url, path, args.print_ids, args.unconfirmed.as_deref()).await;
    }
    let required = |v: &Option<String>, flag: &str| -> CliResult<String> {
        v.clone()
            .ok_or_else(|| CliError::usage(format!("{flag} is required (or use --json-envelope)")))
    };
    let topic_s = required(&args.topic, "--topic")?;
    let producer = required(&args.producer, "--producer")?;
    let source = required(&args.source, "--source")?;
    let pk = required(&args.pk, "--pk")?;

    let topic =
        Topic::parse(&topic_s).map_err(|e| CliError::bus(format!("--topic {topic_s:?}"), &e))?;
    let extra = parse_headers(&args.headers)?;
    if args.count > 1 && extra.iter().any(|(k, _)| k == names::MESSAGE_ID) {
        return Err(CliError::usage(
            "--header message_id=…: cannot be combined with --count > 1 (every message needs its own id)",
        ));
    }
    let payload = read_payload(&args)?;
    let run_id = args.run_id.clone().unwrap_or_else(util::new_run_id);

    let make = || -> Headers {
        let mut h = Headers::for_publish(&args.schema, &producer, &source, &pk);
        if let Some(v) = &args.schema_version {
            h.set(names::SCHEMA_VERSION, v.clone());
        }
        h.set(names::RUN_ID, run_id.clone());
        if let Some(k) = &args.dedupe_key {
            h.set(names::DEDUPE_KEY, k.clone());
        }
        if extra.iter().any(|(k, _)| k == names::TRACEPARENT) {
            // Let the given traceparent define trace_id/span_id.
            h.remove(names::TRACE_ID);
            h.remove(names::SPAN_ID);
        }
        for (k, v) in &extra {
            h.set(k.clone(), v.clone());
        }
        h.fill_publish_defaults();
        h
    };

    // Check the contract (and the registry's claims) before touching the data directory.
    let first = make();
    first
        .validate_for_publish(&topic)
        .map_err(|e| header_error(&e, &args, &extra))?;
    if let Some(reg) = util::registry() {
        reg.check_publish(&topic, first.producer(), first.schema_fqdn())
            .map_err(|e| header_error(&e, &args, &extra))?;
    }

    let mut run = Run::new(args.count, args.print_ids, args.unconfirmed.as_deref())?;
    let bus = util::connect(url).await?;
    run.start()?;
    let context = format!("publishing to {topic_s}");
    let mut built = 0u64;
    while built < args.count && run.go_on() {
        let n = args.batch.min(args.count - built);
        let batch: Vec<Envelope> = (0..n)
            .map(|_| Envelope::new(&topic, make(), payload.clone()))
            .collect();
        built += n;
        run.send(&bus, batch, false, &context).await;
    }
    // The part of the job never built is unsent too; --unconfirmed gets it as well, so
    // publishing that file completes the job.
    if run.unconfirmed.is_some() {
        for _ in built..args.count {
            run.not_sent(&Envelope::new(&topic, make(), payload.clone()));
        }
    } else {
        run.unsent += args.count - built;
    }
    let secs = run.started.elapsed().as_secs_f64();
    let close = util::close(&bus).await;
    let done = format!(
        "to {topic_s} in {secs:.3}s ({:.0} msg/s), {}, run_id {run_id}{}",
        run.confirmed as f64 / secs.max(1e-9),
        run.seq_range(),
        run.dups_note()
    );
    run.finish("message(s)", &done, close)
}

/// Why a publish run stopped before its end.
enum Stop {
    Signal(Signal),
    Failed(CliError),
    StdoutClosed,
}

/// One publish run (`--count` or `--json-envelope`): batches go out while no signal, failure
/// or closed stdout stopped it; every confirmed id is printed (with --print-ids), every
/// other envelope counted as unknown or unsent and written to --unconfirmed.
struct Run {
    total: u64,
    print_ids: bool,
    out: Out,
    signals: Option<Signals>,
    /// `--unconfirmed FILE`: the path as given and the open file.
    unconfirmed: Option<(String, std::io::BufWriter<std::fs::File>)>,
    /// --unconfirmed was given.
    keep: bool,
    /// Envelopes written to --unconfirmed.
    written: u64,
    confirmed: u64,
    unknown: u64,
    unsent: u64,
    dups: u64,
    first_seq: Option<u64>,
    last_seq: u64,
    started: Instant,
    stop: Option<Stop>,
}

impl Run {
    /// Opens (truncates) --unconfirmed before anything is published.
    fn new(total: u64, print_ids: bool, unconfirmed: Option<&Path>) -> CliResult<Run> {
        let unconfirmed = unconfirmed
            .map(|p| {
                std::fs::File::create(p)
                    .map(|f| (p.display().to_string(), std::io::BufWriter::new(f)))
                    .map_err(|e| {
                        CliError::usage(format!(
                            "--unconfirmed {}: cannot create: {e}",
                            p.display()
                        ))
                    })
            })
            .transpose()?;
        Ok(Run {
            total,
            print_ids,
            out: Out::new(),
            signals: None,
            keep: unconfirmed.is_some(),
            unconfirmed,
            written: 0,
            confirmed: 0,
            unknown: 0,
            unsent: 0,
            dups: 0,
            first_seq: None,
            last_seq: 0,
            started: Instant::now(),
            stop: None,
        })
    }

    /// Starts catching signals and the clock (after connecting).
    fn start(&mut self) -> CliResult<()> {
        self.signals = Some(Signals::new()?);
        self.started = Instant::now();
        Ok(())
    }

    /// Whether to send another batch: nothing stopped the run and no signal arrived.
    fn go_on(&mut self) -> bool {
        if self.stop.is_none()
            && let Some(s) = self.signals.as_mut().and_then(Signals::received)
        {
            self.stop = Some(Stop::Signal(s));
        }
        self.stop.is_none()
    }

    /// Publishes one batch (raw payloads, or `wire` envelopes as they are) to the end, and
    /// settles every message of it: confirmed ids printed, the rest counted and written.
    async fn send(&mut self, bus: &Bus, batch: Vec<Envelope>, wire: bool, context: &str) {
        let outcome = if wire {
            bus.publish_wire_outcomes(batch.clone()).await
        } else {
            bus.publish_batch_outcomes(batch.clone()).await
        };
        for (i, env) in batch.iter().enumerate() {
            match outcome
                .outcomes
                .get(i)
                .copied()
                .unwrap_or(PublishOutcome::Unknown)
            {
                PublishOutcome::Confirmed(r) => {
                    self.confirmed += 1;
                    self.first_seq.get_or_insert(r.sequence);
                    self.last_seq = r.sequence;
                    self.dups += u64::from(r.duplicate);
                    if self.print_ids && !self.out.is_closed() {
                        let id = env.headers.message_id().unwrap_or_default();
                        if let Err(e) = self.out.line(id) {
                            self.stdout_failed(e);
                        }
                    }
                }
                PublishOutcome::Unknown => {
                    self.unknown += 1;
                    self.write_unconfirmed(env);
                }
                PublishOutcome::Unsent => self.not_sent(env),
            }
        }
        if self.print_ids
            && !self.out.is_closed()
            && let Err(e) = self.out.flush()
        {
            self.stdout_failed(e);
        }
        if let Some(e) = outcome.error {
            let mut e = CliError::bus(context, &e);
            // A publish that timed out is a broker failure like any other.
            if e.code == EXIT_TIMEOUT {
                e.code = EXIT_TRANSPORT;
            }
            self.stop.get_or_insert(Stop::Failed(e));
        }
    }

    fn stdout_failed(&mut self, e: CliError) {
        let stop = if self.out.is_closed() {
            Stop::StdoutClosed
        } else {
            Stop::Failed(e)
        };
        self.stop.get_or_insert(stop);
    }

    /// Counts one message that was not sent and writes it to --unconfirmed.
    fn not_sent(&mut self, env: &Envelope) {
        self.unsent += 1;
        self.write_unconfirmed(env);
    }

    fn write_unconfirmed(&mut self, env: &Envelope) {
        use std::io::Write;
        let Some((path, f)) = &mut self.unconfirmed else {
            return;
        };
        match writeln!(f, "{}", env.to_json_line(None)) {
            Ok(()) => self.written += 1,
            Err(e) => {
                let e = CliError::usage(format!("--unconfirmed {path}: cannot write: {e}"));
                self.unconfirmed = None;
                self.stop.get_or_insert(Stop::Failed(e));
            }
        }
    }

    /// Prints the summary and picks the exit code. `done` follows "published N {what} " on
    /// a complete run.
    /// `seq FIRST..LAST` of the confirmed messages.
    fn seq_range(&self) -> String {
        format!("seq {}..{}", self.first_seq.unwrap_or(0), self.last_seq)
    }

    /// `, N duplicate(s) not stored again`, or nothing.
    fn dups_note(&self) -> String {
        if self.dups > 0 {
            format!(", {} duplicate(s) not stored again", self.dups)
        } else {
            String::new()
        }
    }

    fn finish(mut self, what: &str, done: &str, close: CliResult<()>) -> CliResult<u8> {
        use std::io::Write;
        if let Some((path, mut f)) = self.unconfirmed.take()
            && let Err(e) = f.flush()
        {
            self.written = 0;
            self.stop
                .get_or_insert(Stop::Failed(CliError::usage(format!(
                    "--unconfirmed {path}: cannot write: {e}"
                ))));
        }
        let Some(stop) = self.stop.take() else {
            close?;
            eprintln!("published {} {what} {done}", self.confirmed);
            return Ok(EXIT_OK);
        };
        let why = match &stop {
            Stop::Signal(s) => format!("stopped by {}", s.name()),
            Stop::Failed(_) => "stopped by the error below".to_owned(),
            Stop::StdoutClosed => "stopped: stdout closed".to_owned(),
        };
        let not_confirmed = self.unknown + self.unsent;
        let file = if not_confirmed == 0 {
            String::new()
        } else if self.keep {
            format!("; {} of them written to --unconfirmed", self.written)
        } else {
            "; use --unconfirmed FILE to keep them for a retry".to_owned()
        };
        eprintln!(
            "published {} of {} {what} {done}; confirmed {}, unknown {}, unsent {}{file}; {why}",
            self.confirmed, self.total, self.confirmed, self.unknown, self.unsent
        );
        match stop {
            Stop::Signal(s) => Ok(s.job_code()),
            Stop::Failed(e) => Err(e),
            Stop::StdoutClosed => Err(CliError::transport(format!(
                "stdout closed after {} id(s) were printed",
                self.out.lines_written()
            ))),
        }
    }
}

/// Parses `--header NAME=VALUE` values.
fn parse_headers(raw: &[String]) -> CliResult<Vec<(String, String)>> {
    raw.iter()
        .map(|h| match h.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(CliError::usage(format!(
                "--header {h:?}: expected NAME=VALUE with a non-empty NAME"
            ))),
        })
        .collect()
}

fn read_payload(args: &PubArgs) -> CliResult<Bytes> {
    if let Some(p) = &args.payload_file {
        let read = if p.as_os_str() == "-" {
            let mut v = Vec::new();
            std::io::stdin().read_to_end(&mut v).map(|_| v)
        } else {
            std::fs::read(p)
        };
        return read
            .map(Bytes::from)
            .map_err(|e| CliError::usage(format!("--payload-file {:?}: cannot read: {e}", p)));
    }
    if let Some(h) = &args.payload_hex {
        return util::decode_hex(h)
            .map(Bytes::from)
            .map_err(|e| CliError::usage(format!("--payload-hex: {e}")));
    }
    Ok(args
        .payload
        .as_ref()
        .map(|s| Bytes::from(s.clone().into_bytes()))
        .unwrap_or_default())
}

/// Names the flag that set the header an error is about.
fn header_error(e: &ampybus::Error, args: &PubArgs, extra: &[(String, String)]) -> CliError {
    let header = e
        .message()
        .strip_prefix('`')
        .and_then(|m| m.split_once('`'))
        .map(|(h, _)| h.to_owned())
        .unwrap_or_default();
    let context = if let Some((k, v)) = extra.iter().rev().find(|(k, _)| *k == header) {
        format!("--header {:?}", format!("{k}={v}"))
    } else {
        let flag =
            |name: &str, v: &Option<String>| format!("{name} {:?}", v.as_deref().unwrap_or(""));
        match header.as_str() {
            names::PARTITION_KEY => flag("--pk", &args.pk),
            names::PRODUCER => flag("--producer", &args.producer),
            names::SOURCE => flag("--source", &args.source),
            names::SCHEMA_FQDN => format!("--schema {:?}", args.schema),
            names::SCHEMA_VERSION => flag("--schema-version", &args.schema_version),
            names::RUN_ID => flag("--run-id", &args.run_id),
            names::DEDUPE_KEY => flag("--dedupe-key", &args.dedupe_key),
            _ => String::new(),
        }
    };
    CliError::bus(context, e)
}

/// Publishes the envelope(s) of a JSON file exactly as written.
async fn publish_envelope_file(
    url: &str,
    path: &Path,
    print_ids: bool,
    unconfirmed: Option<&Path>,
) -> CliResult<u8> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("--json-envelope {shown}: cannot read: {e}")))?;
    let mut envs = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>();
    loop {
        let start = stream.byte_offset();
        let Some(item) = stream.next() else { break };
        // Counted only for an error: counting lines per envelope is quadratic in big files.
        let where_ = || {
            format!(
                "--json-envelope {shown}: envelope {} (line {})",
                envs.len() + 1,
                line_of_next_token(&text, start)
            )
        };
        let value = item.map_err(|e| {
            CliError::usage(format!(
                "{}: invalid envelope: not valid JSON: {e}",
                where_()
            ))
        })?;
        let env = Envelope::from_json_value(&value).map_err(|e| CliError::bus(where_(), &e))?;
        env.validate_for_publish()
            .map_err(|e| CliError::bus(where_(), &e))?;
        envs.push(env);
    }
    if envs.is_empty() {
        return Err(CliError::usage(format!(
            "--json-envelope {shown}: invalid envelope: the file holds no JSON object"
        )));
    }
    let n = envs.len();
    let mut run = Run::new(n as u64, print_ids, unconfirmed)?;
    let bus = util::connect(url).await?;
    run.start()?;
    let context = format!("--json-envelope {shown}");
    let mut rest = envs.into_iter();
    while rest.len() > 0 && run.go_on() {
        let batch: Vec<Envelope> = rest.by_ref().take(1000).collect();
        run.send(&bus, batch, true, &context).await;
    }
    for env in rest {
        run.not_sent(&env);
    }
    let secs = run.started.elapsed().as_secs_f64();
    let close = util::close(&bus).await;
    let done = format!(
        "from {shown} in {secs:.3}s, {}{}",
        run.seq_range(),
        run.dups_note()
    );
    run.finish("envelope(s)", &done, close)
}

fn line_of_next_token(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    let skipped = text[offset..].len() - text[offset..].trim_start().len();
    text[..offset + skipped].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_syntax() {
        assert_eq!(
            parse_headers(&["a=b=c".into(), "x=".into()]).unwrap(),
            vec![("a".into(), "b=c".into()), ("x".into(), String::new())]
        );
        assert!(parse_headers(&["novalue".into()]).is_err());
        assert!(
            parse_headers(&["=v".into()])
                .unwrap_err()
                .message
                .contains("--header \"=v\"")
        );
    }

    #[test]
    fn token_lines() {
        let t = "{}\n\n  {}";
        assert_eq!(line_of_next_token(t, 0), 1);
        assert_eq!(line_of_next_token(t, 2), 3);
    }
}
