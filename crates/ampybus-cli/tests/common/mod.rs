//! What every CLI test needs: run the built `ampybus` binary in a clean environment and look at
//! its exit code, stdout and stderr.
#![allow(dead_code)] // each test crate uses a different part

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

/// One run of the binary.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Non-empty stdout lines.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().filter(|l| !l.is_empty()).collect()
    }

    /// Every non-empty stdout line parsed as JSON.
    pub fn json_lines(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

/// The binary with `--url <dir>` (when given) and `args`, no stdin, stdout and stderr piped,
/// and neither `AMPYBUS_URL` nor `RUST_LOG` from the caller's environment.
pub fn ampybus_command(dir: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ampybus"));
    if let Some(d) = dir {
        cmd.arg("--url").arg(d);
    }
    cmd.args(args)
        .env_remove("AMPYBUS_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs the binary with `--url <dir>` (when given), no stdin, and neither `AMPYBUS_URL` nor
/// `RUST_LOG` from the caller's environment. Fails the test if the binary panicked.
pub fn ampybus_in(dir: Option<&Path>, args: &[&str]) -> Out {
    run(ampybus_command(dir, args), args)
}

/// Runs `cmd` (the binary with `args`), failing the test if it panicked.
fn run(mut cmd: Command, args: &[&str]) -> Out {
    let o = cmd.output().expect("run ampybus");
    let out = Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert!(
        !out.stderr.contains("panicked"),
        "ampybus {args:?} panicked:\n{}",
        out.stderr
    );
    out
}

#[path = "../../../ampybus/tests/common/brokers.rs"]
mod brokers;
#[allow(unused_imports)] // not every test binary that includes `common` starts a broker
pub use brokers::{s3_bucket, start_broker};

/// `ampybus --url {url} {args…}`.
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn ampybus_on(url: &str, args: &[&str]) -> Out {
    ampybus_on_env(url, args, &[])
}

/// `ampybus --url {url} {args…}` with the variables `env` added to its environment.
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn ampybus_on_env(url: &str, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut all = vec!["--url", url];
    all.extend_from_slice(args);
    let mut cmd = ampybus_command(None, &all);
    cmd.envs(env.iter().copied());
    run(cmd, &all)
}

/// `ampybus --url {url} pub --topic {topic} --producer t@1 --source t --pk {key} {extra…}`,
/// asserting exit 0.
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn pub_one(url: &str, topic: &str, key: &str, extra: &[&str]) -> Out {
    pub_one_env(url, topic, key, extra, &[])
}

/// [`pub_one`] with the variables `env` added to the binary's environment.
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn pub_one_env(url: &str, topic: &str, key: &str, extra: &[&str], env: &[(&str, &str)]) -> Out {
    let mut args = vec![
        "pub",
        "--topic",
        topic,
        "--producer",
        "t@1",
        "--source",
        "t",
        "--pk",
        key,
    ];
    args.extend_from_slice(extra);
    let o = ampybus_on_env(url, &args, env);
    assert_eq!(o.code, 0, "{}", o.stderr);
    o
}

/// The broker tests' first steps on `url`: `ampybus pub` of three messages on
/// `ampy.dev.news.v1.a` (key `n-a`, payloads `n-a-0`…) and two on `ampy.dev.news.v1.b` (key
/// `n-b`), then `sub --durable audit --max 1` on `ampy.dev.news.>`. Returns the message `sub`
/// printed (asserting it is the first one published).
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn pub_five_news_sub_one(url: &str) -> Value {
    let run = |args: &[&str]| ampybus_on(url, args);
    for (topic, key, n) in [
        ("ampy.dev.news.v1.a", "n-a", 3),
        ("ampy.dev.news.v1.b", "n-b", 2),
    ] {
        for i in 0..n {
            let payload = format!("{key}-{i}");
            let o = run(&[
                "pub",
                "--topic",
                topic,
                "--producer",
                "cli@1",
                "--source",
                "cli",
                "--pk",
                key,
                "--payload",
                &payload,
            ]);
            assert_eq!(o.code, 0, "{}", o.stderr);
        }
    }
    let o = run(&[
        "sub",
        "--pattern",
        "ampy.dev.news.>",
        "--durable",
        "audit",
        "--json",
        "--max",
        "1",
        "--timeout",
        "60",
    ]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    let v = o.json_lines();
    assert_eq!(v.len(), 1, "{}", o.stdout);
    assert_eq!(v[0]["topic"], "ampy.dev.news.v1.a");
    assert_eq!(v[0]["headers"]["partition_key"], "n-a");
    v[0].clone()
}

/// A name part no other run uses: the current time in nanoseconds, in hex.
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn unique() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// `ampybus --url {url} demo` with its positions file in `dir` (a file of its own: demos on
/// other transports may run at the same time): exit 0 and `result: OK`.
pub fn demo_runs_end_to_end(url: &str, dir: &Path) {
    let db = dir.join("positions.sqlite3");
    let o = ampybus_in(
        None,
        &["--url", url, "demo", "--positions-db", db.to_str().unwrap()],
    );
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("result: OK"), "{}", o.stdout);
}

/// `ampybus --url {url} bench-{broker} --mode consume --messages 2000 --rounds 1 --json`: exit
/// 0, one JSON object, every side read exactly 2,000 messages, every rate and both ratios
/// (`ratio`, `ratio_dedupe`) positive; `raw_key` is the raw client's series
/// (`raw_async_nats_msg_s`, …).
pub fn consume_bench_smoke(url: &str, broker: &str, raw_key: &str) {
    let o = ampybus_on(
        url,
        &[
            &format!("bench-{broker}"),
            "--mode",
            "consume",
            "--messages",
            "2000",
            "--rounds",
            "1",
            "--json",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = o.json_lines();
    assert_eq!(v.len(), 1, "{}", o.stdout);
    let r = &v[0];
    assert_eq!(r["mode"], "consume", "{r}");
    assert_eq!(r["messages"], 2000, "{r}");
    assert_eq!(r["keys"], 1000, "{r}");
    assert_eq!(r["workers"], 8, "{r}");
    for side in ["raw", "ampybus", "ampybus_dedupe"] {
        assert_eq!(
            r["messages_read"][side],
            serde_json::json!([2000]),
            "{side}: {r}"
        );
    }
    for key in [
        raw_key,
        "ampybus_msg_s",
        "ampybus_dedupe_msg_s",
        "ratio",
        "ratio_dedupe",
    ] {
        let median = r[key]["median"].as_f64().unwrap_or(0.0);
        assert!(median > 0.0, "{key}: {r}");
        assert_eq!(
            r[key]["runs"].as_array().map(Vec::len),
            Some(1),
            "{key}: {r}"
        );
    }
    // The per-round line on stderr names all three sides.
    assert!(
        o.stderr.contains("round 0: raw ") && o.stderr.contains("runtime with dedupe"),
        "{}",
        o.stderr
    );
}

/// `ampybus --url {url} bench-{broker} --messages 500 --rounds 1 --json` (publish, the default
/// mode): today's keys are there (`ratio.median`, the raw client's series, `ampybus_msg_s`).
pub fn publish_bench_smoke(url: &str, broker: &str, raw_key: &str) {
    publish_bench_smoke_with(url, broker, raw_key, &[]);
}

/// [`publish_bench_smoke`] with more arguments (`--tier best_effort`); returns the report.
pub fn publish_bench_smoke_with(url: &str, broker: &str, raw_key: &str, extra: &[&str]) -> Value {
    let bench = format!("bench-{broker}");
    let mut args = vec![
        bench.as_str(),
        "--messages",
        "500",
        "--rounds",
        "1",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = ampybus_on(url, &args);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r = &o.json_lines()[0];
    assert_eq!(r["mode"], "publish", "{r}");
    assert_eq!(r["messages"], 500, "{r}");
    for key in [raw_key, "ampybus_msg_s", "ratio"] {
        assert!(r[key]["median"].as_f64().unwrap_or(0.0) > 0.0, "{key}: {r}");
    }
    assert!(r.get("ratio_dedupe").is_none(), "{r}");
    r.clone()
}
