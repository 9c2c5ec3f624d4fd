//! `proto_peer`: the Rust side of the Python SDK's protobuf cross-language tests
//! (`crates/ampybus-py/tests/test_proto.py`). It encodes and decodes `ampy.bars.v1.BarBatch`
//! with the prost types of `ampybus-proto` (the Rust schemas), never with Python code.
//!
//! ```text
//! proto_peer publish <url> <topic> <count>
//!     publishes <count> BarBatch messages (one bar each: XNAS.AAPL, close = (10000 + i) / 100,
//!     volume = 100 * i, trade_count = i) on <topic>; prints each message_id on stdout
//! proto_peer consume <url> <pattern> <consumer> <count>
//!     runs a durable consumer whose handler decodes BarBatch (prost) until it handled <count> messages,
//!     then prints one JSON line per message (message_id, producer, symbol, mic, close_scaled,
//!     close_scale, volume, trade_count) and exits; exit 1 after 60 s without them
//! ```

use ampybus::runtime::{Consumer, DlqCode, Outcome, handler_fn};
use ampybus::{Bus, Headers, Topic, TopicPattern};
use ampybus_proto::ampy::bars::v1::{Bar, BarBatch};
use ampybus_proto::ampy::common::v1::{Decimal, SecurityId};
use prost::Message as _;
use std::time::Duration;

fn usage() -> ! {
    eprintln!(
        "usage: proto_peer publish <url> <topic> <count> | consume <url> <pattern> <consumer> <count>"
    );
    std::process::exit(2)
}

fn bar(i: i64) -> BarBatch {
    BarBatch {
        bars: vec![Bar {
            security: Some(SecurityId {
                symbol: "AAPL".into(),
                mic: "XNAS".into(),
                ..Default::default()
            }),
            close: Some(Decimal {
                scaled: 10_000 + i,
                scale: 2,
            }),
            volume: 100 * i,
            trade_count: i,
            ..Default::default()
        }],
    }
}

async fn publish(url: &str, topic: &str, count: i64) -> ampybus::Result<()> {
    let bus = Bus::connect(url).await?;
    let topic = Topic::parse(topic)?;
    for i in 0..count {
        let h = Headers::for_publish("ampy.bars.v1.BarBatch", "proto-peer@1", "rust", "XNAS.AAPL");
        let id = h.message_id().unwrap_or_default().to_owned();
        bus.publish(&topic, h, bar(i).encode_to_vec()).await?;
        println!("{id}");
    }
    bus.close().await
}

async fn consume(url: &str, pattern: &str, name: &str, count: usize) -> ampybus::Result<bool> {
    let bus = Bus::connect(url).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let handle = Consumer::builder(bus.clone(), TopicPattern::parse(pattern)?, name)
        .handler(handler_fn(move |msg| {
            let tx = tx.clone();
            async move {
                let fqdn = msg.headers.schema_fqdn().unwrap_or_default();
                if fqdn != "ampy.bars.v1.BarBatch" {
                    return Outcome::DeadLetter(DlqCode::SchemaMismatch.reason(fqdn));
                }
                let batch = match BarBatch::decode(msg.payload.clone()) {
                    Ok(b) => b,
                    Err(e) => {
                        return Outcome::DeadLetter(DlqCode::DecodeError.reason(&e.to_string()));
                    }
                };
                for b in &batch.bars {
                    let sec = b.security.clone().unwrap_or_default();
                    let close = b.close.unwrap_or_default();
                    let line = serde_json::json!({
                        "message_id": msg.headers.message_id(),
                        "producer": msg.headers.producer(),
                        "symbol": sec.symbol,
                        "mic": sec.mic,
                        "close_scaled": close.scaled,
                        "close_scale": close.scale,
                        "volume": b.volume,
                        "trade_count": b.trade_count,
                    });
                    let _ = tx.send(line.to_string());
                }
                Outcome::Ok
            }
        }))
        .workers(1)
        .serve_replays(false)
        .start()
        .await?;
    let mut lines = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while lines.len() < count {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(l)) => lines.push(l),
            _ => break,
        }
    }
    handle.shutdown(Duration::from_secs(5)).await;
    bus.close().await?;
    for l in &lines {
        println!("{l}");
    }
    Ok(lines.len() == count)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["publish", url, topic, count] => {
            let n = count.parse().unwrap_or_else(|_| usage());
            publish(url, topic, n).await.map(|()| true)
        }
        ["consume", url, pattern, name, count] => {
            let n = count.parse().unwrap_or_else(|_| usage());
            consume(url, pattern, name, n).await
        }
        _ => usage(),
    };
    match result {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("proto_peer: timed out before the expected messages arrived");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("proto_peer: {e}");
            std::process::exit(1);
        }
    }
}
