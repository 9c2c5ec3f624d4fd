"""``ampybus.App``: consumers declared with a decorator, decoding from the annotation,
middleware, one shutdown; ``async with ampybus.connect(...)`` without a double ``await``; an
app process stopped by SIGTERM (exit 0) and SIGINT (130)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

from ampy.bars.v1 import bars_pb2
from ampy.common.v1 import common_pb2

import ampybus
from conftest import TIMEOUT, collect, token, within


def _bar(close: int) -> bars_pb2.BarBatch:
    b = bars_pb2.BarBatch()
    bar = b.bars.add()
    bar.security.CopyFrom(common_pb2.SecurityId(symbol="MSFT", mic="XNAS"))
    bar.close.CopyFrom(common_pb2.Decimal(scaled=close, scale=2))
    return b


async def _until(cond, what: str) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), TIMEOUT)
    except asyncio.TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_connect_is_awaitable_and_an_async_context_manager(embedded_url: str) -> None:
    async with ampybus.connect(embedded_url, producer="p@1", source="p") as bus:
        await bus.publish("ampy.dev.news.v1.raw", b"x", partition_key="k")
    bus2 = await ampybus.connect(embedded_url)
    async with bus2:
        assert len(await bus2.read("ampy.dev.news.>")) == 1
    async with await ampybus.connect(embedded_url) as bus3:
        assert len(await bus3.read("ampy.dev.news.>")) == 1


async def test_app_decodes_from_the_annotation_keeps_causes_and_runs_middleware(
    embedded_url: str,
) -> None:
    t = token()
    bars_topic = f"ampy.dev.bars.v1.{t}.XNAS.MSFT"
    news_topic = f"ampy.dev.news.v1.{t}"
    async with ampybus.connect(embedded_url, producer="p@1", source="p") as bus:
        for close in (100, 200, 300):
            await bus.publish(bars_topic, _bar(close), partition_key="XNAS.MSFT")
        # Not a BarBatch: dead-lettered before the handler.
        await bus.publish(bars_topic, b"raw", partition_key="XNAS.MSFT")
        for body in (b"ok", b"fail", b"poison"):
            await bus.publish(news_topic, body, partition_key=body.decode())

    app = ampybus.App(embedded_url, ops_addr="127.0.0.1:0")
    closes: List[int] = []
    news: Dict[str, int] = {}
    seen_by_middleware: List[str] = []

    @app.middleware
    async def audit(msg, call_next) -> None:
        seen_by_middleware.append(msg.topic)
        await call_next(msg)

    @app.consumer(f"ampy.dev.bars.v1.{t}.>", name=f"features-{t}", max_attempts=3, min_delay=0.001)
    async def on_bar(batch: bars_pb2.BarBatch) -> None:
        closes.append(batch.bars[0].close.scaled)

    @app.consumer(f"ampy.dev.news.>", name=f"news-{t}", max_attempts=3, min_delay=0.001, max_delay=0.005)
    def on_news(msg: ampybus.Message) -> None:
        body = msg.payload.decode()
        news[body] = news.get(body, 0) + 1
        if body == "fail":
            raise ValueError(f"cannot apply {body}")
        if body == "poison":
            raise ampybus.DeadLetter("handler_error: refused")

    stop = asyncio.Event()
    serving = asyncio.ensure_future(app.serve(stop))
    try:
        await _until(lambda: len(closes) == 3 and news.get("fail") == 3 and "poison" in news, "handlers")
        await _until(lambda: app.bus is not None, "the bus")
        bus = app.bus
        assert bus is not None

        async def dlq() -> List[ampybus.StoredMessage]:
            return await bus.read("ampy.dev.dlq.>")

        while len(await within(dlq())) < 3:
            await asyncio.sleep(0.01)
        reasons = sorted(m.headers.dlq_reason for m in await dlq())
    finally:
        stop.set()
        why = await within(serving)
    assert why == "requested"
    assert closes == [100, 200, 300]
    assert news == {"ok": 1, "fail": 3, "poison": 1}
    assert reasons == [
        "handler_error: refused",
        "max_retries: attempt 3: ValueError: cannot apply fail",
        "schema_mismatch: expected ampy.bars.v1.BarBatch got ampy.raw.v1.Bytes",
    ]
    # The middleware saw every delivery that reached a handler chain: 4 bars, 5 news attempts.
    assert len(seen_by_middleware) == 4 + 5
    stats = app.stats
    assert stats[f"features-{t}"].handled_ok == 3
    assert stats[f"features-{t}"].dead_lettered == {"schema_mismatch": 1}
    assert stats[f"news-{t}"].handled_ok == 1
    assert stats[f"news-{t}"].retried == 2
    assert stats[f"news-{t}"].dead_lettered == {"handler_error": 1, "max_retries": 1}


APP_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, ampybus
    url, name = sys.argv[1], sys.argv[2]
    app = ampybus.App(url)
    handled = 0

    # A short ack deadline: the next instance takes the partitions over after it (a Python
    # consumer that stopped does not hand its partition leases back at once).
    @app.consumer("ampy.dev.fills.>", name=name, workers=4, ack_deadline=2.0)
    async def on_fill(msg: ampybus.Message) -> None:
        global handled
        await asyncio.sleep(0.002)
        handled += 1
        print("@h", msg.payload.decode(), flush=True)
        if handled == 20:
            print("@ready", flush=True)

    try:
        app.run()
    finally:
        print("@stopped", flush=True)
    # The process ends normally: SystemExit(130) after SIGINT, 0 after SIGTERM, through the
    # interpreter's finalisation (which the native runtime's threads stay away from).
    """
)


def _run_app(url: str, name: str, sig: int, script: Path) -> tuple:
    proc = subprocess.Popen(
        [sys.executable, str(script), url, name],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    assert proc.stdout is not None
    handled: List[str] = []
    sent = False
    for line in proc.stdout:
        line = line.strip()
        if line == "@ready" and not sent:
            proc.send_signal(sig)
            sent = True
        elif line.startswith("@h "):
            handled.append(line[3:])
    code = proc.wait(timeout=TIMEOUT)
    assert sent, "the app never got ready"
    return code, handled


async def test_an_app_process_exits_0_on_sigterm_and_130_on_sigint_losing_nothing(
    embedded_url: str, tmp_path: Path
) -> None:
    n = 600
    async with ampybus.connect(embedded_url, producer="p@1", source="p") as bus:
        for i in range(0, n, 100):
            await bus.publish_batch(
                [("ampy.dev.fills.v1.events", f"m{j}".encode(), f"acct|co-{j % 10}") for j in range(i, i + 100)]
            )
    script = tmp_path / "app.py"
    script.write_text(APP_SCRIPT)
    name = f"positions-{token()}"
    loop = asyncio.get_running_loop()
    term = await loop.run_in_executor(None, _run_app, embedded_url, name, signal.SIGTERM, script)
    intr = await loop.run_in_executor(None, _run_app, embedded_url, name, signal.SIGINT, script)
    assert term[0] == 0
    assert intr[0] == 130
    handled = term[1] + intr[1]
    assert len(handled) < n, "everything was handled before the signals"
    async with ampybus.connect(embedded_url) as bus:
        async with bus.subscribe("ampy.dev.fills.>", consumer=name) as sub:

            async def rest() -> None:
                while len(set(handled)) < n:
                    handled.extend(m.payload.decode() for m in await collect(sub, 1))

            await within(rest())
    counts: Dict[str, int] = {}
    for h in handled:
        counts[h] = counts.get(h, 0) + 1
    twice = sorted(h for h, c in counts.items() if c > 1)
    lost = sorted(f"m{i}" for i in range(n) if f"m{i}" not in counts)
    assert lost == []
    # Known gap of the SDK's stop path (`Bus.run` as well as `App`): a message whose handler
    # finished as the stop came may have its ack dropped and come again to the next instance
    # (at-least-once holds; measured: 0 to 3 of 600). At most what was in flight at the two
    # signals (4 workers each) may repeat.
    assert len(twice) <= 8, twice
