//! `runtime::Producer` on the embedded log and on a scripted failing transport: blocking on a
//! full queue, immediate validation errors, close flushing everything, retries keeping the
//! `message_id`, failures reported by `flush`.

mod common;

use ampybus::runtime::{Producer, RetryPolicy, SendOutcome};
use ampybus::transport::{PublishReceipt, SubscribeSpec, Subscription, Transport};
use ampybus::{Bus, Envelope, ErrorKind, Headers, Topic, TopicPattern};
use async_trait::async_trait;
use common::embedded;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn headers(key: &str) -> Headers {
    Headers::for_publish(ampybus::headers::RAW_BYTES_SCHEMA, "test@1", "test", key)
}

/// Every payload stored on `pattern`, in log order.
async fn stored(bus: &Bus, pattern: &str) -> Vec<String> {
    common::stored_envelopes(bus, pattern)
        .await
        .iter()
        .map(|e| String::from_utf8(e.payload.to_vec()).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_blocks_a_normal_topic_until_resume() {
    let (_dir, bus) = embedded().await;
    let p = Producer::builder(bus.clone()).capacity(2).start().unwrap();
    let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    p.pause();
    for i in 0..2 {
        let out = p
            .send(&topic, headers("k"), format!("m{i}").into_bytes())
            .await;
        assert_eq!(out.unwrap(), SendOutcome::Queued);
    }
    {
        let third = p.send(&topic, headers("k"), b"m2".to_vec());
        tokio::pin!(third);
        // Still pending: the queue is full and the flusher is held.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut third)
                .await
                .is_err()
        );
        let s = p.stats();
        assert_eq!(
            (s.accepted, s.queued, s.published, s.dropped.total()),
            (2, 2, 0, 0)
        );
        p.resume();
        assert_eq!(third.await.unwrap(), SendOutcome::Queued);
    }
    p.flush().await.unwrap();
    let s = p.stats();
    assert_eq!(
        (s.accepted, s.queued, s.in_flight, s.published),
        (3, 0, 0, 3)
    );
    assert_eq!(stored(&bus, "ampy.dev.news.>").await, ["m0", "m1", "m2"]);
    let s = p.close().await.unwrap();
    assert_eq!(s.published, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_are_immediate_errors_and_never_queued() {
    let (_dir, bus) = embedded().await;
    let p = Producer::builder(bus.clone()).capacity(4).start().unwrap();
    p.pause();
    let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    let err = p
        .send(&topic, headers(""), b"x".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Header);
    assert!(err.to_string().contains("partition_key"), "{err}");
    let mut no_schema = headers("k");
    no_schema.remove(ampybus::headers::names::SCHEMA_FQDN);
    let err = p.send(&topic, no_schema, b"x".to_vec()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Header);
    assert!(err.to_string().contains("schema_fqdn"), "{err}");
    let mut bad_id = headers("k");
    bad_id.set(ampybus::headers::names::MESSAGE_ID, "not-a-uuid");
    let err = p.send(&topic, bad_id, b"x".to_vec()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Header);
    assert!(err.to_string().contains("message_id"), "{err}");
    let s = p.stats();
    assert_eq!((s.accepted, s.queued), (0, 0));
    // A good message after the bad ones goes through alone.
    assert_eq!(
        p.send(&topic, headers("k"), b"ok".to_vec()).await.unwrap(),
        SendOutcome::Queued
    );
    let s = p.close().await.unwrap();
    assert_eq!((s.accepted, s.published), (1, 1));
    assert_eq!(stored(&bus, "ampy.dev.news.>").await, ["ok"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_publishes_everything_queued_in_order() {
    let (_dir, bus) = embedded().await;
    let p = Producer::builder(bus.clone())
        .capacity(100)
        .max_batch(7)
        .start()
        .unwrap();
    p.pause();
    let topics = [
        Topic::parse("ampy.dev.news.v1.a").unwrap(),
        Topic::parse("ampy.dev.news.v1.b").unwrap(),
    ];
    for i in 0..50 {
        let out = p
            .send(
                &topics[i % 2],
                headers(&format!("k{}", i % 3)),
                format!("m{i}").into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(out, SendOutcome::Queued);
    }
    assert_eq!(p.stats().queued, 50);
    let s = p.close().await.unwrap();
    assert_eq!(
        (s.accepted, s.published, s.queued, s.failed),
        (50, 50, 0, 0)
    );
    let expect: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    assert_eq!(stored(&bus, "ampy.dev.news.>").await, expect);
}

/// A transport that fails the first `fail_first` publish calls with a transport error and
/// records the message ids of every call.
struct Flaky {
    fail_first: usize,
    calls: Mutex<Vec<Vec<String>>>,
}

#[async_trait]
impl Transport for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }

    async fn publish_batch(&self, batch: Vec<Envelope>) -> ampybus::Result<Vec<PublishReceipt>> {
        let ids: Vec<String> = batch
            .iter()
            .map(|e| e.headers.message_id().unwrap().to_owned())
            .collect();
        let mut calls = self.calls.lock().unwrap();
        calls.push(ids);
        if calls.len() <= self.fail_first {
            return Err(ampybus::Error::new(
                ErrorKind::Transport,
                format!("broker unavailable (call {})", calls.len()),
            ));
        }
        Ok((0..batch.len())
            .map(|i| PublishReceipt {
                sequence: i as u64 + 1,
                duplicate: false,
            })
            .collect())
    }

    async fn subscribe(&self, _spec: SubscribeSpec) -> ampybus::Result<Box<dyn Subscription>> {
        Err(ampybus::Error::new(
            ErrorKind::Transport,
            "flaky: no subscriptions",
        ))
    }

    async fn close(&self) -> ampybus::Result<()> {
        Ok(())
    }
}

fn fast(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        min_delay: Duration::from_micros(10),
        max_delay: Duration::from_micros(100),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_with_the_same_message_ids() {
    let flaky = Arc::new(Flaky {
        fail_first: 2,
        calls: Mutex::new(Vec::new()),
    });
    let bus = Bus::with_transport(flaky.clone(), "flaky://");
    let p = Producer::builder(bus).retry(fast(3)).start().unwrap();
    p.pause();
    let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    for i in 0..3 {
        p.send(&topic, headers("k"), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    p.resume();
    p.flush().await.unwrap();
    let s = p.close().await.unwrap();
    assert_eq!((s.published, s.failed), (3, 0));
    let calls = flaky.calls.lock().unwrap();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0].len(), 3);
    assert_eq!(calls[0], calls[1]);
    assert_eq!(calls[1], calls[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_after_the_last_attempt_are_counted_and_reported_once() {
    let flaky = Arc::new(Flaky {
        fail_first: usize::MAX,
        calls: Mutex::new(Vec::new()),
    });
    let bus = Bus::with_transport(flaky.clone(), "flaky://");
    let p = Producer::builder(bus).retry(fast(4)).start().unwrap();
    p.pause();
    let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    for i in 0..2 {
        p.send(&topic, headers("k"), format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    p.resume();
    let err = p.flush().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Transport);
    assert_eq!(
        err.to_string(),
        "transport error: producer: 2 message(s) failed to publish; last error: broker unavailable (call 4)"
    );
    let s = p.stats();
    assert_eq!((s.accepted, s.published, s.failed, s.queued), (2, 0, 2, 0));
    assert_eq!(flaky.calls.lock().unwrap().len(), 4);
    // Reported once: the next flush and close are clean.
    p.flush().await.unwrap();
    let s = p.close().await.unwrap();
    assert_eq!(s.failed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_watching_needs_a_bus_that_reports_lag() {
    let flaky = Arc::new(Flaky {
        fail_first: 0,
        calls: Mutex::new(Vec::new()),
    });
    let bus = Bus::with_transport(flaky, "flaky://");
    assert!(!bus.has_consumer_lag());
    let err = bus.consumer_lag("risk").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert_eq!(
        err.to_string(),
        "invalid configuration: consumer_lag: the flaky transport cannot report consumer lag"
    );
    let err = Producer::builder(bus.clone())
        .slow_down_on_lag("risk", 10)
        .start()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("slow_down_on_lag"), "{err}");
    let err = Producer::builder(bus)
        .slow_down_on_lag(" ", 10)
        .start()
        .unwrap_err();
    assert!(
        err.to_string().contains("slow_down_on_lag consumer"),
        "{err}"
    );
}

/// Polls `cond` every 5 ms; panics naming `what` after 60 s (a hang, not a timing check).
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_watcher_follows_the_consumer_and_sheds_only_best_effort_topics() {
    use ampybus::runtime::DropReason;
    use ampybus::transport::SubscribeSpec;
    let (_dir, bus) = embedded().await;
    let pattern = TopicPattern::parse("ampy.dev.ticks.v1.>").unwrap();
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(pattern.clone(), "strategy"))
        .await
        .unwrap();
    let trade = Topic::parse("ampy.dev.ticks.v1.trade.MSFT").unwrap();
    let hb = Topic::parse("ampy.dev.ticks.v1.heartbeat.XNAS").unwrap();
    for i in 0..3 {
        bus.publish(&trade, headers("MSFT.XNAS"), format!("t{i}").into_bytes())
            .await
            .unwrap();
    }
    let p = Producer::builder(bus.clone())
        .best_effort(pattern)
        .slow_down_on_lag("strategy", 2)
        .lag_poll_interval(Duration::from_millis(10))
        .start()
        .unwrap();
    wait_until("lagging", || p.lagging()).await;
    assert_eq!(
        p.send(&hb, headers("XNAS"), b"h".to_vec()).await.unwrap(),
        SendOutcome::Dropped(DropReason::Lag)
    );
    assert_eq!(
        p.send(&trade, headers("MSFT.XNAS"), b"t3".to_vec())
            .await
            .unwrap(),
        SendOutcome::Queued
    );
    p.flush().await.unwrap();
    // The consumer catches up on all 4 trades.
    let mut acked = 0;
    while acked < 4 {
        for d in sub.fetch(10, Duration::from_secs(5)).await.unwrap() {
            d.ack().await.map_err(|(e, _)| e).unwrap();
            acked += 1;
        }
    }
    wait_until("not lagging", || !p.lagging()).await;
    assert_eq!(
        p.send(&hb, headers("XNAS"), b"h2".to_vec()).await.unwrap(),
        SendOutcome::Queued
    );
    let s = p.close().await.unwrap();
    assert_eq!(
        (s.accepted, s.published, s.dropped.lag, s.dropped.total()),
        (3, 2, 1, 1)
    );
}
