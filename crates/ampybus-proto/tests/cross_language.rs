//! Cross-language wire compatibility with the reference Python package
//! `ampy-proto` 2.1.1.
//!
//! `scripts/py/cross_lang.py generate` builds, for every message type of every
//! ampy package, a deterministic fully populated message (every scalar
//! non-default, 2 items per repeated field, 2 entries per map, nested
//! messages populated, a oneof branch chosen, enums non-zero, Timestamps
//! with 0/3/6/9 fractional digits) and hands us its deterministic bytes and
//! its proto3 JSON (`preserving_proto_field_name=True`).
//!
//! Here we decode those bytes with the prost-generated type and with a
//! prost-reflect `DynamicMessage`, re-encode, and compare bytes; compare our
//! JSON with Python's; and compare our `FileDescriptorProto` bytes with
//! ampy-proto's `serialized_pb`. Then `cross_lang.py verify` decodes what we
//! encoded with ampy-proto and must report every type OK.
//!
//! JSON normalisation: none beyond parsing. Both sides' JSON is parsed into
//! `serde_json::Value` and compared with `==` (object key order is
//! irrelevant; numbers compare by value, so Python's `3.1` and ours are
//! equal when they denote the same `f64`). Python additionally parses our
//! JSON back into its message type and compares messages.
//!
//! One documented exception: prost-reflect keeps map fields in a `HashMap`,
//! so a `DynamicMessage` holding a map re-encodes its entries in unspecified
//! order. For such types (`ampy.metrics.v1.Metric`/`MetricBatch`) the dynamic
//! re-encoding is checked by message equality and by canonical re-encoding
//! ([`ampybus_proto::reencode`]), not byte-for-byte.
//!
//! The Python environment comes from `scripts/python-env.sh`, which the test
//! runs itself (it creates `.venv-ampyproto/` when missing and is a quick
//! no-op otherwise), so a plain `cargo test` works. Any Python failure fails
//! the test; nothing is skipped.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use prost::Message;
use prost_reflect::{DynamicMessage, Kind, MessageDescriptor, ReflectMessage};
use serde_json::{Value, json};

use ampybus_proto::ampy;

/// Number of message types in ampy-proto 2.1.1 (map entries excluded).
const EXPECTED_TYPES: usize = 35;

/// Runs `scripts/py/cross_lang.py` with `args`; returns stdout.
fn cross_lang(args: &[&str]) -> String {
    support::run_script("cross_lang.py", args)
}

fn work_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "ampybus-proto-cross-language-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("create work dir");
    dir
}

/// One Python-built message.
struct Case {
    fqdn: String,
    bytes: Vec<u8>,
    json: Value,
}

struct PythonOutput {
    cases: Vec<Case>,
    /// File name -> ampy-proto's `serialized_pb`.
    files: Vec<(String, Vec<u8>)>,
}

fn b64(value: &Value) -> Vec<u8> {
    STANDARD
        .decode(value.as_str().expect("base64 string"))
        .expect("valid base64")
}

/// Python's output, generated once per test binary.
fn python_output() -> &'static PythonOutput {
    static OUTPUT: OnceLock<PythonOutput> = OnceLock::new();
    OUTPUT.get_or_init(|| {
        let path = work_dir().join("python_cases.json");
        cross_lang(&["generate", path.to_str().expect("utf-8 path")]);
        let doc: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read python output")).unwrap();
        assert_eq!(doc["ampy_proto_version"], "2.1.1");
        let cases = doc["cases"]
            .as_array()
            .expect("cases array")
            .iter()
            .map(|c| Case {
                fqdn: c["fqdn"].as_str().expect("fqdn").to_owned(),
                bytes: b64(&c["payload_b64"]),
                json: c["json"].clone(),
            })
            .collect();
        let files = doc["files"]
            .as_object()
            .expect("files object")
            .iter()
            .map(|(name, bytes)| (name.clone(), b64(bytes)))
            .collect();
        PythonOutput { cases, files }
    })
}

/// Decodes `bytes` as `M`, checks it is populated, re-encodes.
fn typed_reencode<M: Message + Default + PartialEq>(bytes: &[u8]) -> Vec<u8> {
    let msg = M::decode(bytes).expect("prost-generated type decodes Python bytes");
    assert!(msg != M::default(), "decoded message is empty");
    msg.encode_to_vec()
}

/// Decode + re-encode with the generated type named `fqdn`, listed by hand so
/// that every generated Rust type is exercised by name.
fn typed_roundtrip(fqdn: &str, bytes: &[u8]) -> Vec<u8> {
    macro_rules! dispatch {
        ($($name:literal => $ty:ty),* $(,)?) => {
            match fqdn {
                $($name => typed_reencode::<$ty>(bytes),)*
                other => panic!("no generated type listed for {other}"),
            }
        };
    }
    dispatch! {
        "ampy.common.v1.Decimal" => ampy::common::v1::Decimal,
        "ampy.common.v1.Money" => ampy::common::v1::Money,
        "ampy.common.v1.SecurityId" => ampy::common::v1::SecurityId,
        "ampy.common.v1.Meta" => ampy::common::v1::Meta,
        "ampy.bars.v1.Bar" => ampy::bars::v1::Bar,
        "ampy.bars.v1.BarBatch" => ampy::bars::v1::BarBatch,
        "ampy.ticks.v1.TradeTick" => ampy::ticks::v1::TradeTick,
        "ampy.ticks.v1.QuoteTick" => ampy::ticks::v1::QuoteTick,
        "ampy.ticks.v1.Tick" => ampy::ticks::v1::Tick,
        "ampy.ticks.v1.TickBatch" => ampy::ticks::v1::TickBatch,
        "ampy.fundamentals.v1.LineItem" => ampy::fundamentals::v1::LineItem,
        "ampy.fundamentals.v1.FundamentalsSnapshot" => ampy::fundamentals::v1::FundamentalsSnapshot,
        "ampy.fundamentals.v1.FundamentalsBatch" => ampy::fundamentals::v1::FundamentalsBatch,
        "ampy.news.v1.NewsItem" => ampy::news::v1::NewsItem,
        "ampy.news.v1.NewsBatch" => ampy::news::v1::NewsBatch,
        "ampy.fx.v1.Pair" => ampy::fx::v1::Pair,
        "ampy.fx.v1.FxRate" => ampy::fx::v1::FxRate,
        "ampy.fx.v1.FxRateBatch" => ampy::fx::v1::FxRateBatch,
        "ampy.corporate_actions.v1.SplitAction" => ampy::corporate_actions::v1::SplitAction,
        "ampy.corporate_actions.v1.DividendAction" => ampy::corporate_actions::v1::DividendAction,
        "ampy.corporate_actions.v1.CorporateAction" => ampy::corporate_actions::v1::CorporateAction,
        "ampy.corporate_actions.v1.CorporateActionBatch" => ampy::corporate_actions::v1::CorporateActionBatch,
        "ampy.universe.v1.Constituent" => ampy::universe::v1::Constituent,
        "ampy.universe.v1.UniverseSnapshot" => ampy::universe::v1::UniverseSnapshot,
        "ampy.universe.v1.UniverseBatch" => ampy::universe::v1::UniverseBatch,
        "ampy.signals.v1.Signal" => ampy::signals::v1::Signal,
        "ampy.signals.v1.SignalBatch" => ampy::signals::v1::SignalBatch,
        "ampy.orders.v1.OrderRequest" => ampy::orders::v1::OrderRequest,
        "ampy.orders.v1.OrderRequestBatch" => ampy::orders::v1::OrderRequestBatch,
        "ampy.fills.v1.FillEvent" => ampy::fills::v1::FillEvent,
        "ampy.fills.v1.FillBatch" => ampy::fills::v1::FillBatch,
        "ampy.positions.v1.PositionSnapshot" => ampy::positions::v1::PositionSnapshot,
        "ampy.positions.v1.PositionBatch" => ampy::positions::v1::PositionBatch,
        "ampy.metrics.v1.Metric" => ampy::metrics::v1::Metric,
        "ampy.metrics.v1.MetricBatch" => ampy::metrics::v1::MetricBatch,
    }
}

/// Whether `desc` or any message reachable from it has a map field.
fn contains_map(desc: &MessageDescriptor, seen: &mut BTreeSet<String>) -> bool {
    if !seen.insert(desc.full_name().to_owned()) {
        return false;
    }
    desc.fields().any(|f| {
        f.is_map()
            || match f.kind() {
                Kind::Message(m) => contains_map(&m, seen),
                _ => false,
            }
    })
}

/// Dynamic decode + re-encode; byte-exact unless the type holds maps (see
/// the module docs).
fn dynamic_roundtrip(case: &Case) -> Vec<u8> {
    let dynamic = ampybus_proto::decode_dynamic(&case.fqdn, &case.bytes)
        .expect("known type")
        .expect("DynamicMessage decodes Python bytes");
    let encoded = dynamic.encode_to_vec();
    let desc = dynamic.descriptor();
    if contains_map(&desc, &mut BTreeSet::new()) {
        assert_eq!(encoded.len(), case.bytes.len(), "{}: length", case.fqdn);
        let again = DynamicMessage::decode(desc, encoded.as_slice()).unwrap();
        assert_eq!(again, dynamic, "{}: dynamic re-decode", case.fqdn);
        let canonical = ampybus_proto::reencode(&case.fqdn, &encoded)
            .unwrap()
            .unwrap();
        assert_eq!(
            canonical, case.bytes,
            "{}: canonical re-encoding",
            case.fqdn
        );
    } else {
        assert_eq!(encoded, case.bytes, "{}: dynamic re-encoding", case.fqdn);
    }
    encoded
}

#[test]
fn python_covers_exactly_our_message_types() {
    let ours = ampybus_proto::message_names();
    let theirs: Vec<&str> = python_output()
        .cases
        .iter()
        .map(|c| c.fqdn.as_str())
        .collect();
    assert_eq!(theirs, ours, "same types, same order");
    assert_eq!(theirs.len(), EXPECTED_TYPES);
}

#[test]
fn python_bytes_reencode_identically() {
    for case in &python_output().cases {
        let typed = typed_roundtrip(&case.fqdn, &case.bytes);
        assert_eq!(
            typed, case.bytes,
            "{}: prost-generated re-encoding",
            case.fqdn
        );
        let canonical = ampybus_proto::reencode(&case.fqdn, &case.bytes)
            .unwrap()
            .unwrap();
        assert_eq!(canonical, case.bytes, "{}: reencode()", case.fqdn);
        dynamic_roundtrip(case);
    }
}

#[test]
fn json_matches_python() {
    for case in &python_output().cases {
        let ours = ampybus_proto::decode_to_json(&case.fqdn, &case.bytes)
            .expect("known type")
            .expect("decodes");
        assert_eq!(ours, case.json, "{}: JSON differs from Python's", case.fqdn);
        let encoded = ampybus_proto::encode_from_json(&case.fqdn, &case.json)
            .expect("known type")
            .expect("Python's JSON parses");
        assert_eq!(encoded, case.bytes, "{}: encode_from_json", case.fqdn);
    }
}

#[test]
fn file_descriptor_bytes_match_ampy_proto() {
    let files = &python_output().files;
    assert_eq!(files.len(), 13);
    for (name, theirs) in files {
        // Any message defined in the file names it.
        let fqdn = ampybus_proto::message_names()
            .into_iter()
            .find(|n| {
                ampybus_proto::message_descriptor(n)
                    .unwrap()
                    .parent_file()
                    .name()
                    == name
            })
            .unwrap_or_else(|| panic!("no message of ours lives in {name}"));
        let ours = ampybus_proto::file_descriptor_bytes(fqdn).unwrap();
        if ours != *theirs {
            let a = prost_types::FileDescriptorProto::decode(ours.as_slice()).unwrap();
            let b = prost_types::FileDescriptorProto::decode(theirs.as_slice()).unwrap();
            panic!("{name}: descriptor bytes differ\nours:   {a:?}\ntheirs: {b:?}");
        }
    }
}

#[test]
fn python_decodes_rust_encodings() {
    let mut cases = Vec::new();
    for case in &python_output().cases {
        let typed = typed_roundtrip(&case.fqdn, &case.bytes);
        let dynamic = dynamic_roundtrip(case);
        let from_json = ampybus_proto::encode_from_json(&case.fqdn, &case.json)
            .unwrap()
            .unwrap();
        let rust_json = ampybus_proto::decode_to_json(&case.fqdn, &typed)
            .unwrap()
            .unwrap();
        cases.push(json!({
            "fqdn": case.fqdn,
            "prost_b64": STANDARD.encode(&typed),
            "dynamic_b64": STANDARD.encode(&dynamic),
            "from_json_b64": STANDARD.encode(&from_json),
            "json": rust_json,
        }));
    }
    let path = work_dir().join("rust_cases.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&json!({ "cases": cases })).unwrap(),
    )
    .unwrap();

    let report = cross_lang(&["verify", path.to_str().expect("utf-8 path")]);
    let lines: Vec<&str> = report.lines().collect();
    let ok: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("OK ")).collect();
    assert_eq!(ok, ampybus_proto::message_names(), "report:\n{report}");
    assert_eq!(
        lines.last().copied(),
        Some(format!("SUMMARY ok={EXPECTED_TYPES} failed=0").as_str()),
        "report:\n{report}"
    );
    assert_eq!(lines.len(), EXPECTED_TYPES + 1, "report:\n{report}");
}
