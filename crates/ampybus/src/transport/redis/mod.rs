//! The Redis Streams binding (cargo feature `redis`): `redis://` and `rediss://` URLs.
//!
//! * **Wire form.** One stream per `ampy.{env}.{domain}.{version}` (key
//!   `{key_prefix}ampy.{env}.{domain}.{version}`). An entry's fields are `topic` (the full
//!   topic), every contract header with exactly its name (string values), and `payload` (the
//!   payload bytes, binary, last). A header named `topic` or `payload` is refused on publish.
//! * **Retention.** Every `XADD` trims with an approximate `MINID` = now − max age (7 days; 30
//!   for orders, fills, positions and dlq); `max_len=N` adds an approximate `XTRIM MAXLEN`.
//! * **Publish**: pipelined, at most [`RedisOptions::max_in_flight`] commands unanswered,
//!   receipts in order; the receipt's `sequence` is the entry id packed as
//!   `ms << 20 | seq` ([`pack_id`]).
//! * **Consume**: a consumer group per stream the pattern spans, named after the durable name,
//!   created at `0` (a new group reads from the start; `StartAt::Latest`: `$`); each
//!   subscription is a consumer of its own in the group (`{durable}:{random}`); `XREADGROUP`,
//!   `XACK`; entries pending longer than the ack deadline are taken over with `XAUTOCLAIM`
//!   (their delivery count from `XPENDING`). Entries whose topic does not match the pattern are
//!   acknowledged at once and never handed out. See [`consume`] for nack and delays.
//! * **Replay**: `XRANGE` over millisecond ids ([`crate::transport::ReplayByTime`]).
//! * **Dedupe**: keys with a TTL ([`RedisDedupeStore`]).
//! * **Lag**: `XINFO GROUPS` ([`crate::transport::ConsumerLag`]).
//!
//! # URL
//!
//! `redis://[user[:password]@]host[:port][/db][?option=value&…]`, or `rediss://…` (TLS).
//! A userinfo of only `:password` authenticates the default user. Options:
//!
//! | option | meaning |
//! |---|---|
//! | `user=…`, `password=…` | ACL user and password (also from the userinfo) |
//! | `db=N` | database number (also the path, `/N`) |
//! | `tls=true` | TLS (implied by `rediss://`) |
//! | `tls_ca=PATH` | root CA (PEM) instead of the system's |
//! | `tls_cert=PATH`, `tls_key=PATH` | client certificate and key (PEM), for mutual TLS |
//! | `tls_insecure=true` | do not verify the server certificate (tests only) |
//! | `key_prefix=P` | prefix of every key this binding reads or writes (default empty) |
//! | `connect_timeout_ms=N` | connect timeout (default 5,000) |
//! | `request_timeout_ms=N` | timeout of one command (default 5,000) |
//! | `max_in_flight=N` | unanswered publish commands at most (default 4,096) |
//! | `max_age_days=N` | retention of every stream (default 7; 30 for orders, fills, positions, dlq) |
//! | `max_len=N` | also keep at most about N entries per stream |
//! | `order=across_instances\|per_instance` | several instances of one durable consumer name: one reads at a time and per-key order holds across them (default), or all read and order holds per instance ([`crate::transport::InstanceOrder`]) |
//!
//! **Which option wins**: defaults, then the URL (userinfo, then query options), then whatever
//! code sets on the [`RedisOptions`] returned by [`RedisOptions::from_url`] before
//! [`RedisTransport::connect`].
//!
//! ```
//! use ampybus::transport::redis::RedisOptions;
//! let o = RedisOptions::from_url("redis://app:pw@r1:6380/2?key_prefix=t1:").unwrap();
//! assert_eq!((o.host.as_str(), o.port, o.db), ("r1", 6380, 2));
//! assert_eq!(o.user.as_deref(), Some("app"));
//! assert_eq!(o.stream_key("ampy.dev.bars.v1"), "t1:ampy.dev.bars.v1");
//! ```

pub mod consume;
mod dedupe;
mod lease;
mod publish;
mod replay;
mod wire;

pub use dedupe::RedisDedupeStore;
pub use wire::{pack_id, unpack_id};

use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::topic::{Domain, TopicPattern};
use crate::transport::url::{UrlReader, host_port, missing_host, percent_decode, query_pairs};
use crate::transport::{PublishReceipt, ReplayByTime, SubscribeSpec, Subscription, Transport};
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Options of a Redis connection and of the streams the binding writes.
///
/// ```
/// use ampybus::transport::redis::RedisOptions;
/// let o = RedisOptions::default();
/// assert_eq!((o.host.as_str(), o.port), ("127.0.0.1", 6379));
/// assert_eq!(o.max_in_flight, 4096);
/// ```
#[derive(Clone)]
pub struct RedisOptions {
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Database number.
    pub db: i64,
    /// ACL user (`None`: the default user).
    pub user: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// TLS.
    pub tls: bool,
    /// Root CA (PEM file) instead of the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM file).
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM file).
    pub tls_key: Option<PathBuf>,
    /// Do not verify the server certificate.
    pub tls_insecure: bool,
    /// Prefix of every key read or written.
    pub key_prefix: String,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of one command.
    pub request_timeout: Duration,
    /// Unanswered publish commands at most.
    pub max_in_flight: usize,
    /// Retention of every stream; `None`: 7 days, 30 for orders, fills, positions, dlq;
    /// `Some(Duration::ZERO)`: unlimited (URL `max_age_days=unlimited`: no `MINID` trim).
    pub max_age: Option<Duration>,
    /// Retention per env and domain from a topic registry (the `MINID` trim of those
    /// streams); beats `max_age` (set by [`crate::Bus::connect_with_registry`]).
    pub registry_retention: crate::transport::UnitRetention,
    /// Also keep at most about this many entries per stream.
    pub max_len: Option<u64>,
    /// What several instances of one durable consumer name promise about per-key order
    /// (URL `order=`): one active instance at a time (default) or shared work.
    pub order: crate::transport::InstanceOrder,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db", &self.db)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .field("key_prefix", &self.key_prefix)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            host: "127.0.0.1".to_owned(),
            port: 6379,
            db: 0,
            user: None,
            password: None,
            tls: false,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_insecure: false,
            key_prefix: String::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            max_in_flight: 4096,
            max_age: None,
            registry_retention: Default::default(),
            max_len: None,
            order: Default::default(),
        }
    }
}

impl RedisOptions {
    /// Parses a `redis://` or `rediss://` URL (see the module docs). Errors name the URL
    /// (credentials redacted), the option and the rule.
    ///
    /// ```
    /// use ampybus::transport::redis::RedisOptions;
    /// let o = RedisOptions::from_url("rediss://:s3cret@h?tls_ca=/ca.pem").unwrap();
    /// assert!(o.tls && o.user.is_none());
    /// assert_eq!(o.password.as_deref(), Some("s3cret"));
    /// let e = RedisOptions::from_url("redis://bob:s3cret@h?bogus=1").unwrap_err();
    /// assert!(e.to_string().contains("bogus") && !e.to_string().contains("s3cret"));
    /// ```
    pub fn from_url(url: &str) -> Result<RedisOptions> {
        let u = UrlReader::new(url);
        let parts = u.split(url, "Redis", &["redis", "rediss"])?;
        let (scheme, hostport, path) = (parts.scheme, parts.hosts, parts.path);
        let mut o = RedisOptions {
            tls: scheme == "rediss",
            ..RedisOptions::default()
        };
        if let Some(ui) = parts.userinfo {
            match ui.split_once(':') {
                Some((user, p)) => {
                    if !user.is_empty() {
                        o.user = Some(percent_decode(user));
                    }
                    o.password = Some(percent_decode(p));
                }
                None if !ui.is_empty() => o.user = Some(percent_decode(ui)),
                None => {}
            }
        }
        if hostport.is_empty() {
            return Err(u.bad(missing_host(scheme, &format!("{scheme}://127.0.0.1:6379"))));
        }
        {
            let (host, port) = host_port(hostport, 6379)
                .map_err(|p| u.bad(format!("port `{}` is not a number 1..=65535", p.written)))?;
            if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == ',') {
                return Err(u.bad(format!("host `{host}` is empty or invalid")));
            }
            o.host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            o.port = port;
        }
        if !path.is_empty() {
            o.db = path
                .parse::<i64>()
                .ok()
                .filter(|d| *d >= 0)
                .ok_or_else(|| u.bad(format!("path `/{path}`: must be a database number")))?;
        }
        for (k, v) in query_pairs(parts.query) {
            match k {
                "user" | "username" => o.user = Some(u.nonempty(k, &v)?),
                "password" | "pass" => o.password = Some(v),
                "db" => o.db = u.num(k, &v)? as i64,
                "tls" => o.tls = u.flag(k, &v)?,
                "tls_ca" => o.tls_ca = Some(u.nonempty(k, &v)?.into()),
                "tls_cert" => o.tls_cert = Some(u.nonempty(k, &v)?.into()),
                "tls_key" => o.tls_key = Some(u.nonempty(k, &v)?.into()),
                "tls_insecure" => o.tls_insecure = u.flag(k, &v)?,
                "key_prefix" => {
                    if v.chars().any(|c| c.is_whitespace() || "*?[]\\".contains(c)) {
                        return Err(u.bad(format!(
                            "option `key_prefix`: {v:?} may not hold whitespace or glob characters (* ? [ ] \\)"
                        )));
                    }
                    o.key_prefix = v;
                }
                "connect_timeout_ms" => o.connect_timeout = u.millis(k, &v)?,
                "request_timeout_ms" => o.request_timeout = u.millis(k, &v)?,
                "max_in_flight" => o.max_in_flight = u.num_in(k, &v, 1..=1_000_000)? as usize,
                "max_age_days" => o.max_age = Some(u.max_age_days(k, &v)?),
                "max_len" => o.max_len = Some(u.positive(k, &v)?),
                "order" => o.order = u.parsed(&v)?,
                other => {
                    return Err(u.bad(format!(
                        "unknown option `{other}` (known: user, password, db, tls, tls_ca, tls_cert, tls_key, tls_insecure, key_prefix, connect_timeout_ms, request_timeout_ms, max_in_flight, max_age_days, max_len, order)"
                    )));
                }
            }
        }
        u.tls_pair(&o.tls_cert, &o.tls_key)?;
        if (o.tls_ca.is_some() || o.tls_cert.is_some() || o.tls_insecure) && !o.tls {
            return Err(u.bad("TLS options need TLS: use rediss:// or ?tls=true"));
        }
        Ok(o)
    }

    /// The key of the stream `ampy.{env}.{domain}.{version}` (the key prefix prepended).
    ///
    /// ```
    /// let o = ampybus::transport::redis::RedisOptions::default();
    /// assert_eq!(o.stream_key("ampy.prod.orders.v1"), "ampy.prod.orders.v1");
    /// ```
    pub fn stream_key(&self, stream: &str) -> String {
        format!("{}{stream}", self.key_prefix)
    }

    /// Retention of a domain's stream; zero: unlimited.
    ///
    /// ```
    /// use ampybus::{Domain, transport::redis::RedisOptions};
    /// let o = RedisOptions::default();
    /// assert_eq!(o.max_age_for(Domain::Orders).as_secs(), 30 * 86_400);
    /// assert_eq!(o.max_age_for(Domain::Bars).as_secs(), 7 * 86_400);
    /// ```
    pub fn max_age_for(&self, domain: Domain) -> Duration {
        crate::transport::retention_for(self.max_age, domain)
    }

    /// Retention of the stream of env + domain: the registry's for that unit, else
    /// [`RedisOptions::max_age_for`].
    ///
    /// ```
    /// use ampybus::{Domain, Env, transport::redis::RedisOptions};
    /// let mut o = RedisOptions::default();
    /// o.registry_retention.insert((Env::Dev, Domain::Bars), std::time::Duration::from_secs(3_600));
    /// assert_eq!(o.max_age_at(Env::Dev, Domain::Bars).as_secs(), 3_600);
    /// assert_eq!(o.max_age_at(Env::Prod, Domain::Bars).as_secs(), 7 * 86_400);
    /// ```
    pub fn max_age_at(&self, env: crate::topic::Env, domain: Domain) -> Duration {
        crate::transport::retention_at(&self.registry_retention, self.max_age, env, domain)
    }

    /// `host:port` as shown in logs and errors (never credentials).
    ///
    /// ```
    /// let o = ampybus::transport::redis::RedisOptions::from_url("redis://u:p@h:1").unwrap();
    /// assert_eq!(o.server_shown(), "h:1");
    /// ```
    pub fn server_shown(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn connection_info(&self) -> Result<redis::ConnectionInfo> {
        use redis::IntoConnectionInfo;
        let addr = if self.tls {
            redis::ConnectionAddr::TcpTls {
                host: self.host.clone(),
                port: self.port,
                insecure: self.tls_insecure,
                tls_params: None,
            }
        } else {
            redis::ConnectionAddr::Tcp(self.host.clone(), self.port)
        };
        let mut rs = redis::RedisConnectionInfo::default().set_db(self.db);
        if let Some(u) = &self.user {
            rs = rs.set_username(u);
        }
        if let Some(p) = &self.password {
            rs = rs.set_password(p);
        }
        let info = addr.into_connection_info().map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("redis {}: invalid address", self.server_shown()),
                e,
            )
        })?;
        Ok(info.set_redis_settings(rs))
    }

    pub(crate) fn client(&self) -> Result<redis::Client> {
        let info = self.connection_info()?;
        let where_ = format!("redis {}", self.server_shown());
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| {
                Error::with_source(
                    ErrorKind::Config,
                    format!("{where_}: option `{what}`: {} cannot be read", p.display()),
                    e,
                )
            })
        };
        let res = if self.tls && (self.tls_ca.is_some() || self.tls_cert.is_some()) {
            let root_cert = match &self.tls_ca {
                Some(p) => Some(read("tls_ca", p)?),
                None => None,
            };
            let client_tls = match (&self.tls_cert, &self.tls_key) {
                (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                    client_cert: read("tls_cert", c)?,
                    client_key: read("tls_key", k)?,
                }),
                _ => None,
            };
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
        } else {
            redis::Client::open(info)
        };
        res.map_err(|e| {
            Error::with_source(
                ErrorKind::Config,
                format!("{where_}: invalid connection settings: {e}"),
                e,
            )
        })
    }

    /// Opens a managed (reconnecting) connection and checks it with `PING`.
    pub(crate) async fn connect_manager(
        &self,
        response_timeout: Option<Duration>,
    ) -> Result<ConnectionManager> {
        let client = self.client()?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(response_timeout)
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2));
        let where_ = format!("redis {}", self.server_shown());
        let overall = self.connect_timeout * 3 + Duration::from_secs(1);
        let mut conn = match tokio::time::timeout(
            overall,
            ConnectionManager::new_with_config(client, cfg),
        )
        .await
        {
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{where_}: no connection within {overall:?} (is a Redis server listening there?)"
                    ),
                ));
            }
            Ok(Err(e)) => return Err(connect_error(&where_, self, e)),
            Ok(Ok(c)) => c,
        };
        let pong: redis::RedisResult<String> = tokio::time::timeout(
            self.request_timeout,
            redis::cmd("PING").query_async(&mut conn),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "{where_}: PING not answered within {:?}",
                    self.request_timeout
                ),
            )
        })?;
        pong.map_err(|e| connect_error(&where_, self, e))?;
        Ok(conn)
    }
}

fn connect_error(where_: &str, opts: &RedisOptions, e: redis::RedisError) -> Error {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    let (kind, what) = if matches!(e.kind(), redis::ErrorKind::AuthenticationFailed)
        || lower.contains("wrongpass")
        || lower.contains("noauth")
        || lower.contains("invalid username-password")
        || lower.contains("authentication")
    {
        (
            ErrorKind::Config,
            format!(
                "authentication refused for user `{}` (check the ACL user and password): {text}",
                opts.user.as_deref().unwrap_or("default")
            ),
        )
    } else if e.is_timeout() {
        (ErrorKind::Timeout, format!("no answer: {text}"))
    } else if lower.contains("tls") || lower.contains("certificate") || lower.contains("handshake")
    {
        (ErrorKind::Transport, format!("TLS failed: {text}"))
    } else if e.is_connection_refusal() || e.is_io_error() {
        (
            ErrorKind::Transport,
            format!("cannot connect (is a Redis server listening there?): {text}"),
        )
    } else {
        (ErrorKind::Transport, format!("connect failed: {text}"))
    };
    // The redis error text never holds the password; the user name is not a secret.
    Error::with_source(kind, format!("{where_}: {what}"), e)
}

/// Maps a command error to an ampybus error: NOPERM / NOAUTH / WRONGPASS are `Config` (not
/// retried), timeouts `Timeout`, the rest `Transport`.
pub(crate) fn command_error(where_: &str, what: &str, e: redis::RedisError) -> Error {
    let text = e.to_string();
    let code = e.code().unwrap_or_default().to_owned();
    let kind = match code.as_str() {
        "NOPERM" | "NOAUTH" | "WRONGPASS" => ErrorKind::Config,
        _ if e.is_timeout() => ErrorKind::Timeout,
        _ => ErrorKind::Transport,
    };
    let hint = if code == "NOPERM" {
        " (permission denied: check the ACL user's key and command permissions); not retried"
    } else {
        ""
    };
    Error::with_source(kind, format!("{where_}: {what}: {text}{hint}"), e)
}

pub(crate) struct Shared {
    pub(crate) conn: ConnectionManager,
    pub(crate) opts: RedisOptions,
}

impl Shared {
    pub(crate) fn where_(&self) -> String {
        format!("redis {}", self.opts.server_shown())
    }

    /// Runs one command with the request timeout.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        let mut c = self.conn.clone();
        match tokio::time::timeout(self.opts.request_timeout, cmd.query_async::<T>(&mut c)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(command_error(&self.where_(), what, e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "{}: {what}: no answer within {:?}",
                    self.where_(),
                    self.opts.request_timeout
                ),
            )),
        }
    }

    /// The stream keys (prefix included) of the streams `pattern` can match that exist, found
    /// with `SCAN … TYPE stream`, sorted.
    pub(crate) async fn existing_streams(&self, pattern: &TopicPattern) -> Result<Vec<String>> {
        let glob = wire::stream_glob(&self.opts.key_prefix, pattern);
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .query(
                    "SCAN for streams",
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&glob)
                        .arg("COUNT")
                        .arg(1000)
                        .arg("TYPE")
                        .arg("stream"),
                )
                .await?;
            for k in keys {
                if let Some(name) = k.strip_prefix(self.opts.key_prefix.as_str())
                    && wire::stream_may_match(name, pattern)
                    && !out.contains(&k)
                {
                    out.push(k);
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort();
        Ok(out)
    }
}

/// The Redis Streams transport. Cheap to share (`Arc` inside).
///
/// ```no_run
/// # async fn demo() -> ampybus::Result<()> {
/// use ampybus::transport::redis::{RedisOptions, RedisTransport};
/// let mut opts = RedisOptions::from_url("redis://127.0.0.1:6379")?;
/// opts.key_prefix = "test:".into();
/// let t = RedisTransport::connect(opts).await?;
/// let bus = ampybus::Bus::with_transport(std::sync::Arc::new(t), "redis://127.0.0.1:6379");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisTransport {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTransport")
            .field("server", &self.shared.opts.server_shown())
            .field("key_prefix", &self.shared.opts.key_prefix)
            .finish()
    }
}

impl RedisTransport {
    /// Connects (AUTH with the ACL user and password, TLS for `rediss://`) and checks the
    /// server with `PING`. An unreachable server, refused credentials and TLS failures each
    /// fail fast with an error that says which; credentials are never in the message.
    ///
    /// ```no_run
    /// # async fn demo() -> ampybus::Result<()> {
    /// use ampybus::transport::redis::{RedisOptions, RedisTransport};
    /// let t = RedisTransport::connect(RedisOptions::default()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(opts: RedisOptions) -> Result<RedisTransport> {
        let conn = opts.connect_manager(Some(opts.request_timeout)).await?;
        Ok(RedisTransport {
            shared: Arc::new(Shared { conn, opts }),
        })
    }

    /// [`RedisOptions::from_url`] then [`RedisTransport::connect`].
    ///
    /// ```no_run
    /// # async fn demo() -> ampybus::Result<()> {
    /// let t = ampybus::transport::redis::RedisTransport::connect_url("redis://127.0.0.1:6379").await?;
    /// assert_eq!(ampybus::transport::Transport::name(&t), "redis");
    /// # Ok(()) }
    /// ```
    pub async fn connect_url(url: &str) -> Result<RedisTransport> {
        RedisTransport::connect(RedisOptions::from_url(url)?).await
    }

    /// The options in force.
    ///
    /// ```no_run
    /// # async fn demo(t: ampybus::transport::redis::RedisTransport) {
    /// println!("keys are prefixed {:?}", t.options().key_prefix);
    /// # }
    /// ```
    pub fn options(&self) -> &RedisOptions {
        &self.shared.opts
    }

    /// A clone of the managed connection (for admin tools and benchmarks).
    ///
    /// ```no_run
    /// # async fn demo(t: ampybus::transport::redis::RedisTransport) -> redis::RedisResult<()> {
    /// let mut c = t.connection();
    /// let pong: String = redis::cmd("PING").query_async(&mut c).await?;
    /// # Ok(()) }
    /// ```
    pub fn connection(&self) -> ConnectionManager {
        self.shared.conn.clone()
    }

    /// A dedupe store on this connection (keys under this binding's prefix, default window).
    ///
    /// ```no_run
    /// # async fn demo(t: ampybus::transport::redis::RedisTransport) {
    /// let store = t.dedupe_store_handle().with_window(std::time::Duration::from_secs(86_400));
    /// # }
    /// ```
    pub fn dedupe_store_handle(&self) -> RedisDedupeStore {
        RedisDedupeStore::from_connection(
            self.shared.conn.clone(),
            &self.shared.opts,
            crate::transport::dedupe_store::DEFAULT_WINDOW,
        )
    }

    /// One row per stream matching `pattern` (streams are per env + domain + version):
    /// entries, first and last entry, consumer groups with their lag.
    ///
    /// ```no_run
    /// # async fn demo(t: ampybus::transport::redis::RedisTransport) -> ampybus::Result<()> {
    /// let p = ampybus::TopicPattern::parse("ampy.dev.>")?;
    /// for s in t.stream_stats(&p).await? {
    ///     println!("{} {} entries, {} groups", s.stream, s.length, s.groups.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn stream_stats(&self, pattern: &TopicPattern) -> Result<Vec<StreamStats>> {
        let mut out = Vec::new();
        for key in self.shared.existing_streams(pattern).await? {
            let length: u64 = self
                .shared
                .query("XLEN", redis::cmd("XLEN").arg(&key))
                .await?;
            let first: redis::Value = self
                .shared
                .query(
                    "XRANGE",
                    redis::cmd("XRANGE")
                        .arg(&key)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(1),
                )
                .await?;
            let last: redis::Value = self
                .shared
                .query(
                    "XREVRANGE",
                    redis::cmd("XREVRANGE")
                        .arg(&key)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1),
                )
                .await?;
            let id_of = |v: &redis::Value| wire::parse_entries(v).into_iter().next().map(|e| e.id);
            let groups = consume::groups_of(&self.shared, &key).await?;
            out.push(StreamStats {
                stream: key
                    .strip_prefix(self.shared.opts.key_prefix.as_str())
                    .unwrap_or(&key)
                    .to_owned(),
                key: key.clone(),
                length,
                first_id: id_of(&first),
                last_id: id_of(&last),
                groups,
            });
        }
        Ok(out)
    }
}

/// What [`RedisTransport::stream_stats`] reports for one stream.
///
/// ```
/// let s = ampybus::transport::redis::StreamStats::default();
/// assert_eq!(s.length, 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// `ampy.{env}.{domain}.{version}`.
    pub stream: String,
    /// The Redis key (prefix included).
    pub key: String,
    /// Entries held.
    pub length: u64,
    /// Id of the first entry (`ms-seq`).
    pub first_id: Option<String>,
    /// Id of the last entry.
    pub last_id: Option<String>,
    /// Consumer groups.
    pub groups: Vec<GroupStats>,
}

/// One consumer group of a stream (from `XINFO GROUPS`).
///
/// ```
/// let g = ampybus::transport::redis::GroupStats::default();
/// assert_eq!(g.pending, 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// The group name = the durable consumer name.
    pub name: String,
    /// Consumers (subscriptions, live or gone) in the group.
    pub consumers: u64,
    /// Delivered, not acknowledged.
    pub pending: u64,
    /// Not delivered yet.
    pub lag: u64,
    /// Last delivered entry id.
    pub last_delivered_id: String,
}

#[async_trait]
impl Transport for RedisTransport {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn publish_batch(&self, batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>> {
        publish::publish_outcomes(&self.shared, batch, false)
            .await
            .into_result()
    }

    /// Per-message `XADD` replies: see [`Transport::publish_batch_outcomes`].
    async fn publish_batch_outcomes(&self, batch: Vec<Envelope>) -> crate::transport::BatchOutcome {
        publish::publish_outcomes(&self.shared, batch, true).await
    }

    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        consume::subscribe(&self.shared, spec).await
    }

    fn replay(&self) -> Option<&dyn ReplayByTime> {
        Some(self)
    }

    fn dedupe_store(&self) -> Option<Arc<dyn crate::transport::dedupe_store::DedupeStore>> {
        Some(Arc::new(self.dedupe_store_handle()))
    }

    fn consumer_lag(&self) -> Option<&dyn crate::transport::ConsumerLag> {
        Some(self)
    }

    fn inspect(&self) -> Option<&dyn crate::transport::Inspect> {
        Some(self)
    }

    /// `PING` answered by the server.
    async fn health(&self) -> Result<()> {
        let _: String = self.shared.query("PING", &redis::cmd("PING")).await?;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        // Every publish is answered before publish_batch returns: nothing to flush.
        Ok(())
    }
}

/// Lag of a durable consumer from `XINFO GROUPS`, summed over every stream (under this
/// binding's key prefix) that has a group of that name: `pending` = entries not delivered to
/// the group yet (`lag`) + delivered and not acknowledged (`pending`); `in_flight` = the
/// latter. Counted per stream: entries of other topics in the same stream count until the
/// consumer has read past them. `None` when no stream has the group.
#[async_trait]
impl crate::transport::ConsumerLag for RedisTransport {
    async fn lag(&self, consumer: &str) -> Result<Option<crate::transport::Lag>> {
        let all = TopicPattern::parse(">").expect("pattern");
        let mut found = false;
        let mut lag = crate::transport::Lag::default();
        for key in self.shared.existing_streams(&all).await? {
            for g in consume::groups_of(&self.shared, &key).await? {
                if g.name == consumer {
                    found = true;
                    lag.pending += g.lag + g.pending;
                    lag.in_flight += g.pending;
                }
            }
        }
        Ok(found.then_some(lag))
    }
}

/// `ampybus topics` on Redis. A stream holds a whole `ampy.{env}.{domain}.{version}`, so topic
/// rows are per stream (`topic` = the stream's name; `bytes` unknown; sequences are packed entry
/// ids, see [`pack_id`]); consumers are the consumer groups, summed by name over the
/// streams they read (`cursor` = the last delivered id, packed, when on one stream).
#[async_trait]
impl crate::transport::Inspect for RedisTransport {
    async fn topic_stats(
        &self,
        pattern: &TopicPattern,
    ) -> Result<Vec<crate::transport::TopicStats>> {
        let time = |seq: Option<u64>| {
            seq.and_then(|s| chrono::DateTime::from_timestamp_millis((s >> 20) as i64))
        };
        let mut out: Vec<crate::transport::TopicStats> = self
            .stream_stats(pattern)
            .await?
            .into_iter()
            .filter(|s| s.length > 0)
            .map(|s| {
                let first = s.first_id.as_deref().and_then(wire::pack_id);
                let last = s.last_id.as_deref().and_then(wire::pack_id);
                crate::transport::TopicStats {
                    topic: s.stream,
                    messages: s.length,
                    bytes: None,
                    oldest: time(first),
                    newest: time(last),
                    first_seq: first.unwrap_or(0),
                    last_seq: last.unwrap_or(0),
                }
            })
            .collect();
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        Ok(out)
    }

    async fn consumer_stats(&self) -> Result<Vec<crate::transport::ConsumerStats>> {
        let all = TopicPattern::parse(">").expect("pattern");
        let mut by_name: std::collections::BTreeMap<String, crate::transport::ConsumerStats> =
            std::collections::BTreeMap::new();
        let mut streams_of: std::collections::BTreeMap<String, u32> = Default::default();
        for s in self.stream_stats(&all).await? {
            for g in &s.groups {
                let c = by_name.entry(g.name.clone()).or_insert_with(|| {
                    crate::transport::ConsumerStats {
                        name: g.name.clone(),
                        pattern: String::new(),
                        cursor: None,
                        in_flight: 0,
                        lag: 0,
                        newest_seq: None,
                    }
                });
                let n = streams_of.entry(g.name.clone()).or_default();
                *n += 1;
                if !c.pattern.is_empty() {
                    c.pattern.push(',');
                }
                c.pattern.push_str(&format!("{}.>", s.stream));
                c.in_flight += g.pending;
                c.lag += g.lag + g.pending;
                let (cursor, newest) = (
                    wire::pack_id(&g.last_delivered_id),
                    s.last_id.as_deref().and_then(wire::pack_id),
                );
                (c.cursor, c.newest_seq) = if *n == 1 {
                    (cursor, newest)
                } else {
                    (None, None)
                };
            }
        }
        Ok(by_name.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        let o = RedisOptions::from_url("redis://u%40x:p%3Aw@h1:7000/3?key_prefix=a:").unwrap();
        assert_eq!((o.host.as_str(), o.port, o.db), ("h1", 7000, 3));
        assert_eq!(o.user.as_deref(), Some("u@x"));
        assert_eq!(o.password.as_deref(), Some("p:w"));
        assert_eq!(o.key_prefix, "a:");
        let o = RedisOptions::from_url("redis://h").unwrap();
        assert_eq!((o.port, o.db, o.tls), (6379, 0, false));
        let o = RedisOptions::from_url("rediss://h?tls_insecure=true&max_len=10").unwrap();
        assert!(o.tls && o.tls_insecure);
        assert_eq!(o.max_len, Some(10));
        let e = RedisOptions::from_url("redis://bob:pw@h:99999").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(
            e.to_string().contains("99999") && !e.to_string().contains("pw@"),
            "{e}"
        );
        let e = RedisOptions::from_url("redis://h?tls_ca=/x").unwrap_err();
        assert!(e.to_string().contains("rediss"), "{e}");
        let e = RedisOptions::from_url("redis://h/x").unwrap_err();
        assert!(e.to_string().contains("database"), "{e}");
        let e = RedisOptions::from_url("nats://h").unwrap_err();
        assert!(e.to_string().contains("nats"), "{e}");
        let e = RedisOptions::from_url("redis://h?key_prefix=a*").unwrap_err();
        assert!(e.to_string().contains("glob"), "{e}");
    }
}
