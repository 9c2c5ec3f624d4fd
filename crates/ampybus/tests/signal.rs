//! Graceful shutdown driven by SIGTERM: the consumer stops fetching, finishes the handlers that
//! are running, releases the rest, and a restarted consumer handles exactly what was left.
//! (Its own test binary: it sends SIGTERM to its own process, which tokio's handler catches.)

use ampybus::runtime::{Consumer, Outcome, handler_fn};
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

const HANG: Duration = Duration::from_secs(60);

type Seen = Arc<Mutex<HashMap<String, u32>>>;

/// Counts each message; messages numbered `hold_from` and up wait for `gate` first, so that
/// handlers are still running when SIGTERM arrives.
fn counting(seen: Seen, gate: Arc<Semaphore>, hold_from: u64) -> impl ampybus::Handler {
    handler_fn(move |m| {
        let seen = seen.clone();
        let gate = gate.clone();
        async move {
            let i: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            if i >= hold_from {
                let _permit = gate.acquire().await.unwrap();
            }
            *seen
                .lock()
                .unwrap()
                .entry(m.headers.message_id().unwrap().to_owned())
                .or_default() += 1;
            Outcome::Ok
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_handlers_and_loses_nothing() {
    // Listen for SIGTERM first, so the process-wide handler is installed before any is sent.
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}?sync=normal", dir.path().display());
    let bus = Bus::connect(&url).await.unwrap();
    let topic = Topic::parse("ampy.dev.fills.v1.events").unwrap();
    let n = 400u64;
    let batch: Vec<Envelope> = (0..n)
        .map(|i| {
            let key = format!("acct-{}|co-{i}", i % 20);
            let h = Headers::for_publish("ampy.fills.v1.Fill", "t@1", "t", &key);
            Envelope::new(&topic, h, i.to_string().into_bytes())
        })
        .collect();
    bus.publish_batch(batch).await.unwrap();

    let seen: Seen = Arc::default();
    let gate = Arc::new(Semaphore::new(0));
    let pattern = TopicPattern::parse("ampy.dev.fills.>").unwrap();
    let handle = Consumer::builder(bus.clone(), pattern.clone(), "positions")
        .handler(counting(seen.clone(), gate.clone(), 50))
        .workers(8)
        .max_in_flight(64)
        .start()
        .await
        .unwrap();
    let start = Instant::now();
    while handle.stats().handled_ok < 50 {
        assert!(start.elapsed() < HANG);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let monitor = handle.monitor();
    // The signal listeners are installed by this call, so the SIGTERM below cannot be missed.
    let runner = tokio::spawn(handle.run_until_signal(Duration::from_secs(30)));
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    tokio::time::timeout(HANG, term.recv())
        .await
        .expect("SIGTERM delivered");
    while !monitor.is_draining() {
        assert!(start.elapsed() < HANG, "consumer did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Fetching has stopped: the handlers held at the gate may finish now.
    gate.add_permits(1_000_000);
    let stats = tokio::time::timeout(HANG, runner).await.unwrap().unwrap();
    let first: HashMap<String, u32> = seen.lock().unwrap().clone();
    // 50 before the signal, plus at most the 8 handlers that were running.
    assert!(
        (50..=58).contains(&stats.handled_ok),
        "stopped early: {stats:?}"
    );
    assert!(stats.released > 0, "{stats:?}");
    assert_eq!(stats.handled_ok, first.len() as u64);
    assert!(first.values().all(|&c| c == 1));
    assert_eq!(stats.in_flight, 0, "nothing left unsettled: {stats:?}");

    // A restart with the same name handles exactly the rest, each once.
    let again = Consumer::builder(bus.clone(), pattern, "positions")
        .handler(counting(
            seen.clone(),
            Arc::new(Semaphore::new(1_000_000)),
            0,
        ))
        .start()
        .await
        .unwrap();
    while again.stats().handled_ok + again.stats().skipped_duplicates < n - stats.handled_ok {
        assert!(start.elapsed() < HANG, "{:?}", again.stats());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let s2 = again.shutdown(Duration::from_secs(10)).await;
    let all = seen.lock().unwrap().clone();
    assert_eq!(all.len() as u64, n, "every message handled");
    assert!(all.values().all(|&c| c == 1), "none handled twice");
    assert_eq!(s2.handled_ok + stats.handled_ok, n);
    bus.close().await.unwrap();
}
