//! The config file (`--config FILE`, `$AMPYBUS_CONFIG`, else `./ampybus.toml` when present) and
//! the precedence of global settings: a flag beats the environment, which beats the file,
//! which beats the default.

use crate::cli::Cli;
use crate::error::{CliError, CliResult};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The file looked for in the working directory when neither `--config` nor
/// `$AMPYBUS_CONFIG` names one.
pub const DEFAULT_CONFIG: &str = "ampybus.toml";

/// `ampybus.toml`: every key optional, unknown keys refused (naming file, line and key).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Bus URL (`--url`, `$AMPYBUS_URL`).
    pub url: Option<String>,
    /// Registry file (`--registry`, `$AMPYBUS_REGISTRY`); relative to the config file.
    pub registry: Option<PathBuf>,
    /// Service name (`--service`, `$AMPYBUS_SERVICE`).
    pub service: Option<String>,
    /// `--log-level` (`$RUST_LOG`).
    pub log_level: Option<String>,
    /// `--metrics-addr` (`$AMPYBUS_METRICS_ADDR`).
    pub metrics_addr: Option<String>,
    /// `--otlp-endpoint` (`$OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub otlp_endpoint: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

/// Reads the config file named by `--config`/`$AMPYBUS_CONFIG` (an error when missing) or
/// `./ampybus.toml` (skipped when absent), and fills every global setting the command line
/// and the environment left unset.
pub fn apply(cli: &mut Cli) -> CliResult<()> {
    let (path, named) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    if !named && !path.is_file() {
        return Ok(());
    }
    let file: FileConfig = ampybus::registry::load_toml(&path)
        .map_err(|e| CliError::usage(format!("config file {e}")))?;
    let base = path.parent().unwrap_or(Path::new("."));
    if cli.url.is_none() && env("AMPYBUS_URL").is_none() {
        cli.url = file.url;
    }
    if cli.registry.is_none() {
        cli.registry = file.registry.map(|r| base.join(r));
    }
    if cli.service.is_none() {
        cli.service = file.service;
    }
    if cli.log_level.is_none() && env("RUST_LOG").is_none() {
        cli.log_level = file.log_level;
    }
    if cli.metrics_addr.is_none() {
        cli.metrics_addr = file.metrics_addr;
    }
    if cli.otlp_endpoint.is_none() && env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
        cli.otlp_endpoint = file.otlp_endpoint;
    }
    Ok(())
}
