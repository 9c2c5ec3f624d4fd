//! `ampybus streams`: the JetStream streams behind a `nats://` bus — ensure, list, describe.

use crate::error::{CliError, CliResult, EXIT_OK};
use ampybus::bus::{TransportKind, redact, transport_kind};
use ampybus::transport::nats::{NatsOptions, NatsTransport, streams};
use ampybus::{Domain, Env};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// `ampybus streams`.
#[derive(Debug, Args)]
pub struct StreamsArgs {
    #[command(subcommand)]
    pub command: StreamsCommand,
}

/// The `streams` subcommands.
#[derive(Debug, Subcommand)]
pub enum StreamsCommand {
    /// Find or create the stream of each env and domain (never changes an existing one unless
    /// the URL says `update_streams=true`)
    #[command(after_help = "\
Examples:
  ampybus --url nats://127.0.0.1:4222 streams ensure --env dev
  ampybus --url 'nats://127.0.0.1:4222?replicas=3' streams ensure --env prod --domain orders --domain fills")]
    Ensure {
        /// Environment (dev, paper, prod)
        #[arg(long, default_value = "dev")]
        env: String,
        /// Only these domains (repeatable; default: every domain)
        #[arg(long = "domain", value_name = "DOMAIN")]
        domains: Vec<String>,
        /// One JSON object per stream per line
        #[arg(long)]
        json: bool,
    },
    /// Every stream on the server: subjects, messages, bytes, sequences, consumers
    #[command(after_help = "\
Examples:
  ampybus --url nats://127.0.0.1:4222 streams list
  ampybus --url nats://127.0.0.1:4222 streams list --json")]
    List {
        /// One JSON object per stream per line
        #[arg(long)]
        json: bool,
    },
    /// One stream's configuration and state
    #[command(after_help = "\
Examples:
  ampybus --url nats://127.0.0.1:4222 streams describe AMPY_DEV_BARS")]
    Describe {
        /// Stream name
        name: String,
        /// One JSON object
        #[arg(long)]
        json: bool,
    },
}

/// Runs `ampybus streams …`.
pub async fn run(url: &str, args: StreamsArgs) -> CliResult<u8> {
    if transport_kind(url).map_err(|e| CliError::bus("--url", &e))? != TransportKind::Nats {
        return Err(CliError::usage(format!(
            "streams: --url {:?} is not a NATS URL (streams exist only on NATS JetStream; use `ampybus topics` for the embedded log)",
            redact(url)
        )));
    }
    let mut opts = NatsOptions::from_url(url).map_err(|e| CliError::bus("--url", &e))?;
    // `streams ensure` creates streams with the registry's retention, like the binding.
    if let Some(reg) = crate::util::registry() {
        opts.registry_retention = reg.unit_retentions();
    }
    let t = NatsTransport::connect(opts)
        .await
        .map_err(|e| CliError::bus("connecting", &e))?;
    match args.command {
        StreamsCommand::Ensure { env, domains, json } => ensure(&t, &env, &domains, json).await,
        StreamsCommand::List { json } => list(&t, json).await,
        StreamsCommand::Describe { name, json } => describe(&t, &name, json).await,
    }
}

async fn ensure(t: &NatsTransport, env: &str, domains: &[String], json: bool) -> CliResult<u8> {
    let env: Env = env.parse().map_err(|e| CliError::bus("--env", &e))?;
    let domains: Vec<Domain> = if domains.is_empty() {
        Domain::ALL.to_vec()
    } else {
        domains
            .iter()
            .map(|d| d.parse().map_err(|e| CliError::bus("--domain", &e)))
            .collect::<CliResult<_>>()?
    };
    for d in domains {
        let e = streams::ensure(t.jetstream(), t.options(), env, d)
            .await
            .map_err(|e| {
                CliError::bus(
                    format!("ensuring the stream of {env}.{d}", d = d.as_str()),
                    &e,
                )
            })?;
        let action = if e.created {
            "created"
        } else if e.updated {
            "updated"
        } else {
            "exists"
        };
        if json {
            crate::util::outln!(
                "{}",
                json!({"subject": streams::domain_subject(env, d), "stream": e.stream.name,
                    "subjects": e.stream.subjects, "action": action, "warnings": e.warnings})
            );
        } else {
            crate::util::outln!(
                "{:<40} {:<32} {action}{}",
                streams::domain_subject(env, d),
                e.stream.name,
                if e.warnings.is_empty() {
                    String::new()
                } else {
                    format!(" (differs: {})", e.warnings.join("; "))
                }
            );
        }
    }
    Ok(EXIT_OK)
}

fn info_json(i: &async_nats::jetstream::stream::Info) -> Value {
    let c = &i.config;
    json!({
        "name": c.name,
        "subjects": c.subjects,
        "storage": format!("{:?}", c.storage).to_lowercase(),
        "retention": format!("{:?}", c.retention).to_lowercase(),
        "discard": format!("{:?}", c.discard).to_lowercase(),
        "max_age_s": c.max_age.as_secs(),
        "duplicate_window_ms": c.duplicate_window.as_millis() as u64,
        "replicas": c.num_replicas,
        "messages": i.state.messages,
        "bytes": i.state.bytes,
        "first_seq": i.state.first_sequence,
        "last_seq": i.state.last_sequence,
        "consumers": i.state.consumer_count,
    })
}

async fn list(t: &NatsTransport, json: bool) -> CliResult<u8> {
    let all = streams::list(t.jetstream())
        .await
        .map_err(|e| CliError::bus("listing streams", &e))?;
    if !json {
        crate::util::outln!(
            "{:<32} {:<28} {:>10} {:>12} {:>10} {:>9}",
            "STREAM",
            "SUBJECTS",
            "MESSAGES",
            "BYTES",
            "LAST_SEQ",
            "CONSUMERS"
        );
    }
    for i in &all {
        if json {
            crate::util::outln!("{}", info_json(i));
        } else {
            crate::util::outln!(
                "{:<32} {:<28} {:>10} {:>12} {:>10} {:>9}",
                i.config.name,
                i.config.subjects.join(","),
                i.state.messages,
                i.state.bytes,
                i.state.last_sequence,
                i.state.consumer_count
            );
        }
    }
    Ok(EXIT_OK)
}

async fn describe(t: &NatsTransport, name: &str, json: bool) -> CliResult<u8> {
    let i = streams::describe(t.jetstream(), name)
        .await
        .map_err(|e| CliError::bus(format!("stream {name}"), &e))?;
    let v = info_json(&i);
    if json {
        crate::util::outln!("{v}");
    } else if let Value::Object(m) = v {
        for (k, v) in m {
            crate::util::outln!("{k:<20} {v}");
        }
    }
    Ok(EXIT_OK)
}
