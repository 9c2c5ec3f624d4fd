//! `ampybus migrate`: converts the data directory of an earlier version of the embedded log
//! (`ampybus.sqlite3`) to the current format, in place.

use crate::error::{CliError, CliResult, EXIT_OK};
use crate::util::Out;
use ampybus::bus::{TransportKind, redact, transport_kind};
use ampybus::transport::embedded::{EmbeddedOptions, MigrateReport, migrate};
use clap::Args;
use serde_json::json;

/// `ampybus migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Print the report as one JSON object
    #[arg(long)]
    pub json: bool,
}

/// Runs the migration of the data directory at `url`; prints the report on stdout.
pub fn run(url: &str, args: &MigrateArgs) -> CliResult<u8> {
    let shown = redact(url);
    let kind = transport_kind(url).map_err(|e| CliError::bus(format!("--url {shown:?}"), &e))?;
    if kind != TransportKind::Embedded {
        return Err(CliError::usage(format!(
            "--url {shown:?}: migrate converts an embedded-log data directory (a path or file:// URL), not a broker"
        )));
    }
    let opts = EmbeddedOptions::from_url(url)
        .map_err(|e| CliError::bus(format!("--url {shown:?}"), &e))?;
    let report = migrate(&opts.dir).map_err(|e| CliError::bus("", &e))?;
    let mut out = Out::new();
    if args.json {
        out.line(&to_json(&report).to_string())?;
    } else {
        for l in report.to_string().lines() {
            out.line(l)?;
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

/// The report as one JSON object.
fn to_json(r: &MigrateReport) -> serde_json::Value {
    let by_domain: serde_json::Map<String, serde_json::Value> = r
        .messages_by_domain
        .iter()
        .map(|(d, n)| (d.as_str().to_owned(), json!(n)))
        .collect();
    json!({
        "dir": r.dir.display().to_string(),
        "already_migrated": r.already_migrated,
        "redone": r.redone,
        "messages": r.messages,
        "messages_by_domain": by_domain,
        "dlq_messages": r.dlq_messages,
        "consumers": r.consumers,
        "acked_above_cursor": r.acked_above_cursor,
        "in_flight": r.in_flight,
        "dedupe_entries": r.dedupe_entries,
        "dedupe_only_groups": r.dedupe_only_groups,
        "legacy_file": r.legacy_file.as_ref().map(|p| p.display().to_string()),
    })
}
