//! One handling attempt: prepare → dedupe → handle → settle (retry, dead-letter, release).

use super::*;

/// Why a message could not be built for its handler (see `Shared::check_message`).
pub(super) enum Refusal {
    /// For good: to the DLQ with this code and reason.
    DeadLetter(DlqCode, String),
    /// Its blob could not be fetched now: retried.
    BlobUnavailable(String),
}

/// What the dedupe stage found (see `Shared::claim_keys`).
pub(super) enum Claiming<'a> {
    /// Handle it, holding the claim on its keys (`None`: dedupe off).
    Go(Option<Claim<'a>>),
    /// Its batch was not looked up: ask the store, holding the claim meanwhile.
    Lookup(Claim<'a>),
    /// Another message with one of its keys is being handled here: try again shortly.
    Wait,
    /// Applied before: ack it without calling the handler, then let go of the claim it
    /// holds, if any.
    Applied(Option<Claim<'a>>),
}

/// What the settle stage leaves to do (see `Shared::settle`).
pub(super) enum Settle {
    /// Settled (acked and recorded, or not to be settled here).
    Done(Step),
    /// Hand it back to the transport unsettled.
    Release(Item),
    /// To the DLQ with this code and reason.
    DeadLetter(Item, DlqCode, String),
    /// Retry (attempt number, the delay the handler asked for), or give up after the last.
    Retry(Item, u32, Option<Duration>),
}

/// What one attempt came to: the `result` of its log line and span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AttemptResult {
    /// The handler succeeded; the message is acked.
    Ok,
    /// The message goes round again after a delay.
    Retry,
    /// The message went to the DLQ.
    Dlq,
    /// Applied before (dedupe): acked without calling the handler.
    Skipped,
    /// Another message with the same dedupe key is being handled: it waits.
    Deferred,
    /// Handed back to the broker unsettled (shutdown).
    Released,
}

impl AttemptResult {
    /// The text of the result in logs and spans.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Ok => "ok",
            AttemptResult::Retry => "retry",
            AttemptResult::Dlq => "dlq",
            AttemptResult::Skipped => "skipped",
            AttemptResult::Deferred => "deferred",
            AttemptResult::Released => "released",
        }
    }
}

/// Why a message goes round again: the `reason` label of `bus_retries_total`, in the order of
/// [`crate::obs::RETRY_REASONS`] (the metric handles are indexed by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RetryReason {
    /// The handler asked for it or failed.
    Handler = 0,
    /// The payload's blob could not be fetched.
    BlobUnavailable = 1,
}

/// What one handling attempt did, for its span, metrics and log line.
pub(super) struct Attempt {
    /// `None` with observability off.
    pub(super) handles: Option<TopicSlot>,
    pub(super) result: AttemptResult,
    pub(super) dlq_code: Option<DlqCode>,
    pub(super) retry_reason: RetryReason,
    pub(super) latency_ms: Option<f64>,
}

impl Attempt {
    /// A message going round again takes its topic's metric handles with it.
    pub(super) fn give_back(&mut self, step: Step) -> Step {
        match step {
            Step::Retry(mut item, delay) => {
                if item.metrics.is_none() {
                    item.metrics = self.handles.take();
                }
                Step::Retry(item, delay)
            }
            step => step,
        }
    }

    pub(super) fn off() -> Attempt {
        Attempt {
            handles: None,
            result: AttemptResult::Released,
            dlq_code: None,
            retry_reason: RetryReason::Handler,
            latency_ms: None,
        }
    }
}

impl Shared {
    /// Whether a retry of `item` parks its key (strict order).
    pub(super) fn strict_for(&self, item: &Item) -> bool {
        self.strict.unwrap_or_else(|| {
            let domain = match (&item.msg, &item.prepared) {
                (Some(m), _) => Some(m.topic.domain()),
                (None, Some((t, _))) => Some(t.domain()),
                (None, None) => item
                    .delivery
                    .envelope
                    .topic
                    .split('.')
                    .nth(2)
                    .and_then(|d| d.parse().ok()),
            };
            domain.is_some_and(|d| STRICT_DOMAINS.contains(&d))
        })
    }

    pub(super) async fn after(self: &Arc<Self>, id: u32, step: Step) {
        let wake = match step {
            Step::Finished => self
                .sched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .finish(id),
            Step::Retry(item, delay) if self.strict_for(&item) => {
                {
                    let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                    let ks = &mut s.slots[id as usize];
                    ks.busy = false;
                    ks.parked = true;
                    let mut item = item;
                    item.parked_head = true;
                    ks.queue.push_front(item);
                }
                let shared = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let queued = {
                        let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(ks) = s.slots.get_mut(id as usize) {
                            ks.parked = false;
                        }
                        s.make_ready(id)
                    };
                    if queued {
                        shared.notify.notify_one();
                    }
                });
                false
            }
            Step::Retry(item, delay) => {
                let (rid, wake) = {
                    let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                    let rid = s.next_id;
                    s.next_id += 1;
                    s.delayed.insert(rid, (id, item));
                    let ks = &mut s.slots[id as usize];
                    ks.delayed += 1;
                    ks.busy = false;
                    (rid, s.make_ready(id))
                };
                let shared = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let queued = {
                        let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                        match s.delayed.remove(&rid) {
                            Some((id, it)) => {
                                s.slots[id as usize].delayed -= 1;
                                s.push(id, it)
                            }
                            None => false,
                        }
                    };
                    if queued {
                        shared.notify.notify_one();
                    }
                });
                wake
            }
        };
        if wake {
            self.notify.notify_one();
        }
    }

    /// One handling attempt: prepare (`check_message`, then the payload decoded) → dedupe
    /// (`claim_keys`) → handle (`handler_now`, else the handler's future) → settle
    /// (`settle`). The stages are plain functions and the awaits stay here, so that the
    /// common path — a message that needs no decoding, whose handler answers at once and
    /// which is acked — runs no nested future.
    pub(super) async fn process_attempt(
        &self,
        mut item: Item,
        att: &mut Attempt,
        tally: &mut Tally,
    ) -> Step {
        // The last reading of the run's clock starts this message's handler unless something
        // waits before it. Before anything waits, the run's tally is written: what this worker
        // counted must not wait for it (a test, or an operator, reading `handled_ok` while a
        // handler waits for a message of theirs).
        let mut now = tally.last.take();
        if item.msg.is_none() {
            let built = match self.check_message(&mut item) {
                Ok(true) => Ok(()),
                Ok(false) => {
                    now = None;
                    tally.end_run(self);
                    let decoded = {
                        let Some((_, headers)) = item.prepared.as_ref() else {
                            unreachable!("checked above");
                        };
                        self.bus
                            .codec()
                            .decode_detailed(headers, &item.delivery.envelope.payload)
                            .await
                    };
                    self.take_decoded(&mut item, decoded)
                }
                Err(r) => Err(r),
            };
            match built {
                Ok(()) => {}
                Err(Refusal::DeadLetter(code, reason)) => {
                    tally.end_run(self);
                    return self.dead_letter(item, code, reason, att).await;
                }
                Err(Refusal::BlobUnavailable(e)) => {
                    tally.end_run(self);
                    let attempt = self.next_attempt(&mut item);
                    item.last_error = e;
                    att.retry_reason = RetryReason::BlobUnavailable;
                    return self.retry_or_give_up(item, attempt, None, att).await;
                }
            }
        }
        let claim = match self.claim_keys(&mut item, att) {
            Claiming::Go(claim) => claim,
            Claiming::Lookup(claim) => {
                now = None;
                tally.end_run(self);
                if self.already_applied(&item.keys).await {
                    self.skip(att);
                    self.done(item, Keys::default());
                    drop(claim);
                    return Step::Finished;
                }
                Some(claim)
            }
            Claiming::Wait => return Step::Retry(item, CLAIM_WAIT),
            Claiming::Applied(claim) => {
                self.done(item, Keys::default());
                drop(claim);
                return Step::Finished;
            }
        };
        let attempt = self.next_attempt(&mut item);
        if item.local_attempts > 1 {
            now = None;
            tally.end_run(self);
            let _ = item.delivery.in_progress().await;
            item.refreshed = Instant::now();
        }
        // Borrowed where it is (moving it out and back copied the message twice).
        let Some(msg) = item.msg.as_ref() else {
            unreachable!("built above");
        };
        let started = self.before_handler(msg, att, now, tally);
        let outcome = match self.handler_now(msg) {
            Some(now) => Some(now),
            None => {
                let mut fut =
                    std::pin::pin!(AssertUnwindSafe(self.handler.handle(msg)).catch_unwind());
                // Most handlers finish in their first poll: no timer, no watch until they do
                // not.
                match futures::poll!(fut.as_mut()) {
                    std::task::Poll::Ready(r) => {
                        // Answered without waiting: workers may take runs of messages.
                        self.set_answers_at_once(true);
                        Some(r)
                    }
                    std::task::Poll::Pending => {
                        self.set_answers_at_once(false);
                        tally.end_run(self);
                        let beat = (self.ack_deadline / 3).max(Duration::from_millis(10));
                        let mut hb =
                            tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
                        let mut phase = self.phase.clone();
                        loop {
                            tokio::select! {
                                r = &mut fut => break Some(r),
                                _ = hb.tick() => {
                                    let _ = item.delivery.in_progress().await;
                                }
                                _ = wait_phase(&mut phase, Phase::HardStop) => break None,
                            }
                        }
                    }
                }
            }
        };
        self.after_handler(started, att, tally);
        match self.settle(item, outcome, claim, attempt, att, tally) {
            Settle::Done(step) => step,
            Settle::Release(item) => {
                tally.end_run(self);
                self.release(item).await;
                Step::Finished
            }
            Settle::DeadLetter(item, code, reason) => {
                tally.end_run(self);
                self.dead_letter(item, code, reason, att).await
            }
            Settle::Retry(item, attempt, after) => {
                tally.end_run(self);
                self.retry_or_give_up(item, attempt, after, att).await
            }
        }
    }

    /// Prepare: the message's topic and headers parsed (when the fetcher has not), checked
    /// against the registry's schemas and the payload limit. `Ok(true)`: the message is
    /// built (a payload carried inline and not compressed is handed over as it came);
    /// `Ok(false)`: its payload must go through the codec first ([`Shared::take_decoded`]).
    #[inline]
    fn check_message(&self, item: &mut Item) -> std::result::Result<bool, Refusal> {
        // The prepared headers stay in the item until the message is built, so that a dead
        // letter or a retry from here finds them (they may have been moved out of the
        // envelope).
        if item.prepared.is_none()
            && let Err(e) = self.prepare(item)
        {
            let reason = DlqCode::ContractViolation.reason(&e.to_string());
            return Err(Refusal::DeadLetter(DlqCode::ContractViolation, reason));
        }
        let Some((topic, headers)) = item.prepared.as_ref() else {
            unreachable!("prepared above");
        };
        if let Some(detail) = self
            .schemas
            .as_ref()
            .and_then(|g| g.mismatch(topic, headers))
        {
            let reason = DlqCode::SchemaMismatch.reason(&detail);
            return Err(Refusal::DeadLetter(DlqCode::SchemaMismatch, reason));
        }
        let env = &item.delivery.envelope;
        if env.payload.len() > self.max_payload {
            let reason = DlqCode::PayloadTooLarge.reason(&format!(
                "{} bytes as carried; this consumer's limit is {}",
                env.payload.len(),
                self.max_payload
            ));
            return Err(Refusal::DeadLetter(DlqCode::PayloadTooLarge, reason));
        }
        let plain = headers.blob_ref().is_none()
            && !headers
                .content_encoding()
                .is_some_and(|ce| ce.eq_ignore_ascii_case("gzip"));
        if plain {
            // Moved, not cloned (`restore_envelope` gives it back before a dead letter).
            let payload = std::mem::take(&mut item.delivery.envelope.payload);
            item.payload_moved = true;
            self.take_decoded(item, Ok(payload))?;
        }
        Ok(plain)
    }

    /// The message built from its prepared topic and headers and its decoded payload (or
    /// why not).
    #[inline]
    fn take_decoded(
        &self,
        item: &mut Item,
        decoded: std::result::Result<bytes::Bytes, (DecodeFailure, Error)>,
    ) -> std::result::Result<(), Refusal> {
        match decoded {
            Ok(payload) if payload.len() > self.max_payload => {
                let len = payload.len();
                if item.payload_moved {
                    // The dead letter carries it.
                    item.delivery.envelope.payload = payload;
                    item.payload_moved = false;
                }
                let reason = DlqCode::PayloadTooLarge.reason(&format!(
                    "{} bytes after decoding; this consumer's limit is {}",
                    len, self.max_payload
                ));
                Err(Refusal::DeadLetter(DlqCode::PayloadTooLarge, reason))
            }
            Ok(payload) => {
                let (topic, headers) = item.prepared.take().expect("prepared before");
                item.msg = Some(Message {
                    topic,
                    headers,
                    payload,
                    info: item.delivery.info.clone(),
                });
                Ok(())
            }
            Err((DecodeFailure::Decode, e)) => Err(Refusal::DeadLetter(
                DlqCode::DecodeError,
                DlqCode::DecodeError.reason(&e.to_string()),
            )),
            Err((DecodeFailure::BlobHashMismatch, e)) => Err(Refusal::DeadLetter(
                DlqCode::BlobHashMismatch,
                DlqCode::BlobHashMismatch.reason(&e.to_string()),
            )),
            Err((DecodeFailure::BlobUnavailable, e)) => {
                Err(Refusal::BlobUnavailable(e.to_string()))
            }
        }
    }

    /// Dedupe: with a dedupe store, claims the message's keys in the key book and reads the
    /// answer of its batch's lookup (see [`Claiming`]).
    #[inline]
    fn claim_keys(&self, item: &mut Item, att: &mut Attempt) -> Claiming<'_> {
        if self.dedupe.is_none() {
            return Claiming::Go(None);
        }
        // Two messages with one dedupe key (e.g. the same `dedupe_key` under different
        // partition keys) never run at once here: the later one waits and then re-checks. A
        // key this process handled Ok keeps its claim until its record is written, so a twin
        // waits for that too; a key recorded since the batch lookup makes it a duplicate,
        // also for a retry whose twin was applied meanwhile.
        let claim = match Claim::take(&self.book, &item.keys) {
            Claimed::Taken(c) => c,
            Claimed::Busy => {
                att.result = AttemptResult::Deferred;
                self.counters.deferred.fetch_add(1, Ordering::SeqCst);
                return Claiming::Wait;
            }
            Claimed::Applied => {
                self.skip(att);
                return Claiming::Applied(None);
            }
        };
        if item.dedupe_checked {
            return Claiming::Go(Some(claim));
        }
        item.dedupe_checked = true;
        // The lookup stays with the message until it leaves the runtime: while it is held,
        // the key book keeps every record written since the batch was looked up.
        let answer = item.lookup.as_ref().and_then(|(l, first)| {
            // Read in place: the batch's flags are shared by all its messages.
            l.done.get().and_then(Option::as_ref).map(|flags| {
                let first = *first as usize;
                flags[first..first + item.keys.len()].iter().any(|b| *b)
            })
        });
        match answer {
            // Looked up with its batch; what this process applied since was found by the
            // claim.
            Some(false) => Claiming::Go(Some(claim)),
            Some(true) => {
                self.skip(att);
                Claiming::Applied(Some(claim))
            }
            None => Claiming::Lookup(claim),
        }
    }

    /// A duplicate: counted and acked without calling the handler.
    #[inline]
    fn skip(&self, att: &mut Attempt) {
        att.result = AttemptResult::Skipped;
        self.counters.skipped.fetch_add(1, Ordering::SeqCst);
    }

    /// Before the handler: the consumer's last-message time and the message's delivery
    /// latency; returns when the handler starts (observability on).
    #[inline]
    fn before_handler(
        &self,
        msg: &Message,
        att: &mut Attempt,
        now: Option<clock::Mono>,
        tally: &mut Tally,
    ) -> Option<clock::Mono> {
        let started = now.unwrap_or_else(clock::Mono::now);
        let now_us = clock::wall_micros(started);
        // Written at most once a millisecond: every worker on every core would otherwise
        // write this one cache line per message.
        if now_us.saturating_sub(self.last_message_us.load(Ordering::Relaxed)) >= 1000 {
            self.last_message_us.store(now_us, Ordering::Relaxed);
        }
        if let Some(slot) = att.handles {
            let produced = msg
                .headers
                .produced_at_micros()
                .or_else(|| msg.headers.produced_at_time().map(|t| t.timestamp_micros()));
            if let Some(t) = produced {
                let ms = (now_us.saturating_sub(t)) as f64 / 1000.0;
                let ms = ms.max(0.0);
                tally.latency(self, slot, ms);
                att.latency_ms = Some(ms);
            }
        }
        att.handles.is_some().then_some(started)
    }

    /// The handler's answer when it answers at once (`handle_now`), a panic included;
    /// `None`: it returns a future.
    #[inline]
    fn handler_now(&self, msg: &Message) -> Option<std::thread::Result<Outcome>> {
        let now = std::panic::catch_unwind(AssertUnwindSafe(|| self.handler.handle_now(msg)));
        if !matches!(now, Ok(None)) {
            self.set_answers_at_once(true);
        }
        now.transpose()
    }

    /// Notes whether the handler's last answer came without waiting (from
    /// [`Handler::handle_now`], or a future that finished in its first poll); written only
    /// when it changes, so that workers on every core read the line without taking it over.
    #[inline]
    fn set_answers_at_once(&self, at_once: bool) {
        if self.answers_at_once.load(Ordering::Relaxed) != at_once {
            self.answers_at_once.store(at_once, Ordering::Relaxed);
        }
    }

    /// After the handler: its duration observed.
    #[inline]
    fn after_handler(&self, started: Option<clock::Mono>, att: &Attempt, tally: &mut Tally) {
        if let (Some(slot), Some(started)) = (att.handles, started) {
            let ended = clock::Mono::now();
            tally.last = Some(ended);
            tally.duration(self, slot, ended.millis_since(started));
        }
    }

    /// Settle: what the handler's outcome (or its absence: stopped hard) does with the
    /// message. An `Ok` is acked and its keys recorded here; the rest is handed back to
    /// [`Shared::process_attempt`] to release, dead-letter or retry.
    #[inline]
    fn settle(
        &self,
        mut item: Item,
        outcome: Option<std::thread::Result<Outcome>>,
        claim: Option<Claim<'_>>,
        attempt: u32,
        att: &mut Attempt,
        tally: &mut Tally,
    ) -> Settle {
        match outcome {
            None => {
                att.result = AttemptResult::Released;
                Settle::Release(item)
            }
            Some(Err(panic)) => {
                let reason = DlqCode::HandlerPanic.reason(&panic_message(panic.as_ref()));
                Settle::DeadLetter(item, DlqCode::HandlerPanic, reason)
            }
            Some(Ok(Outcome::Ok)) => {
                let keys = match claim {
                    Some(c) => {
                        c.keep();
                        std::mem::take(&mut item.keys)
                    }
                    None => Keys::default(),
                };
                tally.handled_ok();
                att.result = AttemptResult::Ok;
                if let Some(slot) = att.handles {
                    tally.consumed(self, slot);
                }
                self.done(item, keys);
                Settle::Done(Step::Finished)
            }
            Some(Ok(Outcome::DeadLetter(r))) => {
                let code = DlqCode::from_reason(&r);
                let (code, reason) = if r.contains(':') && code != DlqCode::Other {
                    (
                        code,
                        DlqCode::reason(code, r.split_once(':').map_or("", |x| x.1)),
                    )
                } else {
                    (DlqCode::HandlerError, DlqCode::HandlerError.reason(&r))
                };
                Settle::DeadLetter(item, code, reason)
            }
            Some(Ok(Outcome::Retry { after })) => {
                item.last_error = format!("attempt {attempt}: handler asked to retry");
                Settle::Retry(item, attempt, after)
            }
            Some(Ok(Outcome::Failed { after, cause })) => {
                item.last_error = format!("attempt {attempt}: {cause}");
                Settle::Retry(item, attempt, after)
            }
        }
    }

    /// One handling attempt, observed: the metrics of its domain-level topic, a debug log
    /// line with its result, and — when the tracer records — a consumer span (child of the
    /// message's `traceparent`) with the handler running in its context.
    pub(super) async fn process(&self, mut item: Item, tally: &mut Tally) -> Step {
        if !self.obs_on {
            return self.process_attempt(item, &mut Attempt::off(), tally).await;
        }
        if item.metrics.is_none() && item.msg.is_none() && item.prepared.is_none() {
            // Not prepared yet (dedupe off): the topic's handles come with its parse, which
            // `process_attempt` then finds done (a failure is met again there and
            // dead-lettered).
            let _ = self.prepare(&mut item);
        }
        // The slot of the topic's handles (a number, no reference count); a retry gets it
        // back below.
        let handles = match item.metrics.take() {
            Some(h) => Some(h),
            // Parsed, but past the last slot of the handle table: no metrics.
            None if item.prepared.is_some() || item.msg.is_some() => None,
            // A topic that does not parse is labelled `invalid`.
            None => self.topic_metrics("invalid"),
        };
        let mut att = Attempt {
            handles,
            result: AttemptResult::Released,
            dlq_code: None,
            retry_reason: RetryReason::Handler,
            latency_ms: None,
        };
        let log = tracing::enabled!(tracing::Level::DEBUG);
        if !self.tracer.is_recording() && !log {
            let step = self.process_attempt(item, &mut att, tally).await;
            return att.give_back(step);
        }
        let env = &item.delivery.envelope;
        let (topic_label, headers) = match (&item.msg, &item.prepared) {
            (Some(m), _) => (m.topic.as_str(), &m.headers),
            (None, Some((t, h))) => (t.as_str(), h),
            (None, None) if item.metrics.is_some() => (env.topic.as_str(), &env.headers),
            (None, None) => ("invalid", &env.headers),
        };
        let span = self.tracer.start_consume(topic_label, headers, &self.name);
        let ids = log.then(|| {
            (
                env.topic.clone(),
                headers.message_id().unwrap_or_default().to_owned(),
            )
        });
        let step = if self.tracer.is_recording() {
            let cx = span.context().clone();
            self.process_attempt(item, &mut att, tally)
                .with_context(cx)
                .await
        } else {
            self.process_attempt(item, &mut att, tally).await
        };
        if let Some((topic, message_id)) = ids {
            tracing::debug!(
                consumer = %self.name,
                topic = %topic,
                message_id = %message_id,
                trace_id = %span.trace_id(),
                result = att.result.as_str(),
                latency_ms = att.latency_ms,
                "message handled"
            );
        }
        span.end(att.result.as_str(), att.dlq_code.map(DlqCode::as_str));
        att.give_back(step)
    }

    /// The metric handles of an attempt's topic (observability on).
    #[inline]
    pub(super) fn handles_of(&self, att: &Attempt) -> Option<&ConsumerTopic> {
        self.handles.get(att.handles?)
    }

    pub(super) fn sync_inflight(&self) {
        if self.obs_on {
            let c = &self.counters;
            let n = c
                .fetched
                .load(Ordering::SeqCst)
                .saturating_sub(c.settled.load(Ordering::SeqCst));
            self.inflight_gauge
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// True when this process applied one of `keys` (recorded or not yet).
    pub(super) fn applied_here(&self, keys: &Keys) -> bool {
        !keys.is_empty()
            && self
                .book
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .applied(keys)
    }

    pub(super) fn next_attempt(&self, item: &mut Item) -> u32 {
        item.local_attempts += 1;
        item.delivery.info.delivery_count.saturating_sub(1) + item.local_attempts
    }

    /// Asks the store about one message (its batch lookup failed): what this process applied
    /// and has not recorded yet counts too.
    pub(super) async fn already_applied(&self, keys: &Keys) -> bool {
        if keys.is_empty() {
            return false;
        }
        if self.applied_here(keys) {
            return true;
        }
        match &self.dedupe {
            None => false,
            Some(store) => {
                let texts = key_texts(&keys.iter().cloned().collect::<Vec<_>>());
                match store.is_applied(&self.name, &texts).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(consumer = %self.name, error = %e, "dedupe lookup failed; handling the message");
                        false
                    }
                }
            }
        }
    }

    pub(super) async fn retry_or_give_up(
        &self,
        item: Item,
        attempt: u32,
        after: Option<Duration>,
        att: &mut Attempt,
    ) -> Step {
        if attempt >= self.retry.max_attempts.max(1) {
            let reason = DlqCode::MaxRetries.reason(&item.last_error);
            return self
                .dead_letter(item, DlqCode::MaxRetries, reason, att)
                .await;
        }
        if self.phase() != Phase::Running {
            att.result = AttemptResult::Released;
            self.release(item).await;
            return Step::Finished;
        }
        self.counters.retried.fetch_add(1, Ordering::SeqCst);
        att.result = AttemptResult::Retry;
        if let Some(h) = self.handles_of(att) {
            h.retry[att.retry_reason as usize].inc();
        }
        let delay = after
            .unwrap_or_else(|| self.retry.backoff(attempt))
            .min(self.ack_deadline / 2);
        let mut item = item;
        let _ = item.delivery.in_progress().await;
        item.refreshed = Instant::now();
        Step::Retry(item, delay)
    }

    pub(super) async fn dead_letter(
        &self,
        mut item: Item,
        code: DlqCode,
        reason: String,
        att: &mut Attempt,
    ) -> Step {
        item.restore_envelope();
        let env = &item.delivery.envelope;
        let info = &item.delivery.info;
        // Attempts in this life of the message, on top of what it carried in (a redriven
        // message arrives with the count of its earlier lives), so the history is kept.
        let attempts = info
            .delivery_count
            .max(info.delivery_count.saturating_sub(1) + item.local_attempts);
        let carried = env.headers.retry_count().unwrap_or(0);
        let retry_count = carried.saturating_add(attempts);
        let dlq_topic = dlq_topic_for(&env.topic, &self.pattern);
        let dlq = build_dlq_envelope(env, &dlq_topic, &reason, retry_count, &self.name);
        let mut tries = 0u32;
        let mut phase = self.phase.clone();
        loop {
            match self.bus.publish_wire(vec![dlq.clone()]).await {
                Ok(_) => break,
                Err(e) => {
                    tries += 1;
                    tracing::warn!(consumer = %self.name, error = %e, tries, topic = %dlq_topic, "DLQ write failed; retrying (original not acked)");
                    let pause = self.retry.backoff(tries.min(16));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = wait_phase(&mut phase, Phase::HardStop) => {
                            att.result = AttemptResult::Released;
                            self.release(item).await;
                            return Step::Finished;
                        }
                    }
                    let _ = item.delivery.in_progress().await;
                }
            }
        }
        tracing::warn!(
            consumer = %self.name,
            topic = %env.topic,
            message_id = env.headers.message_id().unwrap_or_default(),
            dlq = %dlq_topic,
            reason = code.as_str(),
            result = AttemptResult::Dlq.as_str(),
            "message dead-lettered"
        );
        self.count_dlq(code);
        att.result = AttemptResult::Dlq;
        att.dlq_code = Some(code);
        if let Some(h) = self.handles_of(att) {
            h.dlq[code.index()].inc();
            if let Some(c) = &h.decode_fail[code.index()] {
                c.inc();
            }
        }
        self.done(item, Keys::default());
        Step::Finished
    }
}
