//! `ampybus replay`: asks a running consumer to replay a window through its own handler.

use crate::error::{CliError, CliResult, EXIT_OK, EXIT_TRANSPORT, EXIT_USAGE};
use crate::util::{self, Out};
use ampybus::control::{ReplayRequest, ReplayState, ReplayStatus};
use ampybus::runtime::control::request_replay;
use clap::Args;
use std::time::Duration;

/// `ampybus replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Topic pattern to replay; must name one env and lie within the consumer's pattern
    #[arg(long, value_name = "PAT")]
    pub pattern: String,
    /// Window start, inclusive (RFC3339, UTC offset allowed)
    #[arg(long, value_name = "TIME")]
    pub start: String,
    /// Window end, exclusive (RFC3339)
    #[arg(long, value_name = "TIME")]
    pub end: String,
    /// Only these partition keys (comma-separated)
    #[arg(long, value_name = "K,…", value_delimiter = ',')]
    pub keys: Vec<String>,
    /// The running durable consumer that replays through its own handler
    #[arg(long, value_name = "NAME")]
    pub durable: String,
    /// Why (recorded in the request and the consumer's log)
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub reason: String,
    /// Give up after this many seconds without a final report
    #[arg(long, value_name = "SECS", default_value = "600", value_parser = crate::util::parse_secs)]
    pub timeout: f64,
    /// Print the final report as one JSON object on stdout
    #[arg(long)]
    pub json: bool,
}

fn time(flag: &str, v: &str) -> CliResult<chrono::DateTime<chrono::Utc>> {
    ampybus::ids::parse_time(v.trim()).ok_or_else(|| {
        CliError::usage(format!(
            "{flag} {v:?}: not an RFC3339 time (e.g. 2025-09-05T13:30:00Z)"
        ))
    })
}

/// Runs `replay`.
pub async fn run(url: &str, args: ReplayArgs) -> CliResult<u8> {
    let start = time("--start", &args.start)?;
    let end = time("--end", &args.end)?;
    let mut req = ReplayRequest::new(&args.durable, &args.pattern, start, end);
    req.keys = args.keys.iter().map(|k| k.trim().to_owned()).collect();
    req.reason = args.reason.clone();
    req.requested_by = std::env::var("USER").unwrap_or_else(|_| "ampybus-cli".into());
    req.validate().map_err(|e| CliError::bus("", &e))?;
    let bus = util::connect(url).await?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message(format!(
        "replay {}: waiting for consumer `{}`…",
        req.request_id, args.durable
    ));
    let show = |s: &ReplayStatus| {
        bar.set_message(format!(
            "replay {}: {} — read {}, applied {}, skipped {}, failed {}",
            s.request_id,
            s.state().as_str(),
            s.read,
            s.applied,
            s.skipped_duplicates,
            s.failed
        ));
    };
    let mut signals = util::Signals::new()?;
    let last: std::sync::Mutex<Option<ReplayStatus>> = std::sync::Mutex::new(None);
    let show_and_keep = |s: &ReplayStatus| {
        show(s);
        *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
    };
    let result = tokio::select! {
        r = request_replay(&bus, &req, Duration::from_secs_f64(args.timeout), show_and_keep) => r,
        signal = signals.recv() => {
            bar.finish_and_clear();
            let _ = util::close(&bus).await;
            // The consumer goes on with the replay; only this watcher stops.
            let progress = match last.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                Some(s) => format!(
                    "last report: {} — read {}, applied {}, skipped (duplicates) {}, failed {}",
                    s.state().as_str(),
                    s.read,
                    s.applied,
                    s.skipped_duplicates,
                    s.failed
                ),
                None => "no report yet".to_owned(),
            };
            eprintln!(
                "replay {}: stopped watching by {} before the final report ({progress}); the consumer `{}` goes on",
                req.request_id,
                signal.name(),
                args.durable
            );
            return Ok(signal.job_code());
        }
    };
    bar.finish_and_clear();
    let close = util::close(&bus).await;
    let status = result.map_err(|e| CliError::bus("replay", &e))?;
    close?;
    let mut out = Out::new();
    if args.json {
        out.line(&status.to_json().to_string())?;
        out.flush()?;
    }
    eprintln!(
        "replay {} by `{}`: {} — read {}, applied {}, skipped (duplicates) {}, failed {}; first {}, last {}{}",
        status.request_id,
        status.consumer,
        status.state().as_str(),
        status.read,
        status.applied,
        status.skipped_duplicates,
        status.failed,
        or_dash(&status.first_message_id),
        or_dash(&status.last_message_id),
        if status.error.is_empty() {
            String::new()
        } else {
            format!("; error: {}", status.error)
        }
    );
    match status.state() {
        ReplayState::Completed => Ok(EXIT_OK),
        ReplayState::Rejected => Err(CliError {
            code: EXIT_USAGE,
            message: format!("replay rejected by `{}`: {}", status.consumer, status.error),
        }),
        _ => Err(CliError {
            code: EXIT_TRANSPORT,
            message: format!("replay failed in `{}`: {}", status.consumer, status.error),
        }),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}
