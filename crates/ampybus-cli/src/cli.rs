//! Command-line surface (clap derive).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

const ROOT_AFTER_HELP: &str = "\
Examples:
  ampybus pub --topic ampy.dev.news.v1.raw --producer me@laptop --source cli --pk n-1 --payload hello
  ampybus sub --pattern 'ampy.dev.news.>' --json --max 10
  ampybus validate golden/
  ampybus bench --messages 100000 --raw

Settings: a flag beats the environment, which beats the config file (--config, $AMPYBUS_CONFIG,
else ./ampybus.toml when present), which beats the default.

URL forms (--url, default $AMPYBUS_URL, `url` in the config file, or ./ampybus-data):
  ./dir or /abs/dir                      embedded log in that directory
  file:///abs/dir?sync=full|normal&poll_ms=2&retention_days=7
                 &retention.<domain>.days=N&retention.<domain>.max_mb=N
  file:rel/dir?options                   the same, relative
  nats://host:4222, tls://host:4222, redis://host:6379, rediss://host:6379, kafka://host:9092
  postgres://user@host/db                the archive (`ampybus archive`), read-only: sub --since/--until, dlq inspect
Retention values are N >= 1 or `unlimited` (keep forever); 0 is refused. Refused URLs:
file:/// (the root), file://host/dir (a host), a broker URL without a host.
";

/// Messaging for trading systems: publish, subscribe, validate envelopes, benchmark.
#[derive(Debug, Parser)]
#[command(
    name = "ampybus",
    version,
    about,
    after_help = const_format_root(),
    propagate_version = true
)]
pub struct Cli {
    /// Bus URL: a data directory path or file:///dir?options [default: $AMPYBUS_URL or ./ampybus-data]
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,

    /// Log filter for stderr (error, warn, info, debug, trace or a tracing directive such as
    /// `ampybus=debug`) [default: $RUST_LOG or warn]
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log line format on stderr: `text` or `json` (one JSON object per line with
    /// message_id, trace_id, topic, producer/consumer, result, latency_ms; never payloads)
    #[arg(long, global = true, value_name = "FORMAT", default_value = "text")]
    pub log_format: String,

    /// Serve /metrics (Prometheus), /health and /stats (JSON) on this address while the
    /// command runs, e.g. 127.0.0.1:9464 (sub, demo, pub, dlq, …)
    #[arg(long, global = true, value_name = "ADDR", env = "AMPYBUS_METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// Export spans over OTLP http/protobuf to this endpoint [default:
    /// $OTEL_EXPORTER_OTLP_ENDPOINT; unset: no export]
    #[arg(long, global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// Config file holding `url`, `registry`, `service`, `log_level`, `metrics_addr`,
    /// `otlp_endpoint` [default: $AMPYBUS_CONFIG, else ./ampybus.toml when present]. A flag
    /// beats the environment, which beats the file, which beats the default
    #[arg(long, global = true, value_name = "FILE", env = "AMPYBUS_CONFIG")]
    pub config: Option<PathBuf>,

    /// Topic registry (TOML): enforced on publish and subscribe, shown by `topics`, read by
    /// `registry …` [default: $AMPYBUS_REGISTRY, else `registry` in the config file]
    #[arg(long, global = true, value_name = "FILE", env = "AMPYBUS_REGISTRY")]
    pub registry: Option<PathBuf>,

    /// The service this process runs as: with a registry, subscriptions outside what it may
    /// read are refused [default: $AMPYBUS_SERVICE, else `service` in the config file]
    #[arg(long, global = true, value_name = "NAME", env = "AMPYBUS_SERVICE")]
    pub service: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

fn const_format_root() -> String {
    format!("{ROOT_AFTER_HELP}\n{}", crate::error::EXIT_CODE_HELP)
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish messages (opaque payload bytes) or an envelope file
    #[command(
        name = "pub",
        after_help = "\
Examples:
  ampybus pub --topic ampy.dev.news.v1.raw --producer me@laptop --source cli --pk n-1 --payload hello
  ampybus pub --topic ampy.dev.bars.v1.XNAS.AAPL --producer p@1 --source s --pk XNAS.AAPL \\
      --schema ampy.bars.v1.BarBatch --payload-file bars.bin --count 1000 --print-ids
  ampybus pub --json-envelope golden/bars/typical.json

The payload is never decoded. Without a payload flag the payload is empty.
`--json-envelope` publishes the envelope exactly as written in the file (one JSON object,
or several concatenated / one per line as `sub --json` prints them); it must satisfy every
publish rule, nothing is filled in.

Only ids the transport confirmed are printed. On SIGINT/SIGTERM the batch in flight is
finished and the run stops (exit 130 / 143); when the broker fails mid-run every confirmed id is
still printed (exit 3). The summary on stderr then counts confirmed, unknown (sent, no
confirmation) and unsent messages; --unconfirmed FILE keeps the unknown and unsent ones (and
the rest of the job) for `pub --json-envelope FILE`, which retries them with the same ids."
    )]
    Pub(Box<PubArgs>),

    /// Subscribe and print messages (or print a stored time window)
    #[command(
        name = "sub",
        after_help = "\
Examples:
  ampybus sub --pattern 'ampy.dev.>' --json --max 10
  ampybus sub --pattern 'ampy.prod.orders.>' --durable audit --timeout 30
  ampybus sub --pattern 'ampy.*.bars.>' --since 2025-09-05T13:30:00Z --until 2025-09-05T14:00:00Z --json

Exits 0 after --max messages, or after --timeout seconds without a message.
Without --durable the read starts at the earliest stored message and records no position.
With --durable a message is acknowledged once write(2) accepted its whole line: in a pipeline
that is what the reader was handed, not what it used, so give `head`-like readers --max N.
If the reader closes stdout: exit 3, `stdout closed after acking N message(s)`.
With --metrics-addr, bus_consumed_total{consumer=<the --durable name, or `sub`>} and /stats
count each message once its line was written (with --durable: and acknowledged).
SIGINT/SIGTERM: no new fetch, fetched messages not printed are released at once, summary on
stderr; exit 130 on SIGINT, 0 on SIGTERM (with --max or --since/--until: 130 / 143)."
    )]
    Sub(SubArgs),

    /// Validate envelope files (JSON form) or every *.json file under directories
    #[command(after_help = "\
Examples:
  ampybus validate golden/
  ampybus validate message.json other.json

Prints `OK <path>` or `FAIL <path>: <reason>` per file on stdout and a summary on stderr.
Exit code 1 when any file is invalid or unreadable.")]
    Validate(ValidateArgs),

    /// Measure publish throughput and end-to-end latency on a fresh temporary log
    #[command(after_help = "\
Examples:
  ampybus bench --messages 100000 --payload-bytes 256 --batch 1000 --raw
  ampybus bench --mode publish --concurrency 16 --sync normal
  ampybus bench --mode e2e --rate 10000 --json
  ampybus bench --mode consume --messages 100000 --keys 1000 --workers 8
  ampybus bench --mode archive --to postgres://postgres@127.0.0.1/bench --messages 100000 --json

Every round uses fresh temporary data directories under --dir, so the data at --url is never
touched. Rounds are interleaved (raw sqlite, ampybus batched, ampybus one-by-one, e2e) and
best/median/worst are reported. MB/s counts payload bytes only.")]
    Bench(BenchArgs),

    /// Run the end-to-end demo pipeline on synthetic data and print a summary
    #[command(after_help = "\
Examples:
  ampybus demo
  ampybus --url /tmp/ampy-demo demo --bars 600 --symbols AAPL,MSFT --json

bars → signals → orders → fills → positions on the transport at --url (the embedded log,
nats://, redis:// or kafka://), with one poison message dead-lettered and a replay that must
apply nothing new. Exit code 1 when an invariant of the run does not hold.")]
    Demo(crate::demo::DemoArgs),

    /// Ask a running consumer to replay a stored window through its own handler
    #[command(after_help = "\
Examples:
  ampybus replay --pattern 'ampy.dev.bars.>' --start 2025-09-05T13:30:00Z \\
      --end 2025-09-05T14:00:00Z --durable features
  ampybus replay --pattern 'ampy.prod.orders.>' --start … --end … --keys co_1,co_2 --durable oms --json

Publishes an ampy.control.v1.ReplayRequest on ampy.{env}.control.v1.replay_requests and shows
progress until the consumer NAME reports completion on ampy.{env}.control.v1.replay_status.
The consumer delivers [start, end) through its own handler; its dedupe store makes effects
already applied no-ops. Exit 0 when completed, 2 when the consumer rejected the request,
3 when it failed, 4 when no final report came within --timeout. To read history without a
consumer, use `ampybus sub --since T --until T`.")]
    Replay(crate::replay::ReplayArgs),

    /// Inspect, redrive or purge dead-lettered messages
    #[command(after_help = "\
Examples:
  ampybus dlq inspect --reason decode_error --json
  ampybus dlq redrive --reason handler_error --dry-run
  ampybus dlq purge --reason decode_error --yes

`ampybus dlq <COMMAND> --help` has the details of each.")]
    Dlq(crate::dlq::DlqArgs),

    /// Per-topic message counts and bytes, and durable consumer lag (embedded log, NATS, Redis, Kafka)
    #[command(after_help = "\
Examples:
  ampybus topics list --pattern 'ampy.dev.>'
  ampybus topics describe ampy.dev.news.v1.raw --json
  ampybus topics lag --consumer audit

Works on the embedded log and on nats://, redis:// and kafka:// URLs; what a row holds on
each broker is in the README (`ampybus topics`).")]
    Topics(crate::topics::TopicsArgs),

    /// Archive every message into PostgreSQL (typed tables per domain); migrate; verify
    #[command(after_help = "\
Examples:
  ampybus --url ./ampybus-data archive --pattern 'ampy.prod.>' --to postgres://postgres@127.0.0.1/ampy
  ampybus archive migrate --to postgres://postgres@127.0.0.1/ampy
  ampybus archive verify --to postgres://postgres@127.0.0.1/ampy --since 2025-09-05T00:00:00Z --until 2025-09-06T00:00:00Z

A durable consumer (--durable, default `archive`) writes each fetched batch (--batch, default
2,000) into schema ampybus in one transaction -- ampybus.envelopes (one row per message_id, the
message as carried) and the typed tables (bars, trades, quotes, orders, fills, positions,
signals, fx_rates, news) -- and acks it only after the commit. A message already archived is
skipped, so a restart after a crash writes nothing twice. A payload that does not decode is
archived without typed rows (decode_error column; bus_decode_fail_total). While PostgreSQL is
unreachable the batch is held and retried. The schema is created or migrated at start.
Exits 0 after --max messages or --timeout seconds idle; without them runs until SIGTERM (exit 0
after committing what it holds) or SIGINT (exit 130).
`archive verify` exits 1 when a topic's count or payload hashes differ over the window.")]
    Archive(crate::archive::ArchiveArgs),

    /// Relay a transactional outbox (PostgreSQL or SQLite) to the bus
    #[command(after_help = "\
Examples:
  ampybus outbox relay --db postgres://postgres@127.0.0.1/oms --url nats://127.0.0.1:4222
  ampybus outbox relay --db sqlite:///var/lib/oms.sqlite3 --url /var/lib/ampybus-data")]
    Outbox(crate::outbox::OutboxArgs),

    /// Convert a data directory of an earlier version (ampybus.sqlite3) to the current format
    #[command(after_help = "\
Examples:
  ampybus migrate --url /var/lib/ampy
  ampybus migrate --url ./ampybus-data --json

Converts the embedded log at --url in place: every message (same topics, headers, payloads and
store times, in the same order; new sequence numbers), the durable consumers (each resumes
after what it had acked), the dedupe records and the DLQ. Stop every process using the directory
first. The old file is kept as ampybus.sqlite3.migrated (delete it once satisfied). A run that
was interrupted is redone from the start; a directory already converted is left unchanged
(exit 0). Prints a report on stdout: messages per domain, consumers, dedupe entries, DLQ.")]
    Migrate(crate::migrate::MigrateArgs),

    /// JetStream streams behind a nats:// URL: ensure, list, describe
    #[command(after_help = "\
Examples:
  ampybus --url nats://127.0.0.1:4222 streams ensure --env dev
  ampybus --url nats://127.0.0.1:4222 streams list
  ampybus --url nats://127.0.0.1:4222 streams describe AMPY_DEV_BARS")]
    Streams(crate::streams::StreamsArgs),

    /// Watch feed health from now on: stale/recovered sources and keys, sequence gaps
    #[command(after_help = "\
Examples:
  ampybus monitor --pattern 'ampy.prod.ticks.>' --stale-after 5
  ampybus monitor --pattern 'ampy.prod.ticks.>' --json | jq -c 'select(.event == \"stale\")'

Reads new messages only (no durable position, so it works on every tier and takes nothing
from other consumers); a source or key is known once one of its messages has been seen.
One line per event on stdout: `stale` (a source, or a partition key, silent for --stale-after
seconds; heartbeats on ampy.{env}.ticks.v1.heartbeat.{source} keep their source alive),
`recovered` (its next message), `gap` / `duplicate` (the `sequence` header per producer, run
and key skipped or went back). With --json one object per line with `event`, `topic`, `at`,
and `key`, `source`, `silent_ms`, `producer`, `run_id`, `first_missing`, `last_missing`,
`sequence` where they apply. SIGTERM: clean stop, exit 0; SIGINT: exit 130.")]
    Monitor(crate::monitor::MonitorArgs),

    /// JetStream publish or consume throughput: ampybus against the raw async-nats client, interleaved rounds
    #[command(after_help = "\
Examples:
  ampybus --url nats://127.0.0.1:4222 bench-nats --messages 100000 --payload-bytes 256 --inflight 4000 --rounds 5
  ampybus --url nats://127.0.0.1:4222 bench-nats --mode consume --messages 100000 --keys 1000 --workers 8

Same subject prefix, headers, payload size and in-flight bound on both sides; fresh message ids
every round (so the duplicate window does not help either side).

--mode consume: a pre-filled subject of the run's own (untimed), read in every round by a raw
JetStream pull + ack loop, the runtime without dedupe (ratio) and with dedupe (ratio_dedupe), each
as a fresh durable consumer and required to read exactly --messages.")]
    BenchNats(crate::bench_nats::BenchNatsArgs),

    /// Redis Streams publish or consume throughput: ampybus against the raw redis client, interleaved rounds
    #[command(after_help = "\
Examples:
  ampybus --url redis://127.0.0.1:6379 bench-redis --messages 50000 --payload-bytes 256 --inflight 4096 --rounds 5
  ampybus --url redis://127.0.0.1:6379 bench-redis --mode consume --messages 50000 --json

Same stream, fields, payload size, MINID trim and in-flight bound (pipelines of up to 512 XADDs)
on both sides; each round's stream is deleted afterwards (untimed).

--mode consume: a pre-filled stream of the run's own (untimed), read in every round by a raw
XREADGROUP + XACK loop, the runtime without dedupe (ratio) and with dedupe (ratio_dedupe), each
as a fresh consumer group and required to read exactly --messages.")]
    BenchRedis(crate::bench_redis::BenchRedisArgs),

    /// Kafka publish or consume throughput: ampybus against raw rdkafka, interleaved rounds
    #[command(after_help = "\
Examples:
  ampybus --url kafka://127.0.0.1:9092 bench-kafka --messages 50000 --payload-bytes 256 --inflight 10000 --rounds 5
  ampybus --url kafka://127.0.0.1:9092 bench-kafka --mode consume --messages 50000 --json

Both sides use the transport's producer settings (idempotent, acks=all, linger.ms=1, the URL's
librdkafka settings), the same Kafka topic, record key, headers (the contract's plus `topic`),
payload size and bound on unconfirmed records. The topic (namespace `ampybench{pid}.` unless the
URL sets one) is created, and both producers send one record, before the first round, untimed.

--mode consume: a pre-filled topic of the run's own (untimed), read in every round by a raw
StreamConsumer + commit loop, the runtime without dedupe (ratio) and with dedupe (ratio_dedupe),
each as a fresh group and required to read exactly --messages.")]
    BenchKafka(crate::bench_kafka::BenchKafkaArgs),

    /// Topic registry: check it, and generate broker permissions and an AsyncAPI document
    #[command(after_help = "\
Examples:
  ampybus registry check --registry registry.example.toml
  ampybus registry check --registry registry.toml --manifests services/
  ampybus --registry registry.toml registry nats-config --passwords passwords.toml --out auth.conf
  ampybus --registry registry.toml registry asyncapi --format json

`ampybus registry <COMMAND> --help` has the details of each.")]
    Registry(crate::registry::RegistryArgs),

    /// Print a shell completion script to stdout
    #[command(after_help = "\
Examples:
  ampybus completions bash > /etc/bash_completion.d/ampybus
  ampybus completions zsh > \"${fpath[1]}/_ampybus\"")]
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },

    /// Internal: the consumer process of `bench --mode e2e`
    #[command(
        hide = true,
        name = "bench-consumer",
        after_help = "\
Examples:
  ampybus --url /tmp/bench-log bench-consumer --pattern ampy.dev.bench.v1.e2e --durable e2e --expect 100000

Started by `bench --mode e2e` in its own process; prints the latencies it measured on stdout."
    )]
    BenchConsumer(BenchConsumerArgs),
}

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
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
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

/// `ampybus validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Envelope files or directories (searched recursively for *.json)
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

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
    #[arg(long, default_value = "10", value_parser = parse_secs)]
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

pub(crate) fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of seconds such as 5 or 0.5 (got {s:?})"))?;
    if !v.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&v) {
        return Err(format!(
            "must be between 0 and one year of seconds (got {s:?})"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_secs("0.5"), Ok(0.5));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("NaN").is_err());
        assert!(parse_secs("soon").unwrap_err().contains("soon"));
    }
}

#[cfg(test)]
mod help_tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every command and nested subcommand, hidden ones included, as `ampybus a b` paths
    /// (clap's generated `help` commands, which print the others' help, left out).
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Command)>) {
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let p = format!("{path} {}", sub.get_name());
            out.push((p.clone(), sub.clone()));
            walk(sub, &p, out);
        }
    }

    #[test]
    fn every_command_help_has_an_example() {
        let mut all = Vec::new();
        let mut root = Cli::command();
        root.build();
        walk(&root, "ampybus", &mut all);
        let names: Vec<&str> = all.iter().map(|(p, _)| p.as_str()).collect();
        // The walk reaches the nested commands.
        for expected in [
            "ampybus pub",
            "ampybus sub",
            "ampybus dlq",
            "ampybus dlq inspect",
            "ampybus dlq redrive",
            "ampybus dlq purge",
            "ampybus topics lag",
            "ampybus streams ensure",
            "ampybus bench-consumer",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} not walked: {names:?}"
            );
        }
        let mut missing = Vec::new();
        let mut root_help = Cli::command();
        let root_text = root_help.render_long_help().to_string();
        assert!(
            root_text
                .lines()
                .any(|l| l.trim_start().starts_with("ampybus ")),
            "ampybus --help has no example"
        );
        for (path, mut cmd) in all {
            let text = cmd.render_long_help().to_string();
            let examples = text
                .split_once("Examples:")
                .map(|(_, rest)| rest)
                .unwrap_or("");
            if !examples
                .lines()
                .any(|l| l.trim_start().starts_with("ampybus "))
            {
                missing.push(path);
            }
        }
        assert!(missing.is_empty(), "--help without an example: {missing:?}");
    }

    #[test]
    fn files_cited_in_help_exist() {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut all = Vec::new();
        let mut root = Cli::command();
        root.build();
        walk(&root, "ampybus", &mut all);
        let mut cited = 0;
        for (path, mut cmd) in all {
            let text = cmd.render_long_help().to_string();
            for word in text.split_whitespace().filter(|w| w.starts_with("golden/")) {
                cited += 1;
                assert!(
                    repo.join(word).exists(),
                    "{path} --help cites {word}, which does not exist"
                );
            }
        }
        assert!(cited > 0, "no golden/ file cited in any --help");
    }
}
