//! The binding's own publishing connection: NATS's text protocol spoken directly, so a
//! message's headers go from [`Headers`] straight into the `HPUB` frame.
//!
//! async-nats takes headers only as a `HeaderMap` (a SipHash map with a `Vec` and a `String`
//! per header), which costs several times what ampybus itself adds to a publish
//! (docs/benchmarks.md, "What a NATS header map costs"). Publishing is the one place where
//! that cost is per message and avoidable, so it has its own connection; everything else
//! (stream admin, consumers, the KV dedupe store, replay) stays on async-nats.
//!
//! * **Connection.** Plain TCP to the first of the seed servers that answers, `INFO` →
//!   `CONNECT` (headers and no-responders on; user/password, token, NKey seed or credentials
//!   file) → `PING`/`PONG`, then one subscription `_INBOX.{nuid}.*` for PubAcks. Servers that
//!   require TLS, and TLS options, keep publishing on async-nats ([`eligible`]).
//! * **Writing.** Publishers append frames to one buffer (frames of concurrent publishers
//!   coalesce into one `write`). A publisher that then waits — for its PubAck, for the flush
//!   of its core publishes, for room — first tries to write the buffer itself, without
//!   blocking ([`Link::push`]): when the socket takes it all, the frames leave on the
//!   publisher's thread with no task woken. Whatever the socket does not take at once goes to
//!   a writer task, which also starts on its own once a long run of appends passes
//!   [`WRITE_SOON`] bytes (a big batch is written while it is appended). Only one
//!   of them writes at a time (`Out::writing`), so frames keep their order. Past
//!   [`HIGH_WATER`] buffered bytes a publisher waits for the writer, at most the request
//!   timeout (a server that takes nothing for that long ends the link).
//! * **Reading.** A reader task answers `PING`, routes PubAcks (`MSG` on the inbox; a `503`
//!   status is "no responders") to their waiters, and passes a publish permission violation
//!   (`-ERR`) to the binding's `violations` channel.
//! * **Failure.** A read or write error, the server closing, or a PubAck timeout ends the
//!   link: every PubAck still awaited fails as [`AckError::Lost`] (the message may or may not
//!   be stored: the producer's retry with the same `Nats-Msg-Id` is caught by the stream's
//!   duplicate window) and the next publish connects again, trying the seed servers in turn.

use super::NatsOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::fasthash::{FastHash, FastMap};
use crate::headers::Headers;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, broadcast, oneshot, watch};

/// Buffered bytes past which a publisher waits for the writer.
pub(crate) const HIGH_WATER: usize = 4 << 20;
/// The longest protocol line accepted from the server (an `INFO` with many cluster URLs fits).
const MAX_LINE: usize = 1 << 20;

/// A PubAck: where the message was stored.
#[derive(Debug, Clone)]
pub(crate) struct PubAck {
    /// The stream that stored it (shared between acks of one stream).
    pub stream: Arc<str>,
    /// Its sequence in the stream.
    pub sequence: u64,
    /// The stream's duplicate window had the `Nats-Msg-Id` already.
    pub duplicate: bool,
}

/// Why a PubAck did not come.
#[derive(Debug, Clone)]
pub(crate) enum AckError {
    /// No stream captures the subject (status 503, no responders).
    NoStream,
    /// The stream refused the message for good: an expected last id or sequence did not
    /// match, or it is larger than the stream allows. The text is the server's.
    Refused(String),
    /// Another API error (the server's code and text).
    Api(String),
    /// No PubAck within the request timeout.
    TimedOut,
    /// The connection ended before the PubAck came (the reason).
    Lost(String),
}

/// Whether the options let the binding publish on its own connection: not with TLS (the
/// async-nats path does TLS), and not when code turned it off.
pub(crate) fn eligible(opts: &NatsOptions) -> bool {
    opts.own_publisher && !opts.tls && opts.tls_ca.is_none() && opts.tls_cert.is_none()
}

/// Why a connect attempt did not give a link.
pub(crate) enum ConnectFail {
    /// The server requires TLS (or does not take headers): publish through async-nats.
    Unsupported(String),
    /// Any other failure (unreachable, refused auth, timeout).
    Failed(Error),
}

/// The publishing side's connection manager: the live link, connecting again after one ends.
pub(crate) struct Publisher {
    opts: NatsOptions,
    violations: broadcast::Sender<String>,
    link: Mutex<Option<Arc<Link>>>,
    /// Held while connecting, so concurrent publishers make one connection; holds the
    /// outcome of the last failed attempt (its end and the error's kind and text), which
    /// publishers that waited for that attempt are given instead of dialling again.
    connecting: tokio::sync::Mutex<Option<(std::time::Instant, ErrorKind, String)>>,
    /// The seed server to try first next time (the one after the last that failed).
    next_server: AtomicU64,
}

impl Publisher {
    /// Connects the first link; `Err(Unsupported)` when this server needs the async-nats path.
    pub(crate) async fn connect(
        opts: &NatsOptions,
        violations: broadcast::Sender<String>,
    ) -> std::result::Result<Publisher, ConnectFail> {
        let p = Publisher {
            opts: opts.clone(),
            violations,
            link: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(None),
            next_server: AtomicU64::new(0),
        };
        let link = p.dial().await?;
        *p.link.lock().expect("link lock") = Some(link);
        Ok(p)
    }

    /// The live link, connecting again when the last one ended.
    pub(crate) async fn link(&self) -> Result<Arc<Link>> {
        if let Some(l) = self.live() {
            return Ok(l);
        }
        let asked = std::time::Instant::now();
        let mut last_fail = self.connecting.lock().await;
        if let Some(l) = self.live() {
            return Ok(l);
        }
        // An attempt that ended while this one waited for the lock has just answered.
        if let Some((at, kind, text)) = &*last_fail
            && *at >= asked
        {
            return Err(Error::new(*kind, text.clone()));
        }
        match self.dial().await {
            Ok(l) => {
                *last_fail = None;
                *self.link.lock().expect("link lock") = Some(l.clone());
                Ok(l)
            }
            Err(ConnectFail::Failed(e)) => {
                *last_fail = Some((std::time::Instant::now(), e.kind(), e.message().to_owned()));
                Err(e)
            }
            Err(ConnectFail::Unsupported(why)) => Err(Error::new(
                ErrorKind::Transport,
                format!(
                    "nats {}: reconnecting the publishing connection: {why}",
                    self.opts.servers_shown()
                ),
            )),
        }
    }

    fn live(&self) -> Option<Arc<Link>> {
        let g = self.link.lock().expect("link lock");
        g.as_ref().filter(|l| !l.is_dead()).cloned()
    }

    /// Waits until what the live link holds is written out, at most `limit`.
    pub(crate) async fn flush(&self, limit: Duration) -> Result<()> {
        let Some(l) = self.live() else {
            return Ok(());
        };
        match tokio::time::timeout(limit, l.flushed(l.queued())).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "nats {}: flush on close: not written within {limit:?} (the server is unreachable)",
                    self.opts.servers_shown()
                ),
            )),
        }
    }

    /// Tries every seed server once, starting after the last one that failed.
    async fn dial(&self) -> std::result::Result<Arc<Link>, ConnectFail> {
        let servers = &self.opts.servers;
        let first = self.next_server.load(Ordering::Relaxed) as usize;
        let mut last = None;
        for i in 0..servers.len() {
            let at = (first + i) % servers.len();
            match Link::connect(&self.opts, &servers[at], self.violations.clone()).await {
                Ok(l) => return Ok(l),
                Err(ConnectFail::Unsupported(w)) => return Err(ConnectFail::Unsupported(w)),
                Err(ConnectFail::Failed(e)) => {
                    tracing::debug!(server = %servers[at], error = %e, "nats: publishing connection failed");
                    self.next_server
                        .store(((at + 1) % servers.len()) as u64, Ordering::Relaxed);
                    last = Some(e);
                }
            }
        }
        Err(ConnectFail::Failed(last.unwrap_or_else(|| {
            Error::config(format!(
                "nats {}: no server to connect to",
                self.opts.servers_shown()
            ))
        })))
    }
}

impl Drop for Publisher {
    /// Closes the live link (its tasks would otherwise keep the socket open).
    fn drop(&mut self) {
        if let Some(l) = self.link.get_mut().ok().and_then(|l| l.take()) {
            l.end("the transport was dropped", false);
        }
    }
}

/// Buffered bytes past which the writer task starts without waiting for a publisher's push.
const WRITE_SOON: usize = 64 << 10;

/// What publishers and the writer share: the frames not yet written.
struct Out {
    buf: Vec<u8>,
    /// Bytes ever appended (a flush waits until `written` reaches its position).
    queued: u64,
    /// Bytes ever written to the socket.
    written: u64,
    /// A publisher ([`Link::push`]) or the writer task is writing taken bytes now; the other
    /// leaves the buffer alone until it is done.
    writing: bool,
    /// The empty buffer a pushing publisher swaps in (its capacity kept between pushes).
    spare: Vec<u8>,
}

/// One connection to one server.
pub(crate) struct Link {
    out: Mutex<Out>,
    /// Wakes the writer (a stored permit: appends between its looks are not lost).
    wake_writer: Notify,
    /// Wakes publishers waiting for buffer space.
    space: Notify,
    /// Bytes written to the socket so far.
    written: watch::Sender<u64>,
    /// The socket's sending half: the writer task's, and a pushing publisher's.
    wr: tokio::net::tcp::OwnedWriteHalf,
    acks: Mutex<FastMap<u64, oneshot::Sender<std::result::Result<PubAck, AckError>>>>,
    next_ack: AtomicU64,
    /// `_INBOX.{nuid}.`
    inbox: String,
    max_payload: usize,
    dead: AtomicBool,
    why_dead: Mutex<Option<String>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    server: String,
    /// When the link came up, and when bytes last came from the server (ms after `born`).
    born: std::time::Instant,
    heard_ms: AtomicU64,
}

/// Removes a PubAck's waiter from the table when its wait ends (after a PubAck, the entry
/// is gone already: the removal finds nothing).
struct Forget<'a> {
    link: &'a Link,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.link.acks.lock().expect("acks").remove(&self.id);
    }
}

/// A PubAck to await: see [`Link::await_ack`].
pub(crate) struct AckWait {
    rx: oneshot::Receiver<std::result::Result<PubAck, AckError>>,
    id: u64,
}

impl Link {
    async fn connect(
        opts: &NatsOptions,
        server: &str,
        violations: broadcast::Sender<String>,
    ) -> std::result::Result<Arc<Link>, ConnectFail> {
        let failed = |kind: ErrorKind, what: String| {
            ConnectFail::Failed(Error::new(kind, format!("nats {server}: {what}")))
        };
        let timeout = opts.connect_timeout;
        let mut sock = match tokio::time::timeout(timeout, TcpStream::connect(server)).await {
            Err(_) => {
                return Err(failed(
                    ErrorKind::Timeout,
                    format!("no answer within {timeout:?}"),
                ));
            }
            Ok(Err(e)) => return Err(failed(ErrorKind::Transport, format!("cannot connect: {e}"))),
            Ok(Ok(s)) => s,
        };
        let _ = sock.set_nodelay(true);
        let mut rbuf = Vec::with_capacity(64 << 10);
        let hello = tokio::time::timeout(timeout, async {
            let info = read_line(&mut sock, &mut rbuf).await?;
            let Some(json) = info.strip_prefix("INFO ") else {
                return Err(format!("expected INFO, got `{}`", clip(&info)));
            };
            let info: ServerInfo =
                serde_json::from_str(json).map_err(|e| format!("INFO is not valid JSON: {e}"))?;
            Ok(info)
        })
        .await;
        let info = match hello {
            Err(_) => {
                return Err(failed(
                    ErrorKind::Timeout,
                    format!("no INFO within {timeout:?}"),
                ));
            }
            Ok(Err(e)) => return Err(failed(ErrorKind::Transport, e)),
            Ok(Ok(i)) => i,
        };
        if info.tls_required {
            return Err(ConnectFail::Unsupported(
                "the server requires TLS".to_owned(),
            ));
        }
        if info.headers == Some(false) {
            return Err(ConnectFail::Unsupported(
                "the server does not take headers".to_owned(),
            ));
        }
        let connect = connect_json(opts, &info.nonce).map_err(ConnectFail::Failed)?;
        let inbox = format!("_INBOX.{:032x}.", rand::random::<u128>());
        let hello = format!("CONNECT {connect}\r\nPING\r\nSUB {inbox}* 1\r\n");
        if let Err(e) = sock.write_all(hello.as_bytes()).await {
            return Err(failed(ErrorKind::Transport, format!("CONNECT: {e}")));
        }
        // Until the PONG: `+OK` and `INFO` are skipped, `-ERR` is the refusal.
        let answer = tokio::time::timeout(timeout, async {
            loop {
                let line = read_line(&mut sock, &mut rbuf).await?;
                if line == "PONG" {
                    return Ok(());
                }
                if let Some(e) = line.strip_prefix("-ERR") {
                    return Err(e.trim().trim_matches('\'').to_owned());
                }
            }
        })
        .await;
        match answer {
            Err(_) => {
                return Err(failed(
                    ErrorKind::Timeout,
                    format!("no answer to CONNECT within {timeout:?}"),
                ));
            }
            Ok(Err(e)) => {
                let lower = e.to_ascii_lowercase();
                let kind = if lower.contains("authorization") || lower.contains("authentication") {
                    ErrorKind::Config
                } else {
                    ErrorKind::Transport
                };
                return Err(failed(kind, format!("authentication refused: {e}")));
            }
            Ok(Ok(())) => {}
        }
        let (rd, wr) = sock.into_split();
        let link = Arc::new(Link {
            out: Mutex::new(Out {
                buf: Vec::with_capacity(256 << 10),
                queued: 0,
                written: 0,
                writing: false,
                spare: Vec::with_capacity(64 << 10),
            }),
            wake_writer: Notify::new(),
            space: Notify::new(),
            written: watch::channel(0).0,
            wr,
            acks: Mutex::new(FastMap::with_hasher(FastHash::new())),
            next_ack: AtomicU64::new(1),
            inbox,
            max_payload: info.max_payload.unwrap_or(1 << 20) as usize,
            dead: AtomicBool::new(false),
            why_dead: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            server: server.to_owned(),
            born: std::time::Instant::now(),
            heard_ms: AtomicU64::new(0),
        });
        let w = tokio::spawn(write_loop(link.clone()));
        let r = tokio::spawn(read_loop(link.clone(), rd, rbuf, violations));
        link.tasks.lock().expect("tasks").extend([w, r]);
        tracing::debug!(%server, "nats: publishing connection up");
        Ok(link)
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Why the link ended.
    pub(crate) fn why_dead(&self) -> String {
        self.why_dead
            .lock()
            .expect("why")
            .clone()
            .unwrap_or_else(|| "connection closed".to_owned())
    }

    /// Ends the link: every PubAck still awaited fails as lost, waiting publishers and
    /// flushers wake, the tasks stop.
    pub(crate) fn kill(&self, why: &str) {
        self.end(why, true);
    }

    fn end(&self, why: &str, warn: bool) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        if warn {
            tracing::warn!(server = %self.server, reason = %why, "nats: publishing connection ended");
        } else {
            tracing::debug!(server = %self.server, reason = %why, "nats: publishing connection closed");
        }
        *self.why_dead.lock().expect("why") = Some(why.to_owned());
        let waiting: Vec<_> = self.acks.lock().expect("acks").drain().collect();
        for (_, tx) in waiting {
            let _ = tx.send(Err(AckError::Lost(why.to_owned())));
        }
        self.space.notify_waiters();
        self.written.send_modify(|_| {});
        for t in self.tasks.lock().expect("tasks").drain(..) {
            t.abort();
        }
        // The connection closes now, not when the last holder of the link lets it go (the
        // sending half lives in the link).
        let fd = std::os::fd::AsRawFd::as_raw_fd(self.wr.as_ref());
        // SAFETY: `fd` is the socket `self.wr` owns, open for as long as `self` lives;
        // `shutdown` ends the connection without closing the descriptor.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }

    /// Waits while the buffer is past [`HIGH_WATER`]; an error once the link is dead. A
    /// server that takes nothing from the socket for `limit` ends the link (publishers are
    /// told, rather than held until it reads again).
    pub(crate) async fn room(&self, limit: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        self.push();
        loop {
            let wait = self.space.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            if self.is_dead() {
                return Err(self.lost());
            }
            if self.out.lock().expect("out").buf.len() < HIGH_WATER {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, wait).await.is_err() {
                self.kill(&format!("the server took nothing for {limit:?}"));
                return Err(self.lost());
            }
        }
    }

    fn lost(&self) -> Error {
        Error::new(
            ErrorKind::Transport,
            format!(
                "nats {}: publishing connection lost: {}",
                self.server,
                self.why_dead()
            ),
        )
    }

    /// Appends one `HPUB` (with a PubAck inbox when `ack`); returns the PubAck to await and
    /// whether the buffer is now past [`HIGH_WATER`] (then await [`Link::room`]). The frame
    /// is not written yet (unless the buffer passes [`WRITE_SOON`], which starts the
    /// writer): the caller's next wait ([`Link::room`], [`Link::flushed`],
    /// [`Link::await_ack`]) or, at the latest, its [`Link::push`] when it stops publishing
    /// hands the frames to the socket. The
    /// frame is checked before anything is appended: a header that cannot travel is a
    /// `header` error and a frame over `max_payload` a `payload` error, and nothing is sent.
    pub(crate) fn hpub(
        &self,
        subject: &str,
        headers: &Headers,
        payload: &[u8],
        ack: bool,
        scratch: &mut Vec<u8>,
    ) -> Result<(Option<AckWait>, bool)> {
        scratch.clear();
        write_header_block(headers, scratch)?;
        let total = scratch.len() + payload.len();
        if total > self.max_payload {
            return Err(Error::new(
                ErrorKind::Payload,
                format!(
                    "message larger than the server's max_payload: {total} bytes (headers {}, payload {}) > {}",
                    scratch.len(),
                    payload.len(),
                    self.max_payload
                ),
            ));
        }
        let wait = if ack {
            let id = self.next_ack.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.acks.lock().expect("acks").insert(id, tx);
            Some(AckWait { rx, id })
        } else {
            None
        };
        if self.is_dead() {
            if let Some(w) = &wait {
                self.acks.lock().expect("acks").remove(&w.id);
            }
            return Err(self.lost());
        }
        let mut o = self.out.lock().expect("out");
        let before = o.buf.len();
        let b = &mut o.buf;
        b.extend_from_slice(b"HPUB ");
        b.extend_from_slice(subject.as_bytes());
        b.push(b' ');
        if let Some(w) = &wait {
            b.extend_from_slice(self.inbox.as_bytes());
            push_u64(b, w.id);
            b.push(b' ');
        }
        push_u64(b, scratch.len() as u64);
        b.push(b' ');
        push_u64(b, total as u64);
        b.extend_from_slice(b"\r\n");
        b.extend_from_slice(scratch);
        b.extend_from_slice(payload);
        b.extend_from_slice(b"\r\n");
        let added = (b.len() - before) as u64;
        let full = b.len() >= HIGH_WATER;
        // A long run of appends (a big batch) starts the writer on the way, so the socket
        // works while the run goes on.
        let soon = before < WRITE_SOON && b.len() >= WRITE_SOON;
        o.queued += added;
        drop(o);
        if soon {
            self.wake_writer.notify_one();
        }
        Ok((wait, full))
    }

    /// Bytes appended so far (a position for [`Link::flushed`]).
    pub(crate) fn queued(&self) -> u64 {
        self.out.lock().expect("out").queued
    }

    /// Waits until everything appended up to `pos` is written to the socket.
    pub(crate) async fn flushed(&self, pos: u64) -> Result<()> {
        self.push();
        let mut rx = self.written.subscribe();
        loop {
            if *rx.borrow_and_update() >= pos {
                return Ok(());
            }
            if self.is_dead() {
                return Err(self.lost());
            }
            if rx.changed().await.is_err() {
                return Err(self.lost());
            }
        }
    }

    /// Awaits a PubAck, at most `limit`. A PubAck that does not come in time ends the link
    /// when nothing at all came from the server during that time (a server that stopped
    /// answering is not written to again); a server that answers other things keeps it.
    pub(crate) async fn await_ack(
        &self,
        mut w: AckWait,
        limit: Duration,
    ) -> std::result::Result<PubAck, AckError> {
        self.push();
        // Usually the PubAck is there already: no timer for it.
        match w.rx.try_recv() {
            Ok(r) => return r,
            Err(oneshot::error::TryRecvError::Closed) => {
                return Err(AckError::Lost(self.why_dead()));
            }
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        // A wait given up before the PubAck came (the caller stopped on a permission
        // violation, or was dropped) takes its entry out of the table.
        let _forget = Forget {
            link: self,
            id: w.id,
        };
        match tokio::time::timeout(limit, &mut w.rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(AckError::Lost(self.why_dead())),
            Err(_) => {
                let heard = Duration::from_millis(self.heard_ms.load(Ordering::Relaxed));
                if self.born.elapsed().saturating_sub(heard) >= limit {
                    self.kill(&format!("nothing from the server within {limit:?}"));
                }
                Err(AckError::TimedOut)
            }
        }
    }

    /// Hands a PubAck (or its failure) to its waiter.
    fn settle(&self, id: u64, r: std::result::Result<PubAck, AckError>) {
        if let Some(tx) = self.acks.lock().expect("acks").remove(&id) {
            let _ = tx.send(r);
        }
    }

    /// Writes what is buffered on the caller's thread, without blocking, unless a write is
    /// under way already (that writer goes on with what was appended meanwhile). Bytes the
    /// socket does not take at once stay first in the buffer for the writer task, which is
    /// woken for them; a write error ends the link.
    pub(crate) fn push(&self) {
        let mut o = self.out.lock().expect("out");
        if o.writing || o.buf.is_empty() || self.is_dead() {
            return;
        }
        o.writing = true;
        let mut taken = std::mem::take(&mut o.spare);
        std::mem::swap(&mut o.buf, &mut taken);
        drop(o);
        let (n, failed) = match self.wr.try_write(&taken) {
            Ok(n) => (n, None),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => (0, None),
            Err(e) => (0, Some(e)),
        };
        let mut o = self.out.lock().expect("out");
        o.written += n as u64;
        let written = o.written;
        if n < taken.len() {
            // The rest goes before anything appended meanwhile.
            taken.drain(..n);
            taken.extend_from_slice(&o.buf);
            std::mem::swap(&mut o.buf, &mut taken);
        }
        taken.clear();
        o.spare = taken;
        o.writing = false;
        let rest = !o.buf.is_empty();
        drop(o);
        if let Some(e) = failed {
            self.kill(&format!("writing: {e}"));
            return;
        }
        if n > 0 {
            self.wrote(written);
        }
        if rest {
            self.wake_writer.notify_one();
        }
    }

    /// Publishes the written count (never backwards: the two writers may report out of
    /// order) and wakes publishers waiting for room.
    fn wrote(&self, written: u64) {
        self.written.send_if_modified(|w| {
            let later = written > *w;
            if later {
                *w = written;
            }
            later
        });
        self.space.notify_waiters();
    }

    /// Appends a control line (`PONG`).
    fn control(&self, line: &[u8]) {
        let mut o = self.out.lock().expect("out");
        let was_empty = o.buf.is_empty();
        o.buf.extend_from_slice(line);
        o.queued += line.len() as u64;
        drop(o);
        if was_empty {
            self.wake_writer.notify_one();
        }
    }
}

/// `n` in decimal.
fn push_u64(b: &mut Vec<u8>, mut n: u64) {
    let mut d = [0u8; 20];
    let mut i = d.len();
    loop {
        i -= 1;
        d[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    b.extend_from_slice(&d[i..]);
}

/// Checks that a header can travel as a NATS header: a name of printable ASCII without `:` or
/// spaces, a value without CR or LF. The error is a `header` error naming it.
pub(crate) fn check_header(k: &str, v: &str) -> Result<()> {
    if k.is_empty()
        || k.bytes()
            .any(|b| b == b':' || b.is_ascii_whitespace() || b.is_ascii_control() || b > 126)
    {
        return Err(Error::new(
            ErrorKind::Header,
            format!("`{k}`: a NATS header name must be printable ASCII without `:` or spaces"),
        ));
    }
    if memchr::memchr2(b'\r', b'\n', v.as_bytes()).is_some() {
        return Err(Error::new(
            ErrorKind::Header,
            format!("`{k}`: a NATS header value may not contain CR or LF"),
        ));
    }
    Ok(())
}

/// The NATS header block of `h`, `Nats-Msg-Id` = `message_id` added: `NATS/1.0`, one
/// `name: value` line per header, an empty line.
pub(crate) fn write_header_block(h: &Headers, out: &mut Vec<u8>) -> Result<()> {
    out.extend_from_slice(b"NATS/1.0\r\n");
    for (k, v) in h.iter() {
        check_header(k, v)?;
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(id) = h.message_id() {
        out.extend_from_slice(b"Nats-Msg-Id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

/// What the binding reads of the server's `INFO`.
#[derive(serde::Deserialize)]
struct ServerInfo {
    #[serde(default)]
    tls_required: bool,
    #[serde(default)]
    headers: Option<bool>,
    #[serde(default)]
    max_payload: Option<u64>,
    #[serde(default)]
    nonce: Option<String>,
}

/// The `CONNECT` object: credentials from the options, the nonce signed for NKey and JWT
/// authentication.
fn connect_json(opts: &NatsOptions, nonce: &Option<String>) -> Result<String> {
    let mut c = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "tls_required": false,
        "lang": "rust-ampybus",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "echo": true,
        "headers": true,
        "no_responders": true,
    });
    let servers = opts.servers_shown();
    if let Some(n) = &opts.name {
        c["name"] = n.as_str().into();
    }
    if let (Some(u), Some(p)) = (&opts.user, &opts.password) {
        c["user"] = u.as_str().into();
        c["pass"] = p.as_str().into();
    }
    if let Some(t) = &opts.token {
        c["auth_token"] = t.as_str().into();
    }
    let sign = |seed: &str, what: &str| -> Result<(String, String)> {
        use base64::Engine;
        let kp = nkeys::KeyPair::from_seed(seed.trim()).map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("nats {servers}: {what} is not a valid NKey seed"),
                e,
            )
        })?;
        let sig = kp
            .sign(nonce.as_deref().unwrap_or_default().as_bytes())
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Config,
                    format!("nats {servers}: signing the server's nonce with the {what}"),
                    e,
                )
            })?;
        Ok((
            kp.public_key(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig),
        ))
    };
    if let Some(seed) = &opts.nkey_seed {
        let (public, sig) = sign(seed, "nkey seed")?;
        c["nkey"] = public.into();
        c["sig"] = sig.into();
    }
    if let Some(path) = &opts.creds_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!(
                    "nats {servers}: credentials file {} cannot be read",
                    path.display()
                ),
                e,
            )
        })?;
        let (jwt, seed) = parse_creds(&text).ok_or_else(|| {
            Error::config(format!(
                "nats {servers}: credentials file {}: no user JWT and NKey seed blocks",
                path.display()
            ))
        })?;
        let (_, sig) = sign(seed, "credentials file's seed")?;
        c["jwt"] = jwt.into();
        c["sig"] = sig.into();
    }
    Ok(c.to_string())
}

/// The JWT and the seed of a NATS credentials file: the first line inside each of the two
/// `-----BEGIN …-----` blocks.
fn parse_creds(text: &str) -> Option<(&str, &str)> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(l) = lines.next() {
        if l.starts_with("-----BEGIN") {
            let body = lines.by_ref().find(|l| !l.is_empty())?;
            blocks.push(body);
        }
    }
    match blocks.as_slice() {
        [jwt, seed, ..] if !jwt.starts_with("---") && !seed.starts_with("---") => {
            Some((*jwt, *seed))
        }
        _ => None,
    }
}

/// Reads one `\r\n`-terminated line during the handshake (what follows it stays in `buf`).
async fn read_line(sock: &mut TcpStream, buf: &mut Vec<u8>) -> std::result::Result<String, String> {
    loop {
        if let Some(at) = memchr::memmem::find(buf, b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..at]).into_owned();
            buf.drain(..at + 2);
            return Ok(line);
        }
        if buf.len() > MAX_LINE {
            return Err("protocol line too long".to_owned());
        }
        let mut chunk = [0u8; 4096];
        let n = sock
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn clip(s: &str) -> &str {
    let end = s.char_indices().nth(80).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

/// The writer task: hands the buffer to the socket whenever it holds something and no
/// publisher is writing it ([`Link::push`]).
async fn write_loop(link: Arc<Link>) {
    let mut spare: Vec<u8> = Vec::with_capacity(256 << 10);
    loop {
        {
            let mut o = link.out.lock().expect("out");
            if !o.writing {
                std::mem::swap(&mut o.buf, &mut spare);
                o.writing = !spare.is_empty();
            }
        }
        if spare.is_empty() {
            if link.is_dead() {
                return;
            }
            link.wake_writer.notified().await;
            continue;
        }
        let result = write_all(&link.wr, &spare).await;
        let written = {
            let mut o = link.out.lock().expect("out");
            o.writing = false;
            o.written += spare.len() as u64;
            o.written
        };
        if let Err(e) = result {
            link.kill(&format!("writing: {e}"));
            return;
        }
        spare.clear();
        link.wrote(written);
    }
}

/// Writes all of `buf`, waiting for the socket to take more.
async fn write_all(wr: &tokio::net::tcp::OwnedWriteHalf, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        wr.writable().await?;
        match wr.try_write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The reader task: see the module docs.
async fn read_loop(
    link: Arc<Link>,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut buf: Vec<u8>,
    violations: broadcast::Sender<String>,
) {
    let mut last_stream: Arc<str> = Arc::from("");
    let mut at = 0usize;
    loop {
        // Parse every complete frame in buf[at..].
        loop {
            match parse_frame(&buf[at..]) {
                Ok(Some((frame, used))) => {
                    at += used;
                    match frame {
                        Frame::Ping => link.control(b"PONG\r\n"),
                        Frame::Skip => {}
                        Frame::Err(text) => {
                            if let Some(subject) = super::publish_violation_subject(&text) {
                                tracing::warn!(server = %link.server, %subject, "nats: permission denied for publish");
                                let _ = violations.send(subject);
                            } else {
                                tracing::warn!(server = %link.server, error = %text, "nats: server error on the publishing connection");
                            }
                        }
                        Frame::Msg {
                            subject,
                            status,
                            payload,
                        } => {
                            let Some(id) = subject
                                .strip_prefix(link.inbox.as_bytes())
                                .and_then(parse_u64)
                            else {
                                continue;
                            };
                            let r = match status {
                                Some(s) if s.starts_with(b"503") => Err(AckError::NoStream),
                                Some(s) => {
                                    Err(AckError::Api(String::from_utf8_lossy(s).into_owned()))
                                }
                                None => parse_ack(payload, &mut last_stream),
                            };
                            link.settle(id, r);
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    link.kill(&format!("protocol error from the server: {e}"));
                    return;
                }
            }
        }
        if at > 0 {
            buf.drain(..at);
            at = 0;
        }
        if buf.capacity() - buf.len() < 16 << 10 {
            buf.reserve(64 << 10);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => {
                link.kill("the server closed the connection");
                return;
            }
            Ok(_) => link
                .heard_ms
                .store(link.born.elapsed().as_millis() as u64, Ordering::Relaxed),
            Err(e) => {
                link.kill(&format!("reading: {e}"));
                return;
            }
        }
    }
}

/// One frame from the server.
#[derive(Debug, PartialEq)]
enum Frame<'a> {
    Ping,
    /// `PONG`, `+OK`, `INFO`.
    Skip,
    Err(String),
    Msg {
        subject: &'a [u8],
        /// The status line's code and text (`HMSG` with `NATS/1.0 503`).
        status: Option<&'a [u8]>,
        payload: &'a [u8],
    },
}

/// Parses one frame at the start of `b`: the frame and the bytes it takes, `None` when it is
/// not complete yet, an error for anything that is not the protocol.
fn parse_frame(b: &[u8]) -> std::result::Result<Option<(Frame<'_>, usize)>, String> {
    let Some(eol) = memchr::memmem::find(b, b"\r\n") else {
        if b.len() > MAX_LINE {
            return Err("protocol line too long".to_owned());
        }
        return Ok(None);
    };
    let line = &b[..eol];
    let after = eol + 2;
    let verb_end = line.iter().position(|&c| c == b' ').unwrap_or(line.len());
    let verb = &line[..verb_end];
    let text = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
    if verb.eq_ignore_ascii_case(b"PING") {
        return Ok(Some((Frame::Ping, after)));
    }
    if verb.eq_ignore_ascii_case(b"PONG")
        || verb.eq_ignore_ascii_case(b"+OK")
        || verb.eq_ignore_ascii_case(b"INFO")
    {
        return Ok(Some((Frame::Skip, after)));
    }
    if verb.eq_ignore_ascii_case(b"-ERR") {
        let msg = text(&line[verb_end..]);
        let msg = msg.trim().trim_matches('\'').to_owned();
        return Ok(Some((Frame::Err(msg), after)));
    }
    let hmsg = verb.eq_ignore_ascii_case(b"HMSG");
    if !hmsg && !verb.eq_ignore_ascii_case(b"MSG") {
        return Err(format!("unknown operation `{}`", clip(&text(line))));
    }
    // MSG <subject> <sid> [reply] <size> | HMSG <subject> <sid> [reply] <hdr size> <size>
    let args: Vec<&[u8]> = line[verb_end..]
        .split(|&c| c == b' ' || c == b'\t')
        .filter(|a| !a.is_empty())
        .collect();
    let sizes = if hmsg { 2 } else { 1 };
    if args.len() < 2 + sizes || args.len() > 3 + sizes {
        return Err(format!("malformed `{}`", clip(&text(line))));
    }
    let num = |a: &[u8]| {
        parse_u64(a)
            .map(|n| n as usize)
            .ok_or_else(|| format!("bad size in `{}`", clip(&text(line))))
    };
    let total = num(args[args.len() - 1])?;
    let hdr = if hmsg { num(args[args.len() - 2])? } else { 0 };
    if hdr > total || total > 64 << 20 {
        return Err(format!("bad sizes in `{}`", clip(&text(line))));
    }
    if b.len() < after + total + 2 {
        return Ok(None);
    }
    let body = &b[after..after + total];
    let status = if hmsg {
        // `NATS/1.0 503\r\n…`: the status follows the version on the first line.
        let first = body[..hdr]
            .split(|&c| c == b'\r' || c == b'\n')
            .next()
            .unwrap_or_default();
        let rest = first.get(8..).unwrap_or_default();
        let rest = rest.trim_ascii();
        (!rest.is_empty()).then_some(rest)
    } else {
        None
    };
    Ok(Some((
        Frame::Msg {
            subject: args[0],
            status,
            payload: &body[hdr..],
        },
        after + total + 2,
    )))
}

fn parse_u64(a: &[u8]) -> Option<u64> {
    if a.is_empty() || a.len() > 19 {
        return None;
    }
    let mut n = 0u64;
    for &c in a {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + (c - b'0') as u64;
    }
    Some(n)
}

#[derive(serde::Deserialize)]
struct AckJson<'a> {
    #[serde(borrow, default)]
    stream: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(serde::Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u64,
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// A PubAck's JSON: the stored place, or the API error (wrong expected last id or sequence
/// and a message over the stream's size are refusals; anything else an API error).
fn parse_ack(payload: &[u8], last_stream: &mut Arc<str>) -> std::result::Result<PubAck, AckError> {
    let a: AckJson<'_> = serde_json::from_slice(payload).map_err(|e| {
        AckError::Api(format!(
            "PubAck is not valid JSON ({e}): {}",
            clip(&String::from_utf8_lossy(payload))
        ))
    })?;
    if let Some(e) = a.error {
        let text = format!(
            "{} (code {}, err_code {})",
            e.description, e.code, e.err_code
        );
        // 10070 wrong last msg id, 10071 wrong last sequence, 10054 message over the
        // stream's maximum size: the message was not stored and will not be.
        return Err(if matches!(e.err_code, 10070 | 10071 | 10054) {
            AckError::Refused(text)
        } else {
            AckError::Api(text)
        });
    }
    let (Some(stream), Some(sequence)) = (a.stream, a.seq) else {
        return Err(AckError::Api(format!(
            "PubAck without stream or sequence: {}",
            clip(&String::from_utf8_lossy(payload))
        )));
    };
    if **last_stream != *stream {
        *last_stream = Arc::from(stream.as_ref());
    }
    Ok(PubAck {
        stream: last_stream.clone(),
        sequence,
        duplicate: a.duplicate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_whole_or_wait_for_more() {
        let b = b"PING\r\nMSG _INBOX.x.7 1 11\r\n{\"seq\":1}xx\r\n";
        let (f, n) = parse_frame(b).unwrap().unwrap();
        assert_eq!((f, n), (Frame::Ping, 6));
        let (f, n) = parse_frame(&b[6..]).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Msg {
                subject: b"_INBOX.x.7",
                status: None,
                payload: b"{\"seq\":1}xx"
            }
        );
        assert_eq!(n, b.len() - 6);
        for cut in 6..b.len() - 1 {
            assert_eq!(parse_frame(&b[6..cut]).unwrap(), None, "cut at {cut}");
        }
        let h = b"HMSG _INBOX.x.9 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n";
        let (f, n) = parse_frame(h).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Msg {
                subject: b"_INBOX.x.9",
                status: Some(b"503"),
                payload: b""
            }
        );
        assert_eq!(n, h.len());
        let e = b"-ERR 'Permissions Violation for Publish to \"a.b\"'\r\n";
        let (f, _) = parse_frame(e).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Err("Permissions Violation for Publish to \"a.b\"".to_owned())
        );
    }

    #[test]
    fn garbage_from_the_server_is_an_error_not_a_panic() {
        for bad in [
            &b"HELLO\r\n"[..],
            b"MSG a\r\n",
            b"MSG a 1 x\r\n",
            b"HMSG a 1 9 3\r\nabc\r\n",
            b"MSG a 1 2 3 4 5\r\n",
            b"MSG a 1 99999999999999999999\r\n",
        ] {
            assert!(
                parse_frame(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn pub_acks_read_their_place_or_their_refusal() {
        let mut last = Arc::from("");
        let a = parse_ack(br#"{"stream":"AMPY_DEV_BARS","seq":42}"#, &mut last).unwrap();
        assert_eq!(
            (&*a.stream, a.sequence, a.duplicate),
            ("AMPY_DEV_BARS", 42, false)
        );
        let b = parse_ack(
            br#"{"stream":"AMPY_DEV_BARS","seq":43,"duplicate":true}"#,
            &mut last,
        )
        .unwrap();
        assert!(Arc::ptr_eq(&a.stream, &b.stream), "one stream name shared");
        assert!(b.duplicate);
        let e = parse_ack(
            br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 5"}}"#,
            &mut last,
        )
        .unwrap_err();
        assert!(
            matches!(&e, AckError::Refused(t) if t.contains("wrong last sequence: 5")),
            "{e:?}"
        );
        let e = parse_ack(
            br#"{"error":{"code":500,"err_code":10077,"description":"x"}}"#,
            &mut last,
        )
        .unwrap_err();
        assert!(matches!(e, AckError::Api(_)), "{e:?}");
        assert!(matches!(
            parse_ack(b"not json", &mut last),
            Err(AckError::Api(_))
        ));
    }

    #[test]
    fn header_blocks_carry_every_header_and_the_message_id() {
        let mut h = Headers::for_publish("ampy.bars.v1.BarBatch", "md@1", "md", "XNAS.AAPL");
        h.fill_publish_defaults();
        let mut out = Vec::new();
        write_header_block(&h, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("NATS/1.0\r\n") && text.ends_with("\r\n\r\n"));
        let lines: Vec<&str> = text.trim_end().lines().skip(1).collect();
        assert_eq!(lines.len(), h.len() + 1);
        for (k, v) in h.iter() {
            assert!(lines.contains(&format!("{k}: {v}").as_str()), "{k}");
        }
        let id = h.message_id().unwrap();
        assert!(lines.contains(&format!("Nats-Msg-Id: {id}").as_str()));
        let mut out = Vec::new();
        let e = write_header_block(&Headers::new().with("x-desk", "a\r\nPUB x 1"), &mut out)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Header);
        assert!(e.to_string().contains("CR or LF"), "{e}");
    }

    #[test]
    fn credentials_files_give_their_jwt_and_seed() {
        let text = "-----BEGIN NATS USER JWT-----\neyJ0eXAi.abc.def\n------END NATS USER JWT------\n\n************************* IMPORTANT *************************\n\n-----BEGIN USER NKEY SEED-----\nSUAXYZ\n------END USER NKEY SEED------\n";
        assert_eq!(parse_creds(text), Some(("eyJ0eXAi.abc.def", "SUAXYZ")));
        assert_eq!(parse_creds("nothing here"), None);
    }

    /// Random bytes, and valid frames cut and mutated at random: the parser answers with a
    /// frame, "need more" or an error, never a panic, and never takes more than it was given.
    #[test]
    fn the_frame_parser_survives_arbitrary_input() {
        let valid: &[&[u8]] = &[
            b"PING\r\n",
            b"MSG _INBOX.ab.12 1 22\r\n{\"stream\":\"S\",\"seq\":5}\r\n",
            b"HMSG _INBOX.ab.13 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
            b"HMSG a.b 9 r.s 24 27\r\nNATS/1.0\r\nA: b\r\nC: d\r\n\r\nxyz\r\n",
            b"-ERR 'Authorization Violation'\r\n",
            b"INFO {\"max_payload\":1048576}\r\n",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let check = |b: &[u8]| {
            if let Ok(Some((_, used))) = parse_frame(b) {
                assert!(used <= b.len() && used > 0);
            }
        };
        for v in valid {
            let (_, used) = parse_frame(v).unwrap().unwrap();
            assert_eq!(used, v.len(), "{}", String::from_utf8_lossy(v));
        }
        for _ in 0..20_000 {
            let base = valid[(next() % valid.len() as u64) as usize];
            let mut b = base.to_vec();
            for _ in 0..(next() % 4) {
                let at = (next() % b.len() as u64) as usize;
                b[at] = next() as u8;
            }
            let cut = (next() % (b.len() as u64 + 1)) as usize;
            check(&b[..cut]);
            let noise: Vec<u8> = (0..(next() % 64)).map(|_| next() as u8).collect();
            check(&noise);
        }
    }

    #[test]
    fn numbers_print_and_parse() {
        for n in [0u64, 7, 10, 4096, u64::MAX / 10] {
            let mut b = Vec::new();
            push_u64(&mut b, n);
            assert_eq!(b, n.to_string().as_bytes());
            assert_eq!(parse_u64(&b), Some(n));
        }
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"1x"), None);
    }
}
