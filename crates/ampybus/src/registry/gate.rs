//! Enforcement pieces the bus and the runtime hold: the consumer's schema check (one lookup
//! per topic, cached per subscription) and the producer's token buckets (`max_rate`).

use super::{Registry, is_bus_domain};
use crate::headers::Headers;
use crate::obs::BusMetrics;
use crate::topic::Topic;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Topics remembered per subscription before the cache starts over.
const CACHE_MAX: usize = 4_096;

/// The schemas a consumer accepts per topic: `None` = anything (unclaimed, bus domain).
type Allowed = Option<Arc<[String]>>;

/// The consume-side schema check of one consumer.
pub(crate) struct SchemaGate {
    registry: Arc<Registry>,
    metrics: Option<BusMetrics>,
    cache: Mutex<HashMap<String, Allowed>>,
}

impl SchemaGate {
    /// A gate for a consumer on a bus opened with `registry`; `metrics` counts
    /// `bus_schema_mismatch_total{topic}` (observability on).
    pub(crate) fn new(registry: Arc<Registry>, metrics: Option<BusMetrics>) -> SchemaGate {
        SchemaGate {
            registry,
            metrics,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn allowed(&self, topic: &Topic) -> Allowed {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = cache.get(topic.as_str()) {
            return a.clone();
        }
        let a: Allowed = if is_bus_domain(topic.domain()) {
            None
        } else {
            self.registry
                .entry_for(topic.as_str())
                .map(|e| Arc::from(e.schemas.clone()))
        };
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(topic.as_str().to_owned(), a.clone());
        a
    }

    /// The DLQ detail when the message's `schema_fqdn` is not listed for its topic (and
    /// counts it); `None` when it may pass.
    pub(crate) fn mismatch(&self, topic: &Topic, headers: &Headers) -> Option<String> {
        let allowed = self.allowed(topic)?;
        let schema = headers.schema_fqdn().unwrap_or_default();
        if allowed.iter().any(|s| s == schema) {
            return None;
        }
        if let Some(m) = &self.metrics {
            m.schema_mismatch(topic.as_str());
        }
        Some(format!(
            "{schema:?} is not listed for topic {} by the registry {} (listed: {})",
            topic.as_str(),
            self.registry.origin(),
            allowed.join(", ")
        ))
    }
}

/// A token bucket: `rate` tokens per second, at most `burst` saved; a caller takes one
/// token, going into debt and waiting it out when the bucket is empty (so concurrent callers
/// queue fairly and nothing is dropped).
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes a token; returns how long the caller must wait before using it.
    fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// The `max_rate` token buckets of one bus handle, one per registry entry with a rate.
#[derive(Debug)]
pub(crate) struct RateLimits {
    registry: Arc<Registry>,
    buckets: Vec<Option<Mutex<Bucket>>>,
}

impl RateLimits {
    /// Buckets for every entry with a `max_rate` (a tenth of a second of burst, at least one
    /// message); `None` when no entry has one.
    pub(crate) fn new(registry: Arc<Registry>) -> Option<RateLimits> {
        let now = Instant::now();
        let buckets: Vec<Option<Mutex<Bucket>>> = registry
            .entries()
            .iter()
            .map(|e| {
                e.max_rate.map(|rate| {
                    let burst = (rate / 10.0).max(1.0);
                    Mutex::new(Bucket {
                        rate,
                        burst,
                        tokens: burst,
                        at: now,
                    })
                })
            })
            .collect();
        buckets
            .iter()
            .any(Option::is_some)
            .then_some(RateLimits { registry, buckets })
    }

    /// Waits until one more message of `topic` fits its entry's `max_rate`.
    pub(crate) async fn acquire(&self, topic: &Topic) {
        let Some(i) = self
            .registry
            .entries()
            .iter()
            .position(|e| e.pattern.matches(topic.as_str()))
        else {
            return;
        };
        let Some(bucket) = &self.buckets[i] else {
            return;
        };
        let wait = bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_spends_burst_then_spaces_by_rate() {
        let t0 = Instant::now();
        let mut b = Bucket {
            rate: 100.0,
            burst: 2.0,
            tokens: 2.0,
            at: t0,
        };
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), Duration::from_millis(10));
        assert_eq!(b.take(t0), Duration::from_millis(20));
        // 30 ms later the debt of 2 tokens is paid and one more has accrued.
        assert_eq!(b.take(t0 + Duration::from_millis(30)), Duration::ZERO);
    }
}
