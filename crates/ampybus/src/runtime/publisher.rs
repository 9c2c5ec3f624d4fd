//! Publishing with bounded retries.

use super::RetryPolicy;
use crate::bus::Bus;
use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::topic::Topic;
use crate::transport::PublishReceipt;
use bytes::Bytes;
use std::future::Future;

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
        let what = topic.as_str();
        retry_transient(&self.policy, what, || {
            self.bus.publish(topic, headers.clone(), payload.clone())
        })
        .await
    }
}

/// Whether a publish error is worth another attempt: transport failures and timeouts.
pub(crate) fn is_transient(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Transport | ErrorKind::Timeout)
}

/// The one publish-retry loop of the crate (used by [`Publisher`] and the `Producer`'s
/// flusher): runs `attempt` until it succeeds, fails with a non-transient error, or
/// `policy.max_attempts` attempts were made, sleeping `policy.backoff(n)` after failed attempt
/// `n`. The caller fixes every `message_id` before the first attempt, so a retried publish is a
/// duplicate that broker and consumer dedupe catch, never a new message. `what` names the
/// target in the warning logged before each retry.
pub(crate) async fn retry_transient<T, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let max = policy.max_attempts.max(1);
    let mut n = 1;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if n < max && is_transient(&e) => {
                tracing::warn!(attempt = n, max_attempts = max, error = %e, destination = what, "publish failed; retrying");
                tokio::time::sleep(policy.backoff(n)).await;
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    fn fast(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            min_delay: Duration::from_micros(1),
            max_delay: Duration::from_micros(10),
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = AtomicU32::new(0);
        let r = retry_transient(&fast(5), "t", || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n < 3 {
                Err(Error::new(ErrorKind::Timeout, "slow"))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn attempts_are_bounded_and_the_last_error_is_returned() {
        let calls = AtomicU32::new(0);
        let r: Result<()> = retry_transient(&fast(4), "t", || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Err(Error::new(ErrorKind::Transport, format!("down {n}")))
        })
        .await;
        assert_eq!(r.unwrap_err().to_string(), "transport error: down 4");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn other_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let r: Result<()> = retry_transient(&fast(4), "t", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::new(ErrorKind::Header, "message_id: bad"))
        })
        .await;
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Header);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
