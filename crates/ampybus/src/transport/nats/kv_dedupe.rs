//! The consumer dedupe store on JetStream KV: one bucket per namespace (the stream prefix),
//! `{prefix}_dedupe`, whose max age is the dedupe window, so every instance of a consumer —
//! any process, any host — shares it and old entries expire on the server.
//!
//! A KV key is `{consumer}.{dedupe key}`, each part in URL-safe base64 (KV accepts that
//! whatever the consumer name or the key holds), so consumers never see each other's entries.

use super::NatsOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::transport::dedupe_store::DedupeStore;
use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use base64::Engine as _;
use std::sync::Arc;
use std::time::Duration;

/// A [`DedupeStore`] on a JetStream KV bucket (`{prefix}_dedupe`, max age = window).
///
/// ```no_run
/// # async fn demo() -> ampybus::Result<()> {
/// use ampybus::dedupe::DedupeStore;
/// use ampybus::transport::nats::NatsKvDedupeStore;
/// let store = NatsKvDedupeStore::connect("nats://127.0.0.1:4222").await?;
/// let keys = vec!["0190c6f4-0000-7000-8000-000000000001".to_owned()];
/// store.record_applied("oms", &keys).await?;
/// assert!(store.is_applied("oms", &keys).await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsKvDedupeStore {
    js: jetstream::Context,
    prefix: String,
    replicas: usize,
    window: Duration,
    where_: String,
    bucket: Arc<tokio::sync::OnceCell<kv::Store>>,
}

impl std::fmt::Debug for NatsKvDedupeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsKvDedupeStore")
            .field("prefix", &self.prefix)
            .field("window", &self.window)
            .finish()
    }
}

impl NatsKvDedupeStore {
    /// Connects with a `nats://`/`tls://` URL (its own connection) and the default window
    /// ([`crate::transport::dedupe_store::DEFAULT_WINDOW`]).
    ///
    /// ```no_run
    /// # async fn demo() -> ampybus::Result<()> {
    /// let store = ampybus::transport::nats::NatsKvDedupeStore::connect("nats://127.0.0.1:4222?stream_prefix=APP").await?;
    /// assert_eq!(store.bucket_name(), "APP_dedupe");
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<NatsKvDedupeStore> {
        let opts = NatsOptions::from_url(url)?;
        let (_, js) = super::connect_client(&opts, None).await?;
        Ok(NatsKvDedupeStore::from_context(
            js,
            &opts,
            crate::transport::dedupe_store::DEFAULT_WINDOW,
        ))
    }

    /// A store on an existing JetStream context; the bucket is named after
    /// `opts.stream_prefix` and created with `opts.replicas`.
    ///
    /// ```no_run
    /// # async fn demo(t: ampybus::transport::nats::NatsTransport) {
    /// use ampybus::transport::nats::NatsKvDedupeStore;
    /// let store = NatsKvDedupeStore::from_context(t.jetstream().clone(), t.options(), std::time::Duration::from_secs(3600));
    /// # }
    /// ```
    pub fn from_context(
        js: jetstream::Context,
        opts: &NatsOptions,
        window: Duration,
    ) -> NatsKvDedupeStore {
        NatsKvDedupeStore {
            js,
            prefix: opts.stream_prefix.clone(),
            replicas: opts.replicas,
            window,
            where_: format!("nats {}", opts.servers_shown()),
            bucket: Arc::default(),
        }
    }

    /// Sets the dedupe window (the max age of buckets this store creates).
    ///
    /// ```no_run
    /// # async fn demo() -> ampybus::Result<()> {
    /// let store = ampybus::transport::nats::NatsKvDedupeStore::connect("nats://127.0.0.1:4222")
    ///     .await?
    ///     .with_window(std::time::Duration::from_secs(3600));
    /// assert_eq!(store.window().as_secs(), 3600);
    /// # Ok(()) }
    /// ```
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The dedupe window.
    ///
    /// ```no_run
    /// # async fn demo(s: ampybus::transport::nats::NatsKvDedupeStore) {
    /// println!("{:?}", s.window());
    /// # }
    /// ```
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The bucket name: `{prefix}_dedupe`.
    ///
    /// ```no_run
    /// # async fn demo() -> ampybus::Result<()> {
    /// let store = ampybus::transport::nats::NatsKvDedupeStore::connect("nats://127.0.0.1:4222").await?;
    /// assert_eq!(store.bucket_name(), "AMPY_dedupe");
    /// # Ok(()) }
    /// ```
    pub fn bucket_name(&self) -> String {
        format!("{}_dedupe", self.prefix)
    }

    async fn bucket(&self) -> Result<&kv::Store> {
        self.bucket
            .get_or_try_init(|| async {
                open_bucket(
                    &self.js,
                    &self.bucket_name(),
                    BucketSpec {
                        description: "ampybus consumer dedupe store",
                        max_age: self.window,
                        replicas: self.replicas,
                        deny_delete: true,
                    },
                    &format!("{}: dedupe store", self.where_),
                )
                .await
            })
            .await
    }
}

/// How a KV bucket this binding creates is configured.
pub(crate) struct BucketSpec {
    pub(crate) description: &'static str,
    /// Max age of a value (zero: kept until replaced).
    pub(crate) max_age: Duration,
    pub(crate) replicas: usize,
    /// Refuse deletes of single values.
    pub(crate) deny_delete: bool,
}

/// Opens KV bucket `name`, creating it when missing (shared by the dedupe store and the
/// consumer leases). `what` prefixes errors.
pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    spec: BucketSpec,
    what: &str,
) -> Result<kv::Store> {
    if let Ok(s) = js.get_key_value(name).await {
        return Ok(s);
    }
    // The bucket's stream, created directly (the client's KV create first asks for account
    // info in a shape older servers do not send). Same layout as any KV bucket:
    // `KV_{bucket}` on `$KV.{bucket}.>`, one value per key.
    let cfg = jetstream::stream::Config {
        name: format!("KV_{name}"),
        description: Some(spec.description.to_owned()),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_messages: -1,
        max_bytes: -1,
        max_message_size: -1,
        max_age: spec.max_age,
        storage: jetstream::stream::StorageType::File,
        num_replicas: spec.replicas.max(1),
        allow_rollup: true,
        deny_delete: spec.deny_delete,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    if let Err(e) = js.create_stream(cfg).await {
        // Created by another instance meanwhile? Then opening it works.
        tracing::debug!(bucket = %name, error = %e, "KV bucket create failed; opening it");
    }
    js.get_key_value(name).await.map_err(|e| {
        Error::with_source(
            ErrorKind::Transport,
            format!("{what}: opening KV bucket {name}: {e}"),
            e,
        )
    })
}

fn kv_key(consumer: &str, k: &str) -> String {
    let b = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}",
        b.encode(consumer.as_bytes()),
        b.encode(k.as_bytes())
    )
}

/// How long a lookup or a record keeps retrying transient failures (a leader election in a
/// cluster, a reconnect) before it reports the error: the runtime handles a message whose
/// lookup failed, so giving up early would turn an outage into a double apply.
const RETRY_FOR: Duration = Duration::from_secs(15);

async fn with_retry<T, F, Fut>(what: &str, mut op: F) -> std::result::Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, String>>,
{
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() + pause < RETRY_FOR => {
                tracing::debug!(error = %e, "dedupe store: {what} failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

#[async_trait]
impl DedupeStore for NatsKvDedupeStore {
    async fn is_applied(&self, consumer: &str, keys: &[String]) -> Result<bool> {
        if keys.is_empty() {
            return Ok(false);
        }
        let b = self.bucket().await?;
        for k in keys {
            let key = kv_key(consumer, k);
            let found = with_retry("lookup", || async {
                b.get(key.clone()).await.map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Transport,
                    format!(
                        "{}: dedupe store: reading KV bucket {} (retried {RETRY_FOR:?}): {e}",
                        self.where_,
                        self.bucket_name()
                    ),
                )
            })?;
            if found.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn record_applied(&self, consumer: &str, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let b = self.bucket().await?;
        let now = bytes::Bytes::from(chrono::Utc::now().timestamp_millis().to_string());
        let mut todo: Vec<String> = keys.iter().map(|k| kv_key(consumer, k)).collect();
        // Pipelined: every put in flight at once, each acknowledged by the server; the ones
        // that failed are put again until they land or the retry time is spent.
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let results =
                futures::future::join_all(todo.iter().map(|k| b.put(k.clone(), now.clone()))).await;
            let mut failed = Vec::new();
            let mut first_err = None;
            for (k, r) in todo.iter().zip(results) {
                if let Err(e) = r {
                    failed.push(k.clone());
                    first_err.get_or_insert(e.to_string());
                }
            }
            let Some(e) = first_err else {
                return Ok(());
            };
            if start.elapsed() + pause >= RETRY_FOR {
                return Err(Error::new(
                    ErrorKind::Transport,
                    format!(
                        "{}: dedupe store: writing KV bucket {} (retried {RETRY_FOR:?}): {e}",
                        self.where_,
                        self.bucket_name()
                    ),
                ));
            }
            tracing::debug!(error = %e, failed = failed.len(), "dedupe store: record failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
            todo = failed;
        }
    }
}
