//! NATS fault and bad-input tests that are specific to NATS (no JetStream, permissions, TLS,
//! tokens, NKeys and JWT credentials, existing streams, a cluster losing a node). Each test that
//! needs a server of its own spawns `nats-server` on a free loopback port with a temp store
//! directory and config file, and kills it when the guard drops. The flows every transport
//! shares (a broker restart mid-run, shared durables, patterns over several streams, where a
//! subscription starts, replay across streams) are conformance cases (`tests/nats.rs`).

use ampybus::dedupe::DedupeStore;
use ampybus::runtime::{Consumer, Message, Outcome, Publisher, RetryPolicy, handler_fn};
use ampybus::transport::SubscribeSpec;
use ampybus::transport::nats::NatsKvDedupeStore;
use ampybus::{Bus, ErrorKind, Topic, TopicPattern};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ampybus_conformance::NatsServer as Server;
use ampybus_conformance::{fault_headers as headers, timed};

/// A server of the test's own with JetStream stored in `dir/js` and `extra` added to its
/// config file.
fn server_with_config(dir: &Path, extra: &str) -> Server {
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "jetstream {{ store_dir: \"{}\" }}\n{extra}\n",
            dir.join("js").display()
        ),
    )
    .unwrap();
    Server::start(dir, &["-c", conf.to_str().unwrap()])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .unwrap()
        .port()
}

/// The checks every broker binding shares (garbage port, unknown option, misspelt scheme,
/// unreachable server without leaking the password, missing CA file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_unreachable_servers_fail_fast_and_clearly() {
    ampybus_conformance::bad_urls_fail_fast_and_clearly(ampybus_conformance::BadUrls {
        scheme: "nats",
        unreachable_query: "",
        missing_ca: Some(("tls://127.0.0.1:1?tls_ca=/nonexistent/ca.pem", "tls_ca")),
        unreachable_kinds: &[ErrorKind::Transport, ErrorKind::Timeout],
        unreachable_text: "",
        limit: Duration::from_secs(15),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_jetstream_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let e = timed(
        "connect without JetStream",
        Duration::from_secs(15),
        Bus::connect(&server.url("nats", "")),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("JetStream"), "{e}");
    assert!(e.to_string().contains("-js"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_outside_permissions_is_a_clear_error_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            r#"
jetstream {{ store_dir: "{}" }}
authorization {{
  users = [
    {{ user: alice, password: alicepw, permissions: {{
        publish: {{ allow: ["ampy.dev.news.v1.alice.>", "$JS.API.>", "$JS.ACK.>"] }},
        subscribe: {{ allow: ["_INBOX.>"] }}
    }} }}
  ]
}}
"#,
            dir.path().join("js").display()
        ),
    )
    .unwrap();
    let server = Server::start(dir.path(), &["-c", conf.to_str().unwrap()]);

    let e = timed(
        "wrong password",
        Duration::from_secs(15),
        Bus::connect(&server.url("nats", "?user=alice&password=nope")),
    )
    .await
    .unwrap_err();
    assert!(!format!("{e:?}").contains("nope"), "password leaked: {e:?}");
    assert!(e.to_string().to_ascii_lowercase().contains("auth"), "{e}");

    let bus = Bus::connect(&server.url("nats", "?user=alice&password=alicepw&stream_prefix=PERM"))
        .await
        .expect("alice connects");
    let ok = Topic::parse("ampy.dev.news.v1.alice.x").unwrap();
    let r = bus
        .publish(&ok, headers("k"), b"mine".to_vec())
        .await
        .expect("publish inside the permissions");
    assert_eq!(r.sequence, 1);

    let denied = Topic::parse("ampy.dev.news.v1.bob.x").unwrap();
    let publisher = Publisher::new(bus.clone()).with_policy(RetryPolicy {
        max_attempts: 50,
        min_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
    });
    let e = timed(
        "denied publish through the retrying publisher",
        Duration::from_secs(10),
        publisher.publish(&denied, headers("k"), b"not mine".to_vec()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("permission denied"), "{e}");
    assert!(e.to_string().contains("ampy.dev.news.v1.bob.x"), "{e}");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
fn make_certs(dir: &Path) -> [PathBuf; 5] {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ampybus test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut sp = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    sp.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let sk = KeyPair::generate().unwrap();
    let scert = sp.signed_by(&sk, &issuer).unwrap();

    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name
        .push(DnType::CommonName, "ampybus client");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let ck = KeyPair::generate().unwrap();
    let ccert = cp.signed_by(&ck, &issuer).unwrap();

    let files = [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", scert.pem()),
        ("server.key", sk.serialize_pem()),
        ("client.pem", ccert.pem()),
        ("client.key", ck.serialize_pem()),
    ];
    files.map(|(name, pem)| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_with_a_client_cert_and_fails_clearly_without() {
    let dir = tempfile::tempdir().unwrap();
    let [ca, server_pem, server_key, client_pem, client_key] = make_certs(dir.path());
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            r#"
jetstream {{ store_dir: "{}" }}
tls {{
  cert_file: "{}"
  key_file: "{}"
  ca_file: "{}"
  verify: true
  timeout: 2
}}
"#,
            dir.path().join("js").display(),
            server_pem.display(),
            server_key.display(),
            ca.display()
        ),
    )
    .unwrap();
    let server = Server::start(dir.path(), &["-c", conf.to_str().unwrap()]);

    let url = server.url(
        "tls",
        &format!(
            "?tls_ca={}&tls_cert={}&tls_key={}&stream_prefix=TLS",
            ca.display(),
            client_pem.display(),
            client_key.display()
        ),
    );
    let bus = timed("mTLS connect", Duration::from_secs(15), Bus::connect(&url))
        .await
        .expect("connect with a client certificate");
    let topic = Topic::parse("ampy.dev.news.v1.tls.x").unwrap();
    bus.publish(&topic, headers("k"), b"over tls".to_vec())
        .await
        .expect("publish over TLS");
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(
            TopicPattern::parse("ampy.dev.news.>").unwrap(),
            "tls-reader",
        ))
        .await
        .unwrap();
    let got = sub.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].envelope.payload[..], b"over tls");

    let no_cert = server.url("tls", &format!("?tls_ca={}", ca.display()));
    let e = timed(
        "TLS connect without a client certificate",
        Duration::from_secs(20),
        Bus::connect(&no_cert),
    )
    .await
    .unwrap_err();
    eprintln!("without a client certificate: {e}");
    assert!(
        matches!(e.kind(), ErrorKind::Transport | ErrorKind::Timeout),
        "{e}"
    );
    let text = e.to_string().to_ascii_lowercase();
    assert!(
        text.contains("tls") || text.contains("certificate"),
        "not a TLS error: {e}"
    );

    let plain = server.url("nats", "");
    let e = timed(
        "plain connect to a TLS server",
        Duration::from_secs(20),
        Bus::connect(&plain),
    )
    .await
    .unwrap_err();
    eprintln!("plain to TLS: {e}");
    assert!(e.to_string().to_ascii_lowercase().contains("tls"), "{e}");
}

/// An existing stream that captures the subjects (the seed's `AMPY` on `ampy.>`, no age limit)
/// is used, never changed; one whose settings break the semantics is refused with the list;
/// one that captures only part of a domain is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_streams_are_used_or_refused_with_the_reasons() {
    use async_nats::jetstream::stream;
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("js");
    let server = Server::start(dir.path(), &["-js", "-sd", store_dir.to_str().unwrap()]);
    let client = async_nats::connect(format!("127.0.0.1:{}", server.port()))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let seed = stream::Config {
        name: "AMPY".into(),
        subjects: vec!["ampy.dev.>".into()],
        ..Default::default()
    };
    js.create_stream(seed).await.expect("seed stream");

    let bus = Bus::connect(&server.url("nats", "")).await.unwrap();
    let topic = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
    let r = bus
        .publish(&topic, headers("XNAS.AAPL"), b"bar".to_vec())
        .await
        .unwrap();
    assert_eq!((r.sequence, r.duplicate), (1, false));
    let mut s = js.get_stream("AMPY").await.unwrap();
    let info = s.info().await.unwrap().clone();
    assert_eq!(info.state.messages, 1, "stored in the existing stream");
    assert_eq!(
        info.config.max_age,
        Duration::ZERO,
        "existing stream left unchanged"
    );
    let mut names = Vec::new();
    let mut list = js.stream_names();
    while let Some(n) = futures::StreamExt::next(&mut list).await {
        names.push(n.unwrap());
    }
    assert_eq!(names, vec!["AMPY"], "no stream of ours created beside it");

    // A memory stream with discard new for paper orders: fatal, both reasons listed.
    let bad = stream::Config {
        name: "PAPER_ORDERS_MEM".into(),
        subjects: vec!["ampy.paper.orders.>".into()],
        storage: stream::StorageType::Memory,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    js.create_stream(bad).await.unwrap();
    let orders = Topic::parse("ampy.paper.orders.v1.requests").unwrap();
    let e = bus
        .publish(&orders, headers("co_1"), b"o".to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    let text = e.to_string();
    assert!(text.contains("PAPER_ORDERS_MEM"), "{text}");
    assert!(text.contains("storage"), "{text}");
    assert!(text.contains("discard"), "{text}");

    // Part of the prod fills domain captured by someone else: refused, naming it.
    let partial = stream::Config {
        name: "SOME_FILLS".into(),
        subjects: vec!["ampy.prod.fills.v1.special".into()],
        ..Default::default()
    };
    js.create_stream(partial).await.unwrap();
    let fills = Topic::parse("ampy.prod.fills.v1.other").unwrap();
    let e = bus
        .publish(&fills, headers("acct|co_1"), b"f".to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("SOME_FILLS"), "{e}");
}

/// A 3-node JetStream cluster on loopback, streams and consumers with 3 replicas: one node is
/// killed mid-run (publishers and a consumer active, connected to all three seeds). None lost,
/// each applied once (the dedupe store skips redeliveries), publishers finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_loss_mid_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let d = dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&d).unwrap();
        let routes: Vec<String> = (0..3)
            .filter(|j| *j != i)
            .map(|j| format!("\"nats-route://127.0.0.1:{}\"", cluster_ports[j]))
            .collect();
        let conf = d.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                r#"
server_name: n{i}
jetstream {{ store_dir: "{}" }}
cluster {{
  name: ampytest
  listen: 127.0.0.1:{}
  routes: [{}]
}}
"#,
                d.join("js").display(),
                cluster_ports[i],
                routes.join(", ")
            ),
        )
        .unwrap();
        nodes.push(Server::start(&d, &["-c", conf.to_str().unwrap()]));
    }
    let seeds: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port()))
        .collect();
    let url = format!(
        "nats://{}?stream_prefix=CLU&replicas=3&request_timeout_ms=3000",
        seeds.join(",")
    );
    // The cluster elects its JetStream meta leader first: connect (and create the stream)
    // until that is done, bounded.
    let start = Instant::now();
    let topic = Topic::parse("ampy.dev.news.v1.cluster.t").unwrap();
    let bus = loop {
        match Bus::connect(&url).await {
            Ok(b) => match b.publish(&topic, headers("warm"), b"warm".to_vec()).await {
                Ok(_) => break b,
                Err(e) => eprintln!("cluster not ready: {e}"),
            },
            Err(e) => eprintln!("cluster not ready: {e}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "cluster never ready"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let n = ((5_000.0 * ampybus_conformance::scale()) as usize).max(500);
    let store: Arc<dyn DedupeStore> = Arc::new(
        NatsKvDedupeStore::connect(&url)
            .await
            .expect("dedupe store"),
    );
    let effects: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let e2 = effects.clone();
    let consumer = Consumer::builder(
        bus.clone(),
        TopicPattern::parse("ampy.dev.news.v1.cluster.>").unwrap(),
        "cluster-consumer",
    )
    .dedupe(store)
    .max_in_flight(256)
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
    for p in 0..4usize {
        let publisher = Publisher::new(bus.clone()).with_policy(RetryPolicy {
            max_attempts: 100,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
        });
        let (published, topic) = (published.clone(), topic.clone());
        tasks.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            for i in (p..n).step_by(4) {
                match publisher
                    .publish(&topic, headers(&format!("k{}", i % 16)), format!("m{i}"))
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
    while published.load(Ordering::SeqCst) < (n / 3) as u64 {
        assert!(start.elapsed() < hang, "no progress before the node loss");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    nodes[1].kill();
    eprintln!(
        "node n1 killed after {} published",
        published.load(Ordering::SeqCst)
    );
    for t in tasks {
        let failed = tokio::time::timeout(hang, t)
            .await
            .expect("a publisher hung")
            .expect("publisher task");
        assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(3)]);
    }
    let start = Instant::now();
    loop {
        // `warm` is handled too.
        let done = effects.lock().unwrap().len();
        if done == n + 1 && consumer.stats().in_flight == 0 {
            break;
        }
        assert!(
            start.elapsed() < hang,
            "timed out: {done} of {} handled; {:?}",
            n + 1,
            consumer.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = consumer.shutdown(Duration::from_secs(10)).await;
    let twice = effects.lock().unwrap().values().filter(|c| **c > 1).count();
    assert!(twice <= 256, "{twice} handled more than once");
    eprintln!("cluster: n={n}, all handled, {twice} handled twice; {stats:?}");
}

/// Token (userinfo) and NKey seed (`?nkey=`) authentication; a wrong token is refused clearly
/// and never shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_nkey_authentication() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    for (auth, good, bad) in [
        (
            "authorization { token: \"t0ken-s3cret\" }".to_owned(),
            "t0ken-s3cret@".to_owned(),
            "wrong-t0ken@".to_owned(),
        ),
        (
            format!(
                "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
                user.public_key()
            ),
            String::new(),
            String::new(),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = server_with_config(dir.path(), &auth);
        let nkey = auth.contains("nkey");
        let q = if nkey {
            format!("?nkey={seed}&stream_prefix=AUTH")
        } else {
            "?stream_prefix=AUTH".to_owned()
        };
        let url = format!("nats://{good}127.0.0.1:{}{q}", server.port());
        let bus = Bus::connect(&url).await.expect("authenticated connect");
        let topic = Topic::parse("ampy.dev.news.v1.auth.x").unwrap();
        bus.publish(&topic, headers("k"), b"x".to_vec())
            .await
            .expect("publish");
        let (wrong, secret) = if nkey {
            let other = nkeys::KeyPair::new_user().seed().unwrap();
            (
                format!("nats://127.0.0.1:{}?nkey={other}", server.port()),
                other,
            )
        } else {
            (
                format!("nats://{bad}127.0.0.1:{}", server.port()),
                "wrong-t0ken".to_owned(),
            )
        };
        let e = timed(
            "wrong credentials",
            Duration::from_secs(15),
            Bus::connect(&wrong),
        )
        .await
        .unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(shown.to_ascii_lowercase().contains("auth"), "{shown}");
        assert!(!shown.contains(&secret), "secret shown: {shown}");
    }
}

/// A NATS v2 JWT: `sub` with `nats` claims, issued and signed by `issuer`. The `jti` is the
/// base32 SHA-256 of the claims without it, as the nats jwt library computes it.
fn nats_jwt(issuer: &nkeys::KeyPair, sub: &str, name: &str, nats: serde_json::Value) -> String {
    use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
    use sha2::Digest;
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = serde_json::json!({
        "iat": iat,
        "iss": issuer.public_key(),
        "sub": sub,
        "name": name,
        "nats": nats,
    });
    let jti = BASE32_NOPAD.encode(&sha2::Sha256::digest(claims.to_string().as_bytes()));
    claims["jti"] = jti.into();
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = BASE64URL_NOPAD.encode(claims.to_string().as_bytes());
    let signed = format!("{header}.{body}");
    let sig = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", BASE64URL_NOPAD.encode(&sig))
}

/// An account JWT signed by `operator`; with `jetstream`, unlimited JetStream (the v2 limits
/// `mem_storage`/`disk_storage` not 0 is what enables it for the account).
fn account_jwt(
    operator: &nkeys::KeyPair,
    account: &nkeys::KeyPair,
    name: &str,
    jetstream: bool,
) -> String {
    let mut limits = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for k in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[k] = (-1).into();
        }
    }
    nats_jwt(
        operator,
        &account.public_key(),
        name,
        serde_json::json!({
            "type": "account",
            "version": 2,
            "limits": limits,
            "default_permissions": { "pub": {}, "sub": {} },
        }),
    )
}

/// A `.creds` file for a new user of `account`: the user JWT and the user's seed.
fn write_creds(path: &Path, account: &nkeys::KeyPair, name: &str) -> String {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let jwt = nats_jwt(
        account,
        &user.public_key(),
        name,
        serde_json::json!({
            "type": "user",
            "version": 2,
            "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1,
        }),
    );
    std::fs::write(
        path,
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .unwrap();
    seed
}

/// Operator mode (decentralised JWT auth): an operator, a JetStream-enabled account preloaded
/// in a memory resolver, a user in a `.creds` file. `?creds=` connects, publishes and reads
/// back; no credentials, a user of an unknown account and a missing file fail clearly, and no
/// error shows a user seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_file_jwt_authentication() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    // nats-server 2.9 will not start JetStream in operator mode without a system account.
    let system = nkeys::KeyPair::new_account();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "ampybus-op",
        serde_json::json!({ "type": "operator", "version": 2 }),
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "operator: \"{operator_jwt}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n}}\njetstream {{ store_dir: \"{}\" }}\n",
            system.public_key(),
            system.public_key(),
            account_jwt(&operator, &system, "SYS", false),
            account.public_key(),
            account_jwt(&operator, &account, "ampybus-acc", true),
            dir.path().join("js").display()
        ),
    )
    .unwrap();
    let server = Server::start(dir.path(), &["-c", conf.to_str().unwrap()]);
    let limit = Duration::from_secs(15);

    let creds = dir.path().join("user.creds");
    let seed = write_creds(&creds, &account, "ampybus-user");
    // A user signed by an account the server does not know (not issued by its operator).
    let foreign_acc = nkeys::KeyPair::new_account();
    let foreign = dir.path().join("foreign.creds");
    let foreign_seed = write_creds(&foreign, &foreign_acc, "foreign-user");
    assert!(seed.starts_with("SU") && foreign_seed.starts_with("SU"));
    let no_secret = |e: &ampybus::Error| {
        let shown = format!("{e} {e:?}");
        assert!(
            !shown.contains(&seed) && !shown.contains(&foreign_seed),
            "seed shown: {shown}"
        );
        eprintln!("{e}");
    };

    let bus = timed(
        "connect with a creds file",
        limit,
        Bus::connect(&server.url(
            "nats",
            &format!("?creds={}&stream_prefix=JWT", creds.display()),
        )),
    )
    .await
    .expect("connect with the creds file");
    let topic = Topic::parse("ampy.dev.news.v1.jwt.x").unwrap();
    let r = bus
        .publish(&topic, headers("k"), b"signed in".to_vec())
        .await
        .expect("publish as the JWT user");
    assert_eq!(r.sequence, 1);
    let mut sub = bus
        .subscribe(SubscribeSpec::durable(
            TopicPattern::parse("ampy.dev.news.>").unwrap(),
            "jwt-reader",
        ))
        .await
        .expect("durable subscription as the JWT user");
    let got = sub.fetch(10, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].envelope.payload[..], b"signed in");

    let e = timed(
        "connect without credentials",
        limit,
        Bus::connect(&server.url("nats", "")),
    )
    .await
    .unwrap_err();
    no_secret(&e);
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(
        e.to_string()
            .to_ascii_lowercase()
            .contains("authorization violation"),
        "{e}"
    );

    let e = timed(
        "connect as a user of an unknown account",
        limit,
        Bus::connect(&server.url("nats", &format!("?creds={}", foreign.display()))),
    )
    .await
    .unwrap_err();
    no_secret(&e);
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(
        e.to_string()
            .to_ascii_lowercase()
            .contains("authorization violation"),
        "{e}"
    );

    let missing = dir.path().join("missing.creds");
    let e = timed(
        "connect with a missing creds file",
        limit,
        Bus::connect(&server.url("nats", &format!("?creds={}", missing.display()))),
    )
    .await
    .unwrap_err();
    no_secret(&e);
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("credentials file {}", missing.display())),
        "{e}"
    );
}

/// The binding's own publishing connection (every non-TLS URL publishes on it): a message
/// over the server's `max_payload` is refused before it is sent and the connection stays; a
/// server that stops answering gives a PubAck timeout and the next publish connects again; a
/// server restarted on the same port is found again by a retrying publisher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_publishing_connection_refuses_oversize_survives_a_hang_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = server_with_config(dir.path(), "max_payload: 8192");
    let bus = Bus::connect(&server.url("nats", "?stream_prefix=OWN&request_timeout_ms=1000"))
        .await
        .expect("connect");
    let topic = Topic::parse("ampy.dev.news.v1.own.t").unwrap();
    let limit = Duration::from_secs(20);
    let publish = |body: Vec<u8>| bus.publish(&topic, headers("k"), body);
    let r = timed("first", limit, publish(b"first".to_vec()))
        .await
        .expect("first publish");
    assert_eq!(r.sequence, 1);

    let e = timed("oversize", limit, publish(vec![b'x'; 9000]))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Payload, "{e}");
    assert!(e.to_string().contains("max_payload"), "{e}");
    let r = timed("second", limit, publish(b"second".to_vec()))
        .await
        .expect("the connection stays after a refused message");
    assert_eq!(r.sequence, 2, "the oversize message was not stored");

    server.pause();
    let e = timed("publish to a hung server", limit, publish(b"hung".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("no PubAck"), "{e}");
    server.resume();
    let r = timed("after the hang", limit, publish(b"after".to_vec()))
        .await
        .expect("the next publish connects again");
    // The hung server may still have stored "hung" from its socket buffer when it resumed.
    assert!(r.sequence == 3 || r.sequence == 4, "{r:?}");

    // Hung again with the connection up: a batch larger than the socket and the binding's
    // buffer together is not held until the server reads again; the publisher is told within
    // the request timeout.
    server.pause();
    let big: Vec<ampybus::Envelope> = (0..2_000)
        .map(|i| {
            let mut h = headers("k");
            h.fill_publish_defaults();
            ampybus::Envelope::new(&topic, h, vec![b'b'; 7_000 + i % 10])
        })
        .collect();
    let e = timed(
        "a big batch to a hung server",
        limit,
        bus.publish_batch(big),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport, "{e}");
    assert!(e.to_string().contains("took nothing"), "{e}");
    server.resume();
    let r = timed("after the second hang", limit, publish(b"after2".to_vec()))
        .await
        .expect("the next publish connects again");
    let after = r.sequence;

    server.restart();
    let publisher = Publisher::new(bus.clone()).with_policy(RetryPolicy {
        max_attempts: 100,
        min_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
    });
    let r = timed(
        "publish after a restart",
        limit,
        publisher.publish(&topic, headers("k"), b"restarted".to_vec()),
    )
    .await
    .expect("a retrying publisher reaches the restarted server");
    // Stored after everything before the restart (messages of the big batch the server read
    // from its socket after it resumed may have been stored after `after2`).
    assert!(r.sequence > after && !r.duplicate, "{r:?}");
}
