//! Reading the archive back: [`ArchiveReader`] serves stored windows (the replay-by-time
//! capability) from `ampybus.envelopes`.

use super::{connect, parse_url, pg_error, schema};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::topic::TopicPattern;
use crate::transport::{ReplayByTime, StoredMessage, WindowQuery};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use tokio::sync::Mutex;

/// Reads windows of archived messages, in archive order (`archive_seq`: the order the
/// archiver committed them). A message read back has the topic, headers and payload bytes it
/// was archived with; `stored_at` is its store time on the bus, `sequence` its archive
/// sequence.
///
/// ```no_run
/// # async fn f() -> ampybus::Result<()> {
/// use ampybus::archive::ArchiveReader;
/// use ampybus::transport::{ReplayByTime, WindowQuery};
/// let reader = ArchiveReader::connect("postgres://postgres@127.0.0.1/archive").await?;
/// let page = reader.read_window(&WindowQuery::new("ampy.prod.bars.>".parse()?)).await?;
/// println!("{} messages", page.len());
/// # Ok(()) }
/// ```
pub struct ArchiveReader {
    config: tokio_postgres::Config,
    shown: String,
    client: Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for ArchiveReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveReader")
            .field("url", &self.shown)
            .finish()
    }
}

impl ArchiveReader {
    /// Connects and checks that schema `ampybus` exists at a version this build reads.
    pub async fn connect(url: &str) -> Result<ArchiveReader> {
        let config = parse_url(url)?;
        let shown = crate::transport::url::redact(url);
        let client = connect(&config, &shown).await?;
        let row = client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM ampybus.schema_version",
                &[],
            )
            .await
            .map_err(|e| {
                let mut err = pg_error(&format!("reading the archive at {shown}"), e);
                if err.kind() == ErrorKind::Config {
                    err = Error::new(
                        ErrorKind::Config,
                        format!(
                            "{}; is this an archive? (`ampybus archive migrate --to URL` creates one)",
                            err.message()
                        ),
                    );
                }
                err
            })?;
        schema::check_version(row.get(0))?;
        Ok(ArchiveReader {
            config,
            shown,
            client: Mutex::new(Some(client)),
        })
    }

    /// The URL with credentials redacted.
    pub fn url_redacted(&self) -> &str {
        &self.shown
    }

    /// Runs one query, reconnecting once when the connection was lost.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(connect(&self.config, &self.shown).await?);
        }
        let client = guard.as_ref().expect("connected");
        client.query(sql, params).await.map_err(|e| {
            if e.is_closed() {
                *guard = None;
            }
            pg_error(&format!("reading the archive at {}", self.shown), e)
        })
    }

    /// Counts and payload hashes per topic over `[start, end)` of store time: for each topic
    /// the number of messages and the sha256 of their `payload_hash`es in `message_id` order.
    pub async fn digest(
        &self,
        pattern: &TopicPattern,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
    ) -> Result<BTreeMap<String, (u64, String)>> {
        let rows = self
            .query(
                "SELECT topic, count(*)::bigint, encode(sha256(string_agg(payload_hash, ',' ORDER BY message_id COLLATE \"C\")::bytea), 'hex')
                 FROM ampybus.envelopes
                 WHERE topic ~ $1 AND ($2::timestamptz IS NULL OR stored_at >= $2) AND ($3::timestamptz IS NULL OR stored_at < $3)
                 GROUP BY topic",
                &[&pattern_regex(pattern), &start, &end],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let n: i64 = r.get(1);
                (r.get::<_, String>(0), (n as u64, r.get::<_, String>(2)))
            })
            .collect())
    }
}

/// The pattern as a PostgreSQL regular expression over whole topics.
///
/// ```
/// # use ampybus::TopicPattern;
/// # fn re(p: &str) -> String { ampybus::archive::pattern_regex(&TopicPattern::parse(p).unwrap()) }
/// assert_eq!(re("ampy.dev.*.v1.>"), r"^ampy\.dev\.[^.]+\.v1\..+$");
/// assert_eq!(re(">"), r"^.+$");
/// ```
pub fn pattern_regex(p: &TopicPattern) -> String {
    let mut re = String::from("^");
    for (i, tok) in p.as_str().split('.').enumerate() {
        if i > 0 {
            re.push_str(r"\.");
        }
        match tok {
            "*" => re.push_str("[^.]+"),
            ">" => re.push_str(".+"),
            lit => {
                for c in lit.chars() {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                        re.push(c);
                    } else {
                        re.push('\\');
                        re.push(c);
                    }
                }
            }
        }
    }
    re.push('$');
    re
}

#[async_trait]
impl ReplayByTime for ArchiveReader {
    async fn read_window(&self, q: &WindowQuery) -> Result<Vec<StoredMessage>> {
        let after = i64::try_from(q.after_sequence).unwrap_or(i64::MAX);
        let limit = i64::try_from(q.limit.max(1)).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "SELECT archive_seq, stored_at, topic, headers, payload FROM ampybus.envelopes
                 WHERE archive_seq > $1 AND topic ~ $2
                   AND ($3::timestamptz IS NULL OR stored_at >= $3)
                   AND ($4::timestamptz IS NULL OR stored_at < $4)
                   AND ($5::text[] IS NULL OR partition_key = ANY($5))
                 ORDER BY archive_seq LIMIT $6",
                &[
                    &after,
                    &pattern_regex(&q.pattern),
                    &q.start,
                    &q.end,
                    &q.keys,
                    &limit,
                ],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.get(0);
                let headers_text: &str = r.get(3);
                let map: BTreeMap<String, String> =
                    serde_json::from_str(headers_text).map_err(|e| {
                        Error::new(
                            ErrorKind::Envelope,
                            format!("ampybus.envelopes archive_seq {seq}: headers are not a JSON object of strings: {e}"),
                        )
                    })?;
                let headers = Headers::from_wire_pairs(
                    map.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
                );
                let payload: Vec<u8> = r.get(4);
                Ok(StoredMessage {
                    sequence: seq as u64,
                    stored_at: r.get(1),
                    envelope: Envelope {
                        topic: r.get::<_, String>(2).into(),
                        headers,
                        payload: Bytes::from(payload),
                    },
                })
            })
            .collect()
    }
}

/// The archive as a read-only transport: `Bus::connect("postgres://…")` gives a bus whose
/// [`crate::transport::Transport::replay`] reads the archive (so `ampybus sub --since/--until`
/// and `dlq inspect` work on it); publishing and subscribing are refused with an error saying
/// so.
///
/// ```no_run
/// # async fn f() -> ampybus::Result<()> {
/// let bus = ampybus::Bus::connect("postgres://postgres@127.0.0.1/archive").await?;
/// assert!(bus.replay().is_some());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ArchiveTransport {
    reader: ArchiveReader,
}

impl ArchiveTransport {
    /// Connects the reader (see [`ArchiveReader::connect`]).
    pub async fn connect(url: &str) -> Result<ArchiveTransport> {
        Ok(ArchiveTransport {
            reader: ArchiveReader::connect(url).await?,
        })
    }

    fn read_only(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::Config,
            format!(
                "{}: the archive is read-only: {what} needs a bus URL (the archive serves stored windows: `sub --since/--until`, `dlq inspect`)",
                self.reader.shown
            ),
        )
    }
}

#[async_trait]
impl crate::transport::Transport for ArchiveTransport {
    fn name(&self) -> &'static str {
        "archive"
    }

    async fn publish_batch(
        &self,
        _batch: Vec<Envelope>,
    ) -> Result<Vec<crate::transport::PublishReceipt>> {
        Err(self.read_only("publishing"))
    }

    async fn subscribe(
        &self,
        _spec: crate::transport::SubscribeSpec,
    ) -> Result<Box<dyn crate::transport::Subscription>> {
        Err(self.read_only("subscribing"))
    }

    fn replay(&self) -> Option<&dyn ReplayByTime> {
        Some(&self.reader)
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Sequences of messages served from the archive by [`Tiered`] carry this bit (transport
/// sequences stay below it), so paging knows which part a page came from.
const ARCHIVE_BIT: u64 = 1 << 63;

/// Stored windows from a transport with an archive behind it (see
/// [`crate::Bus::with_archive`]): a window starts with the archived messages stored before the
/// first message the transport still holds in it, then goes on with the transport's. Pages
/// from the archive have sequences with the top bit set.
pub struct Tiered {
    transport: std::sync::Arc<dyn crate::transport::Transport>,
    archive: ArchiveReader,
}

impl std::fmt::Debug for Tiered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiered")
            .field("transport", &self.transport.name())
            .field("archive", &self.archive.shown)
            .finish()
    }
}

impl Tiered {
    /// The transport's windows, with `archive` behind them.
    pub fn new(
        transport: std::sync::Arc<dyn crate::transport::Transport>,
        archive: ArchiveReader,
    ) -> Tiered {
        Tiered { transport, archive }
    }
}

#[async_trait]
impl ReplayByTime for Tiered {
    async fn read_window(&self, q: &WindowQuery) -> Result<Vec<StoredMessage>> {
        let live = self.transport.replay();
        let in_archive = q.after_sequence == 0 || q.after_sequence & ARCHIVE_BIT != 0;
        if !in_archive {
            return match live {
                Some(l) => l.read_window(q).await,
                None => Ok(Vec::new()),
            };
        }
        // Where the transport's part of the window begins: its first message in it.
        let boundary = match live {
            None => None,
            Some(l) => {
                let mut first = q.clone();
                first.after_sequence = 0;
                first.limit = 1;
                l.read_window(&first).await?.first().map(|m| m.stored_at)
            }
        };
        let mut aq = q.clone();
        aq.after_sequence = q.after_sequence & !ARCHIVE_BIT;
        if let Some(b) = boundary {
            aq.end = Some(aq.end.map_or(b, |e| e.min(b)));
        }
        let skip = matches!((aq.start, aq.end), (Some(s), Some(e)) if e <= s);
        if !skip {
            let mut page = self.archive.read_window(&aq).await?;
            if !page.is_empty() {
                for m in &mut page {
                    m.sequence |= ARCHIVE_BIT;
                }
                return Ok(page);
            }
        }
        match live {
            Some(l) => {
                let mut lq = q.clone();
                lq.after_sequence = 0;
                l.read_window(&lq).await
            }
            None => Ok(Vec::new()),
        }
    }
}
