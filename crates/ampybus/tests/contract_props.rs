//! Property tests of the contract: topics and patterns, headers through the JSON form,
//! payload bytes through base64 and the codec, idempotent consume normalisation, and no panic
//! on any input.

use ampybus::codec::{self, COMPRESS_THRESHOLD, PayloadCodec};
use ampybus::ids::{self, TraceContext};
use ampybus::{Domain, Env, Envelope, Headers, Topic, TopicPattern, partition};
use proptest::prelude::*;
use proptest::test_runner::Config;
use std::collections::BTreeMap;

/// 256 cases, no regression files written next to the sources.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn env() -> impl Strategy<Value = Env> {
    prop::sample::select(Env::ALL.to_vec())
}

fn domain() -> impl Strategy<Value = Domain> {
    prop::sample::select(Domain::ALL.to_vec())
}

fn version() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 1u32..=9, 1 => 1u32..=999_999_999]
}

/// One subtopic token: anything but `.`, wildcards, whitespace and control characters.
fn sub_token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[A-Za-z0-9_@:|+-]{1,12}",
        1 => "[^.*>\\s\\p{Cc}]{1,6}",
    ]
}

fn topic_parts() -> impl Strategy<Value = (Env, Domain, u32, Vec<String>)> {
    (
        env(),
        domain(),
        version(),
        prop::collection::vec(sub_token(), 1..5),
    )
}

fn topic_string(parts: &(Env, Domain, u32, Vec<String>)) -> String {
    let (e, d, v, sub) = parts;
    format!("ampy.{e}.{d}.v{v}.{}", sub.join("."))
}

fn mic() -> impl Strategy<Value = String> {
    "[A-Z][A-Z0-9]{3}"
}

fn symbol() -> impl Strategy<Value = String> {
    "[A-Z]{1,5}(\\.[A-Z])?"
}

fn ident() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9_@-]{0,15}"
}

fn date() -> impl Strategy<Value = String> {
    (0i64..40_000).prop_map(|d| {
        (chrono::NaiveDate::from_ymd_opt(1990, 1, 1).unwrap() + chrono::Duration::days(d))
            .format("%Y-%m-%d")
            .to_string()
    })
}

/// A key of the right shape for `domain`, made with the crate's builders.
fn partition_key(domain: Domain) -> BoxedStrategy<String> {
    match domain {
        Domain::Bars => (symbol(), mic())
            .prop_map(|(s, m)| partition::bars(&s, &m))
            .boxed(),
        Domain::Ticks | Domain::CorporateActions => (symbol(), mic())
            .prop_map(|(s, m)| partition::ticks(&s, &m))
            .boxed(),
        Domain::Fx => ("[A-Z]{3,5}", "[A-Z0-9]{3,5}")
            .prop_map(|(b, q)| partition::fx(&b, &q))
            .boxed(),
        Domain::Fundamentals => (symbol(), mic(), date(), ident())
            .prop_map(|(s, m, d, src)| partition::fundamentals(&s, &m, &d, &src))
            .boxed(),
        Domain::Signals => (
            ident(),
            symbol(),
            mic(),
            prop::option::of("[0-9]{1,3}[dhm]"),
        )
            .prop_map(|(id, s, m, h)| partition::signals(&id, &s, &m, h.as_deref()))
            .boxed(),
        Domain::Fills => (ident(), ident())
            .prop_map(|(a, c)| partition::fills(&a, &c))
            .boxed(),
        Domain::Positions => (ident(), symbol(), mic())
            .prop_map(|(a, s, m)| partition::positions(&a, &s, &m))
            .boxed(),
        Domain::Metrics => (ident(), "[a-z][a-z_.]{0,20}")
            .prop_map(|(s, n)| partition::metrics(&s, &n))
            .boxed(),
        Domain::Orders => ident().boxed(),
        Domain::News | Domain::Universe | Domain::Dlq | Domain::Control => "[!-~]{1,40}".boxed(),
    }
}

fn uuid_v7() -> impl Strategy<Value = String> {
    any::<[u8; 16]>().prop_map(|mut b| {
        b[6] = 0x70 | (b[6] & 0x0f);
        b[8] = 0x80 | (b[8] & 0x3f);
        uuid::Uuid::from_bytes(b).hyphenated().to_string()
    })
}

fn canonical_time() -> impl Strategy<Value = String> {
    // 1970 .. 2200, with microseconds.
    (0i64..7_258_118_400, 0u32..1_000_000).prop_map(|(s, us)| {
        ids::format_time(chrono::DateTime::from_timestamp(s, us * 1000).unwrap())
    })
}

fn trace_context() -> impl Strategy<Value = TraceContext> {
    (1u128..=u128::MAX, 1u64..=u64::MAX, any::<u8>()).prop_map(|(t, s, f)| TraceContext {
        trace_id: format!("{t:032x}"),
        span_id: format!("{s:016x}"),
        flags: f,
    })
}

/// Printable text with no leading/trailing space (producer, source, run_id, …).
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[!-~]([ -~]{0,20}[!-~])?",
        "[^\\s\\p{Cc}]([^\\p{Cc}]{0,10}[^\\s\\p{Cc}])?",
    ]
}

fn fqdn() -> impl Strategy<Value = String> {
    "[a-z_][a-z0-9_]{0,8}(\\.[A-Za-z_][A-Za-z0-9_]{0,10}){1,4}"
}

fn semver() -> impl Strategy<Value = String> {
    "(0|[1-9][0-9]{0,3})\\.(0|[1-9][0-9]{0,3})\\.(0|[1-9][0-9]{0,3})(-[a-z0-9]{1,4}(\\.[a-z0-9]{1,4}){0,2})?(\\+[a-z0-9]{1,4})?"
}

/// Unknown headers: names the contract does not define, printable values (any Unicode but
/// control characters).
fn unknown_headers() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map("x-[a-z0-9_-]{1,20}", "[^\\p{Cc}]{0,30}", 0..6)
}

/// A topic plus headers that follow every publish rule for it, plus unknown headers.
fn valid_message() -> impl Strategy<Value = (Topic, Headers)> {
    (
        topic_parts(),
        uuid_v7(),
        fqdn(),
        semver(),
        prop::bool::ANY,
        canonical_time(),
        (text(), text(), text()),
        trace_context(),
        (prop::bool::ANY, prop::bool::ANY),
        unknown_headers(),
    )
        .prop_flat_map(
            |(
                parts,
                id,
                fqdn,
                ver,
                json,
                at,
                (producer, source, run),
                tc,
                (old_ids, gz),
                extra,
            )| {
                let topic = Topic::parse(&topic_string(&parts)).expect("generated topic");
                let key = partition_key(topic.domain());
                let mut h: Headers = extra.into_iter().collect();
                h.set("message_id", id);
                h.set("schema_fqdn", fqdn);
                h.set("schema_version", ver);
                h.set(
                    "content_type",
                    if json {
                        "application/json"
                    } else {
                        "application/x-protobuf"
                    },
                );
                h.set("produced_at", at);
                h.set("producer", producer);
                h.set("source", source);
                h.set("run_id", run);
                h.set("traceparent", tc.to_traceparent());
                if old_ids {
                    h.set("trace_id", tc.trace_id.clone());
                    h.set("span_id", tc.span_id.clone());
                }
                if gz {
                    h.set("content_encoding", "gzip");
                }
                key.prop_map(move |k| (topic.clone(), h.clone().with("partition_key", k)))
            },
        )
}

/// Header maps that mix well-formed, liberal and broken values for the names the rules look
/// at, so normalisation takes its interesting branches.
fn messy_headers() -> impl Strategy<Value = Headers> {
    let id = prop_oneof![
        uuid_v7(),
        uuid_v7().prop_map(|s| s.to_uppercase()),
        any::<[u8; 16]>().prop_map(|b| uuid::Uuid::from_bytes(b).simple().to_string()),
        any::<[u8; 16]>().prop_map(|b| format!(" {} ", uuid::Uuid::from_bytes(b).urn())),
        ".{0,40}",
    ];
    let time = prop_oneof![
        canonical_time(),
        (0i64..4_000_000_000, -50_000i32..50_000).prop_map(|(s, off)| {
            let off = chrono::FixedOffset::east_opt(off).unwrap();
            chrono::DateTime::from_timestamp(s, 0)
                .unwrap()
                .with_timezone(&off)
                .to_rfc3339()
        }),
        canonical_time().prop_map(|t| format!("  {t}\t")),
        ".{0,30}",
    ];
    let trace = prop_oneof![
        trace_context().prop_map(|t| t.to_traceparent()),
        "[0-9a-fA-F-]{0,60}",
        Just("00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_string()),
    ];
    let trace_id = prop_oneof!["[0-9a-fA-F]{32}", Just("0".repeat(32)), ".{0,34}"];
    let span_id = prop_oneof!["[0-9a-fA-F]{16}", Just("0".repeat(16)), ".{0,18}"];
    let plain = || prop_oneof![text(), ".{0,12}", Just(String::new())];
    (
        (
            prop::option::weighted(0.95, id),
            prop::option::weighted(0.95, time),
            prop::option::weighted(0.5, trace),
            prop::option::weighted(0.5, trace_id),
            prop::option::weighted(0.5, span_id),
        ),
        prop::collection::vec(prop::option::weighted(0.95, plain()), 7),
        prop::option::of(prop_oneof![
            Just("gzip".to_string()),
            Just("GZIP".to_string()),
            Just("identity".to_string()),
            Just(String::new()),
            ".{0,8}"
        ]),
        prop::option::of(prop_oneof![
            "[0-9]{1,12}",
            " [0-9]{1,3} ",
            "-[0-9]{1,3}",
            ".{0,5}"
        ]),
        prop::collection::btree_map(".{0,10}", ".{0,10}", 0..4),
    )
        .prop_map(|((id, at, tp, tid, sid), rest, ce, retry, extra)| {
            let mut h: Headers = extra.into_iter().collect();
            let named = [
                ("message_id", id),
                ("produced_at", at),
                ("traceparent", tp),
                ("trace_id", tid),
                ("span_id", sid),
                ("content_encoding", ce),
                ("retry_count", retry),
            ];
            let others = [
                "schema_fqdn",
                "schema_version",
                "content_type",
                "producer",
                "source",
                "run_id",
                "partition_key",
            ];
            for (name, v) in named.into_iter().chain(others.into_iter().zip(rest)) {
                match v {
                    Some(v) => h.set(name, v),
                    None => h.remove(name),
                };
            }
            h
        })
}

/// Strings that look a lot like topics and patterns: taxonomy words, wildcards, empty tokens,
/// spaces and odd characters joined by dots.
fn topicish() -> impl Strategy<Value = String> {
    let tok = prop_oneof![
        Just("ampy".to_string()),
        prop::sample::select(vec![
            "dev",
            "paper",
            "prod",
            "bars",
            "fx",
            "corporate_actions"
        ])
        .prop_map(str::to_owned),
        "v[0-9]{0,11}",
        Just("*".to_string()),
        Just(">".to_string()),
        Just(String::new()),
        ".{0,4}",
        "[a-zA-Z0-9 *>]{1,4}",
    ];
    prop_oneof![
        prop::collection::vec(tok, 0..9).prop_map(|t| t.join(".")),
        ".{0,60}",
        // Long, multi-byte strings around the length limit.
        ("[a-zé€😀]{1,4}", 100usize..200)
            .prop_map(|(s, n)| format!("ampy.dev.news.v1.{}", s.repeat(n))),
    ]
}

/// JSON texts shaped like envelopes, with wrong types, odd keys and broken base64.
fn jsonish() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)),
        ".{0,20}".prop_map(serde_json::Value::from),
        "[A-Za-z0-9+/=]{0,24}".prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    let key = prop_oneof![
        prop::sample::select(vec!["topic", "headers", "payload_base64", "payload_json"])
            .prop_map(str::to_owned),
        ".{0,10}",
    ];
    prop_oneof![
        prop::collection::btree_map(key, value.clone(), 0..5)
            .prop_map(|m| { serde_json::Value::Object(m.into_iter().collect()).to_string() }),
        value.prop_map(|v| v.to_string()),
        ".{0,80}",
    ]
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

// ---------------------------------------------------------------------------------------------
// Topics and patterns
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn valid_topics_parse_and_round_trip(parts in topic_parts()) {
        let s = topic_string(&parts);
        let t = Topic::parse(&s).unwrap();
        prop_assert_eq!(t.to_string(), s.clone());
        prop_assert_eq!(t.as_str(), s.as_str());
        prop_assert_eq!(t.env(), parts.0);
        prop_assert_eq!(t.domain(), parts.1);
        prop_assert_eq!(t.version(), parts.2);
        prop_assert_eq!(t.subtopic(), parts.3.join("."));
        prop_assert_eq!(t.first_subtopic(), parts.3[0].as_str());
        prop_assert_eq!(t.domain_prefix(), format!("ampy.{}.{}.v{}", parts.0, parts.1, parts.2));
        prop_assert_eq!(Topic::new(parts.0, parts.1, parts.2, &parts.3.join(".")).unwrap(), t.clone());
        prop_assert_eq!(s.parse::<Topic>().unwrap(), t.clone());
        let lit = TopicPattern::parse(&s).unwrap();
        prop_assert!(lit.is_literal());
        prop_assert!(lit.matches(&s));
        prop_assert_eq!(lit.literal_prefix(), s);
        let dlq = t.dlq_topic();
        prop_assert_eq!(Topic::parse(dlq.as_str()).unwrap(), dlq);
    }

    #[test]
    fn patterns_built_from_a_topic_match_it(
        parts in topic_parts(),
        stars in prop::collection::vec(prop::bool::weighted(0.3), 9),
        tail in prop::option::of(any::<prop::sample::Index>()),
        change in any::<prop::sample::Index>(),
    ) {
        let s = topic_string(&parts);
        let toks: Vec<&str> = s.split('.').collect();
        // Replace some tokens with `*`, and perhaps a tail (at least one token) with `>`.
        let keep = tail.map_or(toks.len(), |i| i.index(toks.len()));
        let mut pat: Vec<String> = toks[..keep]
            .iter()
            .zip(&stars)
            .map(|(t, star)| if *star { "*".to_string() } else { (*t).to_string() })
            .collect();
        if keep < toks.len() {
            pat.push(">".into());
        }
        let p_str = pat.join(".");
        let p = TopicPattern::parse(&p_str).unwrap();
        prop_assert!(p.matches(&s), "{} does not match {}", p_str, s);
        prop_assert_eq!(p.is_literal(), !p_str.contains(['*', '>']));

        // Change one literal token (not `ampy`) to a different valid literal: no match.
        let literal: Vec<usize> = (1..pat.len()).filter(|&i| pat[i] != "*" && pat[i] != ">").collect();
        if !literal.is_empty() {
            let i = literal[change.index(literal.len())];
            let other = match i {
                1 => Env::ALL.iter().find(|e| e.as_str() != pat[1]).unwrap().to_string(),
                2 => Domain::ALL.iter().find(|d| d.as_str() != pat[2]).unwrap().to_string(),
                3 => if parts.2 == 1 { "v2".to_string() } else { "v1".to_string() },
                _ => format!("{}x", pat[i]),
            };
            let mut changed = pat.clone();
            changed[i] = other;
            let c_str = changed.join(".");
            let c = TopicPattern::parse(&c_str).unwrap();
            prop_assert!(!c.matches(&s), "{} matches {}", c_str, s);
        }
        // A pattern one token longer (without `>`) does not match.
        if !p_str.ends_with('>') {
            let longer = TopicPattern::parse(&format!("{p_str}.*")).unwrap();
            prop_assert!(!longer.matches(&s));
        }
    }

    #[test]
    fn topic_and_pattern_parsing_never_panic(s in topicish()) {
        let t = Topic::parse(&s);
        let p = TopicPattern::parse(&s);
        if let Ok(t) = &t {
            prop_assert_eq!(t.as_str(), s.as_str());
            prop_assert!(p.as_ref().is_ok_and(|p| p.matches(&s)));
        }
        if let Ok(p) = &p {
            let _ = p.literal_prefix();
            let _ = p.matches(&s);
            prop_assert_eq!(p.as_str(), s.as_str());
        }
        if let Err(e) = &t {
            prop_assert_eq!(e.kind(), ampybus::ErrorKind::Topic);
        }
    }

    #[test]
    fn arbitrary_strings_never_panic(s in ".{0,100}", bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let lossy = String::from_utf8_lossy(&bytes).into_owned();
        for input in [&s, &lossy] {
            let _ = Topic::parse(input);
            let _ = TopicPattern::parse(input);
            let _ = Envelope::from_json_str(input);
            let _ = ampybus::validate::validate_envelope_json(input, None);
            let _ = input.parse::<Env>();
            let _ = input.parse::<Domain>();
            let _ = TraceContext::parse(input);
            let _ = ids::parse_time(input);
            let _ = ids::is_canonical_time(input);
            for d in Domain::ALL {
                let _ = partition::check_key(*d, input);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Headers and the JSON form
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn valid_headers_survive_the_json_form_and_validate((topic, headers) in valid_message(), payload in prop::collection::vec(any::<u8>(), 0..64)) {
        // Generated with content_encoding=gzip sometimes: carry real gzip bytes then.
        let wire = if headers.content_encoding().is_some() { codec::gzip(&payload) } else { payload.clone() };
        let env = Envelope::new(&topic, headers.clone(), wire);
        prop_assert_eq!(env.validate_for_publish().map_err(|e| e.to_string()), Ok(topic.clone()));
        let line = env.to_json_line(None);
        prop_assert!(!line.contains('\n'));
        let back = Envelope::from_json_str(&line).unwrap();
        prop_assert_eq!(back.headers.to_map(), headers.to_map());
        prop_assert_eq!(&back, &env);
        let pretty = Envelope::from_json_str(&env.to_json_pretty(None)).unwrap();
        prop_assert_eq!(&pretty, &env);
        let validated = ampybus::validate::validate_envelope_json(&line, None);
        prop_assert_eq!(validated.map_err(|e| e.to_string()), Ok(env.clone()));
        // What is strict enough to publish passes the liberal consume rules unchanged...
        let mut consumed = headers.clone();
        consumed.normalize_for_consume().unwrap();
        prop_assert_eq!(consumed.to_map(), headers.to_map());
        // ...and the JSON value form agrees with the line.
        let j: ampybus::EnvelopeJson = serde_json::from_str(&line).unwrap();
        prop_assert_eq!(j.headers, headers.to_map());
        prop_assert_eq!(j.topic, topic.to_string());
    }

    #[test]
    fn one_broken_required_header_fails_publish((topic, headers) in valid_message(), which in 0usize..9) {
        let name = ampybus::headers::names::REQUIRED[which];
        let mut missing = headers.clone();
        missing.remove(name);
        let e = missing.validate_for_publish(&topic).unwrap_err();
        prop_assert_eq!(e.kind(), ampybus::ErrorKind::Header);
        let want = format!("`{name}`");
        prop_assert!(e.message().contains(&want), "{}", e);
        let mut newline = headers;
        let v = format!("{}\n", newline.get(name).unwrap());
        newline.set(name, v);
        let e = newline.validate_for_publish(&topic).unwrap_err();
        prop_assert!(e.message().contains("CR, LF or NUL"), "{}", e);
    }

    #[test]
    fn normalize_for_consume_is_idempotent(mut h in messy_headers()) {
        let before = h.clone();
        match h.normalize_for_consume() {
            Ok(()) => {
                let once = h.clone();
                h.normalize_for_consume().unwrap();
                prop_assert_eq!(h.to_map(), once.to_map());
                // Normalised ids and times are in the emitted forms.
                let id = h.message_id().unwrap();
                prop_assert_eq!(id, uuid::Uuid::parse_str(id).unwrap().hyphenated().to_string());
                prop_assert!(ids::is_canonical_time(h.produced_at().unwrap()), "{:?}", h.produced_at());
                // Unknown headers are carried through untouched.
                for (k, v) in before.iter() {
                    if !["message_id", "produced_at", "traceparent", "trace_id"].contains(&k) {
                        prop_assert_eq!(h.get(k), Some(v));
                    }
                }
            }
            Err(e) => prop_assert_eq!(e.kind(), ampybus::ErrorKind::Header),
        }
    }

    #[test]
    fn arbitrary_header_maps_never_panic(
        m in prop::collection::btree_map(".{0,16}", ".{0,40}", 0..12),
        t in topicish(),
    ) {
        let mut h = Headers::from(m);
        let topic = Topic::parse(&t).unwrap_or_else(|_| Topic::parse("ampy.dev.news.v1.x").unwrap());
        let _ = h.validate_for_publish(&topic);
        let _ = h.trace_context();
        let _ = h.retry_count();
        let _ = h.produced_at_time();
        if h.normalize_for_consume().is_ok() {
            let once = h.clone();
            h.normalize_for_consume().unwrap();
            prop_assert_eq!(h, once);
        }
    }

    #[test]
    fn json_shaped_input_never_panics(s in jsonish()) {
        if let Ok(env) = Envelope::from_json_str(&s) {
            let back = Envelope::from_json_str(&env.to_json_line(None)).unwrap();
            prop_assert_eq!(back, env.clone());
            let _ = env.validate_for_publish();
            let mut h = env.headers.clone();
            let _ = h.normalize_for_consume();
        }
        let _ = ampybus::validate::validate_envelope_json(&s, None);
    }
}

// ---------------------------------------------------------------------------------------------
// Payload bytes
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn payload_bytes_round_trip_through_base64_and_codec(payload in prop::collection::vec(any::<u8>(), 0..2048)) {
        let topic = Topic::parse("ampy.dev.news.v1.raw").unwrap();
        let env = Envelope::new(&topic, Headers::new(), payload.clone());
        let back = Envelope::from_json_str(&env.to_json_line(None)).unwrap();
        prop_assert_eq!(&back.payload[..], &payload[..]);

        let codec = PayloadCodec::default();
        let mut h = Headers::new();
        let wire = block_on(codec.encode(&mut h, payload.clone().into(), "news")).unwrap();
        prop_assert_eq!(h.content_encoding(), None);
        prop_assert_eq!(&wire[..], &payload[..]);
        let raw = block_on(codec.decode(&h, &wire)).unwrap();
        prop_assert_eq!(&raw[..], &payload[..]);

        // Gzip with a small threshold: still round-trips.
        let small = PayloadCodec { compress_threshold: 16, ..PayloadCodec::default() };
        let mut h = Headers::new();
        let wire = block_on(small.encode(&mut h, payload.clone().into(), "news")).unwrap();
        prop_assert_eq!(h.content_encoding().is_some(), payload.len() > 16);
        prop_assert_eq!(&block_on(small.decode(&h, &wire)).unwrap()[..], &payload[..]);
        let via_json = Envelope::from_json_str(&Envelope::new(&topic, h.clone(), wire).to_json_line(None)).unwrap();
        prop_assert_eq!(&block_on(small.decode(&h, &via_json.payload)).unwrap()[..], &payload[..]);
    }
}

proptest! {
    // Payloads of ~128 KiB: few cases, cheap contents.
    #![proptest_config(config(12))]

    #[test]
    fn payloads_around_the_gzip_threshold(delta in -3i64..=3, seed in any::<u64>(), noisy in any::<bool>()) {
        let len = (COMPRESS_THRESHOLD as i64 + delta) as usize;
        let mut x = seed | 1;
        let payload: Vec<u8> = (0..len)
            .map(|i| {
                if noisy {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                } else {
                    (i % 251) as u8 ^ seed as u8
                }
            })
            .collect();
        let codec = PayloadCodec::default();
        let mut h = Headers::new();
        let wire = block_on(codec.encode(&mut h, payload.clone().into(), "bars")).unwrap();
        prop_assert_eq!(h.content_encoding() == Some("gzip"), len > COMPRESS_THRESHOLD);
        prop_assert_eq!(&block_on(codec.decode(&h, &wire)).unwrap()[..], &payload[..]);
        let topic = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
        let env = Envelope::new(&topic, h.clone(), wire.clone());
        let back = Envelope::from_json_str(&env.to_json_line(None)).unwrap();
        prop_assert_eq!(&back.payload, &wire);
        let inflated = codec::inflate_if_needed(&back.headers, &back.payload, codec::DEFAULT_MAX_INFLATED).unwrap();
        prop_assert_eq!(&inflated[..], &payload[..]);
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed regressions and edge cases
// ---------------------------------------------------------------------------------------------

#[test]
fn multibyte_text_at_the_length_limits_does_not_panic() {
    // `show` cuts values to 80 characters; the topic limit is in bytes.
    let long = format!("ampy.dev.news.v1.{}", "é".repeat(300));
    assert!(Topic::parse(&long).is_err());
    assert!(TopicPattern::parse(&long).is_err());
    let at_limit = format!("ampy.dev.news.v1.{}", "a".repeat(512 - 17));
    assert_eq!(at_limit.len(), 512);
    Topic::parse(&at_limit).unwrap();
    assert!(Topic::parse(&format!("{at_limit}b")).is_err());
    let mut h = Headers::new().with("produced_at", "😀".repeat(100));
    assert!(h.normalize_for_consume().is_err());
}

fn consumable(produced_at: &str) -> Headers {
    Headers::new()
        .with("message_id", "019a6b3c-1d2e-7f00-8a00-0123456789ab")
        .with("schema_fqdn", "ampy.news.v1.NewsBatch")
        .with("schema_version", "1.0.0")
        .with("content_type", "application/x-protobuf")
        .with("produced_at", produced_at)
        .with("producer", "p")
        .with("source", "s")
        .with("run_id", "r")
        .with("partition_key", "k")
}

#[test]
fn produced_at_inside_years_0000_to_9999_normalises_idempotently() {
    for t in [
        "0000-01-01T00:00:00Z",
        "0000-01-01T00:00:00-01:00",
        "9999-12-31T23:59:59.999999Z",
        "9999-12-31T23:59:59+01:00",
    ] {
        let mut h = consumable(t);
        h.normalize_for_consume().unwrap();
        let once = h.clone();
        h.normalize_for_consume().unwrap();
        assert_eq!(h, once, "{t}");
    }
}

/// Found while writing the idempotency property: an RFC3339 time whose offset moves it out
/// of years 0000–9999 in UTC is accepted by `normalize_for_consume` and rewritten to a form
/// (`-0001-12-31T23:00:00.000000Z`, `+10000-01-01T00:59:59.000000Z`) that the next
/// normalisation (e.g. after a DLQ redrive) rejects. Fixed: such times are refused on
/// consume (`ids::parse_time` only accepts UTC years 0000–9999).
#[test]
fn produced_at_out_of_range_after_offset_normalises_idempotently() {
    for t in ["0000-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"] {
        let err = consumable(t).normalize_for_consume().unwrap_err();
        assert!(err.to_string().contains("`produced_at`"), "{t}: {err}");
        let mut h = consumable(t);
        if h.normalize_for_consume().is_ok() {
            let once = h.clone();
            let again = h.normalize_for_consume();
            assert!(again.is_ok(), "{t} -> {:?}: {again:?}", once.produced_at());
            assert_eq!(h, once, "{t}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The compact header form (what the embedded log stores) from arbitrary bytes
// ---------------------------------------------------------------------------------------------

/// A valid compact form to mutate: generated publish headers (binary id, time and trace
/// context) with an extension header.
fn compact_seed() -> Vec<u8> {
    let h = Headers::for_publish("ampy.bars.v1.BarBatch", "p@1", "p", "XNAS.AAPL")
        .with("x-desk", "rates")
        .with("dedupe_key", "co_1");
    let mut buf = Vec::new();
    h.encode_compact(&mut buf);
    buf
}

/// What must hold for whatever `decode_compact` accepts: every value reads as text (the
/// lazily written ones included), the map re-encodes to a form that decodes to the same
/// map, and the consume rules run without a panic.
fn check_decoded(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(h) = Headers::decode_compact(&bytes::Bytes::copy_from_slice(bytes)) {
        let text: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut again = Vec::new();
        h.encode_compact(&mut again);
        let back = Headers::decode_compact(&bytes::Bytes::from(again)).unwrap();
        prop_assert_eq!(&back, &h);
        let back_text: Vec<(String, String)> = back
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        prop_assert_eq!(back_text, text);
        let mut n = h.clone();
        let _ = n.normalize_for_consume();
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn compact_headers_from_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut with_format = vec![0xA1];
        with_format.extend_from_slice(&bytes);
        check_decoded(&bytes)?;
        check_decoded(&with_format)?;
    }

    #[test]
    fn compact_headers_mutated(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6)) {
        let mut b = compact_seed();
        for (at, byte, how) in edits {
            if b.is_empty() {
                break;
            }
            let i = at.index(b.len());
            match how {
                0 => b[i] = byte,
                1 => b.insert(i, byte),
                _ => {
                    b.remove(i);
                }
            }
        }
        check_decoded(&b)?;
    }
}
