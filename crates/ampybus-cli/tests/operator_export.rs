//! Issue 14, operator paths that must not lose or hide a message: `sub --json` exports of
//! blob-stored payloads round-trip through `pub --json-envelope` into another log, a blob that
//! cannot be read stops the export naming the message, `dlq redrive` is safe to repeat and
//! checks every entry before it sends any, `validate` reads the multi-envelope files `pub
//! --json-envelope` reads, and `sub --decode` says why `payload_json` is missing.

use ampybus::runtime::build_dlq_envelope;
use ampybus::{Bus, Envelope, Headers, Topic};
use base64::Engine as _;
use serde_json::Value;
use std::path::Path;

mod common;
use common::{Out, ampybus_in};

const NEWS: &str = "ampy.dev.news.v1.raw";
const ORDERS: &str = "ampy.dev.orders.v1.requests";
const MIB: usize = 1024 * 1024;

fn run(dir: &Path, args: &[&str]) -> Out {
    ampybus_in(Some(dir), args)
}

fn ok(dir: &Path, args: &[&str]) -> Out {
    let o = run(dir, args);
    assert_eq!(o.code, 0, "{args:?} failed:\n{}\n{}", o.stdout, o.stderr);
    o
}

fn header<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v["headers"][name].as_str()
}

/// `pub` of one message with the payload in `file` on `NEWS`; returns its message id.
fn publish_file(dir: &Path, file: &Path) -> String {
    let o = ok(
        dir,
        &[
            "pub",
            "--topic",
            NEWS,
            "--producer",
            "p@1",
            "--source",
            "test",
            "--pk",
            "n-1",
            "--payload-file",
            file.to_str().unwrap(),
            "--print-ids",
        ],
    );
    assert_eq!(o.lines().len(), 1, "{}", o.stdout);
    o.lines()[0].to_owned()
}

fn publish_text(dir: &Path, payload: &str) -> String {
    let o = ok(
        dir,
        &[
            "pub",
            "--topic",
            NEWS,
            "--producer",
            "p@1",
            "--source",
            "test",
            "--pk",
            "n-1",
            "--payload",
            payload,
            "--print-ids",
        ],
    );
    o.lines()[0].to_owned()
}

/// Every stored message on `ampy.dev.news.>` as JSON lines, read as a stored window (`sub
/// --since`, which ends with the last stored message), `extra` flags appended.
fn export(dir: &Path, extra: &[&str]) -> Out {
    let mut args = vec![
        "sub",
        "--pattern",
        "ampy.dev.news.>",
        "--json",
        "--since",
        EPOCH,
    ];
    args.extend_from_slice(extra);
    run(dir, &args)
}

/// Like [`export`], through a subscription (`sub` without `--since`), `extra` flags appended.
fn export_subscribed(dir: &Path, extra: &[&str]) -> Out {
    let mut args = vec!["sub", "--pattern", "ampy.dev.news.>", "--json"];
    args.extend_from_slice(extra);
    run(dir, &args)
}

const EPOCH: &str = "1970-01-01T00:00:00Z";

/// Deterministic bytes: `n` pseudo-random bytes, or with `hex` their lower-case hex digits
/// (4 bits of entropy per byte: gzip shrinks them to a little over half).
fn noise(n: usize, seed: u64, hex: bool) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for b in x.to_le_bytes() {
            if out.len() < n {
                out.push(if hex {
                    b"0123456789abcdef"[(b & 15) as usize]
                } else {
                    b
                });
            }
        }
    }
    out
}

fn payload_of(v: &Value) -> Vec<u8> {
    let carried = base64::engine::general_purpose::STANDARD
        .decode(v["payload_base64"].as_str().unwrap())
        .unwrap();
    let mut h = Headers::new();
    if let Some(ce) = header(v, "content_encoding") {
        h.set("content_encoding", ce);
    }
    ampybus::codec::inflate_if_needed(&h, &carried, 64 * MIB)
        .unwrap()
        .to_vec()
}

/// The exported line of a blob-stored message carries the stored bytes; `pub --json-envelope`
/// of it into a second log offloads them to that log's blob store; reading the copy gives the
/// same payload under the same id. `pub` gzips every payload over 128 KiB; with `gzipped`
/// false the message goes into log A as a wire envelope without `content_encoding`, so its
/// blob holds the raw bytes.
fn round_trip(payload: Vec<u8>, gzipped: bool) {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let id = if gzipped {
        let file = a.path().join("payload.bin");
        std::fs::write(&file, &payload).unwrap();
        publish_file(a.path(), &file)
    } else {
        let mut h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "test", "n-1");
        h.fill_publish_defaults();
        let env = Envelope::new(&Topic::parse(NEWS).unwrap(), h, payload.clone());
        let file = a.path().join("raw.json");
        std::fs::write(&file, env.to_json_line(None)).unwrap();
        ok(
            a.path(),
            &[
                "pub",
                "--json-envelope",
                file.to_str().unwrap(),
                "--print-ids",
            ],
        )
        .lines()[0]
            .to_owned()
    };

    // --blob-pointers keeps the pointer form.
    let o = export(a.path(), &["--blob-pointers"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let pointer = o.json_lines();
    assert_eq!(pointer.len(), 1);
    assert_eq!(pointer[0]["payload_base64"], "");
    assert_eq!(header(&pointer[0], "message_id"), Some(id.as_str()));
    let stored: usize = header(&pointer[0], "blob_size").unwrap().parse().unwrap();
    assert!(stored > MIB, "blob of {stored} bytes");
    assert!(
        header(&pointer[0], "blob_hash")
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(header(&pointer[0], "content_encoding").is_some(), gzipped);

    // The default export inlines the stored bytes, as carried.
    let o = export_subscribed(a.path(), &["--max", "1", "--timeout", "30"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines = o.lines();
    assert_eq!(lines.len(), 1);
    let v: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(header(&v, "message_id"), Some(id.as_str()));
    for gone in ["blob_ref", "blob_hash", "blob_size"] {
        assert_eq!(header(&v, gone), None, "{gone} kept");
    }
    let carried = base64::engine::general_purpose::STANDARD
        .decode(v["payload_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(carried.len(), stored);
    assert_eq!(header(&v, "content_encoding"), gzipped.then_some("gzip"));
    assert!(payload_of(&v) == payload, "payload differs after export");

    let line_file = a.path().join("export.jsonl");
    std::fs::write(&line_file, format!("{}\n", lines[0])).unwrap();
    let o = ok(
        b.path(),
        &[
            "pub",
            "--json-envelope",
            line_file.to_str().unwrap(),
            "--print-ids",
        ],
    );
    assert_eq!(o.lines(), [id.as_str()]);

    // Log B stores it offloaded to its own blob store, not re-compressed.
    let copy = export(b.path(), &["--blob-pointers"]).json_lines();
    assert_eq!(copy.len(), 1);
    assert_eq!(copy[0]["payload_base64"], "");
    let blobs = b.path().canonicalize().unwrap().join("blobs");
    let blob_ref = header(&copy[0], "blob_ref").unwrap();
    assert!(
        blob_ref.starts_with(&format!("file://{}/", blobs.display())),
        "{blob_ref} is not under {}",
        blobs.display()
    );
    assert_eq!(
        header(&copy[0], "blob_size"),
        Some(stored.to_string().as_str())
    );
    assert_eq!(
        header(&copy[0], "blob_hash"),
        header(&pointer[0], "blob_hash")
    );

    let o = export(b.path(), &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let back = o.json_lines();
    assert_eq!(back.len(), 1);
    assert_eq!(header(&back[0], "message_id"), Some(id.as_str()));
    assert!(payload_of(&back[0]) == payload, "payload differs in log B");
}

#[test]
fn blob_export_round_trips_an_incompressible_payload_into_a_second_log() {
    // Gzip cannot shrink it, but `pub` compresses everything over 128 KiB.
    round_trip(noise(MIB + MIB / 2, 7, false), true);
}

#[test]
fn blob_export_round_trips_an_uncompressed_blob_into_a_second_log() {
    round_trip(noise(MIB + MIB / 2, 5, false), false);
}

#[test]
fn blob_export_round_trips_a_gzipped_payload_into_a_second_log() {
    // 3 MiB of hex digits: gzipped (over 128 KiB) and still over 1 MiB after it.
    round_trip(noise(3 * MIB, 11, true), true);
}

#[test]
fn a_damaged_or_missing_blob_stops_the_export_naming_the_message() {
    let a = tempfile::tempdir().unwrap();
    let file = a.path().join("payload.bin");
    std::fs::write(&file, noise(MIB + 4096, 3, false)).unwrap();
    let first = publish_text(a.path(), "first");
    let big = publish_file(a.path(), &file);
    publish_text(a.path(), "third");
    let pointers = export(a.path(), &["--blob-pointers"]).json_lines();
    assert_eq!(pointers.len(), 3);
    let blob_ref = header(&pointers[1], "blob_ref").unwrap().to_owned();
    let path = blob_ref.strip_prefix("file://").unwrap().to_owned();
    let size = std::fs::metadata(&path).unwrap().len() as usize;

    // Same size, other bytes: the hash check fails.
    std::fs::write(&path, vec![0u8; size]).unwrap();
    for subscribed in [false, true] {
        let o = if subscribed {
            export_subscribed(a.path(), &["--timeout", "0.5"])
        } else {
            export(a.path(), &[])
        };
        let extra = if subscribed { "subscribed" } else { "window" };
        assert_eq!(o.code, 2, "{extra:?}: {}", o.stderr);
        let printed = o.json_lines();
        assert_eq!(printed.len(), 1, "{extra:?}: {}", o.stdout);
        assert_eq!(header(&printed[0], "message_id"), Some(first.as_str()));
        assert!(
            o.stderr.contains(&format!(
                "error: message {big}: blob_ref {blob_ref}: not printed"
            )),
            "{}",
            o.stderr
        );
        assert!(
            o.stderr.contains("does not match blob_hash"),
            "{}",
            o.stderr
        );
    }

    // Gone: the read fails.
    std::fs::remove_file(&path).unwrap();
    let o = export(a.path(), &[]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert_eq!(o.json_lines().len(), 1);
    assert!(
        o.stderr.contains(&format!(
            "error: message {big}: blob_ref {blob_ref}: not printed"
        )),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("blob store: cannot read"), "{}", o.stderr);

    // The pointer form still prints every message.
    let o = export(a.path(), &["--blob-pointers"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.json_lines().len(), 3);
}

/// Publishes DLQ entries on `ampy.dev.dlq.v1.orders`: `valid` redrivable ones, then
/// `invalid` ones whose original topic did not parse (so they carry no `original_topic`).
/// Returns the DLQ message ids (valid first) and the original ids of the valid ones.
fn seed_dlq(dir: &Path, valid: usize, invalid: usize) -> (Vec<String>, Vec<String>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bus = Bus::connect(dir.to_str().unwrap()).await.unwrap();
        let orders = Topic::parse(ORDERS).unwrap();
        let dlq_topic = orders.dlq_topic();
        let (mut batch, mut originals) = (Vec::new(), Vec::new());
        for i in 0..valid + invalid {
            let h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "test", &format!("co_{i}"));
            let mut orig = Envelope::new(&orders, h, format!("order-{i}").into_bytes());
            if i >= valid {
                orig.topic = "ampy.dev.orders".into();
            } else {
                originals.push(orig.headers.message_id().unwrap().to_owned());
            }
            batch.push(build_dlq_envelope(
                &orig,
                &dlq_topic,
                "handler_error: poison",
                3,
                "svc",
            ));
        }
        let ids = batch
            .iter()
            .map(|e| e.headers.message_id().unwrap().to_owned())
            .collect();
        bus.publish_wire(batch).await.unwrap();
        bus.close().await.unwrap();
        (ids, originals)
    })
}

fn orders(dir: &Path) -> Vec<Value> {
    ok(
        dir,
        &[
            "sub",
            "--pattern",
            "ampy.dev.orders.>",
            "--json",
            "--since",
            EPOCH,
        ],
    )
    .json_lines()
}

const REDRIVE: [&str; 4] = ["dlq", "redrive", "--rate", "1000"];

#[test]
fn redrive_twice_sends_each_entry_once() {
    let d = tempfile::tempdir().unwrap();
    let (dlq_ids, originals) = seed_dlq(d.path(), 3, 0);

    let first = ok(d.path(), &REDRIVE);
    assert_eq!(first.lines().len(), 3, "{}", first.stdout);
    for (line, id) in first.lines().iter().zip(&dlq_ids) {
        assert!(
            line.starts_with(&format!("redrive {id} -> {ORDERS} as ")),
            "{line}"
        );
    }
    assert!(
        first
            .stderr
            .contains("redrove 3 message(s), skipped 0 already redriven"),
        "{}",
        first.stderr
    );

    let second = ok(d.path(), &REDRIVE);
    assert_eq!(second.lines().len(), 0, "{}", second.stdout);
    assert!(
        second
            .stderr
            .contains("redrove 0 message(s), skipped 3 already redriven (recorded under consumer `ampybus-redrive`), 0 invalid"),
        "{}",
        second.stderr
    );
    let dry = ok(d.path(), &["dlq", "redrive", "--dry-run"]);
    assert_eq!(dry.lines().len(), 0, "{}", dry.stdout);
    assert!(
        dry.stderr
            .contains("would redrive 0 message(s), skip 3 already redriven"),
        "{}",
        dry.stderr
    );

    let got = orders(d.path());
    assert_eq!(got.len(), 3);
    let mut redrive_of: Vec<&str> = got
        .iter()
        .map(|v| header(v, "redrive_of").unwrap())
        .collect();
    let mut want: Vec<&str> = originals.iter().map(String::as_str).collect();
    redrive_of.sort();
    want.sort();
    assert_eq!(redrive_of, want);

    // A new entry: the next run sends just that one.
    let (new_ids, _) = seed_dlq(d.path(), 1, 0);
    let third = ok(d.path(), &REDRIVE);
    assert_eq!(third.lines().len(), 1, "{}", third.stdout);
    assert!(third.lines()[0].starts_with(&format!("redrive {} -> ", new_ids[0])));
    assert!(
        third
            .stderr
            .contains("redrove 1 message(s), skipped 3 already redriven"),
        "{}",
        third.stderr
    );
    assert_eq!(orders(d.path()).len(), 4);
}

#[test]
fn redrive_refuses_invalid_entries_unless_told_to_skip_them() {
    let d = tempfile::tempdir().unwrap();
    let (dlq_ids, _) = seed_dlq(d.path(), 2, 1);
    let bad = &dlq_ids[2];
    let listed = format!(
        "cannot redrive {bad} (seq 3, ampy.dev.dlq.v1.orders): invalid header: redrive: the DLQ message has no original_topic"
    );

    let refused = run(d.path(), &REDRIVE);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert_eq!(refused.lines().len(), 0, "{}", refused.stdout);
    assert!(refused.stderr.contains(&listed), "{}", refused.stderr);
    assert!(
        refused.stderr.contains(
            "1 of 3 selected DLQ entries cannot be redriven (listed above); nothing sent"
        ),
        "{}",
        refused.stderr
    );
    assert_eq!(orders(d.path()).len(), 0);

    let dry = run(d.path(), &["dlq", "redrive", "--dry-run"]);
    assert_eq!(dry.code, 2, "{}", dry.stderr);
    assert_eq!(dry.lines().len(), 2, "{}", dry.stdout);
    for (line, id) in dry.lines().iter().zip(&dlq_ids) {
        assert!(
            line.starts_with(&format!("would redrive {id} -> {ORDERS} as ")),
            "{line}"
        );
    }
    assert!(dry.stderr.contains(&listed), "{}", dry.stderr);
    assert!(
        dry.stderr.contains("so the run would be refused"),
        "{}",
        dry.stderr
    );
    let dry_skip = ok(d.path(), &["dlq", "redrive", "--dry-run", "--skip-invalid"]);
    assert_eq!(dry_skip.lines().len(), 2, "{}", dry_skip.stdout);
    assert_eq!(orders(d.path()).len(), 0);

    let mut args = REDRIVE.to_vec();
    args.push("--skip-invalid");
    let sent = ok(d.path(), &args);
    assert_eq!(sent.lines().len(), 2, "{}", sent.stdout);
    for (line, id) in sent.lines().iter().zip(&dlq_ids) {
        assert!(line.starts_with(&format!("redrive {id} -> ")), "{line}");
    }
    assert!(sent.stderr.contains(&listed), "{}", sent.stderr);
    assert!(
        sent.stderr
            .contains("redrove 2 message(s), skipped 0 already redriven (recorded under consumer `ampybus-redrive`), 1 invalid"),
        "{}",
        sent.stderr
    );
    assert_eq!(orders(d.path()).len(), 2);
    // The invalid entry alone is left, and still refused.
    let again = run(d.path(), &REDRIVE);
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert_eq!(orders(d.path()).len(), 2);
}

#[test]
fn validate_checks_every_envelope_of_a_multi_envelope_file() {
    let src = tempfile::tempdir().unwrap();
    for p in ["a", "b", "c"] {
        publish_text(src.path(), p);
    }
    let lines: Vec<String> = export(src.path(), &[])
        .lines()
        .iter()
        .map(|l| l.to_string())
        .collect();
    assert_eq!(lines.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    // One per line, and concatenated pretty objects.
    let jsonl = file("export.jsonl", &format!("{}\n", lines.join("\n")));
    let pretty: Vec<String> = lines
        .iter()
        .map(|l| serde_json::to_string_pretty(&serde_json::from_str::<Value>(l).unwrap()).unwrap())
        .collect();
    let concatenated = file("concatenated.json", &pretty.join("\n"));
    for f in [&jsonl, &concatenated] {
        let o = ok(src.path(), &["validate", f]);
        assert_eq!(o.lines(), [format!("OK {f}")], "{}", o.stdout);
        assert!(
            o.stderr
                .contains("1 file(s), 3 envelope(s): 1 ok, 0 failed"),
            "{}",
            o.stderr
        );
    }
    // `pub --json-envelope` reads the same files.
    let copy = tempfile::tempdir().unwrap();
    let o = ok(copy.path(), &["pub", "--json-envelope", &jsonl]);
    assert!(o.stderr.contains("published 3 envelope(s)"), "{}", o.stderr);

    let broken = [
        lines[0].clone(),
        lines[1].replace("\"partition_key\":\"n-1\"", "\"partition_key\":\"\""),
        lines[2].clone(),
        "{\"topic\":".to_owned(),
    ];
    let bad = file("bad.jsonl", &format!("{}\n", broken.join("\n")));
    let o = run(src.path(), &["validate", &bad]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert_eq!(
        o.lines(),
        [
            format!(
                "FAIL {bad}: envelope 2 (line 2): invalid header: `partition_key`: must not be empty"
            ),
            format!(
                "FAIL {bad}: envelope 4 (line 4): invalid envelope: not valid JSON: EOF while parsing a value at line 5 column 0"
            ),
        ],
        "{}",
        o.stdout
    );
    assert!(
        o.stderr
            .contains("1 file(s), 4 envelope(s): 0 ok, 1 failed"),
        "{}",
        o.stderr
    );
}

/// The hex payload of the README's `OrderRequest` example.
fn readme_order_request_hex() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("--schema ampy.orders.v1.OrderRequest"))
        .expect("the README has the OrderRequest example");
    let line = lines[at..=at + 1]
        .iter()
        .find(|l| l.contains("--payload-hex "))
        .expect("the OrderRequest example has --payload-hex");
    line.split("--payload-hex ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn decode_says_why_payload_json_is_missing() {
    let d = tempfile::tempdir().unwrap();
    let order = |hex: &str| {
        let o = ok(
            d.path(),
            &[
                "pub",
                "--topic",
                "ampy.paper.orders.v1.requests",
                "--producer",
                "oms@1",
                "--source",
                "oms",
                "--pk",
                "co_42",
                "--schema",
                "ampy.orders.v1.OrderRequest",
                "--payload-hex",
                hex,
                "--print-ids",
            ],
        );
        o.lines()[0].to_owned()
    };
    let good = order(&readme_order_request_hex());
    let garbage = order("ff");
    publish_text(d.path(), "raw one");
    publish_text(d.path(), "raw two");

    let o = ok(
        d.path(),
        &[
            "sub",
            "--pattern",
            "ampy.>",
            "--json",
            "--decode",
            "--since",
            EPOCH,
        ],
    );
    let v = o.json_lines();
    assert_eq!(v.len(), 4);
    assert_eq!(header(&v[0], "message_id"), Some(good.as_str()));
    assert_eq!(v[0]["payload_json"]["client_order_id"], "co_42");
    assert_eq!(v[0]["payload_json"]["security"]["symbol"], "AAPL");
    for m in &v[1..] {
        assert!(m.get("payload_json").is_none(), "{m}");
    }
    let notes: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.contains("payload_json omitted"))
        .collect();
    assert_eq!(notes.len(), 2, "{}", o.stderr);
    assert!(
        notes[0].starts_with(&format!(
            "message {garbage}: payload_json omitted: does not decode as ampy.orders.v1.OrderRequest: "
        )),
        "{}",
        notes[0]
    );
    assert_eq!(
        notes[1],
        "payload_json omitted for schema_fqdn \"ampy.raw.v1.Bytes\": not a schema this build knows (said once per schema)"
    );
    assert!(!o.stderr.contains(&good), "{}", o.stderr);
}
