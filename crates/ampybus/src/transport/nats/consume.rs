//! Consuming: durable pull consumers with explicit ack, one per stream a pattern spans, merged
//! into one [`Subscription`].
//!
//! * `SubscribeSpec::durable` names the consumer on every stream; instances using the same
//!   name share the work (pull consumers hand each message to one puller).
//! * AckWait = `SubscribeSpec::ack_deadline`; `MaxDeliver` unlimited (the runtime counts
//!   attempts and dead-letters itself, so the server never drops a message);
//!   `max_ack_pending` from [`super::NatsOptions::max_ack_pending`].
//! * `StartAt` maps to deliver policy all / new / by start time, for a new consumer; an
//!   existing one resumes where it was (its ack wait and max ack pending are updated to ours).
//! * `fetch(max, wait)`: the multi-stream layer's merged fetch (`transport::multi`): a
//!   no-wait pull of each stream for what is there, starting each fetch at the next stream;
//!   when nothing is, a pull for one message on each stream that waits up to `wait` (in
//!   slices of at most 500 ms), then a no-wait pull for the rest of those that woke. No pull
//!   request is left open on the server between calls, so nothing is delivered to a puller
//!   that is gone.
//! * An ephemeral reader lists the streams of its pattern again every second and reads one
//!   created after it subscribed from its beginning; a durable consumer creates every stream
//!   its pattern can span when it subscribes.
//! * Settling: `+ACK` (then a flush, so an ack has reached the server when it returns),
//!   `-NAK {"delay": ns}`, `+WPI`.
//! * One active instance per durable name (default, [`crate::transport::InstanceOrder`]): a
//!   durable subscription fetches only while it holds the consumer's lease (`super::lease`,
//!   rules in `transport::lease`), each pull's wait cut to the lease's validity; after taking
//!   over from an instance that stopped without releasing, it fetches once nothing of the
//!   consumer is unacknowledged or an ack wait has passed, so the server's redeliveries (which
//!   JetStream serves before new messages) come first.

use super::{Shared, from_header_map, streams};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::transport::InstanceOrder;
use crate::transport::lease::{Admit, Exclusive, LeaseRef};
use crate::transport::multi::{self, LiveState, LiveStreams};
use crate::transport::{Delivery, DeliveryInfo, Settler, StartAt, SubscribeSpec, Subscription};
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_trait::async_trait;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A NATS consumer name from a durable name: `.`, `*`, `>`, whitespace, `/` and `\` become `_`.
pub(crate) fn consumer_name(durable: &str) -> String {
    durable
        .chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c == '/' || c == '\\' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

struct Part {
    stream: String,
    filter: String,
    consumer: PullConsumer,
    settler: Arc<PartSettler>,
    /// A pull failed or was not answered: open the consumer again before the next pull (the
    /// server may have restarted and lost the request, or the consumer may be gone).
    stale: bool,
}

struct PartSettler {
    client: async_nats::Client,
    replies: Mutex<HashMap<u64, async_nats::Subject>>,
    ack_none: bool,
    where_: String,
    flush_timeout: Duration,
    /// The consumer's lease, when one instance is active at a time.
    lease: Option<LeaseRef>,
}

impl PartSettler {
    fn reply(&self, seq: u64, take: bool) -> Option<async_nats::Subject> {
        let mut m = self.replies.lock().unwrap_or_else(|p| p.into_inner());
        if take {
            m.remove(&seq)
        } else {
            m.get(&seq).cloned()
        }
    }

    async fn send(&self, reply: async_nats::Subject, body: bytes::Bytes) -> Result<()> {
        self.client.publish(reply, body).await.map_err(|e| {
            Error::with_source(
                ErrorKind::Transport,
                format!("{}: settling a delivery failed", self.where_),
                e,
            )
        })
    }
}

#[async_trait]
impl Settler for PartSettler {
    async fn ack(&self, sequences: &[u64]) -> Result<()> {
        if self.ack_none {
            return Ok(());
        }
        // The reply subjects taken: put back if the acks are not confirmed flushed, so the
        // runtime's retry of this ack sends them again (after a reconnect) instead of finding
        // nothing to ack and leaving the messages to be redelivered.
        let mut taken = Vec::with_capacity(sequences.len());
        let mut failed = None;
        for &seq in sequences {
            match self.reply(seq, true) {
                Some(r) => {
                    taken.push((seq, r.clone()));
                    if let Err(e) = self.send(r, bytes::Bytes::from_static(b"+ACK")).await {
                        failed = Some(e);
                        break;
                    }
                }
                None => {
                    tracing::debug!(seq, "nats: ack of a sequence with no outstanding delivery")
                }
            }
        }
        let sent = taken.len();
        if failed.is_none() && sent > 0 {
            failed = match tokio::time::timeout(self.flush_timeout, self.client.flush()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(Error::with_source(
                    ErrorKind::Transport,
                    format!("{}: flushing {sent} acks failed", self.where_),
                    e,
                )),
                Err(_) => Some(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{}: {sent} acks not confirmed flushed within {:?} (disconnected?)",
                        self.where_, self.flush_timeout
                    ),
                )),
            };
        }
        if let Some(e) = failed {
            let mut m = self.replies.lock().unwrap_or_else(|p| p.into_inner());
            for (seq, r) in taken {
                m.entry(seq).or_insert(r);
            }
            return Err(e);
        }
        // Counted as settled for the lease only once flushed: a failed ack keeps the lease
        // from being released as clean.
        if let Some(l) = &self.lease {
            l.settled(sent);
        }
        Ok(())
    }

    async fn nack(&self, sequence: u64, delay: Duration) -> Result<()> {
        if self.ack_none {
            return Ok(());
        }
        let Some(r) = self.reply(sequence, true) else {
            return Ok(());
        };
        let body = if delay.is_zero() {
            bytes::Bytes::from_static(b"-NAK")
        } else {
            bytes::Bytes::from(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()))
        };
        self.send(r, body).await?;
        if let Some(l) = &self.lease {
            l.settled(1);
        }
        Ok(())
    }

    async fn in_progress(&self, sequence: u64) -> Result<()> {
        if self.ack_none {
            return Ok(());
        }
        if self.lease.as_ref().is_some_and(|l| !l.may_extend()) {
            // The lease is gone: a successor counts on this delivery's deadline.
            tracing::debug!(
                seq = sequence,
                "nats: not extending a delivery (lease not held)"
            );
            return Ok(());
        }
        match self.reply(sequence, false) {
            Some(r) => self.send(r, bytes::Bytes::from_static(b"+WPI")).await,
            None => Ok(()),
        }
    }
}

/// The longest single waiting pull of a fetch (a longer wait is several pulls).
const WAIT_SLICE: Duration = Duration::from_millis(500);

pub(crate) struct NatsSubscription {
    shared: Arc<Shared>,
    spec: SubscribeSpec,
    parts: Vec<Part>,
    /// The merged fetch over the parts (`transport::multi`).
    live: LiveState,
    where_: String,
    /// One shared name per subject received.
    names: crate::envelope::TopicNames,
    /// Deliveries taken at a takeover, in stream order, handed out before anything else.
    takeover: std::collections::VecDeque<Delivery>,
    takeover_extended: std::time::Instant,
    /// One active instance per durable name (dropped last: it releases the lease).
    exclusive: Option<Exclusive>,
}

pub(crate) async fn subscribe(
    shared: &Arc<Shared>,
    spec: SubscribeSpec,
) -> Result<Box<dyn Subscription>> {
    // A durable consumer needs its streams (it starts at their earliest message); an
    // ephemeral reader only reads what exists.
    let targets =
        streams::streams_for_pattern(shared, &spec.pattern, spec.durable.is_some()).await?;
    let exclusive = match &spec.durable {
        Some(d) if shared.opts.order == InstanceOrder::AcrossInstances => {
            let name = consumer_name(d);
            Some(Exclusive::new(
                Arc::new(super::lease::NatsLease::new(shared, &name)),
                spec.ack_deadline.max(Duration::from_millis(100)),
                name,
            ))
        }
        _ => None,
    };
    let mut sub = NatsSubscription {
        shared: shared.clone(),
        spec,
        parts: Vec::with_capacity(targets.len()),
        live: LiveState::default(),
        where_: shared.where_(),
        names: Default::default(),
        takeover: Default::default(),
        takeover_extended: std::time::Instant::now(),
        exclusive,
    };
    for (stream, filter) in targets {
        let start = sub.spec.start;
        sub.add_part(&stream.name, filter, start).await?;
    }
    Ok(Box::new(sub))
}

fn deliver_policy(start: StartAt) -> DeliverPolicy {
    match start {
        StartAt::Earliest => DeliverPolicy::All,
        StartAt::Latest => DeliverPolicy::New,
        StartAt::Time(t) => DeliverPolicy::ByStartTime { start_time: t },
    }
}

async fn open_consumer(
    shared: &Shared,
    stream: &str,
    filter: &str,
    spec: &SubscribeSpec,
) -> Result<PullConsumer> {
    let where_ = format!("{} stream {stream}", shared.where_());
    let js = &shared.js;
    let api = |what: String, e: Box<dyn std::error::Error + Send + Sync>| {
        let text = e.to_string();
        let kind = if text.contains("timed out") {
            ErrorKind::Timeout
        } else {
            ErrorKind::Transport
        };
        Error::with_source(kind, format!("{where_}: {what}: {text}"), e)
    };
    let Some(durable) = &spec.durable else {
        let cfg = pull::Config {
            deliver_policy: deliver_policy(spec.start),
            ack_policy: AckPolicy::None,
            filter_subject: filter.to_owned(),
            inactive_threshold: Duration::from_secs(60),
            replay_policy: consumer::ReplayPolicy::Instant,
            ..Default::default()
        };
        return js
            .create_consumer_on_stream(cfg, stream)
            .await
            .map_err(|e| {
                api(
                    format!("creating an ephemeral consumer on `{filter}`"),
                    e.into(),
                )
            });
    };
    let name = consumer_name(durable);
    if name.is_empty() {
        return Err(Error::config("subscribe: empty durable consumer name"));
    }
    let ack_wait = spec.ack_deadline.max(Duration::from_millis(100));
    match js
        .get_consumer_from_stream::<pull::Config, _, _>(&name, stream)
        .await
    {
        Ok(mut c) => {
            let info = c
                .info()
                .await
                .map_err(|e| api(format!("reading consumer {name}"), e.into()))?
                .clone();
            let have = info.config;
            if have.filter_subject != filter {
                return Err(Error::config(format!(
                    "{where_}: durable consumer {name} already exists with filter `{}`, not `{filter}`; use another consumer name or delete it",
                    have.filter_subject
                )));
            }
            if have.ack_policy != AckPolicy::Explicit {
                return Err(Error::config(format!(
                    "{where_}: durable consumer {name} exists with ack policy {:?}; ampybus needs explicit acks",
                    have.ack_policy
                )));
            }
            if have.ack_wait != ack_wait || have.max_ack_pending != shared.opts.max_ack_pending {
                let cfg = pull::Config {
                    durable_name: Some(name.clone()),
                    deliver_policy: have.deliver_policy,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait,
                    max_deliver: have.max_deliver,
                    filter_subject: have.filter_subject.clone(),
                    replay_policy: have.replay_policy,
                    max_waiting: have.max_waiting,
                    max_ack_pending: shared.opts.max_ack_pending,
                    description: have.description.clone(),
                    num_replicas: have.num_replicas,
                    inactive_threshold: have.inactive_threshold,
                    ..Default::default()
                };
                match js.create_consumer_on_stream(cfg, stream).await {
                    Ok(c2) => return Ok(c2),
                    Err(e) => {
                        tracing::warn!(consumer = %name, stream, error = %e, "nats: could not update ack wait / max ack pending of an existing consumer; using it as it is");
                    }
                }
            }
            Ok(c)
        }
        Err(_) => {
            let cfg = pull::Config {
                durable_name: Some(name.clone()),
                description: Some("ampybus durable consumer".to_owned()),
                deliver_policy: deliver_policy(spec.start),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                max_deliver: -1,
                filter_subject: filter.to_owned(),
                replay_policy: consumer::ReplayPolicy::Instant,
                max_ack_pending: shared.opts.max_ack_pending,
                num_replicas: 0,
                inactive_threshold: shared.opts.consumer_inactive.unwrap_or_default(),
                ..Default::default()
            };
            js.create_consumer_on_stream(cfg, stream)
                .await
                .map_err(|e| {
                    api(
                        format!("creating durable consumer {name} on `{filter}`"),
                        e.into(),
                    )
                })
        }
    }
}

impl NatsSubscription {
    /// Opens the consumer of `stream` (filtered by `filter`), starting at `start` when it is
    /// new, as the next part.
    async fn add_part(&mut self, stream: &str, filter: String, start: StartAt) -> Result<()> {
        let mut spec = self.spec.clone();
        spec.start = start;
        let consumer = open_consumer(&self.shared, stream, &filter, &spec).await?;
        let shared = &self.shared;
        self.parts.push(Part {
            stream: stream.to_owned(),
            filter,
            stale: false,
            consumer,
            settler: Arc::new(PartSettler {
                client: shared.client.clone(),
                replies: Mutex::new(HashMap::new()),
                ack_none: spec.durable.is_none(),
                where_: format!("{} stream {stream}", shared.where_()),
                flush_timeout: shared.opts.request_timeout,
                lease: self.exclusive.as_ref().map(Exclusive::handle),
            }),
        });
        Ok(())
    }

    /// At a takeover: pulls what the consumer has unacknowledged (redelivered first by the
    /// server, but in the order their deadlines ran out — a deadline extended by the previous
    /// holder runs out later — or their releases came) plus whatever follows in the same
    /// pulls, and keeps it sorted by stream sequence, so every key's messages go out in
    /// publish order. Their deadlines are extended once here and while they wait.
    async fn fill_takeover(&mut self) -> Result<()> {
        let want = self.backlog().await? as usize;
        let mut got: Vec<(usize, Delivery)> = Vec::new();
        for i in 0..self.parts.len() {
            while got.len() < want {
                let batch = self.pull(i, (want - got.len()).min(256), None).await?;
                if batch.is_empty() {
                    break;
                }
                got.extend(self.convert(i, batch).into_iter().map(|d| (i, d)));
            }
        }
        got.sort_by_key(|(i, d)| (*i, d.info.sequence));
        for (_, d) in &got {
            if let Err(e) = d.in_progress().await {
                tracing::debug!(error = %e, "nats: extending a taken-over delivery failed");
            }
        }
        if !got.is_empty() {
            tracing::info!(
                deliveries = got.len(),
                "nats: took over the consumer's unacknowledged messages, in stream order"
            );
        }
        self.takeover = got.into_iter().map(|(_, d)| d).collect();
        self.takeover_extended = std::time::Instant::now();
        Ok(())
    }

    /// Hands out up to `max` taken-over deliveries, extending the deadlines of those still
    /// waiting every third of the ack deadline.
    async fn next_taken_over(&mut self, max: usize) -> Vec<Delivery> {
        let n = max.min(self.takeover.len());
        let out: Vec<Delivery> = self.takeover.drain(..n).collect();
        if self.takeover_extended.elapsed() > self.spec.ack_deadline / 3 {
            self.takeover_extended = std::time::Instant::now();
            for d in &self.takeover {
                let _ = d.in_progress().await;
            }
        }
        out
    }

    /// The consumer's deliveries not yet acknowledged on the server, over every stream.
    async fn backlog(&self) -> Result<u64> {
        let Some(d) = &self.spec.durable else {
            return Ok(0);
        };
        let name = consumer_name(d);
        let mut n = 0u64;
        for p in &self.parts {
            let c = self
                .shared
                .js
                .get_consumer_from_stream::<pull::Config, _, _>(&name, &p.stream)
                .await
                .map_err(|e| {
                    Error::with_source(
                        ErrorKind::Transport,
                        format!(
                            "{} stream {}: reading consumer {name}",
                            self.where_, p.stream
                        ),
                        e,
                    )
                })?;
            n += c.cached_info().num_ack_pending as u64;
        }
        Ok(n)
    }

    fn convert(&mut self, part: usize, msgs: Vec<async_nats::jetstream::Message>) -> Vec<Delivery> {
        let p = &self.parts[part];
        let names = &mut self.names;
        let mut out = Vec::with_capacity(msgs.len());
        for m in msgs {
            let info = match m.info() {
                Ok(i) => DeliveryInfo {
                    sequence: i.stream_sequence,
                    delivery_count: u32::try_from(i.delivered.max(1)).unwrap_or(u32::MAX),
                    stored_at: i.published,
                },
                Err(e) => {
                    tracing::warn!(stream = %p.stream, error = %e, "nats: a delivery without JetStream metadata was skipped");
                    continue;
                }
            };
            if let Some(r) = m.message.reply.clone() {
                let before = p
                    .settler
                    .replies
                    .lock()
                    .unwrap_or_else(|x| x.into_inner())
                    .insert(info.sequence, r);
                if before.is_none()
                    && let Some(l) = &p.settler.lease
                {
                    l.handed(1);
                }
            }
            let envelope = Envelope {
                topic: names.get(m.message.subject.as_str()),
                headers: from_header_map(m.message.headers.as_ref()),
                payload: m.message.payload.clone(),
            };
            out.push(Delivery::new(envelope, info, p.settler.clone()));
        }
        out
    }

    async fn pull(
        &self,
        part: usize,
        max: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<async_nats::jetstream::Message>> {
        if !self.exclusive.as_ref().is_none_or(Exclusive::may_fetch) {
            // The lease is not valid long enough for another pull (one fetch sends several).
            return Ok(Vec::new());
        }
        // A pull the server never answers (lost in a disconnect, server restarted) must not
        // hang the consumer: bound it, and reopen the consumer before the next one.
        let limit = wait.unwrap_or_default() + self.shared.opts.request_timeout;
        match tokio::time::timeout(limit, self.pull_inner(part, max, wait)).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "{} stream {}: pull request not answered within {limit:?}",
                    self.where_, self.parts[part].stream
                ),
            )),
        }
    }

    async fn pull_inner(
        &self,
        part: usize,
        max: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<async_nats::jetstream::Message>> {
        let p = &self.parts[part];
        let batch = match wait {
            None => p.consumer.fetch().max_messages(max).messages().await,
            Some(w) => {
                p.consumer
                    .batch()
                    .max_messages(max)
                    .expires(w)
                    .messages()
                    .await
            }
        }
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Transport,
                format!("{} stream {}: pull request failed", self.where_, p.stream),
                e,
            )
        })?;
        let mut batch = std::pin::pin!(batch);
        let mut out = Vec::new();
        while let Some(m) = batch.next().await {
            match m {
                Ok(m) => out.push(m),
                Err(e) => {
                    if out.is_empty() {
                        return Err(Error::with_source(
                            ErrorKind::Transport,
                            format!("{} stream {}: pull failed", self.where_, p.stream),
                            e,
                        ));
                    }
                    tracing::debug!(error = %e, "nats: pull ended early");
                    break;
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl LiveStreams for NatsSubscription {
    type Found = (Arc<streams::StreamRef>, String);

    fn live(&mut self) -> &mut LiveState {
        &mut self.live
    }

    fn len(&self) -> usize {
        self.parts.len()
    }

    /// A durable consumer created every stream its pattern can span when it subscribed.
    fn discovers(&self) -> bool {
        self.spec.durable.is_none()
    }

    fn name(found: &Self::Found) -> &str {
        &found.0.name
    }

    fn is_open(&self, name: &str) -> bool {
        self.parts.iter().any(|p| p.stream == name)
    }

    /// One `STREAM.NAMES` request for the streams whose subjects meet the pattern; only when
    /// it names one not open yet, the pattern's streams are resolved (a request per env and
    /// domain the pattern spans that has no stream known yet).
    async fn spanned(&mut self) -> Result<Vec<Self::Found>> {
        let names =
            streams::stream_names_for(&self.shared.js, &self.where_, self.spec.pattern.as_str())
                .await?;
        if names.iter().all(|n| self.is_open(n)) {
            return Ok(Vec::new());
        }
        streams::streams_for_pattern(&self.shared, &self.spec.pattern, false).await
    }

    async fn open(&mut self, (stream, filter): Self::Found) -> Result<()> {
        self.add_part(&stream.name, filter, StartAt::Earliest).await
    }

    fn may_read(&self) -> bool {
        self.exclusive.as_ref().is_none_or(Exclusive::may_fetch)
    }

    async fn read(&mut self, i: usize, max: usize) -> Result<Vec<Delivery>> {
        let got = self.pull(i, max, None).await?;
        Ok(self.convert(i, got))
    }

    /// One waiting pull for one message on each stream, in pulls of at most WAIT_SLICE
    /// until one arrives or `wait` is over: a waiting pull of several seconds was seen to
    /// miss messages stored while it waited (nats-server 2.9), a short one does not.
    async fn wait_any(
        &mut self,
        waiting: &[usize],
        wait: Duration,
    ) -> Result<(Vec<Delivery>, Vec<usize>)> {
        let deadline = std::time::Instant::now() + wait;
        let mut err = None;
        let mut out = Vec::new();
        let mut woke = Vec::new();
        loop {
            let slice = deadline
                .saturating_duration_since(std::time::Instant::now())
                .min(WAIT_SLICE);
            let results =
                futures::future::join_all(waiting.iter().map(|&i| self.pull(i, 1, Some(slice))))
                    .await;
            for (&i, r) in waiting.iter().zip(results) {
                match r {
                    Ok(got) if !got.is_empty() => {
                        woke.push(i);
                        out.extend(self.convert(i, got));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.parts[i].stale = true;
                        err = Some(e);
                    }
                }
            }
            if !out.is_empty()
                || err.is_some()
                || deadline.saturating_duration_since(std::time::Instant::now())
                    < Duration::from_millis(20)
            {
                break;
            }
        }
        match err {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok((out, woke)),
        }
    }

    /// Reopens the part's consumer before its next pull (a failed wait marked its own).
    async fn recover(&mut self, i: Option<usize>, _e: &Error) -> Result<()> {
        if let Some(i) = i {
            self.parts[i].stale = true;
        }
        Ok(())
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        // An ephemeral reader joins the streams of its pattern created after it subscribed
        // (while there is none, it waits for the first).
        multi::join_streams(self, wait).await?;
        if self.parts.is_empty() {
            return Ok(Vec::new());
        }
        let mut wait = wait;
        if let Some(ex) = &self.exclusive {
            let admit = ex.admit(wait, || self.backlog()).await?;
            match admit {
                Admit::Idle => return Ok(Vec::new()),
                Admit::Go { budget, took_over } => {
                    wait = wait.min(budget);
                    if took_over && let Err(e) = self.fill_takeover().await {
                        tracing::warn!(error = %e, "nats: taking over unacknowledged messages failed; they come in the server's order");
                    }
                }
            }
        }
        if !self.takeover.is_empty() {
            return Ok(self.next_taken_over(max).await);
        }
        for i in 0..self.parts.len() {
            if self.parts[i].stale {
                let (stream, filter) = (self.parts[i].stream.clone(), self.parts[i].filter.clone());
                let c = open_consumer(&self.shared, &stream, &filter, &self.spec).await?;
                self.parts[i].consumer = c;
                self.parts[i].stale = false;
                tracing::info!(stream = %stream, "nats: consumer reopened after a failed pull");
            }
        }
        multi::fetch_merged(self, Vec::new(), max, wait).await
    }
}
