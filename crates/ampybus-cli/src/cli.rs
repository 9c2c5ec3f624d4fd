//! Command-line surface (clap derive).

use clap::{Parser, Subcommand};
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
    Pub(Box<crate::publish::PubArgs>),

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
    Sub(crate::subscribe::SubArgs),

    /// Validate envelope files (JSON form) or every *.json file under directories
    #[command(after_help = "\
Examples:
  ampybus validate golden/
  ampybus validate message.json other.json

Prints `OK <path>` or `FAIL <path>: <reason>` per file on stdout and a summary on stderr.
Exit code 1 when any file is invalid or unreadable.")]
    Validate(crate::validate::ValidateArgs),

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
    Bench(crate::bench::BenchArgs),

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
    BenchNats(crate::bench::nats::BenchNatsArgs),

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
    BenchRedis(crate::bench::redis::BenchRedisArgs),

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
    BenchKafka(crate::bench::kafka::BenchKafkaArgs),

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
    BenchConsumer(crate::bench::BenchConsumerArgs),
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
        use crate::util::parse_secs;
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
