//! The consumer dedupe store on Redis keys with a TTL: one key per applied message per
//! consumer, `{key_prefix}ampy:dedupe:{consumer in URL-safe base64}:{dedupe key}`, set with
//! `PX` = the window, so every instance of a consumer — any process, any host — shares it and
//! old entries expire on the server. Recorded only after the handler returned Ok (the runtime
//! calls [`DedupeStore::record_applied`] then).

use super::{RedisOptions, command_error};
use crate::error::{Error, ErrorKind, Result};
use crate::transport::dedupe_store::DedupeStore;
use async_trait::async_trait;
use base64::Engine as _;
use redis::aio::ConnectionManager;
use std::time::Duration;

/// How long a lookup or a record keeps retrying transient failures (a reconnect, a restart)
/// before it reports the error: the runtime handles a message whose lookup failed, so giving
/// up early would turn an outage into a double apply.
const RETRY_FOR: Duration = Duration::from_secs(15);

/// A [`DedupeStore`] on Redis keys with a TTL (the window).
///
/// ```no_run
/// # async fn demo() -> ampybus::Result<()> {
/// use ampybus::dedupe::DedupeStore;
/// use ampybus::transport::redis::RedisDedupeStore;
/// let store = RedisDedupeStore::connect("redis://127.0.0.1:6379").await?;
/// let keys = vec!["0190c6f4-0000-7000-8000-000000000001".to_owned()];
/// store.record_applied("oms", &keys).await?;
/// assert!(store.is_applied("oms", &keys).await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisDedupeStore {
    conn: ConnectionManager,
    prefix: String,
    window: Duration,
    timeout: Duration,
    where_: String,
}

impl std::fmt::Debug for RedisDedupeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDedupeStore")
            .field("prefix", &self.prefix)
            .field("window", &self.window)
            .finish()
    }
}

impl RedisDedupeStore {
    /// Connects with a `redis://`/`rediss://` URL (its own connection) and the default window
    /// ([`crate::transport::dedupe_store::DEFAULT_WINDOW`]).
    ///
    /// ```no_run
    /// # async fn demo() -> ampybus::Result<()> {
    /// let store = ampybus::transport::redis::RedisDedupeStore::connect("redis://127.0.0.1:6379?key_prefix=app:").await?;
    /// assert_eq!(store.key("oms", "m1"), "app:ampy:dedupe:b21z:m1");
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<RedisDedupeStore> {
        let opts = RedisOptions::from_url(url)?;
        let conn = opts.connect_manager(Some(opts.request_timeout)).await?;
        Ok(RedisDedupeStore::from_connection(
            conn,
            &opts,
            crate::transport::dedupe_store::DEFAULT_WINDOW,
        ))
    }

    /// A store on an existing connection, keys under `opts.key_prefix`.
    ///
    /// ```no_run
    /// # async fn demo(t: ampybus::transport::redis::RedisTransport) {
    /// use ampybus::transport::redis::RedisDedupeStore;
    /// let store = RedisDedupeStore::from_connection(t.connection(), t.options(), std::time::Duration::from_secs(3600));
    /// # }
    /// ```
    pub fn from_connection(
        conn: ConnectionManager,
        opts: &RedisOptions,
        window: Duration,
    ) -> RedisDedupeStore {
        RedisDedupeStore {
            conn,
            prefix: opts.key_prefix.clone(),
            window,
            timeout: opts.request_timeout,
            where_: format!("redis {}", opts.server_shown()),
        }
    }

    /// Sets the dedupe window (the TTL of the keys this store writes).
    ///
    /// ```no_run
    /// # async fn demo() -> ampybus::Result<()> {
    /// let store = ampybus::transport::redis::RedisDedupeStore::connect("redis://127.0.0.1:6379")
    ///     .await?
    ///     .with_window(std::time::Duration::from_secs(3600));
    /// assert_eq!(store.window().as_secs(), 3600);
    /// # Ok(()) }
    /// ```
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window.max(Duration::from_millis(1));
        self
    }

    /// The dedupe window.
    ///
    /// ```no_run
    /// # async fn demo(s: ampybus::transport::redis::RedisDedupeStore) {
    /// println!("{:?}", s.window());
    /// # }
    /// ```
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The Redis key recording that `consumer` applied `key`.
    ///
    /// ```no_run
    /// # async fn demo(s: ampybus::transport::redis::RedisDedupeStore) {
    /// assert!(s.key("oms", "orders:co_1").ends_with(":orders:co_1"));
    /// # }
    /// ```
    pub fn key(&self, consumer: &str, key: &str) -> String {
        let b = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}ampy:dedupe:{}:{key}",
            self.prefix,
            b.encode(consumer.as_bytes())
        )
    }

    async fn run<T: redis::FromRedisValue + Send>(
        &self,
        what: &str,
        pipe: &redis::Pipeline,
    ) -> Result<T> {
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let mut c = self.conn.clone();
            let r = tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut c)).await;
            let err = match r {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let e = command_error(&self.where_, &format!("dedupe store: {what}"), e);
                    if e.kind() == ErrorKind::Config {
                        return Err(e);
                    }
                    e
                }
                Err(_) => Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{}: dedupe store: {what}: no answer within {:?}",
                        self.where_, self.timeout
                    ),
                ),
            };
            if start.elapsed() + pause >= RETRY_FOR {
                return Err(Error::new(
                    err.kind(),
                    format!("{} (retried {RETRY_FOR:?})", err.message()),
                ));
            }
            tracing::debug!(error = %err, "redis dedupe store: {what} failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

#[async_trait]
impl DedupeStore for RedisDedupeStore {
    async fn is_applied(&self, consumer: &str, keys: &[String]) -> Result<bool> {
        if keys.is_empty() {
            return Ok(false);
        }
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd("EXISTS");
        for k in keys {
            cmd.arg(self.key(consumer, k));
        }
        let (n,): (i64,) = self.run("lookup", &pipe).await?;
        Ok(n > 0)
    }

    async fn applied_among(
        &self,
        consumer: &str,
        keys: &[String],
    ) -> Result<std::collections::HashSet<String>> {
        if keys.is_empty() {
            return Ok(Default::default());
        }
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd("MGET");
        for k in keys {
            cmd.arg(self.key(consumer, k));
        }
        let (vals,): (Vec<Option<Vec<u8>>>,) = self.run("lookup", &pipe).await?;
        Ok(keys
            .iter()
            .zip(vals)
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.clone())
            .collect())
    }

    async fn record_applied(&self, consumer: &str, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let now = chrono::Utc::now().timestamp_millis();
        let px = self.window.as_millis().max(1) as u64;
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("SET")
                .arg(self.key(consumer, k))
                .arg(now)
                .arg("PX")
                .arg(px)
                .ignore();
        }
        self.run::<()>("record", &pipe).await
    }
}
