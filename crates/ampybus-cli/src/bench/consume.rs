//! `ampybus bench --mode consume`: consume-and-ack throughput of the consumer runtime (dedupe
//! on, N workers, no-op handler) against a bare fetch/ack loop over the same transport.
//!
//! One log is filled once with `--messages` messages over `--keys` keys; every round reads all
//! of it with fresh consumer names (a fresh durable consumer starts at the earliest message,
//! and dedupe records are per consumer name), bare loop and runtime interleaved. The runtime
//! runs with observability on (metrics, spans with no exporter configured, per-message debug
//! logs filtered out) — the default — and, as its own series, off
//! ([`ampybus::Bus::with_observability`]), so their ratio is the cost of the hooks.

use crate::bench::BenchArgs;
use crate::bench::raw::{Clock, ROUND_LIMIT, runtime_consume};
use crate::bench::stats::{cpu_seconds, median, round, show_series, spread_json};
use crate::error::{CliError, CliResult, EXIT_OK};
use crate::util;
use ampybus::headers::{RAW_BYTES_SCHEMA, names};
use ampybus::transport::{Delivery, SubscribeSpec};
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
use bytes::Bytes;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

const PATTERN: &str = "ampy.dev.bars.>";

/// Runs the consume benchmark.
pub async fn run(args: &BenchArgs, parent: &Path) -> CliResult<u8> {
    let dir = tempfile::Builder::new()
        .prefix("ampybus-bench-consume-")
        .tempdir_in(parent)
        .map_err(|e| CliError::usage(format!("--dir {:?}: {e}", parent.display())))?;
    let url = format!(
        "file://{}?sync={}",
        dir.path().display(),
        args.sync.as_str()
    );
    let bus = util::connect(&url).await?;
    fill(&bus, args).await?;
    let pattern = TopicPattern::parse(PATTERN).map_err(|e| CliError::bus("pattern", &e))?;
    let mut bare = Vec::new();
    let mut runtime = Vec::new();
    let mut no_dedupe = Vec::new();
    let mut obs_off = Vec::new();
    // CPU microseconds per message of the process over each series' rounds.
    let (mut bare_cpu, mut runtime_cpu, mut no_dedupe_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let per_msg = |from: f64| (cpu_seconds() - from) * 1e6 / args.messages as f64;
    let quiet = bus.clone().with_observability(false);
    for round in 1..=args.rounds {
        let c = cpu_seconds();
        bare.push(bare_round(&bus, &pattern, args.messages, round).await?);
        bare_cpu.push(per_msg(c));
        let c = cpu_seconds();
        runtime.push(runtime_round(&bus, &pattern, args, round, true).await?);
        runtime_cpu.push(per_msg(c));
        obs_off.push(runtime_round(&quiet, &pattern, args, round, true).await?);
        let c = cpu_seconds();
        no_dedupe.push(runtime_round(&bus, &pattern, args, round, false).await?);
        no_dedupe_cpu.push(per_msg(c));
        eprintln!(
            "round {round}: bare {:.0} msg/s ({:.3} µs CPU each), runtime {:.0} msg/s ({:.3}), runtime observability off {:.0} msg/s, runtime without dedupe {:.0} msg/s ({:.3})",
            bare[bare.len() - 1],
            bare_cpu[bare_cpu.len() - 1],
            runtime[runtime.len() - 1],
            runtime_cpu[runtime_cpu.len() - 1],
            obs_off[obs_off.len() - 1],
            no_dedupe[no_dedupe.len() - 1],
            no_dedupe_cpu[no_dedupe_cpu.len() - 1]
        );
    }
    util::close(&bus).await?;
    let report = json!({
        "mode": "consume",
        "messages": args.messages,
        "keys": args.keys,
        "payload_bytes": args.payload_bytes,
        "workers": args.consume_workers(),
        "sync": args.sync.as_str(),
        "rounds": args.rounds,
        "bare_msg_per_sec": spread_json(&bare, true, 0),
        "runtime_msg_per_sec": spread_json(&runtime, true, 0),
        "runtime_without_dedupe_msg_per_sec": spread_json(&no_dedupe, true, 0),
        "runtime_observability_off_msg_per_sec": spread_json(&obs_off, true, 0),
        "ratio_median": round(median(&runtime) / median(&bare), 3),
        "observability_on_off_ratio_median": round(median(&runtime) / median(&obs_off), 3),
        "bare_cpu_us_per_msg": spread_json(&bare_cpu, false, 3),
        "runtime_cpu_us_per_msg": spread_json(&runtime_cpu, false, 3),
        "runtime_without_dedupe_cpu_us_per_msg": spread_json(&no_dedupe_cpu, false, 3),
    });
    let mut out = util::Out::new();
    if args.json {
        out.line(&report.to_string())?;
    } else {
        out.line(&format!(
            "consume-and-ack, {} messages × {} B over {} keys, sync={}, {} rounds (best/median/worst msg/s)\n  bare fetch/ack loop : {}\n  runtime ({} workers, dedupe on): {}\n  runtime without dedupe: {}\n  runtime, observability off: {}\n  ratio runtime/bare (median): {}\n  ratio observability on/off (median): {}\n  CPU µs per message (best/median/worst): bare {}, runtime {}, runtime without dedupe {}",
            args.messages,
            args.payload_bytes,
            args.keys,
            args.sync.as_str(),
            args.rounds,
            show_series(&report["bare_msg_per_sec"]),
            args.consume_workers(),
            show_series(&report["runtime_msg_per_sec"]),
            show_series(&report["runtime_without_dedupe_msg_per_sec"]),
            show_series(&report["runtime_observability_off_msg_per_sec"]),
            report["ratio_median"],
            report["observability_on_off_ratio_median"],
            show_series(&report["bare_cpu_us_per_msg"]),
            show_series(&report["runtime_cpu_us_per_msg"]),
            show_series(&report["runtime_without_dedupe_cpu_us_per_msg"])
        ))?;
    }
    out.flush()?;
    Ok(EXIT_OK)
}

pub(crate) async fn fill(bus: &Bus, args: &BenchArgs) -> CliResult<()> {
    let payload: Bytes = (0..args.payload_bytes)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let run_id = util::new_run_id();
    let topics: Vec<(Topic, String)> = (0..args.keys)
        .map(|i| {
            let sym = format!("S{i}");
            let t = Topic::parse(&format!("ampy.dev.bars.v1.XNAS.{sym}")).expect("valid topic");
            (t, ampybus::partition::bars(&sym, "XNAS"))
        })
        .collect();
    let mut i = 0u64;
    while i < args.messages {
        let n = (args.messages - i).min(5000);
        let batch: Vec<Envelope> = (i..i + n)
            .map(|j| {
                let (t, k) = &topics[(j % args.keys) as usize];
                let mut h = Headers::for_publish(RAW_BYTES_SCHEMA, "bench@ampybus", "bench", k);
                h.set(names::RUN_ID, run_id.clone());
                Envelope::new(t, h, payload.clone())
            })
            .collect();
        bus.publish_batch(batch)
            .await
            .map_err(|e| CliError::bus("fill", &e))?;
        i += n;
    }
    Ok(())
}

async fn bare_round(bus: &Bus, pattern: &TopicPattern, n: u64, round: u64) -> CliResult<f64> {
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(
            pattern.clone(),
            format!("bare-{round}"),
        ))
        .await
        .map_err(|e| CliError::bus("subscribe", &e))?;
    let started = Instant::now();
    let mut got = 0u64;
    while got < n {
        if started.elapsed() > ROUND_LIMIT {
            return Err(CliError::transport(format!(
                "bare round {round}: only {got} of {n} messages in {ROUND_LIMIT:?}"
            )));
        }
        let batch = sub
            .fetch(256, Duration::from_millis(100))
            .await
            .map_err(|e| CliError::bus("fetch", &e))?;
        got += batch.len() as u64;
        if !batch.is_empty() {
            Delivery::ack_all(batch)
                .await
                .map_err(|(e, _)| CliError::bus("ack", &e))?;
        }
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn runtime_round(
    bus: &Bus,
    pattern: &TopicPattern,
    args: &BenchArgs,
    round: u64,
    dedupe: bool,
) -> CliResult<f64> {
    let name = format!(
        "runtime-{round}-{}-{}",
        if dedupe { "dedupe" } else { "plain" },
        if bus.observability() { "obs" } else { "quiet" }
    );
    let c = runtime_consume(
        bus,
        pattern,
        args.messages,
        args.consume_workers(),
        &name,
        dedupe,
        Clock::AtStart,
    )
    .await?;
    Ok(c.rate())
}
