"""Replay through a Python consumer, and the metrics endpoint."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import List, Tuple

import ampybus
from conftest import token, within


async def test_replay_exact_counts(url: str, bus_factory) -> None:
    bus = await bus_factory(url)
    t = token()
    pattern = f"ampy.dev.news.v1.{t}.>"
    start = datetime.now(timezone.utc) - timedelta(seconds=2)
    await bus.publish_batch(
        [(f"ampy.dev.news.v1.{t}.wire", b"n%d" % i, f"k{i % 3}") for i in range(9)]
    )
    handled: List[bytes] = []
    all_handled = asyncio.Event()

    def handler(msg: ampybus.Message) -> None:  # a plain function works too
        handled.append(msg.payload)
        if len(handled) == 9:
            all_handled.set()

    stop = asyncio.Event()
    run = asyncio.ensure_future(bus.run(pattern, handler, consumer=f"replay-{t}", stop=stop))
    await within(all_handled.wait())
    end = datetime.now(timezone.utc) + timedelta(seconds=1)

    # Everything in the window was applied already: the replay reads 9, applies 0.
    s = await within(bus.replay(pattern, start, end, consumer=f"replay-{t}", timeout=30), 60)
    assert isinstance(s, ampybus.ReplayStatus)
    assert (s.state, s.read, s.applied, s.skipped_duplicates, s.failed) == ("completed", 9, 0, 9, 0)
    assert s.first_message_id and s.last_message_id and s.error == ""

    # Scoped to one key: the three of k1.
    s = await within(
        bus.replay(pattern, start, end, consumer=f"replay-{t}", keys=["k1"], timeout=30), 60
    )
    assert (s.read, s.applied, s.skipped_duplicates) == (3, 0, 3)
    stop.set()
    stats = await within(run)
    assert stats.handled_ok == 9 and len(handled) == 9


async def test_replay_of_an_unknown_consumer_times_out(embedded_url: str, bus_factory) -> None:
    bus = await bus_factory(embedded_url)
    now = datetime.now(timezone.utc)
    try:
        await bus.replay("ampy.dev.news.>", now - timedelta(minutes=1), now, consumer="nobody", timeout=0.5)
    except ampybus.TimeoutError as e:
        assert "nobody" in str(e) or "replay" in str(e)
    else:
        raise AssertionError("a replay nobody serves must time out")


def _get(url: str) -> Tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_metrics_endpoint(embedded_url: str, bus_factory) -> None:
    bus = await bus_factory(embedded_url)
    t = token()
    for i in range(5):
        await bus.publish("ampy.dev.news.v1.raw", b"x", partition_key=f"n{i}", producer=f"m-{t}")
    sub = bus.subscribe("ampy.dev.news.>", consumer=f"metrics-{t}")
    n = 0
    async for m in sub:
        await m.ack()
        n += 1
        if n == 5:
            break
    async with await bus.serve_metrics("127.0.0.1:0") as server:
        status, text = await asyncio.to_thread(_get, server.url + "/metrics")
        assert status == 200
        line = [
            ln for ln in text.splitlines()
            if ln.startswith("bus_produced_total{") and f'producer="m-{t}"' in ln
        ]
        assert len(line) == 1 and line[0].endswith(" 5"), line
        status, body = await asyncio.to_thread(_get, server.url + "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = await asyncio.to_thread(_get, server.url + "/stats")
        stats = json.loads(body)
        mine = [c for c in stats["consumers"] if c["name"] == f"metrics-{t}"]
        assert len(mine) == 1 and mine[0]["handled_ok"] == 5
    assert f'producer="m-{t}"' in bus.metrics_text()
    await sub.close()
