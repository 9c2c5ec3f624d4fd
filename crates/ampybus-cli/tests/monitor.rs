//! `ampybus monitor` end to end on the embedded log (and once on NATS JetStream): a separate
//! process watches a pattern while this test publishes into the same data directory; exact JSON lines (gap, stale,
//! recovered), new messages only, SIGTERM → 0, SIGINT → 130. The test waits for lines and for
//! the process to end, never for time (the monitor itself measures the silence).

mod common;

use ampybus::{Bus, Headers, Topic};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::Duration;

const HANG: Duration = Duration::from_secs(120);

struct Monitor {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

/// `ampybus --url URL monitor --pattern P EXTRA…`, once it said it is watching.
fn spawn_monitor(url: &str, pattern: &str, extra: &[&str]) -> Monitor {
    let mut child = common::ampybus_command(None, &["--url", url, "monitor", "--pattern", pattern])
        .args(extra)
        .spawn()
        .expect("spawn ampybus monitor");
    let lines = |r: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(r).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        rx
    };
    let stdout = lines(Box::new(child.stdout.take().unwrap()));
    let stderr = lines(Box::new(child.stderr.take().unwrap()));
    let m = Monitor {
        child,
        stdout,
        stderr,
    };
    // Subscribed once it says so.
    loop {
        let l = m.stderr.recv_timeout(HANG).expect("the monitor starts");
        assert!(!l.contains("error"), "{l}");
        if l.starts_with("monitor: watching") {
            return m;
        }
    }
}

impl Monitor {
    fn next_json(&self) -> Value {
        let l = self.stdout.recv_timeout(HANG).expect("a monitor line");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
    }

    fn signal(&mut self, sig: &str) -> (i32, Vec<String>, String) {
        let st = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success());
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        let rest: Vec<String> = self.stdout.iter().collect();
        let err: Vec<String> = self.stderr.iter().collect();
        let err = err.join("\n");
        assert!(!err.contains("panicked"), "{err}");
        (code, rest, err)
    }
}

/// [`publish_on`] the embedded log in `dir`, topic [`TRADE`].
fn publish(rt: &tokio::runtime::Runtime, dir: &Path, ticks: &[(&str, &str, u64)]) {
    publish_on(rt, dir.to_str().unwrap(), TRADE, ticks);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const TRADE: &str = "ampy.dev.ticks.v1.trade.MSFT";

/// Publishes trades (source, key, sequence) on `topic` in one go from this process.
fn publish_on(rt: &tokio::runtime::Runtime, url: &str, topic: &str, ticks: &[(&str, &str, u64)]) {
    rt.block_on(async {
        let bus = Bus::connect(url).await.unwrap();
        let topic = Topic::parse(topic).unwrap();
        for (source, key, seq) in ticks {
            let h = Headers::for_publish(
                "ampy.ticks.v1.TradeBatch",
                &format!("md@{source}"),
                source,
                key,
            )
            .with("run_id", "run-1")
            .with("sequence", seq.to_string());
            bus.publish(&topic, h, b"t".to_vec()).await.unwrap();
        }
        bus.close().await.unwrap();
    });
}

/// The fields every test compares: event, topic, key, source (and the gap range).
fn brief(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    let mut out = format!("{} {} {} {}", s("event"), s("topic"), s("key"), s("source"));
    if let (Some(a), Some(b)) = (v.get("first_missing"), v.get("last_missing")) {
        out.push_str(&format!(" missing={a}-{b}"));
    }
    // Every line has a canonical time.
    let at = s("at");
    assert!(ampybus::ids::is_canonical_time(&at), "{v}");
    out
}

/// A fresh embedded log holding one message from `feed-old` (published before the monitor
/// starts: never seen, so never stale), and a monitor of `ampy.dev.ticks.>` on it.
fn embedded_monitor(extra: &[&str]) -> (tempfile::TempDir, tokio::runtime::Runtime, Monitor) {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    publish(&rt, dir.path(), &[("feed-old", "OLD.XNAS", 1)]);
    let m = spawn_monitor(dir.path().to_str().unwrap(), "ampy.dev.ticks.>", extra);
    (dir, rt, m)
}

#[test]
fn monitor_prints_gap_stale_and_recovered_and_stops_on_sigterm() {
    let (dir, rt, mut m) = embedded_monitor(&["--stale-after", "1", "--json"]);
    publish(
        &rt,
        dir.path(),
        &[
            ("feed-a", "MSFT.XNAS", 1),
            ("feed-a", "MSFT.XNAS", 2),
            ("feed-a", "MSFT.XNAS", 4),
        ],
    );
    let t = TRADE;
    assert_eq!(
        brief(&m.next_json()),
        format!("gap {t} MSFT.XNAS feed-a missing=3-3")
    );
    // A second without a message: the source, then its key.
    let stale_source = m.next_json();
    assert_eq!(brief(&stale_source), format!("stale {t} - feed-a"));
    assert!(stale_source["silent_ms"].as_u64().unwrap() >= 1_000);
    assert_eq!(brief(&m.next_json()), format!("stale {t} MSFT.XNAS feed-a"));
    publish(&rt, dir.path(), &[("feed-a", "MSFT.XNAS", 5)]);
    assert_eq!(brief(&m.next_json()), format!("recovered {t} - feed-a"));
    assert_eq!(
        brief(&m.next_json()),
        format!("recovered {t} MSFT.XNAS feed-a")
    );
    let (code, rest, err) = m.signal("TERM");
    assert_eq!(code, 0, "{err}");
    // Nothing more could be printed before the signal than silence on feed-a again (the
    // monitor may have noticed it); feed-old never appears.
    for l in &rest {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["event"], "stale", "{l}");
        assert_eq!(v["source"], "feed-a", "{l}");
    }
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    assert!(err.contains("1 source(s) seen"), "{err}");
    assert!(err.contains("1 gap(s)"), "{err}");
}

#[test]
fn monitor_reports_late_data_as_lag_then_lag_recovered() {
    let (dir, rt, mut m) =
        embedded_monitor(&["--json", "--lag-after", "20", "--stale-after", "600"]);
    let url = dir.path().to_str().unwrap().to_owned();
    // Produced 60 s ago (a feed replaying its backlog), then a fresh one.
    rt.block_on(async {
        let bus = Bus::connect(&url).await.unwrap();
        let topic = Topic::parse(TRADE).unwrap();
        let old = chrono::Utc::now() - chrono::Duration::seconds(60);
        for produced in [Some(old), None] {
            let mut h = Headers::for_publish(
                "ampy.ticks.v1.TradeBatch",
                "md@feed-a",
                "feed-a",
                "MSFT.XNAS",
            );
            if let Some(t) = produced {
                h.set("produced_at", ampybus::ids::format_time(t));
            }
            bus.publish(&topic, h, b"t".to_vec()).await.unwrap();
        }
        bus.close().await.unwrap();
    });
    let lag = m.next_json();
    assert_eq!(brief(&lag), format!("lag {TRADE} MSFT.XNAS feed-a"));
    let late = lag["lag_ms"].as_u64().unwrap();
    assert!((60_000..120_000).contains(&late), "{lag}");
    let back = m.next_json();
    assert_eq!(
        brief(&back),
        format!("lag_recovered {TRADE} MSFT.XNAS feed-a")
    );
    assert!(back["lag_ms"].as_u64().unwrap() < 20_000, "{back}");
    let (code, rest, _) = m.signal("TERM");
    assert_eq!((code, rest), (0, Vec::<String>::new()));
}

#[test]
fn monitor_text_lines_and_sigint_exits_130() {
    let (dir, rt, mut m) = embedded_monitor(&["--stale-after", "30"]);
    publish(
        &rt,
        dir.path(),
        &[("feed-a", "MSFT.XNAS", 1), ("feed-a", "MSFT.XNAS", 3)],
    );
    let line = m.stdout.recv_timeout(HANG).unwrap();
    assert!(
        line.ends_with(" gap topic=ampy.dev.ticks.v1.trade.MSFT key=MSFT.XNAS source=feed-a missing=2-2 sequence=3 producer=md@feed-a run_id=run-1"),
        "{line}"
    );
    let (code, rest, err) = m.signal("INT");
    assert_eq!(code, 130, "{err}");
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn monitor_refuses_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    publish(&rt, dir.path(), &[("feed-old", "OLD.XNAS", 1)]);
    let o = common::ampybus_in(
        Some(dir.path()),
        &[
            "monitor",
            "--pattern",
            "ampy.dev.ticks.>",
            "--stale-after",
            "0",
        ],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--stale-after"), "{}", o.stderr);
    let o = common::ampybus_in(Some(dir.path()), &["monitor", "--pattern", "ampy..x"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("--pattern"), "{}", o.stderr);
    let missing = dir.path().join("nope");
    let o = common::ampybus_in(Some(&missing), &["monitor", "--pattern", "ampy.dev.>"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
}

/// The same watch on NATS JetStream (the shared server on 127.0.0.1:4222): a non-durable
/// subscription of new messages, so it works whatever the topic's tier.
#[test]
fn monitor_on_nats_reports_a_gap_and_a_stale_source() {
    common::start_broker("nats");
    let url = "nats://127.0.0.1:4222?stream_prefix=AMPYFEEDS&max_age_days=1";
    // A topic of this run only.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let topic = format!("ampy.dev.ticks.v1.trade.m{}x{nanos}", std::process::id());
    let rt = runtime();
    // The stream exists before the monitor starts (a reader never creates one).
    publish_on(&rt, url, &topic, &[("feed-old", "OLD.XNAS", 1)]);
    let mut m = spawn_monitor(url, &topic, &["--stale-after", "1", "--json"]);
    publish_on(
        &rt,
        url,
        &topic,
        &[("feed-n", "MSFT.XNAS", 1), ("feed-n", "MSFT.XNAS", 3)],
    );
    assert_eq!(
        brief(&m.next_json()),
        format!("gap {topic} MSFT.XNAS feed-n missing=2-2")
    );
    assert_eq!(brief(&m.next_json()), format!("stale {topic} - feed-n"));
    assert_eq!(
        brief(&m.next_json()),
        format!("stale {topic} MSFT.XNAS feed-n")
    );
    let (code, rest, err) = m.signal("TERM");
    assert_eq!(code, 0, "{err}");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(err.contains("1 source(s) seen"), "{err}");
}
