//! Issue 16: candidate storage designs for the embedded log, measured side by side with the
//! same rows. See `docs/embedded-log.md` for what the figures mean and the decision.
//!
//! ```text
//! storage-candidates [--dir D] [--messages N] [--batch B] [--single N] [--writers W]
//!                    [--per-writer N] [--rounds R] [--candidates sqlite,lmdb,file]
//!                    [--forms text,compact] [--segment-mib M] [--wake N] [--meta N] [--no-disk]
//! ```

mod filelog;
mod lmdb;
mod meta;
mod rows;
mod sqlite;
mod store;
mod wake;

use rows::{Form, Rows};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Instant;
use store::{Candidate, Store};

struct Args {
    dir: PathBuf,
    messages: usize,
    batch: usize,
    single: usize,
    writers: usize,
    per_writer: usize,
    rounds: usize,
    candidates: Vec<String>,
    forms: Vec<Form>,
    segment_mib: u64,
    wake: u32,
    disk: bool,
    meta: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        dir: std::env::temp_dir(),
        messages: 1_000_000,
        batch: 1000,
        single: 2000,
        writers: 64,
        per_writer: 200,
        rounds: 3,
        candidates: vec!["sqlite".into(), "lmdb".into(), "file".into()],
        forms: vec![Form::Text, Form::Compact],
        segment_mib: 64,
        wake: 2000,
        disk: true,
        meta: 1_000_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-disk" {
            a.disk = false;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag}: missing value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--dir" => a.dir = PathBuf::from(v),
            "--messages" => a.messages = num(&v)?,
            "--batch" => a.batch = num(&v)?,
            "--single" => a.single = num(&v)?,
            "--writers" => a.writers = num(&v)?,
            "--per-writer" => a.per_writer = num(&v)?,
            "--rounds" => a.rounds = num(&v)?,
            "--segment-mib" => a.segment_mib = num(&v)? as u64,
            "--wake" => a.wake = num(&v)? as u32,
            "--meta" => a.meta = num(&v)?,
            "--candidates" => a.candidates = v.split(',').map(String::from).collect(),
            "--forms" => {
                a.forms = v
                    .split(',')
                    .map(|f| match f {
                        "text" => Ok(Form::Text),
                        "compact" => Ok(Form::Compact),
                        _ => Err(format!("--forms: unknown form {f:?}")),
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// `du -sb` of a directory: apparent bytes of everything in it.
fn du_sb(dir: &Path) -> io::Result<u64> {
    let out = std::process::Command::new("du").arg("-sb").arg(dir).output()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| store::err("du -sb: unreadable output"))
}

/// Drops this directory's (clean, synced) pages from the page cache, so the next read comes
/// from the disk. Affects only these files.
fn evict(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            let f = std::fs::File::open(&p)?;
            // SAFETY: valid fd; advice only.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
    Ok(())
}

fn fresh_dir(root: &Path, what: &str) -> io::Result<PathBuf> {
    let d = root.join(what);
    if d.exists() {
        std::fs::remove_dir_all(&d)?;
    }
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// One-by-one publishes from `writers` threads, each waiting for its own durable commit; one
/// committer takes everything queued and commits it at once (group commit).
fn group_commit(store: &mut dyn Store, rows: &Rows, writers: usize, per_writer: usize) -> io::Result<f64> {
    struct Q {
        queue: Vec<usize>,
        enqueued: u64,
        committed: u64,
        finished: usize,
    }
    let q = Mutex::new(Q {
        queue: Vec::new(),
        enqueued: 0,
        committed: 0,
        finished: 0,
    });
    let (work, done) = (Condvar::new(), Condvar::new());
    let total = writers * per_writer;
    let started = Instant::now();
    let mut commits = 0u64;
    std::thread::scope(|s| -> io::Result<()> {
        for w in 0..writers {
            let (q, work, done) = (&q, &work, &done);
            s.spawn(move || {
                for k in 0..per_writer {
                    let row = (w * per_writer + k) % rows.len();
                    let mut g = q.lock().unwrap();
                    g.queue.push(row);
                    g.enqueued += 1;
                    let ticket = g.enqueued;
                    work.notify_one();
                    while g.committed < ticket {
                        g = done.wait(g).unwrap();
                    }
                }
                q.lock().unwrap().finished += 1;
                work.notify_one();
            });
        }
        let mut taken = Vec::new();
        loop {
            {
                let mut g = q.lock().unwrap();
                while g.queue.is_empty() && g.finished < writers {
                    g = work.wait(g).unwrap();
                }
                if g.queue.is_empty() {
                    break;
                }
                std::mem::swap(&mut taken, &mut g.queue);
            }
            let batch: Vec<&[u8]> = taken.iter().map(|&i| rows.get(i)).collect();
            store.append(&batch)?;
            commits += 1;
            let mut g = q.lock().unwrap();
            g.committed += taken.len() as u64;
            taken.clear();
            done.notify_all();
        }
        Ok(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!("      group commit: {total} messages in {commits} commits ({:.1} per commit)", total as f64 / commits as f64);
    Ok(total as f64 / secs)
}

type Results = BTreeMap<(String, String, String), Vec<f64>>;

fn record(res: &mut Results, form: Form, cand: &str, metric: &str, v: f64) {
    eprintln!("    {:<8} {:<7} {:<22} {:>14.1}", form.name(), cand, metric, v);
    res.entry((form.name().into(), cand.into(), metric.into()))
        .or_default()
        .push(v);
}

fn run_candidate(a: &Args, res: &mut Results, form: Form, rows: &Rows, c: &dyn Candidate) -> io::Result<()> {
    let name = c.name();
    let n = rows.len();
    // Batched: `batch` rows per durable commit.
    let dir = fresh_dir(&a.dir, &format!("{name}-{}-batched", form.name()))?;
    let mut s = c.open(&dir)?;
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + a.batch).min(n);
        s.append(&rows.slice(i, end))?;
        i = end;
    }
    let secs = t.elapsed().as_secs_f64();
    record(res, form, name, "batched_msg_s", n as f64 / secs);
    let t = Instant::now();
    s.close()?;
    record(res, form, name, "close_checkpoint_ms", t.elapsed().as_secs_f64() * 1e3);
    let bytes = du_sb(&dir)?;
    record(res, form, name, "bytes_per_msg", bytes as f64 / n as f64);
    // Reopen (recovery path of the file log), then scans: from the disk, then from cache.
    let t = Instant::now();
    let s = c.open(&dir)?;
    s.close()?;
    record(res, form, name, "reopen_ms", t.elapsed().as_secs_f64() * 1e3);
    evict(&dir)?;
    let t = Instant::now();
    let (got, _) = c.scan(&dir)?;
    let cold = t.elapsed().as_secs_f64();
    if got != n as u64 {
        return Err(store::err(format!("{name}: scanned {got} records, wrote {n}")));
    }
    record(res, form, name, "read_cold_msg_s", n as f64 / cold);
    let t = Instant::now();
    let (got, _) = c.scan(&dir)?;
    let hot = t.elapsed().as_secs_f64();
    assert_eq!(got, n as u64);
    record(res, form, name, "read_hot_msg_s", n as f64 / hot);
    std::fs::remove_dir_all(&dir)?;

    // One commit per message, one publisher.
    let dir = fresh_dir(&a.dir, &format!("{name}-{}-single", form.name()))?;
    let mut s = c.open(&dir)?;
    let m = a.single.min(n);
    let t = Instant::now();
    for i in 0..m {
        s.append(&[rows.get(i)])?;
    }
    record(res, form, name, "single_msg_s", m as f64 / t.elapsed().as_secs_f64());
    s.close()?;
    std::fs::remove_dir_all(&dir)?;

    // One-by-one from many publishers, group commit.
    if a.writers > 0 {
        let dir = fresh_dir(&a.dir, &format!("{name}-{}-group", form.name()))?;
        let mut s = c.open(&dir)?;
        let v = group_commit(s.as_mut(), rows, a.writers, a.per_writer)?;
        record(res, form, name, &format!("group{}_msg_s", a.writers), v);
        s.close()?;
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// Runs a `dd` and returns the seconds it reports.
fn dd(args: &[&str]) -> io::Result<f64> {
    let out = std::process::Command::new("dd").args(args).output()?;
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().last().unwrap_or("");
    // "268435456 bytes (268 MB, 256 MiB) copied, 0.82 s, 327 MB/s"
    line.split(", ")
        .find(|p| p.ends_with(" s"))
        .and_then(|p| p.trim_end_matches(" s").replace(',', ".").parse().ok())
        .ok_or_else(|| store::err(format!("dd: unreadable output {line:?}")))
}

fn disk(a: &Args, res: &mut Results) -> io::Result<()> {
    let f = a.dir.join("dd.bin");
    let of = format!("of={}", f.display());
    let secs = dd(&["if=/dev/zero", &of, "bs=1M", "count=256", "conv=fdatasync"])?;
    let _ = std::fs::remove_file(&f);
    record(res, Form::Text, "disk", "dd_seq_MB_s", 268.435456 / secs);
    let secs = dd(&["if=/dev/zero", &of, "bs=4k", "count=2000", "oflag=dsync"])?;
    let _ = std::fs::remove_file(&f);
    record(res, Form::Text, "disk", "dd_4k_dsync_ms", secs / 2000.0 * 1e3);
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    s[s.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--wake-child") {
        let n = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1000);
        if let Err(e) = wake::child(Path::new(&args[2]), n) {
            eprintln!("wake child: {e}");
            std::process::exit(1);
        }
        return;
    }
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("storage-candidates: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(a) {
        eprintln!("storage-candidates: {e}");
        std::process::exit(1);
    }
}

fn run(a: Args) -> io::Result<()> {
    std::fs::create_dir_all(&a.dir)?;
    let all: Vec<Box<dyn Candidate>> = vec![
        Box::new(sqlite::Sqlite),
        Box::new(lmdb::Lmdb),
        Box::new(filelog::FileLog {
            roll: a.segment_mib << 20,
        }),
    ];
    let cands: Vec<&dyn Candidate> = all
        .iter()
        .filter(|c| a.candidates.iter().any(|n| n == c.name()))
        .map(|c| c.as_ref())
        .collect();
    let mut res = Results::new();
    let mut loads = Vec::new();
    let mut row_info = Vec::new();
    for r in 0..a.rounds {
        let load = loadavg();
        eprintln!("round {}/{} (loadavg {load})", r + 1, a.rounds);
        loads.push(format!("round {} start {load}", r + 1));
        if a.disk {
            disk(&a, &mut res)?;
        }
        // Interleave: the order of forms and candidates turns each round.
        let mut forms = a.forms.clone();
        let k = r % forms.len().max(1);
        forms.rotate_left(k);
        for form in forms {
            let rows = rows::make(form, a.messages, 256);
            if r == 0 {
                row_info.push(format!(
                    "{}: {} header bytes + 256 payload = {:.1} bytes per row",
                    form.name(),
                    rows.header_bytes,
                    rows.avg_len()
                ));
            }
            let mut order = cands.clone();
            let k = r % order.len().max(1);
            order.rotate_left(k);
            for c in order {
                run_candidate(&a, &mut res, form, &rows, c)?;
            }
        }
        if a.meta > 0 {
            // Consumer side: dedupe records + ack in one commit, `batch` keys per commit.
            let d = fresh_dir(&a.dir, "meta-sqlite")?;
            let v = meta::sqlite(&d, a.meta, a.batch)?;
            record(&mut res, Form::Compact, "sqlite", "dedupe_ack_keys_s", v);
            std::fs::remove_dir_all(&d)?;
            let d = fresh_dir(&a.dir, "meta-journal")?;
            let v = meta::journal(&d, a.meta, a.batch)?;
            record(&mut res, Form::Compact, "file", "dedupe_ack_keys_s", v);
            std::fs::remove_dir_all(&d)?;
        }
        loads.push(format!("round {} end {}", r + 1, loadavg()));
    }
    let wake = if a.wake > 0 {
        let d = fresh_dir(&a.dir, "wake")?;
        let v = wake::measure(&d, a.wake)?;
        std::fs::remove_dir_all(&d)?;
        let p = |q: f64| v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or(f64::NAN);
        Some(format!(
            "cross-process futex wake-up ({} wakes): p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
            v.len(),
            p(0.5),
            p(0.99),
            v.last().copied().unwrap_or(f64::NAN)
        ))
    } else {
        None
    };

    // Report.
    println!("## storage candidates: medians of {} rounds (best round in parentheses)", a.rounds);
    println!();
    println!(
        "{} messages, {} rows per batched commit, {} one-by-one commits, {} writers x {} for group commit, segments {} MiB",
        a.messages, a.batch, a.single, a.writers, a.per_writer, a.segment_mib
    );
    for l in &row_info {
        println!("- rows {l}");
    }
    for l in &loads {
        println!("- loadavg {l}");
    }
    if let Some(w) = &wake {
        println!("- {w}");
    }
    println!();
    let metrics = [
        ("batched_msg_s", "batched msg/s"),
        ("single_msg_s", "one-by-one msg/s"),
        (&format!("group{}_msg_s", a.writers)[..], "group-commit msg/s"),
        ("read_hot_msg_s", "read msg/s (cache)"),
        ("read_cold_msg_s", "read msg/s (disk)"),
        ("bytes_per_msg", "bytes/msg"),
        ("dedupe_ack_keys_s", "dedupe+ack keys/s"),
        ("close_checkpoint_ms", "close ms"),
        ("reopen_ms", "reopen ms"),
    ];
    print!("| candidate | rows |");
    for (_, h) in &metrics {
        print!(" {h} |");
    }
    println!();
    print!("|---|---|");
    for _ in &metrics {
        print!("---:|");
    }
    println!();
    for form in &a.forms {
        for c in &cands {
            print!("| {} | {} |", c.name(), form.name());
            for (m, _) in &metrics {
                let v = res
                    .get(&(form.name().to_string(), c.name().to_string(), m.to_string()))
                    .map(|v| median(v))
                    .unwrap_or(f64::NAN);
                let best = res
                    .get(&(form.name().to_string(), c.name().to_string(), m.to_string()))
                    .map(|v| v.iter().copied().fold(f64::NAN, f64::max))
                    .unwrap_or(f64::NAN);
                if *m == "bytes_per_msg" || m.ends_with("_ms") {
                    print!(" {v:.1} |");
                } else {
                    // Median, then the best round: on a shared box interference only slows.
                    print!(" {} ({}) |", group_thousands(v), group_thousands(best));
                }
            }
            println!();
        }
    }
    if a.disk {
        let get = |m: &str| median(res.get(&("text".into(), "disk".into(), m.into())).map(|v| &v[..]).unwrap_or(&[]));
        println!();
        println!(
            "raw disk (medians): dd bs=1M count=256 conv=fdatasync {:.0} MB/s; dd bs=4k oflag=dsync {:.3} ms per write",
            get("dd_seq_MB_s"),
            get("dd_4k_dsync_ms")
        );
    }
    println!();
    println!("all readings:");
    for ((f, c, m), v) in &res {
        let vs: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
        println!("  {f:<8} {c:<7} {m:<22} {}", vs.join(" "));
    }
    Ok(())
}

fn group_thousands(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
