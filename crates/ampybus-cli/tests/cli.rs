//! End-to-end tests of the `ampybus` binary on temporary data directories.

use base64::Engine as _;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

const TOPIC: &str = "ampy.dev.news.v1.cli-test";

mod common;
use common::{Out, ampybus_in};

fn ampybus(args: &[&str]) -> Out {
    ampybus_in(None, args)
}

fn ok(o: Out, what: &str) -> Out {
    assert_eq!(o.code, 0, "{what} failed:\n{}", o.stderr);
    o
}

fn publish(dir: &Path, count: usize, extra: &[&str]) -> Vec<String> {
    let n = count.to_string();
    let mut args = vec![
        "pub",
        "--topic",
        TOPIC,
        "--producer",
        "cli-test@1",
        "--source",
        "cli-test",
        "--pk",
        "n-1",
        "--count",
        &n,
        "--print-ids",
    ];
    args.extend_from_slice(extra);
    let o = ok(ampybus_in(Some(dir), &args), "pub");
    assert!(
        o.stderr.contains(&format!("published {count} message(s)")),
        "{}",
        o.stderr
    );
    let ids: Vec<String> = o.lines().iter().map(|s| s.to_string()).collect();
    assert_eq!(ids.len(), count);
    ids
}

fn ids_of(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|v| v["headers"]["message_id"].as_str().unwrap().to_owned())
        .collect()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn pub_then_sub_json_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ids = publish(
        dir.path(),
        3,
        &[
            "--payload-hex",
            "00ff10 2a",
            "--header",
            "x-desk=rates",
            "--dedupe-key",
            "dk-1",
            "--run-id",
            "run-cli-test",
            "--schema-version",
            "2.1.0",
        ],
    );
    let o = ok(
        ampybus_in(
            Some(dir.path()),
            &[
                "sub",
                "--pattern",
                "ampy.dev.news.>",
                "--json",
                "--max",
                "10",
                "--timeout",
                "1",
            ],
        ),
        "sub",
    );
    let msgs = o.json_lines();
    assert_eq!(msgs.len(), 3, "{}", o.stdout);
    assert_eq!(ids_of(&msgs), ids);
    for m in &msgs {
        let keys: Vec<&String> = m.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["headers", "payload_base64", "topic"]);
        assert_eq!(m["topic"], TOPIC);
        let h = &m["headers"];
        for name in [
            "message_id",
            "schema_fqdn",
            "schema_version",
            "content_type",
            "produced_at",
            "producer",
            "source",
            "run_id",
            "partition_key",
            "traceparent",
        ] {
            assert!(h[name].is_string(), "header {name} missing in {m}");
        }
        assert_eq!(h["schema_fqdn"], "ampy.raw.v1.Bytes");
        assert_eq!(h["schema_version"], "2.1.0");
        assert_eq!(h["producer"], "cli-test@1");
        assert_eq!(h["source"], "cli-test");
        assert_eq!(h["partition_key"], "n-1");
        assert_eq!(h["run_id"], "run-cli-test");
        assert_eq!(h["dedupe_key"], "dk-1");
        assert_eq!(h["x-desk"], "rates");
        let payload = base64::engine::general_purpose::STANDARD
            .decode(m["payload_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(payload, [0x00, 0xff, 0x10, 0x2a]);
    }
    assert!(o.stderr.contains("received 3 message(s)"), "{}", o.stderr);
}

#[test]
fn default_run_id_is_one_per_invocation() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 2, &[]);
    publish(dir.path(), 1, &[]);
    let o = ok(
        ampybus_in(
            Some(dir.path()),
            &["sub", "--pattern", ">", "--json", "--timeout", "0.5"],
        ),
        "sub",
    );
    let runs: Vec<String> = o
        .json_lines()
        .iter()
        .map(|m| m["headers"]["run_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[0], runs[1]);
    assert_ne!(runs[1], runs[2]);
    assert!(runs.iter().all(|r| r.starts_with("run-")), "{runs:?}");
}

#[test]
fn durable_consumer_gets_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let ids = publish(dir.path(), 50, &["--payload", "x", "--batch", "7"]);
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        50,
        "ids not fresh"
    );
    let first = ok(
        ampybus_in(
            Some(dir.path()),
            &[
                "sub",
                "--pattern",
                ">",
                "--durable",
                "d",
                "--max",
                "50",
                "--json",
            ],
        ),
        "first durable sub",
    );
    let got = first.json_lines();
    assert_eq!(got.len(), 50);
    assert_eq!(ids_of(&got), ids);
    let second = ok(
        ampybus_in(
            Some(dir.path()),
            &[
                "sub",
                "--pattern",
                ">",
                "--durable",
                "d",
                "--timeout",
                "1",
                "--json",
            ],
        ),
        "second durable sub",
    );
    assert_eq!(second.lines().len(), 0, "{}", second.stdout);
    // A new message reaches the same consumer.
    let more = publish(dir.path(), 1, &[]);
    let third = ok(
        ampybus_in(
            Some(dir.path()),
            &[
                "sub",
                "--pattern",
                ">",
                "--durable",
                "d",
                "--timeout",
                "1",
                "--json",
            ],
        ),
        "third durable sub",
    );
    assert_eq!(ids_of(&third.json_lines()), more);
}

#[test]
fn ephemeral_sub_reads_from_the_start_every_time() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 4, &["--payload", "same"]);
    let args = ["sub", "--pattern", TOPIC, "--json", "--timeout", "0.5"];
    let a = ok(ampybus_in(Some(dir.path()), &args), "sub 1");
    let b = ok(ampybus_in(Some(dir.path()), &args), "sub 2");
    assert_eq!(a.lines().len(), 4);
    assert_eq!(a.stdout, b.stdout);
    // --max stops early; the pattern filters.
    let c = ok(
        ampybus_in(
            Some(dir.path()),
            &["sub", "--pattern", TOPIC, "--json", "--max", "2"],
        ),
        "sub max",
    );
    assert_eq!(c.lines(), a.lines()[..2]);
    let d = ok(
        ampybus_in(
            Some(dir.path()),
            &[
                "sub",
                "--pattern",
                "ampy.dev.bars.>",
                "--json",
                "--timeout",
                "0.3",
            ],
        ),
        "sub other pattern",
    );
    assert!(d.lines().is_empty());
}

#[test]
fn readable_output_shows_headers_and_payload() {
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path(), 1, &["--payload", "hello world"]);
    let o = ok(
        ampybus_in(Some(dir.path()), &["sub", "--pattern", ">", "--max", "1"]),
        "sub",
    );
    for want in [
        TOPIC,
        "message_id:",
        "partition_key:  n-1",
        "payload:        11 bytes",
        "68656c6c6f20776f726c64",
        "\"hello world\"",
    ] {
        assert!(
            o.stdout.contains(want),
            "missing {want:?} in:\n{}",
            o.stdout
        );
    }
}

#[test]
fn since_until_prints_exactly_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let pause = || std::thread::sleep(Duration::from_millis(40));
    let now = || chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let a = publish(dir.path(), 2, &[]);
    pause();
    let t1 = now();
    pause();
    let b = publish(dir.path(), 3, &[]);
    pause();
    let t2 = now();
    pause();
    let c = publish(dir.path(), 1, &[]);

    let window = |extra: &[&str]| {
        let mut args = vec!["sub", "--pattern", ">", "--json"];
        args.extend_from_slice(extra);
        ids_of(&ok(ampybus_in(Some(dir.path()), &args), "window").json_lines())
    };
    assert_eq!(window(&["--since", &t1, "--until", &t2]), b);
    assert_eq!(window(&["--since", &t1]), [b.clone(), c.clone()].concat());
    assert_eq!(window(&["--until", &t2]), [a.clone(), b.clone()].concat());
    assert_eq!(
        window(&["--since", &t1, "--until", &t2, "--max", "2"]),
        b[..2]
    );
    assert_eq!(
        window(&["--since", &t2, "--until", &t2]),
        Vec::<String>::new()
    );
    // Offsets other than Z are accepted.
    let t1_local = chrono::DateTime::parse_from_rfc3339(&t1)
        .unwrap()
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339();
    assert_eq!(window(&["--since", &t1_local, "--until", &t2]), b);
}

#[test]
fn json_envelope_republishes_exactly() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    publish(src.path(), 2, &["--payload-hex", "0a0b"]);
    let lines = ok(
        ampybus_in(
            Some(src.path()),
            &["sub", "--pattern", ">", "--json", "--timeout", "0.5"],
        ),
        "sub",
    );
    // One envelope per line, as `sub --json` prints them.
    let file = src.path().join("envs.jsonl");
    std::fs::write(&file, &lines.stdout).unwrap();
    let o = ok(
        ampybus_in(
            Some(dst.path()),
            &[
                "pub",
                "--json-envelope",
                file.to_str().unwrap(),
                "--print-ids",
            ],
        ),
        "pub --json-envelope",
    );
    assert_eq!(o.lines().len(), 2);
    let copied = ok(
        ampybus_in(
            Some(dst.path()),
            &["sub", "--pattern", ">", "--json", "--timeout", "0.5"],
        ),
        "sub copy",
    );
    assert_eq!(copied.stdout, lines.stdout);
}

#[test]
fn decode_adds_payload_json_for_known_schemas() {
    let Some(golden) = first_golden_file() else {
        eprintln!("no golden envelopes yet; skipping");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    ok(
        ampybus_in(
            Some(dir.path()),
            &["pub", "--json-envelope", golden.to_str().unwrap()],
        ),
        "pub golden",
    );
    let plain = ok(
        ampybus_in(
            Some(dir.path()),
            &["sub", "--pattern", ">", "--json", "--max", "1"],
        ),
        "sub --json",
    );
    assert!(plain.json_lines()[0].get("payload_json").is_none());
    let decoded = ok(
        ampybus_in(
            Some(dir.path()),
            &["sub", "--pattern", ">", "--json", "--decode", "--max", "1"],
        ),
        "sub --json --decode",
    );
    let v = &decoded.json_lines()[0];
    assert!(v["payload_json"].is_object(), "{v}");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(&golden).unwrap()).unwrap();
    if let Some(pj) = expected.get("payload_json") {
        assert_eq!(&v["payload_json"], pj);
    }
}

fn first_golden_file() -> Option<PathBuf> {
    let p = repo_root().join("golden/bars/typical.json");
    p.exists().then_some(p)
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            json_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}

#[test]
fn validate_golden_files() {
    let golden = repo_root().join("golden");
    if !golden.exists() {
        eprintln!("no golden/ directory; skipping");
        return;
    }
    // Every directory of golden/ except malformed/ holds valid envelopes.
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&golden)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && p.file_name().unwrap() != "malformed")
        .collect();
    dirs.sort();
    let mut good = Vec::new();
    for d in &dirs {
        json_files(d, &mut good);
    }
    if !good.is_empty() {
        let args: Vec<&str> = std::iter::once("validate")
            .chain(dirs.iter().map(|p| p.to_str().unwrap()))
            .collect();
        let o = ampybus(&args);
        assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
        assert_eq!(o.lines().len(), good.len());
        assert!(
            o.lines().iter().all(|l| l.starts_with("OK ")),
            "{}",
            o.stdout
        );
        assert!(
            o.stderr.contains(&format!("{} ok, 0 failed", good.len())),
            "{}",
            o.stderr
        );
    }

    let malformed = golden.join("malformed");
    if malformed.exists() {
        let mut files = Vec::new();
        json_files(&malformed, &mut files);
        let o = ampybus(&["validate", malformed.to_str().unwrap()]);
        assert_eq!(o.code, 1, "{}", o.stderr);
        assert_eq!(o.lines().len(), files.len());
        for line in o.lines() {
            assert!(line.starts_with("FAIL "), "{line}");
            assert!(line.contains(".json: "), "no reason in {line}");
        }
        // The whole tree fails because of malformed/.
        assert_eq!(ampybus(&["validate", golden.to_str().unwrap()]).code, 1);
    }
}

#[test]
fn validate_reports_each_file_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    publish(src.path(), 1, &["--payload", "p"]);
    let line = ok(
        ampybus_in(
            Some(src.path()),
            &["sub", "--pattern", ">", "--json", "--max", "1"],
        ),
        "sub",
    )
    .stdout;
    std::fs::write(dir.path().join("good.json"), &line).unwrap();
    let o = ampybus(&["validate", dir.path().to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.lines().len(), 1);
    assert!(o.lines()[0].starts_with("OK "));

    std::fs::write(dir.path().join("bad.json"), line.replace("n-1", "")).unwrap();
    let o = ampybus(&["validate", dir.path().to_str().unwrap()]);
    assert_eq!(o.code, 1);
    assert_eq!(o.lines().len(), 2);
    assert!(
        o.lines()[0].contains("bad.json: invalid header: `partition_key`"),
        "{}",
        o.stdout
    );
    assert!(o.stderr.contains("1 ok, 1 failed"), "{}", o.stderr);

    let missing = dir.path().join("missing.json");
    let o = ampybus(&["validate", missing.to_str().unwrap()]);
    assert_eq!(o.code, 1);
    assert!(o.stdout.contains("missing.json: "), "{}", o.stdout);

    let empty = tempfile::tempdir().unwrap();
    let o = ampybus(&["validate", empty.path().to_str().unwrap()]);
    assert_eq!(o.code, 2);
    assert!(o.stderr.contains("no envelope files found"), "{}", o.stderr);
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_owned();
    let bad_env = dir.path().join("bad-envelope.json");
    std::fs::write(
        &bad_env,
        r#"{"topic": 7, "headers": {}, "payload_base64": ""}"#,
    )
    .unwrap();
    let not_json = dir.path().join("not-json.json");
    std::fs::write(&not_json, "{\"topic\": ").unwrap();
    let rules = dir.path().join("rules.json");
    std::fs::write(
        &rules,
        r#"{"topic":"ampy.dev.news.v1.x","headers":{"producer":"p"},"payload_base64":""}"#,
    )
    .unwrap();
    let a_file = dir.path().join("plain-file");
    std::fs::write(&a_file, "x").unwrap();
    let pub_ = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--url", &d, "pub", "--producer", "p@1", "--source", "s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let news = |extra: &[&str]| {
        let mut v = vec!["--topic", "ampy.dev.news.v1.raw", "--pk", "n-1"];
        v.extend_from_slice(extra);
        pub_(&v)
    };
    let s = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };
    let file_url = format!("file://{d}?sync=sometimes");
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            pub_(&["--topic", "ampy.dev.News.v1.raw", "--pk", "n"]),
            2,
            "error: --topic \"ampy.dev.News.v1.raw\": invalid topic",
        ),
        (
            pub_(&["--topic", "ampy.staging.news.v1.raw", "--pk", "n"]),
            2,
            "env must be one of dev|paper|prod",
        ),
        (
            pub_(&["--topic", "ampy.dev.news.v1.*", "--pk", "n"]),
            2,
            "wildcards `*` and `>` are only allowed in patterns",
        ),
        (
            s(&["--url", &d, "sub", "--pattern", "ampy.dev.>.x"]),
            2,
            "error: --pattern \"ampy.dev.>.x\": invalid topic: pattern",
        ),
        (
            s(&["--url", "ftp://bob:secret@host/x", "sub", "--pattern", ">"]),
            2,
            "scheme `ftp` is not supported",
        ),
        (
            s(&[
                "--url",
                "nats://127.0.0.1:4222?colour=red",
                "sub",
                "--pattern",
                ">",
            ]),
            2,
            "unknown option `colour`",
        ),
        (
            s(&["--url", &file_url, "sub", "--pattern", ">"]),
            2,
            "url option `sync`: must be `full` or `normal`",
        ),
        (
            s(&["--url", a_file.to_str().unwrap(), "sub", "--pattern", ">"]),
            2,
            "error: --url",
        ),
        (
            news(&["--payload-hex", "0g"]),
            2,
            "error: --payload-hex: invalid hex digit 'g' at character 2",
        ),
        (
            news(&["--payload-hex", "abc"]),
            2,
            "error: --payload-hex: odd number of hex digits",
        ),
        (
            news(&["--payload-file", "/definitely/not/here.bin"]),
            2,
            "error: --payload-file \"/definitely/not/here.bin\": cannot read",
        ),
        (
            news(&["--header", "novalue"]),
            2,
            "error: --header \"novalue\": expected NAME=VALUE",
        ),
        (
            news(&["--header", "bad name=x"]),
            2,
            "header names must be printable ASCII",
        ),
        (
            pub_(&["--topic", "ampy.dev.bars.v1.XNAS.AAPL", "--pk", "AAPL"]),
            2,
            "error: --pk \"AAPL\": invalid header: `partition_key`: must be `MIC.SYMBOL`",
        ),
        (
            pub_(&["--topic", "ampy.dev.fx.v1.rates", "--pk", "usd/jpy"]),
            2,
            "error: --pk \"usd/jpy\": invalid header: `partition_key`: must be `BASE.QUOTE`",
        ),
        (
            news(&["--schema-version", "1.0"]),
            2,
            "error: --schema-version \"1.0\": invalid header: `schema_version`",
        ),
        (
            news(&["--schema", "NotDotted"]),
            2,
            "error: --schema \"NotDotted\": invalid header: `schema_fqdn`",
        ),
        (
            news(&["--run-id", " padded"]),
            2,
            "error: --run-id \" padded\": invalid header: `run_id`",
        ),
        (
            s(&[
                "--url",
                &d,
                "pub",
                "--json-envelope",
                bad_env.to_str().unwrap(),
            ]),
            2,
            "envelope 1 (line 1): invalid envelope: field `topic` must be a string",
        ),
        (
            s(&[
                "--url",
                &d,
                "pub",
                "--json-envelope",
                not_json.to_str().unwrap(),
            ]),
            2,
            "invalid envelope: not valid JSON",
        ),
        (
            s(&[
                "--url",
                &d,
                "pub",
                "--json-envelope",
                rules.to_str().unwrap(),
            ]),
            2,
            "invalid header: `message_id`: required header is missing",
        ),
        (
            s(&[
                "--url",
                &d,
                "pub",
                "--json-envelope",
                "/no/such/envelope.json",
            ]),
            2,
            "error: --json-envelope /no/such/envelope.json: cannot read",
        ),
        (
            s(&["--url", &d, "sub", "--pattern", ">", "--since", "yesterday"]),
            2,
            "error: --since \"yesterday\": not an RFC3339 time",
        ),
        (
            s(&[
                "--url",
                &d,
                "sub",
                "--pattern",
                ">",
                "--durable",
                "has space",
            ]),
            2,
            "error: --durable \"has space\"",
        ),
        (
            s(&["--url", &d, "sub", "--pattern", ">", "--timeout", "soon"]),
            2,
            "expected a number of seconds",
        ),
        (
            news(&["--payload", "x", "--payload-hex", "00"]),
            2,
            "cannot be used with",
        ),
        (
            s(&["--url", &d, "pub", "--topic", "ampy.dev.news.v1.raw"]),
            2,
            "required arguments were not provided",
        ),
        (
            s(&["--log-level", "x=[", "sub", "--pattern", ">"]),
            2,
            "error: --log-level",
        ),
        (
            news(&["--count", "3", "--header", "message_id=x"]),
            2,
            "cannot be combined with --count",
        ),
    ];
    assert!(cases.len() >= 12);
    for (args, code, want) in &cases {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ampybus(&argv);
        assert_eq!(o.code, *code, "ampybus {argv:?}: stderr:\n{}", o.stderr);
        assert!(
            o.stderr.contains(want),
            "ampybus {argv:?}: stderr does not contain {want:?}:\n{}",
            o.stderr
        );
        assert!(
            o.stdout.is_empty(),
            "ampybus {argv:?} printed data: {}",
            o.stdout
        );
        assert!(
            !o.stderr.contains("secret"),
            "credentials leaked: {}",
            o.stderr
        );
    }
    // Nothing was published by any of the failed commands.
    let o = ok(
        ampybus_in(
            Some(dir.path()),
            &["sub", "--pattern", ">", "--json", "--timeout", "0.2"],
        ),
        "sub",
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn help_has_examples_and_exit_codes() {
    let root = ok(ampybus(&["--help"]), "--help");
    assert!(root.stdout.contains("Exit codes:"), "{}", root.stdout);
    assert!(root.stdout.contains("3    transport error"));
    for cmd in ["pub", "sub", "validate", "bench", "demo", "completions"] {
        let o = ok(ampybus(&[cmd, "--help"]), cmd);
        assert!(
            o.stdout.contains("Examples:"),
            "{cmd} --help:\n{}",
            o.stdout
        );
        assert!(
            o.stdout.contains(&format!("ampybus {cmd}")),
            "{cmd} --help:\n{}",
            o.stdout
        );
    }
    let c = ok(ampybus(&["completions", "bash"]), "completions");
    assert!(c.stdout.contains("ampybus"));
    assert!(c.stdout.contains("--pattern"));
}

/// The subcommands a `--help` text lists under `Commands:` (clap's `help` left out).
fn listed_commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim_end() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // A wrapped description continues on a line indented further.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// `ampybus <cmd> [<sub>…] --help` of every command the binary lists, recursively: each has an
/// `Examples:` section with at least one `ampybus …` line.
#[test]
fn every_listed_command_help_has_an_example() {
    let mut todo: Vec<Vec<String>> = vec![Vec::new()];
    let mut walked = Vec::new();
    let mut missing = Vec::new();
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let o = ok(ampybus(&args), &args.join(" "));
        let examples = o
            .stdout
            .split_once("Examples:")
            .map(|(_, rest)| rest)
            .unwrap_or("");
        if !examples
            .lines()
            .any(|l| l.trim_start().starts_with("ampybus "))
        {
            missing.push(format!("ampybus {}", path.join(" ")));
        }
        for sub in listed_commands(&o.stdout) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
        walked.push(path.join(" "));
    }
    // The walk reaches the nested commands.
    for expected in [
        "pub",
        "dlq",
        "dlq inspect",
        "dlq redrive",
        "dlq purge",
        "topics lag",
        "streams ensure",
        "registry",
        "outbox relay",
    ] {
        assert!(
            walked.iter().any(|w| w == expected),
            "{expected} not walked: {walked:?}"
        );
    }
    assert!(missing.is_empty(), "--help without an example: {missing:?}");
}

#[test]
fn bench_consume_reports_rates_ratios_and_cpu_per_message() {
    let parent = tempfile::tempdir().unwrap();
    let o = ok(
        ampybus(&[
            "bench",
            "--mode",
            "consume",
            "--messages",
            "2000",
            "--keys",
            "50",
            "--rounds",
            "1",
            "--sync",
            "normal",
            "--dir",
            parent.path().to_str().unwrap(),
            "--json",
        ]),
        "bench consume",
    );
    let lines = o.json_lines();
    assert_eq!(lines.len(), 1, "{}", o.stdout);
    let r = &lines[0];
    assert_eq!(r["mode"], "consume");
    assert_eq!(r["messages"], 2000);
    assert_eq!(r["keys"], 50);
    assert_eq!(r["rounds"], 1);
    let median = |k: &str| {
        r[k]["median"]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {r}"))
    };
    for k in [
        "bare_msg_per_sec",
        "runtime_msg_per_sec",
        "runtime_without_dedupe_msg_per_sec",
        "runtime_observability_off_msg_per_sec",
        "bare_cpu_us_per_msg",
        "runtime_cpu_us_per_msg",
        "runtime_without_dedupe_cpu_us_per_msg",
    ] {
        let v = median(k);
        assert!(v.is_finite() && v > 0.0, "{k} = {v}");
        // One round: best, median and worst are that round's figure.
        assert_eq!(r[k]["best"], r[k]["worst"], "{k}");
    }
    // The ratio of the unrounded medians, rounded to 3 decimals: within half a thousandth
    // of the ratio of the medians as printed (whole msg/s).
    let ratio = median("runtime_msg_per_sec") / median("bare_msg_per_sec");
    let printed = r["ratio_median"].as_f64().unwrap();
    assert!(
        (printed - ratio).abs() <= 0.000_6,
        "{printed} against {ratio}"
    );
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
}

#[test]
fn bench_smoke() {
    let parent = tempfile::tempdir().unwrap();
    let o = ok(
        ampybus(&[
            "bench",
            "--messages",
            "2000",
            "--rounds",
            "1",
            "--raw",
            "--mode",
            "both",
            "--rate",
            "2000",
            "--single-messages",
            "200",
            "--concurrency",
            "4",
            "--sync",
            "normal",
            "--dir",
            parent.path().to_str().unwrap(),
            "--json",
        ]),
        "bench",
    );
    let lines = o.json_lines();
    assert_eq!(lines.len(), 1, "{}", o.stdout);
    let r = &lines[0];
    assert_eq!(r["config"]["messages"], 2000);
    assert_eq!(r["config"]["rounds"], 1);
    assert_eq!(r["config"]["sync"], "normal");
    assert!(r["machine"]["cpus"].as_u64().unwrap() >= 1);
    for (section, n) in [
        ("raw", 2000),
        ("publish_batched", 2000),
        ("publish_single", 200),
    ] {
        let s = &r[section];
        assert_eq!(s["messages"], n, "{section}: {s}");
        assert_eq!(s["rounds"].as_array().unwrap().len(), 1, "{section}");
        for k in ["best", "median", "worst"] {
            assert!(s["msg_per_sec"][k].as_f64().unwrap() > 0.0, "{section}.{k}");
            assert!(s["mb_per_sec"][k].as_f64().unwrap() > 0.0, "{section}.{k}");
        }
    }
    assert_eq!(r["publish_single"]["concurrency"], 4);
    assert!(r["ratio_batched_vs_raw"]["median"].as_f64().unwrap() > 0.0);
    let e2e = &r["e2e"];
    assert_eq!(e2e["rate"], 2000);
    let round = &e2e["rounds"][0];
    assert_eq!(round["sent"], 2000);
    assert_eq!(round["unique"], 2000, "{round}");
    assert!(round["received"].as_u64().unwrap() >= 2000);
    for k in ["p50_us", "p90_us", "p99_us", "max_us"] {
        assert!(round[k].as_u64().is_some(), "{k} in {round}");
        assert!(e2e[k]["median"].as_f64().is_some(), "{k}");
    }
    // Temporary data directories are removed.
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);

    // The text form goes to stdout too.
    let t = ok(
        ampybus(&[
            "bench",
            "--messages",
            "300",
            "--rounds",
            "1",
            "--mode",
            "publish",
            "--sync",
            "normal",
            "--dir",
            parent.path().to_str().unwrap(),
        ]),
        "bench text",
    );
    assert!(t.stdout.contains("ampybus batched"), "{}", t.stdout);
    assert!(t.stdout.contains("msg/s"), "{}", t.stdout);
}
