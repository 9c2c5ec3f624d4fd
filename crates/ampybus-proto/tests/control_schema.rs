//! The core's hand-written control message types (`ampybus::control`) agree with their schema
//! file `crates/ampybus/proto/ampy/control/v1/control.proto`, field for field: names, numbers
//! and types, checked by encoding through one and decoding through the other.

use ampybus::control::{ReplayRequest, ReplayState, ReplayStatus};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Value};

fn pool() -> DescriptorPool {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../ampybus/proto");
    let fds =
        protox::compile(["ampy/control/v1/control.proto"], [dir]).expect("control.proto compiles");
    DescriptorPool::from_file_descriptor_set(fds).expect("descriptor pool")
}

fn ts(seconds: i64, nanos: i32) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos }
}

#[test]
fn the_schema_file_is_the_one_the_core_embeds() {
    let on_disk = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ampybus/proto/ampy/control/v1/control.proto"
    ))
    .unwrap();
    assert_eq!(on_disk, ampybus::control::CONTROL_PROTO);
}

#[test]
fn replay_request_matches_its_schema() {
    let pool = pool();
    let desc = pool
        .get_message_by_name(ampybus::control::REPLAY_REQUEST_SCHEMA)
        .unwrap();
    assert_eq!(desc.fields().count(), 8);
    let ours = ReplayRequest {
        request_id: "r-1".into(),
        consumer: "oms".into(),
        pattern: "ampy.dev.orders.>".into(),
        start: Some(ts(1_700_000_000, 5)),
        end: Some(ts(1_700_000_600, 0)),
        keys: vec!["co_1".into(), "co_2".into()],
        requested_by: "alice".into(),
        reason: "gap".into(),
    };
    // Ours → schema: every field lands under the expected name.
    let dynamic = DynamicMessage::decode(desc.clone(), &ours.encode_to_vec()[..]).unwrap();
    assert_eq!(
        dynamic.get_field_by_name("request_id").unwrap().as_str(),
        Some("r-1")
    );
    assert_eq!(
        dynamic.get_field_by_name("consumer").unwrap().as_str(),
        Some("oms")
    );
    assert_eq!(
        dynamic.get_field_by_name("pattern").unwrap().as_str(),
        Some("ampy.dev.orders.>")
    );
    assert_eq!(
        dynamic.get_field_by_name("requested_by").unwrap().as_str(),
        Some("alice")
    );
    assert_eq!(
        dynamic.get_field_by_name("reason").unwrap().as_str(),
        Some("gap")
    );
    let keys = dynamic.get_field_by_name("keys").unwrap();
    let keys: Vec<&str> = keys
        .as_list()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(keys, ["co_1", "co_2"]);
    let start = dynamic.get_field_by_name("start").unwrap();
    let start = start.as_message().unwrap();
    assert_eq!(
        start.get_field_by_name("seconds").unwrap().as_i64(),
        Some(1_700_000_000)
    );
    assert_eq!(start.get_field_by_name("nanos").unwrap().as_i32(), Some(5));
    // Schema → ours, and byte-identical re-encoding.
    assert_eq!(
        ReplayRequest::decode(&dynamic.encode_to_vec()[..]).unwrap(),
        ours
    );
    assert_eq!(dynamic.encode_to_vec(), ours.encode_to_vec());
}

#[test]
fn replay_status_matches_its_schema() {
    let pool = pool();
    let desc = pool
        .get_message_by_name(ampybus::control::REPLAY_STATUS_SCHEMA)
        .unwrap();
    assert_eq!(desc.fields().count(), 11);
    let state = pool
        .get_enum_by_name("ampy.control.v1.ReplayState")
        .unwrap();
    for (name, ours) in [
        ("REPLAY_STATE_UNSPECIFIED", ReplayState::Unspecified),
        ("REPLAY_STATE_ACCEPTED", ReplayState::Accepted),
        ("REPLAY_STATE_PROGRESS", ReplayState::Progress),
        ("REPLAY_STATE_COMPLETED", ReplayState::Completed),
        ("REPLAY_STATE_FAILED", ReplayState::Failed),
        ("REPLAY_STATE_REJECTED", ReplayState::Rejected),
    ] {
        assert_eq!(
            state.get_value_by_name(name).unwrap().number(),
            ours as i32,
            "{name}"
        );
    }
    assert_eq!(state.values().count(), 6);
    let ours = ReplayStatus {
        request_id: "r-1".into(),
        consumer: "oms".into(),
        state: ReplayState::Completed as i32,
        read: 10,
        applied: 3,
        skipped_duplicates: 6,
        failed: 1,
        first_message_id: "m-1".into(),
        last_message_id: "m-10".into(),
        error: "none".into(),
        reported_at: Some(ts(1_700_000_000, 0)),
    };
    let dynamic = DynamicMessage::decode(desc, &ours.encode_to_vec()[..]).unwrap();
    for (field, want) in [
        ("read", 10u64),
        ("applied", 3),
        ("skipped_duplicates", 6),
        ("failed", 1),
    ] {
        assert_eq!(
            dynamic.get_field_by_name(field).unwrap().as_u64(),
            Some(want),
            "{field}"
        );
    }
    assert_eq!(
        *dynamic.get_field_by_name("state").unwrap(),
        Value::EnumNumber(ReplayState::Completed as i32)
    );
    for (field, want) in [
        ("request_id", "r-1"),
        ("consumer", "oms"),
        ("first_message_id", "m-1"),
        ("last_message_id", "m-10"),
        ("error", "none"),
    ] {
        assert_eq!(
            dynamic.get_field_by_name(field).unwrap().as_str(),
            Some(want),
            "{field}"
        );
    }
    assert_eq!(
        ReplayStatus::decode(&dynamic.encode_to_vec()[..]).unwrap(),
        ours
    );
}
