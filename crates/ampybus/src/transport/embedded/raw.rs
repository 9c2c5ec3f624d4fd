//! The storage floor for `ampybus bench --raw`: the same frames the log writes, appended to a
//! single segment file with one `fdatasync` per batch — no writer thread, no lock, no shared
//! state, no envelopes. What the embedded log adds per message is its time minus this.

use super::format::{self, put_frame, put_varint};
use super::shared::io_error;
use crate::envelope::Envelope;
use crate::error::Result;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Appends `envs` to a new file at `path` in `batch`-sized commits (the embedded log's frame
/// format, headers in compact form), syncing each commit when `sync_full`; calls `progress`
/// after each commit with its size. Returns the seconds spent encoding, writing and syncing.
///
/// ```
/// use ampybus::{Envelope, Headers, Topic};
/// let dir = tempfile::tempdir().unwrap();
/// let t = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
/// let envs: Vec<Envelope> = (0..10)
///     .map(|_| Envelope::new(&t, Headers::for_publish("x.y.Z", "p@1", "p", "XNAS.AAPL"), vec![0u8; 256]))
///     .collect();
/// let path = dir.path().join("raw.seg");
/// let secs = ampybus::transport::embedded::raw_append_loop(&path, &envs, 4, true, |_| {}).unwrap();
/// assert!(secs > 0.0);
/// assert!(std::fs::metadata(&path).unwrap().len() > 10 * 256);
/// ```
pub fn raw_append_loop(
    path: &Path,
    envs: &[Envelope],
    batch: usize,
    sync_full: bool,
    mut progress: impl FnMut(usize),
) -> Result<f64> {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io_error(path, "creating the raw file", e))?;
    f.write_all(&format::seg_header(1))
        .map_err(|e| io_error(path, "writing", e))?;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut headers = Vec::with_capacity(256);
    let mut len = Vec::with_capacity(10);
    let mut stored = Vec::with_capacity(256);
    let mut set = Vec::with_capacity(256);
    let mut sets: Vec<Vec<u8>> = Vec::new();
    let mut seq = 1u64;
    let mut topics: Vec<String> = Vec::new();
    let started = Instant::now();
    for chunk in envs.chunks(batch.max(1)) {
        buf.clear();
        let log_us = chrono::Utc::now().timestamp_micros();
        put_frame(
            &mut buf,
            format::KIND_BATCH,
            &[&format::batch_body(
                seq,
                chunk.len() as u32,
                log_us,
                seq.saturating_sub(1),
            )],
        );
        for env in chunk {
            let tid = match topics.iter().position(|t| *t == env.topic) {
                Some(i) => i as u16,
                None => {
                    topics.push(env.topic.to_string());
                    let i = (topics.len() - 1) as u16;
                    put_frame(
                        &mut buf,
                        format::KIND_TOPIC,
                        &[&i.to_le_bytes(), env.topic.as_bytes()],
                    );
                    i
                }
            };
            headers.clear();
            env.headers.encode_compact(&mut headers);
            stored.clear();
            format::dict_encode(&headers, log_us, &mut stored, &mut set, |v| {
                if let Some(id) = sets.iter().position(|s| s.as_slice() == v) {
                    return Some(id as u32);
                }
                sets.push(v.to_vec());
                let id = (sets.len() - 1) as u32;
                put_frame(&mut buf, format::KIND_HSET, &[&id.to_le_bytes(), v]);
                Some(id)
            });
            len.clear();
            put_varint(&mut len, u64::from(tid));
            put_varint(&mut len, stored.len() as u64);
            let kh = format::key_hash(env.headers.partition_key().unwrap_or("").as_bytes()) as u16;
            put_frame(
                &mut buf,
                format::KIND_RECORD,
                &[&kh.to_le_bytes(), &len, &stored, &env.payload],
            );
        }
        f.write_all(&buf)
            .map_err(|e| io_error(path, "writing", e))?;
        if sync_full {
            f.sync_data().map_err(|e| io_error(path, "syncing", e))?;
        }
        seq += chunk.len() as u64;
        progress(chunk.len());
    }
    Ok(started.elapsed().as_secs_f64())
}
