//! Small helpers shared by the commands.

use crate::error::{CliError, CliResult, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED};
use ampybus::Bus;
use std::io::Write;
use std::sync::Mutex;

static METRICS_ADDR: Mutex<Option<String>> = Mutex::new(None);
static OPS_SERVER: Mutex<Option<ampybus::ops::ObsServer>> = Mutex::new(None);
/// `--registry` (loaded) and `--service`: applied to every bus [`connect`] makes.
static REGISTRY: Mutex<(Option<ampybus::registry::Registry>, Option<String>)> =
    Mutex::new((None, None));

/// `--tier` of the command: applied to every topic of every bus [`connect`] makes.
static TIER: Mutex<Option<ampybus::tier::Tier>> = Mutex::new(None);

/// Records the command's `--tier` (a registry entry still wins where it has one).
pub fn set_tier(tier: Option<ampybus::tier::Tier>) {
    *TIER.lock().unwrap_or_else(|p| p.into_inner()) = tier;
}

/// `bus` with the command's `--tier` on every topic (`>`), when given.
pub fn apply_tier(bus: Bus) -> Bus {
    match *TIER.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(t) => bus.with_tier(ampybus::TopicPattern::parse(">").expect("valid pattern"), t),
        None => bus,
    }
}

/// `--tier`: `best_effort` (or `best-effort`), `at_least_once`, `at_least_once_dedupe`.
pub fn parse_tier(s: &str) -> Result<ampybus::tier::Tier, String> {
    s.parse()
}

/// Records the registry and service every bus [`connect`] makes is opened with.
pub fn set_registry(reg: Option<ampybus::registry::Registry>, service: Option<String>) {
    *REGISTRY.lock().unwrap_or_else(|p| p.into_inner()) = (reg, service);
}

/// The registry given with `--registry` (or the environment / config file), if any.
pub fn registry() -> Option<ampybus::registry::Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner()).0.clone()
}

/// Records `--metrics-addr`: the first bus [`connect`] makes is served there.
pub fn set_metrics_addr(addr: Option<String>) {
    *METRICS_ADDR.lock().unwrap_or_else(|p| p.into_inner()) = addr;
}

/// Connects, naming `--url` (credentials redacted) in any error; with `--metrics-addr`, the
/// first bus connected is served on /metrics, /health, /stats until the process exits.
pub async fn connect(url: &str) -> CliResult<Bus> {
    let (reg, service) = REGISTRY.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // With a registry, the binding also applies its retention where it creates storage.
    let opened = match reg {
        Some(r) => Bus::connect_with_registry(url, r).await,
        None => Bus::connect(url).await,
    };
    let bus = opened.map_err(|e| {
        let mut err = CliError::bus(format!("--url {:?}", ampybus::bus::redact(url)), &e);
        // The core quotes the URL in some messages; never show credentials.
        if url != ampybus::bus::redact(url) {
            err.message = err.message.replace(url, &ampybus::bus::redact(url));
        }
        err
    })?;
    let bus = apply_tier(match service {
        Some(s) => bus.with_service(&s),
        None => bus,
    });
    let addr = METRICS_ADDR
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(addr) = addr {
        let server = ampybus::ops::serve(&bus, &addr)
            .await
            .map_err(|e| CliError::bus(format!("--metrics-addr {addr}"), &e))?;
        eprintln!(
            "serving http://{}/metrics /health /stats",
            server.local_addr()
        );
        *OPS_SERVER.lock().unwrap_or_else(|p| p.into_inner()) = Some(server);
    }
    Ok(bus)
}

/// Closes the bus, mapping a failure to a transport error.
pub async fn close(bus: &Bus) -> CliResult<()> {
    bus.close()
        .await
        .map_err(|e| CliError::bus("closing the bus", &e))
}

/// [`connect`] for the inspection commands (`topics …`, `dlq inspect`, `sub` without
/// `--durable`): on the embedded log the data directory must exist already, so a mistyped path
/// is a usage error naming it (exit 2) instead of a fresh, empty log. A durable consumer uses
/// [`connect`]: it may start before its producers and create the directory.
pub async fn connect_existing(url: &str) -> CliResult<Bus> {
    use ampybus::bus::{TransportKind, redact, transport_kind, transport_url};
    let shown = redact(url);
    let bus_url = transport_url(url);
    let kind =
        transport_kind(&bus_url).map_err(|e| CliError::bus(format!("--url {shown:?}"), &e))?;
    if kind == TransportKind::Embedded {
        let opts = ampybus::transport::embedded::EmbeddedOptions::from_url(&bus_url)
            .map_err(|e| CliError::bus(format!("--url {shown:?}"), &e))?;
        if !opts.dir.is_dir() {
            return Err(CliError::usage(format!(
                "--url {shown:?}: the data directory {} does not exist or is not a directory (inspection commands never create one; check the path)",
                opts.dir.display()
            )));
        }
    }
    connect(url).await
}

/// Reads the stored window of `q` page by page, handing each page to `page`. `who` names the
/// command in the error for a transport that cannot read stored windows, `reading` the step
/// in a read error.
pub async fn each_stored_page(
    bus: &Bus,
    mut q: ampybus::transport::WindowQuery,
    who: &str,
    reading: &str,
    mut page: impl FnMut(Vec<ampybus::transport::StoredMessage>),
) -> CliResult<()> {
    let replay = bus.replay().ok_or_else(|| {
        CliError::usage(format!(
            "{who}: the transport at {} cannot read stored messages",
            bus.url_redacted()
        ))
    })?;
    loop {
        let got = replay
            .read_page(&q)
            .await
            .map_err(|e| CliError::bus(reading, &e))?;
        if got.messages.is_empty() {
            return Ok(());
        }
        q.cursor = Some(got.next);
        page(got.messages);
    }
}

/// A fresh run id: `run-<UTC time>-<8 random hex digits>`.
pub fn new_run_id() -> String {
    // The tail of a UUIDv7 is random.
    let id = ampybus::ids::new_message_id();
    let rand: String = id
        .chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("run-{}-{rand}", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"))
}

/// Decodes hex (whitespace, `_` and a leading `0x` ignored). The error names the position.
pub fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let mut digits = Vec::with_capacity(t.len());
    for (i, c) in t.char_indices() {
        if c.is_whitespace() || c == '_' {
            continue;
        }
        match c.to_digit(16) {
            Some(d) => digits.push(d as u8),
            None => {
                return Err(format!(
                    "invalid hex digit {c:?} at character {} (expected 0-9, a-f)",
                    t[..i].chars().count() + 1
                ));
            }
        }
    }
    if digits.len() % 2 != 0 {
        return Err(format!(
            "odd number of hex digits ({}); every byte needs two",
            digits.len()
        ));
    }
    Ok(digits.chunks(2).map(|p| (p[0] << 4) | p[1]).collect())
}

/// Lower-case hex of some bytes.
pub fn encode_hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

/// Writes lines to stdout. Lines wait in a buffer and go to `write(2)` in blocks (at
/// [`Out::flush`], or whenever 64 KiB are waiting), straight to the file descriptor (no
/// buffer of the standard library in between), so [`Out::lines_written`] counts exactly the
/// lines whose every byte `write(2)` accepted: a durable reader acks those and no other.
///
/// When the reader went away (EPIPE) the call fails with exit code 3 and the message
/// `stdout closed (broken pipe)`, and [`Out::is_closed`] turns true; the command stops.
/// (Rust ignores SIGPIPE, so the write returns EPIPE instead of killing the process.)
pub struct Out {
    sink: Sink,
    buf: Vec<u8>,
    /// End offset in `buf` of every line waiting.
    ends: Vec<usize>,
    written: u64,
    closed: bool,
}

enum Sink {
    /// A duplicate of file descriptor 1: every `write` is one `write(2)`.
    Fd(std::fs::File),
    /// When fd 1 cannot be duplicated (closed).
    Std(std::io::Stdout),
}

/// Bytes waiting before [`Out::line`] writes them out.
const OUT_BLOCK: usize = 64 * 1024;

impl Out {
    /// Stdout, unbuffered underneath.
    pub fn new() -> Self {
        use std::os::fd::AsFd;
        let sink = match std::io::stdout().as_fd().try_clone_to_owned() {
            Ok(fd) => Sink::Fd(std::fs::File::from(fd)),
            Err(_) => Sink::Std(std::io::stdout()),
        };
        Out {
            sink,
            buf: Vec::with_capacity(OUT_BLOCK),
            ends: Vec::new(),
            written: 0,
            closed: false,
        }
    }

    /// Queues one line (a newline is added). `Ok(true)`, or an error when stdout failed or
    /// was closed (the `bool` stays for callers that used to stop quietly on `false`).
    pub fn line(&mut self, s: &str) -> CliResult<bool> {
        if self.closed {
            return Err(closed_error());
        }
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(b'\n');
        self.ends.push(self.buf.len());
        if self.buf.len() >= OUT_BLOCK {
            self.write_out()?;
        }
        Ok(true)
    }

    /// Writes every queued line. `Ok(true)`, or an error as for [`Out::line`].
    pub fn flush(&mut self) -> CliResult<bool> {
        if self.closed {
            return Err(closed_error());
        }
        self.write_out()?;
        Ok(true)
    }

    /// Lines whose every byte `write(2)` accepted so far.
    pub fn lines_written(&self) -> u64 {
        self.written
    }

    /// Whether the reader went away (EPIPE).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    fn write_out(&mut self) -> CliResult<()> {
        let mut pos = 0;
        let res = loop {
            if pos == self.buf.len() {
                break Ok(());
            }
            let r = match &mut self.sink {
                Sink::Fd(f) => f.write(&self.buf[pos..]),
                Sink::Std(s) => s.write(&self.buf[pos..]).and_then(|n| s.flush().map(|_| n)),
            };
            match r {
                Ok(0) => break Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                Ok(n) => pos += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.written += self.ends.iter().take_while(|&&end| end <= pos).count() as u64;
        self.buf.clear();
        self.ends.clear();
        res.map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                self.closed = true;
                closed_error()
            } else {
                CliError::transport(format!("writing to stdout: {e}"))
            }
        })
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        if !self.closed && !self.buf.is_empty() {
            let _ = self.write_out();
        }
    }
}

fn closed_error() -> CliError {
    CliError::transport("stdout closed (broken pipe)")
}

/// A stop signal the commands handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Int,
    /// SIGTERM.
    Term,
}

impl Signal {
    /// `SIGINT` or `SIGTERM`.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Int => "SIGINT",
            Signal::Term => "SIGTERM",
        }
    }

    /// The exit code of a fixed-size job (`pub`, `sub --max`, `replay`, `dlq redrive`,
    /// `demo`, `bench`) stopped by this signal before it finished: 130 or 143.
    pub fn job_code(self) -> u8 {
        match self {
            Signal::Int => EXIT_INTERRUPTED,
            Signal::Term => EXIT_TERMINATED,
        }
    }

    /// The exit code of an open-ended command (`sub` without `--max`) stopped by this
    /// signal: 130 for SIGINT, 0 for SIGTERM (the normal way to stop a service).
    pub fn open_code(self) -> u8 {
        match self {
            Signal::Int => EXIT_INTERRUPTED,
            Signal::Term => EXIT_OK,
        }
    }
}

/// SIGINT and SIGTERM, caught from [`Signals::new`] on instead of ending the process: a
/// command checks [`Signals::received`] between units of work (takes no new work after a
/// signal, settles what it holds, prints its summary) or awaits [`Signals::recv`]. The first
/// signal is remembered.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    got: Option<Signal>,
}

impl Signals {
    /// Starts catching SIGINT and SIGTERM (inside the async runtime).
    pub fn new() -> CliResult<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let catch = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| CliError::transport(format!("cannot catch {name}: {e}")))
        };
        Ok(Signals {
            int: catch(SignalKind::interrupt(), "SIGINT")?,
            term: catch(SignalKind::terminate(), "SIGTERM")?,
            got: None,
        })
    }

    /// Waits for a stop signal (at once when one arrived before).
    pub async fn recv(&mut self) -> Signal {
        if let Some(s) = self.got {
            return s;
        }
        let (int, term) = (&mut self.int, &mut self.term);
        let s = tokio::select! {
            _ = int.recv() => Signal::Int,
            _ = term.recv() => Signal::Term,
        };
        self.got = Some(s);
        s
    }

    /// The stop signal received so far, without waiting.
    pub fn received(&mut self) -> Option<Signal> {
        use futures::FutureExt;
        self.recv().now_or_never()
    }
}

/// Runs a fixed-size job whose work cannot be split at a signal (`demo`, `bench`): on SIGINT
/// or SIGTERM the job is dropped (its temporary data removed), `{what}: stopped by SIGINT
/// before it finished` is printed on stderr, and the exit code is 130 or 143.
pub async fn job_until_signal(
    what: &str,
    job: impl std::future::Future<Output = CliResult<u8>>,
) -> CliResult<u8> {
    let mut signals = Signals::new()?;
    tokio::select! {
        r = job => r,
        s = signals.recv() => {
            eprintln!("{what}: stopped by {} before it finished", s.name());
            Ok(s.job_code())
        }
    }
}

/// Writes one report line to stdout (what `println!` would), but a stdout that was closed
/// (EPIPE) or fails ends the process at once with exit code 3 instead of a panic. For the
/// reports printed at the end of a command (`demo`, `streams`, `bench*`); message streams
/// use [`Out`], which counts the lines written.
pub fn print_line(args: std::fmt::Arguments<'_>) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = o
        .write_fmt(args)
        .and_then(|_| o.write_all(b"\n"))
        .and_then(|_| o.flush())
    {
        drop(o);
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            eprintln!("error: stdout closed");
        } else {
            eprintln!("error: writing to stdout: {e}");
        }
        std::process::exit(i32::from(crate::error::EXIT_TRANSPORT));
    }
}

/// `println!` through [`print_line`]: exit 3 on a closed stdout, never a panic.
macro_rules! outln {
    () => {
        $crate::util::print_line(format_args!(""))
    };
    ($($t:tt)*) => {
        $crate::util::print_line(format_args!($($t)*))
    };
}
pub(crate) use outln;

/// A clap value parser of a number of seconds (`5`, `0.5`): finite, from 0 to one year.
pub(crate) fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of seconds such as 5 or 0.5 (got {s:?})"))?;
    if !v.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&v) {
        return Err(format!(
            "must be between 0 and one year of seconds (got {s:?})"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        assert_eq!(decode_hex("0x0a ff").unwrap(), vec![0x0a, 0xff]);
        assert_eq!(decode_hex("").unwrap(), Vec::<u8>::new());
        assert_eq!(encode_hex(&[0, 0xab]), "00ab");
        assert!(decode_hex("abc").unwrap_err().contains("odd number"));
        assert!(decode_hex("zz").unwrap_err().contains("'z' at character 1"));
    }

    #[test]
    fn run_ids() {
        let a = new_run_id();
        assert!(a.starts_with("run-") && a.len() == 29, "{a}");
        assert_ne!(a, new_run_id());
    }
}
