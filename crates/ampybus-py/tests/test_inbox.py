"""The transactional inbox and outbox from Python (``ampybus.inbox``), against the real
PostgreSQL on 127.0.0.1:5432 (a fresh database per test, dropped after it; override the server
with ``AMPYBUS_TEST_PG_URL``) and SQLite files, with the Rust relay (``ampybus outbox relay``)
publishing what Python staged.

Duplicates are real redeliveries: the same messages (same ``message_id``) published again on a
second embedded log that the same consumer name reads from the start, as after a failover, and
a new message carrying a ``dedupe_key`` applied before. The last tests declare the inbox
consumer on an ``ampybus.App``.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
from pathlib import Path
from typing import AbstractSet, Any, AsyncIterator, Awaitable, Callable, Dict, List, Optional, Tuple

import pytest
from ampy.bars.v1 import bars_pb2
from ampy.common.v1 import common_pb2

import ampybus
from ampybus.inbox import PgInbox, PgOutbox, SqliteInbox, SqliteOutbox

from conftest import binary, token, until, within


class Db:
    """One backend under test: its inbox, outbox and the application's `effects` table."""

    def __init__(self, kind: str, inbox: Any, relay_db: str) -> None:
        self.kind = kind
        self.inbox = inbox
        self.outbox: Any = (PgOutbox if kind == "postgres" else SqliteOutbox)(
            producer="oms@1", source="oms"
        )
        #: What `ampybus outbox relay --db` takes.
        self.relay_db = relay_db

    async def query(self, sql: str, *args: Any) -> List[Tuple[Any, ...]]:
        """Rows of `sql` (written with `?` placeholders; `$n` on PostgreSQL)."""
        if self.kind == "postgres":
            n = 0

            def num(_: Any) -> str:
                nonlocal n
                n += 1
                return f"${n}"

            pg_sql = re.sub(r"\?", num, sql)
            pg_sql = pg_sql.replace("ampybus_inbox", "ampybus.inbox").replace(
                "ampybus_outbox", "ampybus.outbox"
            )
            async with self.inbox.pool.acquire() as c:
                return [tuple(r) for r in await c.fetch(pg_sql, *args)]
        c = sqlite3.connect(self.inbox.path)
        try:
            return list(c.execute(sql, args).fetchall())
        finally:
            c.close()

    async def effects(self) -> Dict[str, int]:
        """How many times each message_id was applied."""
        rows = await self.query("SELECT mid, count(*) FROM effects GROUP BY mid")
        return {mid: int(n) for mid, n in rows}

    def handler(
        self,
        *,
        fail_first: AbstractSet[str] = frozenset(),
        fills_topic: Optional[str] = None,
        attempts: Optional[Dict[str, int]] = None,
    ) -> Callable[..., Any]:
        """A handler writing one `effects` row per message (and staging one fill per order under
        key `acct<i % 2>|basket` when `fills_topic`), raising on the first attempt of the keys in
        `fail_first` after its writes."""
        tries: Dict[str, int] = attempts if attempts is not None else {}

        def note(msg: Any) -> Tuple[str, str, bool]:
            key = msg.partition_key or ""
            tries[key] = tries.get(key, 0) + 1
            acct = f"acct{int(key[1:]) % 2}|basket"  # fills: `account_id|client_order_id`
            return key, acct, key in fail_first and tries[key] == 1

        if self.kind == "postgres":

            async def on_pg(msg: Any, conn: Any) -> None:
                key, acct, fail = note(msg)
                await conn.execute("INSERT INTO effects (k, mid) VALUES ($1, $2)", key, msg.message_id)
                if fills_topic:
                    await self.outbox.stage(conn, fills_topic, b"fill " + msg.payload, partition_key=acct)
                if fail:
                    raise RuntimeError(f"injected failure after the effects of {key}")

            return on_pg

        def on_sqlite(msg: Any, conn: sqlite3.Connection) -> None:
            key, acct, fail = note(msg)
            conn.execute("INSERT INTO effects (k, mid) VALUES (?, ?)", (key, msg.message_id))
            if fills_topic:
                self.outbox.stage(conn, fills_topic, b"fill " + msg.payload, partition_key=acct)
            if fail:
                raise RuntimeError(f"injected failure after the effects of {key}")

        return on_sqlite


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest) -> Tuple[str, Optional[str]]:
    """PostgreSQL (asyncpg; a fresh database) and SQLite (sqlite3), one run each."""
    kind = str(request.param)
    return kind, (request.getfixturevalue("pg_dsn") if kind == "postgres" else None)


@pytest.fixture
async def db(backend: Tuple[str, Optional[str]], tmp_path: Path) -> AsyncIterator[Db]:
    """The inbox of `backend` with the application's `effects` table; closed after the test."""
    d = await open_db(backend[0], tmp_path, backend[1])
    yield d
    if d.kind == "postgres":
        await d.inbox.close()
    else:
        d.inbox.close()


async def open_db(kind: str, tmp_path: Path, pg: Optional[str]) -> Db:
    """Opens the inbox of `kind` and creates the application's `effects` table."""
    if kind == "postgres":
        assert pg is not None
        inbox = await PgInbox.connect(pg)
        async with inbox.pool.acquire() as c:
            await c.execute("CREATE TABLE effects (k text NOT NULL, mid text NOT NULL)")
        return Db(kind, inbox, pg)
    path = tmp_path / "app.sqlite3"
    inbox = SqliteInbox(str(path))
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE effects (k TEXT NOT NULL, mid TEXT NOT NULL)")
    c.commit()
    c.close()
    return Db(kind, inbox, f"sqlite://{path}")


async def run_until(
    bus: ampybus.Bus,
    db: Db,
    handler: Callable[..., Any],
    consumer: str,
    done: Callable[[], Awaitable[bool]],
) -> ampybus.ConsumerStats:
    """Runs the inbox consumer until `done()` holds and nothing is pending or in flight, then
    stops it and returns its final counts."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(
        bus.run(
            "ampy.dev.orders.>",
            handler,
            consumer=consumer,
            inbox=db.inbox,
            stop=stop,
            workers=4,
            min_delay=0.01,
            max_delay=0.05,
        )
    )

    async def settled() -> bool:
        if task.done():
            task.result()  # raises what the consumer raised
        lag = await bus.consumer_lag(consumer)
        return bool(lag and lag["pending"] == 0 and lag["in_flight"] == 0 and await done())

    await until(settled)
    stop.set()
    return await within(task)


async def publish_orders(
    bus: ampybus.Bus, topic: str, n: int, *, ids: Optional[List[str]] = None
) -> List[str]:
    """Publishes orders `k0`..`k{n-1}` (dedupe_key `d<i>`); with `ids`, with those message ids."""
    out = []
    for i in range(n):
        extra = {"message_id": ids[i]} if ids else None
        r = await bus.publish(
            topic, f"o{i}".encode(), partition_key=f"k{i}", dedupe_key=f"d{i}", headers=extra
        )
        out.append(r.message_id)
    return out


async def test_inbox_applies_once_and_skips_redeliveries(db: Db, tmp_path: Path, bus_factory: Any) -> None:
    assert db.inbox.schema_versions == ((0, 2) if db.kind == "postgres" else (0, 1))
    consumer = "positions-" + token()
    topic = "ampy.dev.orders.v1.new"
    n = 12

    first = await bus_factory(f"file://{tmp_path / 'bus1'}")
    ids = await publish_orders(first, topic, n)

    async def applied() -> bool:
        return sum((await db.effects()).values()) >= n

    stats = await run_until(first, db, db.handler(), consumer, applied)
    assert stats.handled_ok == n
    assert stats.retried == 0
    assert db.inbox.skipped(consumer) == 0

    # The same messages again (same message_id) on another log, a message with a new id and
    # the dedupe_key of order 0, and one new order: only the new order is applied.
    second = await bus_factory(f"file://{tmp_path / 'bus2'}")
    await publish_orders(second, topic, n, ids=ids)
    await second.publish(topic, b"copy", partition_key="k0", dedupe_key="d0")
    fresh = await second.publish(topic, b"new", partition_key=f"k{n}", dedupe_key=f"d{n}")

    async def skipped_all() -> bool:
        return db.inbox.skipped(consumer) == n + 1 and sum((await db.effects()).values()) == n + 1

    stats = await run_until(second, db, db.handler(), consumer, skipped_all)
    assert stats.handled_ok == n + 2  # skipped ones are acked
    assert stats.skipped_duplicates == 0  # the inbox, not the dedupe store, skipped them
    assert db.inbox.skipped(consumer) == n + 1
    assert await db.effects() == {m: 1 for m in ids + [fresh.message_id]}
    assert f'bus_inbox_skipped_total{{consumer="{consumer}"}} {n + 1}' in second.metrics_text()

    # The rows are the Rust inbox's: one per message, with domain, dedupe_key and topic.
    rows = await db.query(
        "SELECT message_id, domain, dedupe_key, topic FROM ampybus_inbox WHERE consumer = ? ORDER BY dedupe_key",
        consumer,
    )
    want = sorted(
        [(m, "orders", f"d{i}", topic) for i, m in enumerate(ids)]
        + [(fresh.message_id, "orders", f"d{n}", topic)],
        key=lambda r: r[2],
    )
    assert rows == want


async def test_inbox_handler_error_rolls_back_then_retry_applies_once(db: Db, tmp_path: Path, bus_factory: Any) -> None:
    consumer = "oms-" + token()
    n = 6
    bus = await bus_factory(f"file://{tmp_path / 'bus'}")
    ids = await publish_orders(bus, "ampy.dev.orders.v1.new", n)
    attempts: Dict[str, int] = {}
    handler = db.handler(fail_first={"k2"}, fills_topic="ampy.dev.fills.v1.sim", attempts=attempts)

    async def done() -> bool:
        return sum((await db.effects()).values()) >= n

    stats = await run_until(bus, db, handler, consumer, done)
    assert attempts == {f"k{i}": (2 if i == 2 else 1) for i in range(n)}
    assert stats.retried == 1
    assert stats.handled_ok == n
    assert stats.dead_lettered_total == 0
    # The failed attempt's effect, inbox row and staged fill were rolled back.
    assert await db.effects() == {m: 1 for m in ids}
    assert len(await db.query("SELECT message_id FROM ampybus_inbox")) == n
    assert len(await db.query("SELECT message_id FROM ampybus_outbox")) == n


def relay(db: Db, url: str) -> str:
    """Runs `ampybus outbox relay --drain` (the Rust relay) and returns its stderr."""
    out = subprocess.run(
        [binary("AMPYBUS_CLI", "ampybus"), "--url", url, "outbox", "relay", "--db", db.relay_db, "--drain"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stderr


async def test_inbox_outbox_staged_in_python_published_by_the_rust_relay(db: Db, tmp_path: Path, bus_factory: Any) -> None:
    consumer = "oms-" + token()
    n = 10
    bus = await bus_factory(f"file://{tmp_path / 'orders'}")
    await publish_orders(bus, "ampy.dev.orders.v1.new", n)

    async def done() -> bool:
        return sum((await db.effects()).values()) >= n

    await run_until(bus, db, db.handler(fills_topic="ampy.dev.fills.v1.sim"), consumer, done)

    # A message staged by the application outside any consumer, in its own transaction.
    if db.kind == "postgres":
        async with db.inbox.pool.acquire() as c:
            async with c.transaction():
                extra = await db.outbox.stage(c, "ampy.dev.fills.v1.sim", b"manual", partition_key="acct0|basket")
    else:
        c = db.inbox.connection()
        c.execute("BEGIN IMMEDIATE")
        extra = db.outbox.stage(c, "ampy.dev.fills.v1.sim", b"manual", partition_key="acct0|basket")
        c.execute("COMMIT")
        c.close()

    staged = {
        key: [m for (m,) in await db.query(
            "SELECT message_id FROM ampybus_outbox WHERE partition_key = ? ORDER BY seq", key
        )]
        for key in ("acct0|basket", "acct1|basket")
    }
    seqs = await db.query("SELECT partition_key, seq FROM ampybus_outbox ORDER BY partition_key, seq")
    assert seqs == [("acct0|basket", s) for s in range(1, 7)] + [("acct1|basket", s) for s in range(1, 6)]
    assert staged["acct0|basket"][-1] == extra

    fills_url = f"file://{tmp_path / 'fills'}"
    assert "published 11, dead-lettered 0" in relay(db, fills_url)
    assert "published 0, dead-lettered 0" in relay(db, fills_url)  # marked sent: once

    fills = await bus_factory(fills_url)
    got = await fills.read("ampy.dev.fills.>")
    assert len(got) == n + 1
    by_key: Dict[str, List[str]] = {}
    for m in got:
        assert m.headers.producer == "oms@1" and m.headers.source == "oms"
        by_key.setdefault(m.headers.partition_key, []).append(m.headers.message_id)
    assert by_key == staged  # each once, in staging order per key
    assert sorted(m.payload for m in got) == sorted([b"manual"] + [f"fill o{i}".encode() for i in range(n)])


async def test_inbox_postgres_unreachable_is_a_clear_error() -> None:
    with pytest.raises(ampybus.TransportError) as e:
        await within(PgInbox.connect("postgres://postgres:secret@127.0.0.1:1/oms"))
    assert "127.0.0.1:1" in str(e.value)
    assert "secret" not in str(e.value)
    assert isinstance(e.value, ampybus.AmpybusError)


async def test_inbox_sqlite_unopenable_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "app.sqlite3"
    with pytest.raises(ampybus.ConfigError) as e:
        SqliteInbox(str(path))
    assert str(path) in str(e.value)


async def test_inbox_sqlite_newer_schema_names_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "app.sqlite3"
    SqliteInbox(str(path))
    c = sqlite3.connect(path)
    c.execute("INSERT INTO ampybus_schema_version VALUES (9, 0, 'future')")
    c.commit()
    c.close()
    with pytest.raises(ampybus.ConfigError) as e:
        SqliteInbox(str(path))
    assert "version 9" in str(e.value) and "version 1" in str(e.value)


async def test_inbox_outbox_stage_refuses_bad_input(tmp_path: Path) -> None:
    inbox = SqliteInbox(str(tmp_path / "app.sqlite3"))
    outbox = SqliteOutbox(producer="oms@1", source="oms")
    c = inbox.connection()
    with pytest.raises(ampybus.ConfigError, match="`conn`: not in a transaction"):
        outbox.stage(c, "ampy.dev.fills.v1.sim", b"x", partition_key="a")
    c.execute("BEGIN IMMEDIATE")
    with pytest.raises(ampybus.HeaderError) as e:
        outbox.stage(c, "ampy.dev.fills.v1.sim", b"x", partition_key="a", producer="")
    assert e.value.field == "producer"
    with pytest.raises(ampybus.TopicError):
        outbox.stage(c, "not a topic", b"x", partition_key="a")
    c.execute("ROLLBACK")
    assert c.execute("SELECT count(*) FROM ampybus_outbox").fetchone() == (0,)
    c.close()
    with pytest.raises(ampybus.ConfigError, match="`retention`"):
        SqliteInbox(str(tmp_path / "app.sqlite3"), retention=0)


def _bar(close: int) -> "bars_pb2.BarBatch":
    b = bars_pb2.BarBatch()
    bar = b.bars.add()
    bar.security.CopyFrom(common_pb2.SecurityId(symbol="MSFT", mic="XNAS"))
    bar.close.CopyFrom(common_pb2.Decimal(scaled=close, scale=2))
    return b


async def _serve_until(app: ampybus.App, name: str, done: Callable[[], bool]) -> str:
    """Serves `app` until `done()` holds and consumer `name` has nothing pending or in flight;
    returns the bus's metrics text read just before the stop."""
    stop = asyncio.Event()
    serving = asyncio.ensure_future(app.serve(stop))
    text = ""
    try:

        async def settled() -> bool:
            if serving.done():
                serving.result()  # raises what the app raised
            bus = app.bus
            if bus is None or not done():
                return False
            lag = await bus.consumer_lag(name)
            return bool(lag and lag["pending"] == 0 and lag["in_flight"] == 0)

        await until(settled)
        assert app.bus is not None
        text = app.bus.metrics_text()
    finally:
        stop.set()
        assert await within(serving) == "requested"
    return text


async def test_app_inbox_consumer_decodes_applies_once_rolls_back_and_dead_letters(
    db: Db, tmp_path: Path
) -> None:
    """`@app.consumer(..., inbox=...)`: the handler gets the decoded message, the connection
    and the `ampybus.Message`; a raise rolls back and retries, `DeadLetter` rolls back and
    dead-letters, middleware wraps the step (its refusal and an undecodable message open no
    transaction), and the same messages delivered again are skipped and counted."""
    t = token()
    name = f"positions-{t}"
    topic = f"ampy.dev.bars.v1.{t}.XNAS.MSFT"
    closes = [100, 200, 300, 400, 500, 600]  # 300: fails once after writing; 400: refused
    first_url = f"file://{tmp_path / 'bus1'}"
    ids: Dict[int, str] = {}
    async with ampybus.connect(first_url, producer="p@1", source="p") as bus:
        for close in closes:
            ids[close] = (await bus.publish(topic, _bar(close), partition_key="XNAS.MSFT")).message_id
        await bus.publish(topic, b"raw", partition_key="XNAS.MSFT")  # not a BarBatch: DLQ
        refused = await bus.publish(topic, _bar(700), partition_key="XNAS.NOPE")

    calls: List[int] = []
    seen: List[str] = []

    def decide(close: int) -> None:
        calls.append(close)
        if close == 300 and calls.count(300) == 1:
            raise RuntimeError("injected failure after the effect")
        if close == 400:
            raise ampybus.DeadLetter("handler_error: refused after the effect")

    def make_app(url: str) -> ampybus.App:
        app = ampybus.App(url)

        @app.middleware
        async def gate(msg: ampybus.Message, call_next: Any) -> None:
            seen.append(msg.message_id)
            if msg.partition_key == "XNAS.NOPE":
                raise ampybus.DeadLetter("handler_error: unauthenticated")
            await call_next(msg)

        options = dict(name=name, inbox=db.inbox, workers=2, max_attempts=3, min_delay=0.01, max_delay=0.05)
        if db.kind == "postgres":

            @app.consumer(f"ampy.dev.bars.v1.{t}.>", **options)
            async def on_bar_pg(batch: bars_pb2.BarBatch, conn: Any, msg: ampybus.Message) -> None:
                close = batch.bars[0].close.scaled
                await conn.execute("INSERT INTO effects (k, mid) VALUES ($1, $2)", str(close), msg.message_id)
                decide(close)

        else:

            @app.consumer(f"ampy.dev.bars.v1.{t}.>", **options)
            def on_bar(batch: bars_pb2.BarBatch, conn: sqlite3.Connection, msg: ampybus.Message) -> None:
                close = batch.bars[0].close.scaled
                conn.execute("INSERT INTO effects (k, mid) VALUES (?, ?)", (str(close), msg.message_id))
                decide(close)

        return app

    app = make_app(first_url)
    await _serve_until(app, name, lambda: len(calls) == 7 and len(seen) == 9)
    stats = app.stats[name]
    assert sorted(calls) == [100, 200, 300, 300, 400, 500, 600]
    assert len(seen) == 8 + 1  # every delivery, the retried one twice
    assert stats.handled_ok == 5
    assert stats.retried == 1
    assert stats.dead_lettered == {"handler_error": 2, "schema_mismatch": 1}
    assert stats.skipped_duplicates == 0
    assert db.inbox.skipped(name) == 0
    applied = [ids[c] for c in (100, 200, 300, 500, 600)]
    # The failed attempt of 300 and the dead-lettered 400 were rolled back; the refused and
    # the undecodable messages never reached the database.
    assert await db.effects() == {m: 1 for m in applied}
    rows = await db.query("SELECT message_id FROM ampybus_inbox WHERE consumer = ?", name)
    assert sorted(m for (m,) in rows) == sorted(applied)
    assert refused.message_id not in {m for (m,) in rows}
    async with ampybus.connect(first_url) as bus:
        reasons = sorted(m.headers.dlq_reason for m in await bus.read("ampy.dev.dlq.>"))
    assert reasons == [
        "handler_error: refused after the effect",
        "handler_error: unauthenticated",
        "schema_mismatch: expected ampy.bars.v1.BarBatch got ampy.raw.v1.Bytes",
    ]

    # The applied messages delivered again (same message_id, on a second log read by the same
    # consumer name, as after a failover): skipped by the inbox, the handler not called.
    second_url = f"file://{tmp_path / 'bus2'}"
    async with ampybus.connect(second_url, producer="p@1", source="p") as bus:
        for close in (100, 200, 300, 500, 600):
            await bus.publish(
                topic, _bar(close), partition_key="XNAS.MSFT", headers={"message_id": ids[close]}
            )
    seen.clear()
    app = make_app(second_url)
    text = await _serve_until(app, name, lambda: db.inbox.skipped(name) == 5)
    stats = app.stats[name]
    assert stats.handled_ok == 5
    assert stats.dead_lettered_total == 0
    assert len(seen) == 5
    assert sorted(calls) == [100, 200, 300, 300, 400, 500, 600]  # not called again
    assert db.inbox.skipped(name) == 5
    assert f'bus_inbox_skipped_total{{consumer="{name}"}} 5' in text
    assert await db.effects() == {m: 1 for m in applied}


async def test_app_inbox_consumer_refuses_a_bad_declaration(tmp_path: Path) -> None:
    inbox = SqliteInbox(str(tmp_path / "app.sqlite3"))
    app = ampybus.App(f"file://{tmp_path / 'bus'}")
    with pytest.raises(TypeError, match=r"takes the message and the connection: `one\(message, conn\)`"):

        @app.consumer("ampy.dev.fills.>", name="a", inbox=inbox)
        def one(msg: ampybus.Message) -> None: ...

    with pytest.raises(ValueError, match="`dedupe`: an inbox consumer deduplicates through its inbox"):
        app.consumer("ampy.dev.fills.>", name="b", inbox=inbox, dedupe=True)
    with pytest.raises(TypeError, match="`inbox`: expected an ampybus.inbox.SqliteInbox or PgInbox, got str"):
        app.consumer("ampy.dev.fills.>", name="c", inbox="app.sqlite3")
    inbox.close()
