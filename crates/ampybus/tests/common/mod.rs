//! Helpers shared by the embedded-log test binaries (`embedded.rs`, `embedded_faults.rs`,
//! `operator_safety.rs`, `producer.rs`, `feeds.rs`): messages keyed for order checks, child processes that re-run the
//! test binary in a role, and a reader of the frames of a segment or journal file.
#![allow(dead_code)] // each test binary uses a different part

mod brokers;
#[allow(unused_imports)] // not every test binary that includes `common` starts a broker
pub use brokers::{s3_bucket, start_broker};

use ampybus::transport::{Delivery, ReplayByTime, Subscription, WindowQuery};
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A wait longer than this is a hang, and fails the test.
pub const HANG: Duration = Duration::from_secs(300);

/// `AMPYBUS_TEST_SCALE` (default 1): multiplies the sizes and rounds of the long tests.
pub fn scale() -> f64 {
    std::env::var("AMPYBUS_TEST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// A message of `topic` with partition key `key` and payload `{key}:{i}`.
pub fn order_env(topic: &Topic, key: &str, i: usize) -> Envelope {
    let h = Headers::for_publish("ampy.raw.v1.Bytes", "test@1", "test", key);
    Envelope::new(topic, h, format!("{key}:{i}").into_bytes())
}

pub fn orders_topic() -> Topic {
    Topic::parse("ampy.dev.orders.v1.requests").unwrap()
}

/// A bus on the embedded log in `dir` with `sync=normal`.
pub async fn bus_at(dir: &Path) -> Bus {
    Bus::connect(&format!("file://{}?sync=normal", dir.display()))
        .await
        .unwrap()
}

/// A fresh embedded log in a temporary directory (`sync=normal`).
pub async fn embedded() -> (tempfile::TempDir, Bus) {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus_at(dir.path()).await;
    (dir, bus)
}

/// Every stored message on `pattern`, in log order.
pub async fn stored_envelopes(bus: &Bus, pattern: &str) -> Vec<Envelope> {
    let mut q = WindowQuery::new(TopicPattern::parse(pattern).unwrap());
    let mut out = Vec::new();
    loop {
        let page = bus.replay().unwrap().read_window(&q).await.unwrap();
        let Some(last) = page.last() else { break };
        q.after_sequence = last.sequence;
        out.extend(page.into_iter().map(|m| m.envelope));
    }
    out
}

/// The key and index of a payload written by [`order_env`].
pub fn parse_payload(d: &Delivery) -> (String, usize) {
    let s = std::str::from_utf8(&d.envelope.payload).unwrap();
    let (k, i) = s.rsplit_once(':').unwrap();
    (k.to_owned(), i.parse().unwrap())
}

/// Fetches until exactly `n` deliveries arrived (fails after [`HANG`]).
pub async fn fetch_exact(sub: &mut Box<dyn Subscription>, n: usize) -> Vec<Delivery> {
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < n {
        assert!(
            start.elapsed() < HANG,
            "timed out after {} of {n}",
            out.len()
        );
        out.extend(
            sub.fetch(n - out.len(), Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    out
}

/// This test binary run as a child process in `role`: it enters through the binary's
/// `child_process_entry` test (ignored when the binary runs on its own), with
/// `AMPYBUS_CHILD_ROLE`, `AMPYBUS_CHILD_DIR` and `extra` in its environment. Its stdout is
/// piped; lines it marks with `@` are its answers ([`marked_lines`]).
pub fn child(role: &str, dir: &Path, extra: &[(&str, String)]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "child_process_entry",
        "--exact",
        "--nocapture",
        "--ignored",
        "--test-threads",
        "1",
    ])
    .env("AMPYBUS_CHILD_ROLE", role)
    .env("AMPYBUS_CHILD_DIR", dir)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in extra {
        c.env(k, v);
    }
    c
}

/// The role and data directory of a child process (in `child_process_entry`).
pub fn child_role() -> (String, PathBuf) {
    let role = std::env::var("AMPYBUS_CHILD_ROLE").expect("run by the multi-process tests only");
    let dir = PathBuf::from(std::env::var("AMPYBUS_CHILD_DIR").unwrap());
    (role, dir)
}

/// Lines a child printed that start with `@`, without the marker (libtest prints its own
/// lines on stdout too). A last line without its newline (a child killed while printing it)
/// is left out.
pub fn marked_lines(out: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(out);
    let whole = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    whole
        .lines()
        .filter_map(|l| l.split_once('@').map(|(_, rest)| rest.to_owned()))
        .collect()
}

/// Every stored message as (sequence, message id), in sequence order, read with
/// `read_window` paging on `after_sequence` (so every record of every domain is read and
/// checked).
pub async fn stored_ids(replay: &dyn ReplayByTime) -> Vec<(u64, String)> {
    let mut q = WindowQuery::new(TopicPattern::parse(">").unwrap());
    q.limit = 10_000;
    let mut ids = Vec::new();
    loop {
        let page = replay.read_window(&q).await.unwrap();
        let Some(last) = page.last() else { break };
        q.after_sequence = last.sequence;
        ids.extend(page.iter().map(|m| {
            (
                m.sequence,
                m.envelope.headers.message_id().unwrap().to_owned(),
            )
        }));
    }
    ids
}

/// Opens the log in `dir` through the public API (as a process starting after a crash) and
/// returns every message id in sequence order.
pub fn ids_after_crash(dir: &Path) -> Vec<String> {
    let dir = dir.to_owned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let bus = Bus::connect(dir.to_str().unwrap())
            .await
            .expect("log opens cleanly after kill -9");
        let ids = stored_ids(bus.replay().unwrap()).await;
        bus.close().await.unwrap();
        ids.into_iter().map(|(_, id)| id).collect()
    })
}

// ---------- the stored files ----------

/// Frame kinds (`transport/embedded/format.rs`).
pub const KIND_BATCH: u32 = 1;
pub const KIND_TOPIC: u32 = 2;
pub const KIND_RECORD: u32 = 3;
/// Length of a segment file's header.
pub const SEG_HEADER: u64 = 16;

/// One frame of a segment or journal file: where it starts, its kind, its whole length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameAt {
    pub offset: u64,
    pub kind: u32,
    pub len: u64,
}

impl FrameAt {
    /// Offset after the frame.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The frames of `path` from byte `start` (a segment: [`SEG_HEADER`]; a journal: 0), by
/// their length words (checksums are not verified: see [`frame_ok`]).
pub fn frames(path: &Path, start: u64) -> Vec<FrameAt> {
    let data = std::fs::read(path).unwrap();
    let mut at = start as usize;
    let mut out = Vec::new();
    while at < data.len() {
        let word = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap());
        let len = 8 + (word & 0x0FFF_FFFF) as usize;
        out.push(FrameAt {
            offset: at as u64,
            kind: word >> 28,
            len: len as u64,
        });
        at += len;
    }
    out
}

/// True when the checksum of frame `f` of `data` (a whole file) matches.
pub fn frame_ok(data: &[u8], f: &FrameAt) -> bool {
    let (at, end) = (f.offset as usize, f.end() as usize);
    let crc = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
    crc32c::crc32c(&data[at + 4..end]) == crc
}

/// The segment files of `domain` in the data directory `data`, oldest first (none before
/// the domain's first publish).
pub fn segment_files(data: &Path, domain: &str) -> Vec<PathBuf> {
    let dir = data.join("log").join(domain);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut segs: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    segs
}

/// The only segment file of `domain`.
pub fn only_segment(data: &Path, domain: &str) -> PathBuf {
    let segs = segment_files(data, domain);
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs.into_iter().next().unwrap()
}

/// XORs `len` bytes of `path` from `offset` with 0xFF (each changes; the length is kept).
pub fn flip_bytes(path: &Path, offset: u64, len: usize) {
    let mut data = std::fs::read(path).unwrap();
    for b in &mut data[offset as usize..offset as usize + len] {
        *b ^= 0xFF;
    }
    std::fs::write(path, data).unwrap();
}
