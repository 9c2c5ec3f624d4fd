//! Signals and pipes on the embedded log: SIGINT/SIGTERM to `pub --count` and to a durable
//! `sub`, a durable `sub` whose reader closes the pipe, `pub --print-ids` into a closed pipe.
//! Every test waits for events (lines printed, the process ending), never for time.

mod common;

use common::ampybus_in;
use serde_json::Value;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TOPIC: &str = "ampy.dev.news.v1.sig";
const PATTERN: &str = "ampy.dev.news.>";

/// A running `ampybus` whose stdout lines are collected by a thread.
struct Running {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: JoinHandle<()>,
    stderr: JoinHandle<String>,
    go: mpsc::Sender<()>,
}

/// What the reader of stdout does.
#[derive(Clone, Copy)]
enum Reader {
    /// Reads everything.
    All,
    /// Stops reading after this many lines until [`Running::finish`] (the writer fills the
    /// pipe and blocks), then reads the rest.
    PauseAfter(usize),
    /// Closes its end of the pipe after this many lines.
    CloseAfter(usize),
}

fn spawn(dir: &Path, args: &[&str], how: Reader) -> Running {
    let mut child = common::ampybus_command(Some(dir), args)
        .spawn()
        .expect("spawn ampybus");
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let (go, wait_go) = mpsc::channel::<()>();
    let out = child.stdout.take().unwrap();
    let l2 = lines.clone();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let n = {
                let mut v = l2.lock().unwrap();
                v.push(line.trim_end().to_owned());
                v.len()
            };
            match how {
                Reader::CloseAfter(k) if n == k => return, // drops the read end
                Reader::PauseAfter(k) if n == k => {
                    let _ = wait_go.recv();
                }
                _ => {}
            }
        }
    });
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    Running {
        child,
        lines,
        reader,
        stderr,
        go,
    }
}

impl Running {
    /// Waits until at least `k` lines were read (generous limit).
    fn wait_lines(&mut self, k: usize) {
        let start = Instant::now();
        while self.lines.lock().unwrap().len() < k {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("ampybus ended ({st}) before printing {k} lines");
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "fewer than {k} lines within 120 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -s {sig} failed");
    }

    /// Lets a paused reader go on, waits for the end: exit code, stdout lines, stderr.
    fn finish(mut self) -> (i32, Vec<String>, String) {
        let _ = self.go.send(());
        let status = self.child.wait().expect("wait");
        self.reader.join().unwrap();
        let stderr = self.stderr.join().unwrap();
        assert!(!stderr.contains("panicked"), "{stderr}");
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        (status.code().unwrap_or(-1), lines, stderr)
    }
}

fn run(dir: &Path, args: &[&str]) -> common::Out {
    ampybus_in(Some(dir), args)
}

/// Publishes `n` messages on one partition key (so a stranded lease would block the rest);
/// returns their ids in publish order.
fn publish(dir: &Path, n: usize) -> Vec<String> {
    let n = n.to_string();
    let payload = "x".repeat(300);
    let o = run(
        dir,
        &[
            "pub",
            "--topic",
            TOPIC,
            "--producer",
            "sig@1",
            "--source",
            "test",
            "--pk",
            "k-1",
            "--payload",
            &payload,
            "--count",
            &n,
            "--print-ids",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    o.lines().iter().map(|s| s.to_string()).collect()
}

fn ids_of_json_lines(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            v["headers"]["message_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// `topics lag --consumer NAME --json`: (in_flight, lag).
fn lag(dir: &Path, consumer: &str) -> (u64, u64) {
    let o = run(dir, &["topics", "lag", "--consumer", consumer, "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = &o.json_lines()[0];
    (v["in_flight"].as_u64().unwrap(), v["lag"].as_u64().unwrap())
}

fn stored(dir: &Path) -> u64 {
    let o = run(dir, &["topics", "list", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    o.json_lines()
        .iter()
        .filter(|t| t["topic"] == TOPIC)
        .map(|t| t["messages"].as_u64().unwrap())
        .sum()
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
fn pub_count_stops_on_sigint_and_sigterm_with_every_stored_id_printed_once() {
    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        let dir = tempfile::tempdir().unwrap();
        let total = 10_000_000u64;
        let mut p = spawn(
            dir.path(),
            &[
                "pub",
                "--topic",
                TOPIC,
                "--producer",
                "sig@1",
                "--source",
                "test",
                "--pk",
                "k-1",
                "--payload",
                "hello",
                "--count",
                &total.to_string(),
                "--batch",
                "100",
                "--print-ids",
            ],
            Reader::All,
        );
        p.wait_lines(300);
        p.signal(sig);
        let (exit, printed, stderr) = p.finish();
        assert_eq!(exit, code, "SIG{sig}: {stderr}");
        assert!(stderr.contains(&format!("stopped by SIG{sig}")), "{stderr}");
        let n = printed.len() as u64;
        assert!(
            stderr.contains(&format!("published {n} of {total} message(s) to {TOPIC}")),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("confirmed {n}, unknown 0, unsent {}", total - n)),
            "{stderr}"
        );
        let unique: HashSet<&String> = printed.iter().collect();
        assert_eq!(unique.len(), printed.len(), "an id printed twice");
        // Nothing hidden: the log holds exactly the printed ids.
        assert_eq!(stored(dir.path()), n, "SIG{sig}: stored != printed");
        let o = run(
            dir.path(),
            &[
                "sub",
                "--pattern",
                PATTERN,
                "--json",
                "--max",
                &n.to_string(),
                "--timeout",
                "10",
            ],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
        let back = ids_of_json_lines(&o.lines().iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            back, printed,
            "SIG{sig}: the log's ids in order are the printed ids"
        );
    }
}

#[test]
fn durable_sub_stops_on_signals_holding_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let total = 3000;
    let ids = publish(dir.path(), total);
    for (sig, code, name) in [("TERM", 0, "term-reader"), ("INT", 130, "int-reader")] {
        // The reader pauses after 100 lines: `sub` fills the pipe and blocks in write(2)
        // with fetched messages in hand when the signal comes.
        let mut s = spawn(
            dir.path(),
            &[
                "sub",
                "--pattern",
                PATTERN,
                "--durable",
                name,
                "--json",
                "--timeout",
                "60",
            ],
            Reader::PauseAfter(100),
        );
        s.wait_lines(100);
        s.signal(sig);
        let (exit, lines, stderr) = s.finish();
        assert_eq!(exit, code, "SIG{sig}: {stderr}");
        let first = ids_of_json_lines(&lines);
        let n = first.len();
        assert!(n >= 100 && n < total, "SIG{sig}: {n} printed");
        assert!(
            stderr.contains(&format!("received {n} message(s); stopped by SIG{sig}")),
            "{stderr}"
        );
        assert_eq!(first, ids[..n], "SIG{sig}: printed in order");
        // Nothing held: no message in flight, the rest waiting.
        assert_eq!(
            lag(dir.path(), name),
            (0, (total - n) as u64),
            "SIG{sig}: in flight / lag"
        );
        // A restarted reader gets its next message at once (a held lease would keep the
        // key blocked for the 30 s ack deadline, far beyond --timeout 2).
        let o = run(
            dir.path(),
            &[
                "sub",
                "--pattern",
                PATTERN,
                "--durable",
                name,
                "--json",
                "--max",
                "1",
                "--timeout",
                "2",
            ],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
        let next = ids_of_json_lines(&o.lines().iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(next, ids[n..n + 1], "SIG{sig}: the next message");
        let rest = (total - n - 1).to_string();
        let o = run(
            dir.path(),
            &[
                "sub",
                "--pattern",
                PATTERN,
                "--durable",
                name,
                "--json",
                "--max",
                &rest,
                "--timeout",
                "10",
            ],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
        let last = ids_of_json_lines(&o.lines().iter().map(|s| s.to_string()).collect::<Vec<_>>());
        // Across the runs: every message once, none twice.
        let all: Vec<String> = first.into_iter().chain(next).chain(last).collect();
        assert_eq!(all, ids, "SIG{sig}: all messages exactly once, in order");
        assert_eq!(lag(dir.path(), name), (0, 0));
    }
}

#[test]
fn durable_sub_into_a_closed_pipe_acks_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let total = 3000;
    let ids = publish(dir.path(), total);
    let s = spawn(
        dir.path(),
        &[
            "sub",
            "--pattern",
            PATTERN,
            "--durable",
            "piped",
            "--json",
            "--timeout",
            "60",
        ],
        Reader::CloseAfter(50),
    );
    let (exit, lines, stderr) = s.finish();
    assert_eq!(exit, 3, "{stderr}");
    assert_eq!(ids_of_json_lines(&lines[..50]), ids[..50]);
    let acked = number_after(&stderr, "stdout closed after acking ") as usize;
    assert!(
        stderr.contains(&format!("stdout closed after acking {acked} message(s)")),
        "{stderr}"
    );
    assert!((50..total).contains(&acked), "acked {acked}");
    assert_eq!(lag(dir.path(), "piped"), (0, (total - acked) as u64));
    // The same durable reader gets exactly the rest.
    let rest = (total - acked).to_string();
    let o = run(
        dir.path(),
        &[
            "sub",
            "--pattern",
            PATTERN,
            "--durable",
            "piped",
            "--json",
            "--max",
            &rest,
            "--timeout",
            "10",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let got = ids_of_json_lines(&o.lines().iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert_eq!(got, ids[acked..], "the rerun gets exactly the unacked rest");
    assert_eq!(lag(dir.path(), "piped"), (0, 0));
}

#[test]
fn pub_print_ids_into_a_closed_pipe_stops_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let total = 10_000_000u64;
    let p = spawn(
        dir.path(),
        &[
            "pub",
            "--topic",
            TOPIC,
            "--producer",
            "sig@1",
            "--source",
            "test",
            "--pk",
            "k-1",
            "--count",
            &total.to_string(),
            "--batch",
            "100",
            "--print-ids",
        ],
        Reader::CloseAfter(10),
    );
    let (exit, lines, stderr) = p.finish();
    assert_eq!(exit, 3, "{stderr}");
    assert_eq!(lines.len(), 10);
    assert!(stderr.contains("stopped: stdout closed"), "{stderr}");
    assert!(stderr.contains("error: stdout closed after "), "{stderr}");
    let confirmed = number_after(&stderr, "confirmed ");
    assert!(
        stderr.contains(&format!(
            "published {confirmed} of {total} message(s) to {TOPIC}"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "confirmed {confirmed}, unknown 0, unsent {}",
            total - confirmed
        )),
        "{stderr}"
    );
    // Stopped at once: the batch whose ids met the closed pipe is the last one.
    assert!((100..=10_000).contains(&confirmed), "confirmed {confirmed}");
    assert_eq!(stored(dir.path()), confirmed);
}

/// A report command (`bench` prints its table at the end) whose stdout was closed before it
/// printed exits 3 with a clear line, never a panic.
#[test]
fn a_report_into_a_closed_pipe_exits_3() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ampybus"))
        .args(["bench", "--mode", "publish", "--messages", "50"])
        .args(["--single-messages", "5", "--rounds", "1", "--dir"])
        .arg(tmp.path())
        .env_remove("AMPYBUS_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ampybus");
    // Close the read end before anything was printed.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("error: stdout closed"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
