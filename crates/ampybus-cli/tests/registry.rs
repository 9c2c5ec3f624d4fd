//! `ampybus registry …` and the registry on the command line: check (exit codes, exact
//! lines), config precedence, `pub` refused, the generated NATS and Redis permissions against
//! real servers (each spawned here with the generated file), the AsyncAPI document through
//! `@asyncapi/parser`, the Kafka ACL commands against a golden file.

mod common;

use ampybus::runtime::{Consumer, Outcome, control, handler_fn};
use ampybus::{Bus, ErrorKind, Headers, Topic, TopicPattern};
use common::{Out, ampybus_in};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const REGISTRY: &str = r#"[[topic]]
pattern = "ampy.*.orders.v1.>"
owner = "oms"
schemas = ["ampy.orders.v1.OrderRequest", "ampy.raw.v1.Bytes"]
tier = "at_least_once_dedupe"
retention_days = 30
consumers = ["risk"]

[[topic]]
pattern = "ampy.*.news.v1.>"
owner = "ui"
schemas = ["ampy.raw.v1.Bytes"]
tier = "at_least_once"
retention_days = 7
"#;

const PASSWORDS: &str = "oms = \"oms-pw\"\nrisk = \"risk-pw\"\nui = \"ui-pw\"\n";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

/// The binary run in `cwd` (for `./ampybus.toml`), with `env` set.
fn ampybus_at(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_ampybus"))
        .current_dir(cwd)
        .args(args)
        .env_remove("AMPYBUS_URL")
        .env_remove("AMPYBUS_REGISTRY")
        .env_remove("AMPYBUS_CONFIG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[test]
fn check_passes_on_the_example_and_names_every_problem() {
    let example = repo().join("registry.example.toml");
    let o = ampybus_in(
        None,
        &["registry", "check", "--registry", example.to_str().unwrap()],
    );
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert_eq!(
        o.stdout,
        format!(
            "OK {}: 10 entries, 5 services, 0 manifest(s), 0 problem(s), 0 warning(s)\n",
            example.display()
        )
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.toml",
        &format!(
            "{REGISTRY}\n[[topic]]\npattern = \"ampy.prod.orders.v1.algo\"\nowner = \"algo\"\nschemas = [\"ampy.orders.v1.Nope\"]\ntier = \"at_least_once\"\nretention_days = 30\n"
        ),
    );
    let mdir = dir.path().join("manifests");
    std::fs::create_dir(&mdir).unwrap();
    write(
        &mdir,
        "risk.toml",
        "service = \"risk\"\n[[publishes]]\npattern = \"ampy.prod.orders.v1.>\"\nschema = \"ampy.orders.v1.OrderRequest\"\n",
    );
    let o = ampybus_in(
        None,
        &[
            "registry",
            "check",
            "--registry",
            &bad,
            "--manifests",
            mdir.to_str().unwrap(),
        ],
    );
    assert_eq!(o.code, 1, "{}{}", o.stdout, o.stderr);
    let m = format!("{}/risk.toml", mdir.display());
    assert_eq!(
        o.lines(),
        vec![
            format!(
                "{bad}:1: entry \"ampy.*.orders.v1.>\": overlaps \"ampy.prod.orders.v1.algo\" (line 16): owner `oms` and owner `algo` would both publish the topics both patterns match; one owner per topic"
            ),
            format!(
                "{bad}:1: warning: entry \"ampy.*.orders.v1.>\": shares a Redis stream / Kafka topic (ampy.*.orders.v1) with \"ampy.prod.orders.v1.algo\" (line 16) but not its settings (tier at_least_once_dedupe vs at_least_once, retention_days 30 vs 30): the unit gets the longest retention and the ACL of both; the library still enforces per topic"
            ),
            format!(
                "{bad}:19: entry \"ampy.prod.orders.v1.algo\": schema \"ampy.orders.v1.Nope\" is unknown to ampybus-proto (and not ampy.raw.v1.Bytes)"
            ),
            format!(
                "{m}:2: entry \"[[publishes]] ampy.prod.orders.v1.>\": service `risk` publishes outside its claims: the pattern is not within an entry it owns (\"ampy.*.orders.v1.>\" belongs to `oms`, \"ampy.prod.orders.v1.algo\" belongs to `algo`)"
            ),
            format!("FAIL {bad}: 3 entries, 4 services, 1 manifest(s), 3 problem(s), 1 warning(s)"),
        ]
    );
}

#[test]
fn unreadable_or_malformed_files_exit_2_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let missing = missing.to_str().unwrap();
    let cases = [
        (
            missing.to_owned(),
            format!(
                "error: registry {missing}: cannot read the file: No such file or directory (os error 2)\n"
            ),
        ),
        (
            write(dir.path(), "syntax.toml", "[[topic]\npattern = 1\n"),
            String::new(),
        ),
        (
            write(
                dir.path(),
                "unknown.toml",
                &REGISTRY.replace("tier ", "teir "),
            ),
            String::new(),
        ),
    ];
    for (file, want) in &cases {
        let o = ampybus_in(None, &["registry", "check", "--registry", file]);
        assert_eq!(o.code, 2, "{file}: {}{}", o.stdout, o.stderr);
        assert!(o.stdout.is_empty(), "{}", o.stdout);
        if !want.is_empty() {
            assert_eq!(&o.stderr, want);
        }
    }
    let o = ampybus_in(None, &["registry", "check", "--registry", &cases[1].0]);
    assert!(
        o.stderr
            .starts_with(&format!("error: registry {}:1: ", cases[1].0)),
        "{}",
        o.stderr
    );
    let o = ampybus_in(None, &["registry", "check", "--registry", &cases[2].0]);
    assert!(
        o.stderr.starts_with(&format!(
            "error: registry {}:5: unknown field `teir`",
            cases[2].0
        )),
        "{}",
        o.stderr
    );
    // A bad config file is named the same way.
    let conf = write(
        dir.path(),
        "ampybus.toml",
        "url = \"./x\"\nregistyr = \"r.toml\"\n",
    );
    let o = ampybus_in(None, &["--config", &conf, "registry", "check"]);
    assert_eq!(o.code, 2);
    assert!(
        o.stderr.starts_with(&format!(
            "error: config file {conf}:2: unknown field `registyr`"
        )),
        "{}",
        o.stderr
    );
}

#[test]
fn config_file_env_and_flag_precedence() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "from-file.toml", REGISTRY);
    write(
        dir.path(),
        "from-env.toml",
        &REGISTRY.replace("retention_days = 7", "retention_days = 8"),
    );
    let flag = write(dir.path(), "from-flag.toml", "");
    write(
        dir.path(),
        "ampybus.toml",
        "registry = \"from-file.toml\"\nurl = \"./data\"\n",
    );
    let d = dir.path();
    // The file's registry (relative to the config file).
    let o = ampybus_at(d, &[], &["registry", "check"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains("from-file.toml: 2 entries"),
        "{}",
        o.stdout
    );
    // The environment beats the file.
    let env_path = d.join("from-env.toml");
    let o = ampybus_at(
        d,
        &[("AMPYBUS_REGISTRY", env_path.to_str().unwrap())],
        &["registry", "check"],
    );
    assert!(
        o.stdout.contains("from-env.toml: 2 entries"),
        "{}",
        o.stdout
    );
    // The flag beats both.
    let o = ampybus_at(
        d,
        &[("AMPYBUS_REGISTRY", env_path.to_str().unwrap())],
        &["--registry", &flag, "registry", "check"],
    );
    assert!(
        o.stdout.contains("from-flag.toml: 0 entries"),
        "{}",
        o.stdout
    );
    // `url` from the file: pub creates ./data.
    let o = ampybus_at(
        d,
        &[],
        &[
            "pub",
            "--topic",
            "ampy.dev.news.v1.x",
            "--producer",
            "ui@1",
            "--source",
            "s",
            "--pk",
            "n-1",
            "--payload",
            "x",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(d.join("data").is_dir());
}

#[test]
fn pub_outside_claims_exits_like_other_header_errors_and_topics_show_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let reg = write(dir.path(), "r.toml", REGISTRY);
    let data = dir.path().join("data");
    let args = |producer: &'static str| {
        vec![
            "--registry",
            reg.as_str(),
            "pub",
            "--topic",
            "ampy.dev.orders.v1.requests",
            "--producer",
            producer,
            "--source",
            "s",
            "--pk",
            "co_1",
            "--payload",
            "x",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<String>>()
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        ampybus_in(Some(data.as_path()), &a)
    };
    let o = run(args("risk@h2"));
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert_eq!(
        o.stderr,
        format!(
            "error: --producer \"risk@h2\": invalid header: `producer`: service `risk` (producer \"risk@h2\") may not publish topic \"ampy.dev.orders.v1.requests\": it is owned by `oms` (registry {reg}:1, pattern \"ampy.*.orders.v1.>\")\n"
        )
    );
    assert!(!data.exists(), "nothing was written");
    let o = run(args("oms@h1"));
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = ampybus_in(
        Some(data.as_path()),
        &["--registry", &reg, "topics", "list", "--json"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let rows = o.json_lines();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["registry"]["owner"], "oms");
    assert_eq!(rows[0]["registry"]["tier"], "at_least_once_dedupe");
    assert_eq!(rows[0]["registry"]["retention_days"], 30);
    let o = ampybus_in(
        Some(data.as_path()),
        &[
            "--registry",
            &reg,
            "topics",
            "describe",
            "ampy.dev.orders.v1.requests",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("owner     oms\n"), "{}", o.stdout);
    assert!(
        o.stdout.contains("tier      at_least_once_dedupe\n"),
        "{}",
        o.stdout
    );
}

#[test]
fn asyncapi_document_is_accepted_by_the_official_parser() {
    let dir = tempfile::tempdir().unwrap();
    let example = repo().join("registry.example.toml");
    for (format, name) in [("yaml", "asyncapi.yaml"), ("json", "asyncapi.json")] {
        let out = dir.path().join(name);
        let o = ampybus_in(
            None,
            &[
                "--registry",
                example.to_str().unwrap(),
                "registry",
                "asyncapi",
                "--format",
                format,
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
        let v = Command::new("bash")
            .arg(repo().join("scripts/asyncapi-validate.sh"))
            .arg(&out)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&v.stdout);
        assert!(
            v.status.success(),
            "{format}: {text}{}",
            String::from_utf8_lossy(&v.stderr)
        );
        assert!(
            text.ends_with(&format!("valid {}\n", out.display())),
            "{text}"
        );
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("asyncapi.json")).unwrap()).unwrap();
    assert_eq!(json["channels"].as_object().unwrap().len(), 10);
    let bars = &json["components"]["schemas"]["ampy_bars_v1_BarBatch"];
    assert_eq!(bars["title"], "ampy.bars.v1.BarBatch");
    // Docs from the `.proto` comments: the message's, and a field's after its name and number.
    assert_eq!(
        bars["description"],
        "A batch of bars (payload type for bars topics).\n\nprotobuf message ampy.bars.v1.BarBatch (ampy/bars/v1/bars.proto)"
    );
    let bar = &json["components"]["schemas"]["ampy_bars_v1_Bar"];
    assert_eq!(
        bar["properties"]["adjustment_policy"]["description"],
        "field adjustment_policy = 17: Number 17 is declared here, between 12 and 13, exactly as upstream does."
    );
    assert_eq!(
        bar["properties"]["volume"]["description"],
        "field volume = 9"
    );
    assert_eq!(
        json["operations"]["demo-bars_send_ampy_any_bars_v1_all"]["action"],
        "send"
    );
    assert_eq!(
        json["operations"]["demo-features_receive_ampy_any_bars_v1_all"]["action"],
        "receive"
    );
}

#[test]
fn kafka_acl_matches_the_golden_file() {
    let o = ampybus_in(
        None,
        &[
            "--registry",
            repo().join("registry.example.toml").to_str().unwrap(),
            "registry",
            "kafka-acl",
            "--bootstrap-server",
            "broker:9092",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    // The header names the registry file: the golden file holds it relative to the repo.
    let got = o.stdout.replace(
        repo().join("registry.example.toml").to_str().unwrap(),
        "registry.example.toml",
    );
    let golden = repo().join("golden/registry/kafka-acl.txt");
    if std::env::var_os("AMPYBUS_BLESS").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &got).unwrap();
    }
    let want = std::fs::read_to_string(&golden)
        .expect("golden/registry/kafka-acl.txt (AMPYBUS_BLESS=1 writes it)");
    assert_eq!(got, want);
}

/// Generated permissions on a nats-server of our own: the owner publishes, another service is
/// refused, a consumer completes a run with a retry, a DLQ write and a replay request, and is
/// refused a pattern it may not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_permissions_from_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    generate(
        dir.path(),
        &["nats-config", "--stream-prefix", "RG"],
        "auth.conf",
    );
    let conf = write(
        dir.path(),
        "nats.conf",
        &format!(
            "jetstream {{ store_dir: \"{}\" }}\ninclude \"auth.conf\"\n",
            dir.path().join("js").display()
        ),
    );
    let server = ampybus_conformance::NatsServer::start(dir.path(), &["-c", &conf]);
    let url = |user: &str| {
        server.url(
            "nats",
            &format!("?user={user}&password={user}-pw&stream_prefix=RG&request_timeout_ms=2000&consumer_inactive_s=30"),
        )
    };
    let (risk, e) = owner_publishes_and_another_service_is_refused(&url).await;
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert_eq!(
        e.message().split_once(": ").map(|(_, m)| m),
        Some(
            "message 0 of 1: permission denied: the server refused publish to `ampy.dev.orders.v1.requests` (Permissions Violation; check the user's publish permissions); not retried"
        )
    );

    reader_completes_a_run_with_retry_dlq_and_replay(&risk).await;
    // The whole run needed nothing the generated permissions refuse: the only violation so
    // far is risk's publish on orders.
    assert_eq!(
        nats_violations(dir.path()),
        ["Publish Violation - User \"risk\", Subject \"ampy.dev.orders.v1.requests\""]
    );

    // ui may not read orders: the broker refuses its consumer.
    let e = ui_may_not_consume_orders(&url).await;
    assert_eq!(
        e.message().split_once(": ").map(|(_, m)| m),
        Some(
            "permission denied: the server refused `$JS.API.STREAM.INFO.RG_DEV_ORDERS` (Permissions Violation; the user may not use stream RG_DEV_ORDERS: check its publish permissions on the JetStream API)"
        )
    );
    assert_eq!(
        nats_violations(dir.path())[1..],
        ["Publish Violation - User \"ui\", Subject \"$JS.API.STREAM.INFO.RG_DEV_ORDERS\""]
    );
}

/// The permission violations in the log of a [`ampybus_conformance::NatsServer`] started in
/// `dir`, each as `Publish Violation - User "…", Subject "…"` (nats-server 2.9 wording).
fn nats_violations(dir: &Path) -> Vec<String> {
    let log = std::fs::read_to_string(dir.join("nats-server.log")).unwrap();
    log.lines()
        .filter_map(|l| {
            let parts: Vec<&str> = l.split(" - ").collect();
            let at = parts.iter().position(|p| p.ends_with(" Violation"))?;
            Some(parts[at..].join(" - "))
        })
        .collect()
}

/// The generated ACL file on a redis-server of our own: the owner writes, another service is
/// refused, a reader consumes with its group, a service outside the consumers cannot read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_acl_from_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let acl = generate(dir.path(), &["redis-acl"], "users.acl");
    let server =
        ampybus_conformance::RedisServer::start(dir.path(), &["--aclfile", acl.to_str().unwrap()]);
    let url = |user: &str| server.url(&format!("{user}:{user}-pw@"), "");
    let (risk, e) = owner_publishes_and_another_service_is_refused(&url).await;
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert_eq!(
        e.message().split_once(": ").map(|(_, m)| m),
        Some(
            "publish of message 0 of 1 to stream ampy.dev.orders.v1: NoPerm: this user has no permissions to access one of the keys used as arguments (permission denied: check the ACL user's key and command permissions); not retried"
        )
    );
    reader_completes_a_run_with_retry_dlq_and_replay(&risk).await;
    let e = ui_may_not_consume_orders(&url).await;
    assert_eq!(
        e.message().split_once(": ").map(|(_, m)| m),
        Some(
            "stream ampy.dev.orders.v1: creating consumer group ui: NoPerm: this user has no permissions to access one of the keys used as arguments (permission denied: check the ACL user's key and command permissions); not retried"
        )
    );
}

/// `ampybus demo` with the example registry: every publish and subscription of the pipeline
/// passes the registry, and the run is clean; a registry that leaves a reader out stops it.
#[test]
fn demo_runs_clean_with_the_example_registry() {
    let dir = tempfile::tempdir().unwrap();
    let example = repo().join("registry.example.toml");
    let data = dir.path().join("data");
    let o = ampybus_in(
        None,
        &[
            "--registry",
            example.to_str().unwrap(),
            "--url",
            data.to_str().unwrap(),
            "demo",
            "--bars",
            "60",
            "--json",
        ],
    );
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let s: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(s["retries"], 0, "{s}");
    assert_eq!(
        s["dlq"],
        serde_json::json!({"by_reason": {"decode_error": 1}, "total": 1}),
        "{s}"
    );
    assert_eq!(s["counts"]["bars_handled"], 180, "{s}");

    let text = std::fs::read_to_string(&example).unwrap().replace(
        "consumers = [\"demo-paper-broker\"]",
        "consumers = [\"nobody\"]",
    );
    let reg = write(dir.path(), "no-reader.toml", &text);
    let o = ampybus_in(
        None,
        &[
            "--registry",
            &reg,
            "--url",
            dir.path().join("data2").to_str().unwrap(),
            "demo",
            "--bars",
            "60",
        ],
    );
    assert_eq!(o.code, 3, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stderr.contains(&format!(
            ": invalid configuration: service `demo-paper-broker` may not read pattern \"ampy.dev.orders.v1.requests\": it overlaps \"ampy.*.orders.v1.>\" (registry {reg}:34, owner `demo-oms`), readable by demo-oms, nobody\n"
        )),
        "{}",
        o.stderr
    );
}

/// Writes the test registry and passwords into `dir` and runs `ampybus registry {args…}
/// --passwords … --out dir/{out}`; returns the path written.
fn generate(dir: &Path, args: &[&str], out: &str) -> PathBuf {
    let reg = write(dir, "r.toml", REGISTRY);
    let pw = write(dir, "pw.toml", PASSWORDS);
    let path = dir.join(out);
    let mut all = vec!["--registry", reg.as_str(), "registry"];
    all.extend_from_slice(args);
    all.extend(["--passwords", pw.as_str(), "--out", path.to_str().unwrap()]);
    let o = ampybus_in(None, &all);
    assert_eq!(o.code, 0, "{}", o.stderr);
    path
}

/// With generated permissions (`url(user)` connects as a service): `oms` publishes co_1, co_2
/// and co_3 on ampy.dev.orders.v1.requests; `risk` may not publish there. Returns risk's bus
/// and the broker's refusal.
async fn owner_publishes_and_another_service_is_refused(
    url: &dyn Fn(&str) -> String,
) -> (Bus, ampybus::Error) {
    let oms = Bus::connect(&url("oms")).await.expect("oms connects");
    let orders = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    let h = |p: &str, key: &str| Headers::for_publish("ampy.raw.v1.Bytes", p, "t", key);
    for key in ["co_1", "co_2", "co_3"] {
        oms.publish(&orders, h("oms@1", key), key.as_bytes().to_vec())
            .await
            .expect("the owner publishes");
    }
    let risk = Bus::connect(&url("risk")).await.expect("risk connects");
    let e = risk
        .publish(&orders, h("risk@1", "co_9"), b"no".to_vec())
        .await
        .unwrap_err();
    (risk, e)
}

/// `ui`, not among the readers of orders, starts a consumer on `ampy.dev.orders.>` (no registry
/// in the library: the broker refuses it). Returns the error, checked to be of kind `Config`.
async fn ui_may_not_consume_orders(url: &dyn Fn(&str) -> String) -> ampybus::Error {
    let ui = Bus::connect(&url("ui")).await.expect("ui connects");
    let e = Consumer::builder(ui, TopicPattern::parse("ampy.dev.orders.>").unwrap(), "ui")
        .handler(handler_fn(|_m| async { Outcome::Ok }))
        .serve_replays(false)
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    e
}

/// The owner has published co_1, co_2 and co_3 on ampy.dev.orders.v1.requests; `risk` (with the
/// generated permissions) consumes them: co_1 retried once, co_2 dead-lettered (the DLQ message
/// read back), co_3 ok; then a replay request of the window completes.
async fn reader_completes_a_run_with_retry_dlq_and_replay(risk: &Bus) {
    // risk consumes: co_1 retried once, co_2 dead-lettered, co_3 ok; then a replay request.
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    let first_co_1 = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let consumer = Consumer::builder(
        risk.clone(),
        TopicPattern::parse("ampy.dev.orders.>").unwrap(),
        "risk",
    )
    .handler(handler_fn(move |m| {
        let a = a.clone();
        let tx = tx.clone();
        let first_co_1 = first_co_1.clone();
        async move {
            let key = m.headers.partition_key().unwrap_or_default().to_owned();
            a.fetch_add(1, Ordering::SeqCst);
            // The first attempt at co_1 (the counter was 0) asks for a retry.
            let out = match key.as_str() {
                "co_1" if first_co_1.swap(false, Ordering::SeqCst) => Outcome::Retry {
                    after: Some(Duration::from_millis(50)),
                },
                "co_2" => Outcome::DeadLetter("handler_error: poison".into()),
                _ => Outcome::Ok,
            };
            let _ = tx.send(format!("{key}:{}", matches!(out, Outcome::Ok)));
            out
        }
    }))
    .retry(ampybus::RetryPolicy {
        max_attempts: 5,
        min_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
    })
    .start()
    .await
    .expect("risk may read orders");
    let mut seen = Vec::new();
    while !(seen.contains(&"co_1:true".to_owned())
        && seen.contains(&"co_3:true".to_owned())
        && seen.contains(&"co_2:false".to_owned()))
    {
        let s = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("handler progress")
            .unwrap();
        seen.push(s);
    }
    assert!(
        seen.contains(&"co_1:false".to_owned()),
        "no retry: {seen:?}"
    );
    let mut dlq = risk
        .subscribe(ampybus::transport::SubscribeSpec::ephemeral(
            TopicPattern::parse("ampy.dev.dlq.>").unwrap(),
            ampybus::transport::StartAt::Earliest,
        ))
        .await
        .expect("risk may read the DLQ");
    let got = dlq.fetch(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].envelope.headers.get("dlq_reason"),
        Some("handler_error: poison")
    );
    let req = ampybus::control::ReplayRequest::new(
        "risk",
        "ampy.dev.orders.>",
        chrono::Utc::now() - chrono::Duration::minutes(5),
        chrono::Utc::now(),
    );
    let status = control::request_replay(risk, &req, Duration::from_secs(20), |_| {})
        .await
        .expect("replay completes");
    assert_eq!(
        status.state(),
        ampybus::control::ReplayState::Completed,
        "{status:?}"
    );
    let stats = consumer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(stats.handled_ok, 2, "{stats:?}");
    while let Ok(s) = rx.try_recv() {
        seen.push(s);
    }
    seen.sort();
    // co_1 retried once; co_2 dead-lettered, and again when the replay brings it back (a
    // dead-lettered message leaves no dedupe record); co_1 and co_3 replayed are duplicates.
    assert_eq!(
        seen,
        [
            "co_1:false",
            "co_1:true",
            "co_2:false",
            "co_2:false",
            "co_3:true"
        ]
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 5);
}

/// A registry with its own retention for news (any env) and prod fills.
const RETENTION: &str = r#"[[topic]]
pattern = "ampy.*.news.v1.>"
owner = "news"
schemas = ["ampy.raw.v1.Bytes"]
tier = "at_least_once"
retention_days = 3

[[topic]]
pattern = "ampy.prod.fills.v1.>"
owner = "oms"
schemas = ["ampy.raw.v1.Bytes"]
tier = "at_least_once_dedupe"
retention_days = 90
"#;

/// The streams a bus opened with a registry creates on NATS have the registry's retention as
/// `max_age` (per env and domain); without a registry, the binding's defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_streams_are_created_with_the_registry_retention() {
    use ampybus::registry::Registry;
    use ampybus::transport::nats::{NatsTransport, streams};
    let dir = tempfile::tempdir().unwrap();
    let js = dir.path().join("js");
    let server =
        ampybus_conformance::NatsServer::start(dir.path(), &["-js", "-sd", js.to_str().unwrap()]);
    let url = server.url("nats", "?stream_prefix=RT");
    let reg = Registry::parse(RETENTION, "retention.toml").unwrap();
    let bus = Bus::connect_with_registry(&url, reg).await.unwrap();
    for (topic, producer) in [
        ("ampy.dev.news.v1.wire", "news@1"),
        ("ampy.prod.news.v1.wire", "news@1"),
        ("ampy.prod.fills.v1.events", "oms@1"),
    ] {
        let t = Topic::parse(topic).unwrap();
        bus.publish(
            &t,
            Headers::for_publish("ampy.raw.v1.Bytes", producer, "t", "acct|co_1"),
            b"x".to_vec(),
        )
        .await
        .unwrap();
    }
    // A bus without a registry creates dev fills with the default (30 days for fills).
    let plain = Bus::connect(&url).await.unwrap();
    plain
        .publish(
            &Topic::parse("ampy.dev.fills.v1.events").unwrap(),
            Headers::for_publish("ampy.raw.v1.Bytes", "oms@1", "t", "acct|co_1"),
            b"x".to_vec(),
        )
        .await
        .unwrap();
    let t = NatsTransport::connect_url(&url).await.unwrap();
    let day = 86_400;
    for (stream, days) in [
        ("RT_DEV_NEWS", 3),
        ("RT_PROD_NEWS", 3),
        ("RT_PROD_FILLS", 90),
        ("RT_DEV_FILLS", 30),
    ] {
        let info = streams::describe(t.jetstream(), stream).await.unwrap();
        assert_eq!(info.config.max_age.as_secs(), days * day, "{stream}");
    }
}

/// The embedded log keeps one retention per domain: a bus opened with a registry applies the
/// longest of the domain's envs and keeps the URL's size cap; other domains keep the URL's.
/// `topics describe` shows the retention in force.
#[test]
fn embedded_retention_from_the_registry() {
    use ampybus::transport::embedded::EmbeddedOptions;
    use ampybus::{Domain, registry::Registry};
    let reg = Registry::parse(RETENTION, "retention.toml").unwrap();
    let mut o = EmbeddedOptions::from_url("file:///tmp/x?retention_days=1&retention.news.max_mb=5")
        .unwrap();
    o.apply_registry_retention(&reg.unit_retentions());
    let day = Duration::from_secs(86_400);
    let news = o.retention_for(Domain::News);
    assert_eq!(
        (news.max_age, news.max_bytes),
        (Some(3 * day), Some(5 * 1024 * 1024))
    );
    assert_eq!(o.retention_for(Domain::Fills).max_age, Some(90 * day));
    assert_eq!(o.retention_for(Domain::Bars).max_age, Some(day));

    let dir = tempfile::tempdir().unwrap();
    let reg = write(dir.path(), "retention.toml", RETENTION);
    let data = dir.path().join("data");
    let publish = ampybus_in(
        Some(data.as_path()),
        &[
            "--registry",
            &reg,
            "pub",
            "--topic",
            "ampy.dev.news.v1.wire",
            "--producer",
            "news@1",
            "--source",
            "s",
            "--pk",
            "n-1",
            "--payload",
            "x",
        ],
    );
    assert_eq!(publish.code, 0, "{}", publish.stderr);
    let described = ampybus_in(
        Some(data.as_path()),
        &[
            "--registry",
            &reg,
            "topics",
            "describe",
            "ampy.dev.news.v1.wire",
            "--json",
        ],
    );
    assert_eq!(described.code, 0, "{}", described.stderr);
    let v = &described.json_lines()[0];
    assert_eq!(v["retention"][0]["domain"], "news");
    assert_eq!(v["retention"][0]["max_age_seconds"], 3 * 86_400);
}
