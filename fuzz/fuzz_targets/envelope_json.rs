//! Bytes → UTF-8 → `Envelope::from_json_str`; when it parses: publish validation, consume
//! normalisation, the validator, and the JSON line round trip must give the same envelope.
#![no_main]

use ampybus::{Envelope, TopicPattern, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let verdict = validate::validate_envelope_json(text, None);
    let Ok(env) = Envelope::from_json_str(text) else {
        assert!(
            verdict.is_err(),
            "validator accepted what the parser refused"
        );
        return;
    };
    let published = env.validate_for_publish();
    if verdict.is_ok() {
        assert!(
            published.is_ok(),
            "validator accepted an envelope that fails validate_for_publish"
        );
    }
    if let Ok(topic) = &published {
        // A concrete topic is a literal pattern that matches itself.
        let pat = TopicPattern::parse(topic.as_str()).expect("a valid topic is a valid pattern");
        assert!(pat.matches(topic.as_str()));
        // Publish-valid headers are consume-valid, and normalising them is idempotent.
        let mut h = env.headers.clone();
        h.normalize_for_consume()
            .expect("publish-valid headers must pass consume rules");
        let once = h.clone();
        h.normalize_for_consume()
            .expect("normalised headers stay valid");
        assert_eq!(h, once, "normalize_for_consume is not idempotent");
    }
    let line = env.to_json_line(None);
    let back = Envelope::from_json_str(&line).expect("our own JSON line must re-parse");
    assert_eq!(back, env, "JSON line round trip changed the envelope");
    let pretty = env.to_json_pretty(None);
    assert_eq!(
        Envelope::from_json_str(&pretty).expect("pretty JSON re-parses"),
        env
    );
});
