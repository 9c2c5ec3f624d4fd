//! Observability across processes and transports: producer and consumer spans linked through
//! `traceparent` (two processes, each with an in-memory span exporter, over the embedded log
//! and over NATS), exact `/metrics` counts after a scripted run, `/health` following the
//! broker, `/stats` fields, and captured JSON logs free of secrets and payload bytes.
//!
//! Child processes enter through `child_process_entry` (ignored when run on its own).

use ampybus::obs::{LogFormat, init_logging};
use ampybus::ops::serve;
use ampybus::runtime::{Consumer, Message, Outcome, Producer, RetryPolicy, handler_fn};
use ampybus::{Bus, Envelope, Headers, Topic, TopicPattern};
use ampybus_conformance::http_get;
use opentelemetry::trace::SpanKind;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HANG: Duration = Duration::from_secs(60);
const PAYLOAD_MARKER: &[u8] = b"PAYLOAD-7f3a9c-DO-NOT-LOG";
const SECRET: &str = "S3cretPw-91ab";

fn raw_headers(producer: &str, key: &str) -> Headers {
    Headers::for_publish(
        ampybus::headers::RAW_BYTES_SCHEMA,
        producer,
        "obs-test",
        key,
    )
}

/// The value of one exact sample line `name{labels} value` in a Prometheus text body.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Two processes: spans linked through traceparent.

/// One finished span as a child prints it.
#[derive(Debug, Clone)]
struct SpanLine {
    trace_id: String,
    span_id: String,
    parent: String,
    kind: String,
    name: String,
}

fn parse_spans(stdout: &str) -> Vec<SpanLine> {
    stdout
        .lines()
        // libtest prints `test child_process_entry ... ` before the first line.
        .filter_map(|l| l.split_once("SPAN ").map(|(_, rest)| rest))
        .map(|l| {
            let f: Vec<&str> = l.splitn(5, ' ').collect();
            SpanLine {
                trace_id: f[0].into(),
                span_id: f[1].into(),
                parent: f[2].into(),
                kind: f[3].into(),
                name: f[4].into(),
            }
        })
        .collect()
}

fn run_child(role: &str, url: &str, topic: &str, consumer: &str, n: usize) -> (String, String) {
    let mut c: Child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process_entry",
            "--exact",
            "--nocapture",
            "--ignored",
            "--test-threads",
            "1",
        ])
        .env("AMPYBUS_OBS_ROLE", role)
        .env("AMPYBUS_OBS_URL", url)
        .env("AMPYBUS_OBS_TOPIC", topic)
        .env("AMPYBUS_OBS_CONSUMER", consumer)
        .env("AMPYBUS_OBS_N", n.to_string())
        .env("RUST_LOG", "debug")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let start = Instant::now();
    loop {
        if c.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > HANG {
            let _ = c.kill();
            panic!("child {role} hung for more than {HANG:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = c.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "child {role} failed:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

/// Runs a producer process then a consumer process on `url` and checks the span links;
/// returns both processes' captured logs.
fn two_process_trace(url: &str, topic: &str, consumer: &str) -> String {
    let n = 3;
    let (p_out, p_err) = run_child("produce", url, topic, consumer, n);
    let (c_out, c_err) = run_child("consume", url, topic, consumer, n);
    let produced = parse_spans(&p_out);
    let consumed = parse_spans(&c_out);
    let pubs: Vec<&SpanLine> = produced.iter().filter(|s| s.kind == "Producer").collect();
    let subs: Vec<&SpanLine> = consumed.iter().filter(|s| s.kind == "Consumer").collect();
    assert_eq!(pubs.len(), n, "producer spans: {p_out}");
    assert_eq!(subs.len(), n, "consumer spans: {c_out}");
    for c in &subs {
        let p = pubs
            .iter()
            .find(|p| p.span_id == c.parent)
            .unwrap_or_else(|| panic!("consumer span {c:?} has no producer parent in {pubs:?}"));
        assert_eq!(c.trace_id, p.trace_id);
        assert_eq!(
            p.name,
            format!("publish {}", ampybus::obs::domain_topic(topic))
        );
        assert_eq!(
            c.name,
            format!("process {}", ampybus::obs::domain_topic(topic))
        );
    }
    // Each producer span was consumed exactly once.
    let mut parents: Vec<&str> = subs.iter().map(|s| s.parent.as_str()).collect();
    parents.sort();
    parents.dedup();
    assert_eq!(parents.len(), n);
    format!("{p_err}{c_err}")
}

#[test]
fn consumer_span_is_a_child_of_the_producer_span_across_processes_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let logs = two_process_trace(&url, "ampy.dev.news.v1.obs", "obs-trace");
    assert_logs_clean(&logs, &[]);
}

/// A `nats-server` with JetStream and a password on a free port; killed on drop.
struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
}

impl NatsServer {
    fn start(dir: &Path) -> NatsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = NatsServer {
            child: None,
            port,
            store: dir.join("js"),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"])
            .arg("-sd")
            .arg(&self.store)
            .args(["--user", "obs", "--pass", SECRET])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server (apt-get install nats-server)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < HANG, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!(
            "nats://obs:{SECRET}@127.0.0.1:{}?stream_prefix=OBS&max_age_days=1",
            self.port
        )
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn assert_logs_clean(logs: &str, secrets: &[&str]) {
    assert!(!logs.is_empty(), "no logs captured");
    let marker = std::str::from_utf8(PAYLOAD_MARKER).unwrap();
    assert!(!logs.contains(marker), "payload bytes in logs:\n{logs}");
    for s in secrets {
        assert!(!logs.contains(s), "secret {s:?} in logs:\n{logs}");
    }
    // JSON lines with the documented fields.
    let handled: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("JSON log line"))
        .filter(|v: &serde_json::Value| v["message"] == "message handled")
        .collect();
    assert!(!handled.is_empty(), "no per-message log lines:\n{logs}");
    for v in &handled {
        for f in [
            "message_id",
            "trace_id",
            "topic",
            "consumer",
            "result",
            "latency_ms",
        ] {
            assert!(v.get(f).is_some(), "field {f} missing in {v}");
        }
        assert_eq!(v["result"], "ok");
    }
}

#[test]
fn consumer_span_is_a_child_of_the_producer_span_across_processes_nats_and_logs_hold_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(dir.path());
    let logs = two_process_trace(&server.url(), "ampy.dev.news.v1.obs", "obs-trace");
    // The URL was logged, redacted.
    assert!(logs.contains("nats://***@127.0.0.1:"), "{logs}");
    assert_logs_clean(&logs, &[SECRET]);
}

#[test]
#[ignore = "entered by the multi-process tests only"]
fn child_process_entry() {
    let role = std::env::var("AMPYBUS_OBS_ROLE").expect("run by the multi-process tests only");
    let url = std::env::var("AMPYBUS_OBS_URL").unwrap();
    let topic = Topic::parse(&std::env::var("AMPYBUS_OBS_TOPIC").unwrap()).unwrap();
    let consumer = std::env::var("AMPYBUS_OBS_CONSUMER").unwrap();
    let n: usize = std::env::var("AMPYBUS_OBS_N").unwrap().parse().unwrap();
    init_logging(LogFormat::Json, "debug").unwrap();
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tracing::info!(url = %ampybus::bus::redact(&url), "child starting");
        let bus = Bus::connect(&url).await.unwrap();
        match role.as_str() {
            "produce" => {
                for i in 0..n {
                    let mut payload = PAYLOAD_MARKER.to_vec();
                    payload.extend_from_slice(format!("-{i}").as_bytes());
                    bus.publish(&topic, raw_headers("obs@1", &format!("k{i}")), payload)
                        .await
                        .unwrap();
                }
            }
            "consume" => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let pattern = TopicPattern::parse(&format!(
                    "{}.>",
                    ampybus::obs::domain_topic(topic.as_str())
                ))
                .unwrap();
                let handle = Consumer::builder(bus.clone(), pattern, &consumer)
                    .handler(handler_fn(move |m: Message| {
                        let tx = tx.clone();
                        async move {
                            tx.send(m.headers.message_id().unwrap().to_owned()).unwrap();
                            Outcome::Ok
                        }
                    }))
                    .serve_replays(false)
                    .start()
                    .await
                    .unwrap();
                for _ in 0..n {
                    rx.recv().await.unwrap();
                }
                let stats = handle.shutdown(Duration::from_secs(10)).await;
                assert_eq!(stats.handled_ok, n as u64);
            }
            other => panic!("unknown role {other}"),
        }
        bus.close().await.unwrap();
    });
    provider.force_flush().unwrap();
    for s in exporter.get_finished_spans().unwrap() {
        let kind = match s.span_kind {
            SpanKind::Producer => "Producer",
            SpanKind::Consumer => "Consumer",
            _ => "Other",
        };
        println!(
            "SPAN {} {} {} {kind} {}",
            s.span_context.trace_id(),
            s.span_context.span_id(),
            s.parent_span_id,
            s.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Exact counts on /metrics, /stats fields, /health.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_exact_counts_after_a_scripted_run() {
    tokio::time::timeout(HANG, scripted_run())
        .await
        .expect("scripted run hung");
}

async fn scripted_run() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    let server = serve(&bus, "127.0.0.1:0").await.unwrap();
    let addr = server.local_addr();

    // Every family is there before the first event.
    let (code, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    // OpenMetrics names a counter family without `_total`; its samples carry it.
    for f in [
        "bus_produced counter",
        "bus_consumed counter",
        "bus_delivery_latency_ms histogram",
        "bus_handler_duration_ms histogram",
        "bus_batch_size_bytes histogram",
        "bus_consumer_lag gauge",
        "bus_dlq counter",
        "bus_retry counter",
        "bus_decode_fail counter",
        "bus_dropped counter",
        "bus_inflight gauge",
    ] {
        assert!(
            body.contains(&format!("# TYPE {f}\n")),
            "{f} missing:\n{body}"
        );
    }

    // The script: 5 ok, 2 retried once then ok, 3 poison, 1 too large on news;
    // 3 heartbeats through a best-effort producer queue of 2 while paused (1 dropped).
    let news = Topic::parse("ampy.dev.news.v1.raw").unwrap();
    let mut trace_of: HashMap<String, String> = HashMap::new();
    let mut send = |key: &str| {
        let h = raw_headers("obs@1", key);
        trace_of.insert(
            h.message_id().unwrap().to_owned(),
            h.trace_context().unwrap().trace_id,
        );
        h
    };
    let mut batch = Vec::new();
    for i in 0..5 {
        batch.push(Envelope::new(&news, send(&format!("ok{i}")), b"x".to_vec()));
    }
    for i in 0..2 {
        batch.push(Envelope::new(
            &news,
            send(&format!("retry{i}")),
            b"x".to_vec(),
        ));
    }
    for i in 0..3 {
        batch.push(Envelope::new(
            &news,
            send(&format!("poison{i}")),
            b"x".to_vec(),
        ));
    }
    bus.publish_batch(batch).await.unwrap();
    // Over the consumer's 32-byte payload limit: dead-lettered before any handler.
    let big = Envelope::new(&news, raw_headers("obs@1", "big"), vec![b'B'; 64]);
    bus.publish_wire(vec![big]).await.unwrap();

    let producer = Producer::builder(bus.clone())
        .capacity(2)
        .best_effort(TopicPattern::parse("ampy.dev.ticks.>").unwrap())
        .start()
        .unwrap();
    producer.pause();
    let hb = Topic::parse("ampy.dev.ticks.v1.heartbeat.XNAS").unwrap();
    let mut dropped = 0;
    for _ in 0..3 {
        // A heartbeat's key is its source id, the topic's last token.
        let h = raw_headers("feed@1", "XNAS");
        if !producer
            .send(&hb, h, b"hb".to_vec())
            .await
            .unwrap()
            .is_accepted()
        {
            dropped += 1;
        }
    }
    assert_eq!(dropped, 1);
    let pstats = producer.stats();
    assert_eq!(pstats.dropped.heartbeat, 1);

    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (ok_tx, mut ok_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let handle = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.news.>").unwrap(),
        "obs-news",
    )
    .retry(RetryPolicy {
        max_attempts: 5,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
    })
    .max_payload_bytes(32)
    .serve_replays(false)
    .handler(handler_fn(move |m: Message| {
        let attempts = attempts.clone();
        let ok_tx = ok_tx.clone();
        async move {
            let key = m.headers.partition_key().unwrap().to_owned();
            let n = {
                let mut a = attempts.lock().unwrap();
                let n = a.entry(key.clone()).or_default();
                *n += 1;
                *n
            };
            if key.starts_with("poison") {
                Outcome::DeadLetter("poison".into())
            } else if key.starts_with("retry") && n == 1 {
                Outcome::Retry { after: None }
            } else {
                ok_tx.send(()).unwrap();
                Outcome::Ok
            }
        }
    }))
    .start()
    .await
    .unwrap();
    let (dlq_tx, mut dlq_rx) = tokio::sync::mpsc::unbounded_channel::<Message>();
    let dlq_watch = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.dlq.>").unwrap(),
        "obs-dlq-watch",
    )
    .serve_replays(false)
    .handler(handler_fn(move |m: Message| {
        let dlq_tx = dlq_tx.clone();
        async move {
            dlq_tx.send(m).unwrap();
            Outcome::Ok
        }
    }))
    .start()
    .await
    .unwrap();

    for _ in 0..7 {
        ok_rx.recv().await.unwrap();
    }
    let mut dead = Vec::new();
    for _ in 0..4 {
        dead.push(dlq_rx.recv().await.unwrap());
    }
    // DLQ keeps the trace link: the dead-lettered copy carries the original trace id.
    for d in dead
        .iter()
        .filter(|d| d.headers.partition_key().unwrap().starts_with("poison"))
    {
        let original = d.headers.get("original_message_id").unwrap();
        assert_eq!(
            d.headers.trace_context().unwrap().trace_id,
            trace_of[original],
            "DLQ copy lost its trace id"
        );
    }
    producer.resume();
    let pstats = producer.close().await.unwrap();
    assert_eq!(pstats.published, 2);

    let (code, stats_body) = http_get(addr, "/stats").await;
    assert_eq!(code, 200);
    let stats: serde_json::Value = serde_json::from_str(&stats_body).expect("/stats is JSON");
    assert_eq!(stats["transport"], "embedded");
    assert_eq!(stats["connected"], true);
    for f in ["uptime_s", "consumers", "producers", "totals"] {
        assert!(stats.get(f).is_some(), "/stats lacks {f}: {stats}");
    }
    let news_c = stats["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "obs-news")
        .expect("obs-news in /stats");
    for f in [
        "pattern",
        "handled_ok",
        "retried",
        "dead_lettered",
        "skipped_duplicates",
        "released",
        "in_flight",
        "max_in_flight",
        "queue_fill",
        "rate_per_s",
        "lag",
        "last_message_at",
    ] {
        assert!(news_c.get(f).is_some(), "consumer stats lack {f}: {news_c}");
    }
    assert_eq!(news_c["handled_ok"], 7);
    assert_eq!(news_c["retried"], 2);
    assert_eq!(news_c["dead_lettered"]["handler_error"], 3);
    assert_eq!(news_c["dead_lettered"]["payload_too_large"], 1);
    assert!(news_c["last_message_at"].is_string());
    for f in ["in_flight", "dropped", "dead_lettered"] {
        assert!(stats["totals"].get(f).is_some(), "totals lack {f}");
    }
    let (code, health) = http_get(addr, "/health").await;
    assert_eq!(code, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["transport"]["connected"], true);
    assert_eq!(health["consumers"].as_array().unwrap().len(), 2);

    let s1 = handle.shutdown(Duration::from_secs(10)).await;
    let s2 = dlq_watch.shutdown(Duration::from_secs(10)).await;
    assert_eq!(
        (s1.handled_ok, s1.retried, s1.dead_lettered_total()),
        (7, 2, 4)
    );
    assert_eq!(s2.handled_ok, 4);

    let (_, m) = http_get(addr, "/metrics").await;
    let exact = [
        (
            r#"bus_produced_total{topic="ampy.dev.news.v1",producer="obs@1"}"#,
            11.0,
        ),
        (
            r#"bus_produced_total{topic="ampy.dev.ticks.v1",producer="feed@1"}"#,
            2.0,
        ),
        (
            r#"bus_produced_total{topic="ampy.dev.dlq.v1",producer="obs@1"}"#,
            4.0,
        ),
        (
            r#"bus_consumed_total{topic="ampy.dev.news.v1",consumer="obs-news"}"#,
            7.0,
        ),
        (
            r#"bus_consumed_total{topic="ampy.dev.dlq.v1",consumer="obs-dlq-watch"}"#,
            4.0,
        ),
        (
            r#"bus_retry_total{topic="ampy.dev.news.v1",reason="handler"}"#,
            2.0,
        ),
        (
            r#"bus_retry_total{topic="ampy.dev.news.v1",reason="blob_unavailable"}"#,
            0.0,
        ),
        (
            r#"bus_dlq_total{topic="ampy.dev.news.v1",reason="handler_error"}"#,
            3.0,
        ),
        (
            r#"bus_dlq_total{topic="ampy.dev.news.v1",reason="payload_too_large"}"#,
            1.0,
        ),
        (
            r#"bus_dlq_total{topic="ampy.dev.news.v1",reason="decode_error"}"#,
            0.0,
        ),
        (
            r#"bus_dlq_total{topic="ampy.dev.news.v1",reason="max_retries"}"#,
            0.0,
        ),
        (
            r#"bus_decode_fail_total{topic="ampy.dev.news.v1",reason="payload_too_large"}"#,
            1.0,
        ),
        (
            r#"bus_decode_fail_total{topic="ampy.dev.news.v1",reason="decode_error"}"#,
            0.0,
        ),
        (
            r#"bus_dropped_total{topic="ampy.dev.ticks.v1",reason="heartbeat"}"#,
            1.0,
        ),
        (
            r#"bus_dropped_total{topic="ampy.dev.ticks.v1",reason="quote_book"}"#,
            0.0,
        ),
        // Handler starts: 5 ok + 2 × 2 retried + 3 poison.
        (
            r#"bus_delivery_latency_ms_count{topic="ampy.dev.news.v1"}"#,
            12.0,
        ),
        (
            r#"bus_handler_duration_ms_count{topic="ampy.dev.news.v1",consumer="obs-news"}"#,
            12.0,
        ),
        (r#"bus_inflight{consumer="obs-news"}"#, 0.0),
        (
            r#"bus_consumer_lag{topic="ampy.dev.news.>",consumer="obs-news"}"#,
            0.0,
        ),
        // One batch of 10 one-byte payloads, then the 64-byte one alone.
        (
            r#"bus_batch_size_bytes_count{topic="ampy.dev.news.v1"}"#,
            2.0,
        ),
        (
            r#"bus_batch_size_bytes_sum{topic="ampy.dev.news.v1"}"#,
            74.0,
        ),
    ];
    for (series, want) in exact {
        assert_eq!(sample(&m, series), Some(want), "{series} in:\n{m}");
    }
    server.shutdown().await;
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_503_when_the_broker_stops_and_200_when_it_is_back() {
    tokio::time::timeout(Duration::from_secs(120), health_follows_broker())
        .await
        .expect("health test hung");
}

/// Polls `/health` until it answers `want` (the probe state has no event to await).
async fn wait_health(addr: std::net::SocketAddr, want: u16) -> serde_json::Value {
    loop {
        let (code, body) = http_get(addr, "/health").await;
        if code == want {
            return serde_json::from_str(&body).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn health_follows_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = NatsServer::start(dir.path());
    let bus = Bus::connect(&server.url()).await.unwrap();
    let consumer = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.news.>").unwrap(),
        "obs-health",
    )
    .serve_replays(false)
    .handler(handler_fn(|_m| async { Outcome::Ok }))
    .start()
    .await
    .unwrap();
    let http = serve(&bus, "127.0.0.1:0").await.unwrap();
    let addr = http.local_addr();
    let up = wait_health(addr, 200).await;
    assert_eq!(up["transport"]["name"], "nats");
    assert_eq!(up["consumers"][0]["name"], "obs-health");
    assert_eq!(up["consumers"][0]["running"], true);
    assert!(!up.to_string().contains(SECRET));

    server.kill();
    let down = wait_health(addr, 503).await;
    assert_eq!(down["status"], "unhealthy");
    assert_eq!(down["transport"]["connected"], false);
    assert!(!down.to_string().contains(SECRET), "{down}");

    server.spawn();
    let back = wait_health(addr, 200).await;
    assert_eq!(back["transport"]["connected"], true);

    let stats = consumer.shutdown(Duration::from_secs(10)).await;
    assert_eq!(stats.handled_ok, 0);
    http.shutdown().await;
}
