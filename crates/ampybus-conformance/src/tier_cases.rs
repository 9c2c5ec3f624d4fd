//! The durability-tier case (DESIGN §2 "Durability tiers").

use crate::status::CaseStatus;
use crate::support::{TestContext, TransportFactory, hang_timeout, raw, wait_stats};
use ampybus::runtime::{Consumer, Outcome, handler_fn};
use ampybus::tier::Tier;
use ampybus::transport::{Delivery, StartAt, SubscribeSpec, Subscription};
use ampybus::{Envelope, Topic};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Reads `sub` until `want` deliveries whose payload starts with `prefix` have come; returns
/// their payloads per partition key, in arrival order, and acks everything read.
async fn read_prefixed(
    sub: &mut Box<dyn Subscription>,
    prefix: &str,
    want: usize,
) -> (BTreeMap<String, Vec<String>>, Vec<String>) {
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut others = Vec::new();
    let mut got = 0;
    let start = Instant::now();
    while got < want {
        assert!(
            start.elapsed() < hang_timeout(),
            "timed out: {got} of {want} `{prefix}` messages"
        );
        let page = sub
            .fetch(100, Duration::from_millis(200))
            .await
            .expect("fetch");
        for d in &page {
            let text = String::from_utf8_lossy(&d.envelope.payload).into_owned();
            if text.starts_with(prefix) {
                got += 1;
                let key = d
                    .envelope
                    .headers
                    .get(ampybus::headers::names::PARTITION_KEY)
                    .unwrap_or_default()
                    .to_owned();
                per_key.entry(key).or_default().push(text);
            } else {
                others.push(text);
            }
        }
        Delivery::ack_all(page)
            .await
            .map_err(|(e, _)| e)
            .expect("ack");
    }
    (per_key, others)
}

fn script(
    ctx: &TestContext,
    prefix: &str,
    n: usize,
) -> (Vec<Envelope>, BTreeMap<String, Vec<String>>) {
    let topic: Topic = ctx.ticks_topic("quote", "AAPL");
    let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let envs = (0..n)
        .map(|i| {
            let key = if i % 2 == 0 { "AAPL.XNAS" } else { "MSFT.XNAS" };
            let text = format!("{prefix}{i}");
            want.entry(key.to_owned()).or_default().push(text.clone());
            raw(&topic, key, &text)
        })
        .collect();
    (envs, want)
}

/// Case 10 — the best-effort tier: what is promised and what is not.
///
/// Promised on every transport, for a best-effort pattern ([`ampybus::Bus::with_tier`]):
/// the bus reports the tier; a best-effort subscription opened before the publishes receives
/// every message published while it is live and the connection up, exactly once, in publish
/// order per key within one instance; acks succeed; a best-effort [`Consumer`] (through its
/// shedding queue, not full here) handles every live message once. A producer and a consumer
/// that disagree on the tier meet: a best-effort publish reaches an at-least-once durable
/// subscription created before it, and an at-least-once publish reaches a best-effort
/// subscription.
///
/// Not promised (reported, not asserted): a message published before the subscription
/// existed (NATS core: never delivered; transports that are at-least-once underneath:
/// delivered), and redelivery after a nack (NATS core: never).
pub async fn best_effort_tier(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("best_effort_tier");
    let pattern = ctx.ticks_pattern();
    let plain = factory.new_bus(&ctx).await;
    let bus = plain.clone().with_tier(pattern.clone(), Tier::BestEffort);
    assert_eq!(
        bus.tier_of(&ctx.ticks_topic("quote", "AAPL")),
        Tier::BestEffort
    );
    assert_eq!(
        plain.tier_of(&ctx.ticks_topic("quote", "AAPL")),
        Tier::AtLeastOnceDedupe
    );

    // Before any subscription of the case: not promised either way.
    let (early, _) = script(&ctx, "early", 1);
    bus.publish_batch(early).await.expect("publish early");

    let mut be = bus
        .subscribe(SubscribeSpec::durable(pattern.clone(), ctx.consumer("be")))
        .await
        .expect("best-effort subscribe");
    // The at-least-once side of a disagreement: a durable subscription of the plain bus.
    let mut alo = plain
        .subscribe(SubscribeSpec::durable(pattern.clone(), ctx.consumer("alo")))
        .await
        .expect("at-least-once subscribe");

    let n = 20;
    let (envs, want) = script(&ctx, "live", n);
    bus.publish_batch(envs).await.expect("best-effort publish");
    let (got, others) = read_prefixed(&mut be, "live", n).await;
    assert_eq!(
        got, want,
        "best-effort subscription: every live message, in order per key"
    );
    let early_seen = others.iter().any(|t| t.starts_with("early"));
    let (got, _) = read_prefixed(&mut alo, "live", n).await;
    assert_eq!(
        got, want,
        "at-least-once subscription reads best-effort publishes"
    );

    // The other direction: at-least-once publishes reach the best-effort subscription.
    let (envs, want) = script(&ctx, "alo", 6);
    plain
        .publish_batch(envs)
        .await
        .expect("at-least-once publish");
    let (got, _) = read_prefixed(&mut be, "alo", 6).await;
    assert_eq!(
        got, want,
        "best-effort subscription reads at-least-once publishes"
    );

    // Nack one: redelivery is not promised on this tier.
    let (envs, _) = script(&ctx, "nack", 1);
    bus.publish_batch(envs).await.expect("publish");
    let start = Instant::now();
    let d = loop {
        assert!(
            start.elapsed() < hang_timeout(),
            "the `nack` message never came"
        );
        let mut page = be
            .fetch(1, Duration::from_millis(500))
            .await
            .expect("fetch");
        if let Some(d) = page.pop()
            && d.envelope.payload.starts_with(b"nack")
        {
            break d;
        }
    };
    d.nack(Duration::ZERO)
        .await
        .map_err(|(e, _)| e)
        .expect("nack");
    let again = be
        .fetch(10, Duration::from_millis(500))
        .await
        .expect("fetch");
    let redelivered = again
        .iter()
        .any(|d| d.envelope.payload.starts_with(b"nack"));
    Delivery::ack_all(again)
        .await
        .map_err(|(e, _)| e)
        .expect("ack");
    drop(be);
    drop(alo);

    // The runtime on this tier: a consumer starting at the latest message handles every live
    // message once.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    let handle = Consumer::builder(bus.clone(), pattern.clone(), &ctx.consumer("rt"))
        .start_at(StartAt::Latest)
        .handler(handler_fn(move |m| {
            let s2 = s2.clone();
            async move {
                s2.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&m.payload).into_owned());
                Outcome::Ok
            }
        }))
        .start()
        .await
        .expect("consumer");
    let (envs, _) = script(&ctx, "rt", 10);
    bus.publish_batch(envs).await.expect("publish");
    wait_stats("the best-effort consumer", &handle, |s| s.handled_ok >= 10).await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, 10, "{stats:?}");
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("rt{i}")).collect();
    want.sort();
    assert_eq!(seen, want);
    bus.close().await.expect("close");
    CaseStatus::Passed(format!(
        "{n} live messages in order per key; tiers meet both ways; not promised: \
         published before subscribing delivered={early_seen}, redelivered after nack={redelivered}"
    ))
}
