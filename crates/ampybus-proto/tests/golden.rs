//! Golden envelopes under `golden/` (except `golden/malformed/`, which
//! belongs to the `ampybus` crate's contract tests).
//!
//! For every file: the JSON form has the documented shape; the payload
//! (gunzipped when `content_encoding=gzip`, which must be used exactly when
//! the raw payload exceeds 128 KiB) decodes as `schema_fqdn` with our
//! schemas; `payload_json` equals our decode; and the carried bytes are
//! canonical (our deterministic re-encoding and our JSON encoding reproduce
//! them). Fixtures whose payload is deliberately undecodable are listed in
//! [`UNDECODABLE`] and must fail to decode and carry no `payload_json`.
//!
//! `gen_golden.py --check` must also reproduce every file byte for byte.

mod support;

use std::io::Read as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

/// The 12 payload domains; each has `typical`, `minimal` and `edge` files.
const PAYLOAD_DOMAINS: [&str; 12] = [
    "bars",
    "ticks",
    "fundamentals",
    "news",
    "fx",
    "corporate_actions",
    "universe",
    "signals",
    "orders",
    "fills",
    "positions",
    "metrics",
];

/// Raw payloads strictly larger than this are carried gzip-compressed.
const GZIP_THRESHOLD: usize = 131_072;

/// Fixtures (relative to `golden/`) whose payload bytes are deliberately
/// not a valid encoding of their `schema_fqdn`.
const UNDECODABLE: &[&str] = &["dlq/decode_error.json"];

fn golden_dir() -> PathBuf {
    support::repo_root().join("golden")
}

/// Every `*.json` under `golden/` except `golden/malformed/`, as paths
/// relative to `golden/` with `/` separators, sorted.
fn golden_files() -> Vec<String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().expect("UTF-8 file name");
            let rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if entry.file_type().unwrap().is_dir() {
                if rel != "malformed" {
                    walk(&entry.path(), &rel, out);
                }
            } else if name.ends_with(".json") {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(&golden_dir(), "", &mut out);
    out.sort();
    out
}

#[test]
fn every_domain_has_typical_minimal_and_edge() {
    let files = golden_files();
    for domain in PAYLOAD_DOMAINS {
        for kind in ["typical", "minimal", "edge"] {
            let rel = format!("{domain}/{kind}.json");
            assert!(files.contains(&rel), "missing golden/{rel}");
        }
    }
    let dlq: Vec<&String> = files.iter().filter(|f| f.starts_with("dlq/")).collect();
    assert!(dlq.len() >= 3, "only {} DLQ envelopes", dlq.len());
    for rel in UNDECODABLE {
        assert!(files.iter().any(|f| f == rel), "missing golden/{rel}");
    }
}

/// Checks one golden file; returns whether its payload was gzipped.
fn check_file(rel: &str) -> bool {
    let text = std::fs::read_to_string(golden_dir().join(rel)).unwrap();
    assert!(text.ends_with("}\n"), "{rel}: must end with a newline");
    assert!(text.starts_with("{\n  \"topic\": "), "{rel}: topic first");
    let env: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let obj = env.as_object().unwrap();

    // Top-level keys: exactly these, in this order.
    let mut expected_keys = vec!["topic", "headers", "payload_base64"];
    if obj.contains_key("payload_json") {
        expected_keys.push("payload_json");
    }
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_by_key(|k| text.find(&format!("\n  \"{k}\": ")).expect("top-level key"));
    assert_eq!(keys, expected_keys, "{rel}: top-level keys");

    let headers = obj["headers"].as_object().unwrap();
    assert!(
        headers.values().all(Value::is_string),
        "{rel}: header values must be strings"
    );
    let header = |name: &str| headers.get(name).and_then(Value::as_str);

    let carried = STANDARD
        .decode(obj["payload_base64"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{rel}: payload_base64: {e}"));
    let gzipped = match header("content_encoding") {
        Some("gzip") => true,
        None => false,
        Some(other) => panic!("{rel}: content_encoding {other:?}"),
    };
    let raw = if gzipped {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(carried.as_slice())
            .read_to_end(&mut raw)
            .unwrap_or_else(|e| panic!("{rel}: gunzip: {e}"));
        assert!(
            raw.len() > GZIP_THRESHOLD,
            "{rel}: gzipped but only {} bytes",
            raw.len()
        );
        raw
    } else {
        assert!(
            carried.len() <= GZIP_THRESHOLD,
            "{rel}: {} bytes must be gzipped",
            carried.len()
        );
        carried
    };

    let fqdn = header("schema_fqdn").unwrap_or_else(|| panic!("{rel}: no schema_fqdn"));
    assert!(
        ampybus_proto::is_known(fqdn),
        "{rel}: unknown schema_fqdn {fqdn}"
    );

    if UNDECODABLE.contains(&rel) {
        assert!(
            !obj.contains_key("payload_json"),
            "{rel}: undecodable, so no payload_json"
        );
        let result = ampybus_proto::decode_to_json(fqdn, &raw).expect("known type");
        assert!(
            matches!(result, Err(ampybus_proto::Error::Decode(_))),
            "{rel}: payload was expected NOT to decode, got {result:?}"
        );
        return gzipped;
    }

    let given = obj
        .get("payload_json")
        .unwrap_or_else(|| panic!("{rel}: payload_json missing (list it in UNDECODABLE?)"));
    let decoded = ampybus_proto::decode_to_json(fqdn, &raw)
        .expect("known type")
        .unwrap_or_else(|e| panic!("{rel}: does not decode as {fqdn}: {e}"));
    assert_eq!(
        &decoded, given,
        "{rel}: payload_json differs from our decode"
    );
    let canonical = ampybus_proto::reencode(fqdn, &raw).unwrap().unwrap();
    assert!(canonical == raw, "{rel}: payload bytes are not canonical");
    let from_json = ampybus_proto::encode_from_json(fqdn, given)
        .unwrap()
        .unwrap();
    assert!(
        from_json == raw,
        "{rel}: encode_from_json(payload_json) differs"
    );
    gzipped
}

#[test]
fn payloads_decode_and_match_payload_json() {
    let files = golden_files();
    let mut gzipped = Vec::new();
    for rel in &files {
        if check_file(rel) {
            gzipped.push(rel.as_str());
        }
    }
    for required in ["bars/edge.json", "ticks/edge.json", "news/edge.json"] {
        assert!(gzipped.contains(&required), "{required} must be gzipped");
    }
    assert!(files.len() >= PAYLOAD_DOMAINS.len() * 3 + 3);
}

#[test]
fn generator_reproduces_golden_files() {
    let out = support::run_script("gen_golden.py", &["--check"]);
    assert!(out.starts_with("checked "), "{out}");
}
