//! Bytes → `Headers::decode_compact`: never panics; what decodes re-encodes to a form that
//! decodes to the same headers, and normalising for consume never panics either.
#![no_main]

use ampybus::Headers;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let buf = bytes::Bytes::copy_from_slice(data);
    let Ok(h) = Headers::decode_compact(&buf) else {
        return;
    };
    let mut out = Vec::new();
    h.encode_compact(&mut out);
    let back = Headers::decode_compact(&bytes::Bytes::from(out)).expect("our own encoding decodes");
    assert_eq!(back, h, "compact round trip changed the headers");
    let mut n = h.clone();
    let _ = n.normalize_for_consume();
});
