//! `ampybus bench --mode archive`: `ampybus archive` (fetch from a temporary embedded log,
//! decode, envelopes + typed rows in one transaction per batch, ack) against a raw binary COPY
//! of the same rows into the same tables, interleaved rounds.
//!
//! N one-bar `BarBatch` messages (payloads of `--payload-bytes`, 256 by default) are
//! published once (untimed); the raw side's rows are built from the same envelopes before its
//! clock starts, and written with tokio-postgres' `BinaryCopyInWriter` (the client's own binary
//! COPY, as an application would use it). Both sides write into the tables of `--to` (emptied before every round) in
//! transactions of `--batch` messages.

use crate::archive::Archiver;
use crate::bench::BenchArgs;
use crate::bench::stats::{series, show_series};
use crate::error::{CliError, CliResult, EXIT_OK};
use crate::follow::Limits;
use crate::util::{self, Signals};
use ampybus::archive::{ArchiveWriter, Cell, Table, TableSpec, envelope_row};
use ampybus::ops::ReaderCounter;
use ampybus::transport::SubscribeSpec;
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
use ampybus_proto::ampy::bars::v1::{Bar, BarBatch};
use ampybus_proto::ampy::common::v1::{Decimal, Meta, SecurityId};
use prost::Message;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

const PATTERN: &str = "ampy.dev.bars.>";

/// Runs the archive benchmark.
pub async fn run(args: &BenchArgs, parent: &Path) -> CliResult<u8> {
    let to = args.to.as_deref().ok_or_else(|| {
        CliError::usage("--mode archive needs --to postgres://user@host:port/database")
    })?;
    let shown = ampybus::bus::redact(to);
    // Creates or migrates the schema before anything is timed.
    drop(
        ArchiveWriter::connect(to)
            .await
            .map_err(|e| CliError::bus(format!("--to {shown:?}"), &e))?,
    );
    let dir = tempfile::Builder::new()
        .prefix("ampybus-bench-archive-")
        .tempdir_in(parent)
        .map_err(|e| CliError::usage(format!("--dir {:?}: {e}", parent.display())))?;
    let url = format!(
        "file://{}?sync={}",
        dir.path().display(),
        args.sync.as_str()
    );
    let bus = util::connect(&url).await?;
    let envs = bars(args)?;
    for chunk in envs.chunks(5000) {
        bus.publish_batch(chunk.to_vec())
            .await
            .map_err(|e| CliError::bus("publishing the bars", &e))?;
    }
    let raw_batches = raw_rows(&envs, args.batch as usize);
    drop(envs);
    let (mut client, conn) = tokio_postgres::connect(to, tokio_postgres::NoTls)
        .await
        .map_err(|e| CliError::transport(format!("--to {shown:?}: {e}")))?;
    tokio::spawn(conn);
    let pattern = TopicPattern::parse(PATTERN).map_err(|e| CliError::bus("pattern", &e))?;
    let mut signals = Signals::new()?;
    let tag = util::new_run_id();
    let (mut ours, mut raw, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let r = raw_round(&mut client, &raw_batches, args.messages).await?;
        let o = archive_round(
            &bus,
            to,
            &pattern,
            args,
            &format!("bench-{tag}-{round}"),
            &mut signals,
        )
        .await?;
        eprintln!(
            "round {round}: raw COPY {r:.0} msg/s, ampybus archive {o:.0} msg/s, ratio {:.3}",
            o / r
        );
        raw.push(r);
        ours.push(o);
        ratios.push(o / r);
    }
    truncate(&client).await?;
    util::close(&bus).await?;
    let report = json!({
        "mode": "archive",
        "messages": args.messages,
        "payload_bytes": args.payload_bytes,
        "keys": args.keys,
        "batch": args.batch,
        "sync": args.sync.as_str(),
        "rounds": args.rounds,
        "archive_msg_per_sec": series(&ours),
        "raw_copy_msg_per_sec": series(&raw),
        "ratio": series(&ratios),
    });
    let mut out = util::Out::new();
    if args.json {
        out.line(&report.to_string())?;
    } else {
        out.line(&format!(
            "archive into {shown}, {} bars × {} B, batches of {}, {} rounds (best / median / worst)\n  raw COPY msg/s        : {}\n  ampybus archive msg/s : {}\n  ratio archive/raw     : {}",
            args.messages,
            args.payload_bytes,
            args.batch,
            args.rounds,
            show_series(&report["raw_copy_msg_per_sec"]),
            show_series(&report["archive_msg_per_sec"]),
            show_series(&report["ratio"]),
        ))?;
    }
    out.flush()?;
    Ok(EXIT_OK)
}

/// One-bar `BarBatch` envelopes: `keys` symbols, one minute apart per symbol (every bar has
/// its own natural key), payloads padded to `--payload-bytes` with `meta.checksum`.
fn bars(args: &BenchArgs) -> CliResult<Vec<Envelope>> {
    let run_id = util::new_run_id();
    let topics: Vec<(Topic, String, String)> = (0..args.keys)
        .map(|i| {
            let sym = format!("S{i}");
            let t = Topic::parse(&format!("ampy.dev.bars.v1.XNAS.{sym}"))
                .map_err(|e| CliError::bus("bench topic", &e))?;
            Ok((t, ampybus::partition::bars(&sym, "XNAS"), sym))
        })
        .collect::<CliResult<_>>()?;
    let target = args.payload_bytes as usize;
    let base = 1_757_079_000i64;
    let dec = |scaled: i64| Some(Decimal { scaled, scale: 4 });
    let mut pad = 0usize;
    Ok((0..args.messages)
        .map(|i| {
            let (topic, key, sym) = &topics[(i % args.keys) as usize];
            let t = base + (i / args.keys) as i64 * 60;
            let ts = |s: i64| {
                Some(prost_types::Timestamp {
                    seconds: s,
                    nanos: 0,
                })
            };
            let p = 1_900_000 + (i % 1000) as i64;
            let mut bar = Bar {
                security: Some(SecurityId {
                    symbol: sym.clone(),
                    mic: "XNAS".into(),
                    ..Default::default()
                }),
                start: ts(t),
                end: ts(t + 60),
                open: dec(p),
                high: dec(p + 25),
                low: dec(p - 25),
                close: dec(p + 5),
                vwap: dec(p + 2),
                volume: 1000 + i as i64,
                trade_count: 10,
                adjustment_policy: 1,
                event_time: ts(t + 60),
                ingest_time: ts(t + 61),
                meta: Some(Meta {
                    run_id: run_id.clone(),
                    source: "bench".into(),
                    producer: "bench@ampybus".into(),
                    schema_version: "1.0.0".into(),
                    checksum: "x".repeat(pad),
                }),
                ..Default::default()
            };
            // Pad to the target size (the padding found for the first bar fits nearly all).
            for _ in 0..4 {
                let len = BarBatch {
                    bars: vec![bar.clone()],
                }
                .encoded_len();
                if len == target || (len > target && pad == 0) {
                    break;
                }
                pad = (pad + target).saturating_sub(len);
                if let Some(m) = bar.meta.as_mut() {
                    m.checksum = "x".repeat(pad);
                }
            }
            let mut h =
                Headers::for_publish("ampy.bars.v1.BarBatch", "bench@ampybus", "bench", key);
            h.set(ampybus::headers::names::RUN_ID, run_id.clone());
            Envelope::new(topic, h, BarBatch { bars: vec![bar] }.encode_to_vec())
        })
        .collect())
}

/// One transaction of the raw side: envelope rows and bar rows.
type RawBatch = (Vec<Vec<Cell>>, Vec<Vec<Cell>>);

/// The raw side's rows: the same envelope and bar rows the archiver writes, as plain values
/// (what any client holding the data would have), in batches.
fn raw_rows(envs: &[Envelope], batch: usize) -> Vec<RawBatch> {
    let now = chrono::Utc::now();
    envs.chunks(batch.max(1))
        .enumerate()
        .map(|(c, chunk)| {
            let mut out: RawBatch = (Vec::new(), Vec::new());
            for (i, env) in chunk.iter().enumerate() {
                let seq = (c * batch + i) as u64 + 1;
                out.0.push(envelope_row(env, now, seq, None).to_vec());
                let id = env.headers.message_id().unwrap_or("");
                let rows = crate::archive_rows::rows("ampy.bars.v1.BarBatch", id, &env.payload)
                    .unwrap_or_default();
                out.1.extend(rows.into_iter().map(|(_, r)| r));
            }
            out
        })
        .collect()
}

/// tokio-postgres' own binary COPY writer, one row at a time: the raw client.
async fn raw_copy(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    spec: &TableSpec,
    rows: &[Vec<Cell>],
) -> Result<u64, tokio_postgres::Error> {
    let cols: Vec<&str> = spec.columns.iter().map(|(n, _)| *n).collect();
    let sink = tx
        .copy_in(&format!(
            "COPY ampybus.{table} ({}) FROM STDIN (FORMAT binary)",
            cols.join(", ")
        ))
        .await?;
    let types: Vec<Type> = spec.columns.iter().map(|(_, t)| t.pg()).collect();
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures::pin_mut!(writer);
    for row in rows {
        let refs: Vec<&(dyn ToSql + Sync)> = row.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        writer.as_mut().write(&refs).await?;
    }
    writer.finish().await
}

async fn truncate(client: &tokio_postgres::Client) -> CliResult<()> {
    client
        .batch_execute("TRUNCATE ampybus.envelopes, ampybus.bars")
        .await
        .map_err(|e| CliError::transport(format!("emptying the archive tables: {e}")))
}

/// One raw round: `COPY` envelopes and bars per batch, one transaction each.
async fn raw_round(
    client: &mut tokio_postgres::Client,
    batches: &[RawBatch],
    n: u64,
) -> CliResult<f64> {
    truncate(client).await?;
    let err = |e: tokio_postgres::Error| CliError::transport(format!("raw COPY: {e}"));
    let started = Instant::now();
    for (envelopes, bars) in batches {
        let tx = client.transaction().await.map_err(err)?;
        raw_copy(&tx, "envelopes", TableSpec::envelopes(), envelopes)
            .await
            .map_err(err)?;
        raw_copy(&tx, "bars", Table::Bars.spec(), bars)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// One archive round: a fresh durable consumer reads the whole log through `Archiver`.
async fn archive_round(
    bus: &Bus,
    to: &str,
    pattern: &TopicPattern,
    args: &BenchArgs,
    name: &str,
    signals: &mut Signals,
) -> CliResult<f64> {
    let client_err = |e: ampybus::Error| CliError::bus("--to", &e);
    let writer = ArchiveWriter::connect(to).await.map_err(client_err)?;
    let (c, conn) = tokio_postgres::connect(to, tokio_postgres::NoTls)
        .await
        .map_err(|e| CliError::transport(format!("--to: {e}")))?;
    tokio::spawn(conn);
    truncate(&c).await?;
    drop(c);
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(pattern.clone(), name))
        .await
        .map_err(|e| CliError::bus("subscribe", &e))?;
    let counter = ReaderCounter::register(bus, name, pattern.clone(), true, args.batch as usize);
    let mut sink = Archiver::new(bus, writer, counter);
    let limits = Limits {
        max: Some(args.messages),
        idle: Duration::from_secs(60),
        fetch: args.batch,
        durable: true,
    };
    let started = Instant::now();
    let (n, result) = sink.run(&mut sub, &limits, signals).await;
    let secs = started.elapsed().as_secs_f64();
    if let Some(s) = result? {
        return Err(CliError {
            code: s.job_code(),
            message: format!("bench: stopped by {} after {n} archived", s.name()),
        });
    }
    let s = &sink.stats;
    if n != args.messages || s.envelopes_new != n || s.rows_new != n {
        return Err(CliError::transport(format!(
            "archive round: {n} archived ({} new envelopes, {} bars), expected exactly {}",
            s.envelopes_new, s.rows_new, args.messages
        )));
    }
    Ok(n as f64 / secs)
}
