"""Batching under the API: concurrent publishes coalesced in Rust, messages taken per batch.

Each test runs on the embedded log and on NATS JetStream and asserts exact counts.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import datetime, timedelta, timezone
from typing import Dict, List

import ampybus
from conftest import collect, token, until, within


async def test_concurrent_publishes_coalesce(url: str, bus_factory) -> None:
    bus = await bus_factory(url)
    t = token()
    topic = f"ampy.dev.news.v1.{t}"
    keys = [f"k{k}" for k in range(5)]
    n = 300
    # All calls are queued before the first one can complete: they coalesce into batches.
    receipts = await within(
        asyncio.gather(
            *(bus.publish(topic, f"{keys[i % 5]}:{i}".encode(), partition_key=keys[i % 5]) for i in range(n))
        )
    )
    assert len(receipts) == n
    assert len({r.message_id for r in receipts}) == n
    assert len({r.sequence for r in receipts}) == n
    assert not any(r.duplicate for r in receipts)
    sent, largest = bus._native._publisher_stats()
    assert sent == n and largest > 1, (sent, largest)

    # Stored in call order: per key, the consumer sees them in the order they were called.
    sub = bus.subscribe(topic, consumer=f"coal-{t}", workers=8)
    got = await collect(sub, n)
    seen: Dict[str, List[int]] = {k: [] for k in keys}
    for m in got:
        key, i = m.payload.decode().split(":")
        assert key == m.partition_key
        seen[key].append(int(i))
    assert seen == {k: list(range(j, n, 5)) for j, k in enumerate(keys)}
    assert {m.message_id for m in got} == {r.message_id for r in receipts}
    stats = await sub.close()
    assert stats is not None and stats.handled_ok == n and stats.skipped_duplicates == 0


async def test_invalid_publish_fails_alone(url: str, bus_factory) -> None:
    bus = await bus_factory(url)
    t = token()
    topic = f"ampy.dev.news.v1.{t}"
    calls = [bus.publish(topic, b"ok%d" % i, partition_key=f"k{i % 3}") for i in range(40)]
    calls.insert(10, bus.publish("ampy.dev.news.v1.Bad Topic", b"bad", partition_key="k0"))
    calls.insert(25, bus.publish(topic, b"bad", partition_key="k0", headers={"message_id": "not-a-uuid"}))
    out = await within(asyncio.gather(*calls, return_exceptions=True))
    assert isinstance(out[10], ampybus.TopicError), out[10]
    assert isinstance(out[25], ampybus.HeaderError), out[25]
    assert "message_id" in str(out[25]) and not str(out[25]).startswith("invalid header: message ")
    good = [r for i, r in enumerate(out) if i not in (10, 25)]
    assert all(isinstance(r, ampybus.Receipt) for r in good), good
    assert len({r.message_id for r in good}) == 40

    sub = bus.subscribe(topic, consumer=f"inv-{t}")
    got = await collect(sub, 40)
    assert sorted(m.payload for m in got) == sorted(b"ok%d" % i for i in range(40))
    # Nothing else was stored: the next message is one published now.
    await bus.publish(topic, b"sentinel", partition_key="k0")
    (last,) = await collect(sub, 1)
    assert last.payload == b"sentinel"
    stats = await sub.close()
    assert stats is not None and stats.handled_ok == 41


async def test_batched_delivery_order_and_counts(url: str, bus_factory) -> None:
    bus = await bus_factory(url)
    t = token()
    topic = f"ampy.dev.news.v1.{t}"
    keys = [f"key{k}" for k in range(20)]
    batch = [ampybus.Outgoing(topic, f"{k}:{i}".encode(), k) for i in range(30) for k in keys]
    assert len(await bus.publish_batch(batch)) == 600
    sub = bus.subscribe(topic, consumer=f"batch-{t}", workers=16)
    got = await collect(sub, 600)
    seen: Dict[str, List[int]] = {k: [] for k in keys}
    for m in got:
        key, i = m.payload.decode().split(":")
        seen[key].append(int(i))
    assert seen == {k: list(range(30)) for k in keys}
    assert len({m.message_id for m in got}) == 600
    stats = await sub.close()
    assert stats is not None
    assert (stats.handled_ok, stats.retried, stats.dead_lettered_total, stats.skipped_duplicates) == (600, 0, 0, 0)


async def test_mixed_outcomes_in_one_batch(url: str, bus_factory) -> None:
    """Ack, retry and dead-letter settled side by side keep their own semantics."""
    bus = await bus_factory(url)
    t = token()
    topic = f"ampy.dev.news.v1.{t}"
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    await bus.publish_batch([(topic, b"m%02d" % i, f"k{i}") for i in range(30)])
    sub = bus.subscribe(topic, consumer=f"mixed-{t}", workers=30, min_delay=0.01, max_delay=0.05)
    deliveries: Dict[bytes, int] = {}

    async def run() -> None:
        settled = 0
        async for m in sub:
            deliveries[m.payload] = deliveries.get(m.payload, 0) + 1
            i = int(m.payload[1:])
            if i % 3 == 1 and deliveries[m.payload] == 1:
                await m.retry(0.0)
            elif i % 3 == 2:
                await m.dead_letter("bad price")
                settled += 1
            else:
                await m.ack()
                settled += 1
            if settled == 30:
                return

    await within(run())
    stats = await sub.close()
    assert stats is not None
    assert stats.handled_ok == 20 and stats.retried == 10
    assert stats.dead_lettered == {"handler_error": 10}
    assert {p: c for p, c in deliveries.items() if c > 1} == {b"m%02d" % i: 2 for i in range(30) if i % 3 == 1}

    async def dead() -> List[ampybus.StoredMessage]:
        rows = await bus.dlq.inspect("ampy.dev.dlq.v1.news", since=since)
        mine = [m for m in rows if m.original_topic == topic]
        return mine if len(mine) >= 10 else []

    rows = await until(dead)
    assert sorted(m.payload for m in rows) == [b"m%02d" % i for i in range(30) if i % 3 == 2]
    assert {m.dlq_reason for m in rows} == {"handler_error: bad price"}


async def test_publish_batch_item_forms(embedded_url: str, bus_factory) -> None:
    """Every item form reaches the log with the same headers: Outgoing, tuples, dicts."""
    bus = await bus_factory(embedded_url)
    t = token()
    topic = f"ampy.dev.news.v1.{t}"
    items = [
        ampybus.Outgoing(topic, b"a", "k1"),
        (topic, b"b", "k2", "dk-b"),
        (topic, bytearray(b"c"), "k3", None, "ampy.news.v1.Custom"),
        ampybus.Outgoing(topic, b"d", "k4", headers={"x_extra": "1"}),
        {"topic": topic, "payload": b"e", "partition_key": "k5", "dedupe_key": "dk-e"},
    ]
    receipts = await bus.publish_batch(items, headers={"x_common": t})
    assert len({r.message_id for r in receipts}) == 5
    got = {m.payload: m for m in await bus.read(topic)}
    assert sorted(got) == [b"a", b"b", b"c", b"d", b"e"]
    assert [got[p].headers.partition_key for p in sorted(got)] == ["k1", "k2", "k3", "k4", "k5"]
    assert got[b"b"].headers.dedupe_key == "dk-b" and got[b"e"].headers.dedupe_key == "dk-e"
    assert got[b"a"].headers.dedupe_key is None
    assert got[b"c"].headers.schema_fqdn == "ampy.news.v1.Custom"
    assert got[b"a"].headers.schema_fqdn == ampybus.RAW_BYTES_SCHEMA
    assert got[b"d"].headers["x_extra"] == "1" and "x_extra" not in got[b"a"].headers
    assert {got[p].headers["x_common"] for p in got} == {t}
    assert {got[p].headers.producer for p in got} == {"pytest@1"}

    # A list of plain items (taken as given, without the Python conversion) lands the same.
    plain = [
        ampybus.Outgoing(topic, b"f", "k6"),
        (topic, b"g", "k7", "dk-g", "ampy.news.v1.Custom", None),
        ampybus.Outgoing(topic, b"h", "k8", schema_fqdn="ampy.news.v1.Other"),
    ]
    receipts = await bus.publish_batch(plain, schema_fqdn="ampy.news.v1.Default")
    assert type(receipts) is list and len({r.message_id for r in receipts}) == 3
    got = {m.payload: m for m in await bus.read(topic)}
    assert sorted(got) == [b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"]
    assert [got[p].headers.schema_fqdn for p in (b"f", b"g", b"h")] == [
        "ampy.news.v1.Default",
        "ampy.news.v1.Custom",
        "ampy.news.v1.Other",
    ]
    assert [got[p].headers.partition_key for p in (b"f", b"g", b"h")] == ["k6", "k7", "k8"]
    assert got[b"g"].headers.dedupe_key == "dk-g" and got[b"f"].headers.dedupe_key is None
    assert [got[p].message_id for p in (b"f", b"g", b"h")] == [r.message_id for r in receipts]

    # A clash between a keyword field and the item's own headers names the message.
    bad = [ampybus.Outgoing(topic, b"x", "k1"), ampybus.Outgoing(topic, b"y", "k1", headers={"partition_key": "k9"})]
    try:
        await bus.publish_batch(bad)
    except ampybus.HeaderError as e:
        assert "partition_key" in str(e)
    else:
        raise AssertionError("a clashing partition_key must fail")
    # An invalid message fails the batch with its index; nothing is sent.
    try:
        await bus.publish_batch([(topic, b"x", "k1"), (topic, b"y", "bad key with spaces")])
    except ampybus.HeaderError as e:
        assert "message 1" in str(e)
    else:
        raise AssertionError("an invalid partition_key must fail")
    assert len(await bus.read(topic)) == 8


async def test_long_publish_batch_is_whole_or_nothing(embedded_url: str, bus_factory) -> None:
    """A long batch lands whole and in order, or not at all: an invalid message late in the
    list fails it with its index, an item that cannot be read names its index, and an item
    that needs the Python conversion late in the list leaves nothing half-sent."""
    bus = await bus_factory(embedded_url)
    topic = f"ampy.dev.news.v1.{token()}"
    items = [ampybus.Outgoing(topic, b"%d" % i, f"k{i % 7}") for i in range(400)]
    receipts = await bus.publish_batch(items)
    got = await bus.read(topic)
    assert [m.payload for m in got] == [b"%d" % i for i in range(400)]
    assert [m.message_id for m in got] == [r.message_id for r in receipts]
    assert len(set(r.message_id for r in receipts)) == 400

    bad = list(items)
    bad[333] = ampybus.Outgoing(topic, b"x", "bad key with spaces")
    try:
        await bus.publish_batch(bad)
    except ampybus.HeaderError as e:
        assert "message 333" in str(e), str(e)
    else:
        raise AssertionError("an invalid partition_key must fail")
    unreadable = list(items)
    unreadable[250] = (123, b"x", "k1")
    try:
        await bus.publish_batch(unreadable)
    except TypeError as e:
        assert "message 250" in str(e), str(e)
    else:
        raise AssertionError("a topic that is not a str must fail")
    assert len(await bus.read(topic)) == 400

    mixed: List[object] = [ampybus.Outgoing(topic, b"m%d" % i, "k1") for i in range(300)]
    mixed[290] = {"topic": topic, "payload": b"m290", "partition_key": "k2"}
    await bus.publish_batch(mixed)
    got = await bus.read(topic)
    assert [m.payload for m in got[400:]] == [b"m%d" % i for i in range(300)]
    assert got[690].headers.partition_key == "k2" and len(got) == 700


async def test_receipts_name_the_ids_given_and_the_ids_made(url: str, bus_factory) -> None:
    # A receipt holds the id as 16 bytes and writes its text when read: the text must be the
    # id the message was stored with, given by the caller or made by the SDK, payloads intact.
    bus = await bus_factory(url)
    topic = f"ampy.dev.news.v1.{token()}"
    # Fresh UUIDv7s (a broker's duplicate window remembers ids of earlier runs).
    ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    given = [
        str(uuid.UUID(f"{ms:012x}7{secrets.token_hex(1)}{secrets.token_hex(1)[0]}8{secrets.token_hex(8)[1:]}"))
        for _ in range(2)
    ]
    one = await bus.publish(topic, b"p0", partition_key="k0", headers={"message_id": given[0]})
    assert one.message_id == given[0] and repr(one).startswith(f"Receipt(message_id=\"{given[0]}\"")
    items = [ampybus.Outgoing(topic, b"p1", "k1", headers={"message_id": given[1]})]
    items += [ampybus.Outgoing(topic, f"p{i}".encode(), f"k{i}") for i in range(2, 6)]
    receipts = await bus.publish_batch(items)
    assert receipts[0].message_id == given[1]
    stored = {m.payload: m.message_id for m in await bus.read(topic)}
    assert sorted(stored) == [f"p{i}".encode() for i in range(6)]
    assert [stored[f"p{i}".encode()] for i in range(6)] == [one.message_id] + [r.message_id for r in receipts]
    assert len(set(stored.values())) == 6 and all(len(i) == 36 and i == i.lower() for i in stored.values())
