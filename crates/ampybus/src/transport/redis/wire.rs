//! The wire form of an entry, entry ids and stream keys.

use crate::envelope::{Envelope, TopicName};
use crate::error::{Error, ErrorKind, Result};
use crate::headers::Headers;
use crate::topic::TopicPattern;
pub(crate) use crate::transport::naming::{stream_may_match, stream_of};
use bytes::Bytes;
use chrono::{DateTime, Utc};

/// Field holding the full topic.
pub(crate) const TOPIC_FIELD: &str = "topic";
/// Field holding the payload bytes.
pub(crate) const PAYLOAD_FIELD: &str = "payload";

/// Bits of the packed sequence given to the id's sequence part.
const SEQ_BITS: u32 = 20;

/// Packs an entry id `ms-seq` into one `u64`: `ms << 20 | seq` (a sequence part at or above
/// 2^20 — a million entries in one millisecond of one stream — is clamped). Packed ids order
/// like the ids, and like store times across streams.
///
/// ```
/// use ampybus::transport::redis::{pack_id, unpack_id};
/// let s = pack_id("1700000000123-7").unwrap();
/// assert_eq!(unpack_id(s), "1700000000123-7");
/// assert!(pack_id("1700000000123-8").unwrap() > s);
/// assert!(pack_id("nonsense").is_none());
/// ```
pub fn pack_id(id: &str) -> Option<u64> {
    let (ms, seq) = id.split_once('-')?;
    let ms: u64 = ms.parse().ok()?;
    let seq: u64 = seq.parse().ok()?;
    if ms >= (1u64 << (64 - SEQ_BITS)) {
        return None;
    }
    Some((ms << SEQ_BITS) | seq.min((1u64 << SEQ_BITS) - 1))
}

/// The entry id `ms-seq` of a packed sequence (see [`pack_id`]).
///
/// ```
/// assert_eq!(ampybus::transport::redis::unpack_id(5 << 20 | 2), "5-2");
/// ```
pub fn unpack_id(seq: u64) -> String {
    format!("{}-{}", seq >> SEQ_BITS, seq & ((1u64 << SEQ_BITS) - 1))
}

/// The store time of an entry id (its millisecond part).
pub(crate) fn id_time(id: &str) -> DateTime<Utc> {
    let ms = id
        .split_once('-')
        .and_then(|(ms, _)| ms.parse::<i64>().ok())
        .unwrap_or(0);
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The first millisecond at or after `t` (store times are whole milliseconds).
pub(crate) use crate::transport::multi::ceil_ms;

fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "*?[]\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The `SCAN MATCH` glob of the stream keys `pattern` may span.
pub(crate) fn stream_glob(prefix: &str, pattern: &TopicPattern) -> String {
    let mut out = glob_escape(prefix);
    for (i, tok) in pattern.as_str().split('.').take(4).enumerate() {
        if i > 0 {
            out.push('.');
        }
        match tok {
            ">" => {
                out.push('*');
                return out;
            }
            "*" => out.push('*'),
            t => out.push_str(&glob_escape(t)),
        }
    }
    out
}

/// One stream entry as read.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) id: String,
    /// `None` for an entry deleted while pending.
    pub(crate) fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

fn bytes_of(v: &redis::Value) -> Option<Vec<u8>> {
    match v {
        redis::Value::BulkString(b) => Some(b.clone()),
        redis::Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        redis::Value::Int(i) => Some(i.to_string().into_bytes()),
        redis::Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

pub(crate) fn string_of(v: &redis::Value) -> Option<String> {
    bytes_of(v).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Entries of an `XRANGE` / `XAUTOCLAIM` reply array: `[[id, [f, v, …]], …]`.
pub(crate) fn parse_entries(v: &redis::Value) -> Vec<Entry> {
    let redis::Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for it in items {
        let redis::Value::Array(pair) = it else {
            continue;
        };
        let Some(id) = pair.first().and_then(string_of) else {
            continue;
        };
        let fields = match pair.get(1) {
            Some(redis::Value::Array(fv)) => Some(
                fv.chunks(2)
                    .filter_map(|c| Some((bytes_of(c.first()?)?, bytes_of(c.get(1)?)?)))
                    .collect(),
            ),
            Some(redis::Value::Map(m)) => Some(
                m.iter()
                    .filter_map(|(k, v)| Some((bytes_of(k)?, bytes_of(v)?)))
                    .collect(),
            ),
            _ => None,
        };
        out.push(Entry { id, fields });
    }
    out
}

/// Entries per stream key of an `XREAD` / `XREADGROUP` reply (`nil` when none).
pub(crate) fn parse_read_reply(v: &redis::Value) -> Vec<(String, Vec<Entry>)> {
    match v {
        redis::Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                redis::Value::Array(kv) => {
                    Some((string_of(kv.first()?)?, parse_entries(kv.get(1)?)))
                }
                _ => None,
            })
            .collect(),
        redis::Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((string_of(k)?, parse_entries(v))))
            .collect(),
        _ => Vec::new(),
    }
}

/// An entry's envelope: `topic` (one shared name per topic from `names`), headers, `payload`.
/// `None` without a `topic` field.
pub(crate) fn to_envelope(
    fields: &[(Vec<u8>, Vec<u8>)],
    names: &mut crate::envelope::TopicNames,
) -> Option<Envelope> {
    let mut topic = None;
    let mut payload = Bytes::new();
    for (k, v) in fields {
        match k.as_slice() {
            b"topic" => {
                topic = Some(
                    names
                        .get_utf8(v)
                        .unwrap_or_else(|_| TopicName::from(&*String::from_utf8_lossy(v))),
                )
            }
            b"payload" => payload = Bytes::copy_from_slice(v),
            _ => {}
        }
    }
    let headers = Headers::from_wire_pairs(
        fields
            .iter()
            .filter(|(k, _)| k.as_slice() != b"topic" && k.as_slice() != b"payload")
            .map(|(k, v)| (k.as_slice(), v.as_slice())),
    );
    Some(Envelope {
        topic: topic?,
        headers,
        payload,
    })
}

/// The packed id ([`pack_id`]) of an entry id as a reply value, read in place.
pub(crate) fn pack_id_value(v: &redis::Value) -> Option<u64> {
    match v {
        redis::Value::BulkString(b) => pack_id(std::str::from_utf8(b).ok()?),
        redis::Value::SimpleString(s) => pack_id(s),
        _ => None,
    }
}

/// `XADD key MINID ~ minid *` with room for an envelope's fields ([`add_fields`]): its
/// argument list and data buffer are allocated once.
pub(crate) fn xadd(key: &str, minid: &str, env: &Envelope) -> redis::Cmd {
    // 6 arguments before the fields, topic and payload (4), 2 per header; header text is
    // rarely over 1 KiB (the buffer grows if it is).
    let data = key.len() + minid.len() + 24 + env.topic.len() + env.payload.len() + 1024;
    let mut cmd = redis::Cmd::with_capacity(10 + 2 * 24, data);
    cmd.arg("XADD")
        .arg(key)
        .arg("MINID")
        .arg("~")
        .arg(minid)
        .arg("*");
    cmd
}

/// Appends `topic T h1 v1 … payload P` to an `XADD` command.
pub(crate) fn add_fields(cmd: &mut redis::Cmd, env: &Envelope) -> Result<()> {
    cmd.arg(TOPIC_FIELD).arg(env.topic.as_str());
    for (k, v) in env.headers.iter() {
        if k == TOPIC_FIELD || k == PAYLOAD_FIELD {
            return Err(Error::new(
                ErrorKind::Header,
                format!("`{k}`: this name is reserved on Redis (the entry's own `{k}` field)"),
            ));
        }
        cmd.arg(k).arg(v);
    }
    cmd.arg(PAYLOAD_FIELD).arg(env.payload.as_ref());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TopicPattern {
        TopicPattern::parse(s).unwrap()
    }

    #[test]
    fn globs_and_matching() {
        assert_eq!(stream_glob("", &p("ampy.dev.>")), "ampy.dev.*");
        assert_eq!(
            stream_glob("t:", &p("ampy.*.bars.v1.>")),
            "t:ampy.*.bars.v1"
        );
        assert_eq!(stream_glob("", &p(">")), "*");
    }

    #[test]
    fn reply_ids_and_xadd() {
        let id = redis::Value::BulkString(b"1700000000123-7".to_vec());
        assert_eq!(pack_id_value(&id), pack_id("1700000000123-7"));
        let id = redis::Value::SimpleString("5-2".into());
        assert_eq!(pack_id_value(&id), Some(5 << 20 | 2));
        assert_eq!(pack_id_value(&redis::Value::Nil), None);
        assert_eq!(
            pack_id_value(&redis::Value::BulkString(b"x".to_vec())),
            None
        );
        let topic = crate::Topic::parse("ampy.dev.bars.v1.XNAS").unwrap();
        let h = Headers::new().with("x-desk", "rates");
        let env = Envelope::new(&topic, h, b"p".to_vec());
        let mut cmd = xadd("k", "0-0", &env);
        add_fields(&mut cmd, &env).unwrap();
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let want: Vec<&[u8]> = vec![
            &b"XADD"[..],
            b"k",
            b"MINID",
            b"~",
            b"0-0",
            b"*",
            b"topic",
            b"ampy.dev.bars.v1.XNAS",
            b"x-desk",
            b"rates",
            b"payload",
            b"p",
        ];
        assert_eq!(args, want);
    }

    #[test]
    fn ids() {
        assert_eq!(pack_id("0-0"), Some(0));
        assert_eq!(unpack_id(pack_id("12-3").unwrap()), "12-3");
        let t = DateTime::from_timestamp_millis(1500).unwrap();
        assert_eq!(ceil_ms(t), 1500);
        assert_eq!(ceil_ms(t + chrono::Duration::microseconds(1)), 1501);
        assert_eq!(id_time("1500-9"), t);
    }
}
