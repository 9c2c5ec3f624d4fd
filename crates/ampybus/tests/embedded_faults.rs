//! Faults of the embedded log's storage (issue 16), on real files and real processes, with
//! exact counts: a publisher `kill -9`ed at random instants, a consumer process killed while it
//! holds leased partitions, a full disk, and damaged bytes in segment files and in a consumer
//! group's journal.
//!
//! The multi-process tests re-run this test binary as a child with `AMPYBUS_CHILD_ROLE` set;
//! the child enters through `child_process_entry` (ignored when run on its own).

use ampybus::transport::embedded::{EmbeddedLog, EmbeddedOptions, SyncLevel};
use ampybus::transport::{
    Delivery, ReplayByTime, StartAt, SubscribeSpec, Subscription, Transport, WindowQuery,
};
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

mod common;
use common::{
    FrameAt, HANG, KIND_BATCH, KIND_RECORD, SEG_HEADER, bus_at, child, child_role, flip_bytes,
    frame_ok, frames, only_segment, order_env, orders_topic, scale, segment_files, stored_ids,
};

/// The tail of every damage error.
const DAMAGE_TAIL: &str = "; the messages from there on cannot be read (restore the file, or move it away to accept the loss)";

fn opts(dir: &Path, sync: SyncLevel) -> EmbeddedOptions {
    let mut o = EmbeddedOptions::new(dir);
    o.sync = sync;
    o
}

/// Wall-clock microseconds (the clock the log's lease times use).
fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A child process that is killed (and reaped) when dropped, so that a failing test leaves no
/// process behind.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kill_9(c: &Child) {
    // SAFETY: kill(2) on the pid of a child this process spawned and has not waited for.
    let r = unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(r, 0, "kill -9 {}", c.id());
}

/// Sends every complete line `out` prints that carries the `@` marker (the part after it) to
/// `tx` with `tag`, until the pipe closes. A last line without its newline (the process was
/// killed while printing it) is dropped.
fn forward_lines(
    out: impl Read + Send + 'static,
    tag: usize,
    tx: mpsc::Sender<(usize, String)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line.last() != Some(&b'\n') => return,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if let Some((_, rest)) = text.split_once('@')
                && tx.send((tag, rest.to_owned())).is_err()
            {
                return;
            }
        }
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Checks a segment file as recovery leaves it: whole frames with good checksums from the
/// header to the last byte.
fn assert_whole_frames(seg: &Path) {
    let data = std::fs::read(seg).unwrap();
    let fs = frames(seg, SEG_HEADER);
    let end = fs.last().map_or(SEG_HEADER, |f| f.end());
    assert_eq!(end, data.len() as u64, "{}: a partial frame", seg.display());
    for f in &fs {
        assert!(frame_ok(&data, f), "{}: bad frame {f:?}", seg.display());
    }
}

// ---------- a publisher killed at random instants ----------

#[test]
fn a_publisher_killed_at_random_instants_loses_no_acknowledged_publish() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let rounds = ((20.0 * scale()) as usize).max(1);
    let mut acked: Vec<String> = Vec::new();
    let mut stored_total = 0;
    for round in 0..rounds {
        let sync = if round % 4 == 3 { "normal" } else { "full" };
        let mut c = Reap(
            child(
                "publish_loop",
                dir.path(),
                &[("AMPYBUS_CHILD_SYNC", sync.to_owned())],
            )
            .spawn()
            .unwrap(),
        );
        let (tx, rx) = mpsc::channel();
        let lines = forward_lines(c.0.stdout.take().unwrap(), 0, tx);
        // Once it has acknowledged a publish, kill it at a random instant of its loop.
        let first = rx
            .recv_timeout(HANG)
            .expect("the publisher acknowledged nothing");
        std::thread::sleep(Duration::from_micros(rand::random_range(0..60_000)));
        kill_9(&c.0);
        let status = c.0.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "round {round}: {status}"
        );
        lines.join().unwrap();
        acked.push(first.1);
        acked.extend(rx.try_iter().map(|(_, id)| id));
        // Every fifth round as after a reboot: the shared state is gone, recovery runs.
        let recovered = round % 5 == 4;
        if recovered {
            std::fs::remove_file(dir.path().join("state.shm")).unwrap();
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        let stored = rt.block_on(async {
            let log = EmbeddedLog::open(opts(dir.path(), SyncLevel::Full))
                .expect("the log opens after kill -9");
            let stored = stored_ids(&log).await;
            // A full scan of every domain: no partial or damaged record anywhere.
            assert_eq!(log.stats().await.unwrap().0, stored.len() as u64);
            log.close().await.unwrap();
            stored
        });
        // Opening cleaned up after the killed writer (or recovery cut its torn commit): the
        // segment files hold whole frames only.
        for d in ["orders", "fills", "news", "bars"] {
            for seg in segment_files(dir.path(), d) {
                assert_whole_frames(&seg);
            }
        }
        assert!(
            stored.windows(2).all(|w| w[0].0 < w[1].0),
            "round {round}: sequences not strictly increasing"
        );
        let mut seen = HashSet::new();
        for (seq, id) in &stored {
            assert!(
                seen.insert(id.as_str()),
                "round {round}: {id} stored twice (seq {seq})"
            );
        }
        let lost: Vec<&String> = acked
            .iter()
            .filter(|id| !seen.contains(id.as_str()))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} acknowledged publishes lost, e.g. {:?}",
            lost.len(),
            lost.first()
        );
        // Ids are never reused across rounds: every acknowledged one is distinct.
        assert_eq!(acked.iter().collect::<HashSet<_>>().len(), acked.len());
        stored_total = stored.len();
    }
    eprintln!(
        "{rounds} rounds: {} publishes acknowledged, {stored_total} stored, {:.1}s",
        acked.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Byte offset of the sequence lock in `state.shm` (odd while a writer publishes the committed
/// ends; `transport/embedded/shared.rs`).
const SHM_SEQLOCK: usize = 32;

/// Runs `f` on a thread of its own and fails the test if it does not finish in `limit` (a
/// spinning or blocked call cannot be cancelled by an async timeout).
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what}: still running after {limit:?}"))
}

#[test]
fn a_writer_killed_while_publishing_the_committed_ends_hangs_no_reader_or_writer() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(tokio::runtime::Runtime::new().unwrap());
    let topic = orders_topic();
    // A reading handle (another process, as far as the files go) follows the log.
    let (reader, mut sub) = rt.block_on(async {
        let writer = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap();
        writer
            .publish_batch((0..10).map(|i| order_env(&topic, "k", i)).collect())
            .await
            .unwrap();
        writer.close().await.unwrap();
        let reader = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap();
        let mut sub = reader
            .subscribe(SubscribeSpec::ephemeral(
                TopicPattern::parse(">").unwrap(),
                StartAt::Earliest,
            ))
            .await
            .unwrap();
        assert_eq!(
            sub.fetch(100, Duration::from_secs(5)).await.unwrap().len(),
            10
        );
        (reader, sub)
    });
    // What a writer killed between the two stores of its sequence lock leaves behind.
    let shm = dir.path().join("state.shm");
    let mut page = std::fs::read(&shm).unwrap();
    assert_eq!(page[SHM_SEQLOCK] & 1, 0);
    page[SHM_SEQLOCK] |= 1;
    std::fs::write(&shm, &page).unwrap();
    // The open reader neither spins forever nor misses what follows.
    let (rt2, d) = (rt.clone(), dir.path().to_owned());
    let sub = within(
        Duration::from_secs(60),
        "a fetch on the torn page",
        move || {
            rt2.block_on(async move {
                assert!(
                    sub.fetch(10, Duration::from_millis(10))
                        .await
                        .unwrap()
                        .is_empty()
                );
                // A new process opens, publishes and reads.
                let log = EmbeddedLog::open(opts(&d, SyncLevel::Normal)).unwrap();
                log.publish_batch(vec![order_env(&orders_topic(), "k", 10)])
                    .await
                    .unwrap();
                assert_eq!(log.stats().await.unwrap(), (11, 11));
                log.close().await.unwrap();
                let got = sub.fetch(10, Duration::from_secs(5)).await.unwrap();
                assert_eq!(got.len(), 1);
                assert_eq!(got[0].info.sequence, 11);
                sub
            })
        },
    );
    // And a handle that was open all along writes again.
    let rt2 = rt.clone();
    within(
        Duration::from_secs(60),
        "a publish after the repair",
        move || {
            rt2.block_on(async move {
                let r = reader
                    .publish_batch(vec![order_env(&orders_topic(), "k", 11)])
                    .await
                    .unwrap();
                assert_eq!(r[0].sequence, 12);
                drop(sub);
                reader.close().await.unwrap();
            })
        },
    );
    eprintln!("{:.1}s", started.elapsed().as_secs_f64());
}

/// Byte offset in `state.shm` of the word a writer sets before it changes files for a commit,
/// and that publishing the commit clears.
const SHM_DIRTY: usize = 56;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_killed_writer_wrote_and_never_published_is_gone_before_the_next_commit() {
    let started = Instant::now();
    let news = Topic::parse("ampy.dev.news.v1.crash").unwrap();
    let bars = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
    let news_env = |i: usize| {
        let h = Headers::for_publish("ampy.raw.v1.Bytes", "crash@1", "crash", "n-1");
        Envelope::new(&news, h, format!("news {i}").into_bytes())
    };
    // The commit a writer makes and is killed before publishing: news 6..=10 in a segment it
    // created, and orders 11..=15 appended to the orders segment. Written for real in a
    // scratch directory that went one commit further.
    let scratch = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(opts(scratch.path(), SyncLevel::Normal)).unwrap();
    let orders = |from: usize| {
        (from..from + 5)
            .map(|i| order_env(&orders_topic(), "k", i))
            .collect()
    };
    log.publish_batch(orders(0)).await.unwrap();
    let mut second: Vec<Envelope> = orders(5);
    second.extend((0..5).map(news_env));
    let r = log.publish_batch(second).await.unwrap();
    // Sequences go by domain: news 6..=10, orders 11..=15.
    assert_eq!((r[5].sequence, r[0].sequence), (6, 11));
    log.close().await.unwrap();
    let seg = only_segment(scratch.path(), "orders");
    let second_batch = frames(&seg, SEG_HEADER)
        .into_iter()
        .filter(|f| f.kind == KIND_BATCH)
        .nth(1)
        .unwrap();
    let unpublished_tail = std::fs::read(&seg).unwrap()[second_batch.offset as usize..].to_vec();
    let created_segment = only_segment(scratch.path(), "news");

    // The directory as the killed writer left it: orders 1..=5 published, its commit written.
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap();
    let published: Vec<String> = {
        let envs: Vec<Envelope> = orders(0);
        let ids = envs
            .iter()
            .map(|e| e.headers.message_id().unwrap().to_owned())
            .collect();
        log.publish_batch(envs).await.unwrap();
        ids
    };
    log.close().await.unwrap();
    let orders_seg = only_segment(dir.path(), "orders");
    let published_len = std::fs::metadata(&orders_seg).unwrap().len();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&orders_seg)
        .unwrap();
    f.write_all(&unpublished_tail).unwrap();
    std::fs::create_dir_all(dir.path().join("log/news")).unwrap();
    std::fs::copy(
        &created_segment,
        dir.path()
            .join("log/news")
            .join(created_segment.file_name().unwrap()),
    )
    .unwrap();
    let shm = dir.path().join("state.shm");
    let mut page = std::fs::read(&shm).unwrap();
    page[SHM_DIRTY] = 1;
    std::fs::write(&shm, &page).unwrap();

    // The next writer publishes bars (sequences 6..=8, never acknowledged to anyone before)
    // and news (9..=10, a new segment): what the dead writer left is gone.
    let log = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap();
    let mut expected = published;
    for envs in [
        (0..3)
            .map(|i| order_env(&bars, "XNAS.AAPL", i))
            .collect::<Vec<_>>(),
        (0..2).map(news_env).collect(),
    ] {
        expected.extend(
            envs.iter()
                .map(|e| e.headers.message_id().unwrap().to_owned()),
        );
        log.publish_batch(envs).await.unwrap();
    }
    let stored: Vec<(u64, String)> = stored_ids(&log).await;
    assert_eq!(
        stored.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<u64>>()
    );
    assert_eq!(
        stored.iter().map(|s| s.1.clone()).collect::<Vec<_>>(),
        expected
    );
    log.close().await.unwrap();
    // On disk: the unpublished commit is cut, the segment it created removed.
    assert_eq!(std::fs::metadata(&orders_seg).unwrap().len(), published_len);
    assert_eq!(
        segment_files(dir.path(), "news"),
        [dir.path().join("log/news/00000000000000000009.seg")]
    );
    // After a reboot, recovery finds the same.
    std::fs::remove_file(&shm).unwrap();
    let log = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap();
    let again: Vec<(u64, String)> = stored_ids(&log).await;
    assert_eq!(again, stored);
    log.close().await.unwrap();
    eprintln!("{:.1}s", started.elapsed().as_secs_f64());
}

// ---------- a consumer killed while it holds leases ----------

/// The consumers' ack deadline, which is also their lease. A live instance renews it every
/// third of it, so only a stall of the machine longer than two thirds of it (1 s) takes a
/// live instance's partitions away (and makes the exact counts below fail).
const LEASE: Duration = Duration::from_millis(1500);

/// One line of a lease consumer: `ack|held t key:i seq count`.
#[derive(Debug, Clone)]
struct Handled {
    t: u64,
    key: String,
    i: usize,
    count: u32,
}

fn parse_handled(rest: &str) -> Handled {
    let mut it = rest.split(' ');
    let t = it.next().unwrap().parse().unwrap();
    let (key, i) = it.next().unwrap().rsplit_once(':').unwrap();
    let _seq: u64 = it.next().unwrap().parse().unwrap();
    let count = it.next().unwrap().parse().unwrap();
    Handled {
        t,
        key: key.to_owned(),
        i: i.parse().unwrap(),
        count,
    }
}

#[test]
fn a_consumer_killed_while_holding_leases_hands_its_messages_over_when_the_lease_expires() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let n = ((2000.0 * scale()) as usize).max(400);
    let keys = 32;
    let mut per_key = vec![0usize; keys];
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bus = bus_at(dir.path()).await;
        let topic = orders_topic();
        let mut batch = Vec::new();
        for j in 0..n {
            let k = (j * 7919 + j / 5) % keys;
            batch.push(order_env(&topic, &format!("k{k}"), per_key[k]));
            per_key[k] += 1;
            if batch.len() == 500 {
                bus.publish_batch(std::mem::take(&mut batch)).await.unwrap();
            }
        }
        bus.publish_batch(batch).await.unwrap();
        bus.close().await.unwrap();
    });
    let (tx, rx) = mpsc::channel();
    let lease_ms = LEASE.as_millis().to_string();
    // The victim first (it takes every partition), acking 100 messages, then holding the
    // next 4 unacked while it renews its lease through `in_progress`.
    let mut victim = Reap(
        child(
            "lease_consumer",
            dir.path(),
            &[
                ("AMPYBUS_CHILD_HOLD_AFTER", "100".into()),
                ("AMPYBUS_CHILD_LEASE_MS", lease_ms.clone()),
            ],
        )
        .spawn()
        .unwrap(),
    );
    let victim_lines = forward_lines(victim.0.stdout.take().unwrap(), 0, tx.clone());
    let deadline = Instant::now() + HANG;
    let next = |rx: &mpsc::Receiver<(usize, String)>| {
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("a consumer stopped answering")
    };
    let mut lines: Vec<(usize, String)> = Vec::new();
    loop {
        let l = next(&rx);
        let ready = l.1 == "ready";
        lines.push(l);
        if ready {
            break;
        }
    }
    let mut survivor = Reap(
        child(
            "lease_consumer",
            dir.path(),
            &[("AMPYBUS_CHILD_LEASE_MS", lease_ms)],
        )
        .stdin(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let survivor_lines = forward_lines(survivor.0.stdout.take().unwrap(), 1, tx);
    // Kill the victim once it holds its messages and the survivor handles the partitions it
    // gave up (both instances live at once).
    let (mut holding, mut survivor_acked, mut killed) = (false, false, None);
    let mut handled = 0;
    while handled < n {
        let (who, l) = next(&rx);
        if l.starts_with("ack ") {
            handled += 1;
            survivor_acked |= who == 1;
        }
        holding |= who == 0 && l.starts_with("holding");
        lines.push((who, l));
        if holding && survivor_acked && killed.is_none() {
            kill_9(&victim.0);
            killed = Some(wall_us());
        }
    }
    let killed = killed.expect("the victim was never killed");
    drop(survivor.0.stdin.take());
    assert!(survivor.0.wait().unwrap().success(), "the survivor failed");
    assert_eq!(victim.0.wait().unwrap().signal(), Some(libc::SIGKILL));
    victim_lines.join().unwrap();
    survivor_lines.join().unwrap();
    lines.extend(rx.try_iter());

    let mut handled: Vec<(usize, Handled)> = Vec::new();
    let mut held: Vec<Handled> = Vec::new();
    let mut last_renewed = 0u64;
    for (who, l) in &lines {
        let (what, rest) = l.split_once(' ').unwrap_or((l, ""));
        match what {
            "ack" => handled.push((*who, parse_handled(rest))),
            "held" => held.push(parse_handled(rest)),
            // Times taken before a call that renews the lease when a third of it has passed.
            "beat" | "holding" => last_renewed = last_renewed.max(rest.parse().unwrap()),
            "ready" => {}
            other => panic!("unexpected line {other} {rest}"),
        }
    }
    // Every message handled exactly once (acks of the victim before it held, and of the
    // survivor), in publish order per key across both processes.
    assert_eq!(handled.len(), n, "handled {} of {n}", handled.len());
    let mut by_key: BTreeMap<&str, Vec<(u64, usize)>> = BTreeMap::new();
    for (_, h) in &handled {
        by_key.entry(&h.key).or_default().push((h.t, h.i));
    }
    assert_eq!(by_key.len(), keys);
    for (k, mut v) in by_key {
        v.sort();
        let order: Vec<usize> = v.iter().map(|x| x.1).collect();
        let idx: usize = k[1..].parse().unwrap();
        assert_eq!(
            order,
            (0..per_key[idx]).collect::<Vec<_>>(),
            "key {k}: not exactly once in publish order"
        );
    }
    // The held messages, and only they, came again (delivery 2) to the survivor, after the
    // victim's lease ran out: a call at time T renews it unless it was renewed within the
    // last third of a lease, so it lasts at least until T + 2/3 of a lease.
    assert!(!held.is_empty() && held.len() <= 4, "held {held:?}");
    assert!(held.iter().all(|h| h.count == 1));
    let victim_acked = handled.iter().filter(|(w, _)| *w == 0).count();
    assert_eq!(victim_acked, 100);
    let again: Vec<&Handled> = handled
        .iter()
        .filter(|(w, h)| *w == 1 && h.count > 1)
        .map(|(_, h)| h)
        .collect();
    let key_of = |h: &Handled| (h.key.clone(), h.i);
    assert_eq!(
        again.iter().map(|h| key_of(h)).collect::<HashSet<_>>(),
        held.iter().map(key_of).collect::<HashSet<_>>()
    );
    assert!(again.iter().all(|h| h.count == 2), "{again:?}");
    let expired_after = last_renewed + LEASE.as_micros() as u64 * 2 / 3;
    let first_again = again.iter().map(|h| h.t).min().unwrap();
    assert!(
        first_again >= expired_after,
        "redelivered {} ms before the victim's lease could expire",
        (expired_after - first_again) / 1000
    );
    eprintln!(
        "{n} messages: victim acked {victim_acked}, held {}, survivor handled {}; redelivered {} ms after the kill; {:.1}s",
        held.len(),
        n - victim_acked,
        first_again.saturating_sub(killed) / 1000,
        started.elapsed().as_secs_f64()
    );
}

// ---------- a full disk ----------

/// A tmpfs mounted on a directory for the test, unmounted when dropped (also when the test
/// fails).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a {size} tmpfs on {} and needs root or CAP_SYS_ADMIN: mount failed ({}): {}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut c = Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            c.arg(&self.dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // Still busy when a closed handle's watcher thread has not yet seen the stop flag
        // (or a failed test dropped an open handle): detach it now, freed once closed.
        if !umount(false) && !umount(true) {
            eprintln!("could not unmount the tmpfs on {}", self.dir.display());
        }
    }
}

/// Records the (sequence, message id) of each acknowledged publish in `acked`.
fn acknowledge(
    acked: &mut BTreeMap<u64, String>,
    envs: &[Envelope],
    receipts: &[ampybus::transport::PublishReceipt],
) {
    assert_eq!(envs.len(), receipts.len());
    for (e, r) in envs.iter().zip(receipts) {
        let id = e.headers.message_id().unwrap().to_owned();
        assert!(acked.insert(r.sequence, id).is_none());
    }
}

fn big_env(topic: &Topic, i: usize) -> Envelope {
    let h = Headers::for_publish("ampy.raw.v1.Bytes", "disk@1", "disk", "k");
    let mut payload = format!("{i:08}:").into_bytes();
    payload.resize(4096, b'x');
    Envelope::new(topic, h, payload)
}

/// Fills the file system holding `path` to its last page with a file at `path`.
fn fill_up(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let page = vec![0xa5u8; 4096];
    while f.write_all(&page).is_ok() {}
    while f.write_all(&[0xa5]).is_ok() {}
}

/// Checks that a journal (or purged list) is whole frames with good checksums to its end.
fn assert_whole_journal(path: &Path) {
    let data = std::fs::read(path).unwrap();
    let fs = frames(path, 0);
    assert_eq!(fs.last().map_or(0, |f| f.end()), data.len() as u64);
    for f in &fs {
        assert!(frame_ok(&data, f), "{}: bad frame {f:?}", path.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_publish_naming_the_path_and_publishing_resumes_once_freed() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let _mount = Tmpfs::mount(tmp.path(), "4m");
    let filler = tmp.path().join("filler");
    std::fs::write(&filler, vec![0x5a; 1024 * 1024]).unwrap();
    let data = tmp.path().join("data");
    let log = EmbeddedLog::open(opts(&data, SyncLevel::Full)).unwrap();
    let news = Topic::parse("ampy.dev.news.v1.disk").unwrap();
    let bars = Topic::parse("ampy.dev.bars.v1.XNAS.DISK").unwrap();
    let dlq = Topic::parse("ampy.dev.dlq.v1.news").unwrap();
    let dlq_pattern = TopicPattern::parse("ampy.dev.dlq.>").unwrap();
    // (sequence, message id) of every acknowledged publish still stored.
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    // A consumer group and a purged list exist before the disk fills.
    let mut spec = SubscribeSpec::durable(TopicPattern::parse("ampy.dev.news.>").unwrap(), "g");
    spec.ack_deadline = Duration::from_secs(1);
    let mut sub = log.subscribe(spec).await.unwrap();
    let first = vec![big_env(&dlq, 0)];
    log.publish_batch(first).await.unwrap();
    assert_eq!(log.purge(&dlq_pattern, |_| true).await.unwrap().len(), 1);
    let dead: Vec<Envelope> = (0..600)
        .map(|i| {
            let h = Headers::for_publish("ampy.raw.v1.Bytes", "disk@1", "disk", "k");
            Envelope::new(&dlq, h, format!("dead {i}").into_bytes())
        })
        .collect();
    let r = log.publish_batch(dead.clone()).await.unwrap();
    acknowledge(&mut acked, &dead, &r);

    // Batches of 64 KiB spanning two domains (two segment files) until one fails.
    let batch = |i: usize| -> Vec<Envelope> {
        (0..16)
            .map(|j| big_env(if j % 2 == 0 { &news } else { &bars }, i + j))
            .collect()
    };
    let mut i = 0;
    let err = loop {
        assert!(i < 100_000, "the 4 MiB disk never filled");
        let b = batch(i);
        i += 16;
        match log.publish_batch(b.clone()).await {
            Ok(r) => acknowledge(&mut acked, &b, &r),
            Err(e) => break e,
        }
    };
    let filled_after = acked.len() - 600;
    assert!(filled_after > 0);
    let segs = [only_segment(&data, "news"), only_segment(&data, "bars")];
    let full_error = |e: &ampybus::Error| {
        let t = e.to_string();
        assert!(
            segs.iter().any(|s| t
                == format!(
                    "transport error: embedded log {}: disk full while appending: No space left on device (os error 28)",
                    s.display()
                )),
            "{t}"
        );
    };
    full_error(&err);
    // What was written of the failed commit is cut: whole frames only.
    for s in &segs {
        assert_whole_frames(s);
    }
    // Every page taken: the same again, and nothing of either failed batch is stored:
    // exactly the acknowledged messages, under their sequences.
    let filler2 = tmp.path().join("filler2");
    fill_up(&filler2);
    full_error(&log.publish_batch(batch(i)).await.unwrap_err());
    let exactly_acked = |stored: Vec<(u64, String)>, acked: &BTreeMap<u64, String>| {
        assert_eq!(stored.len(), acked.len());
        for ((seq, id), (want_seq, want_id)) in stored.iter().zip(acked) {
            assert_eq!((seq, id), (want_seq, want_id));
        }
    };
    exactly_acked(stored_ids(&log).await, &acked);

    // The consumer: handing out or acking fails once its journal cannot grow, naming it.
    let journal = data.join("groups/g/journal");
    let journal_full = format!(
        "transport error: embedded log {}: disk full while appending to the group journal: No space left on device (os error 28)",
        journal.display()
    );
    let mut handled: HashMap<String, usize> = HashMap::new();
    let mut failed_batch: Vec<String> = Vec::new();
    for round in 0.. {
        assert!(round < 200, "the journal never ran out of space");
        let ds = match sub.fetch(4, Duration::from_secs(5)).await {
            Ok(ds) => ds,
            Err(e) => {
                assert_eq!(e.to_string(), journal_full);
                break;
            }
        };
        assert!(!ds.is_empty());
        let ids: Vec<String> = ds
            .iter()
            .map(|d| d.envelope.headers.message_id().unwrap().to_owned())
            .collect();
        for id in &ids {
            *handled.entry(id.clone()).or_default() += 1;
        }
        if let Err((e, _)) = Delivery::ack_all(ds).await {
            assert_eq!(e.to_string(), journal_full);
            failed_batch = ids;
            break;
        }
    }
    // A purge cannot record what it deleted.
    let purged_list = data.join("log/dlq/purged");
    let e = log.purge(&dlq_pattern, |_| true).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "transport error: embedded log {}: disk full while appending to the purged list: No space left on device (os error 28)",
            purged_list.display()
        )
    );

    // Space freed: the same handle publishes, consumes and purges again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&filler2).unwrap();
    let more: Vec<Envelope> = (0..4).map(|j| big_env(&news, i + 1 + j)).collect();
    let r = log.publish_batch(more.clone()).await.unwrap();
    acknowledge(&mut acked, &more, &r);
    exactly_acked(stored_ids(&log).await, &acked);
    let news_ids: HashSet<String> = {
        let mut q = WindowQuery::new(TopicPattern::parse("ampy.dev.news.>").unwrap());
        q.limit = 100_000;
        let page = log.read_window(&q).await.unwrap();
        page.iter()
            .map(|m| m.envelope.headers.message_id().unwrap().to_owned())
            .collect()
    };
    let start = Instant::now();
    while !news_ids.iter().all(|id| handled.contains_key(id)) {
        assert!(
            start.elapsed() < HANG,
            "the consumer stopped after the disk was freed"
        );
        let ds = sub.fetch(64, Duration::from_secs(5)).await.unwrap();
        for d in &ds {
            let id = d.envelope.headers.message_id().unwrap().to_owned();
            *handled.entry(id).or_default() += 1;
        }
        Delivery::ack_all(ds).await.map_err(|(e, _)| e).unwrap();
    }
    assert_eq!(handled.len(), news_ids.len());
    let again: Vec<&String> = handled
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        again.iter().all(|id| failed_batch.contains(id)),
        "handled twice without a failed ack: {again:?}"
    );
    drop(sub);
    let gone = log.purge(&dlq_pattern, |_| true).await.unwrap();
    assert_eq!(gone.len(), 600);
    for m in &gone {
        assert!(acked.remove(&m.sequence).is_some());
    }
    exactly_acked(stored_ids(&log).await, &acked);
    log.close().await.unwrap();
    // The journal and the purged list are whole (a partial frame left by the failed appends
    // would be followed by later ones: damage).
    assert_whole_journal(&journal);
    assert_whole_journal(&purged_list);
    // As after a reboot: recovery finds whole frames only and nothing to cut; the group opens
    // and has nothing left but what a failed ack may hand out again.
    let lens: Vec<u64> = segs
        .iter()
        .map(|s| std::fs::metadata(s).unwrap().len())
        .collect();
    std::fs::remove_file(data.join("state.shm")).unwrap();
    let log = EmbeddedLog::open(opts(&data, SyncLevel::Full)).unwrap();
    for (s, len) in segs.iter().zip(lens) {
        assert_eq!(std::fs::metadata(s).unwrap().len(), len);
        assert_whole_frames(s);
    }
    exactly_acked(stored_ids(&log).await, &acked);
    let mut sub = log
        .subscribe(SubscribeSpec::durable(
            TopicPattern::parse("ampy.dev.news.>").unwrap(),
            "g",
        ))
        .await
        .unwrap();
    loop {
        let ds = sub.fetch(64, Duration::from_millis(300)).await.unwrap();
        if ds.is_empty() {
            break;
        }
        for d in &ds {
            let id = d.envelope.headers.message_id().unwrap();
            assert!(failed_batch.iter().any(|f| f == id), "{id} delivered again");
        }
        Delivery::ack_all(ds).await.map_err(|(e, _)| e).unwrap();
    }
    drop(sub);
    log.close().await.unwrap();
    eprintln!(
        "disk full after {filled_after} acknowledged messages; {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

// ---------- damaged bytes ----------

/// A closed log of `n` acknowledged messages on orders (batches of 100, 40 keys) in `dir`;
/// returns their ids in sequence order.
async fn closed_log(dir: &Path, n: usize) -> Vec<String> {
    let log = EmbeddedLog::open(opts(dir, SyncLevel::Normal)).unwrap();
    let topic = orders_topic();
    let mut ids = Vec::with_capacity(n);
    for b in 0..n.div_ceil(100) {
        let batch: Vec<Envelope> = (b * 100..n.min(b * 100 + 100))
            .map(|i| order_env(&topic, &format!("k{}", i % 40), i))
            .collect();
        ids.extend(
            batch
                .iter()
                .map(|e| e.headers.message_id().unwrap().to_owned()),
        );
        let r = log.publish_batch(batch).await.unwrap();
        assert_eq!(r.last().unwrap().sequence, ids.len() as u64);
    }
    log.close().await.unwrap();
    ids
}

/// Fetches until the subscription fails; returns the message ids delivered before and the
/// error (acking each delivery when `ack`).
async fn fetch_until_error(
    sub: &mut Box<dyn Subscription>,
    ack: bool,
) -> (Vec<String>, ampybus::Error) {
    let mut got = Vec::new();
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < HANG,
            "no error after {} messages",
            got.len()
        );
        match sub.fetch(1000, Duration::from_secs(5)).await {
            Ok(ds) => {
                assert!(!ds.is_empty(), "the read ended without an error");
                got.extend(
                    ds.iter()
                        .map(|d| d.envelope.headers.message_id().unwrap().to_owned()),
                );
                if ack {
                    Delivery::ack_all(ds).await.map_err(|(e, _)| e).unwrap();
                }
            }
            Err(e) => return (got, e),
        }
    }
}

/// Asserts `e` names damage of `seg` at byte `offset`.
fn assert_damage(e: &ampybus::Error, seg: &Path, offset: u64) {
    let t = e.to_string();
    let head = format!(
        "transport error: embedded log {}: damaged at byte {offset}: ",
        seg.display()
    );
    assert!(t.starts_with(&head) && t.ends_with(DAMAGE_TAIL), "{t}");
}

/// The frame of `fs` holding byte `at`.
fn frame_holding(fs: &[FrameAt], at: u64) -> FrameAt {
    *fs.iter().find(|f| f.offset <= at && at < f.end()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_random_bytes_in_a_segment_are_named_on_every_path_and_nothing_after_is_delivered()
{
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let ids = closed_log(dir.path(), 5000).await;
    let seg = only_segment(dir.path(), "orders");
    let fs = frames(&seg, SEG_HEADER);
    let mut bytes = std::fs::read(&seg).unwrap();
    let len = bytes.len() as u64;
    let at = rand::random_range(len / 4..len * 3 / 4);
    let mut junk: [u8; 16] = rand::random();
    if junk[0] == bytes[at as usize] {
        junk[0] ^= 1;
    }
    bytes[at as usize..at as usize + 16].copy_from_slice(&junk);
    std::fs::write(&seg, &bytes).unwrap();
    // Reads stop at the first frame the junk touches; every record before it is delivered.
    let bad = frame_holding(&fs, at);
    let before = fs
        .iter()
        .filter(|f| f.kind == KIND_RECORD && f.end() <= bad.offset)
        .count();
    let log = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap();
    let pattern = TopicPattern::parse("ampy.dev.orders.>").unwrap();
    let mut eph = log
        .subscribe(SubscribeSpec::ephemeral(pattern.clone(), StartAt::Earliest))
        .await
        .unwrap();
    let (got, e) = fetch_until_error(&mut eph, false).await;
    assert_eq!(got, ids[..before], "ephemeral");
    assert_damage(&e, &seg, bad.offset);
    assert_damage(
        &eph.fetch(10, Duration::from_secs(1)).await.unwrap_err(),
        &seg,
        bad.offset,
    );
    let mut dur = log
        .subscribe(SubscribeSpec::durable(pattern.clone(), "audit"))
        .await
        .unwrap();
    let (got, e) = fetch_until_error(&mut dur, true).await;
    assert_eq!(got, ids[..before], "durable");
    assert_damage(&e, &seg, bad.offset);
    // Window reads in pages of 1,000: the pages wholly before the damage, then the error.
    let mut q = WindowQuery::new(pattern.clone());
    let mut paged = Vec::new();
    let e = loop {
        match log.read_window(&q).await {
            Ok(page) => {
                assert_eq!(page.len(), 1000, "a short page before the damage");
                q.after_sequence = page.last().unwrap().sequence;
                paged.extend(
                    page.iter()
                        .map(|m| m.envelope.headers.message_id().unwrap().to_owned()),
                );
            }
            Err(e) => break e,
        }
    };
    assert_eq!(paged, ids[..before / 1000 * 1000]);
    assert_damage(&e, &seg, bad.offset);
    assert_damage(&log.stats().await.unwrap_err(), &seg, bad.offset);
    // The writer does not append after damage either.
    let e = log
        .publish_batch(vec![order_env(&orders_topic(), "k0", 5000)])
        .await
        .unwrap_err();
    assert_damage(&e, &seg, bad.offset);
    drop((eph, dur));
    log.close().await.unwrap();
    // After a reboot (no shared state), opening runs recovery: damage followed by valid
    // batches is not a torn tail, so the open fails and nothing is cut.
    std::fs::remove_file(dir.path().join("state.shm")).unwrap();
    let e = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap_err();
    assert_damage(&e, &seg, bad.offset);
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);
    eprintln!(
        "16 bytes at {at} of {len}: frame at {} ({} records before it); {:.1}s",
        bad.offset,
        before,
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_last_frame_fails_reads_and_recovery_cuts_it_only_when_nothing_valid_follows() {
    let started = Instant::now();
    let base = tempfile::tempdir().unwrap();
    let ids = closed_log(base.path(), 5000).await;
    let seg_name = only_segment(base.path(), "orders")
        .file_name()
        .unwrap()
        .to_owned();
    let fs = frames(&only_segment(base.path(), "orders"), SEG_HEADER);
    let batches: Vec<&FrameAt> = fs.iter().filter(|f| f.kind == KIND_BATCH).collect();
    assert_eq!(batches.len(), 50);
    let last = *fs.last().unwrap();
    assert_eq!(last.kind, KIND_RECORD);

    // A byte flipped inside the last frame of the last segment.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(base.path(), dir.path());
    let seg = dir.path().join("log/orders").join(&seg_name);
    flip_bytes(&seg, last.offset + last.len / 2, 1);
    let len = std::fs::metadata(&seg).unwrap().len();
    // Without a reboot that is committed data: reads deliver all before it, then fail.
    let log = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap();
    let pattern = TopicPattern::parse("ampy.dev.orders.>").unwrap();
    let mut eph = log
        .subscribe(SubscribeSpec::ephemeral(pattern.clone(), StartAt::Earliest))
        .await
        .unwrap();
    let (got, e) = fetch_until_error(&mut eph, false).await;
    assert_eq!(got, ids[..4999]);
    assert_eq!(
        e.to_string(),
        format!(
            "transport error: embedded log {}: damaged at byte {}: checksum mismatch{DAMAGE_TAIL}",
            seg.display(),
            last.offset
        )
    );
    drop(eph);
    log.close().await.unwrap();
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        len,
        "nothing is cut"
    );
    // After a reboot, recovery cannot tell it from a commit torn by the power loss: nothing
    // valid follows the damaged frame, so its whole batch (100 messages) is cut as a torn
    // tail, and the log carries on from the batch before.
    std::fs::remove_file(dir.path().join("state.shm")).unwrap();
    let log = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap();
    let cut_at = batches[49].offset;
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), cut_at);
    assert_whole_frames(&seg);
    let stored: Vec<String> = stored_ids(&log)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(stored, ids[..4900]);
    let env = order_env(&orders_topic(), "k0", 5000);
    let id = env.headers.message_id().unwrap().to_owned();
    log.publish_batch(vec![env]).await.unwrap();
    let stored: Vec<String> = stored_ids(&log)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(stored.len(), 4901);
    assert_eq!(stored[4900], id);
    log.close().await.unwrap();

    // A byte flipped inside the last frame of the batch before the last: a valid batch
    // follows, so it is damage, and recovery refuses to open without cutting anything.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(base.path(), dir.path());
    let seg = dir.path().join("log/orders").join(&seg_name);
    let f = fs
        .iter()
        .rfind(|f| f.end() <= batches[49].offset)
        .copied()
        .unwrap();
    assert_eq!(f.end(), batches[49].offset);
    flip_bytes(&seg, f.offset + f.len / 2, 1);
    let bytes = std::fs::read(&seg).unwrap();
    std::fs::remove_file(dir.path().join("state.shm")).unwrap();
    let e = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "transport error: embedded log {}: damaged at byte {}: checksum mismatch{DAMAGE_TAIL}",
            seg.display(),
            f.offset
        )
    );
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing is cut");
    eprintln!("{:.1}s", started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_group_journal_is_named_with_its_offset() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let ids = closed_log(dir.path(), 2000).await;
    let pattern = TopicPattern::parse("ampy.dev.orders.>").unwrap();
    let log = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap();
    {
        let mut sub = log
            .subscribe(SubscribeSpec::durable(pattern.clone(), "audit"))
            .await
            .unwrap();
        let mut got = 0;
        while got < ids.len() {
            let ds = sub.fetch(100, Duration::from_secs(5)).await.unwrap();
            got += ds.len();
            Delivery::ack_all(ds).await.map_err(|(e, _)| e).unwrap();
        }
        assert_eq!(got, ids.len());
    }
    log.close().await.unwrap();
    let journal = dir.path().join("groups/audit/journal");
    let fs = frames(&journal, 0);
    assert!(fs.len() > 20, "{} journal frames", fs.len());
    let mid = fs[fs.len() / 2];
    flip_bytes(&journal, mid.offset + mid.len / 2, 4);
    let bytes = std::fs::read(&journal).unwrap();
    let want = format!(
        "transport error: embedded log {}: damaged at byte {}: bad journal frame followed by valid ones{DAMAGE_TAIL}",
        journal.display(),
        mid.offset
    );
    let log = EmbeddedLog::open(opts(dir.path(), SyncLevel::Normal)).unwrap();
    let Err(e) = log
        .subscribe(SubscribeSpec::durable(pattern.clone(), "audit"))
        .await
    else {
        panic!("a durable subscription opened on a damaged journal")
    };
    assert_eq!(e.to_string(), want);
    assert_eq!(log.consumer_stats().await.unwrap_err().to_string(), want);
    assert_eq!(std::fs::read(&journal).unwrap(), bytes, "nothing is cut");
    // Restored, the group resumes where it was: nothing left to deliver.
    flip_bytes(&journal, mid.offset + mid.len / 2, 4);
    let mut sub = log
        .subscribe(SubscribeSpec::durable(pattern, "audit"))
        .await
        .unwrap();
    assert!(
        sub.fetch(10, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty()
    );
    drop(sub);
    log.close().await.unwrap();
    eprintln!(
        "{} journal frames; {:.1}s",
        fs.len(),
        started.elapsed().as_secs_f64()
    );
}

// ---------- the child processes ----------

#[test]
#[ignore = "entry point of the child processes spawned by the multi-process tests"]
fn child_process_entry() {
    let (role, dir) = child_role();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let out = std::io::stdout();
        let say = |text: &str| {
            let mut o = out.lock();
            o.write_all(text.as_bytes()).unwrap();
            o.flush().unwrap();
        };
        match role.as_str() {
            // Publishes until killed: single publishes and batches of 1–64 messages over four
            // domains, payloads of 10 B–2 KiB; prints each acknowledged message id.
            "publish_loop" => {
                let sync = std::env::var("AMPYBUS_CHILD_SYNC").unwrap();
                let bus = Bus::connect(&format!("file://{}?sync={sync}", dir.display()))
                    .await
                    .unwrap();
                // (topic, partition key)
                let topics = [
                    (orders_topic(), "co_1"),
                    (
                        Topic::parse("ampy.dev.fills.v1.events").unwrap(),
                        "acct|co_1",
                    ),
                    (Topic::parse("ampy.dev.news.v1.crash").unwrap(), "n-1"),
                    (
                        Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap(),
                        "XNAS.AAPL",
                    ),
                ];
                let env = |i: usize| {
                    let (t, key) = &topics[rand::random_range(0..topics.len())];
                    let h = Headers::for_publish("ampy.raw.v1.Bytes", "crash@1", "crash", key);
                    let mut p = format!("{i}:").into_bytes();
                    p.resize(rand::random_range(10..2048), b'p');
                    Envelope::new(t, h, p)
                };
                let mut text = String::new();
                for i in 0.. {
                    let batch: Vec<Envelope> = if rand::random_range(0..3) == 0 {
                        vec![env(i)]
                    } else {
                        (0..rand::random_range(1..=64)).map(|_| env(i)).collect()
                    };
                    let ids: Vec<String> = batch
                        .iter()
                        .map(|e| e.headers.message_id().unwrap().to_owned())
                        .collect();
                    if batch.len() == 1 {
                        bus.publish_envelope(batch.into_iter().next().unwrap())
                            .await
                            .unwrap();
                    } else {
                        bus.publish_batch(batch).await.unwrap();
                    }
                    text.clear();
                    for id in ids {
                        text.push_str(&format!("@{id}\n"));
                    }
                    say(&text);
                }
            }
            // A consumer of group `leases`: prints `@ack t key:i seq count` for each message
            // and acks it. With AMPYBUS_CHILD_HOLD_AFTER=h, after h acks it holds the next
            // batch (up to 4, `@held …`) unacked forever, renewing its lease with
            // `in_progress` (`@beat t`); without, it runs until its stdin closes.
            "lease_consumer" => {
                let lease: u64 = std::env::var("AMPYBUS_CHILD_LEASE_MS")
                    .unwrap()
                    .parse()
                    .unwrap();
                let hold_after: Option<usize> = std::env::var("AMPYBUS_CHILD_HOLD_AFTER")
                    .ok()
                    .map(|v| v.parse().unwrap());
                let stop = Arc::new(AtomicBool::new(false));
                if hold_after.is_none() {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                        stop.store(true, Ordering::Release);
                    });
                }
                let bus = bus_at(&dir).await;
                let mut spec = SubscribeSpec::durable(
                    TopicPattern::parse("ampy.dev.orders.>").unwrap(),
                    "leases",
                );
                spec.ack_deadline = Duration::from_millis(lease);
                let mut sub = bus.subscribe(spec).await.unwrap();
                say("@ready\n");
                let line = |what: &str, d: &Delivery| {
                    format!(
                        "@{what} {} {} {} {}\n",
                        wall_us(),
                        std::str::from_utf8(&d.envelope.payload).unwrap(),
                        d.info.sequence,
                        d.info.delivery_count
                    )
                };
                let mut acked = 0;
                let start = Instant::now();
                while !stop.load(Ordering::Acquire) {
                    assert!(start.elapsed() < HANG);
                    let t0 = wall_us();
                    let holding = hold_after.is_some_and(|h| acked >= h);
                    let max = if holding {
                        4
                    } else {
                        hold_after.map_or(64, |h| (h - acked).min(64))
                    };
                    let got = sub.fetch(max, Duration::from_millis(100)).await.unwrap();
                    if got.is_empty() {
                        continue;
                    }
                    if holding {
                        let text: String = got.iter().map(|d| line("held", d)).collect();
                        say(&format!("{text}@holding {t0}\n"));
                        loop {
                            let t = wall_us();
                            for d in &got {
                                d.in_progress().await.unwrap();
                            }
                            say(&format!("@beat {t}\n"));
                            tokio::time::sleep(lease_beat(lease)).await;
                        }
                    }
                    let text: String = got.iter().map(|d| line("ack", d)).collect();
                    say(&text);
                    acked += got.len();
                    Delivery::ack_all(got).await.map_err(|(e, _)| e).unwrap();
                }
                drop(sub);
                bus.close().await.unwrap();
            }
            other => panic!("unknown child role {other}"),
        }
    });
}

/// How often a holding consumer calls `in_progress`: a quarter of its lease.
fn lease_beat(lease_ms: u64) -> Duration {
    Duration::from_millis(lease_ms / 4)
}
