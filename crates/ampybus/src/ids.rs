//! Identifiers and timestamps: monotonic UUIDv7 message ids, W3C trace context, the
//! `produced_at` format.

use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use std::sync::Mutex;
use std::sync::OnceLock;
use uuid::Uuid;

struct V7State {
    ms: u64,
    counter: u16,
}

static V7: Mutex<V7State> = Mutex::new(V7State { ms: 0, counter: 0 });

/// A new UUIDv7 message id, lowercase hyphenated, strictly increasing within this process.
///
/// The 12 bits after the version hold a counter that starts at a random value below 2048 each
/// millisecond (RFC 9562 §6.2, method 1); if it overflows, the timestamp is advanced by one
/// millisecond so the order still holds.
///
/// ```
/// let a = ampybus::ids::new_message_id();
/// let b = ampybus::ids::new_message_id();
/// assert!(a < b);
/// assert_eq!(uuid::Uuid::parse_str(&a).unwrap().get_version_num(), 7);
/// ```
pub fn new_message_id() -> String {
    new_message_uuid().hyphenated().to_string()
}

/// Like [`new_message_id`], as a [`Uuid`].
///
/// ```
/// assert_eq!(ampybus::ids::new_message_uuid().get_version_num(), 7);
/// ```
pub fn new_message_uuid() -> Uuid {
    let now = Utc::now().timestamp_millis().max(0) as u64;
    let mut rng = rand::rng();
    let (ms, counter) = {
        let mut st = V7.lock().unwrap_or_else(|p| p.into_inner());
        if now > st.ms {
            st.ms = now;
            st.counter = rng.random_range(0..2048);
        } else if st.counter >= 0x0fff {
            st.ms += 1;
            st.counter = rng.random_range(0..2048);
        } else {
            st.counter += 1;
        }
        (st.ms, st.counter)
    };
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = 0x70 | ((counter >> 8) as u8 & 0x0f);
    b[7] = counter as u8;
    rng.fill(&mut b[8..]);
    b[8] = (b[8] & 0x3f) | 0x80;
    Uuid::from_bytes(b)
}

/// The millisecond timestamp inside a UUIDv7, or `None` for other versions.
///
/// ```
/// let id = ampybus::ids::new_message_uuid();
/// assert!(ampybus::ids::uuid_v7_millis(&id).unwrap() > 1_700_000_000_000);
/// ```
pub fn uuid_v7_millis(id: &Uuid) -> Option<u64> {
    (id.get_version_num() == 7).then(|| {
        let b = id.as_bytes();
        u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
    })
}

/// Formats a time the way the contract emits `produced_at`: `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
///
/// ```
/// use chrono::TimeZone;
/// let t = chrono::Utc.with_ymd_and_hms(2025, 9, 5, 19, 31, 1).unwrap();
/// assert_eq!(ampybus::ids::format_time(t), "2025-09-05T19:31:01.000000Z");
/// ```
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The current time in `produced_at` form.
///
/// ```
/// assert_eq!(ampybus::ids::now_timestamp().len(), 27);
/// ```
pub fn now_timestamp() -> String {
    format_time(Utc::now())
}

/// Parses any RFC3339 time with an offset (the liberal consume-side rule) into UTC.
///
/// ```
/// let t = ampybus::ids::parse_time("2025-09-05T21:31:01+02:00").unwrap();
/// assert_eq!(ampybus::ids::format_time(t), "2025-09-05T19:31:01.000000Z");
/// ```
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    use chrono::Datelike;
    // Years outside 0000–9999 in UTC cannot be written back as RFC3339.
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
        .filter(|t| (0..=9999).contains(&t.year()))
}

/// True when `s` is exactly in the emitted form `YYYY-MM-DDTHH:MM:SS.ffffffZ` and a real time.
///
/// ```
/// assert!(ampybus::ids::is_canonical_time("2025-09-05T19:31:01.000000Z"));
/// assert!(!ampybus::ids::is_canonical_time("2025-09-05T19:31:01Z"));
/// ```
pub fn is_canonical_time(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 27 || b[26] != b'Z' || b[19] != b'.' {
        return false;
    }
    let shape_ok = b.iter().enumerate().all(|(i, c)| match i {
        4 | 7 => *c == b'-',
        10 => *c == b'T',
        13 | 16 => *c == b':',
        19 => *c == b'.',
        26 => *c == b'Z',
        _ => c.is_ascii_digit(),
    });
    shape_ok && parse_time(s).is_some()
}

/// A W3C trace context (`traceparent`).
///
/// ```
/// let tc = ampybus::ids::TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// assert_eq!(tc.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(tc.to_traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// 16 lowercase hex digits, not all zero.
    pub span_id: String,
    /// Trace flags (`01` = sampled).
    pub flags: u8,
}

fn is_hex_of(s: &str, n: usize) -> bool {
    s.len() == n
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn all_zero(s: &str) -> bool {
    s.bytes().all(|b| b == b'0')
}

impl TraceContext {
    /// A fresh sampled context with random ids.
    ///
    /// ```
    /// let tc = ampybus::ids::TraceContext::new_root();
    /// assert_eq!(tc.to_traceparent().len(), 55);
    /// ```
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        let t: u128 = rng.random_range(1..=u128::MAX);
        let s: u64 = rng.random_range(1..=u64::MAX);
        TraceContext {
            trace_id: format!("{t:032x}"),
            span_id: format!("{s:016x}"),
            flags: 1,
        }
    }

    /// A child context: same trace id, new span id.
    ///
    /// ```
    /// let root = ampybus::ids::TraceContext::new_root();
    /// assert_eq!(root.child().trace_id, root.trace_id);
    /// ```
    pub fn child(&self) -> Self {
        let s: u64 = rand::rng().random_range(1..=u64::MAX);
        TraceContext {
            trace_id: self.trace_id.clone(),
            span_id: format!("{s:016x}"),
            flags: self.flags,
        }
    }

    /// Parses a `traceparent` strictly (version `00`, lowercase hex, non-zero ids).
    ///
    /// ```
    /// assert!(ampybus::ids::TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
    /// ```
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('-');
        let (v, t, sp, f) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if it.next().is_some()
            || v != "00"
            || !is_hex_of(t, 32)
            || !is_hex_of(sp, 16)
            || !is_hex_of(f, 2)
        {
            return None;
        }
        if all_zero(t) || all_zero(sp) {
            return None;
        }
        Some(TraceContext {
            trace_id: t.into(),
            span_id: sp.into(),
            flags: u8::from_str_radix(f, 16).ok()?,
        })
    }

    /// Builds a context from the older `trace_id`/`span_id` headers; accepts upper case;
    /// an all-zero trace id counts as absent. A missing span id gets a fresh one.
    ///
    /// ```
    /// use ampybus::ids::TraceContext;
    /// let tc = TraceContext::from_ids("4B5B3F2A0F9D4E3DB4C8A1F0E3A7C812", None).unwrap();
    /// assert_eq!(tc.trace_id, "4b5b3f2a0f9d4e3db4c8a1f0e3a7c812");
    /// assert!(TraceContext::from_ids("00000000000000000000000000000000", None).is_none());
    /// ```
    pub fn from_ids(trace_id: &str, span_id: Option<&str>) -> Option<Self> {
        let t = trace_id.to_ascii_lowercase();
        if !is_hex_of(&t, 32) || all_zero(&t) {
            return None;
        }
        let span = span_id
            .map(str::to_ascii_lowercase)
            .filter(|s| is_hex_of(s, 16) && !all_zero(s))
            .unwrap_or_else(|| format!("{:016x}", rand::rng().random_range(1..=u64::MAX)));
        Some(TraceContext {
            trace_id: t,
            span_id: span,
            flags: 1,
        })
    }

    /// The `traceparent` header value.
    pub fn to_traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

/// The run id used when a publisher does not set one: `run-<UTC start time>-<pid>`, fixed for
/// the life of the process.
///
/// ```
/// assert!(ampybus::ids::process_run_id().starts_with("run-"));
/// ```
pub fn process_run_id() -> &'static str {
    static RUN: OnceLock<String> = OnceLock::new();
    RUN.get_or_init(|| {
        format!(
            "run-{}-{}",
            Utc::now().format("%Y%m%dT%H%M%S"),
            std::process::id()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_strictly_monotonic_under_bursts() {
        let ids: Vec<String> = (0..20_000).map(|_| new_message_id()).collect();
        for w in ids.windows(2) {
            assert!(w[0] < w[1], "{} !< {}", w[0], w[1]);
        }
        for id in &ids {
            let u = Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 7);
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
            assert_eq!(id, &id.to_lowercase());
        }
    }
}
