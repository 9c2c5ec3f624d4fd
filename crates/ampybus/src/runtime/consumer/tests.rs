//! Unit tests of the consumer's internals.

/// A record is kept while a batch looked up before it still has a message in the runtime,
/// forgotten once none has (at the next record), and `cap` bounds the book regardless.
#[test]
fn key_book_keeps_records_while_an_earlier_batch_is_in_flight() {
    use super::{DKey, KeyBook, Keys};
    let key = |i: u128| DKey::Id(i);
    let one = |i: u128| Keys([Some(key(i)), None]);
    let mut b = KeyBook::new(1000);
    let early = b.open_batch();
    b.record(&[key(1), key(2)]);
    // A later batch was looked up after the records: it does not hold them.
    let late = b.open_batch();
    drop(late);
    b.record(&[key(3)]);
    assert!(b.applied(&one(1)) && b.applied(&one(2)) && b.applied(&one(3)));
    // The early batch's last message leaves: the next record forgets what it no longer
    // needs (all of it: no batch is open any more).
    drop(early);
    b.record(&[key(4)]);
    assert!(!b.applied(&one(1)) && !b.applied(&one(2)) && !b.applied(&one(3)));
    assert!(!b.applied(&one(4)), "no batch in flight needs key 4");
    assert_eq!(b.order.len(), 0);
    // Keys being handled (or handled and not recorded) are never forgotten by recording
    // others; they count as applied once recorded.
    let held = b.open_batch();
    b.marks.insert(key(9), super::Mark::Handling);
    b.record(&[key(5)]);
    drop(held);
    b.record(&[key(6)]);
    assert_eq!(b.mark(&key(9)), Some(super::Mark::Handling));
    assert!(!b.applied(&one(9)));
    // Recorded while a batch looked up before the record is in flight: applied.
    let looked_up = b.open_batch();
    b.record(&[key(9)]);
    assert_eq!(b.mark(&key(9)), Some(super::Mark::Recorded));
    assert!(b.applied(&one(9)));
    // A released claim forgets a handling key, never a recorded one.
    b.marks.insert(key(10), super::Mark::Handling);
    b.release(&one(10));
    b.release(&one(9));
    assert_eq!(b.mark(&key(10)), None);
    assert!(b.applied(&one(9)));
    drop(looked_up);
    // The cap bounds the records even while a batch holds them.
    let mut b = KeyBook::new(3);
    let _stuck = b.open_batch();
    b.record(&[key(1), key(2), key(3), key(4), key(5)]);
    assert_eq!(b.order.len(), 3);
    assert!(!b.applied(&one(1)) && !b.applied(&one(2)));
    assert!(b.applied(&one(3)) && b.applied(&one(5)));
}

#[test]
fn a_slow_lag_read_spaces_out_the_next() {
    assert_eq!(super::lag_poll_pause(Duration::ZERO), super::LAG_POLL);
    assert_eq!(
        super::lag_poll_pause(Duration::from_millis(10)),
        super::LAG_POLL
    );
    assert_eq!(
        super::lag_poll_pause(Duration::from_millis(300)),
        Duration::from_secs(15)
    );
}

use super::*;

#[test]
fn canonical_forms_parse_exactly() {
    let id = "018f5e2f-9b1c-46aa-8f7a-3b1d8f3ea0c2";
    let v = canonical_uuid(id).unwrap();
    let mut buf = [0u8; 36];
    assert_eq!(key_text(&DKey::Id(v), &mut buf), id);
    assert!(canonical_uuid("018F5E2F-9B1C-46AA-8F7A-3B1D8F3EA0C2").is_none());
    assert!(canonical_uuid("018f5e2f9b1c46aa8f7a3b1d8f3ea0c2").is_none());
    assert_eq!(
        DKey::parse("orders:co_1"),
        DKey::Text(Arc::from("orders:co_1"))
    );
}

#[test]
fn idle_keys_are_swept_and_slots_reused() {
    let mut s = Sched::new();
    s.sweep_at = 4;
    let ids: Vec<u32> = (0..4).map(|i| s.slot(&format!("k{i}"))).collect();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    s.slots[1].busy = true;
    // The fifth key sweeps the three idle ones and reuses a slot.
    let id = s.slot("k4");
    assert!(id != 1 && id < 4);
    assert_eq!(s.index.len(), 2);
    assert_eq!(s.slot("k1"), 1);
}

/// The retry reasons index the metric handles made from `obs::RETRY_REASONS`: same order.
#[test]
fn retry_reasons_index_the_metric_labels() {
    use super::attempt::RetryReason;
    assert_eq!(
        crate::obs::RETRY_REASONS[RetryReason::Handler as usize],
        "handler"
    );
    assert_eq!(
        crate::obs::RETRY_REASONS[RetryReason::BlobUnavailable as usize],
        "blob_unavailable"
    );
    assert_eq!(crate::obs::RETRY_REASONS.len(), 2);
}

/// Phases only move forward: a wait for a phase is satisfied by any later one.
#[test]
fn phases_are_ordered() {
    assert!(Phase::Running < Phase::Draining && Phase::Draining < Phase::HardStop);
}

/// An item the scheduler can hold, told apart by its sequence (no transport behind it).
fn item(seq: u64) -> Item {
    let mut d = Delivery::placeholder();
    d.info.sequence = seq;
    ItemData::new(d, Instant::now())
}

fn seq_of(taken: Option<(u32, Item)>) -> Option<(u32, u64)> {
    taken.map(|(k, i)| (k, i.delivery.info.sequence))
}

/// Each key's messages are handed out in arrival order, one at a time per key; different
/// keys are handed out side by side, in the order they became ready.
#[test]
fn scheduler_hands_each_key_in_order_one_at_a_time() {
    let mut s = Sched::new();
    let a = s.slot("A");
    let b = s.slot("B");
    assert_eq!(s.slot("A"), a, "a key keeps its slot");
    assert!(s.push(a, item(1)), "an idle key becomes ready");
    assert!(!s.push(a, item(2)), "a ready key is queued once");
    assert!(s.push(b, item(3)));
    assert_eq!(seq_of(s.take()), Some((a, 1)));
    assert_eq!(seq_of(s.take()), Some((b, 3)));
    assert_eq!(seq_of(s.take()), None, "A is busy with 1: its 2 waits");
    assert!(s.finish(a), "A has more: ready again");
    assert_eq!(seq_of(s.take()), Some((a, 2)));
    assert!(!s.finish(a));
    assert!(!s.finish(b));
    assert_eq!(seq_of(s.take()), None);
}

/// A parked key (a strict retry waiting out its delay) is not handed out until it is made
/// ready again, and then its head comes first.
#[test]
fn scheduler_holds_a_parked_key() {
    let mut s = Sched::new();
    let a = s.slot("A");
    s.slots[a as usize].parked = true;
    assert!(!s.push(a, item(1)));
    assert!(!s.push(a, item(2)));
    assert_eq!(seq_of(s.take()), None);
    s.slots[a as usize].parked = false;
    assert!(s.make_ready(a));
    assert_eq!(seq_of(s.take()), Some((a, 1)));
    assert!(s.finish(a));
    assert_eq!(seq_of(s.take()), Some((a, 2)));
}

/// A sweep forgets idle keys and keeps busy ones; a forgotten key's slot is reused.
#[test]
fn scheduler_sweep_forgets_only_idle_keys() {
    let mut s = Sched::new();
    let a = s.slot("A");
    let b = s.slot("B");
    assert!(s.push(a, item(1)));
    assert_eq!(seq_of(s.take()), Some((a, 1)));
    s.sweep();
    assert_eq!(s.index.len(), 1, "B was idle");
    assert_eq!(s.index.get("A"), Some(&a));
    let c = s.slot("C");
    assert_eq!(c, b, "C takes B's freed slot");
    assert!(s.push(c, item(2)));
    assert_eq!(seq_of(s.take()), Some((c, 2)));
}

/// At shutdown everything queued or delayed is handed back, once.
#[test]
fn scheduler_drains_queued_and_delayed() {
    let mut s = Sched::new();
    let a = s.slot("A");
    let b = s.slot("B");
    s.push(a, item(1));
    s.push(a, item(2));
    s.push(b, item(3));
    s.delayed.insert(7, (b, item(4)));
    assert_eq!(seq_of(s.take()), Some((a, 1)));
    let mut left: Vec<u64> = s
        .drain_all()
        .iter()
        .map(|i| i.delivery.info.sequence)
        .collect();
    left.sort_unstable();
    assert_eq!(left, vec![2, 3, 4]);
    assert_eq!(seq_of(s.take()), None);
    assert!(s.drain_all().is_empty());
}

/// A consumer's metric handles are read by slot: a slot is filled once, slots of different
/// chunks do not mix, and the table ends at its last slot (4,095).
#[test]
fn handle_table_fills_each_slot_once_and_ends_at_its_last() {
    let metrics = crate::obs::BusMetrics::new();
    let table = HandleTable::new();
    let bars = || metrics.consumer_topic("ampy.dev.bars.v1", "c");
    let ticks = || metrics.consumer_topic("ampy.dev.ticks.v1", "c");
    assert!(table.get(TopicSlot(0)).is_none());
    assert!(table.set(TopicSlot(0), bars()));
    assert!(!table.set(TopicSlot(0), ticks()), "a slot is filled once");
    assert!(table.set(TopicSlot(64), ticks()));
    table.get(TopicSlot(0)).unwrap().consumed.inc();
    table.get(TopicSlot(0)).unwrap().consumed.inc();
    table.get(TopicSlot(64)).unwrap().consumed.inc();
    assert_eq!(table.get(TopicSlot(0)).unwrap().consumed.get(), 2);
    assert_eq!(table.get(TopicSlot(64)).unwrap().consumed.get(), 1);
    assert!(table.get(TopicSlot(1)).is_none() && table.get(TopicSlot(65)).is_none());
    assert!(table.set(TopicSlot(4095), bars()));
    assert_eq!(table.get(TopicSlot(4095)).unwrap().consumed.get(), 2);
    assert!(!table.set(TopicSlot(4096), bars()));
    assert!(table.get(TopicSlot(4096)).is_none());
}
