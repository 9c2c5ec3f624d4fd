//! Redis fault and bad-input tests. Each test that needs a server of its own (ACL users, a
//! restart) spawns `redis-server` on a free loopback port in a temp directory and kills it when
//! the guard drops; the others use the shared server on 127.0.0.1:6379 with a key prefix of
//! their own.

use ampybus::dedupe::DedupeStore;
use ampybus::runtime::{Consumer, Message, Outcome, Publisher, RetryPolicy, handler_fn};
use ampybus::transport::redis::RedisDedupeStore;
use ampybus::transport::{StartAt, SubscribeSpec, WindowQuery};
use ampybus::{Bus, Envelope, ErrorKind, Headers, Topic, TopicPattern};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ampybus_conformance::RedisServer as Server;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .unwrap()
        .port()
}

fn headers(key: &str) -> Headers {
    Headers::for_publish(
        ampybus::headers::RAW_BYTES_SCHEMA,
        "faults@1",
        "faults",
        key,
    )
}

async fn timed<T>(what: &str, limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let r = tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung for more than {limit:?}"));
    eprintln!("{what}: {:.2?}", start.elapsed());
    r
}

fn shared_url(label: &str) -> String {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..12];
    format!("redis://127.0.0.1:6379?key_prefix=faults{label}{id}:&max_age_days=1")
}

fn start_shared() {
    ampybus_conformance::start_test_broker("redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_unreachable_servers_fail_fast_and_clearly() {
    let limit = Duration::from_secs(30);
    let e = timed(
        "garbage port",
        limit,
        Bus::connect("redis://127.0.0.1:notaport"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("notaport"), "{e}");

    let e = timed(
        "unknown option",
        limit,
        Bus::connect("redis://127.0.0.1?colour=red"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("colour"), "{e}");

    let port = free_port();
    let e = timed(
        "unreachable port",
        limit,
        Bus::connect(&format!(
            "redis://bob:s3cret@127.0.0.1:{port}?connect_timeout_ms=1000"
        )),
    )
    .await
    .unwrap_err();
    let shown = format!("{e} {e:?}");
    assert!(
        matches!(e.kind(), ErrorKind::Transport | ErrorKind::Timeout),
        "{e}"
    );
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(!shown.contains("s3cret"), "credentials leaked: {shown}");

    let e = timed(
        "missing CA file",
        limit,
        Bus::connect(&format!(
            "rediss://127.0.0.1:{port}?tls_ca=/nonexistent/ca.pem"
        )),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("tls_ca"), "{e}");
}

/// ACL users: the right user and password work; a wrong password and an unknown user are a
/// Config error naming the user, never showing the password; a user that may write only the
/// news stream gets a clear, specific Config error (NOPERM, the stream key) on orders, at once,
/// and the retrying Publisher does not retry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_users_wrong_credentials_and_write_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("users.acl");
    std::fs::write(
        &acl,
        "user default off\n\
         user app on >app-pw ~* &* +@all\n\
         user newsonly on >news-pw %R~* %W~ampy.dev.news.* %W~ampy:dedupe:* +@all\n",
    )
    .unwrap();
    let server = Server::start(dir.path(), &["--aclfile", acl.to_str().unwrap()]);
    let limit = Duration::from_secs(30);

    let bus = timed(
        "right credentials",
        limit,
        Bus::connect(&server.url("app:app-pw@", "")),
    )
    .await
    .expect("connect as app");
    let t = Topic::parse("ampy.dev.orders.v1.acl").unwrap();
    bus.publish(&t, headers("co_1"), b"x".to_vec())
        .await
        .expect("app may publish");

    for (who, info) in [
        ("wrong password", "app:not-the-pw@"),
        ("unknown user", "nobody:not-the-pw@"),
    ] {
        let e = timed(who, limit, Bus::connect(&server.url(info, "")))
            .await
            .unwrap_err();
        let shown = format!("{e} {e:?}");
        assert_eq!(e.kind(), ErrorKind::Config, "{who}: {e}");
        assert!(
            e.to_string().contains("authentication refused"),
            "{who}: {e}"
        );
        assert!(
            !shown.contains("not-the-pw"),
            "{who}: password leaked: {shown}"
        );
    }
    let e = timed("no credentials", limit, async {
        let bus = Bus::connect(&server.url("", "")).await?;
        bus.publish(&t, headers("co_1"), b"x".to_vec()).await
    })
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "no credentials: {e}");

    let news = timed(
        "limited user",
        limit,
        Bus::connect(&server.url("newsonly:news-pw@", "")),
    )
    .await
    .expect("connect as newsonly");
    let nt = Topic::parse("ampy.dev.news.v1.acl").unwrap();
    news.publish(&nt, headers("n1"), b"ok".to_vec())
        .await
        .expect("newsonly may write news");
    let publisher = Publisher::new(news.clone()).with_policy(RetryPolicy {
        max_attempts: 50,
        min_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
    });
    let e = timed(
        "publish outside write permissions",
        Duration::from_secs(5),
        publisher.publish(&t, headers("co_2"), b"no".to_vec()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("NOPERM") || text.contains("permission"),
        "{e}"
    );
    assert!(text.contains("ampy.dev.orders.v1"), "{e}");
    assert!(
        !format!("{e:?}").contains("news-pw"),
        "password leaked: {e:?}"
    );
}

/// Kill -9 the server mid-run (append-only file with fsync always) and restart it on the same
/// port, with 8 retrying publishers and a consumer running: none lost, each applied once in
/// the dedupe store (handled twice at most what was in flight at the crash), publishers
/// finished (retried through the outage), nothing hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_run_loses_nothing_and_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        dir.path(),
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let url = server.url("", "?request_timeout_ms=2000&connect_timeout_ms=1000");
    let n = ((50_000.0 * ampybus_conformance::scale()) as usize).max(2_000);
    let publishers = 8usize;
    let bus = Bus::connect(&url).await.expect("connect");
    let store: Arc<dyn DedupeStore> =
        Arc::new(RedisDedupeStore::connect(&url).await.expect("dedupe store"));

    let effects: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let e2 = effects.clone();
    let consumer = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.news.v1.fault.>").unwrap(),
        "fault-consumer",
    )
    .dedupe(store.clone())
    .workers(8)
    .max_in_flight(512)
    .ack_deadline(Duration::from_secs(5))
    .handler(handler_fn(move |m: Message| {
        let effects = e2.clone();
        async move {
            *effects
                .lock()
                .unwrap()
                .entry(String::from_utf8_lossy(&m.payload).into_owned())
                .or_default() += 1;
            Outcome::Ok
        }
    }))
    .start()
    .await
    .expect("consumer");

    let published = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let publisher = Publisher::new(bus.clone()).with_policy(RetryPolicy {
            max_attempts: 100,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
        });
        let published = published.clone();
        tasks.push(tokio::spawn(async move {
            let topic = Topic::parse(&format!("ampy.dev.news.v1.fault.p{p}")).unwrap();
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

    let hang = ampybus_conformance::hang_timeout();
    let start = Instant::now();
    while published.load(Ordering::SeqCst) < (n / 3) as u64 || effects.lock().unwrap().is_empty() {
        assert!(start.elapsed() < hang, "no progress before the crash");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_crash = (
        published.load(Ordering::SeqCst),
        effects.lock().unwrap().len(),
    );
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await; // the outage itself, not a sync
    server.spawn();
    eprintln!(
        "server killed after {} published / {} handled; restarted",
        at_crash.0, at_crash.1
    );

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

    let start = Instant::now();
    loop {
        let done = effects.lock().unwrap().len();
        let s = consumer.stats();
        if done == n && s.in_flight == 0 {
            break;
        }
        assert!(
            start.elapsed() < hang,
            "timed out: {done} of {n} handled; {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = consumer.shutdown(Duration::from_secs(10)).await;
    let again: Vec<(String, u32)> = {
        let effects = effects.lock().unwrap();
        assert_eq!(effects.len(), n, "distinct messages handled");
        effects
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(k, c)| (k.clone(), *c))
            .collect()
    };
    // Handlers that finished but whose dedupe record and ack were cut by the crash may run
    // again; at most what was in flight then.
    assert!(
        again.len() <= 512,
        "{} messages handled more than once",
        again.len()
    );
    assert_eq!(stats.dead_lettered_total(), 0, "{stats:?}");
    // Nothing wedged: the group has nothing pending.
    let lag = bus
        .consumer_lag("fault-consumer")
        .await
        .expect("lag")
        .expect("group");
    assert_eq!(lag.in_flight, 0, "{lag:?}");
    eprintln!(
        "n={n}: all published ({publishers} publishers), all handled; {} handled twice (in flight at the crash), {} skipped as applied; stats {stats:?}",
        again.len(),
        stats.skipped_duplicates
    );
}

/// The server goes away while a handled batch waits for its ack and stays away for longer
/// than a few quick retries take (3 s against at most 1.5 s of the first four backoffs):
/// the acker keeps asking until the server is back, so every message is acknowledged within
/// about a second of the restart — nothing is left pending in the group, and nothing is
/// handled twice (a batch the acker gave up on would be redelivered when its 8 s lease ran
/// out, and handled again; a read whose reply the outage cut is redelivered then too, which
/// is no second handling).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_cut_by_an_outage_are_retried_until_the_server_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        dir.path(),
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let url = server.url("", "?request_timeout_ms=1000&connect_timeout_ms=500");
    let bus = Bus::connect(&url).await.expect("connect");
    let topic = Topic::parse("ampy.dev.news.v1.ackcut").unwrap();
    let publisher = Publisher::new(bus.clone()).with_policy(RetryPolicy {
        max_attempts: 100,
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
    });
    let first = 20usize;
    for i in 0..first {
        publisher
            .publish(&topic, headers(&format!("k{}", i % 4)), format!("m{i}"))
            .await
            .expect("publish");
    }

    // The handler of m10 tells the test it runs, then waits until the server is down.
    let (at_m10_tx, mut at_m10) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (down_tx, down) = tokio::sync::watch::channel(false);
    let effects: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let e2 = effects.clone();
    let consumer = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.news.v1.ackcut").unwrap(),
        "ackcut",
    )
    .without_dedupe()
    .workers(1)
    .max_in_flight(8)
    .ack_deadline(Duration::from_secs(8))
    .start_at(StartAt::Earliest)
    .handler(handler_fn(move |m: Message| {
        let effects = e2.clone();
        let at_m10 = at_m10_tx.clone();
        let mut down = down.clone();
        async move {
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            if text == "m10" && m.info.delivery_count == 1 {
                let _ = at_m10.send(());
                let _ = down.wait_for(|d| *d).await;
            }
            *effects.lock().unwrap().entry(text).or_default() += 1;
            Outcome::Ok
        }
    }))
    .start()
    .await
    .expect("consumer");

    let hang = ampybus_conformance::hang_timeout();
    tokio::time::timeout(hang, at_m10.recv())
        .await
        .expect("m10 never handled")
        .expect("handler gone");
    server.kill();
    down_tx.send(true).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage itself, not a sync
    server.spawn();
    eprintln!("server restarted after a 3 s outage");

    for i in first..first + 10 {
        publisher
            .publish(&topic, headers(&format!("k{}", i % 4)), format!("m{i}"))
            .await
            .expect("publish after the restart");
    }
    let total = first + 10;
    eprintln!("published {total}");
    let start = Instant::now();
    loop {
        let done = effects.lock().unwrap().len();
        let s = consumer.stats();
        if done == total && s.in_flight == 0 {
            break;
        }
        assert!(
            start.elapsed() < hang,
            "timed out: {done} of {total} handled; {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("all handled after {:.2?}", start.elapsed());
    let stats = consumer.shutdown(Duration::from_secs(10)).await;
    let lag = bus
        .consumer_lag("ackcut")
        .await
        .expect("lag")
        .expect("group");
    assert_eq!(lag.in_flight, 0, "left pending in the group: {lag:?}");
    let effects = effects.lock().unwrap();
    let twice: Vec<_> = effects.iter().filter(|(_, c)| **c != 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    assert_eq!(effects.len(), total);
    assert_eq!(stats.dead_lettered_total(), 0, "{stats:?}");
}

fn raw(topic: &Topic, key: &str, payload: &str) -> Envelope {
    Envelope::new(topic, headers(key), payload.as_bytes().to_vec())
}

/// A durable subscription over `ampy.dev.>` reads every domain stream, including one created
/// after it subscribed; two instances of one name share the work with `order=per_instance`
/// (each message once in all);
/// `StartAt::Latest` skips what was there; entries of other topics in a stream are never
/// handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_consumers_span_streams_share_work_and_start_latest() {
    start_shared();
    let url = format!("{}&order=per_instance", shared_url("span"));
    let bus = Bus::connect(&url).await.expect("connect");
    let news = Topic::parse("ampy.dev.news.v1.span.a").unwrap();
    let bars = Topic::parse("ampy.dev.bars.v1.span.b").unwrap();
    let other = Topic::parse("ampy.dev.news.v1.elsewhere.c").unwrap();
    bus.publish_batch(
        (0..10)
            .map(|i| raw(&news, "n1", &format!("n{i}")))
            .collect(),
    )
    .await
    .unwrap();
    bus.publish_batch(
        (0..10)
            .map(|i| raw(&other, "o1", &format!("o{i}")))
            .collect(),
    )
    .await
    .unwrap();
    let pattern = TopicPattern::parse("ampy.dev.*.v1.span.>").unwrap();
    let mut a = bus
        .subscribe(SubscribeSpec::durable(pattern.clone(), "span"))
        .await
        .unwrap();
    let mut b = bus
        .subscribe(SubscribeSpec::durable(pattern.clone(), "span"))
        .await
        .unwrap();
    let mut latest = SubscribeSpec::durable(pattern.clone(), "span-latest");
    latest.start = StartAt::Latest;
    let mut l = bus.subscribe(latest).await.unwrap();
    // A stream created after the subscriptions.
    bus.publish_batch(
        (0..10)
            .map(|i| raw(&bars, "XNAS.AAPL", &format!("b{i}")))
            .collect(),
    )
    .await
    .unwrap();
    let mut seen: Vec<String> = Vec::new();
    let start = Instant::now();
    while seen.len() < 20 {
        assert!(start.elapsed() < Duration::from_secs(60), "only {seen:?}");
        for sub in [&mut a, &mut b] {
            let got = sub.fetch(3, Duration::from_millis(200)).await.unwrap();
            for d in got {
                seen.push(String::from_utf8_lossy(&d.envelope.payload).into_owned());
                d.ack().await.map_err(|(e, _)| e).unwrap();
            }
        }
    }
    for sub in [&mut a, &mut b] {
        assert!(
            sub.fetch(10, Duration::from_millis(300))
                .await
                .unwrap()
                .is_empty()
        );
    }
    seen.sort();
    let mut want: Vec<String> = (0..10)
        .map(|i| format!("n{i}"))
        .chain((0..10).map(|i| format!("b{i}")))
        .collect();
    want.sort();
    assert_eq!(seen, want);
    // Latest: only the bars stream, created after it subscribed (its group starts at 0).
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < 10 {
        assert!(start.elapsed() < Duration::from_secs(60), "only {got:?}");
        for d in l.fetch(10, Duration::from_millis(200)).await.unwrap() {
            got.push(String::from_utf8_lossy(&d.envelope.payload).into_owned());
            d.ack().await.map_err(|(e, _)| e).unwrap();
        }
    }
    assert_eq!(got, (0..10).map(|i| format!("b{i}")).collect::<Vec<_>>());
    assert!(
        l.fetch(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    let lag = bus.consumer_lag("span").await.unwrap().unwrap();
    assert_eq!(
        lag,
        ampybus::transport::Lag {
            pending: 0,
            in_flight: 0
        }
    );
}

/// Replay over a pattern spanning several streams pages through every stream in store order;
/// a nack with a delay leaves the entry pending and it comes again (delivery count 2) once the
/// delay has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_across_streams_and_nack_with_delay() {
    start_shared();
    let url = shared_url("replay");
    let bus = Bus::connect(&url).await.expect("connect");
    let topics = [
        Topic::parse("ampy.dev.news.v1.r.a").unwrap(),
        Topic::parse("ampy.dev.bars.v1.r.b").unwrap(),
        Topic::parse("ampy.dev.fx.v1.r.c").unwrap(),
    ];
    let keys = ["n", "XNAS.AAPL", "EUR.USD"];
    let mut want = Vec::new();
    for i in 0..30 {
        let t = i % 3;
        bus.publish(&topics[t], headers(keys[t]), format!("m{i}"))
            .await
            .unwrap();
        want.push(format!("m{i}"));
    }
    let mut q = WindowQuery::new(TopicPattern::parse("ampy.dev.>").unwrap());
    q.limit = 7;
    let mut got = Vec::new();
    loop {
        let page = bus.replay().unwrap().read_window(&q).await.unwrap();
        let Some(last) = page.last() else { break };
        q.after_sequence = last.sequence;
        got.extend(
            page.iter()
                .map(|m| String::from_utf8_lossy(&m.envelope.payload).into_owned()),
        );
    }
    // Across streams the order is by millisecond store time (within one millisecond, by
    // stream); within a stream it is publish order.
    assert_eq!(got.len(), want.len(), "{got:?}");
    for t in 0..3 {
        let mine: Vec<&String> = got
            .iter()
            .filter(|m| m[1..].parse::<usize>().unwrap() % 3 == t)
            .collect();
        let expect: Vec<&String> = want.iter().skip(t).step_by(3).collect();
        assert_eq!(mine, expect, "stream {t} in publish order");
    }

    let pattern = TopicPattern::parse("ampy.dev.news.v1.r.>").unwrap();
    let mut spec = SubscribeSpec::durable(pattern, "nacker");
    spec.ack_deadline = Duration::from_secs(2);
    let mut sub = bus.subscribe(spec).await.unwrap();
    let first = sub.fetch(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.len(), 1);
    let seq = first[0].info.sequence;
    assert_eq!(first[0].info.delivery_count, 1);
    first
        .into_iter()
        .next()
        .unwrap()
        .nack(Duration::from_millis(300))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let start = Instant::now();
    let again = loop {
        let got = sub.fetch(20, Duration::from_millis(200)).await.unwrap();
        if let Some(d) = got.iter().position(|d| d.info.sequence == seq) {
            let mut got = got;
            break got.swap_remove(d);
        }
        for d in got {
            d.ack().await.map_err(|(e, _)| e).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "nacked entry never came again"
        );
    };
    assert_eq!(again.info.delivery_count, 2);
    again.ack().await.map_err(|(e, _)| e).unwrap();
}
