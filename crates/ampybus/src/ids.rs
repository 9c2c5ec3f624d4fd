//! Identifiers and timestamps: monotonic UUIDv7 message ids, W3C trace context, the
//! `produced_at` format.

use chrono::{DateTime, SecondsFormat, Utc};
use rand::Rng;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use uuid::Uuid;

/// The last UUIDv7 made in this process: its millisecond timestamp shifted left by 12 bits,
/// or'ed with its 12-bit counter. One word, advanced by compare-and-swap, so the pair only ever
/// grows and ids stay strictly increasing across threads without a lock.
static V7: AtomicU64 = AtomicU64::new(0);

/// The generator of the random parts of ids made on the publish path (the UUIDv7's random
/// bits and counter start, trace and span ids): xoshiro256++ with one state per thread,
/// seeded from the operating system's entropy (through `rand`'s thread generator) on the
/// thread's first draw. These ids need to be unpredictable enough not to collide, not to be
/// secret, so a statistical generator (a few instructions per draw) serves; `rand`'s
/// ChaCha-based thread generator cost about 200 instructions per published message here.
#[derive(Clone, Copy, Default)]
pub(crate) struct IdRng;

thread_local! {
    /// This thread's state, seeded on the thread's first draw.
    static ID_RNG: std::cell::UnsafeCell<[u64; 4]> = std::cell::UnsafeCell::new(IdRng::seed());
}

impl IdRng {
    /// A state from the operating system's entropy (xoshiro's state must not be all zero).
    #[cold]
    fn seed() -> [u64; 4] {
        let mut os = rand::rng();
        loop {
            let s: [u64; 4] = [os.random(), os.random(), os.random(), os.random()];
            if s != [0; 4] {
                return s;
            }
        }
    }
}

impl rand::RngCore for IdRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    #[inline]
    fn next_u64(&mut self) -> u64 {
        ID_RNG.with(|cell| {
            // SAFETY: the state is this thread's own and nothing else runs while this block
            // holds the reference (no call out of it, no re-entry).
            let s = unsafe { &mut *cell.get() };
            let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
            let t = s[1] << 17;
            s[2] ^= s[0];
            s[3] ^= s[1];
            s[1] ^= s[2];
            s[0] ^= s[3];
            s[2] ^= t;
            s[3] = s[3].rotate_left(45);
            out
        })
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let w = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
    }
}

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
    new_message_uuid_at(now_micros(), &mut IdRng)
}

/// [`new_message_uuid`] for a clock reading the caller made (`now_us`, microseconds since the
/// Unix epoch, e.g. the message's `produced_at`), drawing from the caller's `rng`.
pub(crate) fn new_message_uuid_at(now_us: i64, rng: &mut impl Rng) -> Uuid {
    let now = now_us.max(0) as u64 / 1000;
    // Milliseconds fit in 48 bits until the year 10889 (a UUIDv7 holds no more).
    let now = now & ((1 << 48) - 1);
    let mut last = V7.load(Ordering::Relaxed);
    let (ms, counter) = loop {
        let (last_ms, last_counter) = (last >> 12, (last & 0x0fff) as u16);
        let next = if now > last_ms {
            (now, rng.random_range(0..2048))
        } else if last_counter >= 0x0fff {
            (last_ms + 1, rng.random_range(0..2048))
        } else {
            (last_ms, last_counter + 1)
        };
        let packed = (next.0 << 12) | u64::from(next.1);
        match V7.compare_exchange_weak(last, packed, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => break next,
            Err(seen) => last = seen,
        }
    };
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = 0x70 | ((counter >> 8) as u8 & 0x0f);
    b[7] = counter as u8;
    b[8..].copy_from_slice(&rng.random::<u64>().to_le_bytes());
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
    fn uuid_text_writes_the_canonical_form_of_every_byte_value() {
        let mut ids: Vec<[u8; 16]> = (0..=255u8).map(|b| [b; 16]).collect();
        ids.push(std::array::from_fn(|i| i as u8 * 17));
        ids.push(*b"\x01\x23\x45\x67\x89\xab\xcd\xef\xfe\xdc\xba\x98\x76\x54\x32\x10");
        for id in ids {
            let mut out = [0u8; 40];
            uuid_text(&id, &mut out);
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            let want = format!(
                "{}-{}-{}-{}-{}",
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            );
            assert_eq!(std::str::from_utf8(&out[..36]).unwrap(), want);
            assert_eq!(out[36..], [0u8; 4], "wrote past 36 bytes");
        }
        let mut out = [0u8; 36];
        uuid_text(
            b"\x01\x23\x45\x67\x89\xab\xcd\xef\xfe\xdc\xba\x98\x76\x54\x32\x10",
            &mut out,
        );
        assert_eq!(&out, b"01234567-89ab-cdef-fedc-ba9876543210");
    }

    #[test]
    fn hex_digits_by_register_and_by_table_agree_on_every_nibble_pair() {
        for b in 0..=255u8 {
            let id: [u8; 16] = std::array::from_fn(|i| b.wrapping_add((i as u8).wrapping_mul(37)));
            let (mut fast, mut table) = ([0u8; 32], [0u8; 32]);
            hex32(&id, &mut fast);
            hex32_by_table(&id, &mut table);
            assert_eq!(fast, table, "{id:?}");
            let want: String = id.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(std::str::from_utf8(&table).unwrap(), want);
        }
    }

    #[test]
    fn the_id_generator_is_seeded_per_thread_and_does_not_repeat() {
        use rand::RngCore;
        let draws = |n: usize| (0..n).map(|_| IdRng.next_u64()).collect::<Vec<u64>>();
        let here = draws(10_000);
        let there = std::thread::spawn(move || draws(10_000)).join().unwrap();
        let mut all: std::collections::HashSet<u64> = here.iter().copied().collect();
        assert_eq!(all.len(), 10_000, "a draw repeated within one thread");
        all.extend(there.iter().copied());
        assert_eq!(all.len(), 20_000, "two threads drew the same value");
        // Every bit position takes both values (a stuck bit would show here).
        let (ones, zeros) = here.iter().fold((0u64, 0u64), |(o, z), v| (o | v, z | !v));
        assert_eq!((ones, zeros), (u64::MAX, u64::MAX));
    }

    #[test]
    fn ids_made_at_one_clock_reading_on_many_threads_are_distinct_and_increase_per_thread() {
        // 4 × 5,000 ids in one millisecond overflow the 12-bit counter several times: the
        // timestamp moves on by a millisecond each time and nothing repeats.
        let now = now_micros();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..5_000)
                        .map(|_| new_message_uuid_at(now, &mut IdRng))
                        .collect::<Vec<Uuid>>()
                })
            })
            .collect();
        let mut all = std::collections::HashSet::new();
        for t in threads {
            let ids = t.join().unwrap();
            for w in ids.windows(2) {
                assert!(w[0] < w[1], "{} !< {}", w[0], w[1]);
            }
            for id in ids {
                assert_eq!(id.get_version_num(), 7);
                assert!(uuid_v7_millis(&id).unwrap() >= (now / 1000) as u64);
                assert!(all.insert(id), "{id} made twice");
            }
        }
        assert_eq!(all.len(), 20_000);
    }

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

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Microseconds since the Unix epoch of a time in the canonical `produced_at` form
/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, without going through a general RFC3339 parser; `None` for
/// anything else (including a leap second, which the general parser handles).
///
/// ```
/// assert_eq!(ampybus::ids::canonical_time_micros("1970-01-01T00:00:01.000002Z"), Some(1_000_002));
/// assert_eq!(ampybus::ids::canonical_time_micros("2025-02-30T00:00:00.000000Z"), None);
/// assert_eq!(ampybus::ids::canonical_time_micros("2025-09-05T19:31:01Z"), None);
/// ```
pub fn canonical_time_micros(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 27
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[26] != b'Z'
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let mut v = 0i64;
        for &c in &b[from..to] {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Some(v)
    };
    let (y, mo, d) = (num(0, 4)?, num(5, 7)? as u32, num(8, 10)? as u32);
    let (h, mi, sec, us) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 26)?);
    if !(1..=12).contains(&mo)
        || d == 0
        || d > days_in_month(y, mo)
        || h > 23
        || mi > 59
        || sec > 59
    {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    Some(((days * 24 + h) * 60 + mi) * 60_000_000 + sec * 1_000_000 + us)
}

/// Microseconds since the Unix epoch of 0000-01-01T00:00:00.000000Z, the earliest canonical
/// time.
pub const MIN_CANONICAL_MICROS: i64 = -62_167_219_200_000_000;
/// Microseconds since the Unix epoch of 9999-12-31T23:59:59.999999Z, the latest canonical time.
pub const MAX_CANONICAL_MICROS: i64 = 253_402_300_799_999_999;

/// Writes microseconds since the Unix epoch in the canonical `produced_at` form into `out`;
/// false (and `out` untouched) when the year is outside 0000–9999.
///
/// ```
/// let mut b = [0u8; 27];
/// assert!(ampybus::ids::write_canonical_time(1_000_002, &mut b));
/// assert_eq!(&b, b"1970-01-01T00:00:01.000002Z");
/// ```
pub fn write_canonical_time(us: i64, out: &mut [u8; 27]) -> bool {
    let days = us.div_euclid(86_400_000_000);
    let rem = us.rem_euclid(86_400_000_000);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        return false;
    }
    let put = |out: &mut [u8; 27], at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(out, 0, 4, y);
    out[4] = b'-';
    put(out, 5, 2, i64::from(m));
    out[7] = b'-';
    put(out, 8, 2, i64::from(d));
    out[10] = b'T';
    put(out, 11, 2, rem / 3_600_000_000);
    out[13] = b':';
    put(out, 14, 2, rem / 60_000_000 % 60);
    out[16] = b':';
    put(out, 17, 2, rem / 1_000_000 % 60);
    out[19] = b'.';
    put(out, 20, 6, rem % 1_000_000);
    out[26] = b'Z';
    true
}

/// One reading of a clock (`clock_gettime`) as seconds and nanoseconds; `None` when the
/// clock cannot be read.
#[cfg(unix)]
#[inline]
pub(crate) fn read_clock(clock: libc::clockid_t) -> Option<(i64, i64)> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    // `time_t` and `c_long` are 32 bits wide on 32-bit targets.
    #[allow(clippy::useless_conversion)]
    Some((i64::from(ts.tv_sec), i64::from(ts.tv_nsec)))
}

/// Microseconds since the Unix epoch, now.
///
/// ```
/// assert!(ampybus::ids::now_micros() > 1_700_000_000_000_000);
/// ```
pub fn now_micros() -> i64 {
    // The realtime clock read directly: `SystemTime::now` + `duration_since` + `as_micros`
    // spent about half of their ≈ 95 instructions on checks and 128-bit arithmetic, once per
    // published message.
    #[cfg(unix)]
    if let Some((secs, nanos)) = read_clock(libc::CLOCK_REALTIME) {
        return secs
            .saturating_mul(1_000_000)
            .saturating_add(nanos / 1000)
            .max(0);
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A W3C trace context held as numbers (no allocation): what [`TraceContext`] holds as text.
///
/// ```
/// use ampybus::ids::TraceIds;
/// let t = TraceIds::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// assert_eq!(t.flags, 1);
/// assert_eq!(&t.traceparent_text(), b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert_eq!(t.to_context().span_id, "00f067aa0ba902b7");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceIds {
    /// The trace id (not all zero).
    pub trace_id: [u8; 16],
    /// The parent span id (not all zero).
    pub span_id: [u8; 8],
    /// Trace flags (`1` = sampled).
    pub flags: u8,
}

/// Lowercase hex digit values; 0xFF for every other byte.
const HEX_VALUES: [u8; 256] = {
    let mut t = [0xFFu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Decodes lowercase hex into `out` (`s` is exactly twice as long).
pub(crate) fn unhex_lower(s: &[u8], out: &mut [u8]) -> Option<()> {
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let (hi, lo) = (
            HEX_VALUES[usize::from(pair[0])],
            HEX_VALUES[usize::from(pair[1])],
        );
        bad |= hi | lo;
        *o = (hi << 4) | (lo & 0x0F);
    }
    // Valid digits are below 16; 0xFF sets the high bits.
    (bad < 16).then_some(())
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Two lowercase hex digits for every byte value.
static HEX_PAIRS: [[u8; 2]; 256] = {
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [HEX[i >> 4], HEX[i & 15]];
        i += 1;
    }
    t
};

/// Writes a UUID's 16 bytes in its canonical text form (lowercase, hyphenated: 36 bytes)
/// into `out[..36]`.
#[inline]
pub(crate) fn uuid_text(id: &[u8; 16], out: &mut [u8]) {
    let out: &mut [u8; 36] = (&mut out[..36]).try_into().expect("36 bytes");
    let mut hex = [0u8; 32];
    hex32(id, &mut hex);
    out[..8].copy_from_slice(&hex[..8]);
    out[8] = b'-';
    out[9..13].copy_from_slice(&hex[8..12]);
    out[13] = b'-';
    out[14..18].copy_from_slice(&hex[12..16]);
    out[18] = b'-';
    out[19..23].copy_from_slice(&hex[16..20]);
    out[23] = b'-';
    out[24..].copy_from_slice(&hex[20..]);
}

/// The 32 lowercase hex digits of 16 bytes, all at once in two SSE2 registers (every x86_64
/// has SSE2): the consumer writes a dedupe key's text this way twice per message (its batch
/// lookup, its record), where a table lookup per byte took about 90 instructions.
#[cfg(target_arch = "x86_64")]
#[inline]
fn hex32(id: &[u8; 16], out: &mut [u8; 32]) {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86_64 baseline; the loads and stores are unaligned ones of
    // exactly 16 bytes within `id` and `out`.
    unsafe {
        let v = _mm_loadu_si128(id.as_ptr().cast());
        let low4 = _mm_set1_epi8(0x0f);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low4);
        let lo = _mm_and_si128(v, low4);
        // Each byte's high nibble, then its low one.
        let first = _mm_unpacklo_epi8(hi, lo);
        let second = _mm_unpackhi_epi8(hi, lo);
        // A nibble n is the digit b'0' + n, plus 39 (b'a' - b'0' - 10) when n > 9.
        let digit = |n: __m128i| {
            let letter = _mm_and_si128(_mm_cmpgt_epi8(n, _mm_set1_epi8(9)), _mm_set1_epi8(39));
            _mm_add_epi8(_mm_add_epi8(n, _mm_set1_epi8(b'0' as i8)), letter)
        };
        _mm_storeu_si128(out.as_mut_ptr().cast(), digit(first));
        _mm_storeu_si128(out.as_mut_ptr().add(16).cast(), digit(second));
    }
}

/// The 32 lowercase hex digits of 16 bytes (other targets: by table).
#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn hex32(id: &[u8; 16], out: &mut [u8; 32]) {
    hex32_by_table(id, out);
}

/// The 32 lowercase hex digits of 16 bytes, a table lookup per byte.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn hex32_by_table(id: &[u8; 16], out: &mut [u8; 32]) {
    for (b, o) in id.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
    }
}

/// Writes `bytes` as lowercase hex into `out` (twice as long).
pub(crate) fn hex_lower(bytes: &[u8], out: &mut [u8]) {
    for (b, o) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = HEX[usize::from(b >> 4)];
        o[1] = HEX[usize::from(b & 15)];
    }
}

impl TraceIds {
    /// Parses a `traceparent` by the same strict rule as [`TraceContext::parse`].
    pub fn parse(s: &str) -> Option<TraceIds> {
        let b = s.as_bytes();
        if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let mut t = TraceIds {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 0,
        };
        unhex_lower(&b[3..35], &mut t.trace_id)?;
        unhex_lower(&b[36..52], &mut t.span_id)?;
        let mut f = [0u8; 1];
        unhex_lower(&b[53..55], &mut f)?;
        t.flags = f[0];
        if t.trace_id == [0; 16] || t.span_id == [0; 8] {
            return None;
        }
        Some(t)
    }

    /// Fresh random ids, sampled.
    pub fn new_root() -> TraceIds {
        TraceIds::new_root_from(&mut IdRng)
    }

    /// [`TraceIds::new_root`] drawing from the caller's `rng`: ids uniform over the non-zero
    /// values (a zero draw, 2^-128 or 2^-64 likely, is drawn again).
    pub(crate) fn new_root_from(rng: &mut impl Rng) -> TraceIds {
        let t: u128 = loop {
            let t = rng.random();
            if t != 0 {
                break t;
            }
        };
        let s: u64 = loop {
            let s = rng.random();
            if s != 0 {
                break s;
            }
        };
        TraceIds {
            trace_id: t.to_be_bytes(),
            span_id: s.to_be_bytes(),
            flags: 1,
        }
    }

    /// The `traceparent` text (55 bytes).
    pub fn traceparent_text(&self) -> [u8; 55] {
        let mut o = [b'-'; 55];
        o[0] = b'0';
        o[1] = b'0';
        hex_lower(&self.trace_id, &mut o[3..35]);
        hex_lower(&self.span_id, &mut o[36..52]);
        hex_lower(&[self.flags], &mut o[53..55]);
        o
    }

    /// The same context as text.
    pub fn to_context(&self) -> TraceContext {
        let tp = self.traceparent_text();
        let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&tp[r]).into_owned();
        TraceContext {
            trace_id: text(3..35),
            span_id: text(36..52),
            flags: self.flags,
        }
    }
}

#[cfg(test)]
mod fast_time_tests {
    use super::*;

    #[test]
    fn fast_time_agrees_with_chrono() {
        let mut rng = rand::rng();
        for _ in 0..20_000 {
            // Years 0000-9999.
            let us: i64 = rng.random_range(MIN_CANONICAL_MICROS..=MAX_CANONICAL_MICROS);
            let mut b = [0u8; 27];
            assert!(write_canonical_time(us, &mut b));
            let s = std::str::from_utf8(&b).unwrap();
            let t = DateTime::from_timestamp_micros(us).unwrap();
            assert_eq!(s, format_time(t), "{us}");
            assert_eq!(canonical_time_micros(s), Some(us), "{s}");
            assert!(is_canonical_time(s));
        }
        for bad in [
            "2025-13-01T00:00:00.000000Z",
            "2025-00-01T00:00:00.000000Z",
            "2024-02-30T00:00:00.000000Z",
            "2023-02-29T00:00:00.000000Z",
            "2025-01-01T24:00:00.000000Z",
            "2025-01-01T00:60:00.000000Z",
            "2025-01-01T00:00:60.000000Z",
            "2025-01-01T00:00:00.00000aZ",
            "2025-01-01 00:00:00.000000Z",
            "+025-01-01T00:00:00.000000Z",
        ] {
            assert_eq!(canonical_time_micros(bad), None, "{bad}");
        }
        assert!(canonical_time_micros("2024-02-29T00:00:00.000000Z").is_some());
        assert!(canonical_time_micros("2000-02-29T00:00:00.000000Z").is_some());
        assert!(canonical_time_micros("1900-02-29T00:00:00.000000Z").is_none());
        let mut b = [0u8; 27];
        assert!(write_canonical_time(MIN_CANONICAL_MICROS, &mut b));
        assert_eq!(&b, b"0000-01-01T00:00:00.000000Z");
        assert!(write_canonical_time(MAX_CANONICAL_MICROS, &mut b));
        assert_eq!(&b, b"9999-12-31T23:59:59.999999Z");
        assert!(!write_canonical_time(MIN_CANONICAL_MICROS - 1, &mut b));
        assert!(!write_canonical_time(MAX_CANONICAL_MICROS + 1, &mut b));
    }

    #[test]
    fn trace_ids_agree_with_trace_context() {
        for _ in 0..1000 {
            let t = TraceIds::new_root();
            let s = String::from_utf8(t.traceparent_text().to_vec()).unwrap();
            assert_eq!(TraceContext::parse(&s), Some(t.to_context()));
            assert_eq!(TraceIds::parse(&s), Some(t));
        }
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(TraceIds::parse(bad), None, "{bad}");
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
    }
}
