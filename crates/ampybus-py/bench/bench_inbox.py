"""Consume throughput of ``Bus.run`` through the Python inbox (``ampybus.inbox``) against the
same consumer with the default dedupe store, in one run.

    python bench/bench_inbox.py --messages 2000 --pg postgres://postgres@127.0.0.1:5432

The messages (64 partition keys) are published to a fresh embedded log first; each variant is a
fresh consumer name reading all of them with ``workers`` handlers; its time runs from the start
to the moment the last message was handled. The handler does nothing but the inbox row (no
effect). Variants: ``dedupe store`` (plain ``Bus.run``), ``sqlite inbox`` (a fresh file),
``postgres inbox`` (a fresh database, dropped after; needs ``--pg``, the server without a
database name). Prints msg/s per variant.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
import uuid
from typing import Any, Optional

import ampybus
from ampybus.inbox import PgInbox, SqliteInbox


async def consume(bus: ampybus.Bus, n: int, workers: int, inbox: Optional[Any]) -> float:
    """Seconds for a fresh consumer to handle the `n` messages."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    lock = threading.Lock()  # SQLite handlers run in worker threads
    seen = 0

    def count() -> None:
        nonlocal seen
        with lock:
            seen += 1
            last = seen == n
        if last:
            loop.call_soon_threadsafe(done.set)

    if inbox is None:

        async def handler(msg: Any) -> None:
            count()

    else:

        def handler(msg: Any, conn: Any) -> None:  # PgInbox awaits it only when awaitable
            count()

    stop = asyncio.Event()
    start = time.perf_counter()
    run = asyncio.ensure_future(
        bus.run("ampy.dev.orders.>", handler, consumer="bench-" + uuid.uuid4().hex[:8],
                workers=workers, inbox=inbox, stop=stop)
    )
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - start
    stop.set()
    await run
    return elapsed


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--pg", default=None, help="postgres://user@host:port (no database)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        async with await ampybus.connect(os.path.join(d, "bus"), producer="bench@1", source="bench") as bus:
            topic = "ampy.dev.orders.v1.bench"
            for i in range(0, a.messages, 500):
                await bus.publish_batch(
                    [(topic, b"x" * 64, f"k{j % 64}") for j in range(i, min(a.messages, i + 500))]
                )
            t = await consume(bus, a.messages, a.workers, None)
            print(f"dedupe store:    {a.messages / t:10.0f} msg/s")
            inbox = SqliteInbox(os.path.join(d, "app.sqlite3"))
            t = await consume(bus, a.messages, a.workers, inbox)
            print(f"sqlite inbox:    {a.messages / t:10.0f} msg/s")
            inbox.close()
            if a.pg:
                import asyncpg

                name = "ampybus_bench_" + uuid.uuid4().hex[:8]
                admin = await asyncpg.connect(a.pg + "/postgres")
                await admin.execute(f'CREATE DATABASE "{name}"')
                try:
                    pg = await PgInbox.connect(f"{a.pg}/{name}", max_size=a.workers)
                    t = await consume(bus, a.messages, a.workers, pg)
                    print(f"postgres inbox:  {a.messages / t:10.0f} msg/s")
                    await pg.close()
                finally:
                    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
                    await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
