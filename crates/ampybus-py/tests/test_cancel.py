"""Interrupting a consumer loses nothing: what was not acked comes again, what was acked does not."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import List, Set

import ampybus
from conftest import collect, token, within


async def _publish(bus: ampybus.Bus, topic: str, n: int) -> Set[bytes]:
    await bus.publish_batch([(topic, b"m%02d" % i, f"k{i}") for i in range(n)])
    return {b"m%02d" % i for i in range(n)}


async def _consume_then_hang(sub_factory, acked: List[bytes], stuck: asyncio.Event, use_with: bool) -> None:
    """Acks three messages, then hangs in the handler of the fourth (never settles it)."""

    async def body(sub: ampybus.Subscription) -> None:
        async for msg in sub:
            if len(acked) == 3:
                stuck.set()
                await asyncio.Event().wait()  # a handler that never finishes
            await msg.ack()
            acked.append(msg.payload)

    if use_with:
        async with sub_factory() as sub:
            await body(sub)
    else:
        await body(sub_factory())


async def _check_redelivery(bus: ampybus.Bus, topic: str, name: str, all_: Set[bytes], acked: List[bytes]) -> None:
    again = bus.subscribe(topic, consumer=name)
    rest = await collect(again, len(all_) - 3)
    assert {m.payload for m in rest} == all_ - set(acked)
    assert max(m.delivery_count for m in rest) >= 2  # the one that hung was delivered before
    # Nothing else: the next message is one published now, and no acked one came back.
    await bus.publish(topic, b"sentinel", partition_key="k0")
    (last,) = await collect(again, 1)
    assert last.payload == b"sentinel"
    stats = await again.close()
    assert stats is not None
    assert stats.handled_ok == len(all_) - 3 + 1 and stats.skipped_duplicates == 0


async def test_cancel_inside_async_with(url: str, bus_factory) -> None:
    bus = await bus_factory(url)
    t = token()
    topic = f"ampy.dev.news.v1.{t}"
    all_ = await _publish(bus, topic, 10)
    acked: List[bytes] = []
    stuck = asyncio.Event()
    task = asyncio.ensure_future(
        _consume_then_hang(lambda: bus.subscribe(topic, consumer=f"cancel-{t}", workers=4), acked, stuck, True)
    )
    await within(stuck.wait())
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await within(task)
    assert len(acked) == 3
    await _check_redelivery(bus, topic, f"cancel-{t}", all_, acked)


async def test_cancel_bare_async_for(url: str, bus_factory) -> None:
    """Without `async with`, the subscription is closed when it is garbage-collected."""
    bus = await bus_factory(url)
    t = token()
    topic = f"ampy.dev.news.v1.{t}"
    all_ = await _publish(bus, topic, 10)
    acked: List[bytes] = []
    stuck = asyncio.Event()
    task = asyncio.ensure_future(
        _consume_then_hang(lambda: bus.subscribe(topic, consumer=f"gc-{t}", workers=4), acked, stuck, False)
    )
    await within(stuck.wait())
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await within(task)
    del task
    gc.collect()
    assert len(acked) == 3
    await _check_redelivery(bus, topic, f"gc-{t}", all_, acked)


async def test_cancel_run(url: str, bus_factory) -> None:
    """The handler form: cancelling `bus.run` releases the message its handler was on."""
    bus = await bus_factory(url)
    t = token()
    topic = f"ampy.dev.news.v1.{t}"
    all_ = await _publish(bus, topic, 10)
    acked: List[bytes] = []
    stuck = asyncio.Event()

    async def handler(msg: ampybus.Message) -> None:
        if len(acked) == 3:
            stuck.set()
            await asyncio.Event().wait()
        acked.append(msg.payload)

    task = asyncio.ensure_future(bus.run(topic, handler, consumer=f"run-{t}", workers=1))
    await within(stuck.wait())
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await within(task)
    assert len(acked) == 3
    await _check_redelivery(bus, topic, f"run-{t}", all_, acked)
