//! # ampybus
//!
//! One messaging contract for trading systems. This crate holds the contract (topics, headers,
//! envelopes, partition keys, payload codec, schema hash), the transport traits, and the
//! embedded durable log that needs nothing installed.
//!
//! ```no_run
//! # async fn demo() -> ampybus::Result<()> {
//! use ampybus::{Bus, Headers, Topic};
//! let bus = Bus::connect("file:///tmp/ampybus-data").await?;
//! let topic = Topic::parse("ampy.dev.orders.v1.requests")?;
//! let headers = Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
//! bus.publish(&topic, headers, b"payload".to_vec()).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

#[cfg(feature = "archive")]
pub mod archive;
pub mod bus;
pub mod codec;
pub mod control;
pub mod dedupe;
pub mod dlq;
pub mod envelope;
pub mod error;
mod fasthash;
pub mod headers;
pub mod ids;
#[cfg(any(feature = "inbox-postgres", feature = "inbox-sqlite"))]
pub mod inbox;
pub mod obs;
pub mod ops;
pub mod partition;
pub mod registry;
pub mod runtime;
pub mod schema_hash;
pub mod service;
pub mod tier;
pub mod topic;
pub mod transport;
pub mod validate;
mod yield_lock;

pub use bus::Bus;
pub use envelope::{Envelope, EnvelopeJson, PayloadDecoder, TopicName};
pub use error::{Error, ErrorKind, Result};
pub use headers::Headers;
pub use runtime::{Consumer, ConsumerHandle, DlqCode, Handler, Message, Outcome, RetryPolicy};
pub use topic::{Domain, Env, Topic, TopicPattern};
