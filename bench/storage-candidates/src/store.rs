//! The interface every candidate implements.

use std::io;

/// A durable log under test. `append` is one durable commit: when it returns, every row in it
/// is on stable storage (fsync/fdatasync done) and has the next sequence numbers (from 1).
pub trait Store {
    fn append(&mut self, rows: &[&[u8]]) -> io::Result<()>;
    /// Brings the files to their resting state (the engine's checkpoint) and closes them.
    fn close(self: Box<Self>) -> io::Result<()>;
}

/// A candidate: opens a store in a directory and scans one.
pub trait Candidate {
    fn name(&self) -> &'static str;
    /// Opens (creating or recovering) the store in `dir`.
    fn open(&self, dir: &std::path::Path) -> io::Result<Box<dyn Store>>;
    /// Reads every record in sequence order, verifying checksums and sequence continuity.
    /// Returns the number of records and of body bytes read.
    fn scan(&self, dir: &std::path::Path) -> io::Result<(u64, u64)>;
}

pub fn err(what: impl std::fmt::Display) -> io::Error {
    io::Error::other(what.to_string())
}

/// Current time in µs since the epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
