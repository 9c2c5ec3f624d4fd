//! Live reading of a pattern that spans several streams, written once for the broker bindings
//! that read stream by stream (the streams of a NATS pattern, the stream keys of a Redis
//! pattern; Kafka's client merges the partitions of its topics itself).
//!
//! A binding implements [`LiveStreams`]: it names the streams its pattern spans now, opens one
//! it has not opened yet, reads one stream without waiting, and waits on several at once. This
//! module decides everything else, the same way for every binding:
//!
//! * **Discovery and rediscovery.** [`join_streams`] opens every stream the pattern spans that
//!   is not open yet, at most once per [`DISCOVER_EVERY`] (unless the binding says its streams
//!   are fixed when it subscribes); while none is open it looks every [`LOOK_EVERY`] until the
//!   fetch's wait is over, so a reader subscribed before its first stream exists starts at
//!   once when it appears. A stream found after the subscription is read from its beginning:
//!   everything in it came after the subscription.
//! * **Merged fetch.** [`fetch`] reads the open streams one after the other without waiting,
//!   starting each call at the next stream (so no stream starves another under load), until
//!   `max` deliveries; when none had anything it waits on at most `max` of them at once for
//!   one message, then tops up from the streams that woke. A read that fails lets the binding
//!   recover (reopen a consumer, recreate a group) and returns what was read before it, or the
//!   error when nothing was.
//!
//! Client-side filtering (a stream also holding topics the pattern does not match) stays in the
//! binding's conversion of a stream's entries, and the merged fetch keeps each stream's own
//! order: per-key order needs nothing more, because one partition key lives in one stream.

#![cfg_attr(not(any(feature = "nats", feature = "redis")), allow(dead_code))]

use crate::error::{Error, Result};
use crate::transport::Delivery;
use async_trait::async_trait;
use std::time::{Duration, Instant};

/// How often the streams a pattern spans are listed again while at least one is open.
pub(crate) const DISCOVER_EVERY: Duration = Duration::from_secs(1);

/// How often they are listed while none is open (a fetch waits for the first one).
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(50);

/// A fetch whose wait is shorter than this does not wait on the streams.
pub(crate) const MIN_WAIT: Duration = Duration::from_millis(10);

/// What the merged fetch keeps between calls: the stream the next call starts at, and when
/// the streams were last listed. Held by the binding's subscription ([`LiveStreams::live`]).
#[derive(Debug, Default)]
pub(crate) struct LiveState {
    next: usize,
    last_discovery: Option<Instant>,
}

/// One binding's live readers of the streams a pattern spans, indexed `0..len()` in the order
/// they were opened.
#[async_trait]
pub(crate) trait LiveStreams: Send {
    /// What the binding needs to open a stream it found (its name, and e.g. a filter).
    type Found: Send;

    /// The merged fetch's state, kept in the subscription.
    fn live(&mut self) -> &mut LiveState;

    /// How many streams are open.
    fn len(&self) -> usize;

    /// Whether the streams can change after the subscription (false: it opened every stream
    /// the pattern can span when it subscribed, so listing them again finds nothing).
    fn discovers(&self) -> bool {
        true
    }

    /// The name of a found stream.
    fn name(found: &Self::Found) -> &str;

    /// Whether the stream named `name` is open.
    fn is_open(&self, name: &str) -> bool;

    /// The streams the pattern spans now, open or not (a binding that can tell cheaply that
    /// none is new may return only the new ones, or none).
    async fn spanned(&mut self) -> Result<Vec<Self::Found>>;

    /// Opens a stream found after the subscription, read from its beginning; it gets the
    /// index `len()`.
    async fn open(&mut self, found: Self::Found) -> Result<()>;

    /// Whether a read may be sent now (false, e.g., while this instance does not hold its
    /// consumer's lease long enough): the fetch then returns what it has.
    fn may_read(&self) -> bool {
        true
    }

    /// Up to `max` deliveries of stream `i`, without waiting.
    async fn read(&mut self, i: usize, max: usize) -> Result<Vec<Delivery>>;

    /// Waits up to `wait` (the binding may return earlier) for a message on any of `streams`:
    /// what arrived, and the streams it arrived on. Errors only when nothing arrived.
    async fn wait_any(
        &mut self,
        streams: &[usize],
        wait: Duration,
    ) -> Result<(Vec<Delivery>, Vec<usize>)>;

    /// A read of stream `i` (or, with `None`, a wait on several) failed with `e`: prepare
    /// the next read (mark a consumer to reopen, recreate a lost group). An error here ends
    /// the fetch with it.
    async fn recover(&mut self, i: Option<usize>, e: &Error) -> Result<()>;
}

/// Opens the streams the pattern spans that are not open yet (at most once per
/// [`DISCOVER_EVERY`] while one is open); while none is, looks every [`LOOK_EVERY`] until
/// `wait` is over.
pub(crate) async fn join_streams<S: LiveStreams + ?Sized>(s: &mut S, wait: Duration) -> Result<()> {
    let started = tokio::time::Instant::now();
    if s.len() > 0 && !s.discovers() {
        return Ok(());
    }
    let due = s.len() == 0
        || s.live()
            .last_discovery
            .is_none_or(|t| t.elapsed() >= DISCOVER_EVERY);
    if due {
        join_now(s).await?;
    }
    while s.len() == 0 {
        let left = wait.saturating_sub(started.elapsed());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(left.min(LOOK_EVERY)).await;
        join_now(s).await?;
    }
    Ok(())
}

async fn join_now<S: LiveStreams + ?Sized>(s: &mut S) -> Result<()> {
    s.live().last_discovery = Some(Instant::now());
    for found in s.spanned().await? {
        if !s.is_open(S::name(&found)) {
            tracing::debug!(stream = %S::name(&found), "a subscription joined a new stream");
            s.open(found).await?;
        }
    }
    Ok(())
}

/// The merged fetch: up to `max` deliveries in all, after those already in `out`, waiting up
/// to `wait` when no stream has any (see the module's documentation).
pub(crate) async fn fetch<S: LiveStreams + ?Sized>(
    s: &mut S,
    mut out: Vec<Delivery>,
    max: usize,
    wait: Duration,
) -> Result<Vec<Delivery>> {
    let n = s.len();
    if n == 0 || out.len() >= max {
        return Ok(out);
    }
    let first = {
        let st = s.live();
        let first = st.next % n;
        st.next = st.next.wrapping_add(1);
        first
    };
    let order: Vec<usize> = (0..n).map(|k| (first + k) % n).collect();
    for &i in &order {
        if out.len() >= max || !s.may_read() {
            break;
        }
        match s.read(i, max - out.len()).await {
            Ok(got) => out.extend(got),
            Err(e) => {
                s.recover(Some(i), &e).await?;
                return if out.is_empty() { Err(e) } else { Ok(out) };
            }
        }
    }
    if !out.is_empty() || wait < MIN_WAIT || !s.may_read() {
        return Ok(out);
    }
    let waiting: Vec<usize> = order.into_iter().take(max).collect();
    let (got, woke) = match s.wait_any(&waiting, wait).await {
        Ok(x) => x,
        Err(e) => {
            s.recover(None, &e).await?;
            return Err(e);
        }
    };
    out.extend(got);
    for i in woke {
        if out.len() >= max || !s.may_read() {
            break;
        }
        match s.read(i, max - out.len()).await {
            Ok(got) => out.extend(got),
            Err(e) => {
                tracing::debug!(error = %e, "a read after a wake-up failed");
                if let Err(e) = s.recover(Some(i), &e).await {
                    tracing::debug!(error = %e, "recovering after a wake-up failed");
                }
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
    use crate::error::ErrorKind;
    use crate::headers::Headers;
    use crate::topic::Topic;
    use crate::transport::DeliveryInfo;
    use std::collections::VecDeque;

    fn delivery(stream: &str, seq: u64) -> Delivery {
        let topic = Topic::parse(&format!("ampy.dev.news.v1.{stream}")).unwrap();
        let env = Envelope::new(
            &topic,
            Headers::new(),
            format!("{stream}{seq}").into_bytes(),
        );
        let info = DeliveryInfo {
            sequence: seq,
            delivery_count: 1,
            stored_at: chrono::Utc::now(),
        };
        Delivery::best_effort(env, info)
    }

    fn names(d: &[Delivery]) -> Vec<String> {
        d.iter()
            .map(|d| String::from_utf8(d.envelope.payload.to_vec()).unwrap())
            .collect()
    }

    /// Streams in memory: what each holds, which exist on the "broker", and what was asked.
    #[derive(Default)]
    struct Fake {
        live: LiveState,
        existing: Vec<String>,
        open: Vec<(String, VecDeque<u64>)>,
        /// Messages that arrive while a wait is in progress, per stream name.
        arriving: Vec<(String, u64)>,
        fail_read: Option<usize>,
        reads: Vec<(usize, usize)>,
        waits: Vec<Vec<usize>>,
        recovered: Vec<Option<usize>>,
        listed: usize,
        fixed: bool,
        lease_ok: bool,
    }

    impl Fake {
        fn with(streams: &[(&str, &[u64])]) -> Fake {
            Fake {
                existing: streams.iter().map(|(s, _)| s.to_string()).collect(),
                open: streams
                    .iter()
                    .map(|(s, q)| (s.to_string(), q.iter().copied().collect()))
                    .collect(),
                lease_ok: true,
                ..Fake::default()
            }
        }
    }

    #[async_trait]
    impl LiveStreams for Fake {
        type Found = String;
        fn live(&mut self) -> &mut LiveState {
            &mut self.live
        }
        fn len(&self) -> usize {
            self.open.len()
        }
        fn discovers(&self) -> bool {
            !self.fixed
        }
        fn name(found: &String) -> &str {
            found
        }
        fn is_open(&self, name: &str) -> bool {
            self.open.iter().any(|(s, _)| s == name)
        }
        async fn spanned(&mut self) -> Result<Vec<String>> {
            self.listed += 1;
            Ok(self.existing.clone())
        }
        async fn open(&mut self, found: String) -> Result<()> {
            self.open.push((found, VecDeque::new()));
            Ok(())
        }
        fn may_read(&self) -> bool {
            self.lease_ok
        }
        async fn read(&mut self, i: usize, max: usize) -> Result<Vec<Delivery>> {
            self.reads.push((i, max));
            if self.fail_read == Some(i) {
                return Err(Error::new(
                    ErrorKind::Transport,
                    format!("stream {i} failed"),
                ));
            }
            let (name, q) = &mut self.open[i];
            let n = max.min(q.len());
            Ok(q.drain(..n).map(|s| delivery(name, s)).collect())
        }
        async fn wait_any(
            &mut self,
            streams: &[usize],
            _wait: Duration,
        ) -> Result<(Vec<Delivery>, Vec<usize>)> {
            self.waits.push(streams.to_vec());
            let mut out = Vec::new();
            let mut woke = Vec::new();
            for (name, seq) in std::mem::take(&mut self.arriving) {
                let i = self.open.iter().position(|(s, _)| *s == name).unwrap();
                self.open[i].1.push_back(seq);
                if streams.contains(&i) && !woke.contains(&i) {
                    // The wait returns one message of each stream that woke.
                    let s = self.open[i].1.pop_front().unwrap();
                    out.push(delivery(&name, s));
                    woke.push(i);
                }
            }
            Ok((out, woke))
        }
        async fn recover(&mut self, i: Option<usize>, _e: &Error) -> Result<()> {
            self.recovered.push(i);
            Ok(())
        }
    }

    const WAIT: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn reads_every_stream_in_turn_and_starts_each_call_at_the_next() {
        let mut f = Fake::with(&[("a", &[1, 2, 3]), ("b", &[1, 2]), ("c", &[1])]);
        let got = fetch(&mut f, Vec::new(), 4, WAIT).await.unwrap();
        assert_eq!(names(&got), ["a1", "a2", "a3", "b1"]);
        assert_eq!(f.reads, [(0, 4), (1, 1)]);
        // The next call starts at b: c is not starved by a.
        f.reads.clear();
        let got = fetch(&mut f, Vec::new(), 4, WAIT).await.unwrap();
        assert_eq!(names(&got), ["b2", "c1"]);
        assert_eq!(f.reads, [(1, 4), (2, 3), (0, 2)]);
        assert!(f.waits.is_empty(), "something was there: no wait");
    }

    #[tokio::test]
    async fn counts_what_the_caller_already_has() {
        let mut f = Fake::with(&[("a", &[1, 2, 3])]);
        let got = fetch(&mut f, vec![delivery("x", 9)], 3, WAIT)
            .await
            .unwrap();
        assert_eq!(names(&got), ["x9", "a1", "a2"]);
        let full = fetch(&mut f, vec![delivery("x", 8)], 1, WAIT)
            .await
            .unwrap();
        assert_eq!(names(&full), ["x8"]);
        assert_eq!(f.reads, [(0, 2)], "nothing read once max is reached");
    }

    #[tokio::test]
    async fn waits_on_at_most_max_streams_then_tops_up_from_those_that_woke() {
        let mut f = Fake::with(&[("a", &[]), ("b", &[]), ("c", &[])]);
        f.arriving = vec![("b".into(), 1), ("b".into(), 2), ("b".into(), 3)];
        let got = fetch(&mut f, Vec::new(), 2, WAIT).await.unwrap();
        // One message with the wake-up, the next from the top-up read; b3 stays.
        assert_eq!(names(&got), ["b1", "b2"]);
        assert_eq!(
            f.waits,
            [vec![0, 1]],
            "waited on max = 2 streams, from the first"
        );
        assert_eq!(f.reads, [(0, 2), (1, 2), (2, 2), (1, 1)]);
        let got = fetch(&mut f, Vec::new(), 5, WAIT).await.unwrap();
        assert_eq!(names(&got), ["b3"]);
    }

    #[tokio::test]
    async fn a_short_wait_does_not_wait() {
        let mut f = Fake::with(&[("a", &[])]);
        f.arriving = vec![("a".into(), 1)];
        let got = fetch(&mut f, Vec::new(), 5, Duration::from_millis(5))
            .await
            .unwrap();
        assert!(got.is_empty());
        assert!(f.waits.is_empty());
    }

    #[tokio::test]
    async fn a_failed_read_keeps_what_came_before_it_and_lets_the_binding_recover() {
        let mut f = Fake::with(&[("a", &[1]), ("b", &[1]), ("c", &[1])]);
        f.fail_read = Some(1);
        let got = fetch(&mut f, Vec::new(), 10, WAIT).await.unwrap();
        assert_eq!(names(&got), ["a1"]);
        assert_eq!(f.recovered, [Some(1)]);
        // Starting at the failing stream, with nothing before it: the error.
        let e = fetch(&mut f, Vec::new(), 10, WAIT).await.unwrap_err();
        assert_eq!(e.message(), "stream 1 failed");
        assert_eq!(f.recovered, [Some(1), Some(1)]);
    }

    #[tokio::test]
    async fn without_the_lease_nothing_is_read() {
        let mut f = Fake::with(&[("a", &[1])]);
        f.lease_ok = false;
        f.arriving = vec![("a".into(), 2)];
        let got = fetch(&mut f, Vec::new(), 10, WAIT).await.unwrap();
        assert!(got.is_empty());
        assert!(f.reads.is_empty() && f.waits.is_empty());
    }

    #[tokio::test]
    async fn joins_streams_created_later_at_most_once_a_second() {
        let mut f = Fake::with(&[("a", &[])]);
        join_streams(&mut f, WAIT).await.unwrap();
        assert_eq!(f.listed, 1);
        f.existing.push("b".into());
        join_streams(&mut f, WAIT).await.unwrap();
        assert_eq!((f.listed, f.len()), (1, 1), "listed again within a second");
        f.live.last_discovery = Some(Instant::now() - DISCOVER_EVERY);
        join_streams(&mut f, WAIT).await.unwrap();
        assert_eq!(f.listed, 2);
        assert!(f.is_open("b"));
        // A new stream starts empty here: it is read from its own beginning by the binding.
        assert_eq!(f.open[1].1.len(), 0);
    }

    #[tokio::test]
    async fn fixed_streams_are_not_listed_again() {
        let mut f = Fake::with(&[("a", &[])]);
        f.fixed = true;
        f.existing.push("b".into());
        join_streams(&mut f, WAIT).await.unwrap();
        assert_eq!((f.listed, f.len()), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn without_any_stream_it_looks_until_the_wait_is_over() {
        let mut f = Fake::default();
        let started = tokio::time::Instant::now();
        join_streams(&mut f, Duration::from_millis(120))
            .await
            .unwrap();
        assert_eq!(f.len(), 0);
        // At once, then after 50, 100 and 120 ms.
        assert_eq!(f.listed, 4);
        assert_eq!(started.elapsed(), Duration::from_millis(120));
    }
}
