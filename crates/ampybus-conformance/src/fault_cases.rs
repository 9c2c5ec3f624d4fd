//! Faults in the middle of a run, the same flow on every transport: retrying publishers and a
//! consumer at work when the consumer process crashes, or when the broker is killed and
//! started again.

use crate::status::CaseStatus;
use crate::support::{TestContext, TransportFactory, hang_timeout, scaled};
use ampybus::runtime::{Consumer, Message, Outcome, Publisher, RetryPolicy, handler_fn};
use ampybus::{Bus, Headers};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    ConsumerCrash,
    BrokerRestart,
}

/// Case — a consumer process crashes mid-run: see [`broker_restart_mid_run`] for the flow;
/// here, a third of the way through, the consumer's handlers stop for good, its connection
/// goes ([`TransportFactory::crash`]) and it is dropped without shutdown, and a second
/// instance of the same name on a new connection finishes while the publishers go on.
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::consumer_crash_mid_run(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn consumer_crash_mid_run(factory: &dyn TransportFactory) -> CaseStatus {
    mid_run(factory, Fault::ConsumerCrash).await
}

/// Case — the broker killed -9 and restarted mid-run (needs `broker_restart`: a broker of the
/// case's own, storage kept, same address). 5,000 × scale messages (at least 2,000) published
/// one by one by 8 retrying `Publisher`s (100 attempts, 50–500 ms backoff) on 8 topics, and a
/// consumer (8 workers, 512 in flight, 5 s ack deadline, the factory's dedupe store) at work;
/// a third of the way through (and after something was handled), the disruption. Every
/// publish succeeds (retried through the outage), nothing hangs; every message is handled
/// (distinct = n), at most what was in flight (512) handled twice, nothing dead-lettered, and
/// where the bus reports lag the consumer gets to nothing pending or in flight while it runs
/// (acks the fault cut come back after the ack deadline and are skipped as applied).
///
/// ```no_run
/// # async fn f(factory: &dyn ampybus_conformance::TransportFactory) {
/// let status = ampybus_conformance::broker_restart_mid_run(factory).await;
/// println!("{status:?}");
/// # }
/// ```
pub async fn broker_restart_mid_run(factory: &dyn TransportFactory) -> CaseStatus {
    mid_run(factory, Fault::BrokerRestart).await
}

fn headers(key: &str) -> Headers {
    Headers::for_publish(
        ampybus::headers::RAW_BYTES_SCHEMA,
        "conformance@1",
        "conformance",
        key,
    )
}

async fn mid_run(factory: &dyn TransportFactory, fault: Fault) -> CaseStatus {
    let ctx = match fault {
        Fault::ConsumerCrash => TestContext::new("consumer_crash_mid_run"),
        Fault::BrokerRestart => TestContext::new("broker_restart_mid_run").own_broker(),
    };
    let pub_bus = factory.new_bus(&ctx).await;
    let store = factory.dedupe_store(&ctx).await;
    let n = scaled(5_000, 2_000);
    let publishers = 8usize;
    let max_in_flight = 512usize;
    let pattern = ctx.pattern("news");
    let name = ctx.consumer("midrun");
    let effects: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let start = |bus: Bus, dead: Arc<AtomicBool>| {
        let effects = effects.clone();
        Consumer::builder(bus, pattern.clone(), &name)
            .dedupe(store.clone())
            .workers(8)
            .max_in_flight(max_in_flight)
            .ack_deadline(Duration::from_secs(5))
            .handler(handler_fn(move |m: Message| {
                let (effects, dead) = (effects.clone(), dead.clone());
                async move {
                    if dead.load(Ordering::SeqCst) {
                        // The process is gone: nothing runs any more.
                        std::future::pending::<()>().await;
                    }
                    *effects
                        .lock()
                        .unwrap()
                        .entry(String::from_utf8_lossy(&m.payload).into_owned())
                        .or_default() += 1;
                    Outcome::Ok
                }
            }))
            .start()
    };
    let first_bus = factory.reopen_bus(&ctx).await;
    let dead = Arc::new(AtomicBool::new(false));
    let first = start(first_bus.clone(), dead.clone())
        .await
        .expect("start the consumer");

    let published = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let publisher = Publisher::new(pub_bus.clone()).with_policy(RetryPolicy {
            max_attempts: 100,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
        });
        let published = published.clone();
        let topic = ctx.topic("news", &format!("p{p}"));
        tasks.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for i in (p..n).step_by(publishers) {
                match publisher
                    .publish(&topic, headers(&format!("k{}", i % 32)), format!("m{i}"))
                    .await
                {
                    Ok(_) => {
                        published.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failed.push((i, e.to_string())),
                }
            }
            failed
        }));
    }

    let hang = hang_timeout();
    let t0 = Instant::now();
    while published.load(Ordering::SeqCst) < (n / 3) as u64 || effects.lock().unwrap().is_empty() {
        assert!(
            t0.elapsed() < hang,
            "no progress before the fault: {:?}",
            first.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_fault = (
        published.load(Ordering::SeqCst),
        effects.lock().unwrap().len(),
    );
    let (active, consumer_bus) = match fault {
        Fault::BrokerRestart => {
            factory.restart_broker(&ctx).await;
            (first, first_bus)
        }
        Fault::ConsumerCrash => {
            dead.store(true, Ordering::SeqCst);
            drop(first);
            factory.crash(first_bus).await;
            let bus = factory.reopen_bus(&ctx).await;
            let second = start(bus.clone(), Arc::new(AtomicBool::new(false)))
                .await
                .expect("start the second instance");
            (second, bus)
        }
    };

    for t in tasks {
        let failed = tokio::time::timeout(hang, t)
            .await
            .expect("a publisher hung")
            .expect("publisher task");
        assert!(
            failed.is_empty(),
            "publishes failed after retries: {:?}",
            &failed[..failed.len().min(5)]
        );
    }
    assert_eq!(published.load(Ordering::SeqCst), n as u64);
    // Every message handled, and — where the bus reports lag — nothing left behind at the
    // broker: an ack the fault cut is redelivered after the ack deadline, skipped as applied
    // and acked then.
    let with_lag = consumer_bus.has_consumer_lag();
    let t0 = Instant::now();
    let mut lag = None;
    loop {
        let done = effects.lock().unwrap().len();
        let s = active.stats();
        if done == n && s.in_flight == 0 {
            if !with_lag {
                break;
            }
            let l = consumer_bus
                .consumer_lag(&name)
                .await
                .expect("lag")
                .expect("the consumer exists");
            if (l.pending, l.in_flight) == (0, 0) {
                break;
            }
            lag = Some(l);
        }
        assert!(
            t0.elapsed() < hang,
            "timed out: {done} of {n} handled; {s:?}; lag {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settled_after = t0.elapsed();
    let stats = active.shutdown(Duration::from_secs(10)).await;
    let twice = {
        let effects = effects.lock().unwrap();
        assert_eq!(effects.len(), n, "distinct messages handled");
        effects.values().filter(|c| **c > 1).count()
    };
    // Handlers that finished but whose dedupe record and ack were cut by the fault may run
    // again; at most what was in flight then.
    assert!(
        twice <= max_in_flight,
        "{twice} messages handled more than once (more than were in flight)"
    );
    assert_eq!(stats.dead_lettered_total(), 0, "{stats:?}");
    let lag_text = match (with_lag, lag) {
        (false, _) => "lag not reported".to_owned(),
        (true, None) => "lag 0".to_owned(),
        (true, Some(l)) => format!(
            "lag 0 ({} cut acks redelivered and settled within {settled_after:.2?} of the \
             publishers' end)",
            l.in_flight
        ),
    };
    CaseStatus::Passed(format!(
        "n={n}, {publishers} retrying publishers; {} after {} published / {} handled; all \
         published and handled, {twice} handled twice, {} skipped as applied; {lag_text}",
        match fault {
            Fault::ConsumerCrash => "consumer crashed",
            Fault::BrokerRestart => "broker killed and restarted",
        },
        at_fault.0,
        at_fault.1,
        stats.skipped_duplicates
    ))
}
