//! Transport-level cases: the raw [`ampybus::transport::Subscription`] and the settling of
//! its deliveries, below the consumer runtime (nack with a delay, `in_progress`, the ack
//! deadline, acks across a reopen, where a subscription starts, instances sharing a durable
//! name, patterns spanning streams, a close during a fetch).

use crate::status::CaseStatus;
use crate::support::{TestContext, TransportFactory, clock_past, hang_timeout, publish_all, raw};
use ampybus::transport::{Delivery, StartAt, SubscribeSpec, Subscription, WindowQuery};
use ampybus::{Bus, ErrorKind, Topic, TopicPattern};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How early a redelivery may come against a delay measured on this host (brokers keep
/// times in whole milliseconds).
const EARLY: Duration = Duration::from_millis(20);

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.envelope.payload).into_owned()
}

async fn ack(d: Delivery) {
    d.ack().await.map_err(|(e, _)| e).expect("ack");
}

/// A durable subscription spec with the given ack deadline.
fn durable(pattern: TopicPattern, name: String, deadline: Duration) -> SubscribeSpec {
    let mut spec = SubscribeSpec::durable(pattern, name);
    spec.ack_deadline = deadline;
    spec
}

/// Fetches until `n` deliveries came (in arrival order); panics after [`hang_timeout`].
async fn fetch_n(sub: &mut dyn Subscription, n: usize, what: &str) -> Vec<Delivery> {
    fetch_n_timed(sub, n, what).await.0
}

/// [`fetch_n`], and when the `fetch` call that returned the first delivery started: a lease
/// the transport starts while handing any of them out starts no earlier.
async fn fetch_n_timed(
    sub: &mut dyn Subscription,
    n: usize,
    what: &str,
) -> (Vec<Delivery>, Instant) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut first_call = None;
    while out.len() < n {
        assert!(
            start.elapsed() < hang_timeout(),
            "timed out waiting for {what}: {} of {n}",
            out.len()
        );
        let call = Instant::now();
        let got = sub
            .fetch(n - out.len(), Duration::from_millis(250))
            .await
            .expect("fetch");
        if !got.is_empty() && first_call.is_none() {
            first_call = Some(call);
        }
        out.extend(got);
    }
    assert_eq!(out.len(), n, "{what}: more than asked for");
    (out, first_call.unwrap_or(start))
}

/// Asserts that nothing is delivered within `wait`.
async fn nothing_within(sub: &mut dyn Subscription, wait: Duration, what: &str) {
    let got = sub.fetch(10, wait).await.expect("fetch");
    let texts: Vec<String> = got.iter().map(text).collect();
    assert!(texts.is_empty(), "{what}: delivered {texts:?}");
}

/// Case — a nack with a delay. Two messages; `a` is nacked with an 800 ms delay and `b`
/// acked: `a` comes again (same sequence, delivery count 2) no earlier than the delay and
/// before the 10 s ack deadline; nacked again without a delay it comes a third time (count
/// 3); acked, nothing more is delivered and `b` never comes again.
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::nack_delay_redelivers_after_it(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn nack_delay_redelivers_after_it(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("nack_delay_redelivers_after_it");
    let bus = factory.new_bus(&ctx).await;
    let topic = ctx.topic("news", "nack");
    publish_all(&bus, vec![raw(&topic, "k1", "a"), raw(&topic, "k2", "b")]).await;
    let deadline = Duration::from_secs(10);
    let mut sub = bus
        .subscribe(durable(ctx.pattern("news"), ctx.consumer("nack"), deadline))
        .await
        .expect("subscribe");
    let delay = Duration::from_millis(800);
    let mut seq_a = None;
    let mut nacked_at = Instant::now();
    for d in fetch_n(&mut *sub, 2, "both messages").await {
        assert_eq!(d.info.delivery_count, 1, "{}", text(&d));
        if text(&d) == "a" {
            seq_a = Some(d.info.sequence);
            nacked_at = Instant::now();
            d.nack(delay).await.map_err(|(e, _)| e).expect("nack");
        } else {
            ack(d).await;
        }
    }
    let seq_a = seq_a.expect("a delivered");
    let again = fetch_n(&mut *sub, 1, "the nacked message again").await;
    let after = nacked_at.elapsed();
    let d = again.into_iter().next().unwrap();
    assert_eq!(
        (text(&d), d.info.sequence, d.info.delivery_count),
        ("a".to_owned(), seq_a, 2)
    );
    assert!(
        after + EARLY >= delay,
        "redelivered {after:?} after a nack with delay {delay:?}"
    );
    assert!(
        after < deadline,
        "redelivered only after {after:?}: by the ack deadline, not the nack"
    );
    let nacked_at = Instant::now();
    d.nack(Duration::ZERO)
        .await
        .map_err(|(e, _)| e)
        .expect("nack");
    let d = fetch_n(&mut *sub, 1, "the message nacked without delay")
        .await
        .remove(0);
    let soon = nacked_at.elapsed();
    assert_eq!((text(&d), d.info.delivery_count), ("a".to_owned(), 3));
    assert!(soon < deadline, "{soon:?}");
    ack(d).await;
    nothing_within(&mut *sub, Duration::from_secs(1), "after the acks").await;
    CaseStatus::Passed(format!(
        "nack({delay:?}) redelivered after {after:.2?} (count 2); nack(0) after {soon:.2?} \
         (count 3); nothing after the acks"
    ))
}

/// Case — `in_progress` extends the ack deadline. With a 1 s deadline, a delivery extended
/// every 250 ms for 2.5 s is not delivered again meanwhile; once no longer extended it comes
/// again (count 2) no earlier than a deadline after the last extension; acked, nothing more.
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::in_progress_extends_the_deadline(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn in_progress_extends_the_deadline(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("in_progress_extends_the_deadline");
    let bus = factory.new_bus(&ctx).await;
    let topic = ctx.topic("news", "wip");
    publish_all(&bus, vec![raw(&topic, "k", "slow")]).await;
    let deadline = Duration::from_secs(1);
    let mut sub = bus
        .subscribe(durable(ctx.pattern("news"), ctx.consumer("wip"), deadline))
        .await
        .expect("subscribe");
    let d = fetch_n(&mut *sub, 1, "the message").await.remove(0);
    assert_eq!(d.info.delivery_count, 1);
    let seq = d.info.sequence;
    let held_for = deadline * 5 / 2;
    let start = Instant::now();
    let mut extensions = 0;
    let mut last = Instant::now();
    while start.elapsed() < held_for {
        // The extension takes effect no earlier than the call.
        last = Instant::now();
        d.in_progress().await.expect("in_progress");
        extensions += 1;
        // The wait is the case's subject: time passing while the delivery is extended.
        nothing_within(&mut *sub, deadline / 4, "while extended").await;
    }
    drop(d);
    let again = fetch_n(&mut *sub, 1, "the message once no longer extended")
        .await
        .remove(0);
    let after = last.elapsed();
    assert_eq!(
        (again.info.sequence, again.info.delivery_count),
        (seq, 2),
        "{}",
        text(&again)
    );
    assert!(
        after + EARLY >= deadline,
        "redelivered {after:?} after the last extension (deadline {deadline:?})"
    );
    ack(again).await;
    nothing_within(&mut *sub, deadline * 3 / 2, "after the ack").await;
    CaseStatus::Passed(format!(
        "held {:.2?} past a {deadline:?} deadline with {extensions} extensions, not \
         redelivered; then redelivered {after:.2?} after the last one (count 2)",
        start.elapsed()
    ))
}

/// Case — an expired lease comes back counted. With a 1 s deadline, `x` left unsettled comes
/// again with the same sequence and delivery count 2, no earlier than the deadline, and once
/// more with count 3; `y`, acked at once, never comes again; after `x` is acked nothing more.
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::expired_lease_comes_back_counted(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn expired_lease_comes_back_counted(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("expired_lease_comes_back_counted");
    let bus = factory.new_bus(&ctx).await;
    let topic = ctx.topic("news", "lease");
    publish_all(&bus, vec![raw(&topic, "kx", "x"), raw(&topic, "ky", "y")]).await;
    let deadline = Duration::from_secs(1);
    let mut sub = bus
        .subscribe(durable(
            ctx.pattern("news"),
            ctx.consumer("lease"),
            deadline,
        ))
        .await
        .expect("subscribe");
    let mut held = None;
    // Measured from the start of the fetch call that handed the delivery out.
    let (first, mut since) = fetch_n_timed(&mut *sub, 2, "both messages").await;
    for d in first {
        assert_eq!(d.info.delivery_count, 1);
        if text(&d) == "x" {
            held = Some(d);
        } else {
            ack(d).await;
        }
    }
    let x = held.expect("x delivered");
    let seq = x.info.sequence;
    let mut waits = Vec::new();
    let mut last = x;
    for count in [2u32, 3] {
        let (mut got, call) = fetch_n_timed(&mut *sub, 1, "the unsettled message again").await;
        let d = got.remove(0);
        let after = since.elapsed();
        since = call;
        assert_eq!(
            (text(&d), d.info.sequence, d.info.delivery_count),
            ("x".to_owned(), seq, count)
        );
        assert!(
            after + EARLY >= deadline,
            "redelivered {after:?} after delivery (deadline {deadline:?})"
        );
        waits.push(after);
        // The previous delivery is stale now; dropping it settles nothing.
        drop(std::mem::replace(&mut last, d));
    }
    ack(last).await;
    nothing_within(&mut *sub, deadline * 3 / 2, "after the ack").await;
    CaseStatus::Passed(format!(
        "unsettled message redelivered after {:.2?} (count 2) and {:.2?} (count 3) with a \
         {deadline:?} deadline; the acked one never",
        waits[0], waits[1]
    ))
}

/// Case — an ack survives a reopen. Ten messages of one key; the first five acked (and m7,
/// except where acks settle only a prefix per partition), then the connection crashes
/// ([`TransportFactory::crash`]); a new connection's subscription of the same name gets
/// exactly the others, in order (m5, m6, m8, m9; with `prefix_acks` m5…m9); once they are
/// acked, a third connection gets nothing.
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::ack_survives_a_reopen(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn ack_survives_a_reopen(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("ack_survives_a_reopen");
    let bus = factory.new_bus(&ctx).await;
    let topic = ctx.topic("news", "reopen");
    let envs = (0..10)
        .map(|i| raw(&topic, "k", &format!("m{i}")))
        .collect();
    publish_all(&bus, envs).await;
    let deadline = Duration::from_secs(1);
    let name = ctx.consumer("reopen");
    let spec = durable(ctx.pattern("news"), name.clone(), deadline);
    let prefix = factory.capabilities().prefix_acks;
    let mut sub = bus.subscribe(spec.clone()).await.expect("subscribe");
    let got = fetch_n(&mut *sub, 10, "every message").await;
    let texts: Vec<String> = got.iter().map(text).collect();
    assert_eq!(
        texts,
        (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        "one key, publish order"
    );
    let mut unacked = Vec::new();
    for (i, d) in got.into_iter().enumerate() {
        if i < 5 || (i == 7 && !prefix) {
            ack(d).await;
        } else {
            unacked.push(d);
        }
    }
    drop(unacked);
    drop(sub);
    factory.crash(bus).await;
    let want: Vec<String> = if prefix {
        (5..10).map(|i| format!("m{i}")).collect()
    } else {
        ["m5", "m6", "m8", "m9"].map(String::from).to_vec()
    };

    let bus = factory.reopen_bus(&ctx).await;
    let started = Instant::now();
    let mut sub = bus.subscribe(spec.clone()).await.expect("subscribe again");
    let again = fetch_n(&mut *sub, want.len(), "the unacknowledged messages").await;
    let took = started.elapsed();
    let counts: Vec<u32> = again.iter().map(|d| d.info.delivery_count).collect();
    assert_eq!(again.iter().map(text).collect::<Vec<_>>(), want);
    Delivery::ack_all(again)
        .await
        .map_err(|(e, _)| e)
        .expect("ack");
    nothing_within(&mut *sub, deadline * 3 / 2, "after the acks").await;
    drop(sub);
    drop(bus);

    let bus = factory.reopen_bus(&ctx).await;
    let mut sub = bus.subscribe(spec).await.expect("subscribe a third time");
    nothing_within(&mut *sub, deadline * 2, "on a third connection").await;
    CaseStatus::Passed(format!(
        "after the reopen exactly {want:?} came again (delivery counts {counts:?}) within \
         {took:.2?}; nothing on a third connection"
    ))
}

/// Case — where a new subscription starts. Slices A (before), B (after a time `t`) and C
/// (after subscribing) of one key: a durable `StartAt::Latest` gets exactly C, an ephemeral
/// `Latest` reader exactly C, a durable `StartAt::Time(t)` exactly B then C, a durable
/// `Earliest` A, B, C — each in publish order and nothing more after its acks.
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::start_at_latest_and_time(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn start_at_latest_and_time(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("start_at_latest_and_time");
    let bus = factory.new_bus(&ctx).await;
    let topic = ctx.topic("news", "start");
    let slice = |s: &str| -> Vec<ampybus::Envelope> {
        (0..3)
            .map(|i| raw(&topic, "k", &format!("{s}{i}")))
            .collect()
    };
    let gap = chrono::Duration::milliseconds(5);
    publish_all(&bus, slice("a")).await;
    clock_past(chrono::Utc::now() + gap).await;
    let t = chrono::Utc::now();
    clock_past(t + gap).await;
    publish_all(&bus, slice("b")).await;

    let deadline = Duration::from_secs(10);
    let pattern = ctx.pattern("news");
    let mut subs: Vec<(&str, Box<dyn Subscription>, Vec<&str>)> = Vec::new();
    for (label, start, durable_name, want) in [
        (
            "durable Latest",
            StartAt::Latest,
            Some("latest"),
            vec!["c0", "c1", "c2"],
        ),
        (
            "ephemeral Latest",
            StartAt::Latest,
            None,
            vec!["c0", "c1", "c2"],
        ),
        (
            "durable Time(t)",
            StartAt::Time(t),
            Some("from-t"),
            vec!["b0", "b1", "b2", "c0", "c1", "c2"],
        ),
        (
            "durable Earliest",
            StartAt::Earliest,
            Some("earliest"),
            vec!["a0", "a1", "a2", "b0", "b1", "b2", "c0", "c1", "c2"],
        ),
    ] {
        let spec = match durable_name {
            Some(n) => {
                let mut s = durable(pattern.clone(), ctx.consumer(n), deadline);
                s.start = start;
                s
            }
            None => SubscribeSpec::ephemeral(pattern.clone(), start),
        };
        subs.push((label, bus.subscribe(spec).await.expect(label), want));
    }
    publish_all(&bus, slice("c")).await;
    for (label, sub, want) in &mut subs {
        let got = fetch_n(&mut **sub, want.len(), label).await;
        assert_eq!(got.iter().map(text).collect::<Vec<_>>(), *want, "{label}");
        assert!(
            got.iter().all(|d| d.info.delivery_count == 1),
            "{label}: a first delivery counted more than once"
        );
        Delivery::ack_all(got)
            .await
            .map_err(|(e, _)| e)
            .expect("ack");
    }
    for (label, sub, _) in &mut subs {
        nothing_within(&mut **sub, Duration::from_millis(300), label).await;
    }
    CaseStatus::Passed(
        "Latest (durable and ephemeral): c0..c2; Time(t): b0..c2; Earliest: a0..c2".into(),
    )
}

/// Case — a shared durable splits the work. Two subscriptions of one durable name on two
/// connections ([`TransportFactory::shared_work_bus`]), both fetching before anything is
/// published; 60 messages over 12 keys, fetched alternately (at most 2 at a time, a 3 s ack
/// deadline) and acked:
/// every message delivered exactly once in all, each instance got a share, nothing more
/// afterwards, and the consumer's lag is 0 where the bus reports lag.
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::shared_durable_splits_the_work(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn shared_durable_splits_the_work(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("shared_durable_splits_the_work");
    let bus = factory.new_bus(&ctx).await;
    let topic = ctx.topic("news", "share");
    let name = ctx.consumer("share");
    // A short deadline: the embedded log shares partitions out at lease renewals, every
    // third of it.
    let spec = durable(ctx.pattern("news"), name.clone(), Duration::from_secs(3));
    let buses = [
        factory.shared_work_bus(&ctx).await,
        factory.shared_work_bus(&ctx).await,
    ];
    let mut subs = Vec::new();
    for b in &buses {
        let mut sub = b.subscribe(spec.clone()).await.expect("subscribe");
        // Joins (Kafka: the group) before anything is there to take.
        nothing_within(&mut *sub, Duration::from_millis(100), "before publishing").await;
        subs.push(sub);
    }
    let n = 60;
    let envs = (0..n)
        .map(|i| raw(&topic, &format!("k{}", i % 12), &format!("m{i}")))
        .collect();
    publish_all(&bus, envs).await;
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut shares = [0usize; 2];
    let start = Instant::now();
    while seen.len() < n {
        assert!(
            start.elapsed() < hang_timeout(),
            "only {} of {n} delivered",
            seen.len()
        );
        for (i, sub) in subs.iter_mut().enumerate() {
            let got = sub
                .fetch(2, Duration::from_millis(200))
                .await
                .expect("fetch");
            shares[i] += got.len();
            for d in &got {
                seen.entry(text(d)).or_default().push(i);
            }
            if !got.is_empty() {
                Delivery::ack_all(got)
                    .await
                    .map_err(|(e, _)| e)
                    .expect("ack");
            }
        }
    }
    for sub in subs.iter_mut() {
        nothing_within(&mut **sub, Duration::from_millis(500), "after every ack").await;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(seen.len(), n);
    assert_eq!(shares[0] + shares[1], n);
    assert!(
        shares[0] > 0 && shares[1] > 0,
        "both instances got work: {shares:?}"
    );
    if bus.has_consumer_lag() {
        let lag = bus
            .consumer_lag(&name)
            .await
            .expect("lag")
            .expect("consumer");
        assert_eq!((lag.pending, lag.in_flight), (0, 0), "{lag:?}");
    }
    CaseStatus::Passed(format!(
        "{n} messages, each delivered once; shares of the two instances: {shares:?}"
    ))
}

/// Case — a pattern spanning several streams. Four messages on each of three domain streams
/// (news, bars, fx) under the case's pattern `ampy.dev.*.v1.c{id}.>`, and four on a topic of
/// the news stream the pattern does not match; with `joins_new_streams` the bars stream is
/// created only after the subscription. A durable subscription gets exactly the twelve, in
/// publish order per topic, never the others; after the acks nothing more, and lag 0 where
/// reported. A durable `StartAt::Latest` subscription made at the same moment gets exactly the
/// messages published after it (the late bars stream from its beginning), or nothing. With
/// `joins_new_streams`, an ephemeral reader from the earliest message, subscribed before the
/// durable ones, gets the same twelve per topic in order, and nothing more. With `replay_by_time`: a replay of the pattern, paged 4 at a time (no page
/// longer), returns the twelve in publish (store-time) order; with `replay_by_keys` too, two
/// keys over all time, and from a time half way, give exactly their messages in order.
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::pattern_spans_streams(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn pattern_spans_streams(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("pattern_spans_streams");
    let caps = factory.capabilities();
    let bus = factory.new_bus(&ctx).await;
    let pattern = TopicPattern::parse(&format!("ampy.dev.*.v1.c{}.>", ctx.id())).expect("pattern");
    let other = Topic::parse(&format!("ampy.dev.news.v1.o{}.x", ctx.id())).expect("topic");
    let streams = [
        (ctx.topic("news", "a"), "n1"),
        (ctx.topic("fx", "c"), "EUR.USD"),
        (ctx.topic("bars", "b"), "XNAS.AAPL"),
    ];
    // Publish order: i-th message on stream i % 3; the bars ones (i % 3 == 2) after the
    // subscription when new streams are joined.
    let order: Vec<(usize, String)> = (0..12).map(|i| (i % 3, format!("m{i}"))).collect();
    let late = |s: usize| caps.joins_new_streams && s == 2;
    let gap = chrono::Duration::milliseconds(2);
    let mut times = Vec::new();
    let publish = |bus: Bus, idx: Vec<usize>| {
        let order = order.clone();
        let streams = streams.clone();
        let other = other.clone();
        async move {
            let mut t = Vec::new();
            for i in idx {
                let (s, p) = &order[i];
                clock_past(chrono::Utc::now() + gap).await;
                // Whole milliseconds (some brokers store times in milliseconds): at or before
                // this message's store time, after the previous one's.
                let now = chrono::Utc::now();
                let sub_ms = i64::from(now.timestamp_subsec_nanos() % 1_000_000);
                t.push((i, now - chrono::Duration::nanoseconds(sub_ms)));
                let (topic, key) = &streams[*s];
                bus.publish_batch(vec![raw(topic, key, p), raw(&other, "o", &format!("o{i}"))])
                    .await
                    .expect("publish");
            }
            t
        }
    };
    let early: Vec<usize> = (0..12).filter(|i| !late(order[*i].0)).collect();
    let later: Vec<usize> = (0..12).filter(|i| late(order[*i].0)).collect();
    times.extend(publish(bus.clone(), early).await);
    // An ephemeral reader from the earliest message, subscribed before anything else (so
    // before a durable subscription may create streams): it also reads the bars stream
    // created after it.
    let mut reader = if caps.joins_new_streams {
        let spec = SubscribeSpec::ephemeral(pattern.clone(), StartAt::Earliest);
        Some(bus.subscribe(spec).await.expect("subscribe ephemeral"))
    } else {
        None
    };
    let name = ctx.consumer("span");
    let mut sub = bus
        .subscribe(durable(
            pattern.clone(),
            name.clone(),
            Duration::from_secs(30),
        ))
        .await
        .expect("subscribe");
    // Subscribed at the same moment from the latest message on: it gets exactly what was
    // published after (the bars stream, created later, from its beginning), or nothing.
    let mut latest = durable(
        pattern.clone(),
        ctx.consumer("span-latest"),
        Duration::from_secs(30),
    );
    latest.start = StartAt::Latest;
    let mut latest = bus.subscribe(latest).await.expect("subscribe latest");
    let later_payloads: Vec<String> = later.iter().map(|i| order[*i].1.clone()).collect();
    times.extend(publish(bus.clone(), later).await);
    let got = fetch_n(&mut *latest, later_payloads.len(), "what came after Latest").await;
    assert_eq!(
        got.iter().map(text).collect::<Vec<_>>(),
        later_payloads,
        "Latest"
    );
    Delivery::ack_all(got)
        .await
        .map_err(|(e, _)| e)
        .expect("ack");
    nothing_within(
        &mut *latest,
        Duration::from_millis(300),
        "Latest, after its acks",
    )
    .await;
    let got = fetch_n(&mut *sub, 12, "every matching message").await;
    let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (s, p) in &order {
        want.entry(streams[*s].0.as_str().to_owned())
            .or_default()
            .push(p.clone());
    }
    assert_eq!(per_topic(&got), want, "per topic, in publish order");
    if let Some(reader) = &mut reader {
        let seen = fetch_n(&mut **reader, 12, "every matching message, ephemeral").await;
        assert_eq!(
            per_topic(&seen),
            want,
            "ephemeral reader, per topic, in publish order"
        );
        nothing_within(
            &mut **reader,
            Duration::from_millis(300),
            "ephemeral, after 12",
        )
        .await;
    }
    Delivery::ack_all(got)
        .await
        .map_err(|(e, _)| e)
        .expect("ack");
    nothing_within(&mut *sub, Duration::from_millis(500), "after the acks").await;
    if bus.has_consumer_lag() {
        let lag = bus
            .consumer_lag(&name)
            .await
            .expect("lag")
            .expect("consumer");
        assert_eq!((lag.pending, lag.in_flight), (0, 0), "{lag:?}");
    }
    let mut detail = format!(
        "12 messages on 3 streams{} delivered per topic in order, the unmatched topic never",
        if caps.joins_new_streams {
            " (bars created after subscribing; an ephemeral reader too)"
        } else {
            ""
        }
    );
    if caps.replay_by_time {
        let in_order: Vec<String> = {
            let mut t = times.clone();
            t.sort_by_key(|(_, at)| *at);
            t.iter().map(|(i, _)| order[*i].1.clone()).collect()
        };
        let all = replay_pages(&bus, WindowQuery::new(pattern.clone())).await;
        assert_eq!(all, in_order, "replay over the pattern, store-time order");
        detail.push_str("; replayed in store order in pages of ≤ 4");
        if caps.replay_by_keys {
            let keys = ["n1", "XNAS.AAPL"];
            let of_keys: Vec<String> = in_order
                .iter()
                .filter(|p| {
                    let i: usize = p[1..].parse().unwrap();
                    keys.contains(&streams[order[i].0].1)
                })
                .cloned()
                .collect();
            let mut q = WindowQuery::new(pattern.clone());
            q.keys = Some(keys.map(String::from).to_vec());
            assert_eq!(replay_pages(&bus, q.clone()).await, of_keys, "keys");
            // From the 7th message in store order on.
            let mut sorted = times.clone();
            sorted.sort_by_key(|(_, at)| *at);
            let (_, half) = sorted[6];
            q.start = Some(half);
            let from_half: Vec<String> = sorted[6..]
                .iter()
                .map(|(i, _)| order[*i].1.clone())
                .filter(|p| of_keys.contains(p))
                .collect();
            assert_eq!(replay_pages(&bus, q).await, from_half, "keys from half way");
            detail.push_str(&format!(
                "; keys n1, XNAS.AAPL: {} over all time, {} from half way",
                of_keys.len(),
                from_half.len()
            ));
        }
    }
    CaseStatus::Passed(detail)
}

/// The payloads of `got` per topic, in delivery order.
fn per_topic(got: &[Delivery]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in got {
        out.entry(d.envelope.topic.as_str().to_owned())
            .or_default()
            .push(text(d));
    }
    out
}

/// Reads a window in pages of at most 4 (asserted) to the end; the payloads in order.
async fn replay_pages(bus: &Bus, mut q: WindowQuery) -> Vec<String> {
    let replay = bus.replay().expect("replay reader");
    q.limit = 4;
    let mut out = Vec::new();
    loop {
        let page = replay.read_window(&q).await.expect("read_window");
        let Some(last) = page.last() else { break };
        assert!(page.len() <= 4, "a page of {}", page.len());
        q.after_sequence = last.sequence;
        out.extend(
            page.iter()
                .map(|m| String::from_utf8_lossy(&m.envelope.payload).into_owned()),
        );
    }
    out
}

/// Case — the transport closed during a fetch. A durable subscription waits in a 2 s fetch
/// with nothing to read; the transport is closed meanwhile: the fetch returns (no hang past
/// its wait, no panic) with nothing or a `Closed` error; a message published afterwards on a
/// new connection reaches a new subscription of the same name, once.
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::close_during_a_fetch(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn close_during_a_fetch(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("close_during_a_fetch");
    let bus = factory.new_bus(&ctx).await;
    let topic = ctx.topic("news", "close");
    let name = ctx.consumer("close");
    let spec = durable(ctx.pattern("news"), name, Duration::from_secs(3));
    let mut sub = bus.subscribe(spec.clone()).await.expect("subscribe");
    let wait = Duration::from_secs(2);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let fetch = tokio::spawn(async move {
        let t = Instant::now();
        let _ = started_tx.send(());
        let r = sub.fetch(10, wait).await;
        (r.map(|v| v.len()), t.elapsed(), sub)
    });
    started_rx.await.expect("fetch task started");
    // No event tells that the fetch is waiting inside the transport: give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    bus.transport().close().await.expect("close");
    let (r, took, sub) = tokio::time::timeout(wait + Duration::from_secs(10), fetch)
        .await
        .expect("the fetch hung past its wait after close")
        .expect("fetch task");
    assert!(took < wait + Duration::from_secs(3), "fetch took {took:?}");
    let how = match r {
        Ok(0) => "returned nothing".to_owned(),
        Ok(n) => panic!("the fetch returned {n} message(s) with nothing published"),
        Err(e) if e.kind() == ErrorKind::Closed => format!("failed with `{e}`"),
        Err(e) => panic!("the fetch failed with something other than Closed: {e}"),
    };
    drop(sub);
    drop(bus);

    let bus = factory.reopen_bus(&ctx).await;
    publish_all(&bus, vec![raw(&topic, "k", "after")]).await;
    let mut sub = bus.subscribe(spec).await.expect("subscribe again");
    let d = fetch_n(&mut *sub, 1, "the message published after the close")
        .await
        .remove(0);
    assert_eq!((text(&d), d.info.delivery_count), ("after".to_owned(), 1));
    ack(d).await;
    nothing_within(&mut *sub, Duration::from_millis(500), "after the ack").await;
    CaseStatus::Passed(format!(
        "the pending fetch {how} after {took:.2?} (wait {wait:?}); a later message reached a \
         new subscription once"
    ))
}
