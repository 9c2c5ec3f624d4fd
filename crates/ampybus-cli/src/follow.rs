//! The durable read loop shared by `sub` and `archive`: fetch, hand a batch to a sink, ack
//! exactly what the sink finished, release the rest; stop after `--max` messages, `--timeout`
//! seconds idle or a signal.

use crate::error::{CliError, CliResult};
use crate::util::{Signal, Signals};
use ampybus::ops::ReaderCounter;
use ampybus::transport::{Delivery, Subscription};
use std::time::{Duration, Instant};

/// How long one fetch waits at most, so a signal is noticed soon while idle.
pub const FETCH_SLICE: Duration = Duration::from_millis(200);

/// Where fetched deliveries go.
pub trait Sink {
    /// Takes one fetched batch. Returns how many of its first deliveries are finished (a
    /// durable reader acks exactly those and releases the rest) and the error to stop with,
    /// if any. May watch `signals` while it waits and return early.
    async fn take(&mut self, got: &[Delivery], signals: &mut Signals) -> (usize, CliResult<()>);

    /// The error to end with when [`Sink::take`] failed; `acked`: how many the loop acked
    /// (durable reads only).
    fn stop_error(&self, e: CliError, _acked: Option<u64>) -> CliError {
        e
    }
}

/// Limits of one read.
pub struct Limits {
    /// Stop after this many finished messages.
    pub max: Option<u64>,
    /// Stop after this long without a message.
    pub idle: Duration,
    /// Deliveries asked for per fetch.
    pub fetch: u64,
    /// Ack what the sink finished and release the rest (a durable subscription).
    pub durable: bool,
}

/// Reads until `--max`, idle timeout or a signal (`Some(signal)`); returns the number of
/// finished messages with it.
pub async fn follow(
    sub: &mut Box<dyn Subscription>,
    limits: &Limits,
    sink: &mut impl Sink,
    counter: &ReaderCounter,
    signals: &mut Signals,
) -> (u64, CliResult<Option<Signal>>) {
    let mut done = 0u64;
    let mut acked = 0u64;
    let mut active = Instant::now();
    loop {
        // No new work after a signal.
        if let Some(s) = signals.received() {
            return (done, Ok(Some(s)));
        }
        let want = match limits.max {
            Some(m) if done >= m => return (done, Ok(None)),
            Some(m) => (m - done).min(limits.fetch),
            None => limits.fetch,
        };
        // Short fetches (a fetch is not cancelled midway: it may hold leases by then).
        let wait = limits
            .idle
            .saturating_sub(active.elapsed())
            .min(FETCH_SLICE);
        let got = match sub.fetch(want as usize, wait).await {
            Ok(got) => got,
            Err(e) => return (done, Err(CliError::bus("fetch", &e))),
        };
        if got.is_empty() {
            if active.elapsed() >= limits.idle {
                return (done, Ok(None));
            }
            continue;
        }
        if let Some(s) = signals.received() {
            if limits.durable {
                release(got).await;
            }
            return (done, Ok(Some(s)));
        }
        let (accepted, taken) = sink.take(&got, signals).await;
        let accepted = accepted.min(got.len());
        if limits.durable {
            let mut finished = got;
            let rest = finished.split_off(accepted);
            if !finished.is_empty() {
                let n = finished.len() as u64;
                let topics: Vec<ampybus::TopicName> =
                    finished.iter().map(|d| d.envelope.topic.clone()).collect();
                if let Err((e, unacked)) = Delivery::ack_all(finished).await {
                    release(unacked).await;
                    release(rest).await;
                    return (done, Err(CliError::bus("ack", &e)));
                }
                acked += n;
                // Consumed = finished and acked.
                for t in &topics {
                    counter.consumed(t);
                }
            }
            release(rest).await;
        } else {
            for d in got.iter().take(accepted) {
                counter.consumed(&d.envelope.topic);
            }
        }
        done += accepted as u64;
        if let Err(e) = taken {
            return (
                done,
                Err(sink.stop_error(e, limits.durable.then_some(acked))),
            );
        }
        active = Instant::now();
    }
}

/// Hands fetched, unfinished messages back at once (nack without delay), so nothing waits for
/// a lease to expire.
pub async fn release(deliveries: Vec<Delivery>) {
    for d in deliveries {
        let seq = d.info.sequence;
        if let Err((e, _)) = d.nack(Duration::ZERO).await {
            tracing::warn!(seq, error = %e, "could not release a fetched message; it is redelivered after its ack deadline");
        }
    }
}

/// The exit code after a read stopped by `signal`: an open-ended read (no `--max`, not a
/// stored window) exits 0 on SIGTERM and 130 on SIGINT; a fixed-size job 143 / 130.
pub fn signal_code(signal: Signal, open_ended: bool) -> u8 {
    if open_ended {
        signal.open_code()
    } else {
        signal.job_code()
    }
}
