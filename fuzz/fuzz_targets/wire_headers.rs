//! Bytes → a topic, header pairs and a payload, as a transport would hand them over.
//!
//! Layout: `topic 0x1E name 0x1F value 0x1E name 0x1F value … 0x00 0x00 payload`. Names and
//! values are taken as lossy UTF-8 so that every input is used. Checks: nothing panics; a
//! parsed topic round-trips and matches itself as a pattern; publish-valid headers pass the
//! consume rules; `normalize_for_consume` is idempotent; a publish-valid envelope survives the
//! JSON form; `inflate_if_needed` with `content_encoding=gzip` never panics and never returns
//! more than the limit, and gzip → inflate round-trips.
#![no_main]

use ampybus::{Envelope, Headers, Topic, TopicPattern, codec};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let (head, payload) = match data.windows(2).position(|w| w == [0, 0]) {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut records = head.split('\u{1e}');
    let topic_str = records.next().unwrap_or_default();
    let mut headers = Headers::new();
    for rec in records {
        let (name, value) = rec.split_once('\u{1f}').unwrap_or((rec, ""));
        headers.set(name, value);
    }

    let topic = Topic::parse(topic_str);
    let pattern = TopicPattern::parse(topic_str);
    if let Ok(t) = &topic {
        assert_eq!(t.as_str(), topic_str);
        assert_eq!(
            Topic::parse(&t.to_string()).ok().as_ref(),
            Some(t),
            "topic display round trip"
        );
        let p = pattern.as_ref().expect("a valid topic is a valid pattern");
        assert!(p.is_literal() && p.matches(topic_str));
        let _ = (t.domain_prefix(), t.first_subtopic(), t.dlq_topic());
    }
    if let Ok(p) = &pattern {
        let _ = p.literal_prefix();
        let _ = p.matches(topic_str);
    }
    let topic =
        topic.unwrap_or_else(|_| Topic::parse("ampy.dev.news.v1.fuzz").expect("fixed topic"));

    let publish_ok = headers.validate_for_publish(&topic).is_ok();
    let mut consumed = headers.clone();
    let consume = consumed.normalize_for_consume();
    if publish_ok {
        assert!(
            consume.is_ok(),
            "publish-valid headers failed consume rules: {consume:?}"
        );
    }
    if consume.is_ok() {
        let once = consumed.clone();
        consumed
            .normalize_for_consume()
            .expect("normalised headers stay valid");
        assert_eq!(consumed, once, "normalize_for_consume is not idempotent");
        let _ = consumed.trace_context();
        let _ = consumed.produced_at_time();
    }
    if publish_ok {
        let env = Envelope::new(&topic, headers.clone(), payload.to_vec());
        let back = Envelope::from_json_str(&env.to_json_line(None)).expect("JSON form re-parses");
        assert_eq!(back, env);
    }

    let gz = Headers::new().with("content_encoding", "gzip");
    for bytes in [
        payload.to_vec(),
        [&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff][..], payload].concat(),
    ] {
        if let Ok(out) = codec::inflate_if_needed(&gz, &bytes, LIMIT) {
            assert!(out.len() <= LIMIT);
        }
    }
    let plain = codec::inflate_if_needed(&headers, payload, LIMIT);
    if headers
        .content_encoding()
        .is_none_or(|ce| !ce.eq_ignore_ascii_case("gzip"))
    {
        assert_eq!(
            plain.expect("non-gzip payloads pass through").as_ref(),
            payload
        );
    }
    if payload.len() <= 4096 {
        let z = codec::gzip(payload);
        assert_eq!(
            codec::inflate_if_needed(&gz, &z, LIMIT)
                .expect("gzip round trip")
                .as_ref(),
            payload
        );
    }
});
