//! Cost of the publish path per message, without any I/O: from the caller's topic, headers and
//! payload to the encoded wire message handed to the transport. The caller builds each
//! message's headers with [`Headers::for_publish`] (its partition keys are made beforehand) and
//! publishes them; the in-memory transport encodes every envelope into the wire form of
//! `examples/common/wire.rs` (the embedded log's row layout) and counts it.
//!
//! Modes (second argument):
//! * `batch` (default): `Bus::publish_batch` of 1,000-message batches;
//! * `single`: one `Bus::publish` per message;
//! * `wire`: `Bus::publish_wire` of 1,000-message batches (what `bench-*` publish measures).
//!
//! ```sh
//! cargo build --release --example publish_cost -p ampybus
//! target/release/examples/publish_cost 20000 batch           # allocations per message
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p target/release/examples/publish_cost 1000 batch
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p target/release/examples/publish_cost 4000 batch
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p target/release/examples/publish_cost 1000 batch setup
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p target/release/examples/publish_cost 4000 batch setup
//! # instructions per message = ((Ir(4000) - Ir(1000)) - (Ir(4000 setup) - Ir(1000 setup))) / 3000
//! ```
//!
//! Observability is on (the default of a bus handle) with no tracer installed. Figures are
//! recorded in docs/benchmarks.md; `scripts/perf-gate.sh` holds the budget.

use ampybus::transport::{PublishReceipt, SubscribeSpec, Subscription, Transport};
use ampybus::{Bus, Envelope, Error, ErrorKind, Headers, Result, Topic};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[path = "common/wire.rs"]
mod wire;

#[path = "common/alloc.rs"]
mod alloc;
use alloc::ALLOCS;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// A transport that encodes every envelope it is handed into its wire form and counts it
/// (messages and bytes); the encoded bytes are then dropped.
#[derive(Default)]
struct Memory {
    messages: AtomicU64,
    bytes: AtomicU64,
}

#[async_trait]
impl Transport for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn publish_batch(&self, batch: Vec<Envelope>) -> Result<Vec<PublishReceipt>> {
        let first = self
            .messages
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut bytes = 0;
        for e in &batch {
            bytes += wire::encode(e).len() as u64;
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok((first..first + batch.len() as u64)
            .map(|i| PublishReceipt {
                sequence: i + 1,
                duplicate: false,
            })
            .collect())
    }
    async fn subscribe(&self, _spec: SubscribeSpec) -> Result<Box<dyn Subscription>> {
        Err(Error::new(
            ErrorKind::Config,
            "publish_cost: no subscriptions",
        ))
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Messages per `publish_batch` / `publish_wire` call.
const BATCH: u64 = 1000;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .map(|a| a.parse().expect("message count"))
        .unwrap_or(20_000);
    let mode = args.next().unwrap_or_else(|| "batch".to_owned());
    assert!(
        ["batch", "single", "wire"].contains(&mode.as_str()),
        "mode: batch, single or wire"
    );
    // `setup` as the third argument: everything but the publishing (to subtract fixed costs
    // from a callgrind total).
    let setup_only = args.next().as_deref() == Some("setup");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let memory = Arc::new(Memory::default());
        let bus = Bus::with_transport(memory.clone(), "memory://");
        let topic = Topic::parse("ampy.dev.bars.v1.XNAS").unwrap();
        let keys: Vec<String> = (0..1000).map(|i| format!("XNAS.S{i}")).collect();
        let payload = Bytes::from(vec![7u8; 256]);
        let headers = |i: u64| {
            Headers::for_publish(
                "ampy.bars.v1.BarBatch",
                "cost@1",
                "cost",
                &keys[(i % 1000) as usize],
            )
        };
        if setup_only {
            println!("{n} messages, {mode}: setup only");
            return;
        }
        let before = ALLOCS.load(Ordering::SeqCst);
        let mut i = 0;
        while i < n {
            if mode == "single" {
                bus.publish(&topic, headers(i), payload.clone())
                    .await
                    .unwrap();
                i += 1;
                continue;
            }
            let end = (i + BATCH).min(n);
            let batch: Vec<Envelope> = (i..end)
                .map(|j| Envelope::new(&topic, headers(j), payload.clone()))
                .collect();
            if mode == "wire" {
                bus.publish_wire(batch).await.unwrap();
            } else {
                bus.publish_batch(batch).await.unwrap();
            }
            i = end;
        }
        let allocs = ALLOCS.load(Ordering::SeqCst) - before;
        assert_eq!(memory.messages.load(Ordering::SeqCst), n);
        println!(
            "{n} messages, {mode}: {} wire bytes, allocations {allocs} ({:.1} per message)",
            memory.bytes.load(Ordering::SeqCst),
            allocs as f64 / n as f64
        );
    });
}
