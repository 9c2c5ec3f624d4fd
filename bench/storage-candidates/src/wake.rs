//! Cross-process wake-up without polling: a futex word in a `MAP_SHARED` mapping of a file in
//! the data directory. A futex on a shared file mapping is keyed by (inode, offset), so
//! `FUTEX_WAIT` in one process is woken by `FUTEX_WAKE` in another (no fd passing, unlike
//! eventfd).
//!
//! Measurement: the parent ("writer") stamps CLOCK_MONOTONIC into the mapping, bumps the
//! commit counter and wakes; a child process ("consumer") sleeping in `FUTEX_WAIT` reads the
//! clock when it returns. The writer pauses between signals so the consumer is asleep each
//! time (the case that matters: an idle consumer woken by a commit).

use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

struct Shared {
    ptr: *mut u8,
}

impl Shared {
    fn map(path: &Path) -> io::Result<Shared> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        f.set_len(4096)?;
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of a 4 KiB file; unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Shared { ptr: ptr as *mut u8 })
    }

    /// The commit counter (futex word) at offset 0.
    fn counter(&self) -> &AtomicU32 {
        // SAFETY: offset 0 of a page-aligned live mapping, 4-byte aligned.
        unsafe { &*(self.ptr as *const AtomicU32) }
    }

    /// The writer's send stamp (ns) at offset 8.
    fn stamp(&self) -> &AtomicU64 {
        // SAFETY: offset 8 of a live mapping, 8-byte aligned.
        unsafe { &*(self.ptr.add(8) as *const AtomicU64) }
    }

    /// Count of sleeping waiters at offset 16: the writer skips the wake syscall at zero.
    fn waiters(&self) -> &AtomicU32 {
        // SAFETY: offset 16 of a live mapping, 4-byte aligned.
        unsafe { &*(self.ptr.add(16) as *const AtomicU32) }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, 4096);
        }
    }
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps while the word equals `seen` (shared futex: no PRIVATE flag), at most 100 ms.
fn futex_wait(w: &AtomicU32, seen: u32) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    // SAFETY: `w` points into a live shared mapping.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w as *const AtomicU32,
            libc::FUTEX_WAIT,
            seen,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0,
        );
    }
}

fn futex_wake(w: &AtomicU32) {
    // SAFETY: `w` points into a live shared mapping.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w as *const AtomicU32,
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0,
        );
    }
}

/// The consumer side, run in a child process: waits for `n` commits, prints one latency (ns)
/// per line.
pub fn child(path: &Path, n: u32) -> io::Result<()> {
    let s = Shared::map(path)?;
    let mut lat = Vec::with_capacity(n as usize);
    let mut seen = 0u32;
    while seen < n {
        let v = s.counter().load(Ordering::Acquire);
        if v != seen {
            lat.push(mono_ns().saturating_sub(s.stamp().load(Ordering::Acquire)));
            seen = v;
            continue;
        }
        s.waiters().fetch_add(1, Ordering::SeqCst);
        if s.counter().load(Ordering::SeqCst) == seen {
            futex_wait(s.counter(), seen);
        }
        s.waiters().fetch_sub(1, Ordering::SeqCst);
    }
    let mut out = String::new();
    for l in lat {
        out.push_str(&format!("{l}\n"));
    }
    io::Write::write_all(&mut io::stdout(), out.as_bytes())
}

/// Runs the writer side against a child process; returns sorted latencies in µs.
pub fn measure(dir: &Path, n: u32) -> io::Result<Vec<f64>> {
    let path = dir.join("notify.shm");
    let s = Shared::map(&path)?;
    s.counter().store(0, Ordering::SeqCst);
    let child = std::process::Command::new(std::env::current_exe()?)
        .arg("--wake-child")
        .arg(&path)
        .arg(n.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    // Let the child map the file and go to sleep.
    std::thread::sleep(std::time::Duration::from_millis(50));
    for i in 1..=n {
        // Wait (bounded) for the consumer to be asleep, as an idle consumer would be.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(5);
        while s.waiters().load(Ordering::SeqCst) == 0 && std::time::Instant::now() < until {
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
        s.stamp().store(mono_ns(), Ordering::Release);
        s.counter().store(i, Ordering::SeqCst);
        if s.waiters().load(Ordering::SeqCst) > 0 {
            futex_wake(s.counter());
        }
    }
    let out = child.wait_with_output()?;
    let mut v: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.parse::<u64>().ok())
        .map(|ns| ns as f64 / 1000.0)
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v)
}
