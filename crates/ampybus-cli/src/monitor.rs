//! `ampybus monitor`: feed health of a pattern from now on — one line per stale, recovered,
//! gap, duplicate, lag or lag_recovered event (`runtime::feeds::FeedWatch`).

use crate::error::{CliError, CliResult};
use crate::util::{self, Out, Signals};
use ampybus::TopicPattern;
use ampybus::runtime::feeds::{FeedConfig, FeedWatch};
use clap::Args;
use std::time::Duration;

/// `ampybus monitor` flags.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Topic pattern to watch (`*` one token, `>` the rest)
    #[arg(long, value_name = "PATTERN")]
    pub pattern: String,

    /// A source or partition key silent this many seconds is stale (fractions allowed)
    #[arg(long, value_name = "SECS", default_value = "10")]
    pub stale_after: f64,

    /// A message arriving this many seconds after its produced_at makes its topic lag (one
    /// `lag` line, then `lag_recovered`); 0 turns the check off
    #[arg(long, value_name = "SECS", default_value = "30")]
    pub lag_after: f64,

    /// One JSON object per line: {"event", "topic", "key", "source", "at", …}
    #[arg(long)]
    pub json: bool,
}

/// Runs until SIGTERM (exit 0) or SIGINT (exit 130).
pub async fn run(url: &str, args: MonitorArgs) -> CliResult<u8> {
    let pattern = TopicPattern::parse(&args.pattern)
        .map_err(|e| CliError::bus(format!("--pattern {:?}", args.pattern), &e))?;
    if !(args.stale_after.is_finite() && args.stale_after > 0.0 && args.stale_after < 1e9) {
        return Err(CliError::usage(format!(
            "--stale-after {}: must be a number of seconds greater than 0",
            args.stale_after
        )));
    }
    if !(args.lag_after.is_finite() && args.lag_after >= 0.0 && args.lag_after < 1e9) {
        return Err(CliError::usage(format!(
            "--lag-after {}: must be a number of seconds, 0 or more (0: no lag check)",
            args.lag_after
        )));
    }
    let stale_after = Duration::from_secs_f64(args.stale_after);
    let lag_after = (args.lag_after > 0.0).then(|| Duration::from_secs_f64(args.lag_after));
    let mut signals = Signals::new()?;
    let bus = util::connect_existing(url).await?;
    let mut watch = FeedWatch::builder(
        bus.clone(),
        pattern,
        FeedConfig::new(stale_after).lag_after(lag_after),
    )
    .name("monitor")
    .start()
    .await
    .map_err(|e| CliError::bus("subscribe", &e))?;
    eprintln!(
        "monitor: watching {} from now on (stale after {}s); SIGINT/SIGTERM to stop",
        args.pattern, args.stale_after
    );
    let mut out = Out::new();
    let signal = loop {
        tokio::select! {
            s = signals.recv() => break Some(s),
            e = watch.next() => {
                // The watch ended by itself: its subscription failed (the error comes from stop).
                let Some(e) = e else { break None };
                let line = if args.json { e.to_json().to_string() } else { e.to_string() };
                out.line(&line)?;
                out.flush()?;
            }
        }
    };
    let stats = watch
        .stop()
        .await
        .map_err(|e| CliError::bus("monitor", &e))?;
    let Some(signal) = signal else {
        return Err(CliError::transport(
            "monitor: the subscription ended unexpectedly",
        ));
    };
    eprintln!(
        "monitor: stopped by {}; {} source(s) seen, {} stale now; {} gap(s), {} duplicate(s)",
        signal.name(),
        stats.sources,
        stats.stale_sources.len(),
        stats.gaps,
        stats.duplicates
    );
    util::close(&bus).await?;
    Ok(signal.open_code())
}
