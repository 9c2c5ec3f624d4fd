//! The cases. Each takes the factory, builds its own [`TestContext`], and either returns
//! [`CaseStatus::Passed`] with its figures, returns [`CaseStatus::NotApplicable`] with the
//! reason, or panics (an assertion, or a wait that hit [`crate::hang_timeout`]).

use crate::status::CaseStatus;
use crate::support::{
    TestContext, TransportFactory, assert_all_applied, clock_past, hang_timeout, publish_all, raw,
    read_until, redrive, scaled, wait_for, wait_stats,
};
use ampybus::codec::sha256_tag;
use ampybus::dedupe::{DedupeStore, dedupe_keys};
use ampybus::headers::names;
use ampybus::runtime::{
    Consumer, DlqCode, DropCounts, DropReason, Message, ORIGINAL_MESSAGE_ID, Outcome, Producer,
    RetryPolicy, SendOutcome, handler_fn,
};
use ampybus::transport::{StoredMessage, SubscribeSpec, WindowQuery};
use ampybus::{Bus, Envelope, Headers, TopicPattern};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The one table of cases: `name => Variant: runner, requires [capability flags]`, in run
/// order. [`Case`], [`Case::ALL`], [`Case::name`], [`Case::requires`], [`run_case`] and the
/// tests [`crate::conformance_tests!`] expands are all generated from it, so adding a case is
/// one entry here (and its function). A case whose required flag the binding does not claim is
/// reported as not applicable with the flag's meaning, never run and never passed.
///
/// `[callback] { args }` calls `callback! { args ; entries }`; used by this crate only.
#[doc(hidden)]
#[macro_export]
macro_rules! __with_case_table {
    ([$($callback:tt)*] { $($args:tt)* }) => {
        $($callback)*! { $($args)* ;
            at_least_once_across_crash => AtLeastOnceAcrossCrash:
                $crate::at_least_once_across_crash, [];
            dedupe_by_message_id_and_key => DedupeByMessageIdAndKey:
                $crate::dedupe_by_message_id_and_key, [];
            per_key_order => PerKeyOrder: $crate::per_key_order, [];
            retry_counts_and_backoff => RetryCountsAndBackoff:
                $crate::retry_counts_and_backoff, [];
            dlq_contents_and_redrive => DlqContentsAndRedrive:
                $crate::dlq_contents_and_redrive, [];
            replay_window => ReplayWindow: $crate::replay_window, [replay_by_time];
            replay_keys => ReplayKeys: $crate::replay_keys, [replay_by_time, replay_by_keys];
            graceful_shutdown_loses_nothing => GracefulShutdownLosesNothing:
                $crate::graceful_shutdown_loses_nothing, [];
            backpressure_bounded_in_flight => BackpressureBoundedInFlight:
                $crate::backpressure_bounded_in_flight, [];
            best_effort_drop_conflate => BestEffortDropConflate:
                $crate::best_effort_drop_conflate, [best_effort_tier];
            best_effort_tier => BestEffortTier: $crate::best_effort_tier, [];
            order_across_instances => OrderAcrossInstances:
                $crate::order_across_instances, [];
            nack_delay_redelivers_after_it => NackDelayRedeliversAfterIt:
                $crate::nack_delay_redelivers_after_it, [];
            in_progress_extends_the_deadline => InProgressExtendsTheDeadline:
                $crate::in_progress_extends_the_deadline, [];
            expired_lease_comes_back_counted => ExpiredLeaseComesBackCounted:
                $crate::expired_lease_comes_back_counted, [];
            ack_survives_a_reopen => AckSurvivesAReopen: $crate::ack_survives_a_reopen, [];
            start_at_latest_and_time => StartAtLatestAndTime:
                $crate::start_at_latest_and_time, [];
            shared_durable_splits_the_work => SharedDurableSplitsTheWork:
                $crate::shared_durable_splits_the_work, [];
            pattern_spans_streams => PatternSpansStreams: $crate::pattern_spans_streams, [];
            close_during_a_fetch => CloseDuringAFetch: $crate::close_during_a_fetch, [];
            consumer_crash_mid_run => ConsumerCrashMidRun: $crate::consumer_crash_mid_run, [];
            broker_restart_mid_run => BrokerRestartMidRun:
                $crate::broker_restart_mid_run, [broker_restart];
        }
    };
}

macro_rules! define_cases {
    (; $($name:ident => $variant:ident: $run:path, [$($flag:ident),*];)*) => {
        /// The cases of the suite, in the order [`crate::run_all`] runs them (generated from
        /// the case table: see `README.md` for what each checks).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Case {
            $(
                #[doc = concat!("The `", stringify!($name), "` case.")]
                $variant,
            )*
        }

        impl Case {
            /// Every case, in run order.
            pub const ALL: &'static [Case] = &[$(Case::$variant),*];

            /// The snake_case name (also the test name [`crate::conformance_tests!`]
            /// generates).
            pub fn name(self) -> &'static str {
                match self {
                    $(Case::$variant => stringify!($name),)*
                }
            }

            /// The capability flags ([`crate::Capabilities`] fields) the case needs.
            ///
            /// ```
            /// use ampybus_conformance::Case;
            /// assert_eq!(Case::ReplayKeys.requires(), &["replay_by_time", "replay_by_keys"]);
            /// ```
            pub fn requires(self) -> &'static [&'static str] {
                match self {
                    $(Case::$variant => &[$(stringify!($flag)),*],)*
                }
            }

            /// The case named `name`, if any.
            ///
            /// ```
            /// use ampybus_conformance::Case;
            /// assert_eq!(Case::from_name("pattern_spans_streams"), Some(Case::PatternSpansStreams));
            /// ```
            pub fn from_name(name: &str) -> Option<Case> {
                Case::ALL.iter().copied().find(|c| c.name() == name)
            }
        }

        /// Runs one case (a failure panics; see [`crate::run_cases`] for a caught run). A case
        /// whose required capability the binding does not claim is not applicable, and not
        /// run.
        pub async fn run_case(factory: &dyn TransportFactory, case: Case) -> CaseStatus {
            let caps = factory.capabilities();
            for flag in case.requires() {
                if !caps.flag(flag) {
                    let why = factory
                        .why_not(flag)
                        .unwrap_or_else(|| crate::Capabilities::meaning(flag).to_owned());
                    return CaseStatus::NotApplicable(format!("needs `{flag}`: {why}"));
                }
            }
            match case {
                $(Case::$variant => $run(factory).await,)*
            }
        }
    };
}

__with_case_table!([define_cases] {});

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Case — replay by time window: see [`replay_window_and_keys`].
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::replay_window(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn replay_window(factory: &dyn TransportFactory) -> CaseStatus {
    replay_window_and_keys(factory, false).await
}

/// Case — replay by keys (and keys within a window): see [`replay_window_and_keys`].
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::replay_keys(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn replay_keys(factory: &dyn TransportFactory) -> CaseStatus {
    replay_window_and_keys(factory, true).await
}

type Counts = Arc<Mutex<HashMap<String, u32>>>;

fn text(msg: &Message) -> String {
    String::from_utf8_lossy(&msg.payload).into_owned()
}

fn bump(counts: &Counts, key: String) {
    *counts.lock().unwrap().entry(key).or_default() += 1;
}

/// A handler that counts each payload it finished, after a yield.
fn counting(counts: Counts) -> impl ampybus::Handler {
    handler_fn(move |msg: Message| {
        let counts = counts.clone();
        async move {
            tokio::task::yield_now().await;
            bump(&counts, text(&msg));
            Outcome::Ok
        }
    })
}

/// Case 1 — at-least-once across a consumer crash. A third of the way through, every handler
/// of the first instance (1 s ack deadline) records its effect and then hangs; the consumer is
/// dropped without shutdown and its bus connection dropped; a new instance with the same name
/// on a new connection finishes. Every message is handled (distinct handled = N, nothing lost);
/// exactly the hung ones are handled a second time, every other exactly once (dedupe); every id
/// is recorded as applied in the dedupe store; nothing is left unacked.
pub async fn at_least_once_across_crash(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("at_least_once_across_crash");
    let bus = factory.new_bus(&ctx).await;
    let store = factory.dedupe_store(&ctx).await;
    let topic = ctx.topic("news", "alo");
    let pattern = ctx.pattern("news");
    let name = ctx.consumer("alo");
    let n = scaled(2000, 100);
    let in_flight = 64;
    let envs: Vec<Envelope> = (0..n)
        .map(|i| raw(&topic, &format!("k{}", i % 16), &format!("m{i}")))
        .collect();
    let ids: Vec<String> = envs
        .iter()
        .map(|e| e.headers.message_id().unwrap().to_owned())
        .collect();
    publish_all(&bus, envs).await;

    let calls: Counts = Arc::default();
    let crashing = Arc::new(AtomicBool::new(true));
    let stuck: Arc<Mutex<Vec<String>>> = Arc::default();
    let crash_at = n / 3;
    let workers = 4;
    let start = |bus: Bus| {
        let (calls, crashing, stuck) = (calls.clone(), crashing.clone(), stuck.clone());
        Consumer::builder(bus, pattern.clone(), &name)
            .handler(handler_fn(move |msg: Message| {
                let (calls, crashing, stuck) = (calls.clone(), crashing.clone(), stuck.clone());
                async move {
                    tokio::task::yield_now().await;
                    let p = text(&msg);
                    bump(&calls, p.clone());
                    // Past a third, the first instance "crashes" inside its handlers: the
                    // effect is recorded but the handler never returns.
                    if crashing.load(Ordering::SeqCst) && calls.lock().unwrap().len() >= crash_at {
                        stuck.lock().unwrap().push(p);
                        std::future::pending::<()>().await;
                    }
                    Outcome::Ok
                }
            }))
            .dedupe(store.clone())
            .workers(workers)
            .max_in_flight(in_flight)
            .ack_deadline(Duration::from_secs(1))
            .start()
    };
    let first = start(bus.clone()).await.expect("start first instance");
    wait_for(
        "every worker of the first instance stuck mid-handler",
        || stuck.lock().unwrap().len() == workers,
    )
    .await;
    let before_crash = first.stats();
    // The crash: no shutdown, and the connection goes away too.
    drop(first);
    factory.crash(bus).await;
    crashing.store(false, Ordering::SeqCst);
    let handled_first = calls.lock().unwrap().len();
    let stuck = stuck.lock().unwrap().clone();

    let bus = factory.reopen_bus(&ctx).await;
    let second = start(bus.clone()).await.expect("start second instance");
    wait_for("every message handled, the stuck ones again", || {
        let calls = calls.lock().unwrap();
        calls.len() == n && stuck.iter().all(|p| calls.get(p) == Some(&2))
    })
    .await;
    wait_stats("second instance settled", &second, |s| s.in_flight == 0).await;
    let s2 = second.shutdown(Duration::from_secs(10)).await;
    assert_eq!(s2.dead_lettered_total(), 0, "{s2:?}");
    assert_eq!(s2.in_flight, 0);

    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), n, "distinct messages handled");
    let total: u64 = calls.values().map(|c| u64::from(*c)).sum();
    let twice = calls.values().filter(|c| **c > 1).count();
    // Exactly the messages whose handlers never returned come again; every other one is
    // handled once (acked, or skipped as applied).
    for (p, c) in &calls {
        let expect = if stuck.contains(p) { 2 } else { 1 };
        assert_eq!(*c, expect, "{p} handled {c} times");
    }
    assert_all_applied(&*store, &name, &ids).await;
    // Nothing left unacked: a third instance sees nothing even after the ack deadline.
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(pattern.clone(), name.clone()))
        .await
        .expect("subscribe");
    let left = sub
        .fetch(10, Duration::from_millis(2500))
        .await
        .expect("fetch");
    assert!(left.is_empty(), "{} messages left unacked", left.len());
    CaseStatus::Passed(format!(
        "n={n}, crash after {handled_first} handled ({} ok by the first instance's stats, \
         {workers} handlers stuck); second instance: {} handled, {} skipped as applied; \
         {twice} handled twice (the stuck ones), {total} handler completions",
        before_crash.handled_ok, s2.handled_ok, s2.skipped_duplicates
    ))
}

/// Case 2 — dedupe by `message_id` (the same wire envelope published twice with
/// `publish_wire`) and by `dedupe_key` within a domain (also across partition keys), not
/// across domains; the store is durable and shared by a later instance on a new connection.
pub async fn dedupe_by_message_id_and_key(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("dedupe_by_message_id_and_key");
    let bus = factory.new_bus(&ctx).await;
    let store = factory.dedupe_store(&ctx).await;
    let orders = ctx.topic("orders", "req");
    let fills = ctx.topic("fills", "ev");
    let pattern = TopicPattern::parse(&format!("ampy.dev.*.v1.c{}.>", ctx.id())).expect("pattern");
    let name = ctx.consumer("dd");
    let mut stored = 0usize;

    let h = Headers::for_publish(ampybus::headers::RAW_BYTES_SCHEMA, "t@1", "t", "co_1");
    let same = bus
        .prepare(&orders, h, bytes::Bytes::from_static(b"dup-id"))
        .await
        .expect("prepare");
    let receipts = bus
        .publish_wire(vec![same.clone(), same.clone()])
        .await
        .expect("publish_wire");
    stored += receipts.iter().filter(|r| !r.duplicate).count();
    let dk = format!("dk-{}", ctx.id());
    for (p, key, dedupe) in [
        ("dk-1", "co_2", "a"),
        ("dk-2", "co_2", "a"),
        ("dk-3", "co_3", "b"),
        ("dk-4", "co_4", "b"),
    ] {
        let h = Headers::for_publish(ampybus::headers::RAW_BYTES_SCHEMA, "t@1", "t", key)
            .with(names::DEDUPE_KEY, format!("{dk}-{dedupe}"));
        let r = bus
            .publish(&orders, h, p.as_bytes().to_vec())
            .await
            .expect("publish");
        stored += usize::from(!r.duplicate);
    }
    // The same dedupe_key in another domain is not a duplicate.
    let h = Headers::for_publish(
        ampybus::headers::RAW_BYTES_SCHEMA,
        "t@1",
        "t",
        "acct-1|co_9",
    )
    .with(names::DEDUPE_KEY, format!("{dk}-a"));
    let r = bus
        .publish(&fills, h, b"fill".to_vec())
        .await
        .expect("publish");
    stored += usize::from(!r.duplicate);

    let expected_ok = 4u64;
    let expected_skips = (stored as u64) - expected_ok;
    let calls: Counts = Arc::default();
    let start = |bus: Bus| {
        Consumer::builder(bus, pattern.clone(), &name)
            .handler(counting(calls.clone()))
            .dedupe(store.clone())
            .start()
    };
    let handle = start(bus.clone()).await.expect("start");
    wait_stats("4 handled and the rest skipped", &handle, |s| {
        s.handled_ok == expected_ok && s.skipped_duplicates == expected_skips
    })
    .await;
    let s1 = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        (s1.handled_ok, s1.skipped_duplicates),
        (expected_ok, expected_skips)
    );
    {
        let calls = calls.lock().unwrap();
        let get = |p: &str| calls.get(p).copied().unwrap_or(0);
        assert_eq!(get("dup-id"), 1, "{calls:?}");
        assert_eq!((get("dk-1"), get("dk-2")), (1, 0), "{calls:?}");
        assert_eq!(get("dk-3") + get("dk-4"), 1, "{calls:?}");
        assert_eq!(get("fill"), 1, "{calls:?}");
    }

    // Later: the same envelope again, then a sentinel on its key; a new instance on a new
    // connection skips the duplicate (the store is durable and shared).
    let bus = factory.reopen_bus(&ctx).await;
    let r = bus
        .publish_wire(vec![same])
        .await
        .expect("publish_wire again");
    let second_skips = r.iter().filter(|r| !r.duplicate).count() as u64;
    let h = Headers::for_publish(ampybus::headers::RAW_BYTES_SCHEMA, "t@1", "t", "co_1");
    bus.publish(&orders, h, b"sentinel".to_vec())
        .await
        .expect("publish sentinel");
    let handle = start(bus.clone()).await.expect("start again");
    wait_stats("sentinel handled, duplicate skipped", &handle, |s| {
        s.handled_ok == 1 && s.skipped_duplicates == second_skips
    })
    .await;
    let s2 = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!((s2.handled_ok, s2.skipped_duplicates), (1, second_skips));
    let calls = calls.lock().unwrap();
    assert_eq!(calls.get("dup-id").copied(), Some(1));
    assert_eq!(calls.get("sentinel").copied(), Some(1));
    CaseStatus::Passed(format!(
        "{} stored, {} broker-side duplicates; consumer skipped {} then {}",
        stored + second_skips as usize,
        3 - receipts.iter().filter(|r| !r.duplicate).count() - second_skips as usize,
        s1.skipped_duplicates,
        s2.skipped_duplicates
    ))
}

/// Case 3 — per-key order with 8 workers, 100 keys and 100,000 × scale messages; the handler
/// yields at random. Within each key, handlers see 0, 1, 2, … with no gap or repeat.
pub async fn per_key_order(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("per_key_order");
    let bus = factory.new_bus(&ctx).await;
    let store = factory.dedupe_store(&ctx).await;
    let topic = ctx.topic("news", "order");
    let keys = 100usize;
    let per_key = scaled(100_000, keys) / keys;
    let total = per_key * keys;
    let t0 = Instant::now();
    let envs: Vec<Envelope> = (0..per_key)
        .flat_map(|i| (0..keys).map(move |k| (i, k)))
        .map(|(i, k)| raw(&topic, &format!("key{k}"), &format!("{k}:{i}")))
        .collect();
    publish_all(&bus, envs).await;
    let publish_time = t0.elapsed();

    let next: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(vec![0; keys]));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let running = Arc::new(AtomicU64::new(0));
    let max_running = Arc::new(AtomicU64::new(0));
    let (n2, e2, r2, m2) = (
        next.clone(),
        errors.clone(),
        running.clone(),
        max_running.clone(),
    );
    let t1 = Instant::now();
    let handle = Consumer::builder(bus.clone(), ctx.pattern("news"), &ctx.consumer("order"))
        .workers(8)
        .dedupe(store)
        .handler(handler_fn(move |msg: Message| {
            let (next, errors, running, max_running) =
                (n2.clone(), e2.clone(), r2.clone(), m2.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                max_running.fetch_max(now, Ordering::SeqCst);
                let p = text(&msg);
                let (k, i) = p.split_once(':').unwrap();
                let (k, i): (usize, usize) = (k.parse().unwrap(), i.parse().unwrap());
                let expect = {
                    let mut next = next.lock().unwrap();
                    let e = next[k];
                    next[k] = i + 1;
                    e
                };
                if rand::random_bool(0.5) {
                    tokio::task::yield_now().await;
                }
                if i != expect {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("key{k}: got {i} expected {expect}"));
                }
                running.fetch_sub(1, Ordering::SeqCst);
                Outcome::Ok
            }
        }))
        .start()
        .await
        .expect("start");
    wait_stats("every message handled", &handle, |s| {
        s.handled_ok == total as u64
    })
    .await;
    let stats = handle.shutdown(Duration::from_secs(10)).await;
    let consume_time = t1.elapsed();
    assert_eq!(stats.handled_ok, total as u64);
    assert_eq!(stats.dead_lettered_total() + stats.retried, 0, "{stats:?}");
    let errors = errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "{} order violations, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(next.lock().unwrap().iter().all(|n| *n == per_key));
    let max_running = max_running.load(Ordering::SeqCst);
    assert!(max_running <= 8);
    CaseStatus::Passed(format!(
        "{total} messages over {keys} keys, 8 workers (max {max_running} handlers at once): \
         published in {publish_time:.2?}, consumed in {consume_time:.2?}"
    ))
}

/// Case 4 — retry counts and backoff bounds. Each of 4 messages fails k = 3 times then
/// succeeds: exactly 12 retries in the stats, 4 attempts each, and the delay before attempt
/// a + 1 is at most `policy.bound(a)` plus a generous slack. A message that always fails is
/// dead-lettered as `max_retries` after exactly `max_attempts` attempts.
pub async fn retry_counts_and_backoff(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("retry_counts_and_backoff");
    let bus = factory.new_bus(&ctx).await;
    let store = factory.dedupe_store(&ctx).await;
    let topic = ctx.topic("news", "retry");
    let k = 3usize;
    let msgs = 4usize;
    let policy = RetryPolicy {
        max_attempts: 5,
        min_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(80),
    };
    let slack = Duration::from_millis(750);
    let mut envs: Vec<Envelope> = (0..msgs)
        .map(|i| raw(&topic, &format!("k{i}"), &format!("flaky{i}")))
        .collect();
    envs.push(raw(&topic, "kx", "always"));
    publish_all(&bus, envs).await;

    let attempts: Arc<Mutex<HashMap<String, Vec<Instant>>>> = Arc::default();
    let a2 = attempts.clone();
    let handle = Consumer::builder(bus.clone(), ctx.pattern("news"), &ctx.consumer("retry"))
        .retry(policy)
        .dedupe(store)
        .ack_deadline(Duration::from_secs(10))
        .handler(handler_fn(move |msg: Message| {
            let attempts = a2.clone();
            async move {
                let p = text(&msg);
                let n = {
                    let mut a = attempts.lock().unwrap();
                    let v = a.entry(p.clone()).or_default();
                    v.push(Instant::now());
                    v.len()
                };
                if p == "always" || n <= k {
                    Outcome::Retry { after: None }
                } else {
                    Outcome::Ok
                }
            }
        }))
        .start()
        .await
        .expect("start");
    let stats = wait_stats(
        "flaky ones handled, the other dead-lettered",
        &handle,
        |s| s.handled_ok == msgs as u64 && s.dlq(DlqCode::MaxRetries) == 1 && s.in_flight == 0,
    )
    .await;
    let stats = {
        let _ = stats;
        handle.shutdown(Duration::from_secs(10)).await
    };
    let max_attempts = policy.max_attempts as usize;
    assert_eq!(stats.handled_ok, msgs as u64);
    assert_eq!(stats.dlq(DlqCode::MaxRetries), 1, "{stats:?}");
    assert_eq!(stats.dead_lettered_total(), 1, "{stats:?}");
    assert_eq!(
        stats.retried,
        (msgs * k + (max_attempts - 1)) as u64,
        "retries recorded: {stats:?}"
    );
    let attempts = attempts.lock().unwrap();
    let mut worst = Duration::ZERO;
    for (p, times) in attempts.iter() {
        let expect = if p == "always" { max_attempts } else { k + 1 };
        assert_eq!(times.len(), expect, "{p}: attempts");
        for (a, w) in times.windows(2).enumerate() {
            let delay = w[1] - w[0];
            let bound = policy.bound(a as u32 + 1);
            worst = worst.max(delay.saturating_sub(bound));
            assert!(
                delay <= bound + slack,
                "{p}: delay before attempt {} was {delay:?}, bound {bound:?} + slack {slack:?}",
                a + 2
            );
        }
    }
    CaseStatus::Passed(format!(
        "{} retries recorded ({msgs}×{k} + {} before max_retries); worst delay over its bound: \
         {worst:.2?} (slack {slack:?})",
        stats.retried,
        max_attempts - 1
    ))
}

/// Case 5 — DLQ contents and a redrive. A poison message lands in `ampy.{env}.dlq.v1.{domain}`
/// with `dlq_reason` (`handler_error: …`), `original_topic`, `retry_count`, `dlq_at`,
/// `dlq_consumer`, `payload_hash`, `original_message_id` and the original bytes; then
/// [`redrive`] sends it back to a consumer of the same name whose handler now succeeds: it is
/// handled exactly once (new `message_id`, `redrive_of` = the original id, `retry_count` + 1,
/// no DLQ-only header), and dedupe does not swallow it.
pub async fn dlq_contents_and_redrive(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("dlq_contents_and_redrive");
    let bus = factory.new_bus(&ctx).await;
    let store = factory.dedupe_store(&ctx).await;
    let topic = ctx.topic("news", "dlq");
    let name = ctx.consumer("dlq");
    let poison = raw(&topic, "kp", "poison");
    let poison_id = poison.headers.message_id().unwrap().to_owned();
    publish_all(&bus, vec![poison.clone(), raw(&topic, "kg", "good")]).await;

    let fixed = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Headers>>> = Arc::default();
    let calls: Counts = Arc::default();
    let start = |bus: Bus| {
        let (fixed, seen, calls) = (fixed.clone(), seen.clone(), calls.clone());
        Consumer::builder(bus, ctx.pattern("news"), &name)
            .dedupe(store.clone())
            .handler(handler_fn(move |msg: Message| {
                let (fixed, seen, calls) = (fixed.clone(), seen.clone(), calls.clone());
                async move {
                    let p = text(&msg);
                    bump(&calls, p.clone());
                    if p == "poison" {
                        seen.lock().unwrap().push(msg.headers.clone());
                        if !fixed.load(Ordering::SeqCst) {
                            return Outcome::DeadLetter("bad payload".into());
                        }
                    }
                    Outcome::Ok
                }
            }))
            .start()
    };
    let handle = start(bus.clone()).await.expect("start");
    wait_stats("good handled, poison dead-lettered", &handle, |s| {
        s.handled_ok == 1 && s.dlq(DlqCode::HandlerError) == 1 && s.in_flight == 0
    })
    .await;
    let s1 = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!((s1.handled_ok, s1.dead_lettered_total()), (1, 1), "{s1:?}");

    let dlq_topic = topic.dlq_topic();
    assert_eq!(dlq_topic.as_str(), "ampy.dev.dlq.v1.news");
    let mine = topic.as_str().to_owned();
    let dlq = read_until(
        &bus,
        &TopicPattern::parse(dlq_topic.as_str()).unwrap(),
        |d| d.envelope.headers.get(names::ORIGINAL_TOPIC) == Some(mine.as_str()),
        |got| !got.is_empty(),
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(dlq.len(), 1);
    let d = &dlq[0].envelope;
    let h = &d.headers;
    assert_eq!(&d.payload[..], b"poison", "original bytes");
    let reason = h.get(names::DLQ_REASON).expect("dlq_reason");
    assert_eq!(
        DlqCode::from_reason(reason),
        DlqCode::HandlerError,
        "{reason}"
    );
    assert!(reason.contains("bad payload"), "{reason}");
    assert_eq!(h.get(names::ORIGINAL_TOPIC), Some(topic.as_str()));
    let retry_count = h.retry_count().expect("retry_count");
    assert_eq!(retry_count, 1, "one attempt, nothing carried in");
    assert!(ampybus::ids::is_canonical_time(
        h.get(names::DLQ_AT).expect("dlq_at")
    ));
    assert_eq!(h.get(names::DLQ_CONSUMER), Some(name.as_str()));
    assert_eq!(
        h.get(names::PAYLOAD_HASH),
        Some(sha256_tag(&poison.payload).as_str())
    );
    assert_eq!(h.get(ORIGINAL_MESSAGE_ID), Some(poison_id.as_str()));
    assert_eq!(h.partition_key(), Some("kp"));

    // Redrive to a consumer whose handler now succeeds.
    fixed.store(true, Ordering::SeqCst);
    let bus = factory.reopen_bus(&ctx).await;
    let sent = redrive(&bus, d).await.expect("redrive");
    let new_id = sent.headers.message_id().unwrap().to_owned();
    assert_ne!(new_id, poison_id);
    assert_ne!(Some(new_id.as_str()), h.message_id());
    let handle = start(bus.clone()).await.expect("start again");
    wait_stats("redriven message handled", &handle, |s| {
        s.handled_ok == 1 && s.in_flight == 0
    })
    .await;
    let s2 = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        (
            s2.handled_ok,
            s2.skipped_duplicates,
            s2.dead_lettered_total()
        ),
        (1, 0, 0),
        "{s2:?}"
    );
    assert_eq!(calls.lock().unwrap().get("poison").copied(), Some(2));
    assert_eq!(calls.lock().unwrap().get("good").copied(), Some(1));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    let r = &seen[1];
    assert_eq!(r.message_id(), Some(new_id.as_str()));
    assert_eq!(r.get(names::REDRIVE_OF), Some(poison_id.as_str()));
    assert_eq!(r.retry_count(), Some(retry_count + 1));
    for name in crate::support::DLQ_ONLY_HEADERS {
        assert_eq!(r.get(name), None, "{name} left on the redriven message");
    }
    CaseStatus::Passed(format!(
        "dead-lettered with `{reason}`, retry_count {retry_count}; redriven as {new_id} and \
         handled once"
    ))
}

/// Applies a stored message through an idempotent path: skipped when the store says
/// `consumer` applied it, else the effect is counted and the message recorded.
async fn apply_once(
    store: &dyn DedupeStore,
    consumer: &str,
    m: &StoredMessage,
    effects: &Counts,
) -> bool {
    let topic = m.envelope.topic().expect("topic");
    let keys = dedupe_keys(&m.envelope.headers, topic.domain());
    if store.is_applied(consumer, &keys).await.expect("is_applied") {
        return false;
    }
    bump(
        effects,
        String::from_utf8_lossy(&m.envelope.payload).into_owned(),
    );
    store
        .record_applied(consumer, &keys)
        .await
        .expect("record_applied");
    true
}

async fn read_all_pages(bus: &Bus, mut q: WindowQuery) -> Vec<StoredMessage> {
    let replay = bus.replay().expect("replay reader");
    q.limit = 7;
    let mut out: Vec<StoredMessage> = Vec::new();
    loop {
        let page = replay.read_window(&q).await.expect("read_window");
        let Some(last) = page.last() else { break };
        q.after_sequence = last.sequence;
        out.extend(page);
    }
    out
}

fn payloads(ms: &[StoredMessage]) -> Vec<String> {
    ms.iter()
        .map(|m| String::from_utf8_lossy(&m.envelope.payload).into_owned())
        .collect()
}

/// Case 6 — replay by time window (`keys == false`) or by keys (`keys == true`) with no
/// double-apply. Three time slices of 40 messages over 5 keys; a live consumer applies all.
/// The window `[t1, t2)` returns exactly the middle slice in publish order (a key query exactly
/// the chosen keys' messages, also combined with the window); pushing them through the
/// idempotent path applies nothing for the live consumer, and applies each exactly once for a
/// fresh one even when replayed twice.
pub async fn replay_window_and_keys(factory: &dyn TransportFactory, keys: bool) -> CaseStatus {
    let caps = factory.capabilities();
    if !caps.replay_by_time || (keys && !caps.replay_by_keys) {
        return CaseStatus::NotApplicable("needs `replay_by_time` (and `replay_by_keys`)".into());
    }
    let ctx = TestContext::new(if keys { "replay_keys" } else { "replay_window" });
    let bus = factory.new_bus(&ctx).await;
    let store = factory.dedupe_store(&ctx).await;
    let topic = ctx.topic("news", "replay");
    let per = 40;
    let slice = |s: usize| -> Vec<Envelope> {
        (0..per)
            .map(|i| raw(&topic, &format!("k{}", i % 5), &format!("s{s}:{i}")))
            .collect()
    };
    let gap = chrono::Duration::milliseconds(5);
    publish_all(&bus, slice(0)).await;
    clock_past(chrono::Utc::now() + gap).await;
    let t1 = chrono::Utc::now();
    clock_past(t1 + gap).await;
    publish_all(&bus, slice(1)).await;
    clock_past(chrono::Utc::now() + gap).await;
    let t2 = chrono::Utc::now();
    clock_past(t2 + gap).await;
    publish_all(&bus, slice(2)).await;

    // The live consumer applies everything once.
    let live = ctx.consumer("live");
    let effects: Counts = Arc::default();
    let handle = Consumer::builder(bus.clone(), ctx.pattern("news"), &live)
        .dedupe(store.clone())
        .handler(counting(effects.clone()))
        .start()
        .await
        .expect("start");
    wait_stats("all applied live", &handle, |s| {
        s.handled_ok == 3 * per as u64
    })
    .await;
    handle.shutdown(Duration::from_secs(10)).await;

    let mut q = WindowQuery::new(ctx.pattern("news"));
    let expected: Vec<String>;
    if keys {
        q.keys = Some(vec!["k1".into(), "k3".into()]);
        let got = read_all_pages(&bus, q.clone()).await;
        let want: Vec<String> = (0..3)
            .flat_map(|s| {
                (0..per)
                    .filter(|i| i % 5 == 1 || i % 5 == 3)
                    .map(move |i| format!("s{s}:{i}"))
            })
            .collect();
        assert_eq!(payloads(&got), want, "key query");
        q.start = Some(t1);
        q.end = Some(t2);
        expected = want.into_iter().filter(|p| p.starts_with("s1:")).collect();
    } else {
        q.start = Some(t1);
        q.end = Some(t2);
        expected = (0..per).map(|i| format!("s1:{i}")).collect();
    }
    let got = read_all_pages(&bus, q).await;
    assert_eq!(payloads(&got), expected, "window [t1, t2)");

    // Through the idempotent path: nothing new for the live consumer …
    let mut applied = 0;
    for m in &got {
        applied += usize::from(apply_once(&*store, &live, m, &effects).await);
    }
    assert_eq!(
        applied, 0,
        "replay applied effects twice for the live consumer"
    );
    assert_eq!(effects.lock().unwrap().len(), 3 * per);
    assert!(effects.lock().unwrap().values().all(|c| *c == 1));
    // … and exactly once for a fresh consumer, even when replayed twice.
    let fresh = ctx.consumer("rebuild");
    let rebuilt: Counts = Arc::default();
    for round in 0..2 {
        let mut applied = 0;
        for m in &got {
            applied += usize::from(apply_once(&*store, &fresh, m, &rebuilt).await);
        }
        assert_eq!(applied, if round == 0 { expected.len() } else { 0 });
    }
    let rebuilt = rebuilt.lock().unwrap();
    assert_eq!(rebuilt.len(), expected.len());
    assert!(rebuilt.values().all(|c| *c == 1));
    CaseStatus::Passed(format!(
        "3 slices of {per}; {} returned{}; 0 re-applied, {} applied once by a fresh consumer",
        got.len(),
        if keys {
            " for keys k1,k3 in [t1, t2) (and 48 over all time)"
        } else {
            " for [t1, t2)"
        },
        expected.len()
    ))
}

/// Case 7 — graceful shutdown loses nothing. With handlers in flight, `shutdown(deadline)`;
/// then a new instance on a new connection: every message handled exactly once in total,
/// none twice, nothing skipped (with [`crate::Capabilities::prefix_acks`]: skips of applied
/// messages, at most the first instance's in-flight bound).
pub async fn graceful_shutdown_loses_nothing(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("graceful_shutdown_loses_nothing");
    let bus = factory.new_bus(&ctx).await;
    let store = factory.dedupe_store(&ctx).await;
    let topic = ctx.topic("news", "sd");
    let name = ctx.consumer("sd");
    let n = scaled(400, 50);
    let in_flight = 32;
    let envs = (0..n)
        .map(|i| raw(&topic, &format!("k{}", i % 20), &format!("m{i}")))
        .collect();
    publish_all(&bus, envs).await;

    let calls: Counts = Arc::default();
    let running = Arc::new(AtomicU64::new(0));
    let start = |bus: Bus| {
        let (calls, running) = (calls.clone(), running.clone());
        Consumer::builder(bus, ctx.pattern("news"), &name)
            .workers(4)
            .max_in_flight(in_flight)
            .dedupe(store.clone())
            .handler(handler_fn(move |msg: Message| {
                let (calls, running) = (calls.clone(), running.clone());
                async move {
                    running.fetch_add(1, Ordering::SeqCst);
                    // Simulated work (not synchronisation).
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    bump(&calls, text(&msg));
                    running.fetch_sub(1, Ordering::SeqCst);
                    Outcome::Ok
                }
            }))
            .start()
    };
    let first = start(bus.clone()).await.expect("start");
    wait_for("a quarter handled with handlers in flight", || {
        calls.lock().unwrap().len() >= n / 4 && running.load(Ordering::SeqCst) > 0
    })
    .await;
    let in_flight_at_shutdown = running.load(Ordering::SeqCst);
    let s1 = first.shutdown(Duration::from_secs(10)).await;
    assert_eq!(s1.in_flight, 0);
    assert_eq!(running.load(Ordering::SeqCst), 0, "a handler still running");
    let after_first = calls.lock().unwrap().len();
    assert_eq!(after_first as u64, s1.handled_ok, "handled but not acked");

    let bus = factory.reopen_bus(&ctx).await;
    let second = start(bus.clone()).await.expect("start again");
    wait_stats("the rest handled", &second, |s| {
        s.handled_ok == n as u64 - s1.handled_ok
    })
    .await;
    let s2 = second.shutdown(Duration::from_secs(10)).await;
    assert_eq!(s1.handled_ok + s2.handled_ok, n as u64);
    if factory.capabilities().prefix_acks {
        // Acked after an unacked (released) one of the same partition: delivered again and
        // skipped as applied; at most what the first instance had in flight.
        assert!(s2.skipped_duplicates <= in_flight as u64, "{s2:?}");
    } else {
        assert_eq!(s2.skipped_duplicates, 0, "{s2:?}");
    }
    let calls = calls.lock().unwrap();
    assert_eq!(calls.len(), n);
    assert!(calls.values().all(|c| *c == 1), "a message applied twice");
    CaseStatus::Passed(format!(
        "n={n}: {} handled before shutdown ({in_flight_at_shutdown} handlers in flight at the \
         call, {} released), {} after ({} skipped as applied); none twice",
        s1.handled_ok, s1.released, s2.handled_ok, s2.skipped_duplicates
    ))
}

/// Case 8 — backpressure: bounded in flight. With `max_in_flight = 4`, 8 workers and a handler
/// that blocks, at most 4 messages are ever in flight (handlers running and the runtime's own
/// count; the maximum reached is exactly 4), and publishing keeps working meanwhile.
pub async fn backpressure_bounded_in_flight(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("backpressure_bounded_in_flight");
    let bus = factory.new_bus(&ctx).await;
    let store = factory.dedupe_store(&ctx).await;
    let topic = ctx.topic("news", "bp");
    let m = 4u64;
    let first = 64;
    let more = 200;
    publish_all(
        &bus,
        (0..first)
            .map(|i| raw(&topic, &format!("k{i}"), &format!("a{i}")))
            .collect(),
    )
    .await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let running = Arc::new(AtomicU64::new(0));
    let max_running = Arc::new(AtomicU64::new(0));
    let (g2, r2, m2) = (gate.clone(), running.clone(), max_running.clone());
    let handle = Consumer::builder(bus.clone(), ctx.pattern("news"), &ctx.consumer("bp"))
        .workers(8)
        .max_in_flight(m as usize)
        .dedupe(store)
        .handler(handler_fn(move |_msg: Message| {
            let (gate, running, max_running) = (g2.clone(), r2.clone(), m2.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                max_running.fetch_max(now, Ordering::SeqCst);
                gate.acquire().await.expect("gate").forget();
                running.fetch_sub(1, Ordering::SeqCst);
                Outcome::Ok
            }
        }))
        .start()
        .await
        .expect("start");
    let mut max_in_flight = 0u64;
    wait_stats("handlers blocked at the bound", &handle, |s| {
        running.load(Ordering::SeqCst) == m && s.in_flight == m
    })
    .await;
    // Publishing keeps working while the consumer is full.
    let envs = (0..more)
        .map(|i| raw(&topic, &format!("k{i}"), &format!("b{i}")))
        .collect();
    tokio::time::timeout(hang_timeout(), publish_all(&bus, envs))
        .await
        .expect("publishing blocked behind a full consumer");
    let s = handle.stats();
    max_in_flight = max_in_flight.max(s.in_flight);
    assert_eq!(s.handled_ok, 0);
    assert!(s.in_flight <= m, "{s:?}");
    assert_eq!(running.load(Ordering::SeqCst), m);

    gate.add_permits(1_000_000);
    let total = (first + more) as u64;
    let start = Instant::now();
    loop {
        let s = handle.stats();
        max_in_flight = max_in_flight.max(s.in_flight);
        if s.handled_ok == total {
            break;
        }
        assert!(
            start.elapsed() < hang_timeout(),
            "timed out draining: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let s = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(s.handled_ok, total);
    let max_running = max_running.load(Ordering::SeqCst);
    assert_eq!(max_running, m, "handlers at once");
    assert!(max_in_flight <= m, "in flight reached {max_in_flight}");
    CaseStatus::Passed(format!(
        "max_in_flight={m}, 8 workers: max {max_running} handlers at once, max {max_in_flight} \
         in flight (sampled); {more} published while full"
    ))
}

/// Case 9 — backpressure drop accounting: best-effort topics drop or conflate under a full
/// queue, in the order `ampybus::runtime::ShedClass` documents, every drop counted by reason.
///
/// A `Producer` with capacity 8, every ticks topic of the case best-effort, paused: a fixed
/// mix of 16 sends on `trade`, `quote` and `heartbeat` topics over keys A, M, N, B (heartbeats:
/// their source id `XNAS`, the contract's heartbeat key) gives exact
/// outcomes (8 queued, 3 conflated — the newest queued quote of the key replaced in place —,
/// 3 heartbeats and 2 quotes dropped, counted by reason). After `resume` + `flush`, a durable
/// consumer receives exactly the 8 survivors, in order within each key: every trade in order
/// per key, the latest quote of A, M and N. A heartbeat sent with room is published.
///
/// Lag part (when the bus reports consumer lag): that consumer, created before anything was
/// published and never run, lags by exactly what is stored; with `max_pending = 4` the
/// producer reports lagging, drops a heartbeat and conflates a quote of a queued key (reason
/// `lag`), never touches a trade. After the consumer ran, its lag is 0.
pub async fn best_effort_drop_conflate(factory: &dyn TransportFactory) -> CaseStatus {
    let ctx = TestContext::new("best_effort_drop_conflate");
    let bus = factory.new_bus(&ctx).await;
    let store = factory.dedupe_store(&ctx).await;
    let pattern = ctx.ticks_pattern();
    let consumer = ctx.consumer("ticks");
    let with_lag = bus.has_consumer_lag();
    // Create the durable consumer now (earliest start), so everything published below is its
    // backlog.
    drop(
        bus.subscribe(SubscribeSpec::durable(pattern.clone(), &consumer))
            .await
            .expect("subscribe"),
    );
    let mut builder = Producer::builder(bus.clone())
        .capacity(8)
        .best_effort(pattern.clone());
    if with_lag {
        // Read only on demand (refresh_lag): the background poll is an hour away.
        builder = builder
            .slow_down_on_lag(&consumer, 4)
            .lag_poll_interval(Duration::from_secs(3600));
    }
    let producer = builder.start().expect("producer");
    let sym = |k: &str| match k {
        "A" => "AAPL",
        "M" => "MSFT",
        "N" => "NVDA",
        _ => "BRKB",
    };
    let send = |kind: &'static str, k: &'static str, label: &'static str| {
        let topic = if kind == "heartbeat" {
            ctx.ticks_topic(kind, "XNAS")
        } else {
            ctx.ticks_topic(kind, sym(k))
        };
        // A heartbeat's key is its source id (the topic's last token), not `SYMBOL.MIC`.
        let key = if kind == "heartbeat" {
            "XNAS".to_owned()
        } else {
            format!("{}.XNAS", sym(k))
        };
        let h = Headers::for_publish(
            ampybus::headers::RAW_BYTES_SCHEMA,
            "conformance@1",
            "conformance",
            &key,
        );
        let p = &producer;
        async move {
            p.send(&topic, h, label.as_bytes().to_vec())
                .await
                .expect("send")
        }
    };
    use SendOutcome::{Conflated, Dropped, Queued};
    let script: [(&str, &str, &str, SendOutcome); 16] = [
        ("heartbeat", "A", "hb1", Queued),
        ("trade", "A", "tA1", Queued),
        ("quote", "A", "qA1", Queued),
        ("quote", "M", "qM1", Queued),
        ("heartbeat", "A", "hb2", Queued),
        ("trade", "M", "tM1", Queued),
        ("quote", "A", "qA2", Queued),
        ("trade", "A", "tA2", Queued),
        // Full from here on.
        ("quote", "A", "qA3", Conflated), // replaces qA2
        ("heartbeat", "A", "hb3", Dropped(DropReason::Heartbeat)), // incoming heartbeat
        ("quote", "M", "qM2", Conflated), // replaces qM1
        ("quote", "N", "qN1", Queued),    // evicts hb1
        ("trade", "M", "tM2", Queued),    // evicts hb2
        ("quote", "N", "qN2", Conflated), // replaces qN1
        ("quote", "B", "qB1", Dropped(DropReason::QuoteBook)), // nothing lower to evict
        ("trade", "A", "tA3", Queued),    // evicts qA1
    ];
    producer.pause();
    for (i, (kind, k, label, want)) in script.iter().enumerate() {
        let got = send(kind, k, label).await;
        assert_eq!(got, *want, "send {} ({label})", i + 1);
    }
    let s = producer.stats();
    assert_eq!((s.accepted, s.queued, s.published), (16, 8, 0), "{s:?}");
    assert_eq!(
        s.dropped,
        DropCounts {
            heartbeat: 3,
            quote_book: 2,
            conflated: 3,
            lag: 0
        },
        "{s:?}"
    );
    assert_eq!(s.conflated, 3);
    producer.resume();
    producer.flush().await.expect("flush");
    let s = producer.stats();
    assert_eq!(
        (s.queued, s.in_flight, s.published, s.failed),
        (0, 0, 8, 0),
        "{s:?}"
    );
    assert_eq!(s.accepted, s.published + s.dropped.total());
    // With room again, a heartbeat is published.
    assert_eq!(send("heartbeat", "A", "hb4").await, Queued);
    producer.flush().await.expect("flush");
    let mut expected = vec![
        "tA1", "qM2", "tM1", "qA3", "tA2", "qN2", "tM2", "tA3", "hb4",
    ];

    let mut lag_detail = "lag part skipped: the bus cannot report consumer lag".to_owned();
    if with_lag {
        let lag = bus
            .consumer_lag(&consumer)
            .await
            .expect("lag")
            .expect("consumer exists");
        assert_eq!((lag.pending, lag.in_flight), (9, 0));
        assert!(producer.refresh_lag().await.expect("refresh lag"));
        assert!(producer.lagging() && producer.stats().lagging);
        producer.pause();
        assert_eq!(
            send("heartbeat", "A", "hb5").await,
            Dropped(DropReason::Lag)
        );
        assert_eq!(send("quote", "A", "qA4").await, Queued);
        assert_eq!(send("quote", "A", "qA5").await, Conflated);
        assert_eq!(send("trade", "A", "tA4").await, Queued);
        let s = producer.stats();
        assert_eq!((s.dropped.lag, s.queued, s.conflated), (2, 2, 4), "{s:?}");
        producer.resume();
        producer.flush().await.expect("flush");
        expected.extend(["qA5", "tA4"]);
        lag_detail = format!(
            "lag part: pending {} > 4 → 1 heartbeat dropped, 1 quote conflated (reason lag)",
            lag.pending
        );
    }
    let final_stats = producer.close().await.expect("close");
    assert_eq!(final_stats.published, expected.len() as u64);
    assert_eq!(
        final_stats.accepted,
        final_stats.published + final_stats.dropped.total()
    );

    // Received per partition key, in handling order (the runtime keeps order within a key;
    // across keys it interleaves).
    let got: Arc<Mutex<BTreeMap<String, Vec<String>>>> = Arc::default();
    let g2 = got.clone();
    let handle = Consumer::builder(bus.clone(), pattern.clone(), &consumer)
        .workers(1)
        .dedupe(store)
        .handler(handler_fn(move |msg: Message| {
            let got = g2.clone();
            async move {
                let key = msg.headers.partition_key().unwrap_or_default().to_owned();
                got.lock().unwrap().entry(key).or_default().push(text(&msg));
                Outcome::Ok
            }
        }))
        .start()
        .await
        .expect("start consumer");
    let n = expected.len() as u64;
    wait_stats("every survivor handled", &handle, |s| s.handled_ok >= n).await;
    let s = handle.shutdown(Duration::from_secs(10)).await;
    assert_eq!(s.handled_ok, n, "{s:?}");
    // Heartbeats were sent with key XNAS (their source id); every other label names its key
    // second (`tA1`).
    let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for label in &expected {
        let key = if label.starts_with("hb") {
            "XNAS".to_owned()
        } else {
            format!("{}.XNAS", sym(&label[1..2]))
        };
        want.entry(key).or_default().push((*label).to_owned());
    }
    assert_eq!(*got.lock().unwrap(), want);
    if with_lag {
        let lag = bus
            .consumer_lag(&consumer)
            .await
            .expect("lag")
            .expect("consumer exists");
        assert_eq!(lag.pending, 0);
    }
    CaseStatus::Passed(format!(
        "capacity 8, 16 sends: 8 queued, 3 conflated, dropped heartbeat 3 / quote_book 2; \
         {} published, received in per-key order; {lag_detail}",
        expected.len()
    ))
}
