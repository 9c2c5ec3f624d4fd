//! The CLI's observability flags end to end: `--metrics-addr` serves /metrics, /health and
//! /stats while a durable `sub` runs; `--log-format json` writes one JSON object per log line
//! and never the payload.

mod common;

use common::ampybus_in;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the ops endpoint");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let status: u16 = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {raw}"));
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

fn publish(dir: &std::path::Path, n: &str, extra: &[&str]) -> common::Out {
    let mut args = extra.to_vec();
    args.extend_from_slice(&[
        "pub",
        "--topic",
        "ampy.dev.news.v1.raw",
        "--producer",
        "cli@1",
        "--source",
        "cli",
        "--pk",
        "n-1",
        "--payload",
        "SECRET-PAYLOAD-TEXT",
        "--count",
        n,
    ]);
    ampybus_in(Some(dir), &args)
}

#[test]
fn metrics_addr_serves_metrics_health_and_stats_while_sub_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let o = publish(tmp.path(), "3", &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);

    let mut child = Command::new(env!("CARGO_BIN_EXE_ampybus"))
        .arg("--url")
        .arg(tmp.path())
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "sub",
            "--pattern",
            "ampy.dev.>",
            "--durable",
            "audit",
            "--json",
            "--timeout",
            "60",
        ])
        .env_remove("AMPYBUS_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ampybus sub");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    for line in stderr.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("serving http://") {
            addr = rest.split('/').next().map(str::to_owned);
            break;
        }
    }
    let addr = addr.expect("the ops endpoint address on stderr");
    // The three messages are printed (and acked) before we look.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let started = Instant::now();
    for _ in 0..3 {
        let mut l = String::new();
        stdout.read_line(&mut l).unwrap();
        assert!(l.contains("ampy.dev.news.v1.raw"), "{l}");
        assert!(started.elapsed() < Duration::from_secs(60), "hang");
    }

    let (status, metrics) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    // OpenMetrics text: counter families are declared without `_total`, samples carry it.
    for family in [
        "bus_produced",
        "bus_consumed",
        "bus_delivery_latency_ms",
        "bus_dlq",
        "bus_dropped",
        "bus_consumer_lag",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {family}")),
            "{family} missing:\n{metrics}"
        );
    }
    let (status, health) = http_get(&addr, "/health");
    assert_eq!(status, 200, "{health}");
    let (status, stats) = http_get(&addr, "/stats");
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("/stats is JSON");
    assert!(stats.is_object(), "{stats}");

    child.kill().unwrap();
    child.wait().unwrap();
}

/// `ampybus --metrics-addr 127.0.0.1:0 sub --pattern ampy.dev.> --json --timeout 60 EXTRA…`
/// on `dir`, with piped stdout and stderr.
fn spawn_sub(dir: &std::path::Path, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_ampybus"))
        .arg("--url")
        .arg(dir)
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "sub",
            "--pattern",
            "ampy.dev.>",
            "--json",
            "--timeout",
            "60",
        ])
        .args(extra)
        .env_remove("AMPYBUS_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ampybus sub")
}

/// Starts `ampybus --metrics-addr 127.0.0.1:0 sub --pattern ampy.dev.> --json <extra>` on
/// `dir` and returns the child, its stdout and the ops endpoint address it printed.
fn start_sub(
    dir: &std::path::Path,
    extra: &[&str],
) -> (
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    String,
) {
    let mut child = spawn_sub(dir, extra);
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    for line in stderr.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("serving http://") {
            addr = rest.split('/').next().map(str::to_owned);
            break;
        }
    }
    let addr = addr.expect("the ops endpoint address on stderr");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    (child, stdout, addr)
}

/// Reads `n` lines of `sub --json` output, each a message of `ampy.dev.news.v1.raw`.
fn read_messages(stdout: &mut BufReader<std::process::ChildStdout>, n: usize) {
    let started = Instant::now();
    for i in 0..n {
        let mut l = String::new();
        stdout.read_line(&mut l).unwrap();
        assert!(l.contains("ampy.dev.news.v1.raw"), "line {i}: {l}");
        assert!(started.elapsed() < Duration::from_secs(60), "hang");
    }
}

/// `/stats` once its consumer `name` has counted at least `n` (or after 30 s).
fn stats_once_counted(addr: &str, name: &str, n: u64) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let (status, body) = http_get(addr, "/stats");
        assert_eq!(status, 200, "{body}");
        let stats: serde_json::Value = serde_json::from_str(&body).expect("/stats is JSON");
        let counted = stats["consumers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .and_then(|c| c["handled_ok"].as_u64())
            .unwrap_or(0);
        if counted >= n || started.elapsed() > Duration::from_secs(30) {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of one sample line on `/metrics`, e.g. `bus_consumed_total{…}`.
fn sample(metrics: &str, series: &str) -> Option<String> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
}

#[test]
fn sub_metrics_and_stats_count_exactly_what_it_consumed() {
    const N: usize = 250;
    let tmp = tempfile::tempdir().unwrap();
    let o = publish(tmp.path(), &N.to_string(), &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);

    // Durable: counted once printed and acked, under the durable name.
    let (mut child, mut stdout, addr) = start_sub(tmp.path(), &["--durable", "audit"]);
    read_messages(&mut stdout, N);
    let stats = stats_once_counted(&addr, "audit", N as u64);
    let consumers = stats["consumers"].as_array().expect("consumers");
    assert_eq!(consumers.len(), 1, "{stats}");
    let c = &consumers[0];
    assert_eq!(c["name"], "audit", "{stats}");
    assert_eq!(c["pattern"], "ampy.dev.>", "{stats}");
    assert_eq!(c["handled_ok"], N as u64, "{stats}");
    assert_eq!(c["retried"], 0, "{stats}");
    assert_eq!(c["in_flight"], 0, "{stats}");
    assert!(c["last_message_at"].is_string(), "{stats}");
    let (status, metrics) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &metrics,
            r#"bus_consumed_total{topic="ampy.dev.news.v1",consumer="audit"}"#
        )
        .as_deref(),
        Some("250"),
        "{metrics}"
    );
    assert_eq!(
        metrics.matches("bus_consumed_total{").count(),
        1,
        "{metrics}"
    );
    let (status, health) = http_get(&addr, "/health");
    assert_eq!(status, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["consumers"][0]["name"], "audit", "{health}");
    assert_eq!(health["consumers"][0]["running"], true, "{health}");
    child.kill().unwrap();
    child.wait().unwrap();

    // Without --durable: counted once printed, under the name `sub`, with no lag.
    let (mut child, mut stdout, addr) = start_sub(tmp.path(), &[]);
    read_messages(&mut stdout, N);
    let stats = stats_once_counted(&addr, "sub", N as u64);
    let consumers = stats["consumers"].as_array().expect("consumers");
    assert_eq!(consumers.len(), 1, "{stats}");
    assert_eq!(consumers[0]["name"], "sub", "{stats}");
    assert_eq!(consumers[0]["handled_ok"], N as u64, "{stats}");
    assert!(consumers[0]["lag"].is_null(), "{stats}");
    let (_, metrics) = http_get(&addr, "/metrics");
    assert_eq!(
        sample(
            &metrics,
            r#"bus_consumed_total{topic="ampy.dev.news.v1",consumer="sub"}"#
        )
        .as_deref(),
        Some("250"),
        "{metrics}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn log_format_json_lines_carry_the_fields_and_no_payload() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("demo");
    let o = ampybus_in(
        Some(&data),
        &["--log-format", "json", "--log-level", "debug", "demo"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("result: OK"), "{}", o.stdout);
    let lines: Vec<serde_json::Value> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let handled: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["message"] == "message handled")
        .collect();
    assert!(!handled.is_empty(), "no per-message lines:\n{}", o.stderr);
    for v in &handled {
        for field in [
            "message_id",
            "trace_id",
            "topic",
            "consumer",
            "result",
            "latency_ms",
        ] {
            assert!(v.get(field).is_some(), "{field} missing: {v}");
        }
        assert!(v.get("payload").is_none(), "{v}");
    }
    // The demo's one poison message: dead-lettered once, logged with its reason.
    let dlq: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["message"] == "message dead-lettered")
        .collect();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0]["result"], "dlq");
    assert_eq!(dlq[0]["reason"], "decode_error");

    let bad = publish(tmp.path(), "1", &["--log-format", "xml"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("xml"), "{}", bad.stderr);
}

/// `sub --max`: while it runs, `/metrics` and `/stats` count exactly the messages it printed
/// and acked (250) under its durable name; it then stops at `--max` with exit 0 and says how
/// many it received.
#[test]
fn sub_with_max_counts_exactly_what_it_consumed_and_stops_at_max() {
    const N: usize = 250;
    let tmp = tempfile::tempdir().unwrap();
    let o = publish(tmp.path(), &N.to_string(), &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);

    let max = (N + 1).to_string();
    let mut child = spawn_sub(tmp.path(), &["--durable", "audit", "--max", &max]);
    // stderr is read to its end on a thread of its own (the summary comes at exit); the ops
    // endpoint's address is handed over as soon as it is printed.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        for line in stderr.lines() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("serving http://") {
                let _ = addr_tx.send(rest.split('/').next().unwrap_or("").to_owned());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the ops endpoint address on stderr");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    read_messages(&mut stdout, N);

    let stats = stats_once_counted(&addr, "audit", N as u64);
    let consumers = stats["consumers"].as_array().expect("consumers");
    assert_eq!(consumers.len(), 1, "{stats}");
    assert_eq!(consumers[0]["name"], "audit", "{stats}");
    assert_eq!(consumers[0]["pattern"], "ampy.dev.>", "{stats}");
    assert_eq!(consumers[0]["handled_ok"], N as u64, "{stats}");
    let (status, metrics) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &metrics,
            r#"bus_consumed_total{topic="ampy.dev.news.v1",consumer="audit"}"#
        )
        .as_deref(),
        Some("250"),
        "{metrics}"
    );

    // One more message reaches --max: exit 0 with the summary.
    let o = publish(tmp.path(), "1", &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    read_messages(&mut stdout, 1);
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait().expect("wait for ampybus sub"));
    });
    let status = done_rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("sub --max {max} did not stop after its last message")
        });
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("received {max} message(s)")),
        "{stderr}"
    );
}
