//! Cost of the consumer runtime per message, without any I/O: an in-process transport (a
//! queue in memory, acks counted) and an in-memory dedupe store, so what is measured is the
//! runtime itself — fetch, header normalisation, payload decode, dedupe check and record,
//! per-key scheduling over 8 workers, the handler call, batched acks.
//!
//! ```sh
//! cargo build --release --example runtime_cost -p ampybus
//! target/release/examples/runtime_cost 20000            # allocations per message
//! target/release/examples/runtime_cost 20000 sync       # the same with a handler that answers at once
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p target/release/examples/runtime_cost 2000
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p target/release/examples/runtime_cost 12000
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p target/release/examples/runtime_cost 2000 setup
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p target/release/examples/runtime_cost 12000 setup
//! # instructions per message = ((Ir(12000) - Ir(2000)) - (Ir(12000 setup) - Ir(2000 setup))) / 10000
//! # (fixed costs cancel in each difference; making the input cancels between them)
//! ```
//!
//! Figures are recorded in docs/benchmarks.md. The in-memory parts live here, not in the
//! library: only tests and measurements of the runtime use a stand-in for a transport.

use ampybus::dedupe::DedupeStore;
use ampybus::runtime::{Consumer, Handler, Message, Outcome};
use ampybus::transport::{
    Delivery, DeliveryInfo, PublishReceipt, Settler, SubscribeSpec, Subscription, Transport,
};
use ampybus::{Bus, Envelope, Headers, Result, Topic, TopicPattern};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[path = "common/wire.rs"]
mod wire;

#[path = "common/alloc.rs"]
mod alloc;
use alloc::ALLOCS;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// The queue holds each message in its wire form ([`wire::encode`]: the embedded log's row
/// layout). Fetching decodes it, as a transport would.
#[derive(Default)]
struct Queue {
    messages: Mutex<VecDeque<Bytes>>,
    next_seq: AtomicU64,
    acked: AtomicU64,
}

struct Memory(Arc<Queue>);

struct Acks(Arc<Queue>);

#[async_trait]
impl Settler for Acks {
    async fn ack(&self, sequences: &[u64]) -> Result<()> {
        self.0
            .acked
            .fetch_add(sequences.len() as u64, Ordering::SeqCst);
        Ok(())
    }
    async fn nack(&self, _sequence: u64, _delay: Duration) -> Result<()> {
        Ok(())
    }
    async fn in_progress(&self, _sequence: u64) -> Result<()> {
        Ok(())
    }
}

struct MemorySub {
    queue: Arc<Queue>,
    settler: Arc<dyn Settler>,
    pattern: TopicPattern,
    /// One shared topic name per topic, as a binding keeps.
    names: ampybus::envelope::TopicNames,
}

#[async_trait]
impl Subscription for MemorySub {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let batch: Vec<Bytes> = {
            let mut q = self.queue.messages.lock().unwrap();
            let n = max.min(q.len());
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            tokio::time::sleep(wait.min(Duration::from_millis(1))).await;
        }
        let now = chrono::Utc::now();
        let mut out = Vec::with_capacity(batch.len());
        for bytes in batch {
            let e = wire::decode(&bytes, &mut self.names)?;
            if !self.pattern.matches(&e.topic) {
                continue;
            }
            let seq = self.queue.next_seq.fetch_add(1, Ordering::Relaxed) + 1;
            let info = DeliveryInfo {
                sequence: seq,
                delivery_count: 1,
                stored_at: now,
            };
            out.push(Delivery::new(e, info, self.settler.clone()));
        }
        Ok(out)
    }
}

#[async_trait]
impl Transport for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn publish_batch(&self, batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>> {
        let n = batch.len();
        let encoded: Vec<Bytes> = batch.iter().map(wire::encode).collect();
        self.0.messages.lock().unwrap().extend(encoded);
        Ok((0..n as u64)
            .map(|i| PublishReceipt {
                sequence: i + 1,
                duplicate: false,
            })
            .collect())
    }
    async fn subscribe(&self, spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        Ok(Box::new(MemorySub {
            queue: self.0.clone(),
            settler: Arc::new(Acks(self.0.clone())),
            pattern: spec.pattern,
            names: Default::default(),
        }))
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// An in-memory dedupe store for one consumer name: 36-byte keys (message ids) held as byte
/// arrays, others as strings, in sets sized for the run and hashed by a multiply-rotate over
/// 8-byte words, so that a check or a record of a message id neither allocates nor rehashes
/// (the runtime's cost is what is measured, not the stand-in's; each real store's own cost
/// per message is measured by `ampybus bench --mode consume` on its transport).
struct MemoryDedupe(Mutex<Applied>);

impl MemoryDedupe {
    fn with_capacity(n: usize) -> MemoryDedupe {
        MemoryDedupe(Mutex::new(Applied {
            ids: HashSet::with_capacity_and_hasher(n, Words),
            texts: HashSet::with_capacity_and_hasher(16, Words),
        }))
    }
}

struct Applied {
    ids: HashSet<[u8; 36], Words>,
    texts: HashSet<String, Words>,
}

/// The stand-in's hasher: not resistant to chosen keys (it serves a measurement only).
#[derive(Default, Clone, Copy)]
struct Words;

impl std::hash::BuildHasher for Words {
    type Hasher = WordHasher;
    fn build_hasher(&self) -> WordHasher {
        WordHasher(0)
    }
}

struct WordHasher(u64);

impl std::hash::Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl Applied {
    fn contains(&self, key: &str) -> bool {
        match <[u8; 36]>::try_from(key.as_bytes()) {
            Ok(id) => self.ids.contains(&id),
            Err(_) => self.texts.contains(key),
        }
    }
    fn insert(&mut self, key: &str) {
        match <[u8; 36]>::try_from(key.as_bytes()) {
            Ok(id) => {
                self.ids.insert(id);
            }
            Err(_) => {
                self.texts.insert(key.to_owned());
            }
        }
    }
}

#[async_trait]
impl DedupeStore for MemoryDedupe {
    async fn is_applied(&self, _consumer: &str, keys: &[String]) -> Result<bool> {
        let s = self.0.lock().unwrap();
        Ok(keys.iter().any(|k| s.contains(k)))
    }
    async fn record_applied(&self, _consumer: &str, keys: &[String]) -> Result<()> {
        let mut s = self.0.lock().unwrap();
        for k in keys {
            s.insert(k);
        }
        Ok(())
    }
    async fn lookup_batch(&self, _consumer: &str, keys: &[&str]) -> Result<Vec<bool>> {
        let s = self.0.lock().unwrap();
        Ok(keys.iter().map(|k| s.contains(k)).collect())
    }
    async fn commit_batch(
        &self,
        _consumer: &str,
        keys: &[&str],
        deliveries: Vec<Delivery>,
    ) -> std::result::Result<(), (ampybus::Error, Vec<Delivery>)> {
        {
            let mut s = self.0.lock().unwrap();
            for k in keys {
                s.insert(k);
            }
        }
        Delivery::ack_all(deliveries).await
    }
}

/// A handler that borrows the message (a `handler_fn` closure takes it by value, which costs
/// a clone of the headers per message — not the runtime's cost).
struct Noop;

#[async_trait]
impl Handler for Noop {
    async fn handle(&self, _msg: &Message) -> Outcome {
        Outcome::Ok
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("message count"))
        .unwrap_or(20_000);
    // `setup` as the second argument: build and queue the messages, consume nothing (to
    // subtract the cost of making the input from a callgrind total).
    // `sync` (before `setup`, if both): the handler answers at once (`handler_sync`) instead of
    // through an async future.
    let setup_only = std::env::args().skip(2).any(|a| a == "setup");
    let sync = std::env::args().skip(2).any(|a| a == "sync");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let queue = Arc::new(Queue::default());
        let bus = Bus::with_transport(Arc::new(Memory(queue.clone())), "memory://");
        let payload = vec![7u8; 256];
        let envs: Vec<Envelope> = (0..n)
            .map(|i| {
                let sym = format!("S{}", i % 1000);
                let topic = Topic::parse(&format!("ampy.dev.bars.v1.XNAS.{sym}")).unwrap();
                let h = Headers::for_publish(
                    "ampy.raw.v1.Bytes",
                    "cost@1",
                    "cost",
                    &format!("XNAS.{sym}"),
                );
                Envelope::new(&topic, h, payload.clone())
            })
            .collect();
        bus.publish_wire(envs).await.unwrap();
        if setup_only {
            println!("{n} messages prepared (setup only)");
            return;
        }
        let before = ALLOCS.load(Ordering::SeqCst);
        let handle = Consumer::builder(
            bus.clone(),
            TopicPattern::parse("ampy.dev.bars.>").unwrap(),
            "cost",
        )
        .handler_arc(if sync {
            Arc::new(ampybus::runtime::handler_sync(|_msg| Outcome::Ok))
        } else {
            Arc::new(Noop)
        })
        .workers(8)
        .dedupe(Arc::new(MemoryDedupe::with_capacity(n as usize)))
        .serve_replays(false)
        .start()
        .await
        .unwrap();
        while handle.stats().handled_ok < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let stats = handle.shutdown(Duration::from_secs(10)).await;
        while queue.acked.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let allocs = ALLOCS.load(Ordering::SeqCst) - before;
        assert_eq!(stats.handled_ok, n);
        println!(
            "{n} messages: handled {}, acked {}, allocations {allocs} ({:.1} per message)",
            stats.handled_ok,
            queue.acked.load(Ordering::SeqCst),
            allocs as f64 / n as f64
        );
    });
}
