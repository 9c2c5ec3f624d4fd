//! Nothing lost by an operator (issue 14), the storage part, through the `ampybus` binary:
//! retention options that cannot wipe a log by surprise and that only a publishing process
//! applies, `topics describe` showing the retention in force, damaged records and I/O failures
//! named, URL forms that mean one thing, inspection commands that never create a data
//! directory, and the publish limits.

use serde_json::Value;
use std::path::{Path, PathBuf};

mod common;
use common::{Out, ampybus_on};

const NEWS: &str = "ampy.dev.news.v1.ops";

fn url_of(dir: &Path, options: &str) -> String {
    if options.is_empty() {
        format!("file://{}", dir.display())
    } else {
        format!("file://{}?{options}", dir.display())
    }
}

fn ok(url: &str, args: &[&str]) -> Out {
    let o = ampybus_on(url, args);
    assert_eq!(o.code, 0, "{args:?} failed:\n{}", o.stderr);
    o
}

/// `pub` of `count` messages on NEWS (payload from `payload_file` or the text `hello`), with
/// `--print-ids`; returns the ids.
fn publish(url: &str, count: u64, payload_file: Option<&Path>, extra: &[&str]) -> Vec<String> {
    let n = count.to_string();
    let mut args = vec![
        "pub",
        "--topic",
        NEWS,
        "--producer",
        "ops@1",
        "--source",
        "ops",
        "--pk",
        "n-1",
        "--count",
        &n,
        "--print-ids",
    ];
    let file;
    match payload_file {
        Some(f) => {
            file = f.display().to_string();
            args.extend(["--payload-file", &file]);
        }
        None => args.extend(["--payload", "hello"]),
    }
    args.extend_from_slice(extra);
    let o = ok(url, &args);
    let ids: Vec<String> = o.lines().iter().map(|s| s.to_string()).collect();
    assert_eq!(ids.len() as u64, count);
    ids
}

/// (messages, bytes) stored on NEWS, as `topics list --json` reports them.
fn stored(url: &str) -> (u64, u64) {
    let o = ok(url, &["topics", "list", "--json"]);
    let v = o.json_lines();
    match v.iter().find(|t| t["topic"] == NEWS) {
        Some(t) => (
            t["messages"].as_u64().unwrap(),
            t["bytes"].as_u64().unwrap(),
        ),
        None => (0, 0),
    }
}

#[test]
fn a_retention_of_zero_is_refused_and_deletes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = url_of(tmp.path(), "");
    publish(&plain, 20, None, &[]);
    assert_eq!(stored(&plain).0, 20);
    for option in [
        "retention_days",
        "retention.news.days",
        "retention.news.max_mb",
    ] {
        let url = url_of(tmp.path(), &format!("{option}=0"));
        for args in [
            &["topics", "list"][..],
            &["sub", "--pattern", ">", "--timeout", "0.2"],
            &[
                "pub",
                "--topic",
                NEWS,
                "--producer",
                "p@1",
                "--source",
                "s",
                "--pk",
                "n-1",
            ],
        ] {
            let o = ampybus_on(&url, args);
            assert_eq!(o.code, 2, "{option} {args:?}: {}", o.stderr);
            assert!(
                o.stderr.contains(&format!(
                    "url option `{option}`: 0 is refused: a retention of 0 would delete every stored message; to keep messages forever write `{option}=unlimited`"
                )),
                "{}",
                o.stderr
            );
            assert_eq!(o.stdout, "");
        }
        assert_eq!(stored(&plain).0, 20, "after {option}=0");
    }
    // `unlimited` is the spelling of "keep forever".
    let url = url_of(
        tmp.path(),
        "retention_days=unlimited&retention.news.max_mb=unlimited",
    );
    publish(&url, 1, None, &[]);
    assert_eq!(stored(&plain).0, 21);
}

#[test]
fn only_a_publishing_process_applies_retention_and_logs_what_it_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let payload = tmp.path().join("payload.bin");
    std::fs::write(&payload, vec![7u8; 1000]).unwrap();
    let plain = url_of(&data, "");
    // 1,200 rows of (nearly) one size: over a 1 MiB cap. A stored row varies by a byte or
    // two (its `produced_at` is kept as a varint difference to the log time), so `row` is a
    // lower bound of every row's size.
    publish(&plain, 1200, Some(&payload), &[]);
    let (messages, bytes) = stored(&plain);
    assert_eq!(messages, 1200);
    let row = bytes / messages - 4;
    assert!(row > 1000, "{row}");
    let cap = 1024 * 1024;
    assert!(bytes > cap);

    // Every reading command with the 1 MiB cap on news leaves all 1,200 in place.
    let capped = url_of(&data, "retention.news.max_mb=1");
    let info = |args: &[&str]| {
        let mut all = vec!["--log-level", "info"];
        all.extend_from_slice(args);
        let o = ok(&capped, &all);
        assert!(!o.stderr.contains("retention deleted"), "{}", o.stderr);
        o
    };
    info(&["topics", "list"]);
    info(&["topics", "describe", "ampy.dev.news.>"]);
    info(&["topics", "lag"]);
    info(&["dlq", "inspect"]);
    let o = info(&[
        "sub",
        "--pattern",
        "ampy.dev.news.>",
        "--json",
        "--max",
        "1200",
    ]);
    assert_eq!(o.lines().len(), 1200);
    let o = info(&[
        "sub",
        "--pattern",
        "ampy.dev.news.>",
        "--durable",
        "reader",
        "--json",
        "--max",
        "10",
    ]);
    assert_eq!(o.lines().len(), 10);
    assert_eq!(stored(&plain).0, 1200);

    // The first publish with the cap starts retention: the oldest rows go until the domain
    // fits in 1 MiB, and the pass is logged at info with its counts.
    let o = ok(
        &capped,
        &[
            "--log-level",
            "info",
            "pub",
            "--topic",
            NEWS,
            "--producer",
            "ops@1",
            "--source",
            "ops",
            "--pk",
            "n-1",
            "--payload-file",
            payload.to_str().unwrap(),
        ],
    );
    let (after, after_bytes) = stored(&plain);
    let deleted = 1201 - after;
    assert!(
        after_bytes <= cap && after_bytes + row > cap,
        "{after_bytes}"
    );
    assert!(after_bytes >= after * row, "{after_bytes} for {after} rows");
    assert!(
        o.stderr.contains(&format!(
            "embedded log retention deleted {deleted} message(s) of domain news"
        )),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains(&format!("by_size={deleted}")),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains(&format!(
            "embedded log retention deleted {deleted} message(s) in all"
        )),
        "{}",
        o.stderr
    );
}

#[test]
fn topics_describe_shows_the_retention_in_force_and_the_oldest_message() {
    let tmp = tempfile::tempdir().unwrap();
    let url = url_of(
        tmp.path(),
        "retention.news.days=3&retention.news.max_mb=64&retention.bars.days=unlimited",
    );
    publish(&url, 3, None, &[]);
    let list = ok(&url, &["topics", "list", "--json"]).json_lines();
    let oldest = list[0]["oldest"].clone();
    assert!(oldest.is_string());

    let o = ok(&url, &["topics", "describe", "ampy.dev.news.>", "--json"]);
    let d: Value = o.json_lines().remove(0);
    assert_eq!(d["oldest"], oldest);
    assert_eq!(d["messages"], 3);
    assert_eq!(
        d["retention"],
        serde_json::json!([{
            "domain": "news",
            "max_age_seconds": 3 * 86_400,
            "max_bytes": 64 * 1024 * 1024,
            "text": "3 days, 64 MiB",
        }])
    );
    let o = ok(&url, &["topics", "describe", "ampy.dev.news.>"]);
    assert!(
        o.stdout
            .contains(&format!("oldest    {}\n", oldest.as_str().unwrap())),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains("retention news: 3 days, 64 MiB\n"),
        "{}",
        o.stdout
    );

    // A literal domain without messages: its retention, no oldest time.
    let d: Value = ok(&url, &["topics", "describe", "ampy.dev.bars.>", "--json"])
        .json_lines()
        .remove(0);
    assert_eq!(d["oldest"], Value::Null);
    assert_eq!(d["retention"][0]["text"], "unlimited");
    assert_eq!(d["retention"][0]["max_age_seconds"], Value::Null);
    let o = ok(&url, &["topics", "describe", "ampy.dev.orders.>"]);
    assert!(o.stdout.contains("oldest    -\n"), "{}", o.stdout);
    assert!(
        o.stdout
            .contains("retention orders: 30 days, no size cap\n"),
        "{}",
        o.stdout
    );
}

/// The only segment file of `domain` in the data directory `data`.
fn only_segment(data: &Path, domain: &str) -> PathBuf {
    let segs: Vec<PathBuf> = std::fs::read_dir(data.join("log").join(domain))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs.into_iter().next().unwrap()
}

/// Flips 4 bytes in the middle of the frame of the `nth` record (1-based) of `domain`'s only
/// segment (frames: crc u32, word u32 = kind << 28 | body length, body; a record is kind 3,
/// after a 16-byte file header). Returns the segment and the byte offset of the frame.
fn damage_record(data: &Path, domain: &str, nth: usize) -> (PathBuf, u64) {
    let seg = only_segment(data, domain);
    let mut bytes = std::fs::read(&seg).unwrap();
    let (mut at, mut records) = (16usize, 0);
    loop {
        let word = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        let len = 8 + (word & 0x0FFF_FFFF) as usize;
        if word >> 28 == 3 {
            records += 1;
            if records == nth {
                for b in &mut bytes[at + len / 2..at + len / 2 + 4] {
                    *b ^= 0xFF;
                }
                std::fs::write(&seg, &bytes).unwrap();
                return (seg, at as u64);
            }
        }
        at += len;
    }
}

#[test]
fn a_damaged_record_is_named_and_nothing_garbled_is_printed() {
    let tmp = tempfile::tempdir().unwrap();
    let url = url_of(tmp.path(), "");
    let ids = publish(&url, 5, None, &[]);
    // Record 3: its checksum no longer matches.
    let (seg, offset) = damage_record(tmp.path(), "news", 3);
    let named = |o: &Out| {
        assert_eq!(o.code, 3, "{}", o.stderr);
        assert!(
            o.stderr.contains(&format!(
                "transport error: embedded log {}: damaged at byte {offset}: checksum mismatch; the messages from there on cannot be read (restore the file, or move it away to accept the loss)",
                seg.display()
            )),
            "{}",
            o.stderr
        );
    };
    // Followers print the two records before it (whole, with their headers), then fail.
    for extra in [&[][..], &["--durable", "audit"]] {
        let mut args = vec![
            "sub",
            "--pattern",
            "ampy.dev.news.>",
            "--json",
            "--max",
            "10",
            "--timeout",
            "5",
        ];
        args.extend_from_slice(extra);
        let o = ampybus_on(&url, &args);
        named(&o);
        let lines = o.json_lines();
        let got: Vec<&str> = lines
            .iter()
            .map(|v| v["headers"]["message_id"].as_str().unwrap())
            .collect();
        assert_eq!(got, [ids[0].as_str(), ids[1].as_str()], "{extra:?}");
        for v in &lines {
            assert_eq!(v["headers"]["producer"], "ops@1");
            assert_eq!(v["payload_base64"], "aGVsbG8=");
        }
    }
    // A window read fails before printing anything.
    let o = ampybus_on(
        &url,
        &[
            "sub",
            "--pattern",
            "ampy.dev.news.>",
            "--json",
            "--since",
            "2000-01-01T00:00:00Z",
        ],
    );
    named(&o);
    assert_eq!(o.stdout, "");
}

#[test]
fn io_errors_and_damaged_segments_are_named() {
    // The news log's directory replaced by a file: a real I/O failure (ENOTDIR) whatever the
    // permissions of the user running the tests.
    let tmp = tempfile::tempdir().unwrap();
    let url = url_of(tmp.path(), "");
    publish(&url, 2, None, &[]);
    let news = tmp.path().join("log").join("news");
    let seg = only_segment(tmp.path(), "news");
    let moved = tmp.path().join("news.away");
    std::fs::rename(&news, &moved).unwrap();
    std::fs::write(&news, b"not a directory").unwrap();
    let o = ampybus_on(
        &url,
        &[
            "pub",
            "--topic",
            NEWS,
            "--producer",
            "p@1",
            "--source",
            "s",
            "--pk",
            "n-1",
        ],
    );
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stderr.contains(&format!(
            "transport error: embedded log {}: opening a segment: Not a directory (os error 20)",
            seg.display()
        )),
        "{}",
        o.stderr
    );
    let o = ampybus_on(&url, &["topics", "list"]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stderr.contains(&format!(
            "transport error: embedded log {}: listing segments: Not a directory (os error 20)",
            news.display()
        )),
        "{}",
        o.stderr
    );
    std::fs::remove_file(&news).unwrap();
    std::fs::rename(&moved, &news).unwrap();
    assert_eq!(stored(&url).0, 2);

    // A segment whose file header is overwritten: reading it names the file and byte 0; after
    // a reboot (the shared state gone) every command fails as the log opens.
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[..8].fill(0xff);
    std::fs::write(&seg, &bytes).unwrap();
    let o = ampybus_on(&url, &["topics", "list"]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stderr.contains(&format!(
            "transport error: embedded log {}: damaged at byte 0: segment header does not match its name;",
            seg.display()
        )),
        "{}",
        o.stderr
    );
    std::fs::remove_file(tmp.path().join("state.shm")).unwrap();
    for args in [
        &["topics", "list"][..],
        &["sub", "--pattern", ">", "--timeout", "0.2"],
    ] {
        let o = ampybus_on(&url, args);
        assert_eq!(o.code, 3, "{}", o.stderr);
        assert!(
            o.stderr.contains(&format!(
                "transport error: embedded log {}: damaged at byte 0: not a segment file (bad header); the messages from there on cannot be read (restore the file, or move it away to accept the loss)",
                seg.display()
            )),
            "{}",
            o.stderr
        );
        assert_eq!(o.stdout, "");
    }
}

#[test]
fn urls_without_a_clear_target_are_refused() {
    let no_host = |scheme: &str, port: u16| {
        format!(
            "no host: a `{scheme}://` URL must name its server explicitly, e.g. {scheme}://127.0.0.1:{port} (no default host is assumed)"
        )
    };
    let zero = "option `max_age_days`: 0 is refused: a retention of 0 would delete every stored message; to keep messages forever write `max_age_days=unlimited`".to_owned();
    let forms =
        "accepted forms: /abs/dir, ./rel/dir, file:///abs/dir?options, file:rel/dir?options";
    let cases = [
        ("redis://".to_owned(), no_host("redis", 6379)),
        ("rediss://".to_owned(), no_host("rediss", 6379)),
        ("redis:///2".to_owned(), no_host("redis", 6379)),
        ("redis://:s3cret@".to_owned(), no_host("redis", 6379)),
        ("kafka://".to_owned(), no_host("kafka", 9092)),
        ("kafka://?namespace=t.".to_owned(), no_host("kafka", 9092)),
        ("nats://".to_owned(), no_host("nats", 4222)),
        ("tls://".to_owned(), no_host("tls", 4222)),
        (
            "file:///".to_owned(),
            format!("the data directory would be the filesystem root `/`; {forms}"),
        ),
        (
            "file://host/x".to_owned(),
            format!(
                "`file://host/…` names a host (\"host\"), which the embedded log does not support; {forms}"
            ),
        ),
        (
            "nats://127.0.0.1:4222?max_age_days=0".to_owned(),
            zero.clone(),
        ),
        (
            "redis://127.0.0.1:6379?max_age_days=0".to_owned(),
            zero.clone(),
        ),
        (
            "kafka://127.0.0.1:9092?max_age_days=0".to_owned(),
            zero.clone(),
        ),
    ];
    for (url, want) in &cases {
        for args in [
            &["topics", "list"][..],
            &["sub", "--pattern", ">", "--timeout", "0.2"],
            &[
                "pub",
                "--topic",
                NEWS,
                "--producer",
                "p@1",
                "--source",
                "s",
                "--pk",
                "n-1",
            ],
        ] {
            let o = common::ampybus_in(None, &[&["--url", url.as_str()][..], args].concat());
            assert_eq!(o.code, 2, "{url} {args:?}: {}", o.stderr);
            // Credentials are never shown (the whole userinfo is redacted).
            let shown = url.replace(":s3cret@", "***@");
            assert!(
                o.stderr.contains(&format!("url {shown:?}: {want}")),
                "{url} {args:?}: {}",
                o.stderr
            );
            assert!(!o.stderr.contains("s3cret"), "{}", o.stderr);
        }
    }
    // Nothing was created where the file URLs pointed (relative to the current directory).
    assert!(!Path::new("host").exists());
}

#[test]
fn inspection_commands_never_create_a_data_directory_but_a_durable_consumer_may() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let url = url_of(&missing, "");
    for args in [
        &["topics", "list"][..],
        &["topics", "describe", "ampy.dev.news.>"],
        &["topics", "lag"],
        &["dlq", "inspect"],
        &["sub", "--pattern", "ampy.dev.news.>", "--timeout", "0.2"],
        &[
            "sub",
            "--pattern",
            "ampy.dev.news.>",
            "--since",
            "2000-01-01T00:00:00Z",
        ],
    ] {
        for u in [url.clone(), missing.display().to_string()] {
            let o = ampybus_on(&u, args);
            assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
            assert!(
                o.stderr.contains(&format!(
                    "the data directory {} does not exist or is not a directory",
                    missing.display()
                )),
                "{args:?}: {}",
                o.stderr
            );
            assert_eq!(o.stdout, "");
            assert!(!missing.exists(), "{args:?} created {}", missing.display());
        }
    }

    // A durable consumer may start before its producers: it creates the log.
    let o = ok(
        &url,
        &[
            "sub",
            "--pattern",
            "ampy.dev.news.>",
            "--durable",
            "early",
            "--timeout",
            "0.2",
        ],
    );
    assert!(o.stderr.contains("received 0 message(s)"), "{}", o.stderr);
    let entries = || {
        let mut e: Vec<String> = std::fs::read_dir(&missing)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        e.sort();
        e
    };
    assert!(missing.join("FORMAT").is_file());
    assert_eq!(
        entries(),
        [
            "FORMAT",
            "blobs",
            "groups",
            "groups.lock",
            "state.shm",
            "writer.lock"
        ]
    );
    assert!(missing.join("groups").join("early").join("meta").is_file());
    let ids = publish(&url, 2, None, &[]);
    assert_eq!(
        entries(),
        [
            "FORMAT",
            "blobs",
            "groups",
            "groups.lock",
            "log",
            "state.shm",
            "writer.lock"
        ]
    );
    only_segment(&missing, "news");
    let o = ok(
        &url,
        &[
            "sub",
            "--pattern",
            "ampy.dev.news.>",
            "--durable",
            "early",
            "--json",
            "--max",
            "2",
        ],
    );
    let got: Vec<String> = o
        .json_lines()
        .iter()
        .map(|v| v["headers"]["message_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ids);
}

#[test]
fn publish_refuses_oversized_payloads_and_headers_and_never_matching_patterns() {
    let tmp = tempfile::tempdir().unwrap();
    let url = url_of(tmp.path(), "");
    publish(&url, 1, None, &[]);
    let run = |extra: &[&str]| {
        let mut args = vec![
            "pub",
            "--topic",
            NEWS,
            "--producer",
            "p@1",
            "--source",
            "s",
            "--pk",
            "n-1",
        ];
        args.extend_from_slice(extra);
        let o = ampybus_on(&url, &args);
        assert_eq!(o.code, 2, "{extra:?}: {}", o.stderr);
        assert_eq!(o.stdout, "");
        o.stderr
    };

    let big = tmp.path().join("big.bin");
    std::fs::write(&big, vec![0u8; 64 * 1024 * 1024 + 1]).unwrap();
    let err = run(&["--payload-file", big.to_str().unwrap()]);
    assert!(
        err.contains("invalid payload: message 0: payload is 67108865 bytes, over the limit of 67108864 bytes (64 MiB) that consumers accept"),
        "{err}"
    );
    std::fs::remove_file(&big).unwrap();

    let value = format!("x_note={}", "a".repeat(64 * 1024 + 1));
    let err = run(&["--header", &value]);
    assert!(
        err.contains("invalid header: `x_note`: value is 65537 bytes, over the limit of 65536 bytes (64 KiB) per header value"),
        "{err}"
    );
    let parts: Vec<String> = (0..5)
        .map(|i| format!("x_part{i}={}", "b".repeat(60 * 1024)))
        .collect();
    let mut extra = Vec::new();
    for p in &parts {
        extra.extend(["--header", p.as_str()]);
    }
    let err = run(&extra);
    assert!(
        err.contains("over the limit of 262144 bytes (256 KiB); this is the largest (61447 bytes)"),
        "{err}"
    );
    assert_eq!(stored(&url).0, 1, "nothing more was stored");

    for (flag_args, pattern) in [
        (&["sub", "--timeout", "0.2", "--pattern"][..], "*"),
        (&["sub", "--timeout", "0.2", "--pattern"], "ampy.*"),
        (&["topics", "list", "--pattern"], "ampy.dev.news.v1"),
        (&["dlq", "inspect", "--pattern"], "ampy.*.dlq"),
    ] {
        let mut args = flag_args.to_vec();
        args.push(pattern);
        let o = ampybus_on(&url, &args);
        assert_eq!(o.code, 2, "{args:?}: {}", o.stderr);
        assert!(
            o.stderr.contains(&format!(
                "--pattern {pattern:?}: invalid topic: pattern {pattern:?}: has {} token(s) and no trailing `>`, so it can never match a topic",
                pattern.split('.').count()
            )),
            "{}",
            o.stderr
        );
    }
}
