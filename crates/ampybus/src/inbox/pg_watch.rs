//! The commit lanes' connections, watched for transaction conflicts.
//!
//! A handler runs its statements through the lane's transaction and sees their errors itself:
//! the lane only sees what the handler returns (or that it panicked). To tell a deadlock
//! (SQLSTATE `40P01`) or a serialization failure (`40001`) — which only mean "roll back and
//! try again" — from the handler's own failures, the socket under `tokio-postgres` is read
//! through a parser of the backend protocol's frames (a type byte, a big-endian length that
//! counts itself, the body) that counts the `ErrorResponse`s carrying either code, whichever
//! statement they answer. The count rises before the statement's caller gets its error (the
//! parser sees the bytes before the client decodes them), so a lane that compares the count
//! before and after a transaction knows whether a conflict hit it.

use crate::archive::pg_error;
use crate::error::{Error, ErrorKind, Result};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, Config};

/// The SQLSTATEs after which a transaction is rolled back and tried again.
const CONFLICTS: [&[u8]; 2] = [b"40P01", b"40001"];

/// Whether `e` is a deadlock or a serialization failure.
pub(crate) fn is_conflict(e: &tokio_postgres::Error) -> bool {
    e.code()
        .is_some_and(|c| CONFLICTS.contains(&c.code().as_bytes()))
}

/// Splits the server's byte stream into frames and counts conflict errors.
#[derive(Debug, Default)]
struct Frames {
    /// The frame header being read (type byte and length).
    head: [u8; 5],
    have: usize,
    /// Body bytes of the current frame still to come (`None`: reading a header).
    left: Option<usize>,
    /// The body of an `ErrorResponse` (its first [`KEEP`] bytes).
    body: Vec<u8>,
}

/// How much of an `ErrorResponse` is kept: its code comes third (after the severities).
const KEEP: usize = 512;

impl Frames {
    fn feed(&mut self, mut data: &[u8], conflicts: &AtomicU64) {
        while !data.is_empty() {
            match self.left {
                None => {
                    let take = (5 - self.have).min(data.len());
                    self.head[self.have..self.have + take].copy_from_slice(&data[..take]);
                    self.have += take;
                    data = &data[take..];
                    if self.have == 5 {
                        self.have = 0;
                        let len = u32::from_be_bytes([
                            self.head[1],
                            self.head[2],
                            self.head[3],
                            self.head[4],
                        ]) as usize;
                        self.body.clear();
                        self.left = Some(len.saturating_sub(4));
                        if len <= 4 {
                            self.end(conflicts);
                        }
                    }
                }
                Some(left) => {
                    let take = left.min(data.len());
                    if self.head[0] == b'E' && self.body.len() < KEEP {
                        let keep = take.min(KEEP - self.body.len());
                        self.body.extend_from_slice(&data[..keep]);
                    }
                    data = &data[take..];
                    self.left = Some(left - take);
                    if left == take {
                        self.end(conflicts);
                    }
                }
            }
        }
    }

    /// The end of a frame: an `ErrorResponse` with a conflict code is counted.
    fn end(&mut self, conflicts: &AtomicU64) {
        self.left = None;
        if self.head[0] != b'E' {
            return;
        }
        // Fields: a type byte, a NUL-terminated value; a lone NUL ends them.
        let mut rest = &self.body[..];
        while let Some((&kind, tail)) = rest.split_first() {
            if kind == 0 {
                break;
            }
            let Some(end) = tail.iter().position(|b| *b == 0) else {
                break;
            };
            if kind == b'C' && CONFLICTS.contains(&&tail[..end]) {
                conflicts.fetch_add(1, Ordering::SeqCst);
                break;
            }
            rest = &tail[end + 1..];
        }
    }
}

/// A socket read through [`Frames`].
struct Watched<S> {
    inner: S,
    frames: Frames,
    conflicts: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.frames.feed(&buf.filled()[before..], &this.conflicts);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A connection whose conflict errors are counted in the returned counter. The hosts of
/// `config` are tried in order (TCP with keepalive and `TCP_NODELAY`, or a Unix socket
/// directory), within its connect timeout (5 s when it has none). A configuration that asks
/// for TLS connects as the archive does (this build has no TLS: it fails the same way) and
/// counts nothing.
pub(crate) async fn connect(config: &Config, shown: &str) -> Result<(Client, Arc<AtomicU64>)> {
    let conflicts = Arc::new(AtomicU64::new(0));
    if config.get_ssl_mode() == SslMode::Require {
        return Ok((crate::archive::connect(config, shown).await?, conflicts));
    }
    let limit = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(std::time::Duration::from_secs(5));
    let ports = config.get_ports();
    let addrs = config.get_hostaddrs();
    let mut last: Option<Error> = None;
    for (i, host) in config.get_hosts().iter().enumerate() {
        let port = match ports {
            [] => 5432,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(5432),
        };
        let attempt = async {
            match host {
                Host::Tcp(name) => {
                    let stream = match addrs.get(i) {
                        Some(ip) => tcp((*ip, port)).await?,
                        None => tcp((name.as_str(), port)).await?,
                    };
                    finish(config, shown, stream, &conflicts).await
                }
                Host::Unix(dir) => {
                    let stream =
                        tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
                            .await
                            .map_err(|e| io_error(shown, e))?;
                    finish(config, shown, stream, &conflicts).await
                }
            }
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(client)) => return Ok((client, conflicts)),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(Error::new(
                    ErrorKind::Transport,
                    format!("connecting to {shown}: timed out after {limit:?}"),
                ))
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        Error::new(
            ErrorKind::Config,
            format!("archive URL {shown:?}: names no host"),
        )
    }))
}

fn io_error(shown: &str, e: io::Error) -> Error {
    Error::with_source(
        ErrorKind::Transport,
        format!("connecting to {shown}: {e}"),
        e,
    )
}

/// A TCP connection to the first address of `to` that answers.
async fn tcp(to: impl tokio::net::ToSocketAddrs) -> Result<tokio::net::TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(to)
        .await
        .map_err(|e| Error::with_source(ErrorKind::Transport, e.to_string(), e))?
    {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let connected = async {
            let socket = socket?;
            socket.set_keepalive(true)?;
            let stream = socket.connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok::<_, io::Error>(stream)
        };
        match connected.await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| io::Error::other("the host name has no address"));
    Err(Error::with_source(ErrorKind::Transport, e.to_string(), e))
}

/// The startup over `stream`, watched; the connection task spawned.
async fn finish<S>(
    config: &Config,
    shown: &str,
    stream: S,
    conflicts: &Arc<AtomicU64>,
) -> Result<Client>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watched = Watched {
        inner: stream,
        frames: Frames::default(),
        conflicts: conflicts.clone(),
    };
    let (client, conn) = config
        .connect_raw(watched, tokio_postgres::NoTls)
        .await
        .map_err(|e| pg_error(&format!("connecting to {shown}"), e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "inbox: PostgreSQL lane connection ended");
        }
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    fn error(code: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in [(b'S', "ERROR"), (b'V', "ERROR"), (b'C', code), (b'M', "m")] {
            body.push(k);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        frame(b'E', &body)
    }

    /// Conflict errors are counted however the stream is cut; other errors, and the same
    /// bytes inside other frames, are not.
    #[test]
    fn counts_conflict_errors_across_any_split() {
        let mut stream = Vec::new();
        stream.extend(frame(b'Z', b"I"));
        stream.extend(error("40P01"));
        stream.extend(frame(b'D', b"\0\0C40P01\0"));
        stream.extend(error("23505"));
        stream.extend(frame(b'1', b""));
        stream.extend(error("40001"));
        stream.extend(frame(b'E', &[b'C'; 2000]));
        stream.extend(error("40P01"));
        for cut in 1..stream.len() {
            let n = AtomicU64::new(0);
            let mut f = Frames::default();
            for chunk in stream.chunks(cut) {
                f.feed(chunk, &n);
            }
            assert_eq!(n.load(Ordering::SeqCst), 3, "chunks of {cut}");
        }
    }
}
