//! The embedded durable log: segment files in a data directory. Nothing to install.
//!
//! * **Storage.** One append-only log per domain (`log/<domain>/<first_seq>.seg`), frames
//!   with a CRC32C each, one global sequence per data directory; the headers are stored in
//!   their compact binary form. Measurements and the reasons for this design:
//!   `docs/embedded-log.md`.
//! * **Durability.** `publish_batch` returns after the batch is written and, with `sync=full`
//!   (the default), `fdatasync`ed, so a returned publish survives a power loss; `sync=normal`
//!   survives a crash or `kill -9` of any process. A torn tail (a commit never acknowledged)
//!   is cut on recovery; damage anywhere else fails the read naming the file and byte offset.
//! * **Group commit.** One writer thread per handle takes every pending append off its queue
//!   and commits them together; several processes take turns through `writer.lock`.
//! * **Several processes** may open the same directory. The committed end of every log is in a
//!   shared page (`state.shm`); a commit wakes waiting consumers in every process through a
//!   futex word in that page (no polling interval).
//! * **Durable consumers** are consumer groups with leased partitions (a partition key hashes
//!   to one of 16 partitions; an instance leases partitions, so per-key order holds across
//!   instances and processes) and an append-only journal of leases, positions and dedupe
//!   records (`groups/<name>/`). A message not acked within the ack deadline is delivered
//!   again; an instance that stops renewing its leases for an ack deadline loses its
//!   partitions to the others, which start at the last acked position.
//! * **Retention** by age and size per domain, checked after the first publish on a handle
//!   and then every minute; deleted messages are below the domain's retention floor, and
//!   whole segments below it are removed.
//! * **Upgrade.** A directory written by an earlier version (`ampybus.sqlite3`, no `FORMAT`)
//!   is refused with an error naming `ampybus migrate --url PATH`.

pub(crate) mod admin;
pub(crate) mod dedupe;
pub(crate) mod format;
pub(crate) mod group;
pub(crate) mod log;
pub(crate) mod migrate;
pub(crate) mod purge;
mod raw;
mod replay;
pub(crate) mod shared;
mod subscription;
mod writer;

pub use dedupe::EmbeddedDedupe;
pub use migrate::{MigrateReport, migrate};
pub use raw::raw_append_loop;

use super::{PublishReceipt, ReplayByTime, SubscribeSpec, Subscription, Transport};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::topic::Domain;
use crate::transport::url::{MAX_RETENTION_DAYS, percent_decode, retention_value};
use async_trait::async_trait;
use shared::Shared;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// The file that marks a data directory of this format (its content names the version).
pub const FORMAT_FILE: &str = "FORMAT";
pub(crate) const FORMAT_TEXT: &str = "ampybus-log 2\n";
/// The SQLite file of the earlier format, which `ampybus migrate` converts.
pub const LEGACY_DB_FILE: &str = "ampybus.sqlite3";

/// How hard a publish commit syncs to disk.
///
/// ```
/// assert_eq!("normal".parse::<ampybus::transport::embedded::SyncLevel>().unwrap(),
///            ampybus::transport::embedded::SyncLevel::Normal);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncLevel {
    /// fsync the WAL on every publish commit: survives power loss (default).
    #[default]
    Full,
    /// No fsync on commit: survives process crashes, not power loss.
    Normal,
}

impl std::str::FromStr for SyncLevel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(SyncLevel::Full),
            "normal" => Ok(SyncLevel::Normal),
            _ => Err(Error::config(format!(
                "url option `sync`: must be `full` or `normal` (got {s:?})"
            ))),
        }
    }
}

/// Retention of one domain. `None` means unlimited.
///
/// ```
/// let r = ampybus::transport::embedded::DomainRetention::days(7);
/// assert_eq!(r.max_age, Some(std::time::Duration::from_secs(7 * 86_400)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainRetention {
    /// Delete messages stored longer ago than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest messages of the domain while it holds more bytes than this.
    pub max_bytes: Option<u64>,
}

impl DomainRetention {
    /// `max_age` of `n` days, no size cap.
    pub fn days(n: u64) -> Self {
        DomainRetention {
            max_age: Some(Duration::from_secs(n.saturating_mul(86_400))),
            max_bytes: None,
        }
    }

    /// Neither an age limit nor a size cap: messages are kept forever.
    ///
    /// ```
    /// use ampybus::transport::embedded::DomainRetention;
    /// assert!(DomainRetention::UNLIMITED.is_unlimited());
    /// assert!(!DomainRetention::days(7).is_unlimited());
    /// ```
    pub const UNLIMITED: DomainRetention = DomainRetention {
        max_age: None,
        max_bytes: None,
    };

    /// True when nothing is ever deleted.
    pub fn is_unlimited(&self) -> bool {
        self.max_age.is_none() && self.max_bytes.is_none()
    }
}

/// `7 days, no size cap`, `no age limit, 512 MiB`, `unlimited` (as `topics describe` and the
/// retention log lines show it).
///
/// ```
/// use ampybus::transport::embedded::DomainRetention;
/// assert_eq!(DomainRetention::days(7).to_string(), "7 days, no size cap");
/// let r = DomainRetention { max_age: None, max_bytes: Some(512 * 1024 * 1024) };
/// assert_eq!(r.to_string(), "no age limit, 512 MiB");
/// assert_eq!(DomainRetention::UNLIMITED.to_string(), "unlimited");
/// ```
impl std::fmt::Display for DomainRetention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_unlimited() {
            return f.write_str("unlimited");
        }
        match self.max_age {
            Some(a) if a.as_secs() % 86_400 == 0 => write!(f, "{} days", a.as_secs() / 86_400)?,
            Some(a) => write!(f, "{:?}", a)?,
            None => f.write_str("no age limit")?,
        }
        match self.max_bytes {
            Some(b) if b % (1024 * 1024) == 0 => write!(f, ", {} MiB", b / (1024 * 1024)),
            Some(b) => write!(f, ", {b} bytes"),
            None => f.write_str(", no size cap"),
        }
    }
}

/// Options of the embedded log. Built from a URL by [`EmbeddedOptions::from_url`] or by hand.
///
/// Defaults: `sync=full`, `poll_ms=2`, retention 7 days for every domain except `orders`,
/// `fills`, `positions` and `dlq` (30 days), no size cap.
///
/// ```
/// let o = ampybus::transport::embedded::EmbeddedOptions::new("/tmp/data");
/// assert_eq!(o.retention_for(ampybus::Domain::Orders).max_age, Some(std::time::Duration::from_secs(30 * 86_400)));
/// ```
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// The data directory (created if missing).
    pub dir: PathBuf,
    /// Publish durability.
    pub sync: SyncLevel,
    /// Accepted for compatibility (`poll_ms`): waiting consumers are woken by every commit
    /// through a futex, not by polling, so this no longer sets any latency.
    pub poll_interval: Duration,
    /// Per-domain retention; domains not listed use `default_retention`.
    pub retention: HashMap<Domain, DomainRetention>,
    /// Retention of domains not in `retention`.
    pub default_retention: DomainRetention,
    /// How often retention runs.
    pub retention_interval: Duration,
    /// How long a writer waits for another process's lock before failing.
    pub busy_timeout: Duration,
}

impl EmbeddedOptions {
    /// Defaults for a data directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let mut retention = HashMap::new();
        for d in [
            Domain::Orders,
            Domain::Fills,
            Domain::Positions,
            Domain::Dlq,
        ] {
            retention.insert(d, DomainRetention::days(30));
        }
        EmbeddedOptions {
            dir: dir.into(),
            sync: SyncLevel::Full,
            poll_interval: Duration::from_millis(2),
            retention,
            default_retention: DomainRetention::days(7),
            retention_interval: Duration::from_secs(60),
            busy_timeout: Duration::from_secs(30),
        }
    }

    /// The retention that applies to `domain`.
    pub fn retention_for(&self, domain: Domain) -> DomainRetention {
        self.retention
            .get(&domain)
            .copied()
            .unwrap_or(self.default_retention)
    }

    /// Applies a topic registry's retention ([`crate::registry::Registry::unit_retentions`]):
    /// the log keeps one retention per domain, so a domain gets the longest age of its envs;
    /// a size cap already set stays. Domains the registry leaves out keep theirs.
    ///
    /// ```
    /// use ampybus::{Domain, Env, transport::{UnitRetention, embedded::EmbeddedOptions}};
    /// use std::time::Duration;
    /// let mut o = EmbeddedOptions::new("/tmp/x");
    /// let mut r = UnitRetention::new();
    /// r.insert((Env::Dev, Domain::Bars), Duration::from_secs(86_400));
    /// r.insert((Env::Prod, Domain::Bars), Duration::from_secs(3 * 86_400));
    /// o.apply_registry_retention(&r);
    /// assert_eq!(o.retention_for(Domain::Bars).max_age, Some(Duration::from_secs(3 * 86_400)));
    /// assert_eq!(o.retention_for(Domain::Orders).max_age, Some(Duration::from_secs(30 * 86_400)));
    /// ```
    pub fn apply_registry_retention(&mut self, retention: &super::UnitRetention) {
        let mut longest: HashMap<Domain, Duration> = HashMap::new();
        for (&(_, domain), &age) in retention {
            let l = longest.entry(domain).or_insert(age);
            *l = (*l).max(age);
        }
        for (domain, age) in longest {
            let mut kept = self.retention_for(domain);
            kept.max_age = Some(age);
            self.retention.insert(domain, kept);
        }
    }

    /// Parses `file:///abs/dir?opt=…`, `file:rel/dir` or a plain path. Options:
    /// `sync=full|normal`, `poll_ms=N`, `retention_days=N` (every domain),
    /// `retention.<domain>.days=N`, `retention.<domain>.max_mb=N`. A retention value is a
    /// whole number ≥ 1 or `unlimited` (keep forever); 0 is refused.
    ///
    /// Refused: `file:///` (the root as data directory) and `file://host/…` (a host).
    ///
    /// ```
    /// use ampybus::transport::embedded::{EmbeddedOptions, SyncLevel};
    /// let o = EmbeddedOptions::from_url("file:///var/lib/ampy?sync=normal&retention.ticks.max_mb=512").unwrap();
    /// assert_eq!(o.dir, std::path::PathBuf::from("/var/lib/ampy"));
    /// assert_eq!(o.sync, SyncLevel::Normal);
    /// assert_eq!(o.retention_for(ampybus::Domain::Ticks).max_bytes, Some(512 * 1024 * 1024));
    /// let o = EmbeddedOptions::from_url("file:///x?retention.bars.days=unlimited").unwrap();
    /// assert_eq!(o.retention_for(ampybus::Domain::Bars).max_age, None);
    /// assert!(EmbeddedOptions::from_url("file:///x?bogus=1").is_err());
    /// assert!(EmbeddedOptions::from_url("file:///x?retention_days=0").unwrap_err().to_string().contains("unlimited"));
    /// assert!(EmbeddedOptions::from_url("file:///").is_err());
    /// assert!(EmbeddedOptions::from_url("file://host/x").is_err());
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let (path, query) = match url.strip_prefix("file://") {
            Some(rest) => {
                let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
                if !path.is_empty() && !path.starts_with('/') {
                    let host = path.split('/').next().unwrap_or(path);
                    return Err(Error::config(format!(
                        "url {url:?}: `file://{host}/…` names a host ({host:?}), which the embedded log does not support; {FILE_URL_FORMS}"
                    )));
                }
                (path, query)
            }
            None => match url.strip_prefix("file:") {
                Some(rest) => rest.split_once('?').unwrap_or((rest, "")),
                None => (url, ""),
            },
        };
        if path.is_empty() {
            return Err(Error::config(format!(
                "url {url:?}: the data directory path is empty; {FILE_URL_FORMS}"
            )));
        }
        let path = percent_decode(path);
        let p = Path::new(&path);
        if p.has_root() && p.parent().is_none() {
            return Err(Error::config(format!(
                "url {url:?}: the data directory would be the filesystem root `/`; {FILE_URL_FORMS}"
            )));
        }
        let mut o = EmbeddedOptions::new(path);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let num = |what: &str| -> Result<u64> {
                v.parse::<u64>().map_err(|_| {
                    Error::config(format!(
                        "url option `{k}`: {what} must be a non-negative integer (got {v:?})"
                    ))
                })
            };
            let retention = |unit: &str, scale: u64, max: u64| -> Result<Option<u64>> {
                retention_value(k, unit, v, scale, max)
                    .map_err(|rule| Error::config(format!("url option `{k}`: {rule}")))
            };
            match k {
                "sync" => o.sync = v.parse()?,
                "poll_ms" => {
                    let ms = num("poll_ms")?;
                    if ms == 0 || ms > 10_000 {
                        return Err(Error::config(format!(
                            "url option `poll_ms`: must be 1..=10000 (got {ms})"
                        )));
                    }
                    o.poll_interval = Duration::from_millis(ms);
                }
                "retention_days" => {
                    let age =
                        retention("days", 86_400, MAX_RETENTION_DAYS)?.map(Duration::from_secs);
                    o.default_retention.max_age = age;
                    for r in o.retention.values_mut() {
                        r.max_age = age;
                    }
                }
                _ if k.starts_with("retention.") => {
                    let mut it = k.split('.');
                    let (_, dom, field, extra) = (
                        it.next(),
                        it.next().unwrap_or(""),
                        it.next().unwrap_or(""),
                        it.next(),
                    );
                    let domain: Domain = dom.parse().map_err(|e: Error| {
                        Error::config(format!("url option `{k}`: {}", e.message()))
                    })?;
                    let mut r = o.retention_for(domain);
                    match (field, extra) {
                        ("days", None) => {
                            r.max_age = retention("days", 86_400, MAX_RETENTION_DAYS)?
                                .map(Duration::from_secs)
                        }
                        ("max_mb", None) => r.max_bytes = retention("MiB", 1024 * 1024, u64::MAX)?,
                        _ => {
                            return Err(Error::config(format!(
                                "url option `{k}`: expected retention.<domain>.days or .max_mb"
                            )));
                        }
                    }
                    o.retention.insert(domain, r);
                }
                _ => {
                    return Err(Error::config(format!(
                        "url option `{k}` is unknown for the embedded log (known: sync, poll_ms, retention_days, retention.<domain>.days, retention.<domain>.max_mb)"
                    )));
                }
            }
        }
        Ok(o)
    }
}

/// The accepted forms of an embedded-log URL, as errors list them.
const FILE_URL_FORMS: &str =
    "accepted forms: /abs/dir, ./rel/dir, file:///abs/dir?options, file:rel/dir?options";

pub(crate) struct Inner {
    pub(crate) opts: EmbeddedOptions,
    pub(crate) dir: PathBuf,
    pub(crate) shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::Sender<writer::Cmd>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Woken on every commit, by this process's writer or (through the futex) any other.
    pub(crate) notify: Arc<Notify>,
    stop: Arc<AtomicBool>,
    /// Consumer-group journals opened by this handle, by group name.
    groups: Mutex<HashMap<String, Arc<Mutex<group::Journal>>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Inner {
    fn send(&self, cmd: writer::Cmd) -> Result<()> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(tx) => tx.send(cmd).map_err(|_| self.closed("is closed")),
            None => Err(self.closed("is closed")),
        }
    }

    /// A `Closed` error naming the data directory.
    pub(crate) fn closed(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::Closed,
            format!("embedded log {} {what}", self.dir.display()),
        )
    }

    /// A failed blocking task (panicked or cancelled), naming the data directory.
    pub(crate) fn task_failed(&self, what: &str, e: tokio::task::JoinError) -> Error {
        let message = format!("embedded log {}: {what} failed: {e}", self.dir.display());
        Error::transport(message, e)
    }

    /// Runs `f` on the writer thread.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut writer::WriterState) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.send(writer::Cmd::Run(Box::new(move |w| {
            let _ = reply.send(f(w));
        })))?;
        rx.await.map_err(|_| self.closed("writer stopped"))?
    }

    /// The journal of group `name` (opened once per handle). `define` is called to create the
    /// group when it does not exist yet.
    pub(crate) fn group(
        &self,
        name: &str,
        define: impl FnOnce() -> Result<group::Meta>,
    ) -> Result<Arc<Mutex<group::Journal>>> {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = groups.get(name) {
            return Ok(j.clone());
        }
        let dir = group::group_dir(&self.dir, name);
        let meta = match group::Meta::read(&dir)? {
            Some(m) => m,
            None => {
                let m = define()?;
                // Two processes may create it at once: the definition is the same or the
                // first one written wins (read back below).
                let _create = shared::FileLock::lock(&self.dir.join("groups.lock"), true)?;
                match group::Meta::read(&dir)? {
                    Some(existing) => existing,
                    None => {
                        m.write(&dir)?;
                        m
                    }
                }
            }
        };
        let j = Arc::new(Mutex::new(group::Journal::open(&dir, meta)?));
        groups.insert(name.to_owned(), j.clone());
        Ok(j)
    }

    /// Drops the cached journal of `name` (after its definition changed on disk).
    pub(crate) fn forget_group(&self, name: &str) {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

/// The embedded log transport. Cheap to clone; every clone shares one writer thread.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::transport::{Transport, embedded::{EmbeddedLog, EmbeddedOptions}};
/// let dir = tempfile::tempdir().unwrap();
/// let log = EmbeddedLog::open(EmbeddedOptions::new(dir.path())).unwrap();
/// assert_eq!(log.name(), "embedded");
/// log.close().await.unwrap();
/// # });
/// ```
#[derive(Clone)]
pub struct EmbeddedLog {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

/// Refuses a directory of the earlier (SQLite) format and marks a new one.
fn check_format(dir: &Path) -> Result<()> {
    let format = dir.join(FORMAT_FILE);
    match std::fs::read_to_string(&format) {
        Ok(s) if s == FORMAT_TEXT => Ok(()),
        Ok(s) => Err(Error::config(format!(
            "data directory {}: unknown format {:?} in {FORMAT_FILE} (this version reads {:?})",
            dir.display(),
            s.trim(),
            FORMAT_TEXT.trim()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if dir.join(LEGACY_DB_FILE).exists() {
                return Err(Error::config(format!(
                    "data directory {} was written by an earlier version of ampybus ({LEGACY_DB_FILE}); convert it in place with `ampybus migrate --url {}`",
                    dir.display(),
                    dir.display()
                )));
            }
            let tmp = dir.join(format!("{FORMAT_FILE}.{}.tmp", std::process::id()));
            std::fs::write(&tmp, FORMAT_TEXT)
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &format))
                .map_err(|e| shared::io_error(&format, "writing the format marker", e))?;
            shared::sync_dir(dir)
        }
        Err(e) => Err(shared::io_error(&format, "reading the format marker", e)),
    }
}

impl EmbeddedLog {
    /// Opens (creating if needed) the log in `opts.dir`, recovering it after a crash or
    /// power loss. Retention first runs after the first publish on this handle (then every
    /// [`EmbeddedOptions::retention_interval`]): a process that only reads never deletes.
    pub fn open(opts: EmbeddedOptions) -> Result<Self> {
        std::fs::create_dir_all(&opts.dir).map_err(|e| {
            Error::config(format!(
                "data directory {}: cannot create: {e}",
                opts.dir.display()
            ))
        })?;
        check_format(&opts.dir)?;
        let dir = opts.dir.clone();
        let shared = Arc::new(Shared::open(&dir, log::recover)?);
        let mut log = log::LogWriter::new(&dir, shared.clone(), opts.sync == SyncLevel::Full)?;
        log.locked(|_, _| Ok(()))?;
        let notify = Arc::new(Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let state = writer::WriterState::new(log, opts.clone());
        let n2 = notify.clone();
        let thread = std::thread::Builder::new()
            .name("ampybus-embedded-writer".into())
            .spawn(move || writer::writer_loop(state, rx, n2))
            .map_err(|e| {
                Error::transport(
                    format!(
                        "embedded log {}: cannot start writer thread: {e}",
                        dir.display()
                    ),
                    e,
                )
            })?;
        {
            let (shared, notify, stop) = (shared.clone(), notify.clone(), stop.clone());
            std::thread::Builder::new()
                .name("ampybus-embedded-watch".into())
                .spawn(move || {
                    let mut seen = shared.counter();
                    while !stop.load(Ordering::Acquire) {
                        shared.wait(seen, Duration::from_millis(100));
                        let now = shared.counter();
                        if now != seen {
                            seen = now;
                            notify.notify_waiters();
                        }
                    }
                })
                .map_err(|e| {
                    Error::transport(
                        format!(
                            "embedded log {}: cannot start watcher thread: {e}",
                            dir.display()
                        ),
                        e,
                    )
                })?;
        }
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                opts,
                dir,
                shared,
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
                notify,
                stop,
                groups: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &EmbeddedOptions {
        &self.inner.opts
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Runs retention now, whether or not this handle has published; returns how many
    /// messages were deleted.
    pub async fn run_retention(&self) -> Result<u64> {
        self.inner.run(|w| w.retention()).await
    }

    /// Messages stored (above every domain's retention floor, purged DLQ entries included),
    /// and the highest sequence.
    pub async fn stats(&self) -> Result<(u64, u64)> {
        let snap = self.inner.shared.snapshot();
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut count = 0u64;
            for d in 0..Domain::ALL.len() {
                let e = snap.domains[d];
                if e.last_seq == 0 {
                    continue;
                }
                log::DomainReader::new(&dir, d, 0).scan(&e, |_| {
                    count += 1;
                    Ok(std::ops::ControlFlow::Continue(()))
                })?;
            }
            Ok((count, snap.next_seq.saturating_sub(1)))
        })
        .await
        .map_err(|e| self.inner.task_failed("stats task", e))?
    }
}

#[async_trait]
impl Transport for EmbeddedLog {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn publish_batch(&self, batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        // Encode on the caller's task, so the writer spends its time writing.
        let mut recs = Vec::with_capacity(batch.len());
        for env in batch {
            recs.push(writer::new_rec(env)?);
        }
        let (reply, rx) = oneshot::channel();
        self.inner.send(writer::Cmd::Append { recs, reply })?;
        let seqs = rx
            .await
            .map_err(|_| self.inner.closed("writer stopped"))??;
        Ok(seqs
            .into_iter()
            .map(|sequence| PublishReceipt {
                sequence,
                duplicate: false,
            })
            .collect())
    }

    /// The writer thread answers and can take the writer lock.
    async fn health(&self) -> Result<()> {
        self.inner.run(|w| w.log.locked(|_, _| Ok(()))).await
    }

    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        subscription::subscribe(self.inner.clone(), spec).await
    }

    fn replay(&self) -> Option<&dyn ReplayByTime> {
        Some(self)
    }

    fn consumer_lag(&self) -> Option<&dyn super::ConsumerLag> {
        Some(self)
    }

    fn inspect(&self) -> Option<&dyn super::Inspect> {
        Some(self)
    }

    fn dedupe_store(&self) -> Option<Arc<dyn crate::transport::dedupe_store::DedupeStore>> {
        Some(Arc::new(EmbeddedDedupe::new(self.inner.clone())))
    }

    async fn close(&self) -> Result<()> {
        let tx = self
            .inner
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(tx);
        self.inner.stop.store(true, Ordering::Release);
        let handle = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(|e| self.inner.task_failed("close", e))?
                .map_err(|_| {
                    Error::new(
                        ErrorKind::Transport,
                        format!(
                            "embedded log {}: writer thread panicked",
                            self.inner.dir.display()
                        ),
                    )
                })?;
        }
        Ok(())
    }
}
