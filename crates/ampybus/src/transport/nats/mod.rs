//! The NATS JetStream binding (cargo feature `nats`): `nats://` and `tls://` URLs.
//!
//! * **Wire form.** Subject = topic; the contract headers travel as NATS headers with exactly
//!   their names, plus `Nats-Msg-Id` = `message_id` so the stream's duplicate window catches
//!   producer retries. On consume, `Nats-*` headers are dropped and everything else is handed
//!   to the runtime as is (it normalises liberal forms: lower-snake headers from the seed's
//!   Python package, no `traceparent`, `+00:00` offsets, UUIDv4 ids).
//! * **Streams** ([`streams`]): one per env + domain, `{prefix}_{ENV}_{DOMAIN}` capturing
//!   `ampy.{env}.{domain}.>`, created on first use; an existing stream that already captures
//!   the subjects (the seed's `AMPY` on `ampy.>`, say) is used instead. See
//!   [`streams::compare`] for what is fatal and what is a warning.
//! * **Publish**: pipelined, at most [`NatsOptions::max_in_flight`] unacknowledged, every
//!   PubAck awaited and checked. Frames go out on a connection of the binding's own, which
//!   writes the headers straight into NATS's `HPUB` form (async-nats would build a hashed
//!   header map per message, several times the cost of everything else on the path); TLS
//!   connections, and `own_publisher=false`, publish through async-nats.
//! * **Consume**: durable pull consumers with explicit ack, one per stream the pattern spans,
//!   merged into one subscription; unlimited `MaxDeliver` (the runtime retries and
//!   dead-letters itself). Durable consumers create missing streams; ephemeral readers and
//!   replay only read streams that exist.
//! * **Replay** by store time and keys ([`crate::transport::ReplayByTime`]).
//! * **Dedupe** on a JetStream KV bucket ([`NatsKvDedupeStore`]).
//!
//! # URL
//!
//! `nats://[user:password@|token@]host[:port][,host2[:port]…][?option=value&…]`, or `tls://…`
//! (TLS required). Options:
//!
//! | option | meaning |
//! |---|---|
//! | `tls=true` | require TLS (implied by `tls://`) |
//! | `tls_ca=PATH` | extra root CA (PEM) |
//! | `tls_cert=PATH`, `tls_key=PATH` | client certificate and key (PEM), for mutual TLS |
//! | `user=…`, `password=…` | user and password (also from the userinfo) |
//! | `token=…` | token (also a userinfo without `:`) |
//! | `nkey=SEED` | NKey seed (`SU…`) |
//! | `creds=PATH` | credentials file (JWT + NKey seed) |
//! | `name=…` | connection name shown by the server |
//! | `connect_timeout_ms=N` | initial connect timeout (default 5,000) |
//! | `request_timeout_ms=N` | JetStream API and PubAck timeout (default 5,000) |
//! | `max_in_flight=N` | unacknowledged publishes at most (default 4,096) |
//! | `stream_prefix=NAME` | prefix of the streams this binding creates (default `AMPY`) |
//! | `replicas=N` | replicas of created streams and buckets (default 1) |
//! | `duplicate_window_ms=N` | duplicate window of created streams (default 120,000) |
//! | `max_age_days=N` | max age of created streams, every domain (default 7; 30 for orders, fills, positions, dlq) |
//! | `max_ack_pending=N` | per durable consumer (default 10,000) |
//! | `consumer_inactive_s=N` | durable consumers this binding creates are removed by the server after N s without a puller (default: never; for tests and short-lived tools) |
//! | `update_streams=true` | update an existing stream's max age, duplicate window and replicas to ours (never by default) |
//! | `max_reconnects=N` | give up after N reconnect attempts (default: never) |
//! | `own_publisher=false` | publish through async-nats instead of the binding's own connection (see below) |
//! | `order=across_instances\|per_instance` | several instances of one durable consumer name: one fetches at a time and per-key order holds across them (default), or all fetch and order holds per instance ([`crate::transport::InstanceOrder`]) |
//!
//! **Which option wins**: defaults, then the URL (userinfo, then query options, so
//! `?user=` overrides the userinfo), then whatever code sets on the [`NatsOptions`] returned by
//! [`NatsOptions::from_url`] before [`NatsTransport::connect`] — the builder is applied last.
//!
//! ```
//! use ampybus::transport::nats::NatsOptions;
//! let mut o = NatsOptions::from_url("nats://bob:pw@n1:4222,n2:4223?stream_prefix=T1").unwrap();
//! assert_eq!(o.servers, vec!["n1:4222", "n2:4223"]);
//! assert_eq!(o.stream_prefix, "T1");
//! o.max_in_flight = 128; // code wins over the URL
//! assert_eq!(o.max_in_flight, 128);
//! ```

mod best_effort;
mod consume;
mod inspect;
mod kv_dedupe;
mod lease;
mod publish;
mod replay;
pub mod streams;
mod wire;

pub use kv_dedupe::NatsKvDedupeStore;

use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::transport::url::{UrlReader, host_port, missing_host, percent_decode, query_pairs};
use crate::transport::{PublishReceipt, ReplayByTime, SubscribeSpec, Subscription, Transport};
use async_trait::async_trait;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Options of a NATS connection and of the streams the binding creates.
///
/// ```
/// use ampybus::transport::nats::NatsOptions;
/// let o = NatsOptions::default();
/// assert_eq!(o.servers, vec!["127.0.0.1:4222"]);
/// assert_eq!(o.max_in_flight, 4096);
/// ```
#[derive(Clone)]
pub struct NatsOptions {
    /// `host:port` of every seed server.
    pub servers: Vec<String>,
    /// Require TLS.
    pub tls: bool,
    /// Extra root CA certificate (PEM file).
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM file), for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM file), for mutual TLS.
    pub tls_key: Option<PathBuf>,
    /// User name.
    pub user: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Token.
    pub token: Option<String>,
    /// NKey seed.
    pub nkey_seed: Option<String>,
    /// Credentials file (JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// Connection name.
    pub name: Option<String>,
    /// Initial connect timeout.
    pub connect_timeout: Duration,
    /// JetStream API and PubAck timeout.
    pub request_timeout: Duration,
    /// Unacknowledged publishes at most.
    pub max_in_flight: usize,
    /// Prefix of the streams (and dedupe buckets) this binding creates.
    pub stream_prefix: String,
    /// Replicas of created streams and buckets.
    pub replicas: usize,
    /// Duplicate window of created streams.
    pub duplicate_window: Duration,
    /// Max age of created streams for every domain; `None`: 7 days, 30 for trading domains;
    /// `Some(Duration::ZERO)`: unlimited (URL `max_age_days=unlimited`).
    pub max_age: Option<Duration>,
    /// Max age per env and domain from a topic registry; beats `max_age` for those streams
    /// (set by [`crate::Bus::connect_with_registry`]).
    pub registry_retention: crate::transport::UnitRetention,
    /// Per durable consumer: unacknowledged deliveries at most.
    pub max_ack_pending: i64,
    /// Update an existing stream's max age, duplicate window and replicas to ours.
    pub update_streams: bool,
    /// Durable consumers created by this binding are removed after this long without a
    /// puller (`None`: kept until deleted).
    pub consumer_inactive: Option<Duration>,
    /// Give up after this many reconnect attempts (`None`: never).
    pub max_reconnects: Option<usize>,
    /// What several instances of one durable consumer name promise about per-key order
    /// (URL `order=`): one active instance at a time (default) or shared work.
    pub order: crate::transport::InstanceOrder,
    /// Publish on the binding's own connection (default; not over TLS) rather than through
    /// async-nats (URL `own_publisher=false`).
    pub own_publisher: bool,
}

impl std::fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |o: &Option<String>| o.as_ref().map(|_| "***");
        f.debug_struct("NatsOptions")
            .field("servers", &self.servers)
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("user", &self.user)
            .field("password", &secret(&self.password))
            .field("token", &secret(&self.token))
            .field("nkey_seed", &secret(&self.nkey_seed))
            .field("creds_file", &self.creds_file)
            .field("stream_prefix", &self.stream_prefix)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            servers: vec!["127.0.0.1:4222".to_owned()],
            tls: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            creds_file: None,
            name: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            max_in_flight: 4096,
            stream_prefix: "AMPY".to_owned(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_age: None,
            registry_retention: Default::default(),
            max_ack_pending: 10_000,
            update_streams: false,
            consumer_inactive: None,
            max_reconnects: None,
            order: Default::default(),
            own_publisher: true,
        }
    }
}

impl NatsOptions {
    /// Parses a `nats://` or `tls://` URL (see the module docs for the options). Errors name
    /// the URL (credentials redacted), the option and the rule.
    ///
    /// ```
    /// use ampybus::transport::nats::NatsOptions;
    /// let o = NatsOptions::from_url("tls://s3cret@h:4443?tls_ca=/ca.pem").unwrap();
    /// assert!(o.tls);
    /// assert_eq!(o.token.as_deref(), Some("s3cret"));
    /// let e = NatsOptions::from_url("nats://h?bogus=1").unwrap_err();
    /// assert!(e.to_string().contains("bogus"));
    /// ```
    pub fn from_url(url: &str) -> Result<NatsOptions> {
        let u = UrlReader::new(url);
        let parts = u.split(url, "NATS", &["nats", "tls"])?;
        let scheme = parts.scheme;
        let mut o = NatsOptions {
            tls: scheme == "tls",
            ..NatsOptions::default()
        };
        if !parts.path.is_empty() {
            return Err(u.bad("a NATS URL takes no path"));
        }
        if let Some(ui) = parts.userinfo {
            match ui.split_once(':') {
                Some((user, p)) => {
                    o.user = Some(percent_decode(user));
                    o.password = Some(percent_decode(p));
                }
                None => o.token = Some(percent_decode(ui)),
            }
        }
        if parts.hosts.trim().is_empty() {
            return Err(u.bad(missing_host(scheme, &format!("{scheme}://127.0.0.1:4222"))));
        }
        let mut servers = Vec::new();
        for h in parts.hosts.split(',') {
            let h = h.trim();
            if h.is_empty() {
                return Err(u.bad("empty server in the host list"));
            }
            let (host, port) = host_port(h, 4222).map_err(|p| match p.zero {
                true => u.bad(format!("server `{h}`: port 0 is not valid")),
                false => u.bad(format!(
                    "server `{h}`: port `{}` is not a number 1..=65535",
                    p.written
                )),
            })?;
            if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
                return Err(u.bad(format!("server `{h}`: empty or invalid host")));
            }
            servers.push(format!("{host}:{port}"));
        }
        o.servers = servers;
        for (k, v) in query_pairs(parts.query) {
            match k {
                "tls" => o.tls = u.flag(k, &v)?,
                "tls_ca" => o.tls_ca = Some(u.nonempty(k, &v)?.into()),
                "tls_cert" => o.tls_cert = Some(u.nonempty(k, &v)?.into()),
                "tls_key" => o.tls_key = Some(u.nonempty(k, &v)?.into()),
                "user" => o.user = Some(u.nonempty(k, &v)?),
                "password" | "pass" => o.password = Some(v),
                "token" => o.token = Some(u.nonempty(k, &v)?),
                "nkey" => o.nkey_seed = Some(u.nonempty(k, &v)?),
                "creds" => o.creds_file = Some(u.nonempty(k, &v)?.into()),
                "name" => o.name = Some(u.nonempty(k, &v)?),
                "connect_timeout_ms" => o.connect_timeout = u.millis(k, &v)?,
                "request_timeout_ms" => o.request_timeout = u.millis(k, &v)?,
                "max_in_flight" => o.max_in_flight = u.num_in(k, &v, 1..=1_000_000)? as usize,
                "stream_prefix" => {
                    let p = u.nonempty(k, &v)?;
                    if !p
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        return Err(u.bad(format!(
                            "option `stream_prefix`: {p:?} may hold only letters, digits, `_` and `-`"
                        )));
                    }
                    o.stream_prefix = p;
                }
                "replicas" => o.replicas = u.num_in(k, &v, 1..=5)? as usize,
                "duplicate_window_ms" => {
                    o.duplicate_window = Duration::from_millis(u.num(k, &v)?);
                }
                // JetStream reads a max age of 0 as "no limit".
                "max_age_days" => o.max_age = Some(u.max_age_days(k, &v)?),
                "max_ack_pending" => {
                    o.max_ack_pending = u.positive(k, &v)?.min(i64::MAX as u64) as i64;
                }
                "update_streams" => o.update_streams = u.flag(k, &v)?,
                "consumer_inactive_s" => {
                    o.consumer_inactive = Some(Duration::from_secs(u.positive(k, &v)?));
                }
                "max_reconnects" => o.max_reconnects = Some(u.num(k, &v)? as usize),
                "order" => o.order = u.parsed(&v)?,
                "own_publisher" => o.own_publisher = u.flag(k, &v)?,
                other => {
                    return Err(u.bad(format!(
                        "unknown option `{other}` (known: tls, tls_ca, tls_cert, tls_key, user, password, token, nkey, creds, name, connect_timeout_ms, request_timeout_ms, max_in_flight, stream_prefix, replicas, duplicate_window_ms, max_age_days, max_ack_pending, consumer_inactive_s, update_streams, max_reconnects, order, own_publisher)"
                    )));
                }
            }
        }
        u.tls_pair(&o.tls_cert, &o.tls_key)?;
        Ok(o)
    }

    /// The server list as shown in logs and errors.
    ///
    /// ```
    /// let o = ampybus::transport::nats::NatsOptions::default();
    /// assert_eq!(o.servers_shown(), "127.0.0.1:4222");
    /// ```
    pub fn servers_shown(&self) -> String {
        self.servers.join(",")
    }
}

/// Reconnect delay: 50 ms doubling up to 5 s, with full jitter on top of half of it.
fn reconnect_delay(attempt: usize) -> Duration {
    let base = 50u64.saturating_mul(1u64 << attempt.min(7)).min(5_000);
    let half = base / 2;
    Duration::from_millis(half + rand::random_range(0..=half))
}

pub(crate) struct Shared {
    pub(crate) client: async_nats::Client,
    pub(crate) js: async_nats::jetstream::Context,
    pub(crate) opts: NatsOptions,
    pub(crate) streams: streams::StreamCache,
    pub(crate) violations: tokio::sync::broadcast::Sender<String>,
    /// The binding's own publishing connection (`None`: publish through async-nats).
    pub(crate) wire: Option<wire::Publisher>,
}

impl Shared {
    pub(crate) fn where_(&self) -> String {
        format!("nats {}", self.opts.servers_shown())
    }
}

/// Connects a NATS client with `opts` and checks that the server has JetStream. Shared by the
/// transport and the KV dedupe store.
pub(crate) async fn connect_client(
    opts: &NatsOptions,
    violations: Option<tokio::sync::broadcast::Sender<String>>,
) -> Result<(async_nats::Client, async_nats::jetstream::Context)> {
    let servers = opts.servers_shown();
    let mut co = match &opts.creds_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path.clone())
            .await
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Config,
                    format!(
                        "nats {servers}: credentials file {} cannot be read",
                        path.display()
                    ),
                    e,
                )
            })?,
        None => async_nats::ConnectOptions::new(),
    };
    if let (Some(u), Some(p)) = (&opts.user, &opts.password) {
        co = co.user_and_password(u.clone(), p.clone());
    } else if opts.user.is_some() {
        return Err(Error::config(format!(
            "nats {servers}: option `user` needs a password"
        )));
    }
    if let Some(t) = &opts.token {
        co = co.token(t.clone());
    }
    if let Some(seed) = &opts.nkey_seed {
        co = co.nkey(seed.clone());
    }
    for (what, p) in [
        ("tls_ca", &opts.tls_ca),
        ("tls_cert", &opts.tls_cert),
        ("tls_key", &opts.tls_key),
    ] {
        if let Some(p) = p
            && !p.is_file()
        {
            return Err(Error::config(format!(
                "nats {servers}: option `{what}`: {} is not a readable file",
                p.display()
            )));
        }
    }
    if opts.tls || opts.tls_ca.is_some() || opts.tls_cert.is_some() {
        co = co.require_tls(true);
    }
    if let Some(ca) = &opts.tls_ca {
        co = co.add_root_certificates(ca.clone());
    }
    if let (Some(c), Some(k)) = (&opts.tls_cert, &opts.tls_key) {
        co = co.add_client_certificate(c.clone(), k.clone());
    }
    if let Some(n) = &opts.name {
        co = co.name(n.clone());
    }
    let sv = servers.clone();
    co = co
        .connection_timeout(opts.connect_timeout)
        .request_timeout(Some(opts.request_timeout))
        .max_reconnects(opts.max_reconnects)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |ev| {
            let violations = violations.clone();
            let sv = sv.clone();
            async move {
                match &ev {
                    async_nats::Event::ServerError(async_nats::ServerError::Other(text)) => {
                        if let Some(subject) = publish_violation_subject(text) {
                            tracing::warn!(servers = %sv, %subject, "nats: permission denied for publish");
                            if let Some(tx) = &violations {
                                let _ = tx.send(subject);
                            }
                        } else {
                            tracing::warn!(servers = %sv, error = %text, "nats: server error");
                        }
                    }
                    async_nats::Event::Connected => {
                        tracing::info!(servers = %sv, "nats: connected")
                    }
                    async_nats::Event::Closed => {
                        tracing::debug!(servers = %sv, "nats: connection closed")
                    }
                    other => tracing::warn!(servers = %sv, event = %other, "nats: connection event"),
                }
            }
        });
    let addrs: Vec<async_nats::ServerAddr> = opts
        .servers
        .iter()
        .map(|s| {
            let scheme = if opts.tls { "tls" } else { "nats" };
            format!("{scheme}://{s}")
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| {
                    Error::with_source(
                        ErrorKind::Config,
                        format!("nats: server address `{s}` is not valid"),
                        e,
                    )
                })
        })
        .collect::<Result<_>>()?;
    // The client's own timeout covers each attempt; this one bounds the whole call (several
    // servers, TLS handshakes), so a connect never hangs.
    let overall = opts.connect_timeout * (opts.servers.len() as u32 + 1);
    let client = match tokio::time::timeout(overall, co.connect(addrs)).await {
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "nats {servers}: no connection within {overall:?} (is a NATS server listening there?)"
                ),
            ));
        }
        Ok(Err(e)) => return Err(connect_error(&servers, opts, e)),
        Ok(Ok(c)) => c,
    };
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(opts.request_timeout)
        .max_ack_inflight(opts.max_in_flight.saturating_mul(2).max(64))
        .backpressure_on_inflight(true)
        .build(client.clone());
    // The account info request, read as plain JSON (the shape differs between server
    // versions): "no responders" or an error body means no JetStream for this account.
    let no_js = |detail: String| {
        Error::new(
            ErrorKind::Config,
            format!(
                "nats {servers}: JetStream is not enabled on the server or for this account (start nats-server with -js, or enable jetstream for the account): {detail}"
            ),
        )
    };
    match tokio::time::timeout(
        opts.request_timeout + Duration::from_secs(1),
        client.request("$JS.API.INFO", bytes::Bytes::new()),
    )
    .await
    {
        Ok(Ok(reply)) => {
            let v: serde_json::Value =
                serde_json::from_slice(&reply.payload).unwrap_or(serde_json::Value::Null);
            if let Some(err) = v.get("error") {
                return Err(no_js(err.to_string()));
            }
        }
        Ok(Err(e)) => {
            if matches!(e.kind(), async_nats::RequestErrorKind::NoResponders) {
                return Err(no_js("no responders on $JS.API.INFO".to_owned()));
            }
            let kind = if matches!(e.kind(), async_nats::RequestErrorKind::TimedOut) {
                ErrorKind::Timeout
            } else {
                ErrorKind::Transport
            };
            return Err(Error::with_source(
                kind,
                format!(
                    "nats {servers}: JetStream account info request failed: {e} (is JetStream enabled? start nats-server with -js)"
                ),
                e,
            ));
        }
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "nats {servers}: JetStream did not answer within {:?} (is JetStream enabled? start nats-server with -js)",
                    opts.request_timeout
                ),
            ));
        }
    }
    Ok((client, js))
}

fn connect_error(servers: &str, opts: &NatsOptions, e: async_nats::ConnectError) -> Error {
    use async_nats::ConnectErrorKind as K;
    let text = e.to_string();
    let (kind, what) = match e.kind() {
        K::TimedOut => (
            ErrorKind::Timeout,
            format!("no answer within {:?}", opts.connect_timeout),
        ),
        K::Tls => (
            ErrorKind::Transport,
            format!("TLS handshake failed: {text}"),
        ),
        K::Authentication | K::AuthorizationViolation => {
            (ErrorKind::Config, format!("authentication refused: {text}"))
        }
        K::Dns => (
            ErrorKind::Config,
            format!("server name not resolved: {text}"),
        ),
        K::Io
            if ["certificate", "tls", "alert", "handshake"]
                .iter()
                .any(|w| text.to_ascii_lowercase().contains(w)) =>
        {
            (ErrorKind::Transport, format!("TLS failed: {text}"))
        }
        K::Io => (ErrorKind::Transport, format!("cannot connect: {text}")),
        _ => (ErrorKind::Transport, format!("connect failed: {text}")),
    };
    let lower = text.to_ascii_lowercase();
    let tls_hint = if !opts.tls && lower.contains("tls") {
        " (the server requires TLS: use tls:// or ?tls=true)"
    } else if opts.tls && !matches!(e.kind(), K::Tls) && opts.tls_cert.is_none() {
        " (over TLS: does the server require a client certificate? set tls_cert and tls_key)"
    } else {
        ""
    };
    Error::with_source(kind, format!("nats {servers}: {what}{tls_hint}"), e)
}

/// `Permissions Violation for Publish to "subj"` → `subj`.
fn publish_violation_subject(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let at = lower.find("permissions violation for publish to")?;
    let rest = &text[at + "permissions violation for publish to".len()..];
    let rest = rest.trim().trim_start_matches(['"', '\'']);
    let end = rest.find(['"', '\'', ' ']).unwrap_or(rest.len());
    Some(rest[..end].to_owned())
}

/// The JetStream transport. Cheap to share (`Arc` inside).
///
/// ```no_run
/// # async fn demo() -> ampybus::Result<()> {
/// use ampybus::transport::nats::{NatsOptions, NatsTransport};
/// let mut opts = NatsOptions::from_url("nats://127.0.0.1:4222")?;
/// opts.stream_prefix = "TEST".into();
/// let t = NatsTransport::connect(opts).await?;
/// let bus = ampybus::Bus::with_transport(std::sync::Arc::new(t), "nats://127.0.0.1:4222");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("servers", &self.shared.opts.servers)
            .finish()
    }
}

impl NatsTransport {
    /// Connects (several servers, reconnect with backoff, auth, TLS) and checks JetStream.
    /// Unreachable servers, refused auth, TLS failures and a server without JetStream each
    /// fail fast with an error that says which.
    ///
    /// ```no_run
    /// # async fn demo() -> ampybus::Result<()> {
    /// use ampybus::transport::nats::{NatsOptions, NatsTransport};
    /// let opts = NatsOptions { servers: vec!["n1:4222".into(), "n2:4222".into()], ..Default::default() };
    /// let t = NatsTransport::connect(opts).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(opts: NatsOptions) -> Result<NatsTransport> {
        let (tx, _) = tokio::sync::broadcast::channel(256);
        let (client, js) = connect_client(&opts, Some(tx.clone())).await?;
        let wire = if wire::eligible(&opts) {
            match wire::Publisher::connect(&opts, tx.clone()).await {
                Ok(p) => Some(p),
                Err(wire::ConnectFail::Unsupported(why)) => {
                    tracing::info!(servers = %opts.servers_shown(), %why, "nats: publishing through async-nats");
                    None
                }
                Err(wire::ConnectFail::Failed(e)) => return Err(e),
            }
        } else {
            None
        };
        Ok(NatsTransport {
            shared: Arc::new(Shared {
                client,
                js,
                opts,
                streams: streams::StreamCache::default(),
                violations: tx,
                wire,
            }),
        })
    }

    /// [`NatsOptions::from_url`] then [`NatsTransport::connect`].
    ///
    /// ```no_run
    /// # async fn demo() -> ampybus::Result<()> {
    /// let t = ampybus::transport::nats::NatsTransport::connect_url("nats://127.0.0.1:4222").await?;
    /// assert_eq!(ampybus::transport::Transport::name(&t), "nats");
    /// # Ok(()) }
    /// ```
    pub async fn connect_url(url: &str) -> Result<NatsTransport> {
        NatsTransport::connect(NatsOptions::from_url(url)?).await
    }

    /// The options in force.
    ///
    /// ```no_run
    /// # async fn demo(t: ampybus::transport::nats::NatsTransport) {
    /// println!("streams are prefixed {}", t.options().stream_prefix);
    /// # }
    /// ```
    pub fn options(&self) -> &NatsOptions {
        &self.shared.opts
    }

    /// The underlying JetStream context (for admin tools and benchmarks).
    ///
    /// ```no_run
    /// # async fn demo(t: ampybus::transport::nats::NatsTransport) -> ampybus::Result<()> {
    /// let streams = ampybus::transport::nats::streams::list(t.jetstream()).await?;
    /// # Ok(()) }
    /// ```
    pub fn jetstream(&self) -> &async_nats::jetstream::Context {
        &self.shared.js
    }

    /// The underlying client.
    ///
    /// ```no_run
    /// # async fn demo(t: ampybus::transport::nats::NatsTransport) {
    /// println!("{:?}", t.client().connection_state());
    /// # }
    /// ```
    pub fn client(&self) -> &async_nats::Client {
        &self.shared.client
    }

    /// Finds or creates the stream that holds `topic`'s env + domain; returns its name.
    ///
    /// ```no_run
    /// # async fn demo(t: ampybus::transport::nats::NatsTransport) -> ampybus::Result<()> {
    /// let topic = ampybus::Topic::parse("ampy.dev.bars.v1.XNAS.AAPL")?;
    /// assert_eq!(t.ensure_stream_for(&topic).await?, "AMPY_DEV_BARS");
    /// # Ok(()) }
    /// ```
    pub async fn ensure_stream_for(&self, topic: &crate::Topic) -> Result<String> {
        Ok(streams::resolve(&self.shared, topic.env(), topic.domain())
            .await?
            .name
            .clone())
    }

    /// A KV dedupe store on this connection (bucket `{prefix}_dedupe`, default window).
    ///
    /// ```no_run
    /// # async fn demo(t: ampybus::transport::nats::NatsTransport) {
    /// let store = t.kv_dedupe_store().with_window(std::time::Duration::from_secs(86_400));
    /// # }
    /// ```
    pub fn kv_dedupe_store(&self) -> NatsKvDedupeStore {
        NatsKvDedupeStore::from_context(
            self.shared.js.clone(),
            &self.shared.opts,
            crate::transport::dedupe_store::DEFAULT_WINDOW,
        )
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn publish_batch(&self, batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>> {
        publish::publish_outcomes(&self.shared, batch, false)
            .await
            .into_result()
    }

    /// Per-message JetStream PubAcks: see [`Transport::publish_batch_outcomes`].
    async fn publish_batch_outcomes(&self, batch: Vec<Envelope>) -> crate::transport::BatchOutcome {
        publish::publish_outcomes(&self.shared, batch, true).await
    }

    /// Core publish, no PubAck: see `best_effort.rs`.
    async fn publish_best_effort(&self, batch: Vec<Envelope>) -> crate::transport::BatchOutcome {
        publish::publish_core(&self.shared, batch).await
    }

    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        if spec.tier == Some(crate::registry::Tier::BestEffort) {
            return best_effort::subscribe(&self.shared, spec).await;
        }
        consume::subscribe(&self.shared, spec).await
    }

    fn replay(&self) -> Option<&dyn ReplayByTime> {
        Some(self)
    }

    fn dedupe_store(&self) -> Option<Arc<dyn crate::transport::dedupe_store::DedupeStore>> {
        Some(Arc::new(self.kv_dedupe_store()))
    }

    fn consumer_lag(&self) -> Option<&dyn crate::transport::ConsumerLag> {
        Some(self)
    }

    fn inspect(&self) -> Option<&dyn crate::transport::Inspect> {
        Some(self)
    }

    /// The client's connection state: healthy only while connected to a server.
    async fn health(&self) -> Result<()> {
        match self.shared.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            other => Err(Error::new(
                ErrorKind::Transport,
                format!("{}: not connected ({other})", self.shared.where_()),
            )),
        }
    }

    /// Flushes what the client still buffers, waiting at most `request_timeout` (a server
    /// that is gone does not hold the caller forever).
    async fn close(&self) -> Result<()> {
        let limit = self.shared.opts.request_timeout;
        if let Some(w) = &self.shared.wire {
            w.flush(limit).await?;
        }
        match tokio::time::timeout(limit, self.shared.client.flush()).await {
            Ok(r) => r.map_err(|e| {
                Error::with_source(
                    ErrorKind::Transport,
                    format!("{}: flush on close failed", self.shared.where_()),
                    e,
                )
            }),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "{}: flush on close: no answer within {limit:?} (the server is unreachable)",
                    self.shared.where_()
                ),
            )),
        }
    }
}

/// The NATS headers the binding sends for `h`: every header under its wire name (the
/// contract's own names are shared, not allocated). NATS header names may not hold `:`,
/// whitespace or control characters and values may not hold CR or LF: such a header is a
/// `header` error naming it. Useful to publish with a plain NATS client in a form ampybus
/// consumers read, and to measure what a header map costs (`examples/nats_header_cost.rs`).
///
/// ```
/// use ampybus::{Headers, transport::nats::to_header_map};
/// let mut h = Headers::for_publish("ampy.bars.v1.BarBatch", "md@1", "md", "XNAS.AAPL");
/// h.fill_publish_defaults();
/// let m = to_header_map(&h).unwrap();
/// assert_eq!(m.get("partition_key").map(|v| v.as_str()), Some("XNAS.AAPL"));
/// assert_eq!(m.len(), h.len());
/// let bad = Headers::new().with("x desk", "rates");
/// assert!(to_header_map(&bad).unwrap_err().to_string().contains("`x desk`"));
/// ```
pub fn to_header_map(h: &Headers) -> Result<async_nats::HeaderMap> {
    let mut m = async_nats::HeaderMap::new();
    for (k, v) in h.iter() {
        wire::check_header(k, v)?;
        let name = match known_header_name(k) {
            Some(n) => n,
            None => k.parse().map_err(|e| {
                Error::with_source(
                    ErrorKind::Header,
                    format!("`{k}`: not a valid NATS header name"),
                    e,
                )
            })?,
        };
        m.insert(name, v);
    }
    Ok(m)
}

/// The NATS header name of one of the contract's headers, shared (not allocated per message);
/// `None` for any other name.
fn known_header_name(k: &str) -> Option<async_nats::header::HeaderName> {
    use crate::headers::names::*;
    use async_nats::header::HeaderName;
    macro_rules! known {
        ($($n:ident),* $(,)?) => {{
            const COUNT: usize = [$($n),*].len();
            static NAMES: [HeaderName; COUNT] = [$(HeaderName::from_static($n)),*];
            let mut i = 0;
            $(
                if k == $n {
                    return Some(NAMES[i].clone());
                }
                i += 1;
            )*
            let _ = i;
            None
        }};
    }
    // Only names of the right length are compared byte for byte.
    known!(
        MESSAGE_ID,
        SCHEMA_FQDN,
        SCHEMA_VERSION,
        CONTENT_TYPE,
        CONTENT_ENCODING,
        PRODUCED_AT,
        PRODUCER,
        SOURCE,
        RUN_ID,
        TRACEPARENT,
        TRACE_ID,
        SPAN_ID,
        PARTITION_KEY,
        DEDUPE_KEY,
        RETRY_COUNT,
        DLQ_REASON,
        SCHEMA_HASH,
        BLOB_REF,
        BLOB_HASH,
        BLOB_SIZE,
        ORIGINAL_TOPIC,
        DLQ_AT,
        DLQ_CONSUMER,
        PAYLOAD_HASH,
        REPLAY_REQUEST_ID,
        REDRIVE_OF,
    )
}

/// NATS headers → contract headers; `Nats-*` (broker bookkeeping) dropped.
pub(crate) fn from_header_map(m: Option<&async_nats::HeaderMap>) -> Headers {
    let Some(m) = m else {
        return Headers::new();
    };
    Headers::from_wire_pairs(m.iter().filter_map(|(k, vs)| {
        let k: &str = k.as_ref();
        if k.len() >= 5 && k[..5].eq_ignore_ascii_case("nats-") {
            return None;
        }
        Some((k.as_bytes(), vs.first()?.as_str().as_bytes()))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_header_names_are_shared_and_exact() {
        use crate::headers::names;
        for n in [
            names::MESSAGE_ID,
            names::TRACEPARENT,
            names::REDRIVE_OF,
            names::BLOB_SIZE,
        ] {
            let h = known_header_name(n).unwrap();
            assert_eq!(AsRef::<str>::as_ref(&h), n);
        }
        assert!(known_header_name("x-desk").is_none());
        assert!(known_header_name("message_idx").is_none());
        // Known and extension headers, the ones with the same text as a naive map.
        let h = Headers::for_publish("ampy.bars.v1.BarBatch", "p@1", "p", "XNAS.AAPL")
            .with("x-desk", "rates");
        let m = to_header_map(&h).unwrap();
        assert_eq!(m.len(), h.len());
        for (k, v) in h.iter() {
            assert_eq!(m.get(k).map(|v| v.as_str()), Some(v), "{k}");
        }
        let bad = Headers::new().with("bad name", "x\ny");
        let e = to_header_map(&bad).unwrap_err();
        assert!(e.to_string().contains("printable ASCII"), "{e}");
    }

    #[test]
    fn url_forms() {
        let o = NatsOptions::from_url("nats://u%40x:p%3Aw@h1,h2:5?name=svc").unwrap();
        assert_eq!(o.servers, vec!["h1:4222", "h2:5"]);
        assert_eq!(o.user.as_deref(), Some("u@x"));
        assert_eq!(o.password.as_deref(), Some("p:w"));
        assert_eq!(o.name.as_deref(), Some("svc"));
        assert!(!o.tls);
        let o = NatsOptions::from_url("nats://h?tls=true&user=a&password=b").unwrap();
        assert!(o.tls);
        assert_eq!(o.user.as_deref(), Some("a"));
        let e = NatsOptions::from_url("nats://h:99999").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("99999"), "{e}");
        let e = NatsOptions::from_url("nats://bob:pw@h?tls_cert=/c.pem").unwrap_err();
        assert!(e.to_string().contains("tls_key"), "{e}");
        assert!(!e.to_string().contains("pw@"), "{e}");
        let e = NatsOptions::from_url("kafka://h").unwrap_err();
        assert!(e.to_string().contains("kafka"), "{e}");
        let e = NatsOptions::from_url("nats://h/x").unwrap_err();
        assert!(e.to_string().contains("path"), "{e}");
    }

    #[test]
    fn violation_subject() {
        assert_eq!(
            publish_violation_subject("Permissions Violation for Publish to \"ampy.dev.x\"")
                .as_deref(),
            Some("ampy.dev.x")
        );
        assert_eq!(
            publish_violation_subject("permissions violation for publish to 'a.b'").as_deref(),
            Some("a.b")
        );
        assert!(publish_violation_subject("Authorization Violation").is_none());
    }

    #[test]
    fn headers_round_trip_drop_nats_headers() {
        let h = Headers::new().with("message_id", "m").with("x_extra", "v");
        let mut m = to_header_map(&h).unwrap();
        m.insert("Nats-Msg-Id", "m");
        assert_eq!(from_header_map(Some(&m)), h);
        let bad = Headers::new().with("a", "x\ny");
        assert_eq!(to_header_map(&bad).unwrap_err().kind(), ErrorKind::Header);
    }
}
