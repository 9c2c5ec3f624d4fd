//! The writer thread of a handle: group commit of appends, and retention.

use super::log::{self, DomainReader, LogWriter, NewRec, domain_index};
use super::{EmbeddedOptions, SyncLevel};
use crate::envelope::Envelope;
use crate::error::{Error, Result};
use crate::topic::Domain;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;
use tokio::sync::{Notify, oneshot};

pub(crate) enum Cmd {
    Append {
        recs: Vec<NewRec>,
        reply: oneshot::Sender<Result<Vec<u64>>>,
    },
    Run(Box<dyn FnOnce(&mut WriterState) + Send>),
}

/// A publishable envelope as a record: domain, partition key hash, compact headers.
pub(crate) fn new_rec(env: Envelope) -> Result<NewRec> {
    let dom = env.topic.split('.').nth(2).unwrap_or("");
    let domain: Domain = dom
        .parse()
        .map_err(|e: Error| Error::topic(format!("topic {:?}: {}", env.topic, e.message())))?;
    let key_hash = super::format::key_hash(env.headers.partition_key().unwrap_or("").as_bytes());
    let mut headers = Vec::with_capacity(192);
    env.headers.encode_compact(&mut headers);
    Ok(NewRec {
        domain: domain_index(domain),
        topic: env.topic.to_arc(),
        key_hash,
        headers,
        payload: env.payload,
    })
}

/// The writer thread's state.
pub(crate) struct WriterState {
    pub log: LogWriter,
    opts: EmbeddedOptions,
    last_retention: Instant,
    /// Retention runs only once this handle has published (a process that only reads never
    /// deletes).
    published: bool,
}

impl WriterState {
    pub fn new(log: LogWriter, opts: EmbeddedOptions) -> WriterState {
        WriterState {
            log,
            opts,
            last_retention: Instant::now(),
            published: false,
        }
    }

    /// Applies retention to every domain; returns how many messages it deleted.
    pub fn retention(&mut self) -> Result<u64> {
        self.last_retention = Instant::now();
        let opts = self.opts.clone();
        let deleted = self.log.locked(|w, mut snap| {
            let mut deleted = 0u64;
            let now = log::now_us();
            let mut changed = false;
            for (d, domain) in Domain::ALL.iter().enumerate() {
                let e = snap.domains[d];
                if e.last_seq == 0 || e.floor > e.last_seq {
                    continue;
                }
                let r = opts.retention_for(*domain);
                let dir = log::domain_dir(w.data(), *domain);
                let cutoff = r
                    .max_age
                    .map(|a| now.saturating_sub(i64::try_from(a.as_micros()).unwrap_or(i64::MAX)));
                let size_over = match r.max_bytes {
                    Some(max) => {
                        let mut total = 0u64;
                        for s in log::segments(&dir)? {
                            total += std::fs::metadata(log::seg_path(&dir, s))
                                .map(|m| m.len())
                                .unwrap_or(0);
                        }
                        total > max
                    }
                    None => false,
                };
                if cutoff.is_none() && !size_over {
                    continue;
                }
                // (seq, stored bytes, log time) of every retained record, oldest first.
                let mut recs: Vec<(u64, u32, i64)> = Vec::new();
                DomainReader::new(w.data(), d, e.floor.saturating_sub(1)).scan(&e, |rec| {
                    if !size_over && cutoff.is_some_and(|c| rec.log_us >= c) {
                        return Ok(std::ops::ControlFlow::Break(()));
                    }
                    recs.push((rec.seq, rec.stored, rec.log_us));
                    Ok(std::ops::ControlFlow::Continue(()))
                })?;
                let (mut by_age, mut by_size) = (0u64, 0u64);
                let mut i = 0;
                if let Some(c) = cutoff {
                    while i < recs.len() && recs[i].2 < c {
                        i += 1;
                    }
                    by_age = i as u64;
                }
                if let Some(max) = r.max_bytes {
                    let mut kept: u64 = recs[i..].iter().map(|r| u64::from(r.1)).sum();
                    while i < recs.len() && kept > max {
                        kept -= u64::from(recs[i].1);
                        i += 1;
                        by_size += 1;
                    }
                }
                if i == 0 {
                    continue;
                }
                // Everything up to the last deleted record goes.
                let floor = recs[i - 1].0 + 1;
                log::write_floor(&dir, floor)?;
                snap.domains[d].floor = floor;
                changed = true;
                // Whole segments below the floor go (never the one being written).
                let segs = log::segments(&dir)?;
                for pair in segs.windows(2) {
                    if pair[1] <= floor && pair[0] != e.seg_first {
                        let p = log::seg_path(&dir, pair[0]);
                        std::fs::remove_file(&p)
                            .map_err(|er| super::shared::io_error(&p, "removing a segment", er))?;
                    }
                }
                deleted += by_age + by_size;
                tracing::info!(
                    dir = %w.data().display(),
                    domain = %domain.as_str(),
                    by_age,
                    by_size,
                    retention = %r,
                    "embedded log retention deleted {} message(s) of domain {}",
                    by_age + by_size,
                    domain.as_str()
                );
            }
            if changed {
                w.shared().publish(&snap);
            }
            Ok(deleted)
        })?;
        if deleted > 0 {
            tracing::info!(dir = %self.log.data().display(), deleted, "embedded log retention deleted {deleted} message(s) in all");
        }
        Ok(deleted)
    }

    fn set_sync(&mut self) {
        self.log.sync_full = self.opts.sync == SyncLevel::Full;
    }
}

pub(crate) fn writer_loop(mut w: WriterState, rx: mpsc::Receiver<Cmd>, notify: Arc<Notify>) {
    w.set_sync();
    loop {
        let first = if w.published {
            let due = w
                .opts
                .retention_interval
                .saturating_sub(w.last_retention.elapsed());
            match rx.recv_timeout(due) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = w.retention() {
                        tracing::warn!(error = %e, "embedded log retention failed");
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(c) => c,
                Err(_) => break,
            }
        };
        let mut cmds = vec![first];
        while cmds.len() < 4096 {
            match rx.try_recv() {
                Ok(c) => cmds.push(c),
                Err(_) => break,
            }
        }
        let mut recs: Vec<NewRec> = Vec::new();
        let mut replies = Vec::new();
        let mut runs = Vec::new();
        for c in cmds {
            match c {
                Cmd::Append { recs: mut r, reply } => {
                    replies.push((r.len(), reply));
                    recs.append(&mut r);
                }
                Cmd::Run(f) => runs.push(f),
            }
        }
        if !recs.is_empty() {
            match w.log.append(&recs) {
                Ok(seqs) => {
                    notify.notify_waiters();
                    let mut at = 0;
                    for (n, reply) in replies {
                        let _ = reply.send(Ok(seqs[at..at + n].to_vec()));
                        at += n;
                    }
                    if !w.published {
                        w.published = true;
                        if let Err(e) = w.retention() {
                            tracing::warn!(error = %e, "embedded log retention failed");
                        }
                    }
                }
                Err(e) => {
                    for (_, reply) in replies {
                        let _ = reply.send(Err(Error::new(e.kind(), e.message().to_owned())));
                    }
                }
            }
        }
        for f in runs {
            f(&mut w);
        }
        if w.published
            && w.last_retention.elapsed() >= w.opts.retention_interval
            && let Err(e) = w.retention()
        {
            tracing::warn!(error = %e, "embedded log retention failed");
        }
    }
}
