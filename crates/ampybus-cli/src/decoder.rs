//! Shows domain payloads as JSON through the `ampybus-proto` schemas.

use ampybus::PayloadDecoder;

/// A [`PayloadDecoder`] over the domain schemas of `ampybus-proto`. Unknown schemas (such as
/// `ampy.raw.v1.Bytes`) give `None`, so their payloads stay opaque.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProtoDecoder;

impl PayloadDecoder for ProtoDecoder {
    fn decode_json(&self, fqdn: &str, bytes: &[u8]) -> Option<Result<serde_json::Value, String>> {
        ampybus_proto::decode_to_json(fqdn, bytes).map(|r| r.map_err(|e| e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_are_opaque_and_garbage_is_an_error() {
        assert!(
            ProtoDecoder
                .decode_json(ampybus::headers::RAW_BYTES_SCHEMA, b"\xff")
                .is_none()
        );
        let name = ampybus_proto::message_names()[0];
        // A lone continuation byte is never a valid protobuf message.
        assert!(matches!(
            ProtoDecoder.decode_json(name, b"\xff"),
            Some(Err(_))
        ));
    }
}
