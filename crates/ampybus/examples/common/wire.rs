//! The wire form of a message in the in-memory transports of the cost examples
//! (`runtime_cost`, `publish_cost`), the embedded log's row layout: topic length (u16 LE),
//! topic, compact headers length (u32 LE), compact headers ([`Headers::encode_compact`]),
//! payload. Included by each example with `#[path]`; not every example uses both halves.
#![allow(dead_code)]

use ampybus::{Envelope, Headers, Result};
use bytes::Bytes;

/// Encodes one envelope into its wire form.
pub fn encode(e: &Envelope) -> Bytes {
    let mut b = Vec::with_capacity(512 + e.payload.len());
    b.extend_from_slice(&(e.topic.len() as u16).to_le_bytes());
    b.extend_from_slice(e.topic.as_bytes());
    b.extend_from_slice(&[0; 4]);
    let at = b.len();
    e.headers.encode_compact(&mut b);
    let n = (b.len() - at) as u32;
    b[at - 4..at].copy_from_slice(&n.to_le_bytes());
    b.extend_from_slice(&e.payload);
    Bytes::from(b)
}

/// Decodes a wire message written by [`encode`] (header text and payload shared with `wire`).
pub fn decode(wire: &Bytes, names: &mut ampybus::envelope::TopicNames) -> Result<Envelope> {
    let bad = || ampybus::Error::new(ampybus::ErrorKind::Envelope, "damaged wire message");
    let tl = usize::from(u16::from_le_bytes(
        wire.get(..2)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ));
    let topic = names
        .get_utf8(wire.get(2..2 + tl).ok_or_else(bad)?)
        .map_err(|_| bad())?;
    let hl = u32::from_le_bytes(
        wire.get(2 + tl..6 + tl)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    let h_end = (6 + tl)
        .checked_add(hl)
        .filter(|&e| e <= wire.len())
        .ok_or_else(bad)?;
    let headers = Headers::decode_compact(&wire.slice(6 + tl..h_end))?;
    Ok(Envelope {
        topic,
        headers,
        payload: wire.slice(h_end..),
    })
}
