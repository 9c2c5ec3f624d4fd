//! `ampybus`: the command-line tool of the ampybus messaging layer.
//!
//! stdout carries only data (messages, ids, validation lines, results); logs, progress and
//! summaries go to stderr. See `ampybus --help` for the commands and the exit codes.

mod archive;
mod archive_rows;
mod bench;
mod cli;
mod config;
mod decoder;
mod demo;
mod dlq;
mod error;
mod follow;
mod migrate;
mod monitor;
mod outbox;
mod publish;
mod registry;
mod replay;
mod streams;
mod subscribe;
mod topics;
mod util;
mod validate;

use clap::{CommandFactory, Parser};
use cli::{Cli, Command};
use error::{CliError, CliResult};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if let Err(e) = config::apply(&mut cli) {
        eprintln!("error: {e}");
        return ExitCode::from(e.code);
    }
    if let Err(e) = init_logging(cli.log_level.as_deref(), &cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(e.code);
    }
    // Before any bus is made: a bus takes its tracer when it is created.
    let _tracing = match ampybus::obs::init_tracing("ampybus", cli.otlp_endpoint.as_deref()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(error::EXIT_USAGE);
        }
    };
    util::set_metrics_addr(cli.metrics_addr.clone());
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.code
        }
    };
    ExitCode::from(code)
}

fn init_logging(level: Option<&str>, format: &str) -> CliResult<()> {
    let format: ampybus::obs::LogFormat = format
        .parse()
        .map_err(|e: ampybus::Error| CliError::usage(format!("--log-format: {}", e.message())))?;
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => {
            EnvFilter::try_new(l).map_err(|e| CliError::usage(format!("--log-level {l:?}: {e}")))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let r = match format {
        ampybus::obs::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .try_init(),
        ampybus::obs::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    r.map_err(|e| CliError::usage(format!("cannot start logging: {e}")))
}

fn run(cli: Cli) -> CliResult<u8> {
    let url = cli.url.clone().unwrap_or_else(ampybus::bus::default_url);
    let command = match cli.command {
        Command::Registry(args) => return registry::run(cli.registry.as_deref(), args),
        other => other,
    };
    // Every other command enforces the registry when one is given.
    let reg = cli.registry.as_deref().map(registry::load).transpose()?;
    util::set_registry(reg, cli.service.clone());
    match command {
        Command::Registry(_) => unreachable!("handled above"),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "ampybus", &mut std::io::stdout());
            Ok(error::EXIT_OK)
        }
        Command::Validate(args) => validate::run(&args),
        Command::Pub(args) => {
            util::set_tier(args.tier);
            runtime()?.block_on(publish::run(&url, *args))
        }
        Command::Sub(args) => {
            util::set_tier(args.tier);
            runtime()?.block_on(subscribe::run(&url, args))
        }
        Command::Bench(args) => {
            util::set_tier(args.tier);
            runtime()?.block_on(util::job_until_signal(
                "bench",
                bench::run(&url, args, cli.log_level.as_deref()),
            ))
        }
        Command::BenchConsumer(args) => {
            util::set_tier(args.tier);
            // The consumer loop runs as a task of the runtime, as the consumer runtime's
            // fetcher does: a message the connection's task hands over is picked up by the
            // same worker thread instead of waking the thread blocked on the command.
            runtime()?.block_on(async move {
                tokio::spawn(async move { bench::consumer(&url, args).await })
                    .await
                    .map_err(|e| CliError::transport(format!("bench consumer task failed: {e}")))?
            })
        }
        Command::Demo(args) => {
            runtime()?.block_on(util::job_until_signal("demo", demo::run(&url, args)))
        }
        Command::Replay(args) => runtime()?.block_on(replay::run(&url, args)),
        Command::Dlq(args) => runtime()?.block_on(dlq::run(&url, args)),
        Command::Topics(args) => runtime()?.block_on(topics::run(&url, args)),
        Command::Archive(args) => runtime()?.block_on(archive::run(&url, args)),
        Command::Outbox(args) => runtime()?.block_on(outbox::run(&url, args)),
        Command::Migrate(args) => migrate::run(&url, &args),
        Command::Monitor(args) => runtime()?.block_on(monitor::run(&url, args)),
        Command::Streams(args) => runtime()?.block_on(streams::run(&url, args)),
        Command::BenchNats(args) => runtime()?.block_on(util::job_until_signal(
            "bench-nats",
            bench::nats::run(&url, args),
        )),
        Command::BenchRedis(args) => runtime()?.block_on(util::job_until_signal(
            "bench-redis",
            bench::redis::run(&url, args),
        )),
        Command::BenchKafka(args) => runtime()?.block_on(util::job_until_signal(
            "bench-kafka",
            bench::kafka::run(&url, args),
        )),
    }
}

fn runtime() -> CliResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::transport(format!("cannot start the async runtime: {e}")))
}
