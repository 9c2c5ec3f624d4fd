//! Redis fault and bad-input tests that are specific to Redis (ACL users, the acker through an
//! outage). Each spawns `redis-server` on a free loopback port in a temp directory and kills it
//! when the guard drops. The flows every transport shares (a broker restart mid-run, shared
//! durables, patterns over several streams, `StartAt::Latest`, replay across streams, nack with
//! a delay) are conformance cases (`tests/redis.rs`).

use ampybus::runtime::{Consumer, Message, Outcome, Publisher, RetryPolicy, handler_fn};
use ampybus::transport::StartAt;
use ampybus::{Bus, ErrorKind, Topic, TopicPattern};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ampybus_conformance::RedisServer as Server;
use ampybus_conformance::{fault_headers as headers, timed};

/// ACL users: the right user and password work; a wrong password and an unknown user are a
/// Config error naming the user, never showing the password; a user that may write only the
/// news stream gets a clear, specific Config error (NOPERM, the stream key) on orders, at once,
/// and the retrying Publisher does not retry it.
/// The checks every broker binding shares (garbage port, unknown option, misspelt scheme,
/// unreachable server without leaking the password, missing CA file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_unreachable_servers_fail_fast_and_clearly() {
    ampybus_conformance::bad_urls_fail_fast_and_clearly(ampybus_conformance::BadUrls {
        scheme: "redis",
        unreachable_query: "?connect_timeout_ms=1000",
        missing_ca: Some(("rediss://127.0.0.1:1?tls_ca=/nonexistent/ca.pem", "tls_ca")),
        unreachable_kinds: &[ErrorKind::Transport, ErrorKind::Timeout],
        unreachable_text: "",
        limit: Duration::from_secs(30),
    })
    .await;
}

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
