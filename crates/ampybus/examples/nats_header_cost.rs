//! What one NATS header map costs per published message, without a server: the headers of a
//! typical publish (`Headers::for_publish` + the publish defaults, 12 headers) written into an
//! `async_nats::HeaderMap` by the NATS binding's own translation
//! ([`ampybus::transport::nats::to_header_map`]); `bench-nats`'s raw side builds the same maps
//! before its clock starts. async-nats takes headers only as a `HeaderMap` (a hash map of
//! names to vectors of owned strings, without a capacity hint), so every NATS publish with
//! headers pays this; the raw baseline of `bench-nats` builds its maps before timing.
//!
//! ```sh
//! cargo build --release -p ampybus --features nats --example nats_header_cost
//! target/release/examples/nats_header_cost 20000           # allocations per map
//! valgrind --tool=callgrind target/release/examples/nats_header_cost 1000
//! valgrind --tool=callgrind target/release/examples/nats_header_cost 4000
//! valgrind --tool=callgrind target/release/examples/nats_header_cost 1000 setup
//! valgrind --tool=callgrind target/release/examples/nats_header_cost 4000 setup
//! # instructions per map = ((Ir(4000) - Ir(1000)) - (Ir(4000 setup) - Ir(1000 setup))) / 3000
//! ```

use ampybus::Headers;
use std::sync::atomic::Ordering;

#[path = "common/alloc.rs"]
mod alloc;
use alloc::ALLOCS;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|a| a.parse().expect("message count"))
        .unwrap_or(20_000);
    let setup_only = args.next().as_deref() == Some("setup");
    let keys: Vec<String> = (0..1000).map(|i| format!("XNAS.S{i}")).collect();
    let headers: Vec<Headers> = (0..n)
        .map(|i| {
            let mut h =
                Headers::for_publish("ampy.bars.v1.BarBatch", "cost@1", "cost", &keys[i % 1000]);
            h.fill_publish_defaults();
            h
        })
        .collect();
    if setup_only {
        println!("{n} maps: setup only");
        return;
    }
    let before = ALLOCS.load(Ordering::SeqCst);
    let mut entries = 0;
    for h in &headers {
        let m = ampybus::transport::nats::to_header_map(h).expect("valid NATS headers");
        entries += m.len();
        drop(std::hint::black_box(m));
    }
    let allocs = ALLOCS.load(Ordering::SeqCst) - before;
    println!(
        "{n} maps, {entries} headers: allocations {allocs} ({:.1} per map)",
        allocs as f64 / n as f64
    );
}
