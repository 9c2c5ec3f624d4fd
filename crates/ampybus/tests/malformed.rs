//! Golden files: every envelope under `golden/malformed/` fails validation with the message
//! listed in `golden/malformed/EXPECTED.tsv`, and every envelope elsewhere under `golden/`
//! validates.
//!
//! `EXPECTED.tsv` has one line per fixture: `file<TAB>substring`, where the substring must
//! occur in the error's `Display` form. The file name's prefix gives the expected
//! [`ErrorKind`]: `envelope-` (JSON shape), `topic-`, `header-` and `payload-`.

use ampybus::validate::{validate_envelope_json, validate_path};
use ampybus::{Envelope, ErrorKind};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../golden")
}

fn malformed_dir() -> PathBuf {
    golden_dir().join("malformed")
}

/// `EXPECTED.tsv` as file name → expected substring, checking its own shape on the way.
fn expected() -> BTreeMap<String, String> {
    let path = malformed_dir().join("EXPECTED.tsv");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (file, want) = line
            .split_once('\t')
            .unwrap_or_else(|| panic!("EXPECTED.tsv line {}: no TAB in {line:?}", n + 1));
        assert!(
            !want.is_empty() && !want.contains('\t'),
            "EXPECTED.tsv line {}: bad substring",
            n + 1
        );
        let dup = out.insert(file.to_owned(), want.to_owned());
        assert!(
            dup.is_none(),
            "EXPECTED.tsv line {}: {file} listed twice",
            n + 1
        );
    }
    out
}

fn kind_for(file: &str) -> ErrorKind {
    let prefix = file.split('-').next().unwrap_or_default();
    match prefix {
        "envelope" => ErrorKind::Envelope,
        "topic" => ErrorKind::Topic,
        "header" => ErrorKind::Header,
        "payload" => ErrorKind::Payload,
        _ => panic!("{file}: name must start with envelope-, topic-, header- or payload-"),
    }
}

#[test]
fn every_fixture_is_listed_and_every_listed_fixture_exists() {
    let want = expected();
    assert!(want.len() >= 30, "only {} malformed fixtures", want.len());
    let mut on_disk = Vec::new();
    for entry in std::fs::read_dir(malformed_dir()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().expect("UTF-8 file name");
        if name == "EXPECTED.tsv" {
            continue;
        }
        assert!(
            entry.file_type().unwrap().is_file(),
            "{name}: only files belong in golden/malformed"
        );
        assert!(name.ends_with(".json"), "{name}: fixtures are *.json");
        assert!(
            want.contains_key(&name),
            "{name} is not listed in EXPECTED.tsv"
        );
        on_disk.push(name);
    }
    for file in want.keys() {
        assert!(
            on_disk.contains(file),
            "{file} is listed in EXPECTED.tsv but does not exist"
        );
    }
}

#[test]
fn every_fixture_fails_with_its_expected_message_and_kind() {
    let want = expected();
    let mut failures = Vec::new();
    for (file, substring) in &want {
        let results = validate_path(&malformed_dir().join(file), None);
        assert_eq!(results.len(), 1, "{file}");
        match &results[0].1 {
            Ok(_) => failures.push(format!(
                "{file}: validated, expected an error containing {substring:?}"
            )),
            Err(e) => {
                if !e.to_string().contains(substring.as_str()) {
                    failures.push(format!(
                        "{file}: error {:?} does not contain {substring:?}",
                        e.to_string()
                    ));
                }
                if e.kind() != kind_for(file) {
                    failures.push(format!(
                        "{file}: kind {:?}, expected {:?} ({e})",
                        e.kind(),
                        kind_for(file)
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures wrong:\n{}",
        failures.len(),
        want.len(),
        failures.join("\n")
    );
}

#[test]
fn the_whole_malformed_dir_fails_file_by_file() {
    let results = validate_path(&malformed_dir(), None);
    assert_eq!(results.len(), expected().len());
    let mut paths: Vec<&PathBuf> = results.iter().map(|(p, _)| p).collect();
    let sorted = {
        let mut s = paths.clone();
        s.sort();
        s
    };
    assert_eq!(paths, sorted, "results come in sorted path order");
    paths.dedup();
    assert_eq!(paths.len(), results.len());
    for (path, r) in &results {
        assert!(r.is_err(), "{} validated", path.display());
    }
}

/// The fixtures were made from one valid base envelope by changing one thing each: undoing
/// that change must give a valid envelope again, so each fixture fails for its listed reason
/// only.
#[test]
fn fixtures_differ_from_a_valid_base_by_one_change() {
    let fix = |file: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let text = std::fs::read_to_string(malformed_dir().join(file)).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut v);
        validate_envelope_json(&v.to_string(), None)
            .unwrap_or_else(|e| panic!("{file} repaired: {e}"))
    };
    let remove = |name: &'static str| {
        move |v: &mut serde_json::Value| {
            v["headers"].as_object_mut().unwrap().remove(name);
        }
    };
    let set = |name: &'static str, value: &'static str| {
        move |v: &mut serde_json::Value| {
            v["headers"][name] = value.into();
        }
    };
    let base: Envelope = fix("header-retry-count-negative.json", &remove("retry_count"));
    assert_eq!(base.topic, "ampy.dev.bars.v1.XNAS.AAPL");
    fix("header-dedupe-key-empty.json", &remove("dedupe_key"));
    fix(
        "header-schema-hash-nameonly-mismatch.json",
        &remove("schema_hash"),
    );
    fix(
        "payload-gzip-flag-on-plain-bytes.json",
        &remove("content_encoding"),
    );
    fix(
        "header-value-newline.json",
        &set("producer", "yfinance-go@ingest-1"),
    );
    fix(
        "header-partition-key-fills.json",
        &set("partition_key", "ALPACA-LIVE-01|co_20250905_001"),
    );
    fix(
        "header-partition-key-fx.json",
        &set("partition_key", "USD.JPY"),
    );
    fix(
        "header-partition-key-fundamentals.json",
        &set("partition_key", "AAPL.XNAS|2025-06-30|tiingo"),
    );
    fix(
        "header-partition-key-signals.json",
        &set("partition_key", "hyper@2025-09-05|NVDA.XNAS|5d"),
    );
    fix(
        "header-partition-key-positions.json",
        &set("partition_key", "ALPACA-LIVE-01|AAPL.XNAS"),
    );
    fix(
        "header-dlq-reason-without-code.json",
        &set("dlq_reason", "handler_panic: handler panicked"),
    );
    fix("envelope-blob-ref-with-inline-payload.json", &|v| {
        v["payload_base64"] = "".into()
    });
    fix("topic-wildcard-star.json", &|v| {
        v["topic"] = "ampy.dev.bars.v1.XNAS.AAPL".into()
    });
    fix("envelope-unknown-field.json", &|v| {
        v.as_object_mut().unwrap().remove("payload");
    });
}

fn json_files_under(dir: &Path, skip: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let entry = entry.unwrap();
        let p = entry.path();
        let ft = entry.file_type().unwrap();
        if ft.is_dir() {
            if p != skip {
                json_files_under(&p, skip, out);
            }
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}

/// Every envelope under `golden/` except `golden/malformed/` validates (without a payload
/// decoder: the core does not depend on the domain schemas).
#[test]
fn every_other_golden_file_validates() {
    let golden = golden_dir();
    let malformed = malformed_dir();
    let mut found = Vec::new();
    json_files_under(&golden, &malformed, &mut found);
    found.sort();

    let mut checked = Vec::new();
    let mut failures = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&golden)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for entry in entries {
        if entry == malformed || !(entry.is_dir() || entry.extension().is_some_and(|x| x == "json"))
        {
            continue;
        }
        for (path, result) in validate_path(&entry, None) {
            if let Err(e) = result {
                failures.push(format!("{}: {e}", path.display()));
            }
            checked.push(path);
        }
    }
    checked.sort();
    assert!(
        failures.is_empty(),
        "golden files that do not validate:\n{}",
        failures.join("\n")
    );
    assert_eq!(
        checked,
        found,
        "validated {} files, found {} *.json files",
        checked.len(),
        found.len()
    );
    eprintln!("validated {} golden envelope files", checked.len());
}
