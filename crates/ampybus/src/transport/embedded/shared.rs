//! What the processes sharing a data directory share: the committed end of every domain log in
//! a `MAP_SHARED` page (`state.shm`), the writer lock (`writer.lock`, `flock`), and the
//! wake-up of waiting consumers (a futex word in that page).
//!
//! The page is written only by the holder of the writer lock, under a sequence lock (odd while
//! being written), and read by anyone. It also records the boot it was written under: after a
//! reboot (power loss) its contents may be stale, so the first opener runs recovery.

use crate::error::{Error, ErrorKind, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering, fence};
use std::time::Duration;

const SHM_MAGIC: u64 = u64::from_le_bytes(*b"AMPYSHM1");
const PAGE: usize = 4096;
/// Domains the page has room for.
pub(crate) const MAX_DOMAINS: usize = 16;

/// Byte offsets in the page.
const OFF_MAGIC: usize = 0;
const OFF_FUTEX: usize = 8;
const OFF_WAITERS: usize = 12;
const OFF_BOOT: usize = 16; // 16 bytes
const OFF_SEQLOCK: usize = 32;
const OFF_NEXT_SEQ: usize = 40;
const OFF_LAST_US: usize = 48;
/// Non-zero from a writer's first change to the files of a commit until it publishes it (or
/// until the next writer cleaned up after it): set, the writer died in between.
const OFF_DIRTY: usize = 56;
const OFF_DOMAINS: usize = 64;
const DOMAIN_SLOT: usize = 32;

/// The committed state of one domain log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DomainEnd {
    /// First sequence of the segment being written (its file name); 0 = no segment yet.
    pub seg_first: u64,
    /// Committed length of that segment, in bytes.
    pub end: u64,
    /// Last committed sequence of the domain (0 = none).
    pub last_seq: u64,
    /// Retention floor: messages below this sequence are deleted.
    pub floor: u64,
}

/// A copy of the shared state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub next_seq: u64,
    pub last_us: i64,
    pub domains: [DomainEnd; MAX_DOMAINS],
}

/// The shared page of a data directory.
pub(crate) struct Shared {
    ptr: *mut u8,
    _file: File,
    /// The data directory (to repair a page whose writer died while publishing).
    dir: PathBuf,
    /// Rebuilds the page from the files (the log's recovery, handed in by whoever opens the
    /// page, so that this module needs nothing of the log's).
    recover: Recover,
}

/// The log's recovery: reads the data files and publishes their committed ends in the page.
pub(crate) type Recover = fn(&Path, &Shared) -> Result<Snapshot>;

// SAFETY: the mapping is only accessed through atomics.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, PAGE);
        }
    }
}

pub(crate) fn io_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return Error::new(
            ErrorKind::Transport,
            format!(
                "embedded log {}: disk full while {what}: {e}",
                path.display()
            ),
        );
    }
    Error::new(
        ErrorKind::Transport,
        format!("embedded log {}: {what}: {e}", path.display()),
    )
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), 16 bytes; zeros when unreadable.
fn boot_id() -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let hex: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
        for (i, pair) in hex.chunks(2).take(16).enumerate() {
            let t = std::str::from_utf8(pair).unwrap_or("0");
            out[i] = u8::from_str_radix(t, 16).unwrap_or(0);
        }
    }
    out
}

impl Shared {
    /// Maps `dir/state.shm`, creating it (zeroed) if missing; `recover` rebuilds it from the
    /// files when a writer died while publishing it.
    pub fn open(dir: &Path, recover: Recover) -> Result<Shared> {
        let path = dir.join("state.shm");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_error(&path, "opening the shared state", e))?;
        let len = file
            .metadata()
            .map_err(|e| io_error(&path, "reading the shared state", e))?
            .len();
        if len < PAGE as u64 {
            file.set_len(PAGE as u64)
                .map_err(|e| io_error(&path, "sizing the shared state", e))?;
        }
        // SAFETY: a shared mapping of the first page of a file at least that long; unmapped
        // on drop; accessed only through atomics.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io_error(
                &path,
                "mapping the shared state",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Shared {
            ptr: ptr as *mut u8,
            _file: file,
            dir: dir.to_path_buf(),
            recover,
        })
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= PAGE);
        // SAFETY: aligned offset inside the live page-aligned mapping.
        unsafe { &*(self.ptr.add(off) as *const AtomicU64) }
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= PAGE);
        // SAFETY: aligned offset inside the live page-aligned mapping.
        unsafe { &*(self.ptr.add(off) as *const AtomicU32) }
    }

    fn i64_at(&self, off: usize) -> &AtomicI64 {
        // SAFETY: aligned offset inside the live page-aligned mapping.
        unsafe { &*(self.ptr.add(off) as *const AtomicI64) }
    }

    /// True when the page was written (and recovered) during this boot.
    pub fn is_current(&self) -> bool {
        if self.u64_at(OFF_MAGIC).load(Ordering::Acquire) != SHM_MAGIC {
            return false;
        }
        let b = boot_id();
        let lo = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
        let hi = u64::from_le_bytes(b[8..].try_into().unwrap_or([0; 8]));
        self.u64_at(OFF_BOOT).load(Ordering::Acquire) == lo
            && self.u64_at(OFF_BOOT + 8).load(Ordering::Acquire) == hi
    }

    /// True while the page is being written, or when its writer was killed while writing it
    /// (then it stays so until [`Shared::repair`]).
    pub fn torn(&self) -> bool {
        self.u64_at(OFF_SEQLOCK).load(Ordering::Acquire) & 1 == 1
    }

    /// The next sequence the page held, however stale (after a reboot, a torn page): every
    /// sequence below it was handed out once, so recovery never hands one out again — a
    /// consumer group may have acked it (with `sync=normal` a commit lost to a power cut
    /// may have been read) and would skip a new message under the same number. 0 when the
    /// page was never written.
    pub fn stale_next_seq(&self) -> u64 {
        if self.u64_at(OFF_MAGIC).load(Ordering::Acquire) != SHM_MAGIC {
            return 0;
        }
        self.u64_at(OFF_NEXT_SEQ).load(Ordering::Acquire)
    }

    /// Reads a consistent copy.
    pub fn snapshot(&self) -> Snapshot {
        let lock = self.u64_at(OFF_SEQLOCK);
        let mut spins = 0u32;
        loop {
            let v1 = lock.load(Ordering::Acquire);
            if v1 & 1 == 1 {
                spins += 1;
                if spins < 1 << 16 {
                    std::hint::spin_loop();
                } else {
                    self.repair();
                    spins = 0;
                }
                continue;
            }
            let mut s = Snapshot {
                next_seq: self.u64_at(OFF_NEXT_SEQ).load(Ordering::Relaxed),
                last_us: self.i64_at(OFF_LAST_US).load(Ordering::Relaxed),
                domains: [DomainEnd::default(); MAX_DOMAINS],
            };
            for (d, slot) in s.domains.iter_mut().enumerate() {
                let o = OFF_DOMAINS + d * DOMAIN_SLOT;
                *slot = DomainEnd {
                    seg_first: self.u64_at(o).load(Ordering::Relaxed),
                    end: self.u64_at(o + 8).load(Ordering::Relaxed),
                    last_seq: self.u64_at(o + 16).load(Ordering::Relaxed),
                    floor: self.u64_at(o + 24).load(Ordering::Relaxed),
                };
            }
            fence(Ordering::Acquire);
            if lock.load(Ordering::Relaxed) == v1 {
                return s;
            }
        }
    }

    /// The page has been odd for long: takes the writer lock (which waits for a live writer
    /// to finish its commit); if it is odd still, its writer was killed while publishing, and
    /// the page is rebuilt from the files as after a reboot. When that fails (damage), the
    /// page is marked stale, so every writer runs recovery (and reports the damage).
    fn repair(&self) {
        let path = self.dir.join("writer.lock");
        let _lock = match FileLock::lock(&path, true) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "embedded log: cannot take the writer lock to repair the shared state");
                std::thread::sleep(Duration::from_millis(1));
                return;
            }
        };
        if !self.torn() {
            return;
        }
        tracing::warn!(dir = %self.dir.display(), "embedded log: a writer died while publishing the shared state; recovering it from the files");
        if let Err(e) = (self.recover)(&self.dir, self) {
            tracing::warn!(error = %e, "embedded log: recovering the shared state failed");
            self.u64_at(OFF_MAGIC).store(0, Ordering::Release);
            let lock = self.u64_at(OFF_SEQLOCK);
            lock.store(
                lock.load(Ordering::Relaxed).wrapping_add(1),
                Ordering::Release,
            );
        }
    }

    /// Marks that the writer (holding the writer lock) starts changing files for a commit it
    /// has not published yet.
    pub fn set_dirty(&self, dirty: bool) {
        self.u64_at(OFF_DIRTY)
            .store(u64::from(dirty), Ordering::SeqCst);
    }

    /// True when the last holder of the writer lock changed files for a commit and died
    /// before publishing it (or failed it: then it has cut its writes already).
    pub fn dirty(&self) -> bool {
        self.u64_at(OFF_DIRTY).load(Ordering::SeqCst) != 0
    }

    /// The last committed sequence of the whole directory (cheap: one load).
    pub fn committed_through(&self) -> u64 {
        self.u64_at(OFF_NEXT_SEQ)
            .load(Ordering::Acquire)
            .saturating_sub(1)
    }

    /// Publishes `s` (caller holds the writer lock), marks the page current for this boot and
    /// wakes every waiter.
    pub fn publish(&self, s: &Snapshot) {
        let lock = self.u64_at(OFF_SEQLOCK);
        let v = lock.load(Ordering::Relaxed);
        lock.store(v | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.i64_at(OFF_LAST_US).store(s.last_us, Ordering::Relaxed);
        for (d, slot) in s.domains.iter().enumerate() {
            let o = OFF_DOMAINS + d * DOMAIN_SLOT;
            self.u64_at(o).store(slot.seg_first, Ordering::Relaxed);
            self.u64_at(o + 8).store(slot.end, Ordering::Relaxed);
            self.u64_at(o + 16).store(slot.last_seq, Ordering::Relaxed);
            self.u64_at(o + 24).store(slot.floor, Ordering::Relaxed);
        }
        self.u64_at(OFF_NEXT_SEQ)
            .store(s.next_seq, Ordering::Relaxed);
        self.u64_at(OFF_DIRTY).store(0, Ordering::Relaxed);
        if self.u64_at(OFF_MAGIC).load(Ordering::Relaxed) != SHM_MAGIC || !self.is_current() {
            let b = boot_id();
            self.u64_at(OFF_BOOT).store(
                u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8])),
                Ordering::Relaxed,
            );
            self.u64_at(OFF_BOOT + 8).store(
                u64::from_le_bytes(b[8..].try_into().unwrap_or([0; 8])),
                Ordering::Relaxed,
            );
            self.u64_at(OFF_MAGIC).store(SHM_MAGIC, Ordering::Relaxed);
        }
        lock.store(v.wrapping_add(2) & !1, Ordering::Release);
        self.wake();
    }

    /// Bumps the commit counter and wakes sleeping waiters in every process.
    pub fn wake(&self) {
        let w = self.u32_at(OFF_FUTEX);
        w.fetch_add(1, Ordering::Release);
        if self.u32_at(OFF_WAITERS).load(Ordering::Acquire) > 0 {
            // SAFETY: the word lives in the shared mapping for as long as `self`.
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
    }

    /// The commit counter (changes on every commit by any process).
    pub fn counter(&self) -> u32 {
        self.u32_at(OFF_FUTEX).load(Ordering::Acquire)
    }

    /// Sleeps until the counter differs from `seen` or `timeout` passes (a shared futex: a
    /// commit in any process wakes it).
    pub fn wait(&self, seen: u32, timeout: Duration) {
        let w = self.u32_at(OFF_FUTEX);
        let waiters = self.u32_at(OFF_WAITERS);
        waiters.fetch_add(1, Ordering::AcqRel);
        if w.load(Ordering::Acquire) == seen {
            let ts = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: the word lives in the shared mapping; `ts` outlives the call.
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
        waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An exclusive or shared `flock` on a file, released on drop.
pub(crate) struct FileLock {
    file: File,
}

impl FileLock {
    /// Opens (creating) `path` and locks it; blocks until the lock is free.
    pub fn lock(path: &Path, exclusive: bool) -> Result<FileLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_error(path, "opening the lock file", e))?;
        let l = FileLock { file };
        l.relock(path, exclusive)?;
        Ok(l)
    }

    /// Takes the lock again on the already-open file (after [`FileLock::unlock`]).
    pub fn relock(&self, path: &Path, exclusive: bool) -> Result<()> {
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: a valid open descriptor.
            let r = unsafe { libc::flock(self.file.as_raw_fd(), op) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_error(path, "taking the lock", e));
            }
        }
    }

    /// Releases the lock, keeping the file open for [`FileLock::relock`].
    pub fn unlock(&self) {
        // SAFETY: a valid open descriptor.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// fsyncs a directory (after creating, renaming or removing a file in it).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_error(dir, "syncing the directory", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_snapshot_reads_back_and_is_current() {
        let dir = tempfile::tempdir().unwrap();
        let a = Shared::open(dir.path(), super::super::log::recover).unwrap();
        assert!(!a.is_current());
        let mut s = Snapshot {
            next_seq: 42,
            last_us: 7,
            ..Snapshot::default()
        };
        s.domains[3] = DomainEnd {
            seg_first: 1,
            end: 999,
            last_seq: 41,
            floor: 5,
        };
        let before = a.counter();
        a.publish(&s);
        let b = Shared::open(dir.path(), super::super::log::recover).unwrap();
        assert!(b.is_current());
        assert_eq!(b.snapshot(), s);
        assert_eq!(b.committed_through(), 41);
        assert_eq!(b.counter(), before.wrapping_add(1));
    }

    #[test]
    fn a_waiter_in_another_mapping_is_woken_by_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let a = Shared::open(dir.path(), super::super::log::recover).unwrap();
        let b = std::sync::Arc::new(Shared::open(dir.path(), super::super::log::recover).unwrap());
        let seen = b.counter();
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while b2.counter() == seen {
                b2.wait(seen, Duration::from_secs(10));
            }
            start.elapsed()
        });
        a.publish(&Snapshot::default());
        let waited = t.join().unwrap();
        assert!(
            waited < Duration::from_secs(10),
            "woken only by the timeout"
        );
    }
}
