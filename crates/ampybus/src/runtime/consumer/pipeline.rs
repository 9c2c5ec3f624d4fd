//! The consumer's tasks: fetcher → per-key queues → workers → acker, the lease refresher and
//! the lag poller.

use super::*;

/// How often a running consumer reads its lag into `bus_consumer_lag` (at most).
pub(super) const LAG_POLL: Duration = Duration::from_secs(1);

/// A lag read may take at most this share of the time between two reads: reading the lag can
/// cost in proportion to the backlog (the embedded log counts the matching messages after the
/// positions), and a poll every second over a deep backlog took a fifth of the consumer's CPU.
pub(super) const LAG_POLL_SHARE: u32 = 50;

/// The pause after a lag read that took `took`: [`LAG_POLL`], or longer when the read was slow.
pub(super) fn lag_poll_pause(took: Duration) -> Duration {
    LAG_POLL.max(took.saturating_mul(LAG_POLL_SHARE))
}

pub(super) async fn run_lag_poller(shared: Arc<Shared>) {
    let mut phase = shared.phase.clone();
    // The first read waits a pause too: a consumer starting over a deep backlog is catching up
    // on the cores the read would take (on the embedded log a read counts the backlog), and
    // the gauge reads 0 until then.
    let mut pause = LAG_POLL;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = wait_phase(&mut phase, Phase::Draining) => return,
        }
        let started = Instant::now();
        match shared.bus.consumer_lag(&shared.name).await {
            Ok(Some(l)) => {
                shared
                    .lag_gauge
                    .set(i64::try_from(l.pending).unwrap_or(i64::MAX));
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(consumer = %shared.name, error = %e, "lag read failed"),
        }
        pause = lag_poll_pause(started.elapsed());
    }
}

pub(super) async fn run_fetcher(shared: Arc<Shared>, sub: Box<dyn crate::transport::Subscription>) {
    // Fetching and preparing overlap: the next fetch runs while the previous batch is
    // prepared and queued. The preparer never waits for a dedupe lookup: it queues the batch
    // (its messages wait, in their keys' order, until the lookup answers) and hands the
    // lookup to one of the lookup tasks, so lookups of later batches overlap the handling of
    // earlier ones.
    let (tx, mut rx) = mpsc::channel::<(Vec<Delivery>, Instant)>(2);
    let prep = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut prep = Prep::start(&shared);
            while let Some((got, at)) = rx.recv().await {
                shared.enqueue(got, at, &mut prep);
            }
            // Dropping `prep` closes the lookup tasks' queues: they answer what they hold
            // and end.
        })
    };
    fetch_loop(&shared, sub, tx).await;
    // The sender is gone: the preparer queues what it holds and ends.
    let _ = prep.await;
}

/// Batch dedupe lookups that may run at once: lookup tasks, for the consumer's life, taking
/// batches from one queue (a free task takes the next, so a slow lookup holds only its own
/// batch while another task is free).
pub(super) const LOOKERS: usize = 4;

/// One batch's dedupe lookup, for a lookup task: the batch's [`Lookup`], its keys in order,
/// and the slots of the keys whose messages wait for it.
pub(super) struct LookupJob {
    pub(super) lookup: Arc<Lookup>,
    pub(super) keys: Vec<DKey>,
    pub(super) slots: Vec<u32>,
}

/// What the preparer keeps from one batch to the next, so that queueing a batch allocates
/// nothing in the steady state: the vector of a batch's items, the lookup tasks' queues, and
/// the key and slot vectors the lookup tasks give back.
pub(super) struct Prep {
    items: Vec<Item>,
    /// The lookup tasks' queue (`None`: dedupe off).
    lookups: Option<mpsc::UnboundedSender<LookupJob>>,
    spare: mpsc::UnboundedReceiver<(Vec<DKey>, Vec<u32>)>,
}

impl Prep {
    /// The preparer's state; with dedupe on, starts the consumer's [`LOOKERS`] lookup tasks.
    pub(super) fn start(shared: &Arc<Shared>) -> Prep {
        let (back, spare) = mpsc::unbounded_channel();
        let lookups = shared.dedupe.as_ref().map(|store| {
            let (tx, rx) = mpsc::unbounded_channel();
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            for _ in 0..LOOKERS {
                tokio::spawn(run_looker(
                    shared.clone(),
                    store.clone(),
                    rx.clone(),
                    back.clone(),
                ));
            }
            tx
        });
        Prep {
            items: Vec::new(),
            lookups,
            spare,
        }
    }

    /// Emptied key and slot vectors (given back by a lookup task, or new ones).
    fn buffers(&mut self) -> (Vec<DKey>, Vec<u32>) {
        self.spare.try_recv().unwrap_or_default()
    }

    /// Queues `job` for the lookup tasks; gives it back if there are none.
    fn send(&mut self, job: LookupJob) -> std::result::Result<(), LookupJob> {
        match &self.lookups {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }
}

/// A lookup task: takes the next batch lookup from the queue it shares with the other
/// lookup tasks (waiting for the queue while another task waits on it), answers it, wakes
/// the keys whose messages waited for it, and gives the emptied vectors back to the preparer.
/// Ends when the preparer is gone and the queue is empty.
pub(super) async fn run_looker(
    shared: Arc<Shared>,
    store: Arc<dyn DedupeStore>,
    jobs: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<LookupJob>>>,
    back: mpsc::UnboundedSender<(Vec<DKey>, Vec<u32>)>,
) {
    let mut texts = KeyTexts::default();
    loop {
        let Some(job) = jobs.lock().await.recv().await else {
            break;
        };
        let LookupJob {
            lookup,
            mut keys,
            mut slots,
        } = job;
        shared.look_up(&*store, &lookup, &keys, &mut texts).await;
        let woke = {
            let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
            slots.drain(..).filter(|id| s.make_ready(*id)).count()
        };
        shared.wake(woke);
        drop(lookup);
        keys.clear();
        // The preparer may be gone (the consumer is stopping): the vectors are then dropped.
        let _ = back.send((keys, slots));
    }
}

pub(super) async fn fetch_loop(
    shared: &Arc<Shared>,
    mut sub: Box<dyn crate::transport::Subscription>,
    tx: mpsc::Sender<(Vec<Delivery>, Instant)>,
) {
    let mut phase = shared.phase.clone();
    loop {
        if *phase.borrow() != Phase::Running {
            break;
        }
        tokio::select! {
            p = shared.permits.acquire() => match p {
                Ok(p) => p.forget(),
                Err(_) => break,
            },
            _ = wait_phase(&mut phase, Phase::Draining) => break,
        }
        let mut room = 1usize;
        let more = shared.permits.available_permits().min(FETCH_BATCH - 1);
        if more > 0
            && let Ok(p) = shared.permits.try_acquire_many(more as u32)
        {
            p.forget();
            room += more;
        }
        match sub.fetch(room, FETCH_WAIT).await {
            Ok(got) => {
                if got.len() < room {
                    shared.permits.add_permits(room - got.len());
                }
                if got.is_empty() {
                    continue;
                }
                let before = shared
                    .counters
                    .fetched
                    .fetch_add(got.len() as u64, Ordering::SeqCst);
                shared.lag_clock.on_fetch(before + got.len() as u64, &got);
                shared.sync_inflight();
                if let Err(mpsc::error::SendError((got, at))) = tx.send((got, Instant::now())).await
                {
                    // Cannot happen while this loop runs (the preparer outlives it); release
                    // rather than hold anything unsettled.
                    for d in got {
                        shared.release(ItemData::new(d, at)).await;
                    }
                }
            }
            Err(e) => {
                shared.permits.add_permits(room);
                tracing::warn!(consumer = %shared.name, error = %e, "fetch failed; retrying");
                tokio::time::sleep(FETCH_WAIT).await;
            }
        }
    }
}

/// Extends the leases of messages waiting in the per-key queues (behind a slow handler or a
/// parked retry) so that they are not delivered again while they wait. A key whose queue is
/// out for refreshing is blocked like a parked key, so its order holds.
pub(super) async fn run_refresher(shared: Arc<Shared>) {
    let every = (shared.ack_deadline / 3).max(Duration::from_millis(10));
    let mut phase = shared.phase.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = wait_phase(&mut phase, Phase::Draining) => return,
        }
        let Some(cutoff) = Instant::now().checked_sub(every) else {
            continue;
        };
        let due: Vec<(u32, VecDeque<Item>)> = {
            let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
            let mut due = Vec::new();
            for (id, ks) in s.slots.iter_mut().enumerate() {
                if !ks.refreshing && ks.queue.iter().any(|it| it.refreshed <= cutoff) {
                    ks.refreshing = true;
                    due.push((id as u32, std::mem::take(&mut ks.queue)));
                }
            }
            due
        };
        for (id, mut queue) in due {
            for it in queue.iter_mut().filter(|it| it.refreshed <= cutoff) {
                if let Err(e) = it.delivery.in_progress().await {
                    tracing::warn!(consumer = %shared.name, error = %e, "lease extension failed");
                }
                it.refreshed = Instant::now();
            }
            let queued = {
                let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                let ks = &mut s.slots[id as usize];
                // A strict retry parked meanwhile goes first; arrivals go last.
                let mut merged = VecDeque::with_capacity(queue.len() + ks.queue.len());
                while ks.queue.front().is_some_and(|it| it.parked_head) {
                    merged.extend(ks.queue.pop_front());
                }
                merged.extend(queue);
                merged.extend(ks.queue.drain(..));
                ks.queue = merged;
                ks.refreshing = false;
                s.make_ready(id)
            };
            if queued {
                shared.notify.notify_one();
            }
        }
    }
}

/// Messages one worker takes under one lock when its handler answers without waiting: run one
/// after the other, their keys freed together under the next lock. A handler that awaits takes
/// one at a time, so that `workers` of them wait concurrently; a message of a run that has to
/// wait (its handler's future, a dedupe lookup, a lease extension) first hands the rest of the
/// run back to their keys' queues for other workers.
pub(super) const RUN_MAX: usize = 32;

/// How long a run may take before its remaining messages are handed back: a handler that
/// answers at once but slowly must not hold messages outside their queues, where their
/// leases are not extended.
pub(super) const RUN_BUDGET: Duration = Duration::from_millis(2);

pub(super) async fn run_worker(shared: Arc<Shared>) {
    let mut phase = shared.phase.clone();
    // Keys this worker's last run finished: freed, and the next run taken, under one lock.
    let mut finished: Vec<u32> = Vec::new();
    let mut run: Vec<(u32, Item)> = Vec::new();
    let mut tally = Tally::default();
    loop {
        if !still_running(&mut phase) {
            if !finished.is_empty() {
                let woke = {
                    let mut s = shared.sched.lock().unwrap_or_else(|p| p.into_inner());
                    finished.drain(..).filter(|id| s.finish(*id)).count()
                };
                shared.wake(woke);
            }
            return;
        }
        let limit = if shared.answers_at_once.load(Ordering::Relaxed) {
            RUN_MAX
        } else {
            1
        };
        let mut more = shared.take_run(&mut finished, &mut run, limit).await;
        if run.is_empty() {
            let notified = shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            more = shared.take_run(&mut finished, &mut run, limit).await;
            if run.is_empty() {
                tokio::select! {
                    _ = notified => {}
                    _ = wait_phase(&mut phase, Phase::Draining) => return,
                }
                continue;
            }
        }
        if more {
            // Another ready key may be waiting for a worker: pass the wake-up on.
            shared.notify.notify_one();
        }
        let started = clock::Mono::now();
        tally.last = Some(started);
        let mut rest = run.drain(..);
        while let Some((id, item)) = rest.next() {
            let freed = {
                let one = shared.run_one(id, item, &mut tally);
                let mut one = std::pin::pin!(one);
                match futures::poll!(one.as_mut()) {
                    std::task::Poll::Ready(freed) => freed,
                    std::task::Poll::Pending => {
                        // This message waits: neither the rest of the run nor the keys of the
                        // messages it finished may wait behind it (a handler waiting for
                        // messages of those keys would wait for ever).
                        let back: Vec<(u32, Item)> = rest.by_ref().collect();
                        shared.untake(&mut finished, back);
                        one.await
                    }
                }
            };
            if let Some(id) = freed {
                finished.push(id);
            }
            let now = tally.last.unwrap_or_else(clock::Mono::now);
            if rest.len() > 0 && now.since(started) > RUN_BUDGET {
                // Slower than a run is meant to be: the rest go back to their keys' queues
                // (where the refresher extends their leases) for any worker to take.
                let back: Vec<(u32, Item)> = rest.by_ref().collect();
                shared.untake(&mut finished, back);
            }
        }
        tally.end_run(&shared);
    }
}

/// Gathers finished messages for [`ACK_LINGER`] after the first, then records and acks them
/// as one batch; on close, flushes what is left and stops.
pub(super) async fn run_acker(shared: Arc<Shared>) {
    let mut phase = shared.phase.clone();
    let mut handle_dropped = false;
    let mut spare: Vec<DKey> = Vec::new();
    let mut texts = KeyTexts::default();
    let mut batch_cap = 16usize;
    loop {
        let closing = shared.acks_closing();
        if !closing {
            tokio::select! {
                biased;
                _ = shared.ack_notify.notified() => {}
                // The handle was dropped without shutdown: flush what is queued, then stop.
                _ = async { while phase.changed().await.is_ok() {} }, if !handle_dropped => {
                    handle_dropped = true;
                    shared.ack_closing.store(true, Ordering::SeqCst);
                }
            }
        }
        let closing = shared.acks_closing();
        if !closing {
            // Gather for a moment, but not while the fetcher is starved of permits.
            tokio::select! {
                _ = tokio::time::sleep(ACK_LINGER) => {}
                _ = shared.ack_full.notified() => {}
            }
        }
        let (deliveries, keys, stop) = shared.take_acks(closing, &mut batch_cap, &mut spare);
        spare = if deliveries.is_empty() {
            keys
        } else {
            shared.flush(deliveries, keys, &mut texts).await
        };
        if stop {
            break;
        }
    }
}

impl Shared {
    /// Takes what every acker shard holds as one batch (the shards keep their buffers;
    /// `keys` reuses `spare`'s). When `closing` and every shard is empty, marks them all
    /// closed under all their locks at once — no message can be added after the last
    /// drain unseen — and says to stop.
    pub(super) fn take_acks(
        &self,
        closing: bool,
        batch_cap: &mut usize,
        spare: &mut Vec<DKey>,
    ) -> (Vec<Delivery>, Vec<DKey>, bool) {
        // A buffer of the last batch's size: one allocation per batch.
        let mut d: Vec<Delivery> = Vec::with_capacity(*batch_cap);
        let mut k = std::mem::take(spare);
        for s in &self.acks {
            let mut a = s.0.lock().unwrap_or_else(|p| p.into_inner());
            // The first shard with messages hands over its buffer whole (the shard keeps the
            // empty one): its messages are not copied again.
            if d.is_empty() {
                std::mem::swap(&mut d, &mut a.deliveries);
            } else {
                d.append(&mut a.deliveries);
            }
            if k.is_empty() {
                std::mem::swap(&mut k, &mut a.keys);
            } else {
                k.append(&mut a.keys);
            }
        }
        let mut stop = false;
        if closing && d.is_empty() {
            let mut all: Vec<_> = self
                .acks
                .iter()
                .map(|s| s.0.lock().unwrap_or_else(|p| p.into_inner()))
                .collect();
            if all.iter().all(|a| a.deliveries.is_empty()) {
                for a in all.iter_mut() {
                    a.closed = true;
                }
                stop = true;
            } else {
                for a in all.iter_mut() {
                    d.append(&mut a.deliveries);
                    k.append(&mut a.keys);
                }
            }
        }
        *batch_cap = d.len().max(16);
        (d, k, stop)
    }

    /// Queues a fetched batch by key. With dedupe on, its messages are prepared here and wait
    /// for one lookup of all their keys, handed to a lookup task.
    pub(super) fn enqueue(self: &Arc<Self>, got: Vec<Delivery>, at: Instant, prep: &mut Prep) {
        // Boxes of finished items first (no allocation), new ones for the rest.
        let mut items = std::mem::take(&mut prep.items);
        items.clear();
        items.reserve(got.len());
        // This thread's shard first (its boxes were last touched here), then the others.
        let first = ack_shard_index();
        for i in 0..ACK_SHARDS {
            let need = got.len() - items.len();
            if need == 0 {
                break;
            }
            let mut a = self.acks[(first + i) % ACK_SHARDS]
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let from = a.spare.len().saturating_sub(need);
            items.extend(a.spare.drain(from..));
        }
        let reused = items.len();
        for (i, d) in got.into_iter().enumerate() {
            match items.get_mut(i) {
                Some(b) if i < reused => **b = ItemData::fresh(d, at),
                _ => items.push(ItemData::new(d, at)),
            }
        }
        let mut lookup: Option<(Arc<Lookup>, Vec<DKey>, Vec<u32>)> = None;
        if self.dedupe.is_some() {
            let l = self
                .book
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .open_batch();
            let (mut keys, slots) = prep.buffers();
            for it in items.iter_mut() {
                // A message that does not prepare is dead-lettered by its worker.
                if self.prepare(it).is_ok() && !it.keys.is_empty() {
                    it.lookup = Some((l.clone(), keys.len() as u32));
                    keys.extend(it.keys.iter().cloned());
                }
            }
            if !keys.is_empty() {
                lookup = Some((l, keys, slots));
            }
        }
        let mut woke = 0usize;
        {
            let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
            for it in items.drain(..) {
                let key = it.headers().partition_key().unwrap_or_default();
                let id = s.slot(key);
                if let Some((_, _, slots)) = lookup.as_mut()
                    && it.lookup.is_some()
                {
                    slots.push(id);
                }
                if s.push(id, it) {
                    woke += 1;
                }
            }
        }
        prep.items = items;
        self.wake(woke);
        if let Some((lookup, keys, slots)) = lookup
            && let Err(job) = prep.send(LookupJob {
                lookup,
                keys,
                slots,
            })
        {
            // No lookup task (cannot happen while the preparer runs): the batch's messages
            // are checked one by one.
            let _ = job.lookup.done.set(None);
            let woke = {
                let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
                job.slots.iter().filter(|id| s.make_ready(**id)).count()
            };
            self.wake(woke);
        }
    }

    /// Answers one batch's dedupe lookup (`None` when the store failed or gave a wrong count:
    /// each message is then checked on its own).
    pub(super) async fn look_up(
        &self,
        store: &dyn DedupeStore,
        lookup: &Lookup,
        keys: &[DKey],
        texts: &mut KeyTexts,
    ) {
        let strs = texts.of(keys);
        let answer = match store.lookup_batch(&self.name, &strs).await {
            Ok(flags) if flags.len() == keys.len() => Some(flags),
            Ok(_) => {
                tracing::warn!(consumer = %self.name, "batch dedupe lookup gave a wrong count; checking one by one");
                None
            }
            Err(e) => {
                tracing::warn!(consumer = %self.name, error = %e, "batch dedupe lookup failed; checking one by one");
                None
            }
        };
        let strs = relabel(strs);
        texts.keep(strs);
        let _ = lookup.done.set(answer);
    }

    /// Frees the keys in `finished` and takes up to `limit` ready messages into `run`, under
    /// one lock; true when more keys are ready than were taken.
    pub(super) async fn take_run(
        &self,
        finished: &mut Vec<u32>,
        run: &mut Vec<(u32, Item)>,
        limit: usize,
    ) -> bool {
        // Workers meet the preparer (which queues a whole batch under this lock) here: wait
        // for it without stalling the thread.
        let mut s = crate::yield_lock::lock_yielding(&self.sched).await;
        for id in finished.drain(..) {
            s.finish(id);
        }
        while run.len() < limit {
            match s.take() {
                Some(next) => run.push(next),
                None => break,
            }
        }
        !s.ready.is_empty()
    }

    /// Frees the keys in `finished` and puts messages taken in a run and not started back at
    /// the head of their keys' queues, under one lock.
    pub(super) fn untake(&self, finished: &mut Vec<u32>, back: Vec<(u32, Item)>) {
        if finished.is_empty() && back.is_empty() {
            return;
        }
        let mut woke = 0;
        {
            let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
            for id in finished.drain(..) {
                if s.finish(id) {
                    woke += 1;
                }
            }
            for (id, item) in back {
                let ks = &mut s.slots[id as usize];
                ks.busy = false;
                ks.queue.push_front(item);
                if s.make_ready(id) {
                    woke += 1;
                }
            }
        }
        self.wake(woke);
    }

    /// Wakes workers for `n` keys made ready.
    pub(super) fn wake(&self, n: usize) {
        match n {
            0 => {}
            1 => self.notify.notify_one(),
            _ => self.notify.notify_waiters(),
        }
    }

    /// Handles one message of key `id`; returns the key when it is free for its next message.
    pub(super) async fn run_one(
        self: &Arc<Self>,
        id: u32,
        item: Item,
        tally: &mut Tally,
    ) -> Option<u32> {
        match self.process(item, tally).await {
            Step::Finished => Some(id),
            step => {
                self.after(id, step).await;
                None
            }
        }
    }

    pub(super) fn done(&self, mut item: Item, keys: Keys) {
        let mut delivery = std::mem::replace(&mut item.delivery, Delivery::placeholder());
        // The message's buffers go now, on this worker, not when the box is next used nor on
        // the acker (one task for the whole consumer, which then only settles sequences); so
        // does its hold on the key book's records (its batch's lookup).
        delivery.drop_content();
        item.msg = None;
        item.prepared = None;
        item.lookup = None;
        let waiting = {
            let mut a = self.acks[ack_shard_index()]
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if a.closed {
                drop(a);
                tracing::error!(consumer = %self.name, sequence = delivery.info.sequence, "acker gone; message will be redelivered");
                // Not recorded here: its keys are free again (a kept claim would hold a twin
                // waiting for a record that never comes).
                self.book
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .release(&keys);
                return;
            }
            a.deliveries.push(delivery);
            let [first, second] = keys.0;
            a.keys.extend(first);
            a.keys.extend(second);
            let waiting = a.deliveries.len();
            if a.spare.len() < SPARE_ITEMS {
                a.spare.push(item);
            }
            waiting
        };
        // Counted per shard: the first message of a shard wakes the acker, and a shard
        // holding an eighth of the in-flight limit ends the acker's lingering (a quarter
        // over the two shards a two-core machine's threads fill).
        if waiting == 1 {
            self.ack_notify.notify_one();
        }
        if waiting == (self.max_in_flight / 8).max(1) {
            self.ack_full.notify_one();
        }
    }

    pub(super) async fn release(&self, item: Item) {
        self.counters.released.fetch_add(1, Ordering::SeqCst);
        self.counters.settled.fetch_add(1, Ordering::SeqCst);
        self.sync_inflight();
        self.permits.add_permits(1);
        if let Err((e, _)) = item.delivery.nack(Duration::ZERO).await {
            tracing::warn!(consumer = %self.name, error = %e, "release failed; the ack deadline will redeliver");
        }
    }

    /// Records and acks one batch; gives back the (emptied) key buffer for reuse.
    pub(super) async fn flush(
        &self,
        deliveries: Vec<Delivery>,
        mut keys: Vec<DKey>,
        texts: &mut KeyTexts,
    ) -> Vec<DKey> {
        let count = deliveries.len();
        let mut todo = deliveries;
        let mut tries = 0;
        while !todo.is_empty() {
            // Dedupe records first (or in the same transaction, on a store that lives with the
            // transport), then acks: a crash in between redelivers what dedupe then skips.
            let result = match &self.dedupe {
                Some(store) => {
                    let strs = texts.of(&keys);
                    let result = store.commit_batch(&self.name, &strs, todo).await;
                    let strs = relabel(strs);
                    texts.keep(strs);
                    result
                }
                None => Delivery::ack_all(todo).await,
            };
            match result {
                Ok(()) => break,
                Err((e, failed)) => {
                    tries += 1;
                    // A broker that is away (restarting, failing over) gets asked again for
                    // as long as the consumer runs: giving up would leave the messages
                    // unacknowledged until their lease runs out, handled but not settled.
                    // Meanwhile the fetcher waits for permits. Errors that another try cannot
                    // mend, and a consumer shutting down, get a few tries only.
                    let transient = matches!(e.kind(), ErrorKind::Transport | ErrorKind::Timeout);
                    if tries >= ACK_TRIES && (!transient || self.acks_closing()) {
                        tracing::error!(consumer = %self.name, error = %e, count = failed.len(), tries, "ack failed; messages will be redelivered");
                        break;
                    }
                    if tries == ACK_TRIES {
                        tracing::warn!(consumer = %self.name, error = %e, count = failed.len(), "ack failing; retrying until the broker answers");
                    }
                    tokio::time::sleep(self.retry.backoff(tries.min(ACK_TRIES)).min(ACK_RETRY_MAX))
                        .await;
                    todo = failed;
                }
            }
        }
        if !keys.is_empty() {
            self.book
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(&keys);
        }
        keys.clear();
        self.counters
            .settled
            .fetch_add(count as u64, Ordering::SeqCst);
        self.sync_inflight();
        self.permits.add_permits(count);
        keys
    }
}
