//! Shows domain payloads as JSON through the `ampybus-proto` schemas.

use ampybus::PayloadDecoder;

/// A [`PayloadDecoder`] over the domain schemas of `ampybus-proto` and the core's control
/// messages (`ampy.control.v1.*`). Unknown schemas (such as `ampy.raw.v1.Bytes`) give `None`,
/// so their payloads stay opaque.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProtoDecoder;

impl PayloadDecoder for ProtoDecoder {
    fn decode_json(&self, fqdn: &str, bytes: &[u8]) -> Option<Result<serde_json::Value, String>> {
        match ampybus::control::decode_to_json(fqdn, bytes) {
            Ok(Some(json)) => return Some(Ok(json)),
            Err(e) => return Some(Err(e.to_string())),
            Ok(None) => {}
        }
        ampybus_proto::decode_to_json(fqdn, bytes).map(|r| r.map_err(|e| e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_decode() {
        use ampybus::control::{REPLAY_STATUS_SCHEMA, ReplayState, ReplayStatus};
        use prost::Message;
        let s = ReplayStatus::new("r-1", "oms", ReplayState::Completed);
        let json = ProtoDecoder
            .decode_json(REPLAY_STATUS_SCHEMA, &s.encode_to_vec())
            .unwrap()
            .unwrap();
        assert_eq!(json["request_id"], "r-1");
        assert_eq!(json["state"], "completed");
        assert!(matches!(
            ProtoDecoder.decode_json(REPLAY_STATUS_SCHEMA, b"\xff"),
            Some(Err(_))
        ));
    }

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
