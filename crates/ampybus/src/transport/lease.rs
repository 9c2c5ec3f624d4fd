//! One active instance per durable consumer name: how NATS JetStream and Redis Streams keep
//! per-key order across the instances of a consumer.
//!
//! Both brokers hand a durable consumer's messages to whichever instance pulls next, so two
//! instances could handle two messages of one key at once, and a crashed instance's messages
//! would come back after the ack deadline behind newer ones. With
//! [`InstanceOrder::AcrossInstances`] (the default) a durable subscription first takes a lease
//! kept in the broker (NATS: a key of the KV bucket `{prefix}_leases`; Redis: the key
//! `{key_prefix}ampy:lease:{name}` with a record of its last holder beside it) and fetches only
//! while it holds it; the other instances wait as standbys. This module is the part both
//! bindings share — when to fetch, renew, wait and release ([`Exclusive`]) — over a
//! [`LeaseStore`] each binding translates.
//!
//! The rules, with `ttl` the lease time (a third of the ack deadline, between 1 s and 10 s):
//!
//! * The holder renews every `ttl / 4` and fetches only while its last confirmed renewal is
//!   younger than `4/5 ttl` (measured from when the renewal was sent), with every fetch's
//!   wait cut to what is left; once that passes, or a renewal says the lease is someone
//!   else's, it hands out nothing and no longer extends the deadline of what it holds
//!   (`in_progress`), so a successor can compute when those come back. (What it fetched before
//!   and has not started yet is still handled by it: not fenced.)
//! * A standby tries to take the lease every `min(ttl / 4, 500 ms)`. What it does then depends
//!   on how the last holder left ([`Previous`]): released cleanly (everything it fetched was
//!   settled, its releases went back first in line) or never held — fetch at once; stopped
//!   renewing and its lease ran out — if nothing of the consumer is unacknowledged, fetch at
//!   once (after half a lease time, for reads the last holder sent just before its end),
//!   else wait until it is, at most one ack deadline (plus a second), so that what the
//!   last holder held is redelivered before anything newer; the lease record was removed while
//!   held (tampering) — first wait out the holder's validity (`ttl`), then as before.
//! * A subscription dropped with nothing unsettled releases the lease at once (a clean
//!   shutdown); one dropped with deliveries outstanding stops renewing and releases only if
//!   they are all settled while it still holds the lease (else the lease runs out).
//!
//! The latency of a takeover: after a clean stop, the standby's next try (≤ 500 ms); after a
//! crash, `ttl` (plus `ttl / 4` on NATS, where a standby sees the holder gone by its renewals
//! stopping) plus `ttl / 2`, plus the ack deadline and 1 s when the crashed instance held
//! unacknowledged messages (46–49 s with a 30 s ack deadline).

use crate::error::{Error, Result};
use async_trait::async_trait;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What several instances of one durable consumer name promise about per-key order, on
/// transports whose broker hands any message to any instance (NATS JetStream, Redis Streams).
/// Set with the URL option `order=across_instances|per_instance` of `nats://` and `redis://`
/// URLs. The embedded log and Kafka always keep per-key order across instances by partitions
/// (Kafka except around a rebalance); NATS core subscriptions (the best-effort tier) promise
/// no order across instances.
///
/// ```
/// use ampybus::transport::InstanceOrder;
/// assert_eq!(InstanceOrder::default(), InstanceOrder::AcrossInstances);
/// assert_eq!("per_instance".parse::<InstanceOrder>().unwrap(), InstanceOrder::PerInstance);
/// assert!("sideways".parse::<InstanceOrder>().unwrap_err().message().contains("order"));
/// // A NATS URL that lets instances share the work instead:
/// # #[cfg(feature = "nats")]
/// # {
/// let o = ampybus::transport::nats::NatsOptions::from_url("nats://127.0.0.1:4222?order=per_instance").unwrap();
/// assert_eq!(o.order, InstanceOrder::PerInstance);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InstanceOrder {
    /// One instance of a durable consumer name fetches at a time (a lease in the broker); the
    /// others wait and take over when it stops (at once after a clean stop, after the lease
    /// time plus the ack deadline after a crash). Every key's messages are handled in publish
    /// order, one at a time, whichever instance handles them, also across a crash. Throughput
    /// is one instance's (its workers still handle different keys in parallel).
    #[default]
    AcrossInstances,
    /// Every instance fetches: they share the work, and per-key order holds only inside one
    /// instance (two instances may handle two messages of one key at once; a crashed
    /// instance's messages come back after the ack deadline, behind newer ones).
    PerInstance,
}

impl std::str::FromStr for InstanceOrder {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "across_instances" => Ok(InstanceOrder::AcrossInstances),
            "per_instance" => Ok(InstanceOrder::PerInstance),
            other => Err(Error::config(format!(
                "order: `{other}` is not a known value (across_instances: one active instance per durable consumer name, per-key order kept across instances; per_instance: instances share the work, per-key order within each)"
            ))),
        }
    }
}

/// How the previous holder left the lease, as the store saw it when the lease was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Previous {
    /// Never held, or released cleanly: fetch at once.
    Clean,
    /// This instance's own token (it held the lease before and nobody else took it since).
    Mine,
    /// The last holder stopped renewing and its lease ran out: it fetches nothing more.
    Lapsed,
    /// The lease was removed while held: its holder may go on fetching for up to this long.
    Removed(Duration),
}

/// The broker side of a lease: each binding translates these (NATS: a KV bucket with
/// revision-checked updates; Redis: Lua scripts over two keys).
#[async_trait]
pub(crate) trait LeaseStore: Send + Sync + 'static {
    /// Tries to take the lease for `token` for `ttl`; `None`: another holder has it.
    async fn acquire(&self, token: &str, ttl: Duration) -> Result<Option<Previous>>;
    /// Extends the lease held by `token`; `false`: it is no longer `token`'s.
    async fn renew(&self, token: &str, ttl: Duration) -> Result<bool>;
    /// Gives the lease up as cleanly released (only if `token` holds it).
    async fn release(&self, token: &str) -> Result<()>;
}

/// The lease time for an ack deadline: a third of it, between 1 s and 10 s.
pub(crate) fn lease_ttl(ack_deadline: Duration) -> Duration {
    (ack_deadline / 3).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// Added to the ack deadline a successor waits, for the broker's redelivery timer.
const REDELIVERY_SLACK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Standby,
    /// Holding; fetch once the previous holder's deliveries are settled or back in line.
    Settling {
        check_at: Instant,
        drain_by: Instant,
    },
    Active,
}

struct St {
    phase: Phase,
    /// Until when this instance may fetch (its last confirmed renewal + 4/5 ttl).
    valid_until: Option<Instant>,
    next_try: Instant,
    took_over: bool,
}

struct Inner {
    store: Arc<dyn LeaseStore>,
    token: String,
    ttl: Duration,
    ack_wait: Duration,
    what: String,
    st: Mutex<St>,
    /// Deliveries handed out and not yet settled.
    open: AtomicI64,
    /// The subscription is gone: release when nothing is open.
    closed: AtomicBool,
    released: AtomicBool,
}

impl Inner {
    fn st(&self) -> std::sync::MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn valid_for(ttl: Duration) -> Duration {
        ttl * 4 / 5
    }

    fn lose(&self, why: &str) {
        let mut st = self.st();
        if st.phase != Phase::Standby {
            tracing::warn!(consumer = %self.what, "lease lost ({why}): this instance stops fetching and waits as a standby");
        }
        st.phase = Phase::Standby;
        st.valid_until = None;
    }

    /// Releases the lease once, if this instance is the active holder with nothing open.
    fn release_if_idle(self: &Arc<Self>) {
        if !self.closed.load(Ordering::SeqCst) || self.open.load(Ordering::SeqCst) > 0 {
            return;
        }
        if self.st().phase != Phase::Active || self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            match me.store.release(&me.token).await {
                Ok(()) => {
                    tracing::debug!(consumer = %me.what, "lease released (nothing left unsettled)")
                }
                Err(e) => {
                    tracing::warn!(consumer = %me.what, error = %e, "releasing the lease failed; it runs out by itself")
                }
            }
            let mut st = me.st();
            st.phase = Phase::Standby;
            st.valid_until = None;
        });
    }
}

/// What a binding's `fetch` does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Fetch, waiting at most `budget`. `took_over`: the first fetch since the lease was
    /// taken (a binding resets what it keeps between fetches, e.g. Redis's reclaim timer).
    Go { budget: Duration, took_over: bool },
    /// Not this instance's turn; the wait was spent: return nothing.
    Idle,
}

/// The exclusive lease of one durable subscription (owned by it; see the module docs).
pub(crate) struct Exclusive {
    inner: Arc<Inner>,
    renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The part of an [`Exclusive`] the settlers hold: counts what is open, refuses to extend
/// deadlines once the lease is not held.
#[derive(Clone)]
pub(crate) struct LeaseRef(Arc<Inner>);

impl LeaseRef {
    /// `n` deliveries handed out.
    pub(crate) fn handed(&self, n: usize) {
        self.0.open.fetch_add(n as i64, Ordering::SeqCst);
    }

    /// `n` deliveries settled (acked or released).
    pub(crate) fn settled(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.0.open.fetch_sub(n as i64, Ordering::SeqCst);
        self.0.release_if_idle();
    }

    /// Whether a delivery's deadline may still be extended: only while the lease is held and
    /// valid, so a successor's wait for this instance's deliveries is bounded.
    pub(crate) fn may_extend(&self) -> bool {
        let st = self.0.st();
        st.phase != Phase::Standby && st.valid_until.is_some_and(|v| v > Instant::now())
    }
}

impl Exclusive {
    /// A lease on `store` for a subscription with this ack deadline; `what` names the
    /// consumer in logs.
    pub(crate) fn new(store: Arc<dyn LeaseStore>, ack_deadline: Duration, what: String) -> Self {
        let now = Instant::now();
        Exclusive {
            inner: Arc::new(Inner {
                store,
                token: uuid::Uuid::new_v4().simple().to_string(),
                ttl: lease_ttl(ack_deadline),
                ack_wait: ack_deadline,
                what,
                st: Mutex::new(St {
                    phase: Phase::Standby,
                    valid_until: None,
                    next_try: now,
                    took_over: false,
                }),
                open: AtomicI64::new(0),
                closed: AtomicBool::new(false),
                released: AtomicBool::new(false),
            }),
            renewer: Mutex::new(None),
        }
    }

    /// Whether the next read from the broker may still be sent: active, with a tenth of the
    /// lease time of validity left (checked before every read of a fetch, not only at its
    /// start, since one fetch sends several).
    pub(crate) fn may_fetch(&self) -> bool {
        let st = self.inner.st();
        st.phase == Phase::Active
            && st
                .valid_until
                .is_some_and(|v| v > Instant::now() + self.inner.ttl / 10)
    }

    /// The handle settlers keep.
    pub(crate) fn handle(&self) -> LeaseRef {
        LeaseRef(self.inner.clone())
    }

    fn poll_every(&self) -> Duration {
        (self.inner.ttl / 4).min(Duration::from_millis(500))
    }

    fn start_renewer(&self) {
        let inner = self.inner.clone();
        let every = inner.ttl / 4;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if inner.st().phase == Phase::Standby {
                    return;
                }
                let sent = Instant::now();
                match inner.store.renew(&inner.token, inner.ttl).await {
                    Ok(true) => {
                        let mut st = inner.st();
                        if st.phase != Phase::Standby {
                            st.valid_until = Some(sent + Inner::valid_for(inner.ttl));
                        }
                    }
                    Ok(false) => {
                        inner.lose("another instance holds it, or it was removed");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(consumer = %inner.what, error = %e, "renewing the lease failed; fetching stops when it runs out")
                    }
                }
            }
        });
        let old = self
            .renewer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task);
        if let Some(old) = old {
            old.abort();
        }
    }

    /// Decides whether this instance may fetch now. `backlog` counts the consumer's
    /// deliveries that are unacknowledged on the broker (any instance's). Spends at most
    /// `wait` when the answer is [`Admit::Idle`].
    pub(crate) async fn admit<F, Fut>(&self, wait: Duration, backlog: F) -> Result<Admit>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<u64>>,
    {
        let end = Instant::now() + wait;
        loop {
            let now = Instant::now();
            let (phase, valid_until, next_try) = {
                let st = self.inner.st();
                (st.phase, st.valid_until, st.next_try)
            };
            let sleep_until = match phase {
                Phase::Active => match valid_until {
                    Some(v) if v > now + Duration::from_millis(10) => {
                        let took_over = std::mem::take(&mut self.inner.st().took_over);
                        return Ok(Admit::Go {
                            budget: v - now,
                            took_over,
                        });
                    }
                    // A renewal is late: wait for it (the renewer decides whether it is lost).
                    _ => now + Duration::from_millis(20),
                },
                Phase::Settling { check_at, drain_by } => {
                    if now < check_at {
                        check_at
                    } else {
                        let n = match backlog().await {
                            Ok(n) => Some(n),
                            Err(e) => {
                                tracing::debug!(consumer = %self.inner.what, error = %e, "lease: counting unacknowledged deliveries failed");
                                None
                            }
                        };
                        let now = Instant::now();
                        let mut st = self.inner.st();
                        if st.phase != phase {
                            continue;
                        }
                        if n == Some(0) || now >= drain_by {
                            tracing::info!(consumer = %self.inner.what, unacknowledged = ?n, "lease: this instance is now the active one");
                            st.phase = Phase::Active;
                            st.took_over = true;
                            continue;
                        }
                        let next = (now + self.poll_every()).min(drain_by);
                        st.phase = Phase::Settling {
                            check_at: next,
                            drain_by,
                        };
                        next
                    }
                }
                Phase::Standby => {
                    if now < next_try {
                        next_try
                    } else {
                        self.try_acquire().await;
                        continue;
                    }
                }
            };
            let now = Instant::now();
            if now >= end {
                return Ok(Admit::Idle);
            }
            tokio::time::sleep_until(tokio::time::Instant::from_std(sleep_until.min(end))).await;
        }
    }

    async fn try_acquire(&self) {
        let inner = &self.inner;
        let sent = Instant::now();
        let got = inner.store.acquire(&inner.token, inner.ttl).await;
        let now = Instant::now();
        let mut st = inner.st();
        st.next_try = now + self.poll_every();
        let prev = match got {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(consumer = %inner.what, error = %e, "lease: trying to take it failed");
                return;
            }
        };
        st.valid_until = Some(sent + Inner::valid_for(inner.ttl));
        let settle = |wait_first: Duration| Phase::Settling {
            check_at: now + wait_first,
            drain_by: now + wait_first + inner.ack_wait + REDELIVERY_SLACK,
        };
        st.phase = match prev {
            Previous::Clean | Previous::Mine => {
                st.took_over = true;
                Phase::Active
            }
            // Commands the last holder sent just before its validity ended may still be
            // executed by the broker: give them half a lease time.
            Previous::Lapsed => settle(inner.ttl / 2),
            Previous::Removed(w) => settle(w),
        };
        tracing::info!(consumer = %inner.what, previous = ?prev, "lease taken");
        drop(st);
        self.start_renewer();
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        if let Some(t) = self
            .renewer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.release_if_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory store for the state machine (the brokers' stores are tested against the
    /// brokers in the conformance crate).
    #[derive(Default)]
    struct Mem {
        holder: Mutex<Option<String>>,
        released: Mutex<u32>,
    }

    #[async_trait]
    impl LeaseStore for Mem {
        async fn acquire(&self, token: &str, _ttl: Duration) -> Result<Option<Previous>> {
            let mut h = self.holder.lock().unwrap();
            match h.as_deref() {
                Some(t) if t == token => Ok(Some(Previous::Mine)),
                Some(_) => Ok(None),
                None => {
                    *h = Some(token.to_owned());
                    Ok(Some(Previous::Clean))
                }
            }
        }
        async fn renew(&self, token: &str, _ttl: Duration) -> Result<bool> {
            Ok(self.holder.lock().unwrap().as_deref() == Some(token))
        }
        async fn release(&self, token: &str) -> Result<()> {
            let mut h = self.holder.lock().unwrap();
            if h.as_deref() == Some(token) {
                *h = None;
                *self.released.lock().unwrap() += 1;
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn one_active_then_clean_handover() {
        let store = Arc::new(Mem::default());
        let a = Exclusive::new(store.clone(), Duration::from_secs(3), "t".into());
        let b = Exclusive::new(store.clone(), Duration::from_secs(3), "t".into());
        let zero = || async { Ok(0u64) };
        assert!(matches!(
            a.admit(Duration::ZERO, zero).await.unwrap(),
            Admit::Go {
                took_over: true,
                ..
            }
        ));
        assert_eq!(
            b.admit(Duration::from_millis(50), zero).await.unwrap(),
            Admit::Idle
        );
        // A delivery open: dropping `a` does not release.
        let h = a.handle();
        h.handed(1);
        drop(a);
        tokio::task::yield_now().await;
        assert_eq!(*store.released.lock().unwrap(), 0);
        assert!(h.may_extend());
        h.settled(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while *store.released.lock().unwrap() == 0 {
            assert!(Instant::now() < deadline, "not released");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!h.may_extend());
        assert!(matches!(
            b.admit(Duration::from_secs(2), zero).await.unwrap(),
            Admit::Go { .. }
        ));
    }

    #[test]
    fn ttl_bounds() {
        assert_eq!(lease_ttl(Duration::from_secs(30)), Duration::from_secs(10));
        assert_eq!(lease_ttl(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(lease_ttl(Duration::from_secs(6)), Duration::from_secs(2));
    }
}
