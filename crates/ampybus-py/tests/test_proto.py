"""Protobuf across languages: ampy-proto classes from Python, prost types in Rust.

The Rust side is ``examples/proto_peer.rs`` (built by scripts/python-sdk.sh): it encodes and
decodes ``ampy.bars.v1.BarBatch`` with the ``ampybus-proto`` schemas, in its own process.
"""

from __future__ import annotations

import asyncio
import json
from typing import List

import pytest
from ampy.bars.v1 import bars_pb2
from ampy.common.v1 import common_pb2
from ampy.ticks.v1 import ticks_pb2

import ampybus
from conftest import binary, collect, token, within


def _batch(i: int) -> bars_pb2.BarBatch:
    b = bars_pb2.BarBatch()
    bar = b.bars.add()
    bar.security.CopyFrom(common_pb2.SecurityId(symbol="MSFT", mic="XNAS"))
    bar.close.CopyFrom(common_pb2.Decimal(scaled=41_000 + i, scale=2))
    bar.volume = 7 * i
    bar.trade_count = i + 1
    return b


async def _peer(*args: str) -> List[str]:
    proc = await asyncio.create_subprocess_exec(
        binary("AMPYBUS_PROTO_PEER", "examples/proto_peer"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await within(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()
    return out.decode().splitlines()


async def test_python_publishes_rust_decodes(url: str, bus_factory) -> None:
    bus = await bus_factory(url)
    t = token()
    topic = f"ampy.dev.bars.v1.{t}.XNAS.MSFT"
    receipts = [await bus.publish(topic, _batch(i), partition_key="XNAS.MSFT") for i in range(3)]
    lines = await _peer("consume", url, f"ampy.dev.bars.v1.{t}.>", f"rust-{t}", "3")
    got = [json.loads(line) for line in lines]
    assert [g["message_id"] for g in got] == [r.message_id for r in receipts]
    assert got == [
        {
            "message_id": receipts[i].message_id,
            "producer": "pytest@1",
            "symbol": "MSFT",
            "mic": "XNAS",
            "close_scaled": 41_000 + i,
            "close_scale": 2,
            "volume": 7 * i,
            "trade_count": i + 1,
        }
        for i in range(3)
    ]


async def test_rust_publishes_python_decodes(url: str, bus_factory) -> None:
    bus = await bus_factory(url)
    t = token()
    topic = f"ampy.dev.bars.v1.{t}.XNAS.AAPL"
    ids = await _peer("publish", url, topic, "3")
    assert len(ids) == 3
    sub = bus.subscribe(f"ampy.dev.bars.v1.{t}.>", consumer=f"py-{t}")
    msgs = await collect(sub, 3)
    await sub.close()
    assert [m.message_id for m in msgs] == ids
    for i, m in enumerate(msgs):
        assert m.headers.schema_fqdn == "ampy.bars.v1.BarBatch"
        assert m.headers.producer == "proto-peer@1"
        batch = m.decode(bars_pb2.BarBatch)
        assert isinstance(batch, bars_pb2.BarBatch)
        (bar,) = batch.bars
        assert (bar.security.symbol, bar.security.mic) == ("AAPL", "XNAS")
        assert (bar.close.scaled, bar.close.scale) == (10_000 + i, 2)
        assert (bar.volume, bar.trade_count) == (100 * i, i)
        # The bytes are the canonical encoding: Python re-encodes them identically.
        assert batch.SerializeToString(deterministic=True) == m.payload


async def test_schema_from_descriptor_and_mismatch(embedded_url: str, bus_factory) -> None:
    bus = await bus_factory(embedded_url)
    topic = "ampy.dev.bars.v1.XNAS.MSFT"
    await bus.publish(topic, _batch(0), partition_key="XNAS.MSFT")
    with pytest.raises(ampybus.HeaderError) as e:
        await bus.publish(
            topic, _batch(0), partition_key="XNAS.MSFT", schema_fqdn="ampy.ticks.v1.TickBatch"
        )
    assert e.value.field == "schema_fqdn"
    sub = bus.subscribe("ampy.dev.bars.>", consumer="mismatch")
    (m,) = await collect(sub, 1)
    await sub.close()
    assert m.headers.schema_fqdn == "ampy.bars.v1.BarBatch"
    with pytest.raises(ampybus.PayloadError) as d:
        m.decode(ticks_pb2.TickBatch)
    assert "`schema_fqdn`" in str(d.value) and "ampy.ticks.v1.TickBatch" in str(d.value)
    with pytest.raises(TypeError):
        m.decode(dict)
