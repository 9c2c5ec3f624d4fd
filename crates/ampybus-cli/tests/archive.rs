//! `ampybus archive` against a real PostgreSQL: golden payloads into typed tables, exactly
//! once across `kill -9` and a database restart, bad input.

mod archive_support;
mod common;

use archive_support::{Db, OwnServer, count, query};
use common::{ampybus_in, ampybus_on};
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn scale() -> f64 {
    std::env::var("AMPYBUS_TEST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../golden")
}

/// Every golden envelope file of every domain directory (not `malformed/`).
fn golden_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for d in std::fs::read_dir(golden_root()).unwrap() {
        let d = d.unwrap().path();
        if !d.is_dir() || d.ends_with("malformed") {
            continue;
        }
        for f in std::fs::read_dir(&d).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "json") {
                files.push(f);
            }
        }
    }
    files.sort();
    files
}

/// How a typed column is compared with the decoded payload (`payload_json`, written by the
/// real ampy-proto package).
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Int,
    Bool,
    Num,
    Ts,
    /// An enum of this full name, stored as its number.
    Enum(&'static str),
    /// An enum in a oneof: NULL when the oneof holds something else.
    OneofEnum(&'static str),
    /// A repeated string, stored comma-joined.
    List,
}

/// `(table, natural key columns, [(column, path in the record, kind)])`.
type Spec = (
    &'static str,
    &'static [&'static str],
    Vec<(&'static str, &'static str, Kind)>,
);

fn specs() -> Vec<Spec> {
    use Kind::*;
    vec![
        (
            "bars",
            &["symbol", "mic", "bar_start", "bar_end", "adjustment_policy"],
            vec![
                ("symbol", "security.symbol", Text),
                ("mic", "security.mic", Text),
                ("bar_start", "start", Ts),
                ("bar_end", "end", Ts),
                ("open", "open", Num),
                ("high", "high", Num),
                ("low", "low", Num),
                ("close", "close", Num),
                ("vwap", "vwap", Num),
                ("volume", "volume", Int),
                ("trade_count", "trade_count", Int),
                ("adjusted", "adjusted", Bool),
                (
                    "adjustment_policy",
                    "adjustment_policy",
                    Enum("ampy.common.v1.AdjustmentPolicy"),
                ),
                ("event_time", "event_time", Ts),
                ("ingest_time", "ingest_time", Ts),
                ("as_of", "as_of", Ts),
            ],
        ),
        (
            "trades",
            &["message_id", "idx"],
            vec![
                ("symbol", "security.symbol", Text),
                ("mic", "security.mic", Text),
                ("price", "price", Num),
                ("size", "size", Int),
                ("venue", "venue", Text),
                ("event_time", "event_time", Ts),
                ("ingest_time", "ingest_time", Ts),
            ],
        ),
        (
            "quotes",
            &["message_id", "idx"],
            vec![
                ("symbol", "security.symbol", Text),
                ("mic", "security.mic", Text),
                ("bid", "bid", Num),
                ("bid_size", "bid_size", Int),
                ("ask", "ask", Num),
                ("ask_size", "ask_size", Int),
                ("venue", "venue", Text),
                ("event_time", "event_time", Ts),
                ("ingest_time", "ingest_time", Ts),
            ],
        ),
        (
            "orders",
            &["message_id", "idx"],
            vec![
                ("account_id", "account_id", Text),
                ("client_order_id", "client_order_id", Text),
                ("symbol", "security.symbol", Text),
                ("mic", "security.mic", Text),
                ("side", "side", Enum("ampy.common.v1.Side")),
                ("order_type", "order_type", Enum("ampy.common.v1.OrderType")),
                ("tif", "tif", Enum("ampy.common.v1.TimeInForce")),
                ("quantity", "quantity", Num),
                ("limit_price", "limit_price", Num),
                ("stop_price", "stop_price", Num),
                ("venue", "venue", Text),
                ("strategy_tag", "strategy_tag", Text),
                ("created_at", "created_at", Ts),
            ],
        ),
        (
            "fills",
            &["message_id", "idx"],
            vec![
                ("account_id", "account_id", Text),
                ("client_order_id", "client_order_id", Text),
                ("broker_order_id", "broker_order_id", Text),
                ("symbol", "security.symbol", Text),
                ("mic", "security.mic", Text),
                ("price", "price", Num),
                ("quantity", "quantity", Num),
                ("venue", "venue", Text),
                ("event_time", "event_time", Ts),
            ],
        ),
        (
            "positions",
            &["account_id", "symbol", "mic", "as_of"],
            vec![
                ("account_id", "account_id", Text),
                ("symbol", "security.symbol", Text),
                ("mic", "security.mic", Text),
                ("quantity", "quantity", Num),
                ("avg_price", "avg_price", Num),
                ("unrealized_pnl", "unrealized_pnl.amount", Num),
                (
                    "unrealized_pnl_currency",
                    "unrealized_pnl.currency_code",
                    Text,
                ),
                ("realized_pnl", "realized_pnl.amount", Num),
                ("realized_pnl_currency", "realized_pnl.currency_code", Text),
                ("as_of", "as_of", Ts),
            ],
        ),
        (
            "signals",
            &["model_id", "symbol", "mic", "horizon", "generated_at"],
            vec![
                ("model_id", "model_id", Text),
                ("symbol", "security.symbol", Text),
                ("mic", "security.mic", Text),
                ("signal_type", "type", Enum("ampy.common.v1.SignalType")),
                ("horizon", "horizon", Text),
                ("generated_at", "generated_at", Ts),
                ("expires_at", "expires_at", Ts),
                ("score", "score", Num),
                ("action", "action", OneofEnum("ampy.common.v1.ActionType")),
            ],
        ),
        (
            "fx_rates",
            &["base", "quote", "as_of"],
            vec![
                ("base", "pair.base", Text),
                ("quote", "pair.quote", Text),
                ("bid", "bid", Num),
                ("ask", "ask", Num),
                ("mid", "mid", Num),
                ("as_of", "as_of", Ts),
            ],
        ),
        (
            "news",
            &["news_id"],
            vec![
                ("news_id", "id", Text),
                ("source", "source", Text),
                ("url", "url", Text),
                ("headline", "headline", Text),
                ("body", "body", Text),
                ("tickers", "tickers", List),
                ("sentiment_score_bp", "sentiment_score_bp", Int),
                ("published_at", "published_at", Ts),
                ("ingest_time", "ingest_time", Ts),
            ],
        ),
    ]
}

/// The records of a decoded payload as `(table, record)`.
fn records(payload: &Value) -> Vec<(&'static str, Value)> {
    let list = |k: &str| payload[k].as_array().cloned().unwrap_or_default();
    if payload.get("bars").is_some() {
        return list("bars").into_iter().map(|r| ("bars", r)).collect();
    }
    if payload.get("ticks").is_some() {
        return list("ticks")
            .into_iter()
            .map(|t| match t.get("trade") {
                Some(tr) => ("trades", tr.clone()),
                None => ("quotes", t["quote"].clone()),
            })
            .collect();
    }
    for (k, t) in [
        ("fills", "fills"),
        ("positions", "positions"),
        ("signals", "signals"),
        ("rates", "fx_rates"),
        ("items", "news"),
        ("orders", "orders"),
    ] {
        if payload.get(k).is_some() {
            return list(k).into_iter().map(|r| (t, r)).collect();
        }
    }
    Vec::new()
}

/// The expected text of a column (as the query below prints it), `None` for NULL.
fn expected(record: &Value, path: &str, kind: Kind) -> Option<String> {
    let mut v = record;
    for p in path.split('.') {
        v = v.get(p).unwrap_or(&Value::Null);
    }
    let s = |v: &Value| {
        v.as_str()
            .map(str::to_owned)
            .or_else(|| v.as_i64().map(|n| n.to_string()))
    };
    match kind {
        Kind::Text => s(v).filter(|t| !t.is_empty()),
        Kind::Int => Some(s(v).unwrap_or_else(|| "0".into())),
        Kind::Bool => Some(v.as_bool().unwrap_or(false).to_string()),
        Kind::OneofEnum(_) if v.is_null() => None,
        Kind::Enum(name) | Kind::OneofEnum(name) => Some(match v.as_str() {
            None => "0".into(),
            Some(n) => ampybus_proto::descriptor_pool()
                .get_enum_by_name(name)
                .and_then(|e| e.get_value_by_name(n))
                .unwrap_or_else(|| panic!("{name}.{n}"))
                .number()
                .to_string(),
        }),
        Kind::List => v.as_array().filter(|a| !a.is_empty()).map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
                .join(",")
        }),
        Kind::Num => {
            if v.is_null() {
                return None;
            }
            let scaled: i128 = s(&v["scaled"])
                .unwrap_or_else(|| "0".into())
                .parse()
                .unwrap();
            let scale = v["scale"].as_i64().unwrap_or(0);
            Some(decimal_text(scaled, scale))
        }
        Kind::Ts => v.as_str().map(|t| {
            let t = chrono::DateTime::parse_from_rfc3339(t).unwrap().to_utc();
            // PostgreSQL keeps microseconds (truncated).
            t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
        }),
    }
}

/// `scaled × 10^-scale` as PostgreSQL prints a numeric of display scale `scale`.
fn decimal_text(scaled: i128, scale: i64) -> String {
    if scale <= 0 {
        return (scaled * 10i128.pow((-scale) as u32)).to_string();
    }
    let neg = scaled < 0;
    let mut digits = scaled.unsigned_abs().to_string();
    while digits.len() <= scale as usize {
        digits.insert(0, '0');
    }
    let point = digits.len() - scale as usize;
    format!(
        "{}{}.{}",
        if neg { "-" } else { "" },
        &digits[..point],
        &digits[point..]
    )
}

/// A column as text the way [`expected`] writes it.
fn select_expr(col: &str, kind: Kind) -> String {
    match kind {
        Kind::Ts => {
            format!("to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        }
        _ => format!("{col}::text"),
    }
}

/// Publishes every golden envelope in one `pub --json-envelope` (a file of them all).
fn publish_goldens(dir: &Path) -> BTreeMap<String, Value> {
    let mut by_id = BTreeMap::new();
    let mut all = String::new();
    for f in golden_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let id = v["headers"]["message_id"].as_str().unwrap().to_owned();
        by_id.insert(id, v);
        all.push_str(&text);
        all.push('\n');
    }
    let file = dir.join("goldens.jsonl");
    std::fs::write(&file, all).unwrap();
    let o = ampybus_in(
        Some(&dir.join("log")),
        &["pub", "--json-envelope", file.to_str().unwrap()],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    by_id
}

#[test]
fn every_golden_payload_lands_in_envelopes_and_typed_tables() {
    let db = Db::shared();
    let tmp = tempfile::tempdir().unwrap();
    let goldens = publish_goldens(tmp.path());
    let dir = tmp.path().join("log");
    let dir = dir.as_path();
    // One payload that does not decode as its schema.
    let o = ampybus_in(
        Some(dir),
        &[
            "pub",
            "--topic",
            "ampy.prod.bars.v1.XNAS.MSFT",
            "--producer",
            "t@1",
            "--source",
            "t",
            "--pk",
            "XNAS.MSFT",
            "--schema",
            "ampy.bars.v1.BarBatch",
            "--payload-hex",
            "ffff",
            "--print-ids",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let bad_id = o.lines()[0].to_owned();
    let total = goldens.len() + 1;

    let o = ampybus_in(
        Some(dir),
        &[
            "archive",
            "--pattern",
            ">",
            "--to",
            &db.url,
            "--max",
            &total.to_string(),
            "--timeout",
            "60",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains(&format!(
            "archived {total} message(s): {total} new, 0 already archived"
        )),
        "{}",
        o.stderr
    );
    // The bad payload, and the golden whose Decimal scale (2147483647) numeric cannot hold.
    assert!(o.stderr.contains(", 2 undecodable"), "{}", o.stderr);

    // Envelopes: each message once, headers and payload as carried.
    assert_eq!(count(&db.url, "ampybus.envelopes"), total as i64);
    let rows = query(
        &db.url,
        "SELECT message_id, topic, env, domain, partition_key, headers, payload, payload_hash, decode_error, \
         headers::jsonb = (SELECT headers_json FROM ampybus.envelopes_json j WHERE j.message_id = e.message_id) \
         FROM ampybus.envelopes e",
    );
    for r in &rows {
        let id: &str = r.get(0);
        let payload: Vec<u8> = r.get(6);
        let hash: &str = r.get(7);
        assert_eq!(hash, ampybus::codec::sha256_tag(&payload));
        assert!(r.get::<_, bool>(9));
        if id == bad_id {
            assert_eq!(payload, [0xff, 0xff]);
            let err: &str = r.get(8);
            assert!(
                err.starts_with("decode_error: does not decode as ampy.bars.v1.BarBatch: "),
                "{err}"
            );
            continue;
        }
        let g = &goldens[id];
        assert_eq!(r.get::<_, &str>(1), g["topic"].as_str().unwrap());
        let topic: Vec<&str> = g["topic"].as_str().unwrap().split('.').collect();
        assert_eq!(
            (r.get::<_, &str>(2), r.get::<_, &str>(3)),
            (topic[1], topic[2])
        );
        assert_eq!(
            r.get::<_, Option<&str>>(4),
            g["headers"]["partition_key"].as_str()
        );
        let headers: BTreeMap<String, String> = serde_json::from_str(r.get(5)).unwrap();
        let want: BTreeMap<String, String> = serde_json::from_value(g["headers"].clone()).unwrap();
        assert_eq!(headers, want, "{id}");
        use base64::Engine as _;
        let want_payload = base64::engine::general_purpose::STANDARD
            .decode(g["payload_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(payload, want_payload, "{id}");
        let want_err = unrepresentable(g).map(|(table, col, scale)| {
            format!("decode_error: ampybus.{table}.{col}: decimal scale {scale} is outside numeric's range (-1000..=16383)")
        });
        assert_eq!(r.get::<_, Option<&str>>(8), want_err.as_deref(), "{id}");
    }

    // Typed rows: each checked against the decoded payload of the message it names; every
    // record present under its natural key, once.
    let mut checked = 0;
    // The decoded records of every golden with typed rows, once.
    let recs_of: BTreeMap<&String, Vec<(&'static str, Value)>> = goldens
        .iter()
        .filter(|(_, g)| {
            unrepresentable(g).is_none() && !g["topic"].as_str().unwrap().contains(".dlq.")
        })
        .filter_map(|(id, g)| {
            let pj = g.get("payload_json")?;
            let r = records(pj);
            Some((
                id,
                if r.is_empty() {
                    single_record(g, pj)
                } else {
                    r
                },
            ))
        })
        .collect();
    for (table, key, cols) in specs() {
        let exprs: Vec<String> = cols.iter().map(|(c, _, k)| select_expr(c, *k)).collect();
        let rows = query(
            &db.url,
            &format!(
                "SELECT message_id, idx, {} FROM ampybus.{table}",
                exprs.join(", ")
            ),
        );
        let mut keys_expected = HashSet::new();
        for (id, records) in &recs_of {
            for (i, (t, rec)) in records.iter().enumerate() {
                if *t != table {
                    continue;
                }
                let key_values: Vec<Option<String>> = key
                    .iter()
                    .map(|k| match *k {
                        "message_id" => Some((*id).clone()),
                        "idx" => Some(i.to_string()),
                        k => {
                            let (_, path, kind) = cols.iter().find(|(c, _, _)| *c == k).unwrap();
                            expected(rec, path, *kind)
                        }
                    })
                    .collect();
                keys_expected.insert(key_values);
            }
        }
        assert_eq!(rows.len(), keys_expected.len(), "rows of ampybus.{table}");
        for r in &rows {
            let id: &str = r.get(0);
            let idx: i32 = r.get(1);
            let (t, rec) = &recs_of[&id.to_owned()][idx as usize];
            assert_eq!(*t, table);
            for (j, (col, path, kind)) in cols.iter().enumerate() {
                let got: Option<String> = r.get(j + 2);
                assert_eq!(
                    got,
                    expected(rec, path, *kind),
                    "ampybus.{table}.{col} of {id}[{idx}]"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked}");
}

/// The first Decimal of a golden's payload that `numeric` cannot hold (scale outside
/// -1000..=16383), as (table, column, scale).
fn unrepresentable(g: &Value) -> Option<(&'static str, &'static str, i64)> {
    let pj = g.get("payload_json")?;
    let recs = if records(pj).is_empty() {
        single_record(g, pj)
    } else {
        records(pj)
    };
    for (table, rec) in recs {
        let (_, _, cols) = specs().into_iter().find(|(t, _, _)| *t == table)?;
        for (col, path, kind) in cols {
            if !matches!(kind, Kind::Num) {
                continue;
            }
            let mut v = &rec;
            for p in path.split('.') {
                v = v.get(p).unwrap_or(&Value::Null);
            }
            let scale = v["scale"].as_i64().unwrap_or(0);
            if !(-1000..=16383).contains(&scale) {
                return Some((table, col, scale));
            }
        }
    }
    None
}

/// A payload of one record (`OrderRequest`, `FillEvent`, `PositionSnapshot`).
fn single_record(g: &Value, pj: &Value) -> Vec<(&'static str, Value)> {
    let t = match g["headers"]["schema_fqdn"].as_str().unwrap() {
        "ampy.orders.v1.OrderRequest" => "orders",
        "ampy.fills.v1.FillEvent" => "fills",
        "ampy.positions.v1.PositionSnapshot" => "positions",
        _ => return Vec::new(),
    };
    vec![(t, pj.clone())]
}

/// Publishes `n` distinct one-bar `BarBatch` messages on `ampy.dev.bars.v1.…` (100 symbols,
/// one minute apart) from this process.
fn publish_bars(dir: &Path, n: usize) {
    use ampybus_proto::ampy::{
        bars::v1::{Bar, BarBatch},
        common::v1::{Decimal, SecurityId},
    };
    use prost::Message;
    archive_support::block(async {
        let bus = ampybus::Bus::connect(dir.to_str().unwrap()).await.unwrap();
        let base = 1_757_079_000i64;
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let mut batch = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let sym = format!("S{:03}", i % 100);
                let t = base + (i / 100) as i64 * 60;
                let bar = Bar {
                    security: Some(SecurityId {
                        symbol: sym.clone(),
                        mic: "XNAS".into(),
                        ..Default::default()
                    }),
                    start: Some(prost_types::Timestamp {
                        seconds: t,
                        nanos: 0,
                    }),
                    end: Some(prost_types::Timestamp {
                        seconds: t + 60,
                        nanos: 0,
                    }),
                    close: Some(Decimal {
                        scaled: 1_000_000 + i as i64,
                        scale: 4,
                    }),
                    volume: i as i64,
                    ..Default::default()
                };
                let topic = ampybus::Topic::parse(&format!("ampy.dev.bars.v1.XNAS.{sym}")).unwrap();
                let headers = ampybus::Headers::for_publish(
                    "ampy.bars.v1.BarBatch",
                    "t@1",
                    "t",
                    &format!("XNAS.{sym}"),
                );
                batch.push(ampybus::Envelope::new(
                    &topic,
                    headers,
                    BarBatch { bars: vec![bar] }.encode_to_vec(),
                ));
            }
            bus.publish_batch(batch).await.unwrap();
        }
        bus.close().await.unwrap();
    });
}

fn archive_cmd(dir: &Path, to: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ampybus"));
    c.arg("--url")
        .arg(dir)
        .args(["archive", "--pattern", "ampy.dev.bars.>", "--to", to])
        .args(extra)
        .env_remove("AMPYBUS_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

/// Waits until `cond` holds, polling the database (bounded: 120 s).
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed().as_secs() < 120,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn assert_each_bar_once(url: &str, n: i64) {
    assert_eq!(count(url, "ampybus.envelopes"), n);
    assert_eq!(count(url, "ampybus.bars"), n);
    assert_eq!(
        count(
            url,
            "ampybus.envelopes e JOIN ampybus.bars b ON b.message_id = e.message_id AND b.idx = 0"
        ),
        n
    );
    assert_eq!(
        count(url, "ampybus.envelopes WHERE decode_error IS NOT NULL"),
        0
    );
}

#[test]
fn kill_9_mid_run_then_restart_archives_each_message_once() {
    let n = (100_000.0 * scale()) as usize;
    let db = Db::shared();
    let dir = tempfile::tempdir().unwrap();
    publish_bars(dir.path(), n);
    let mut child = archive_cmd(
        dir.path(),
        &db.url,
        &["--batch", "1000", "--ack-deadline", "3"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // Kill it somewhere in the middle of the run.
    wait_until("a third archived", || {
        archive_support::try_count(&db.url, "ampybus.envelopes")
            .is_some_and(|c| c >= (n / 3) as i64)
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // A COMMIT the server had received still completes: wait until the dead archiver's
    // sessions are gone before counting.
    wait_until("the killed archiver's sessions to end", || {
        count(
            &db.url,
            &format!(
                "pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
                db.name
            ),
        ) == 0
    });
    let before = count(&db.url, "ampybus.envelopes");
    assert!(
        before < n as i64,
        "the archiver finished before it was killed ({before})"
    );

    // The dead archiver's leases lapse after its ack deadline (3 s); then the new one takes over.
    let o = archive_cmd(
        dir.path(),
        &db.url,
        &["--timeout", "6", "--ack-deadline", "3"],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert_each_bar_once(&db.url, n as i64);
    // The second run archived the rest: what it met again was skipped.
    let line = stderr.lines().find(|l| l.starts_with("archived ")).unwrap();
    let nums: Vec<i64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    // archived T message(s): NEW new, KNOWN already archived, ROWS typed row(s), 0 undecodable
    assert_eq!(nums[1], n as i64 - before, "{line}");
    assert_eq!(nums[0], nums[1] + nums[2], "{line}");
    assert_eq!(nums[4], 0, "{line}");
}

#[test]
fn postgres_restart_mid_run_loses_nothing() {
    let n = (20_000.0 * scale()) as usize;
    let server = OwnServer::start(None);
    let db = Db::on(&server.admin_url(), &format!("127.0.0.1:{}", server.port));
    let dir = tempfile::tempdir().unwrap();
    publish_bars(dir.path(), n);
    let mut child = archive_cmd(dir.path(), &db.url, &["--batch", "500", "--timeout", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    wait_until("some archived", || {
        archive_support::try_count(&db.url, "ampybus.envelopes").is_some_and(|n| n > 0)
    });
    server.pg_ctl_stop();
    // The archiver notices the outage and says it holds the batch.
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines.next().expect("archiver stderr ended").unwrap();
        seen.push(line.clone());
        if line.contains("cannot write; holding the batch and retrying") {
            break;
        }
    }
    server.pg_ctl_start();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{seen:?} {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("PostgreSQL is back")),
        "{rest:?}"
    );
    assert_each_bar_once(&db.url, n as i64);
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // Unreachable: a port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/x");
    let shown = format!("postgres://***@127.0.0.1:{port}/x");
    let o = ampybus_in(
        Some(dir.path()),
        &["archive", "--pattern", ">", "--to", &url, "--max", "1"],
    );
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stderr.starts_with(&format!(
            "error: --to \"{shown}\": transport error: PostgreSQL: connecting to {shown}: "
        )),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("Connection refused"), "{}", o.stderr);

    // Not a PostgreSQL URL.
    let o = ampybus_in(
        Some(dir.path()),
        &["archive", "migrate", "--to", "mysql://h/db"],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert_eq!(
        o.stderr.trim(),
        "error: --to \"mysql://h/db\": invalid configuration: archive URL \"mysql://h/db\": must start with postgres:// or postgresql://"
    );

    // A schema from a newer version.
    let db = Db::shared();
    let o = ampybus_in(None, &["archive", "migrate", "--to", &db.url]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("version 0 -> 2"), "{}", o.stderr);
    let o = ampybus_in(None, &["archive", "migrate", "--to", &db.url]);
    assert!(o.stderr.contains("at version 2 already"), "{}", o.stderr);
    query(
        &db.url,
        "INSERT INTO ampybus.schema_version (version, applied_by) VALUES (7, 'future')",
    );
    let o = ampybus_in(
        Some(dir.path()),
        &["archive", "--pattern", ">", "--to", &db.url, "--max", "1"],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert_eq!(
        o.stderr.trim(),
        format!(
            "error: --to \"{}\": invalid configuration: ampybus.schema_version: the archive schema in this database is version 7, newer than version 2 that this ampybus build knows; use a newer ampybus (nothing was changed)",
            db.url.replace("postgres@", "***@")
        )
    );
}

#[test]
fn wrong_password_is_a_configuration_error_without_the_password() {
    let server = OwnServer::start(Some("right-pw"));
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgres://postgres:wrong-pw@127.0.0.1:{}/postgres",
        server.port
    );
    let shown = format!("postgres://***@127.0.0.1:{}/postgres", server.port);
    let o = ampybus_in(
        Some(dir.path()),
        &["archive", "--pattern", ">", "--to", &url, "--max", "1"],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert_eq!(
        o.stderr.trim(),
        format!(
            "error: --to \"{shown}\": invalid configuration: PostgreSQL: connecting to {shown}: password authentication failed for user \"postgres\" (SQLSTATE 28P01)"
        )
    );
    assert!(!o.stderr.contains("wrong-pw"));
    // The right password works.
    let good = format!(
        "postgres://postgres:right-pw@127.0.0.1:{}/postgres",
        server.port
    );
    let o = ampybus_on(
        dir.path().to_str().unwrap(),
        &["archive", "migrate", "--to", &good],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
}

#[test]
fn sigterm_exits_0_and_sigint_130_with_everything_committed() {
    let dir = tempfile::tempdir().unwrap();
    publish_bars(dir.path(), 1000);
    for (signal, code, name) in [("-TERM", 0, "SIGTERM"), ("-INT", 130, "SIGINT")] {
        let db = Db::shared();
        let child = archive_cmd(dir.path(), &db.url, &["--durable", name])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_until("every message archived", || {
            archive_support::try_count(&db.url, "ampybus.envelopes") == Some(1000)
        });
        let st = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "archived 1000 message(s): 1000 new, 0 already archived, 1000 typed row(s), 0 undecodable; stopped by {name}"
            )),
            "{stderr}"
        );
        assert_each_bar_once(&db.url, 1000);
    }
}
