//! Small helpers shared by the commands.

use crate::error::{CliError, CliResult};
use ampybus::Bus;
use std::io::Write;
use std::sync::Mutex;

static METRICS_ADDR: Mutex<Option<String>> = Mutex::new(None);
static OPS_SERVER: Mutex<Option<ampybus::obs::ObsServer>> = Mutex::new(None);

/// Records `--metrics-addr`: the first bus [`connect`] makes is served there.
pub fn set_metrics_addr(addr: Option<String>) {
    *METRICS_ADDR.lock().unwrap_or_else(|p| p.into_inner()) = addr;
}

/// Connects, naming `--url` (credentials redacted) in any error; with `--metrics-addr`, the
/// first bus connected is served on /metrics, /health, /stats until the process exits.
pub async fn connect(url: &str) -> CliResult<Bus> {
    let bus = Bus::connect(url).await.map_err(|e| {
        let mut err = CliError::bus(format!("--url {:?}", ampybus::bus::redact(url)), &e);
        // The core quotes the URL in some messages; never show credentials.
        if url != ampybus::bus::redact(url) {
            err.message = err.message.replace(url, &ampybus::bus::redact(url));
        }
        err
    })?;
    let addr = METRICS_ADDR
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(addr) = addr {
        let server = ampybus::obs::serve(&bus, &addr)
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
    use ampybus::bus::{TransportKind, redact, transport_kind};
    let shown = redact(url);
    let kind = transport_kind(url).map_err(|e| CliError::bus(format!("--url {shown:?}"), &e))?;
    if kind == TransportKind::Embedded {
        let opts = ampybus::transport::embedded::EmbeddedOptions::from_url(url)
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

/// Writes to stdout; `Ok(false)` when the reader went away (broken pipe), so the caller stops
/// quietly.
pub struct Out {
    inner: std::io::BufWriter<std::io::Stdout>,
}

impl Out {
    /// Buffered stdout.
    pub fn new() -> Self {
        Out {
            inner: std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout()),
        }
    }

    /// Writes one line.
    pub fn line(&mut self, s: &str) -> CliResult<bool> {
        let r = self
            .inner
            .write_all(s.as_bytes())
            .and_then(|_| self.inner.write_all(b"\n"));
        io_result(r)
    }

    /// Flushes.
    pub fn flush(&mut self) -> CliResult<bool> {
        io_result(self.inner.flush())
    }
}

fn io_result(r: std::io::Result<()>) -> CliResult<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(CliError::transport(format!("writing to stdout: {e}"))),
    }
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
