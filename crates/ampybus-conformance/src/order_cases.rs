//! Per-key order across the instances of one durable consumer name.

use crate::status::CaseStatus;
use crate::support::{
    TestContext, TransportFactory, assert_all_applied, publish_all, raw, scaled, wait_for,
    wait_stats,
};
use ampybus::runtime::{Consumer, ConsumerHandle, Message, Outcome, RetryPolicy, handler_fn};
use ampybus::transport::SubscribeSpec;
use ampybus::{Bus, Envelope};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What happens a third of the way through [`order_with_disruption`].
///
/// ```
/// use ampybus_conformance::Disruption;
/// struct Nothing;
/// #[async_trait::async_trait]
/// impl Disruption for Nothing {
///     fn label(&self) -> String {
///         "nothing".into()
///     }
/// }
/// assert!(!Nothing.kills());
/// ```
#[async_trait]
pub trait Disruption: Send + Sync {
    /// A label for the report.
    fn label(&self) -> String;
    /// Whether an active instance is killed (the one whose handler first sees a third completed) (its handlers never
    /// return, its consumer dropped without shutdown, its connection crashed).
    fn kills(&self) -> bool {
        false
    }
    /// Called once at the disruption point with the consumer's name (e.g. restart the broker,
    /// delete the consumer's lease).
    async fn disrupt(&self, _consumer: &str) {}
}

/// The disruption of [`order_across_instances`]: the active instance is killed.
///
/// ```
/// use ampybus_conformance::{Disruption, KillActive};
/// assert!(KillActive.kills());
/// ```
pub struct KillActive;

#[async_trait]
impl Disruption for KillActive {
    fn label(&self) -> String {
        "the active instance killed".to_owned()
    }
    fn kills(&self) -> bool {
        true
    }
}

/// No instance is the victim yet.
const NONE: usize = usize::MAX;

/// The seed of the retry decisions (deterministic: the same attempts fail on every run).
const SEED: u64 = 0x05ee_d0f0_bde5;

/// splitmix64 of the seed, key, index and attempt: whether that attempt asks for a retry
/// (about one in five, at most two per message).
fn retries(key: usize, index: usize, attempt: u32) -> bool {
    if attempt > 2 {
        return false;
    }
    let mut z = SEED
        ^ (key as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (index as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)
        ^ u64::from(attempt).wrapping_mul(0x94d0_49bb_1331_11eb);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z.is_multiple_of(5)
}

/// Marks a handler of `key` running on an instance while it lives (a handler future dropped
/// with its instance stops counting as running).
struct Running {
    book: Arc<Mutex<Book>>,
    key: usize,
    at: (usize, usize),
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut b = self.book.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = b.running.get_mut(&self.key) {
            r.retain(|x| *x != self.at);
        }
    }
}

#[derive(Default)]
struct Book {
    /// Per key: (index, instance, delivery count) of every successful completion, in
    /// completion order.
    done: HashMap<usize, Vec<(usize, usize, u32)>>,
    /// Attempts per message.
    attempts: HashMap<(usize, usize), u32>,
    /// Handlers of each key running now (any instance): (instance, index).
    running: HashMap<usize, Vec<(usize, usize)>>,
    /// A handler started while another of its key was running.
    overlaps: Vec<String>,
    /// Handlers of the victim that "died" (started after the kill point, never finished).
    dead: usize,
    retried: u64,
    /// The instance that completed the latest message.
    last_by: usize,
}

/// Case — per-key order across instances. Three instances of one durable consumer (same
/// name, each its own `Consumer` on its own connection, strict mode, 4 workers) read orders
/// of 12 interleaved keys; handlers ask for a retry on some attempts (a seeded hash: the same
/// ones every run, at most two per message). A third of the way through, the instance whose
/// handler first sees a third completed (an active one) is killed: its handlers from then on never return, its
/// consumer is dropped without shutdown and its connection goes as a crashed process's would.
///
/// Asserted, per key: the messages' first successful completions are exactly the key's
/// messages in publish order (nothing lost, none out of order); a message is completed a
/// second time only when the killed instance completed it and the crash cut its ack, and
/// then the key's later messages come after it — the key's completions are `0..=a` followed
/// by `b..n` with `b <= a + 1`, every one of `b..=a` first completed by the killed instance.
/// No two handlers of one key ever run at once, across instances. Exact counts: completions
/// = messages + those repeats; nothing dead-lettered; nothing left unacknowledged.
pub async fn order_across_instances(factory: &dyn TransportFactory) -> CaseStatus {
    order_with_disruption(factory, &KillActive).await
}

/// The flow of [`order_across_instances`] with another disruption at the third (a broker
/// restart, a removed lease, …; see [`Disruption`]), with the same assertions; a repeat is
/// then allowed for a message completed by any instance whose ack the disruption cut (still
/// in order: the key's later messages come after it). The report says how long after the
/// disruption the first message was completed by an instance other than the killed one.
pub async fn order_with_disruption(
    factory: &dyn TransportFactory,
    disruption: &dyn Disruption,
) -> CaseStatus {
    let ctx = TestContext::new("order_across_instances");
    let bus = factory.new_bus(&ctx).await;
    let store = factory.dedupe_store(&ctx).await;
    let topic = ctx.topic("orders", "xi");
    let pattern = ctx.pattern("orders");
    let name = ctx.consumer("xi");
    let keys = 12usize;
    let per_key = scaled(600, 60) / keys;
    let n = per_key * keys;
    let envs: Vec<Envelope> = (0..per_key)
        .flat_map(|i| (0..keys).map(move |k| (k, i)))
        .map(|(k, i)| raw(&topic, &format!("co-{k}"), &format!("{k}:{i}")))
        .collect();
    let ids: Vec<String> = envs
        .iter()
        .map(|e| e.headers.message_id().unwrap().to_owned())
        .collect();
    publish_all(&bus, envs).await;

    let book: Arc<Mutex<Book>> = Arc::default();
    let victim = Arc::new(AtomicUsize::new(NONE));
    let completions = Arc::new(AtomicU64::new(0));
    let workers = 4;
    let kills = disruption.kills();
    let third = (n / 3) as u64;
    // Without a kill, handlers wait from the third until the disruption is over, so it
    // happens mid-run with deliveries in flight.
    let hold = Arc::new(std::sync::atomic::AtomicBool::new(!kills));
    let start = |bus: Bus, me: usize| {
        let (book, victim, completions, hold) = (
            book.clone(),
            victim.clone(),
            completions.clone(),
            hold.clone(),
        );
        Consumer::builder(bus, pattern.clone(), &name)
            .handler(handler_fn(move |msg: Message| {
                let (book, victim, completions, hold) = (
                    book.clone(),
                    victim.clone(),
                    completions.clone(),
                    hold.clone(),
                );
                async move {
                    let p = String::from_utf8_lossy(&msg.payload).into_owned();
                    let (k, i) = p.split_once(':').unwrap();
                    let (k, i): (usize, usize) = (k.parse().unwrap(), i.parse().unwrap());
                    let attempt = {
                        let mut b = book.lock().unwrap();
                        let r = b.running.entry(k).or_default();
                        r.push((me, i));
                        if r.len() > 1 {
                            let others = format!("{r:?}");
                            b.overlaps.push(format!(
                                "key {k}: message {i} started on instance {me} while others of its key ran: {others} (instance, index)"
                            ));
                        }
                        let a = b.attempts.entry((k, i)).or_default();
                        *a += 1;
                        *a
                    };
                    let running = Running {
                        book: book.clone(),
                        key: k,
                        at: (me, i),
                    };
                    tokio::task::yield_now().await;
                    while hold.load(Ordering::SeqCst) && completions.load(Ordering::SeqCst) >= third
                    {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    // A third of the way through, the instance whose handler sees it first (an
                    // active one) dies: from then on its handlers never finish.
                    if kills
                        && completions.load(Ordering::SeqCst) >= third
                        && victim
                            .compare_exchange(NONE, me, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                        || victim.load(Ordering::SeqCst) == me
                    {
                        drop(running);
                        book.lock().unwrap().dead += 1;
                        return std::future::pending::<Outcome>().await;
                    }
                    drop(running);
                    let mut b = book.lock().unwrap();
                    if retries(k, i, attempt) {
                        b.retried += 1;
                        return Outcome::Retry {
                            after: Some(Duration::from_millis(5)),
                        };
                    }
                    b.done.entry(k).or_default().push((i, me, msg.info.delivery_count));
                    b.last_by = me;
                    completions.fetch_add(1, Ordering::SeqCst);
                    Outcome::Ok
                }
            }))
            .dedupe(store.clone())
            .strict(true)
            .workers(workers)
            .max_in_flight(32)
            .retry(RetryPolicy {
                max_attempts: 10,
                min_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(20),
            })
            .ack_deadline(Duration::from_secs(3))
            .start()
    };
    let mut buses = Vec::new();
    let mut handles: Vec<Option<ConsumerHandle>> = Vec::new();
    for me in 0..3 {
        let b = factory.reopen_bus(&ctx).await;
        handles.push(Some(start(b.clone(), me).await.expect("start an instance")));
        buses.push(Some(b));
    }
    drop(bus);

    wait_for("a third of the messages completed", || {
        completions.load(Ordering::SeqCst) >= third
    })
    .await;
    let killed = if kills {
        wait_for("an instance died a third of the way through", || {
            victim.load(Ordering::SeqCst) != NONE
        })
        .await;
        Some(victim.load(Ordering::SeqCst))
    } else {
        None
    };
    let active = killed.unwrap_or(book.lock().unwrap().last_by);
    let at_kill = completions.load(Ordering::SeqCst);
    let disrupted = Instant::now();
    if let Some(killed) = killed {
        drop(handles[killed].take());
        factory.crash(buses[killed].take().unwrap()).await;
    }
    disruption.disrupt(&name).await;
    hold.store(false, Ordering::SeqCst);
    // How long until another instance (or, without a kill, any) completes a message.
    let before = completions.load(Ordering::SeqCst);
    wait_for("a message completed after the disruption", || {
        let b = book.lock().unwrap();
        let c = completions.load(Ordering::SeqCst);
        (c > before && Some(b.last_by) != killed) || c as usize >= n
    })
    .await;
    let resumed_after = disrupted.elapsed();

    wait_for("every message completed", || {
        let b = book.lock().unwrap();
        b.done
            .values()
            .map(|l| {
                let mut s: Vec<usize> = l.iter().map(|(i, _, _)| *i).collect();
                s.sort_unstable();
                s.dedup();
                s.len()
            })
            .sum::<usize>()
            == n
    })
    .await;
    let mut dead_lettered = 0;
    for h in handles.iter_mut() {
        if let Some(h) = h.take() {
            wait_stats("a surviving instance settled", &h, |s| s.in_flight == 0).await;
            let s = h.shutdown(Duration::from_secs(10)).await;
            dead_lettered += s.dead_lettered_total();
        }
    }
    assert_eq!(dead_lettered, 0, "nothing dead-lettered");

    let b = std::mem::take(&mut *book.lock().unwrap());
    assert!(
        b.overlaps.is_empty(),
        "{} overlaps, first: {:?}",
        b.overlaps.len(),
        &b.overlaps[..b.overlaps.len().min(3)]
    );
    let mut repeats = 0usize;
    for k in 0..keys {
        let list = b.done.get(&k).cloned().unwrap_or_default();
        let seq: Vec<usize> = list.iter().map(|(i, _, _)| *i).collect();
        // The one place where the completions step back (a replay of the killed instance's
        // unacknowledged tail), if any.
        let back: Vec<usize> = (1..seq.len())
            .filter(|&j| seq[j] != seq[j - 1] + 1)
            .collect();
        assert!(
            back.len() <= 1,
            "key {k}: completions out of order (index, instance, delivery count): {list:?}"
        );
        if let Some(&j) = back.first() {
            let (a, bb) = (seq[j - 1], seq[j]);
            assert!(
                bb <= a,
                "key {k}: message(s) {}..{bb} skipped: {seq:?}",
                a + 1
            );
            if let Some(killed) = killed {
                for (x, who, _) in &list[..j] {
                    if (bb..=a).contains(x) {
                        assert_eq!(
                            *who, killed,
                            "key {k}: message {x} completed twice but not first by the killed instance: {seq:?}"
                        );
                    }
                }
            }
            repeats += a + 1 - bb;
        }
        let mut expect = 0;
        for &x in &seq {
            if x == expect {
                expect += 1;
            }
        }
        assert_eq!(
            expect, per_key,
            "key {k}: first completions stop at {expect} of {per_key}: {seq:?}"
        );
        assert_eq!(seq.first().copied(), Some(0), "key {k}");
    }
    let total: usize = b.done.values().map(Vec::len).sum();
    assert_eq!(total, n + repeats, "completions = messages + repeats");
    assert!(
        repeats <= 32,
        "{repeats} repeats, more than the killed instance could hold unacknowledged"
    );
    assert!(b.retried > 0, "no attempt asked for a retry");
    let (retried, dead) = (b.retried, b.dead);
    assert_all_applied(&*store, &name, &ids).await;
    // Nothing left unacknowledged: another instance sees nothing after the ack deadline.
    let bus = factory.reopen_bus(&ctx).await;
    let mut spec = SubscribeSpec::durable(pattern.clone(), name.clone());
    spec.ack_deadline = Duration::from_secs(3);
    let mut sub = bus.subscribe(spec).await.expect("subscribe");
    let left = sub
        .fetch(64, Duration::from_millis(4000))
        .await
        .expect("fetch");
    // A broker killed -9 may lose acks it had not yet applied: those messages come again,
    // but only ones already applied (a consumer skips them). A consumer crash loses none.
    let lost_acks = left.len();
    if killed.is_some() {
        assert!(left.is_empty(), "{} messages left unacked", left.len());
    }
    for d in left {
        let id = d.envelope.headers.message_id().unwrap().to_owned();
        assert!(
            store
                .is_applied(&name, std::slice::from_ref(&id))
                .await
                .unwrap(),
            "{id} left unacked and not applied"
        );
    }
    CaseStatus::Passed(format!(
        "n={n} over {keys} keys, 3 instances; {} after {at_kill} completions (instance {active} \
         was active; {dead} handlers died with it); first completion after it {resumed_after:.2?} \
         later; {retried} retries; {repeats} completed again after the disruption cut their ack; \
         {total} completions; {lost_acks} acks lost by the broker (applied, would be skipped)",
        disruption.label()
    ))
}
