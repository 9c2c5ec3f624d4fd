//! Domain payload schemas for ampybus, wire-compatible with the public
//! `ampy-proto` 2.1.1 package.
//!
//! The `.proto` files under `proto/ampy/<domain>/v1/` are compiled at build
//! time with [`protox`](https://docs.rs/protox) (no system `protoc`) into:
//!
//! - prost-generated Rust types, under [`ampy`] (e.g.
//!   [`ampy::bars::v1::BarBatch`]);
//! - a runtime [`DescriptorPool`] ([`descriptor_pool`]) used for
//!   schema-driven decoding by fully-qualified message name
//!   ([`decode_to_json`], [`encode_from_json`], [`decode_dynamic`]).
//!
//! Encoding is deterministic: map fields are `BTreeMap`s and fields are
//! written in field-number order, which matches the bytes that the Python
//! `ampy-proto` package produces with `SerializeToString(deterministic=True)`.
//!
//! ```
//! use prost::Message;
//! use ampybus_proto::ampy::{bars::v1::{Bar, BarBatch}, common::v1::SecurityId};
//!
//! let batch = BarBatch {
//!     bars: vec![Bar {
//!         security: Some(SecurityId { symbol: "AAPL".into(), mic: "XNAS".into(), ..Default::default() }),
//!         volume: 1200,
//!         ..Default::default()
//!     }],
//! };
//! let bytes = batch.encode_to_vec();
//! let json = ampybus_proto::decode_to_json("ampy.bars.v1.BarBatch", &bytes).unwrap().unwrap();
//! assert_eq!(json["bars"][0]["security"]["symbol"], "AAPL");
//! assert_eq!(json["bars"][0]["volume"], "1200"); // int64 is a JSON string
//! ```
#![deny(missing_docs)]

use std::sync::OnceLock;

use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};

/// Generates the `ampy::<domain>` / `ampy::<domain>::v1` module pair for one
/// package, with module docs and a compiling example.
macro_rules! domain_module {
    ($domain:ident, $example:ident, $what:literal) => {
        #[doc = concat!("The `ampy.", stringify!($domain), "` package family: ", $what, ".")]
        ///
        /// # Example
        ///
        /// ```
        #[doc = concat!("use ampybus_proto::ampy::", stringify!($domain), "::v1;")]
        #[doc = concat!("let msg = v1::", stringify!($example), "::default();")]
        #[doc = concat!("assert!(ampybus_proto::is_known(\"ampy.", stringify!($domain), ".v1.", stringify!($example), "\"));")]
        /// # let _ = msg;
        /// ```
        pub mod $domain {
            #[doc = concat!("Types of `ampy/", stringify!($domain), "/v1/", stringify!($domain), ".proto` (package `ampy.", stringify!($domain), ".v1`).")]
            ///
            /// # Example
            ///
            /// ```
            /// use prost::Message;
            #[doc = concat!("let msg = ampybus_proto::ampy::", stringify!($domain), "::v1::", stringify!($example), "::default();")]
            #[doc = concat!("let fqdn = \"ampy.", stringify!($domain), ".v1.", stringify!($example), "\";")]
            /// let json = ampybus_proto::decode_to_json(fqdn, &msg.encode_to_vec()).unwrap().unwrap();
            /// assert_eq!(json, serde_json::json!({}));
            /// ```
            #[allow(missing_docs)]
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/ampy.",
                    stringify!($domain),
                    ".v1.rs"
                ));
            }
        }
    };
}

/// Generated types for every `ampy.*.v1` package, one module per package.
///
/// # Example
///
/// ```
/// use ampybus_proto::ampy::{common::v1::Decimal, fx::v1::{FxRate, Pair}};
///
/// let rate = FxRate {
///     pair: Some(Pair { base: "USD".into(), quote: "JPY".into() }),
///     mid: Some(Decimal { scaled: 1_472_350, scale: 4 }), // 147.2350
///     ..Default::default()
/// };
/// assert_eq!(rate.pair.unwrap().quote, "JPY");
/// ```
pub mod ampy {
    domain_module!(
        common,
        Decimal,
        "shared decimals, security ids, metadata and enums"
    );
    domain_module!(bars, BarBatch, "OHLCV bars");
    domain_module!(ticks, TickBatch, "trade and quote ticks");
    domain_module!(
        fundamentals,
        FundamentalsBatch,
        "financial statement line items"
    );
    domain_module!(news, NewsBatch, "news items");
    domain_module!(fx, FxRateBatch, "foreign-exchange rates");
    domain_module!(
        corporate_actions,
        CorporateActionBatch,
        "splits and dividends"
    );
    domain_module!(universe, UniverseBatch, "tradable universes");
    domain_module!(signals, SignalBatch, "model signals");
    domain_module!(orders, OrderRequestBatch, "order requests");
    domain_module!(fills, FillBatch, "execution fills");
    domain_module!(positions, PositionBatch, "account positions");
    domain_module!(metrics, MetricBatch, "operational metrics");
}

/// Function that decodes bytes as one generated type and re-encodes them.
type Recode = fn(&[u8]) -> Result<Vec<u8>, prost::DecodeError>;

fn recode<M: prost::Message + Default>(bytes: &[u8]) -> Result<Vec<u8>, prost::DecodeError> {
    Ok(M::decode(bytes)?.encode_to_vec())
}

// Defines `GENERATED: &[(&str, Recode)]`, one entry per message type, in
// file and declaration order.
include!(concat!(env!("OUT_DIR"), "/ampy_registry.rs"));

// Defines `DOCS: &[(&str, &str, &str)]`: (message, field or "", comment).
include!(concat!(env!("OUT_DIR"), "/ampy_docs.rs"));

/// The `.proto` comment of a known message (`field: None`) or of one of its
/// fields, when the `.proto` file has one (comment markers and indentation
/// removed, lines joined with `\n`).
///
/// # Example
///
/// ```
/// assert_eq!(
///     ampybus_proto::doc("ampy.bars.v1.Bar", None),
///     Some("One OHLCV bar for a security over the half-open interval [start, end).")
/// );
/// assert_eq!(ampybus_proto::doc("ampy.bars.v1.Bar", Some("volume")), None);
/// assert_eq!(ampybus_proto::doc("ampy.bars.v1.Nope", None), None);
/// ```
pub fn doc(message: &str, field: Option<&str>) -> Option<&'static str> {
    let field = field.unwrap_or("");
    DOCS.iter()
        .find(|(m, f, _)| *m == message && *f == field)
        .map(|(_, _, text)| *text)
}

/// The encoded `google.protobuf.FileDescriptorSet` of every ampy `.proto`
/// file plus its imports (`google/protobuf/timestamp.proto`), without
/// source info.
///
/// # Example
///
/// ```
/// use prost::Message;
/// let set = prost_types::FileDescriptorSet::decode(ampybus_proto::FILE_DESCRIPTOR_SET).unwrap();
/// assert!(set.file.iter().any(|f| f.name() == "ampy/bars/v1/bars.proto"));
/// ```
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ampy_descriptor_set.bin"));

/// Errors from converting payloads between protobuf bytes and JSON.
///
/// # Example
///
/// ```
/// let err = ampybus_proto::decode_to_json("ampy.bars.v1.BarBatch", &[0xff]).unwrap().unwrap_err();
/// assert!(matches!(err, ampybus_proto::Error::Decode(_)));
/// assert!(err.to_string().starts_with("invalid protobuf payload"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not a valid encoding of the requested message type.
    #[error("invalid protobuf payload: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The JSON does not follow the proto3 JSON mapping of the message type
    /// (or, when decoding, the message could not be rendered as JSON).
    #[error("invalid proto3 JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Alias kept for readability at decode call sites.
///
/// # Example
///
/// ```
/// fn check(bytes: &[u8]) -> Result<(), ampybus_proto::DecodeError> {
///     ampybus_proto::decode_to_json("ampy.fx.v1.FxRateBatch", bytes).expect("known type")?;
///     Ok(())
/// }
/// assert!(check(&[]).is_ok());
/// ```
pub type DecodeError = Error;

/// The descriptor pool holding every ampy message (built once, lazily).
///
/// # Example
///
/// ```
/// let pool = ampybus_proto::descriptor_pool();
/// let bar = pool.get_message_by_name("ampy.bars.v1.Bar").unwrap();
/// assert_eq!(bar.get_field_by_name("adjustment_policy").unwrap().number(), 17);
/// ```
pub fn descriptor_pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(FILE_DESCRIPTOR_SET)
            .expect("the descriptor set produced by build.rs is valid")
    })
}

/// Every fully-qualified message name this crate defines (all `ampy.*`
/// messages, excluding synthetic map-entry types), in file and declaration
/// order.
///
/// # Example
///
/// ```
/// let names = ampybus_proto::message_names();
/// assert!(names.contains(&"ampy.ticks.v1.TickBatch"));
/// assert!(!names.contains(&"google.protobuf.Timestamp"));
/// ```
pub fn message_names() -> Vec<&'static str> {
    GENERATED.iter().map(|(name, _)| *name).collect()
}

/// Whether `fqdn` is one of [`message_names`].
///
/// # Example
///
/// ```
/// assert!(ampybus_proto::is_known("ampy.orders.v1.OrderRequest"));
/// assert!(!ampybus_proto::is_known("ampy.orders.v1.Nope"));
/// ```
pub fn is_known(fqdn: &str) -> bool {
    GENERATED.iter().any(|(name, _)| *name == fqdn)
}

/// The reflection descriptor of a known message type.
///
/// # Example
///
/// ```
/// let desc = ampybus_proto::message_descriptor("ampy.signals.v1.Signal").unwrap();
/// assert_eq!(desc.oneofs().next().unwrap().name(), "value");
/// assert!(ampybus_proto::message_descriptor("google.protobuf.Timestamp").is_none());
/// ```
pub fn message_descriptor(fqdn: &str) -> Option<MessageDescriptor> {
    if !is_known(fqdn) {
        return None;
    }
    descriptor_pool().get_message_by_name(fqdn)
}

/// Decodes `bytes` as the message type `fqdn` into a [`DynamicMessage`].
///
/// Returns `None` when `fqdn` is not a known message type.
///
/// # Example
///
/// ```
/// use prost::Message;
/// use prost_reflect::Value;
/// let bytes = ampybus_proto::ampy::common::v1::Decimal { scaled: -5, scale: 2 }.encode_to_vec();
/// let msg = ampybus_proto::decode_dynamic("ampy.common.v1.Decimal", &bytes).unwrap().unwrap();
/// assert_eq!(msg.get_field_by_name("scaled").unwrap().as_ref(), &Value::I64(-5));
/// ```
pub fn decode_dynamic(fqdn: &str, bytes: &[u8]) -> Option<Result<DynamicMessage, Error>> {
    let desc = message_descriptor(fqdn)?;
    Some(DynamicMessage::decode(desc, bytes).map_err(Error::from))
}

/// The JSON options used by [`decode_to_json`]: the proto3 JSON mapping
/// with original (snake_case) field names, 64-bit integers as strings, enum
/// values as names and default-valued fields omitted.
///
/// # Example
///
/// ```
/// use prost_reflect::{DynamicMessage, Value};
///
/// let desc = ampybus_proto::message_descriptor("ampy.common.v1.Money").unwrap();
/// let mut money = DynamicMessage::new(desc);
/// money.set_field_by_name("currency_code", Value::String("USD".into()));
/// let json = money
///     .serialize_with_options(serde_json::value::Serializer, &ampybus_proto::json_options())
///     .unwrap();
/// assert_eq!(json, serde_json::json!({"currency_code": "USD"})); // not "currencyCode"
/// ```
pub fn json_options() -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(true)
        .use_enum_numbers(false)
        .skip_default_fields(true)
}

/// Decodes `bytes` as the message type `fqdn` and renders it as proto3 JSON
/// (see [`json_options`]).
///
/// Returns `None` when `fqdn` is not a known message type.
///
/// # Example
///
/// ```
/// use prost::Message;
/// use ampybus_proto::ampy::orders::v1::OrderRequest;
/// use ampybus_proto::ampy::common::v1::Side;
///
/// let order = OrderRequest { client_order_id: "co_1".into(), side: Side::Buy as i32, ..Default::default() };
/// let json = ampybus_proto::decode_to_json("ampy.orders.v1.OrderRequest", &order.encode_to_vec());
/// assert_eq!(
///     json.unwrap().unwrap(),
///     serde_json::json!({"client_order_id": "co_1", "side": "SIDE_BUY"})
/// );
/// assert!(ampybus_proto::decode_to_json("ampy.nope.v1.X", &[]).is_none());
/// ```
pub fn decode_to_json(fqdn: &str, bytes: &[u8]) -> Option<Result<serde_json::Value, Error>> {
    let message = match decode_dynamic(fqdn, bytes)? {
        Ok(message) => message,
        Err(err) => return Some(Err(err)),
    };
    Some(
        message
            .serialize_with_options(serde_json::value::Serializer, &json_options())
            .map_err(Error::from),
    )
}

/// Parses proto3 JSON (original or lowerCamelCase field names accepted;
/// unknown fields rejected) as the message type `fqdn` and encodes it
/// deterministically (see [`reencode`]).
///
/// Returns `None` when `fqdn` is not a known message type.
///
/// # Example
///
/// ```
/// use prost::Message;
/// use ampybus_proto::ampy::fx::v1::Pair;
///
/// let json = serde_json::json!({"base": "USD", "quote": "JPY"});
/// let bytes = ampybus_proto::encode_from_json("ampy.fx.v1.Pair", &json).unwrap().unwrap();
/// assert_eq!(Pair::decode(bytes.as_slice()).unwrap().quote, "JPY");
/// assert!(ampybus_proto::encode_from_json("ampy.fx.v1.Pair", &serde_json::json!({"x": 1})).unwrap().is_err());
/// ```
pub fn encode_from_json(fqdn: &str, json: &serde_json::Value) -> Option<Result<Vec<u8>, Error>> {
    let desc = message_descriptor(fqdn)?;
    let message = match DynamicMessage::deserialize(desc, json) {
        Ok(message) => message,
        Err(err) => return Some(Err(err.into())),
    };
    reencode(fqdn, &message.encode_to_vec())
}

/// Decodes `bytes` with the prost-generated type for `fqdn` and encodes it
/// again: fields in number order, map entries sorted by key. The result is
/// byte-identical to ampy-proto's `SerializeToString(deterministic=True)`
/// for the same message. Unknown fields are dropped.
///
/// Returns `None` when `fqdn` is not a known message type.
///
/// # Example
///
/// ```
/// use prost::Message;
/// use ampybus_proto::ampy::common::v1::Decimal;
///
/// // Field 2 written before field 1: still valid, but not canonical.
/// let out_of_order = [0x10, 0x04, 0x08, 0x02];
/// let canonical = ampybus_proto::reencode("ampy.common.v1.Decimal", &out_of_order).unwrap().unwrap();
/// assert_eq!(canonical, Decimal { scaled: 1, scale: 4 }.encode_to_vec());
/// ```
pub fn reencode(fqdn: &str, bytes: &[u8]) -> Option<Result<Vec<u8>, Error>> {
    let (_, recode) = GENERATED.iter().find(|(name, _)| *name == fqdn)?;
    Some(recode(bytes).map_err(Error::from))
}

/// The serialized `FileDescriptorProto` (no source info) of the `.proto`
/// file that defines the message type `fqdn`; input to the schema hash
/// `sha256(file_descriptor_bytes ‖ fqdn)`.
///
/// These bytes are identical to ampy-proto 2.1.1's
/// `Msg.DESCRIPTOR.file.serialized_pb` (checked by the cross-language test).
///
/// Returns `None` when `fqdn` is not a known message type.
///
/// # Example
///
/// ```
/// use prost::Message;
/// let bytes = ampybus_proto::file_descriptor_bytes("ampy.bars.v1.BarBatch").unwrap();
/// let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
/// assert_eq!(file.name(), "ampy/bars/v1/bars.proto");
/// assert_eq!(file.dependency, ["google/protobuf/timestamp.proto", "ampy/common/v1/common.proto"]);
/// ```
pub fn file_descriptor_bytes(fqdn: &str) -> Option<Vec<u8>> {
    Some(message_descriptor(fqdn)?.parent_file().encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_matches_descriptor_pool() {
        let from_pool: Vec<String> = descriptor_pool()
            .all_messages()
            .filter(|m| m.package_name().starts_with("ampy.") && !m.is_map_entry())
            .map(|m| m.full_name().to_owned())
            .collect();
        let mut from_pool_sorted = from_pool.clone();
        from_pool_sorted.sort();
        let mut names = message_names();
        names.sort_unstable();
        assert_eq!(names, from_pool_sorted);
        assert_eq!(names.len(), 35);
    }

    #[test]
    fn unknown_names_yield_none() {
        assert!(decode_to_json("ampy.bars.v1.Nope", &[]).is_none());
        assert!(encode_from_json("google.protobuf.Timestamp", &serde_json::json!({})).is_none());
        assert!(file_descriptor_bytes("").is_none());
        assert!(reencode("ampy.metrics.v1.Metric.LabelsEntry", &[]).is_none());
    }

    #[test]
    fn map_encoding_is_sorted() {
        let json = serde_json::json!({
            "name": "m",
            "labels": {"zeta": "1", "alpha": "2", "mid": "3"},
        });
        let bytes = encode_from_json("ampy.metrics.v1.Metric", &json)
            .unwrap()
            .unwrap();
        let alpha = bytes.windows(5).position(|w| w == b"alpha").unwrap();
        let mid = bytes.windows(3).position(|w| w == b"mid").unwrap();
        let zeta = bytes.windows(4).position(|w| w == b"zeta").unwrap();
        assert!(alpha < mid && mid < zeta, "{bytes:?}");
    }
}
