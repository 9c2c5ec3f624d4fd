//! The rows every candidate stores: the same bytes for all of them.
//!
//! A row ("body") is what the log keeps per message besides its sequence number, append time
//! and checksum: the headers in one of two encodings, then the 256-byte payload.
//!
//! * `text`: today's stored form. The topic and partition key as short strings, then the
//!   header map exactly as `transport::encode_headers` writes it (u16 count, then per header
//!   u16 name length, name, u32 value length, value) with the headers `Headers::for_publish`
//!   sets (message_id, schema_fqdn, schema_version, content_type, produced_at, producer,
//!   source, run_id, partition_key, traceparent, trace_id, span_id).
//! * `compact`: a binary form of the same information: ids as 16 bytes, produced_at as i64
//!   µs, the trace context as 25 bytes (trace id 16, span id 8, flags 1), the topic and the
//!   (schema, producer, source, run) tuple as small dictionary ids, the partition key as a
//!   length-prefixed string.

/// Which header encoding a run stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    Text,
    Compact,
}

impl Form {
    pub fn name(self) -> &'static str {
        match self {
            Form::Text => "text",
            Form::Compact => "compact",
        }
    }
}

/// All rows of a run in one buffer.
pub struct Rows {
    data: Vec<u8>,
    ends: Vec<usize>,
    /// Bytes of headers (everything but the payload) in the first row.
    pub header_bytes: usize,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.data[start..self.ends[i]]
    }

    /// Rows `from..to` as slices.
    pub fn slice(&self, from: usize, to: usize) -> Vec<&[u8]> {
        (from..to).map(|i| self.get(i)).collect()
    }

    pub fn avg_len(&self) -> f64 {
        self.data.len() as f64 / self.len().max(1) as f64
    }
}

/// xorshift64*: deterministic filler for ids.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes16(&mut self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next().to_le_bytes());
        b[8..].copy_from_slice(&self.next().to_le_bytes());
        b
    }
}

const KEYS: [&str; 8] = [
    "XNAS.AAPL", "XNAS.MSFT", "XNAS.NVDA", "XNYS.IBM", "XNAS.AMZN", "XNYS.JPM", "XNAS.TSLA",
    "XNYS.KO",
];
const TOPIC: &str = "ampy.dev.bars.v1.XNAS.BENCH";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn uuid_text(b: &[u8; 16]) -> String {
    let h = hex(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// `2026-12-05T01:58:57.123456Z` for a µs offset into a fixed second.
fn rfc3339(us: i64) -> String {
    let secs = us / 1_000_000;
    let frac = us % 1_000_000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("2026-12-05T{h:02}:{m:02}:{s:02}.{frac:06}Z")
}

fn put_text_header(out: &mut Vec<u8>, k: &str, v: &str) {
    out.extend_from_slice(&(k.len() as u16).to_le_bytes());
    out.extend_from_slice(k.as_bytes());
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    out.extend_from_slice(v.as_bytes());
}

/// `n` rows of `form` with `payload` bytes of payload each.
pub fn make(form: Form, n: usize, payload: usize) -> Rows {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let run_id = rng.bytes16();
    let run_text = uuid_text(&run_id);
    let per_row = match form {
        Form::Text => 760,
        Form::Compact => 340,
    };
    let mut data = Vec::with_capacity(n * per_row);
    let mut ends = Vec::with_capacity(n);
    let mut header_bytes = 0;
    let base_us: i64 = 7 * 3600 * 1_000_000;
    for i in 0..n {
        let start = data.len();
        let mut id = rng.bytes16();
        // UUIDv7-like: time prefix, version and variant bits.
        id[..6].copy_from_slice(&((base_us as u64 + i as u64) / 1000).to_be_bytes()[2..]);
        id[6] = 0x70 | (id[6] & 0x0f);
        id[8] = 0x80 | (id[8] & 0x3f);
        let trace = rng.bytes16();
        let span = rng.next().to_le_bytes();
        let produced = base_us + i as i64;
        let key = KEYS[i % KEYS.len()];
        match form {
            Form::Text => {
                data.push(TOPIC.len() as u8);
                data.extend_from_slice(TOPIC.as_bytes());
                data.push(key.len() as u8);
                data.extend_from_slice(key.as_bytes());
                let hs: [(&str, String); 12] = [
                    ("content_type", "application/x-protobuf".into()),
                    ("message_id", uuid_text(&id)),
                    ("partition_key", key.into()),
                    ("produced_at", rfc3339(produced)),
                    ("producer", "bench@ampybus".into()),
                    ("run_id", run_text.clone()),
                    ("schema_fqdn", "ampy.raw.v1.Bytes".into()),
                    ("schema_version", "1.0.0".into()),
                    ("source", "ampybus-bench".into()),
                    ("span_id", hex(&span)),
                    ("trace_id", hex(&trace)),
                    ("traceparent", format!("00-{}-{}-01", hex(&trace), hex(&span))),
                ];
                let mut h = Vec::with_capacity(480);
                h.extend_from_slice(&(hs.len() as u16).to_le_bytes());
                for (k, v) in &hs {
                    put_text_header(&mut h, k, v);
                }
                data.extend_from_slice(&(h.len() as u16).to_le_bytes());
                data.extend_from_slice(&h);
            }
            Form::Compact => {
                let mut h = Vec::with_capacity(80);
                h.push(1); // format version
                h.push(0b0000_0111); // present: id, produced_at, trace
                h.extend_from_slice(&id);
                h.extend_from_slice(&produced.to_le_bytes());
                h.extend_from_slice(&trace);
                h.extend_from_slice(&span);
                h.push(1); // trace flags
                h.extend_from_slice(&7u32.to_le_bytes()); // topic id (dictionary)
                h.extend_from_slice(&3u16.to_le_bytes()); // schema fqdn+version+content type id
                h.extend_from_slice(&5u16.to_le_bytes()); // producer+source+run id
                h.push(key.len() as u8);
                h.extend_from_slice(key.as_bytes());
                h.push(0); // extension headers: none
                data.push(h.len() as u8);
                data.extend_from_slice(&h);
            }
        }
        if i == 0 {
            header_bytes = data.len() - start;
        }
        // Payload: varies per row so no layer can get away with deduplicating it.
        let mut p = rng.next();
        for j in 0..payload {
            if j % 8 == 0 {
                p = p.rotate_left(7) ^ (i as u64);
            }
            data.push((p >> ((j % 8) * 8)) as u8);
        }
        ends.push(data.len());
    }
    Rows {
        data,
        ends,
        header_bytes,
    }
}
