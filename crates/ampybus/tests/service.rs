//! Handlers that return a `Result` and the `Service` on the embedded log: the cause of a
//! failure reaches the DLQ reason; several consumers and a producer in one service with exact
//! counts (and the ops endpoint reporting them); middleware that sees every message, enriches
//! it and refuses some; a service process stopped by SIGTERM (exit 0) and SIGINT (130) with
//! nothing lost. Waits poll counters with a generous timeout; no sleep synchronises.
//!
//! The signal test re-runs this test binary as a child with `AMPYBUS_CHILD_ROLE` set; the
//! child enters through `child_process_entry` (ignored when run on its own).

use ampybus::runtime::{
    DlqCode, Handler, HandlerError, Message, Outcome, Producer, RetryPolicy, handler_sync,
    handler_try, typed_try,
};
use ampybus::service::{Service, ServiceReport, StopReason};
use ampybus::transport::StartAt;
use ampybus::{Envelope, Headers, Topic};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::{HANG, bus_at, child, child_role, embedded, scale, stored_envelopes};

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < HANG, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn fast_retries(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    }
}

fn env(topic: &str, key: &str, payload: &str) -> Envelope {
    let topic = Topic::parse(topic).unwrap();
    let h = Headers::for_publish("ampy.raw.v1.Bytes", "test@1", "test", key);
    Envelope::new(&topic, h, payload.as_bytes().to_vec())
}

/// `GET path` on the ops endpoint: status and body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tokio::time::timeout(HANG, s.read_to_string(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {raw}"));
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// Waits until the service's consumers have acked or dead-lettered `n` messages in all,
/// then shuts it down.
async fn settle_then_stop(service: Service, n: u64) -> ServiceReport {
    wait_for("all settled", || {
        let t = service.stats().total();
        t.handled_ok + t.dead_lettered_total() == n
    })
    .await;
    service.shutdown().await
}

/// `(name, field)` of every consumer in a `/health` or `/stats` body, sorted by name.
fn per_consumer(body: &str, field: &str) -> Vec<(String, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let mut out: Vec<(String, serde_json::Value)> = v["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_owned(), c[field].clone()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A handler that fails with `?` on every attempt is retried, and once out of attempts is
/// dead-lettered with the error's own text as the reason; an explicit dead letter keeps its
/// code; a typed handler decodes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_failing_with_question_mark_ends_in_the_dlq_with_its_cause() {
    let (_dir, bus) = embedded().await;
    bus.publish_batch(vec![
        env("ampy.dev.orders.v1.requests", "co-1", "abc"),
        env("ampy.dev.orders.v1.requests", "co-2", "0"),
        env("ampy.dev.orders.v1.requests", "co-3", "7"),
    ])
    .await
    .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    let handler = handler_try(move |msg| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            let qty: u32 = std::str::from_utf8(&msg.payload)?.parse()?;
            if qty == 0 {
                return Err(HandlerError::dead_letter(
                    DlqCode::SchemaMismatch,
                    "zero quantity",
                ));
            }
            Ok(())
        }
    });
    let service = Service::builder(bus.clone())
        .consumer_with("ampy.dev.orders.>", "oms", handler, |c| {
            c.retry(fast_retries(3))
        })
        .start()
        .await
        .unwrap();
    let report = settle_then_stop(service, 3).await;
    let oms = report.stats.consumer("oms").unwrap();
    assert_eq!(oms.handled_ok, 1, "{oms:?}");
    assert_eq!(oms.retried, 2, "{oms:?}");
    assert_eq!(oms.dlq(DlqCode::MaxRetries), 1, "{oms:?}");
    assert_eq!(oms.dlq(DlqCode::SchemaMismatch), 1, "{oms:?}");
    // "abc" three times, "0" and "7" once each.
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    let mut reasons: Vec<(String, String)> = stored_envelopes(&bus, "ampy.dev.dlq.>")
        .await
        .into_iter()
        .map(|e| {
            (
                e.headers.partition_key().unwrap().to_owned(),
                e.headers.dlq_reason().unwrap().to_owned(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            (
                "co-1".to_owned(),
                "max_retries: attempt 3: invalid digit found in string".to_owned()
            ),
            (
                "co-2".to_owned(),
                "schema_mismatch: zero quantity".to_owned()
            ),
        ]
    );
}

#[derive(Clone, PartialEq, prost::Message)]
struct Qty {
    #[prost(string, tag = "1")]
    qty: String,
}
impl prost::Name for Qty {
    const NAME: &'static str = "Qty";
    const PACKAGE: &'static str = "test.v1";
}

/// `typed_try`: a payload of another schema dead-letters with `schema_mismatch`, one that
/// fails inside with `?` is retried with its cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_try_decodes_then_keeps_the_cause() {
    use prost::Message as _;
    let (_dir, bus) = embedded().await;
    let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    let typed_env = |key: &str, qty: &str| {
        let h = Headers::for_publish("test.v1.Qty", "test@1", "test", key);
        let body = Qty { qty: qty.into() }.encode_to_vec();
        Envelope::new(&topic, h, body)
    };
    bus.publish_batch(vec![
        typed_env("k1", "5"),
        typed_env("k2", "-1"),
        env("ampy.dev.orders.v1.requests", "k3", "raw"),
    ])
    .await
    .unwrap();
    let total = Arc::new(AtomicU64::new(0));
    let t = total.clone();
    let service = Service::builder(bus.clone())
        .consumer_with(
            "ampy.dev.orders.>",
            "typed",
            typed_try(move |q: Qty, _msg| {
                let t = t.clone();
                async move {
                    let n: u64 = q.qty.parse()?;
                    t.fetch_add(n, Ordering::SeqCst);
                    Ok(())
                }
            }),
            |c| c.retry(fast_retries(2)),
        )
        .start()
        .await
        .unwrap();
    let report = settle_then_stop(service, 3).await;
    assert_eq!(total.load(Ordering::SeqCst), 5);
    let mut reasons: Vec<String> = stored_envelopes(&bus, "ampy.dev.dlq.>")
        .await
        .into_iter()
        .map(|e| e.headers.dlq_reason().unwrap().to_owned())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "max_retries: attempt 2: invalid digit found in string",
            "schema_mismatch: expected test.v1.Qty got ampy.raw.v1.Bytes",
        ]
    );
    assert_eq!(report.stats.total().retried, 1);
}

/// Two consumers and one producer in one service: every order handled once produces one
/// fill through the producer, every fill handled once; the service's stats, `/stats`,
/// `/metrics` and `/health` say exactly that; the shutdown report too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_and_a_producer_in_one_service_with_exact_counts() {
    let n = (300.0 * scale()) as u64;
    let (_dir, bus) = embedded().await;
    let producer = Arc::new(Producer::builder(bus.clone()).start().unwrap());
    let p = producer.clone();
    let oms = handler_try(move |msg: Message| {
        let p = p.clone();
        async move {
            let key = msg.headers.partition_key().unwrap_or_default().to_owned();
            let fills = Topic::parse("ampy.dev.fills.v1.events")?;
            let h =
                Headers::for_publish("ampy.raw.v1.Bytes", "oms@1", "oms", &format!("acct|{key}"));
            p.send(&fills, h, msg.payload.to_vec()).await?;
            Ok(())
        }
    });
    let fills: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let f = fills.clone();
    let positions = handler_sync(move |msg| {
        let text = String::from_utf8_lossy(&msg.payload).into_owned();
        *f.lock().unwrap().entry(text).or_default() += 1;
        Outcome::Ok
    });
    let service = Service::builder(bus.clone())
        .consumer_with("ampy.dev.orders.>", "oms", oms, |c| c.workers(4))
        .consumer("ampy.dev.fills.>", "positions", positions)
        .producer("fills", producer.clone())
        .ops_addr("127.0.0.1:0")
        .start()
        .await
        .unwrap();
    drop(producer);
    assert_eq!(service.consumer_names(), ["oms", "positions"]);
    let batch: Vec<Envelope> = (0..n)
        .map(|i| {
            env(
                "ampy.dev.orders.v1.requests",
                &format!("co-{i}"),
                &format!("order-{i}"),
            )
        })
        .collect();
    bus.publish_batch(batch).await.unwrap();
    wait_for("every fill applied", || {
        service
            .stats()
            .consumer("positions")
            .is_some_and(|s| s.handled_ok == n)
    })
    .await;
    let addr = service.ops_addr().unwrap();
    let (status, body) = http_get(addr, "/health").await;
    assert_eq!(status, 200, "{body}");
    // Each consumer runs its replay control consumer beside it (`runtime::control`).
    let want = [
        "oms",
        "oms-replay-control",
        "positions",
        "positions-replay-control",
    ];
    let running = per_consumer(&body, "running");
    assert_eq!(
        running,
        want.map(|name| (name.to_owned(), json!(true))),
        "{body}"
    );

    let (status, body) = http_get(addr, "/stats").await;
    assert_eq!(status, 200, "{body}");
    let handled = per_consumer(&body, "handled_ok");
    let want_handled: Vec<(String, serde_json::Value)> = want
        .iter()
        .zip([n, 0, n, 0])
        .map(|(name, count)| (name.to_string(), json!(count)))
        .collect();
    assert_eq!(handled, want_handled, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    let producers = stats["producers"].as_array().unwrap();
    assert_eq!(producers.len(), 1, "{body}");
    assert_eq!(producers[0]["published"].as_u64(), Some(n), "{body}");

    let (status, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        format!(r#"bus_consumed_total{{topic="ampy.dev.orders.v1",consumer="oms"}} {n}"#),
        format!(r#"bus_consumed_total{{topic="ampy.dev.fills.v1",consumer="positions"}} {n}"#),
        format!(r#"bus_produced_total{{topic="ampy.dev.fills.v1",producer="oms@1"}} {n}"#),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in /metrics:\n{metrics}"
        );
    }

    let report = service.shutdown().await;
    assert_eq!(report.reason, StopReason::Requested);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.stats.consumer("oms").unwrap().handled_ok, n);
    assert_eq!(report.stats.consumer("positions").unwrap().handled_ok, n);
    assert_eq!(report.stats.total().handled_ok, 2 * n);
    assert_eq!(report.stats.total().retried, 0);
    let produced = report.stats.producer("fills").unwrap();
    assert_eq!((produced.accepted, produced.published), (n, n));
    {
        let fills = fills.lock().unwrap();
        assert_eq!(fills.len() as u64, n);
        assert!(fills.values().all(|&c| c == 1), "a fill applied twice");
    }
    assert_eq!(
        stored_envelopes(&bus, "ampy.dev.fills.>").await.len() as u64,
        n
    );
    // The ops endpoint stopped with the service.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// The handler the middleware test wraps: answers only on the fast path, so a layer that
/// loses `handle_now` shows up as dead letters.
struct FastOnly {
    seen: Arc<Mutex<Vec<String>>>,
}

#[async_trait::async_trait]
impl Handler for FastOnly {
    async fn handle(&self, _msg: &Message) -> Outcome {
        Outcome::DeadLetter("slow path taken".into())
    }

    fn handle_now(&self, msg: &Message) -> Option<Outcome> {
        let enriched = msg.headers.get("enriched_by").unwrap_or("-").to_owned();
        self.seen.lock().unwrap().push(enriched);
        Some(Outcome::Ok)
    }
}

/// Refuses messages without an `auth` header; counts every message.
struct Auth {
    inner: Arc<dyn Handler>,
    seen: Arc<AtomicU64>,
}

impl Auth {
    fn check(&self, msg: &Message) -> Option<Outcome> {
        self.seen.fetch_add(1, Ordering::SeqCst);
        msg.headers
            .get("auth")
            .is_none()
            .then(|| HandlerError::dead_letter(DlqCode::HandlerError, "unauthenticated").into())
    }
}

#[async_trait::async_trait]
impl Handler for Auth {
    async fn handle(&self, msg: &Message) -> Outcome {
        match self.check(msg) {
            Some(refused) => refused,
            None => self.inner.handle(msg).await,
        }
    }

    fn handle_now(&self, msg: &Message) -> Option<Outcome> {
        Some(match self.check(msg) {
            Some(refused) => refused,
            None => self.inner.handle_now(msg)?,
        })
    }
}

/// Adds `enriched_by: <consumer>` to a copy of the message.
struct Enrich {
    inner: Arc<dyn Handler>,
    consumer: String,
}

impl Enrich {
    fn enriched(&self, msg: &Message) -> Message {
        let mut m = msg.clone();
        m.headers.set("enriched_by", &self.consumer);
        m
    }
}

#[async_trait::async_trait]
impl Handler for Enrich {
    async fn handle(&self, msg: &Message) -> Outcome {
        self.inner.handle(&self.enriched(msg)).await
    }

    fn handle_now(&self, msg: &Message) -> Option<Outcome> {
        self.inner.handle_now(&self.enriched(msg))
    }
}

/// Two layers around the handler: the outer sees every message and dead-letters those
/// without credentials (the handler never sees them), the inner adds a header the handler
/// reads; the handler's fast path survives both layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middleware_sees_every_message_enriches_it_and_can_dead_letter() {
    let (_dir, bus) = embedded().await;
    let (good, bad) = (60u64, 5u64);
    let mut batch = Vec::new();
    for i in 0..good + bad {
        let mut e = env("ampy.dev.orders.v1.requests", &format!("co-{i}"), "x");
        if i >= bad {
            e.headers.set("auth", "token");
        }
        batch.push(e);
    }
    bus.publish_batch(batch).await.unwrap();
    let seen_by_auth = Arc::new(AtomicU64::new(0));
    let wrapped: Arc<Mutex<Vec<String>>> = Arc::default();
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let (s, w) = (seen_by_auth.clone(), wrapped.clone());
    let service = Service::builder(bus.clone())
        .layer(
            move |name: &str, inner: Arc<dyn Handler>| -> Arc<dyn Handler> {
                w.lock().unwrap().push(name.to_owned());
                Arc::new(Auth {
                    inner,
                    seen: s.clone(),
                })
            },
        )
        .layer(|name: &str, inner: Arc<dyn Handler>| -> Arc<dyn Handler> {
            Arc::new(Enrich {
                inner,
                consumer: name.to_owned(),
            })
        })
        .consumer(
            "ampy.dev.orders.>",
            "audit",
            FastOnly {
                seen: handled.clone(),
            },
        )
        .start()
        .await
        .unwrap();
    let report = settle_then_stop(service, good + bad).await;
    let audit = report.stats.consumer("audit").unwrap();
    assert_eq!(audit.handled_ok, good, "{audit:?}");
    assert_eq!(audit.dlq(DlqCode::HandlerError), bad, "{audit:?}");
    assert_eq!(audit.dead_lettered_total(), bad, "{audit:?}");
    assert_eq!(seen_by_auth.load(Ordering::SeqCst), good + bad);
    assert_eq!(*wrapped.lock().unwrap(), ["audit"]);
    {
        let handled = handled.lock().unwrap();
        assert_eq!(handled.len() as u64, good);
        assert!(handled.iter().all(|h| h == "audit"), "{handled:?}");
    }
    let reasons: Vec<String> = stored_envelopes(&bus, "ampy.dev.dlq.>")
        .await
        .into_iter()
        .map(|e| e.headers.dlq_reason().unwrap().to_owned())
        .collect();
    assert_eq!(
        reasons,
        vec!["handler_error: unauthenticated"; bad as usize]
    );
}

/// Configuration errors name the consumer and the field, and nothing is left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_pattern_or_name_is_refused_before_anything_starts() {
    let (_dir, bus) = embedded().await;
    let ok = || handler_sync(|_m| Outcome::Ok);
    let err = Service::builder(bus.clone())
        .consumer("ampy.dev.orders.>", "a", ok())
        .consumer("ampy..orders", "b", ok())
        .start()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ampybus::ErrorKind::Config);
    assert!(
        err.to_string()
            .contains(r#"service: consumer "b": pattern: "#),
        "{err}"
    );
    let err = Service::builder(bus.clone())
        .consumer("ampy.dev.orders.>", " ", ok())
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("service: consumer 0: name: must not be empty"),
        "{err}"
    );
    let err = Service::builder(bus.clone())
        .consumer("ampy.dev.orders.>", "a", ok())
        .ops_addr("127.0.0.1:not-a-port")
        .start()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ampybus::ErrorKind::Config, "{err}");
}

const SIGNAL_TOPIC: &str = "ampy.dev.fills.v1.events";

/// Runs the service until a signal (or until `ready_after` messages were handled, then
/// says `@ready`); each handled payload is printed as `@h <payload>`, and the exit code is
/// the service's.
async fn serve_until_signal(dir: &std::path::Path, ready_after: u64) -> u8 {
    let bus = bus_at(dir).await;
    let service = Service::builder(bus.clone())
        .consumer_with(
            "ampy.dev.fills.>",
            "positions",
            handler_try(|msg: Message| async move {
                // Slow enough that handlers are running when the signal arrives.
                tokio::time::sleep(Duration::from_millis(2)).await;
                let text = std::str::from_utf8(&msg.payload)?;
                let mut o = std::io::stdout().lock();
                writeln!(o, "@h {text}")?;
                o.flush()?;
                Ok(())
            }),
            |c| c.workers(4).start_at(StartAt::Earliest),
        )
        .shutdown_deadline(Duration::from_secs(20))
        .start()
        .await
        .unwrap();
    let monitors = service.monitors();
    // The signal listeners are installed by `run()`, before `@ready` is printed.
    let run = service.run();
    tokio::spawn(async move {
        while monitors[0].stats().handled_ok < ready_after {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "@ready");
        let _ = o.flush();
    });
    let report = run.await;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "@stopped {}", report.reason.as_str());
    let _ = o.flush();
    bus.close().await.unwrap();
    report.reason.exit_code()
}

/// Runs a service child, waits for `@ready`, sends `signal`; returns its exit code and the
/// payloads it handled.
fn signal_child(dir: &std::path::Path, signal: &str) -> (i32, Vec<String>, String) {
    let mut c = child("serve", dir, &[]).spawn().unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut handled = Vec::new();
    let mut line = String::new();
    let mut stopped = String::new();
    let mut sent = false;
    let start = Instant::now();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        assert!(start.elapsed() < HANG, "the child hangs");
        let Some((_, rest)) = line.trim_end().split_once('@') else {
            continue;
        };
        if rest == "ready" && !sent {
            let ok = std::process::Command::new("kill")
                .args([&format!("-{signal}"), &c.id().to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
            sent = true;
        } else if let Some(p) = rest.strip_prefix("h ") {
            handled.push(p.to_owned());
        } else if let Some(s) = rest.strip_prefix("stopped ") {
            stopped = s.to_owned();
        }
    }
    let status = c.wait().unwrap();
    assert!(sent, "the child never got ready");
    (status.code().unwrap_or(-1), handled, stopped)
}

/// A service process stopped by SIGTERM exits 0, by SIGINT 130, each after draining: what it
/// handled is acked, what it had not handled comes to the next run — every message handled
/// exactly once over three runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_stops_on_sigterm_with_0_and_sigint_with_130_and_loses_nothing() {
    let n = (1500.0 * scale()) as usize;
    let dir = tempfile::tempdir().unwrap();
    {
        let bus = bus_at(dir.path()).await;
        let batch: Vec<Envelope> = (0..n)
            .map(|i| {
                env(
                    SIGNAL_TOPIC,
                    &format!("acct|co-{}", i % 40),
                    &format!("m{i}"),
                )
            })
            .collect();
        bus.publish_batch(batch).await.unwrap();
        bus.close().await.unwrap();
    }
    let path = dir.path().to_owned();
    let (term, int) = tokio::task::spawn_blocking(move || {
        (signal_child(&path, "TERM"), signal_child(&path, "INT"))
    })
    .await
    .unwrap();
    assert_eq!((term.0, term.2.as_str()), (0, "SIGTERM"));
    assert_eq!((int.0, int.2.as_str()), (130, "SIGINT"));
    assert!(!term.1.is_empty() && !int.1.is_empty());
    assert!(
        term.1.len() + int.1.len() < n,
        "the children handled everything before the signals"
    );

    // A third run handles the rest.
    let bus = bus_at(dir.path()).await;
    let rest: Arc<Mutex<Vec<String>>> = Arc::default();
    let r = rest.clone();
    let service = Service::builder(bus.clone())
        .consumer(
            "ampy.dev.fills.>",
            "positions",
            handler_sync(move |msg| {
                r.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&msg.payload).into_owned());
                Outcome::Ok
            }),
        )
        .start()
        .await
        .unwrap();
    let want = n - term.1.len() - int.1.len();
    wait_for("the rest handled", || rest.lock().unwrap().len() >= want).await;
    let report = service.shutdown().await;
    assert_eq!(report.stats.total().handled_ok as usize, want);
    let mut all: BTreeMap<String, u32> = BTreeMap::new();
    for p in term
        .1
        .iter()
        .chain(&int.1)
        .chain(rest.lock().unwrap().iter())
    {
        *all.entry(p.clone()).or_default() += 1;
    }
    assert_eq!(all.len(), n, "messages lost");
    let twice: Vec<_> = all.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
}

#[test]
#[ignore = "entry point of the child processes spawned by the signal test"]
fn child_process_entry() {
    let (role, dir) = child_role();
    assert_eq!(role, "serve");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let code = rt.block_on(serve_until_signal(&dir, 100));
    drop(rt);
    std::process::exit(code.into());
}
