//! A compact binary form of a header map for storage: `u16` count, then per header a `u16`
//! name length, the name, a `u32` value length and the value (all little-endian, UTF-8).

use crate::error::{Error, Result};
use crate::headers::Headers;

/// Encodes headers into the stored form.
///
/// ```
/// let h = ampybus::Headers::new().with("a", "1");
/// let b = ampybus::transport::encode_headers(&h);
/// assert_eq!(ampybus::transport::decode_headers(&b).unwrap(), h);
/// ```
pub fn encode_headers(h: &Headers) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(h.iter().map(|(k, v)| k.len() + v.len() + 6).sum::<usize>() + 2);
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    for (k, v) in h.iter() {
        out.extend_from_slice(&(k.len() as u16).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// Decodes the stored form; never panics on malformed input. The text is copied once, into
/// one buffer the headers share.
///
/// ```
/// assert!(ampybus::transport::decode_headers(&[5, 0, 1]).is_err());
/// ```
pub fn decode_headers(b: &[u8]) -> Result<Headers> {
    // Checked whole first (framing and UTF-8), so the map is built only from a sound record.
    let mut pairs: Vec<(&[u8], &[u8])> = Vec::with_capacity(16);
    walk(b, |k, v| pairs.push((k, v)))?;
    Ok(Headers::from_wire_pairs(pairs))
}

/// Calls `f` with each `(name, value)` of a stored header record, after checking its
/// framing and UTF-8.
fn walk<'a>(b: &'a [u8], mut f: impl FnMut(&'a [u8], &'a [u8])) -> Result<()> {
    let bad = |what: &str| Error::envelope(format!("stored headers are corrupt: {what}"));
    let mut pos = 0usize;
    let mut take = |n: usize| -> Result<&'a [u8]> {
        let end = pos
            .checked_add(n)
            .filter(|e| *e <= b.len())
            .ok_or_else(|| bad("truncated"))?;
        let s = &b[pos..end];
        pos = end;
        Ok(s)
    };
    let count = u16::from_le_bytes(take(2)?.try_into().map_err(|_| bad("count"))?);
    for _ in 0..count {
        let kl = u16::from_le_bytes(take(2)?.try_into().map_err(|_| bad("name length"))?) as usize;
        let k = take(kl)?;
        if !k.is_ascii() {
            std::str::from_utf8(k).map_err(|_| bad("name is not UTF-8"))?;
        }
        let vl = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("value length"))?) as usize;
        let v = take(vl)?;
        if !v.is_ascii() {
            std::str::from_utf8(v).map_err(|_| bad("value is not UTF-8"))?;
        }
        f(k, v);
    }
    if pos != b.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(())
}
