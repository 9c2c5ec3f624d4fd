//! Consumer lag in seconds (`runtime::lag`): a stuck handler makes the lag pass the alert
//! threshold (a `lag` event, the gauge), finishing it brings it back (`lag_recovered`).

use ampybus::runtime::{Consumer, LagEvent, Outcome, handler_fn};
use ampybus::{Bus, Headers, Topic, TopicPattern};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_consumer_alerts_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    let release = Arc::new(Notify::new());
    let r2 = release.clone();
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.bars.>").unwrap(),
        "slow",
    )
    .lag_alert_after(Duration::from_secs(1))
    .handler(handler_fn(move |_m| {
        let r2 = r2.clone();
        async move {
            r2.notified().await;
            Outcome::Ok
        }
    }))
    .start()
    .await
    .unwrap();
    let watch = handle.lag_watch();
    assert_eq!(watch.alert_after(), Duration::from_secs(1));
    let mut events = watch.events();
    let topic = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
    let h = Headers::for_publish(ampybus::headers::RAW_BYTES_SCHEMA, "t@1", "t", "XNAS.AAPL");
    bus.publish(&topic, h, b"bar".to_vec()).await.unwrap();

    let limit = Duration::from_secs(60);
    let over = tokio::time::timeout(limit, events.recv())
        .await
        .unwrap()
        .unwrap();
    match &over {
        LagEvent::Over {
            consumer,
            pattern,
            lag_seconds,
            ..
        } => {
            assert_eq!(
                (consumer.as_str(), pattern.as_str()),
                ("slow", "ampy.dev.bars.>")
            );
            assert!(*lag_seconds > 1.0, "{lag_seconds}");
        }
        other => panic!("expected Over first, got {other:?}"),
    }
    assert!(watch.seconds() > 1.0);
    let text = bus.metrics().encode();
    let line = text
        .lines()
        .find(|l| l.starts_with("bus_consumer_lag_seconds{") && l.contains("consumer=\"slow\""))
        .unwrap_or_else(|| panic!("no lag gauge:\n{text}"));
    let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(v > 1.0, "{line}");

    release.notify_one();
    let back = tokio::time::timeout(limit, events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.kind(), "lag_recovered", "{back:?}");
    assert_eq!(watch.seconds(), 0.0);
    let stats = handle.shutdown(Duration::from_secs(5)).await;
    assert_eq!(stats.handled_ok, 1);
}
