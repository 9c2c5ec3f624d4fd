//! gzip as the contract uses it (`content_encoding=gzip`): compress, and inflate with a limit
//! against gzip bombs. Needs nothing of the codec around it, so the envelope's JSON form can
//! inflate too.

use crate::error::{Error, Result};
use crate::headers::Headers;
use bytes::Bytes;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use std::io::{Read, Write};

/// Largest payload accepted after inflating (guards against gzip bombs): 64 MiB. The same
/// limit is the consumer runtime's default ([`ConsumerBuilder::max_payload_bytes`](crate::runtime::ConsumerBuilder::max_payload_bytes)), and
/// publish refuses a larger payload ([`PayloadCodec::encode`](crate::codec::PayloadCodec::encode)).
pub const DEFAULT_MAX_INFLATED: usize = 64 * 1024 * 1024;

/// Gzips bytes.
///
/// ```
/// let z = ampybus::codec::gzip(b"hello");
/// assert_eq!(&z[..2], &[0x1f, 0x8b]);
/// ```
pub fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::with_capacity(raw.len() / 4 + 64), Compression::fast());
    enc.write_all(raw).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// Inflates `payload` when `content_encoding=gzip` (case-insensitive), refusing output larger
/// than `max` bytes; otherwise returns the bytes unchanged.
///
/// ```
/// use ampybus::{Headers, codec};
/// let h = Headers::new().with("content_encoding", "gzip");
/// let raw = codec::inflate_if_needed(&h, &codec::gzip(b"abc"), 1024).unwrap();
/// assert_eq!(&raw[..], b"abc");
/// assert!(codec::inflate_if_needed(&h, b"not gzip", 1024).is_err());
/// ```
pub fn inflate_if_needed(headers: &Headers, payload: &[u8], max: usize) -> Result<Bytes> {
    match headers.content_encoding() {
        Some(ce) if ce.eq_ignore_ascii_case("gzip") => {
            let mut out = Vec::with_capacity(payload.len().saturating_mul(4).min(max));
            let mut dec = GzDecoder::new(payload).take(max as u64 + 1);
            dec.read_to_end(&mut out).map_err(|e| {
                Error::payload(format!(
                    "content_encoding=gzip but the payload does not inflate: {e}"
                ))
            })?;
            if out.len() > max {
                return Err(Error::payload(format!(
                    "payload inflates to more than {max} bytes"
                )));
            }
            Ok(Bytes::from(out))
        }
        _ => Ok(Bytes::copy_from_slice(payload)),
    }
}
