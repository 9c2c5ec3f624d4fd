//! `ampybus replay` against a consumer running in this test process on the same data
//! directory (the embedded log is shared across processes).

mod common;

use ampybus::runtime::{Consumer, ConsumerHandle, Outcome, handler_fn};
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
use common::ampybus_in;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

async fn consumer(dir: &Path, calls: Arc<AtomicU64>) -> (Bus, ConsumerHandle) {
    let bus = Bus::connect(dir.to_str().unwrap()).await.unwrap();
    let h = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.bars.>").unwrap(),
        "features",
    )
    .handler(handler_fn(move |_m| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Outcome::Ok
        }
    }))
    .start()
    .await
    .unwrap();
    (bus, h)
}

async fn run(dir: &Path, args: &[&str]) -> common::Out {
    let dir = dir.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ampybus_in(Some(&dir), &a)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_reports_completion_counts_and_ids_from_the_running_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let (bus, handle) = consumer(dir.path(), calls.clone()).await;
    let t0 = ampybus::ids::format_time(chrono::Utc::now() - chrono::Duration::seconds(1));
    let mut batch = Vec::new();
    for sym in ["AAPL", "MSFT", "NVDA"] {
        let topic = Topic::parse(&format!("ampy.dev.bars.v1.XNAS.{sym}")).unwrap();
        for i in 0..4 {
            let h = Headers::for_publish("ampy.raw.v1.Bytes", "t@1", "t", &format!("XNAS.{sym}"));
            batch.push(Envelope::new(&topic, h, format!("{sym}{i}").into_bytes()));
        }
    }
    let first_id = batch[0].headers.message_id().unwrap().to_owned();
    let last_id = batch[11].headers.message_id().unwrap().to_owned();
    bus.publish_batch(batch).await.unwrap();
    let start = Instant::now();
    while handle.stats().handled_ok < 12 {
        assert!(start.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t1 = ampybus::ids::format_time(chrono::Utc::now() + chrono::Duration::seconds(1));

    let out = run(
        dir.path(),
        &[
            "replay",
            "--pattern",
            "ampy.dev.bars.>",
            "--start",
            &t0,
            "--end",
            &t1,
            "--durable",
            "features",
            "--json",
            "--reason",
            "test",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let j = &out.json_lines()[0];
    assert_eq!(j["state"], "completed");
    assert_eq!(
        (
            j["read"].as_u64(),
            j["applied"].as_u64(),
            j["skipped_duplicates"].as_u64()
        ),
        (Some(12), Some(0), Some(12))
    );
    assert_eq!(j["first_message_id"], first_id.as_str());
    assert_eq!(j["last_message_id"], last_id.as_str());
    assert!(
        out.stderr
            .contains("completed — read 12, applied 0, skipped (duplicates) 12, failed 0"),
        "{}",
        out.stderr
    );

    // Keys scope.
    let out = run(
        dir.path(),
        &[
            "replay",
            "--pattern",
            "ampy.dev.bars.>",
            "--start",
            &t0,
            "--end",
            &t1,
            "--durable",
            "features",
            "--keys",
            "XNAS.MSFT",
            "--json",
        ],
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json_lines()[0]["read"], 4);

    // Rejected by the consumer: exit 2 with its reason.
    let out = run(
        dir.path(),
        &[
            "replay",
            "--pattern",
            "ampy.dev.news.>",
            "--start",
            &t0,
            "--end",
            &t1,
            "--durable",
            "features",
        ],
    )
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("replay rejected by `features`"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("is not within consumer `features`'s pattern"),
        "{}",
        out.stderr
    );

    // Nobody by that name: exit 4 after --timeout.
    let out = run(
        dir.path(),
        &[
            "replay",
            "--pattern",
            "ampy.dev.bars.>",
            "--start",
            &t0,
            "--end",
            &t1,
            "--durable",
            "nobody",
            "--timeout",
            "1",
        ],
    )
    .await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("no final report from consumer `nobody`"),
        "{}",
        out.stderr
    );

    // Bad flags: exit 2 before anything is published.
    let out = run(
        dir.path(),
        &[
            "replay",
            "--pattern",
            "ampy.dev.bars.>",
            "--start",
            "yesterday",
            "--end",
            &t1,
            "--durable",
            "features",
        ],
    )
    .await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("--start \"yesterday\": not an RFC3339 time"),
        "{}",
        out.stderr
    );
    let out = run(
        dir.path(),
        &[
            "replay",
            "--pattern",
            "ampy.dev.bars.>",
            "--start",
            &t1,
            "--end",
            &t0,
            "--durable",
            "features",
        ],
    )
    .await;
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("`end` must be after `start`"),
        "{}",
        out.stderr
    );

    assert_eq!(
        calls.load(Ordering::SeqCst),
        12,
        "the replays applied nothing twice"
    );
    handle.shutdown(Duration::from_secs(10)).await;
}
