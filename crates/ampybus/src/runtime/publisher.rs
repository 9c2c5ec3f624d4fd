//! Publishing with bounded retries.

use super::RetryPolicy;
use crate::bus::Bus;
use crate::error::{ErrorKind, Result};
use crate::headers::Headers;
use crate::topic::Topic;
use crate::transport::PublishReceipt;
use bytes::Bytes;

/// A publisher that retries transient failures (transport errors, timeouts) with exponential
/// backoff and full jitter. The `message_id` is fixed before the first attempt and kept across
/// attempts, so a publish that did land but whose receipt was lost is caught by broker-side and
/// consumer-side dedupe. Validation errors are returned at once.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::runtime::{Publisher, RetryPolicy};
/// use ampybus::{Bus, Headers, Topic};
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let publisher = Publisher::new(bus).with_policy(RetryPolicy { max_attempts: 3, ..Default::default() });
/// let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
/// let h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
/// let r = publisher.publish(&topic, h, b"x".to_vec()).await.unwrap();
/// assert!(!r.duplicate);
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct Publisher {
    bus: Bus,
    policy: RetryPolicy,
}

impl Publisher {
    /// A publisher with the default policy (5 attempts, 100 ms … 30 s).
    pub fn new(bus: Bus) -> Self {
        Publisher {
            bus,
            policy: RetryPolicy::default(),
        }
    }

    /// Replaces the retry policy.
    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Publishes one message, retrying transient failures with the same `message_id`.
    pub async fn publish(
        &self,
        topic: &Topic,
        mut headers: Headers,
        payload: impl Into<Bytes>,
    ) -> Result<PublishReceipt> {
        headers.fill_publish_defaults();
        let payload = payload.into();
        let mut attempt = 1;
        loop {
            match self
                .bus
                .publish(topic, headers.clone(), payload.clone())
                .await
            {
                Ok(r) => return Ok(r),
                Err(e)
                    if attempt < self.policy.max_attempts.max(1)
                        && matches!(e.kind(), ErrorKind::Transport | ErrorKind::Timeout) =>
                {
                    tracing::warn!(attempt, error = %e, topic = %topic, "publish failed; retrying");
                    tokio::time::sleep(self.policy.backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
