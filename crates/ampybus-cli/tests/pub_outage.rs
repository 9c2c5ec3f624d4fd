//! `pub` during a NATS outage: a private `nats-server` with JetStream (free port, temp store)
//! is killed mid-run; every confirmed id is printed, confirmed + unknown + unsent add up, and
//! `--unconfirmed` retried on the restarted server stores every id exactly once.

mod common;

use ampybus_conformance::NatsServer;
use common::ampybus_in;
use serde_json::Value;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A private `nats-server -js` with its store under `dir/js`.
fn start_server(dir: &Path) -> NatsServer {
    let store = dir.join("js");
    NatsServer::start(dir, &["-js", "-sd", store.to_str().unwrap()])
}

/// The bus URL of the private server.
fn url_of(server: &NatsServer) -> String {
    server.url("nats", "?stream_prefix=OUTAGE&request_timeout_ms=1000")
}

fn scale() -> f64 {
    std::env::var("AMPYBUS_TEST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(1.0)
}

/// The number after `prefix` in `text`.
fn number_after(text: &str, prefix: &str) -> u64 {
    let at = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in {text}"));
    text[at + prefix.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in {text}"))
}

#[test]
fn pub_during_a_nats_outage_prints_every_confirmed_id_and_retries_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path());
    let url = url_of(&server);
    let topic = "ampy.dev.news.v1.outage";
    let total = ((10_000.0 * scale()) as u64).max(7_500); // three batches at least
    let unconfirmed = dir.path().join("unconfirmed.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ampybus"))
        .args(["--url", &url, "pub", "--topic", topic])
        .args(["--producer", "outage@1", "--source", "test", "--pk", "k-1"])
        .args(["--payload", "hello", "--batch", "2500", "--print-ids"])
        .args(["--count", &total.to_string(), "--unconfirmed"])
        .arg(&unconfirmed)
        .env_remove("AMPYBUS_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ampybus");
    let printed: Arc<Mutex<Vec<String>>> = Arc::default();
    let p2 = printed.clone();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            p2.lock().unwrap().push(line.unwrap());
        }
    });
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // Mid-run: some batches confirmed, then the server dies.
    let start = Instant::now();
    while printed.lock().unwrap().is_empty() {
        assert!(child.try_wait().unwrap().is_none(), "pub ended early");
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    server.kill();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let stderr = stderr.join().unwrap();
    let printed = std::mem::take(&mut *printed.lock().unwrap());
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("stopped by the error below"), "{stderr}");
    let (c, u, s) = (
        number_after(&stderr, "; confirmed "),
        number_after(&stderr, ", unknown "),
        number_after(&stderr, ", unsent "),
    );
    assert_eq!(c + u + s, total, "{stderr}");
    assert_eq!(c, printed.len() as u64, "every confirmed id printed");
    assert!(c >= 2500 && c < total, "{stderr}");
    assert!(
        stderr.contains(&format!("published {c} of {total} message(s) to {topic}")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{} of them written to --unconfirmed", u + s)),
        "{stderr}"
    );
    let file = std::fs::read_to_string(&unconfirmed).unwrap();
    let retry: Vec<String> = file
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["headers"]["message_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(retry.len() as u64, u + s);
    let printed_set: HashSet<&String> = printed.iter().collect();
    assert_eq!(printed_set.len(), printed.len(), "an id printed twice");
    assert!(
        retry.iter().all(|id| !printed_set.contains(id)),
        "a confirmed id is in --unconfirmed"
    );

    // The server comes back on the same store. Whether an unknown message landed depends on
    // the moment of the crash; to see the retry meet ones that did, the first ten of the
    // file are published before it (as if they had landed).
    server.restart();
    let landed = dir.path().join("landed.jsonl");
    let first_ten: Vec<&str> = file.lines().take(10).collect();
    std::fs::write(&landed, first_ten.join("\n")).unwrap();
    let o = ampybus_in(
        None,
        &[
            "--url",
            &url,
            "pub",
            "--json-envelope",
            landed.to_str().unwrap(),
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = ampybus_in(
        None,
        &[
            "--url",
            &url,
            "pub",
            "--json-envelope",
            unconfirmed.to_str().unwrap(),
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr
            .contains(&format!("published {} envelope(s)", u + s))
            && o.stderr.contains(", 10 duplicate(s) not stored again"),
        "{}",
        o.stderr
    );
    eprintln!(
        "outage: confirmed {c}, unknown {u}, unsent {s}; retry: {}",
        o.stderr.trim()
    );
    let o = ampybus_in(
        None,
        &[
            "--url",
            &url,
            "sub",
            "--pattern",
            "ampy.dev.news.>",
            "--json",
            "--max",
            &total.to_string(),
            "--timeout",
            "10",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let stored: Vec<String> = o
        .json_lines()
        .iter()
        .map(|v| v["headers"]["message_id"].as_str().unwrap().to_owned())
        .collect();
    let stored_set: HashSet<&String> = stored.iter().collect();
    assert_eq!(stored_set.len(), stored.len(), "an id stored twice");
    let expected: HashSet<&String> = printed.iter().chain(&retry).collect();
    assert_eq!(
        stored_set, expected,
        "the stream holds every id exactly once"
    );
    let o = ampybus_in(None, &["--url", &url, "topics", "list", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.json_lines()[0]["messages"].as_u64(), Some(total));
}
