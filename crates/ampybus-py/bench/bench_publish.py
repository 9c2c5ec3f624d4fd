"""Publish and consume throughput of the Python SDK against nats-py and the Rust core.

Run through ``scripts/python-sdk.sh bench [options]`` (a release build of the extension into
``.venv-ampybus/``), or directly with a venv that has ``ampybus`` and ``nats-py``::

    python bench/bench_publish.py --url nats://127.0.0.1:4222 --messages 50000 --rounds 5

Before the first round the script waits (up to ``--load-wait`` seconds) for a quiet machine:
1-minute load average below ``--max-load``; the load at the start and the end is reported.

Publish (256-byte payloads, 100 partition keys, topic ``ampy.dev.bars.v1.benchpy.…``, the
contract's headers on every message, every PubAck awaited), rounds interleaved (each round
starts one row later than the last):

* ``nats-py awaited``: ``await js.publish(subject, payload, headers=…)`` one at a time.
* ``sdk awaited``: ``await bus.publish(...)`` one at a time.
* ``nats-py pipelined``: ``await js.publish_async(...)`` (``publish_async_max_pending`` =
  ``--inflight``), then ``publish_async_completed()``; every ack checked.
* ``sdk batched``: ``await bus.publish_batch(1,000 Outgoing)`` per call (the list is built in
  the timed loop).
* ``sdk batched, lists before``: the same, the lists of ``Outgoing`` built before the clock
  starts (as the core rows build their envelopes): the SDK's ``publish_batch`` alone.
* ``core publish_wire``: the Rust core's ``Bus::publish_wire`` of the same messages, 1,000 per
  call, envelopes prepared before the clock starts (``NativeBus._bench_publish_wire``, timed in
  Rust): what ``sdk batched`` is compared with.
* ``core publish_batch``: the core's ``Bus::publish_batch`` of the same messages, 1,000 per
  call, only the caller's headers built before the clock (ids, times, trace context filled and
  everything validated in the timed part, as for ``sdk batched``): what the SDK adds to.
* ``sdk batched, per batch`` and ``core publish_wire, per batch``: ``sdk batched, lists before``
  and ``core publish_wire`` taking turns batch by batch (1,000 messages each, which goes first
  alternating), each row's msg/s over the time it spent; the server's drift over seconds (a row
  of 50,000 messages varies by half on a 2-core machine) weighs on both alike, so their ratio is
  the steadiest figure of what the SDK's ``publish_batch`` adds to the core.
* ``sdk pipelined``: up to ``--inflight`` ``bus.publish(...)`` coroutines in flight
  (``asyncio`` tasks; a new one starts as one finishes); coalesced into batches in Rust.

nats-py sends the same headers as the SDK (``message_id`` = ``Nats-Msg-Id`` a fresh UUID per
message, ``produced_at``, ``traceparent``, … built in the timed loop like the SDK does in Rust).

Consume: ``--consume-messages`` messages over 1,000 partition keys are published first
(batched), then a new durable consumer (``--workers`` workers, ``max_in_flight`` 4,096) reads
them into a trivial handler (``async for`` + ``await msg.ack()``), timed from the first message
to the last ack handed over (the final counts are checked: exactly ``--consume-messages``
handled); without and with dedupe, on NATS (same server) and on the embedded log
(``sync=normal``), rounds interleaved. ``core`` rows run the Rust consumer runtime alone on the
same data and settings (``NativeBus._bench_consume``: a Rust handler that only counts, timed
from its first call to its last): the ratio is what the SDK keeps of the core. Results: best / median / worst over rounds, as a table
(and ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from typing import Awaitable, Callable, Dict, List, Tuple

import nats

import ampybus

PAYLOAD = bytes(range(256))
KEYS = [f"XNAS.K{i:03d}" for i in range(100)]
SCHEMA = "ampy.bars.v1.BarBatch"


def headers_for(message_id: str) -> Dict[str, str]:
    """The contract headers the SDK writes, for nats-py to send the same."""
    trace = uuid.uuid4().hex
    span = uuid.uuid4().hex[:16]
    return {
        "Nats-Msg-Id": message_id,
        "message_id": message_id,
        "schema_fqdn": SCHEMA,
        "schema_version": "1.0.0",
        "content_type": "application/x-protobuf",
        "produced_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "producer": "bench@1",
        "source": "bench",
        "run_id": "bench-run",
        "partition_key": KEYS[0],
        "traceparent": f"00-{trace}-{span}-01",
        "trace_id": trace,
        "span_id": span,
    }


async def sdk_awaited(bus: ampybus.Bus, topic: str, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        await bus.publish(topic, PAYLOAD, partition_key=KEYS[i % 100], schema_fqdn=SCHEMA)
    return n / (time.perf_counter() - t0)


async def sdk_batched(bus: ampybus.Bus, topic: str, n: int, batch: int = 1000) -> float:
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        items = [ampybus.Outgoing(topic, PAYLOAD, KEYS[i % 100]) for i in range(start, min(n, start + batch))]
        await bus.publish_batch(items, schema_fqdn=SCHEMA)
    return n / (time.perf_counter() - t0)


async def sdk_batched_prebuilt(bus: ampybus.Bus, topic: str, n: int, batch: int = 1000) -> float:
    lists = [
        [ampybus.Outgoing(topic, PAYLOAD, KEYS[i % 100]) for i in range(start, min(n, start + batch))]
        for start in range(0, n, batch)
    ]
    t0 = time.perf_counter()
    for items in lists:
        await bus.publish_batch(items, schema_fqdn=SCHEMA)
    return n / (time.perf_counter() - t0)


async def alternating(bus: ampybus.Bus, topic: str, n: int, batch: int = 1000) -> Tuple[float, float]:
    """``publish_batch`` of a list built just before the clock (as the core's envelopes are)
    and ``core publish_wire`` taking turns batch by batch (each first in every other pair):
    msg/s of each over the time it spent, so that the server's drift over seconds weighs on
    both alike."""
    sdk_s = core_s = 0.0
    for k, start in enumerate(range(0, n, batch)):
        m = min(n, start + batch) - start

        async def sdk() -> float:
            items = [ampybus.Outgoing(topic, PAYLOAD, KEYS[i % 100]) for i in range(start, start + m)]
            t0 = time.perf_counter()
            await bus.publish_batch(items, schema_fqdn=SCHEMA)
            return time.perf_counter() - t0

        if k % 2:
            sdk_s += await sdk()
            core_s += await bus._native._bench_publish_wire(topic + ".core", m, m)
        else:
            core_s += await bus._native._bench_publish_wire(topic + ".core", m, m)
            sdk_s += await sdk()
    return n / sdk_s, n / core_s


async def core_publish_wire(bus: ampybus.Bus, topic: str, n: int, batch: int = 1000, wire: bool = True) -> float:
    seconds = await bus._native._bench_publish_wire(topic, n, batch, wire=wire)
    return n / seconds


async def sdk_pipelined(bus: ampybus.Bus, topic: str, n: int, inflight: int) -> float:
    sem = asyncio.Semaphore(inflight)
    tasks = []

    async def one(i: int) -> None:
        try:
            await bus.publish(topic, PAYLOAD, partition_key=KEYS[i % 100], schema_fqdn=SCHEMA)
        finally:
            sem.release()

    t0 = time.perf_counter()
    for i in range(n):
        await sem.acquire()
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    return n / (time.perf_counter() - t0)


async def natspy_awaited(js, subject: str, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await js.publish(subject, PAYLOAD, headers=headers_for(str(uuid.uuid4())))
    return n / (time.perf_counter() - t0)


async def natspy_pipelined(js, subject: str, n: int) -> float:
    futures = []
    t0 = time.perf_counter()
    for _ in range(n):
        futures.append(await js.publish_async(subject, PAYLOAD, headers=headers_for(str(uuid.uuid4()))))
    await js.publish_async_completed()
    rate = n / (time.perf_counter() - t0)
    failed = sum(1 for f in futures if f.exception() is not None)
    if failed:
        raise RuntimeError(f"nats-py: {failed} publishes failed")
    return rate


async def consume(url: str, n: int, workers: int, dedupe: bool, core: bool = False) -> float:
    async with await ampybus.connect(url, producer="bench@1", source="bench") as bus:
        t = uuid.uuid4().hex[:10]
        topic = f"ampy.dev.bars.v1.benchc{t}"
        for start in range(0, n, 1000):
            await bus.publish_batch(
                [ampybus.Outgoing(topic, PAYLOAD, f"XNAS.C{i % 1000:04d}") for i in range(start, min(n, start + 1000))],
                schema_fqdn=SCHEMA,
            )
        if core:
            seconds = await bus._native._bench_consume(topic, f"benchc-{t}", n, workers, dedupe, 4096)
            return n / seconds
        sub = bus.subscribe(topic, consumer=f"benchc-{t}", workers=workers, max_in_flight=4096, dedupe=dedupe)
        got = 0
        t0 = 0.0
        async for msg in sub:
            if got == 0:
                t0 = time.perf_counter()
            await msg.ack()
            got += 1
            if got == n:
                break
        rate = n / (time.perf_counter() - t0)
        stats = await sub.close()
        assert stats is not None and stats.handled_ok == n, stats
        return rate


def summary(xs: List[float]) -> Dict[str, float]:
    return {"best": max(xs), "median": statistics.median(xs), "worst": min(xs)}


def wait_quiet(max_load: float, wait: float) -> float:
    """Waits up to `wait` seconds for a 1-minute load average below `max_load`; returns it."""
    deadline = time.monotonic() + wait
    load = os.getloadavg()[0]
    while load >= max_load and time.monotonic() < deadline:
        print(f"waiting for a quiet machine: load {load:.2f} >= {max_load}", file=sys.stderr)
        time.sleep(10)
        load = os.getloadavg()[0]
    return load


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="nats://127.0.0.1:4222")
    ap.add_argument("--stream-prefix", default="AMPYPYBENCH")
    ap.add_argument("--messages", type=int, default=50_000, help="per round, batched and pipelined")
    ap.add_argument("--awaited-messages", type=int, default=5_000, help="per round, awaiting each")
    ap.add_argument("--inflight", type=int, default=4_000)
    ap.add_argument("--consume-messages", type=int, default=50_000)
    ap.add_argument("--workers", type=int, default=64, help="consumer workers (messages with Python at once)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load below this")
    ap.add_argument("--load-wait", type=float, default=600.0, help="at most this many seconds")
    ap.add_argument("--skip-publish", action="store_true")
    ap.add_argument("--skip-consume", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    load_start = wait_quiet(a.max_load, a.load_wait)
    print(f"1-minute load average at the start: {load_start:.2f}", file=sys.stderr)

    runs: Dict[str, List[float]] = {}
    if not a.skip_publish:
        sdk_url = f"{a.url}?stream_prefix={a.stream_prefix}&max_age_days=1&max_in_flight={a.inflight}"
        bus = await ampybus.connect(sdk_url, producer="bench@1", source="bench")
        nc = await nats.connect(a.url)
        js = nc.jetstream(publish_async_max_pending=a.inflight)
        # The SDK creates (or finds) the stream capturing ampy.dev.bars.>; nats-py publishes into it.
        await bus.publish("ampy.dev.bars.v1.benchpy.warmup", PAYLOAD, partition_key=KEYS[0], schema_fqdn=SCHEMA)
        await js.publish("ampy.dev.bars.v1.benchpy.warmup", PAYLOAD, headers=headers_for(str(uuid.uuid4())))
        for r in range(a.rounds):
            subject = f"ampy.dev.bars.v1.benchpy.{uuid.uuid4().hex[:8]}"
            Row = Tuple[str, Callable[[], Awaitable[float]]]
            plan: List[Row] = [
                ("nats-py awaited", lambda: natspy_awaited(js, subject + ".nawait", a.awaited_messages)),
                ("sdk awaited", lambda: sdk_awaited(bus, subject + ".sawait", a.awaited_messages)),
                ("nats-py pipelined", lambda: natspy_pipelined(js, subject + ".npipe", a.messages)),
                ("sdk pipelined", lambda: sdk_pipelined(bus, subject + ".spipe", a.messages, a.inflight)),
            ]
            # The rows compared with each other run back to back (the server's speed drifts
            # over seconds), in the opposite order every other round.
            block: List[Row] = [
                ("sdk batched", lambda: sdk_batched(bus, subject + ".sbatch", a.messages)),
                ("sdk batched, lists before", lambda: sdk_batched_prebuilt(bus, subject + ".sbpre", a.messages)),
            ]
            if hasattr(bus._native, "_bench_publish_wire"):  # builds before issue 15 lack it
                block.insert(1, ("core publish_wire", lambda: core_publish_wire(bus, subject + ".cwire", a.messages)))
                block.append(("core publish_batch", lambda: core_publish_wire(bus, subject + ".cbatch", a.messages, wire=False)))

                async def pair(subject: str = subject) -> float:
                    sdk, core = await alternating(bus, subject + ".alt", a.messages)
                    runs.setdefault("core publish_wire, per batch", []).append(core)
                    return sdk

                plan.append(("sdk batched, per batch", pair))
            if r % 2:
                block.reverse()
            # Each round starts one row later, so that no row always follows the same one (the
            # server's state after a row, e.g. its duplicate window, weighs on the next).
            rows: List[List[Row]] = [[p] for p in plan] + [block]
            k = r % len(rows)
            for name, fn in [row for group in rows[k:] + rows[:k] for row in group]:
                rate = await fn()
                runs.setdefault(name, []).append(rate)
                print(f"round {r + 1}: {name:<26} {rate:>10,.0f} msg/s", file=sys.stderr)
        await nc.close()
        await bus.close()

    if not a.skip_consume:
        nats_url = f"{a.url}?stream_prefix={a.stream_prefix}&max_age_days=1"
        with_core = hasattr(ampybus._native.NativeBus, "_bench_consume")  # builds before issue 15 lack it
        for r in range(a.rounds):
            for dedupe in (False, True):
                tag = "dedupe" if dedupe else "no dedupe"
                for who in ("sdk", "core") if with_core else ("sdk",):
                    core = who == "core"
                    rate = await consume(nats_url, a.consume_messages, a.workers, dedupe, core)
                    runs.setdefault(f"consume nats, {tag}, {who}", []).append(rate)
                    print(f"round {r + 1}: consume nats, {tag}, {who:<4} {rate:>10,.0f} msg/s", file=sys.stderr)
                    with tempfile.TemporaryDirectory() as d:
                        rate = await consume(f"file://{d}/bus?sync=normal", a.consume_messages, a.workers, dedupe, core)
                    runs.setdefault(f"consume embedded, {tag}, {who}", []).append(rate)
                    print(f"round {r + 1}: consume embedded, {tag}, {who:<4} {rate:>10,.0f} msg/s", file=sys.stderr)

    results = {k: summary(v) for k, v in runs.items()}

    def ratio(name: str, top: str, bottom: str) -> None:
        if top in runs and bottom in runs:
            results[name] = summary([x / y for x, y in zip(runs[top], runs[bottom])])

    ratio("ratio sdk awaited / nats-py awaited", "sdk awaited", "nats-py awaited")
    ratio("ratio sdk batched / core publish_wire", "sdk batched", "core publish_wire")
    ratio("ratio sdk batched, lists before / core publish_wire", "sdk batched, lists before", "core publish_wire")
    ratio("ratio sdk batched / core publish_wire, per batch", "sdk batched, per batch", "core publish_wire, per batch")
    ratio("ratio sdk batched / core publish_batch", "sdk batched", "core publish_batch")
    ratio("ratio sdk batched / nats-py pipelined", "sdk batched", "nats-py pipelined")
    ratio("ratio sdk pipelined / nats-py pipelined", "sdk pipelined", "nats-py pipelined")
    for broker in ("nats", "embedded"):
        for tag in ("no dedupe", "dedupe"):
            ratio(
                f"ratio consume {broker}, {tag}: sdk / core",
                f"consume {broker}, {tag}, sdk",
                f"consume {broker}, {tag}, core",
            )
    load_end = os.getloadavg()[0]
    print(f"1-minute load average at the end: {load_end:.2f}", file=sys.stderr)
    if a.json:
        print(json.dumps({"args": vars(a), "load": [load_start, load_end], "results": results, "rounds": runs}, indent=2))
    else:
        print(f"{'':<48} {'best':>10} {'median':>10} {'worst':>10}")
        for k, s in results.items():
            fmt = "{:>10.2f}" if k.startswith("ratio") else "{:>10,.0f}"
            print(f"{k:<48} " + " ".join(fmt.format(s[x]) for x in ("best", "median", "worst")))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
