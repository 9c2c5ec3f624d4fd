//! `ampybus-features`: the seed 004 features consumer as a runnable service.

use ampybus::runtime::feeds::SystemClock;
use ampybus::transport::StartAt;
use ampybus_features::{FeaturesService, ServiceConfig, SignalRule};
use clap::Parser;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Consumes `ampy.{env}.ticks.v1.>`, publishes rate-limited features and rule signals, and
/// serves /health /metrics /stats /state/latest?symbol= /features/latest?symbol=.
#[derive(Debug, Parser)]
#[command(name = "ampybus-features", version)]
struct Args {
    /// Bus URL: a directory (embedded log), nats://, redis://, kafka://
    #[arg(long, env = "AMPYBUS_URL", default_value = "./ampybus-data")]
    url: String,
    /// Environment token of the topics (dev, paper, prod)
    #[arg(long, default_value = "dev")]
    env: String,
    /// Service name (metric keys `{service}|{SYMBOL}`, consumer name)
    #[arg(long, default_value = "md-features")]
    service: String,
    /// Model id of the signals (`ampy.{env}.signals.v1.{model_id}`); default: the service name
    #[arg(long)]
    model_id: Option<String>,
    /// HTTP address for /health /metrics /stats /state/latest /features/latest
    #[arg(long, default_value = "127.0.0.1:8892")]
    http: String,
    /// Maximum feature publishes per symbol per second (0 = every tick)
    #[arg(long, default_value_t = 10.0)]
    publish_hz: f64,
    /// Signal rule: minimum |return_10s| as a fraction (0.003 = 0.3 %)
    #[arg(long, default_value_t = 0.003)]
    return_threshold: f64,
    /// Signal rule: trade volume over 10 s must exceed this
    #[arg(long, default_value_t = 1.0)]
    volume_threshold: f64,
    /// Signal rule: spread must be below this many basis points
    #[arg(long, default_value_t = 20.0)]
    max_spread_bps: f64,
    /// A new consumer starts at new messages instead of the earliest retained one
    #[arg(long)]
    from_latest: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = ampybus::obs::init_logging(ampybus::obs::LogFormat::Text, "info") {
        eprintln!("ampybus-features: logging: {e}");
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ampybus-features: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    if !(args.publish_hz.is_finite() && args.publish_hz >= 0.0) {
        return Err(format!(
            "--publish-hz {}: must be a finite number >= 0",
            args.publish_hz
        ));
    }
    let mut cfg = ServiceConfig::new(&args.env, &args.service);
    if let Some(m) = args.model_id {
        cfg.model_id = m;
    }
    cfg.publish_interval = if args.publish_hz == 0.0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(1.0 / args.publish_hz)
    };
    cfg.rule = SignalRule {
        return_threshold: args.return_threshold,
        volume_threshold: args.volume_threshold,
        max_spread_bps: args.max_spread_bps,
    };
    if args.from_latest {
        cfg.start_at = StartAt::Latest;
    }
    let bus = ampybus::Bus::connect(&args.url)
        .await
        .map_err(|e| format!("--url {}: {e}", ampybus::bus::redact(&args.url)))?;
    let mut svc = FeaturesService::start(&bus, cfg, Arc::new(SystemClock))
        .await
        .map_err(|e| e.to_string())?;
    let addr = svc
        .serve_http(&args.http)
        .await
        .map_err(|e| format!("--http {}: {e}", args.http))?;
    tracing::info!(%addr, "ampybus-features running; stop with SIGINT or SIGTERM");
    let stats = svc.run_until_signal(Duration::from_secs(30)).await;
    tracing::info!(handled = stats.handled_ok, "stopped");
    let _ = bus.close().await;
    Ok(())
}
