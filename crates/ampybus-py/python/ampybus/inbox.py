"""Exactly-once effects: the transactional inbox and outbox on PostgreSQL (``asyncpg``) and
SQLite (the standard ``sqlite3`` module).

The same tables, rows and statements as the Rust inbox (``ampybus::inbox``): the Rust core
creates and migrates the tables (PostgreSQL: ``ampybus.inbox`` and ``ampybus.outbox`` under
``ampybus.schema_version``; SQLite: ``ampybus_inbox``, ``ampybus_outbox`` and
``ampybus_schema_version`` in the application's file), and the SQL text, a message's inbox row
and a staged row's values (final ``message_id``, headers checked and encoded) come from it
too. So a Python consumer and a Rust one deduplicate against the same inbox, and what Python
stages is published by the Rust relay (``ampybus outbox relay --db … --url …``).

An inbox consumer is declared like any other, with ``inbox=``::

    inbox = await PgInbox.connect("postgres://postgres@127.0.0.1/oms")

    async def on_order(msg: ampybus.Message, conn: asyncpg.Connection) -> None:
        await conn.execute("INSERT INTO orders (id) VALUES ($1)", msg.headers.partition_key)
        await outbox.stage(conn, "ampy.prod.fills.v1.sim", b"...", partition_key="acct|co_1")

    await bus.run("ampy.prod.orders.>", on_order, consumer="oms", inbox=inbox)

For each message the SDK begins a transaction on a connection of the inbox, inserts the
message's inbox row (``consumer``, ``message_id``, ``domain``, ``dedupe_key``, ``topic``,
``applied_at``; unique on ``(consumer, message_id)`` and on ``(consumer, domain, dedupe_key)``),
calls the handler with the message and that connection, commits when the handler returns, and
only then acks. A message whose row exists (either key) was applied before: it is acked without
calling the handler and counted (:meth:`PgInbox.skipped`, ``bus_inbox_skipped_total``). A
handler that raises (or settles the message with ``retry``/``dead_letter`` itself) has its
transaction rolled back; a raise then takes the runtime's retry path (backoff, then the DLQ
``max_retries``), as for any handler. While the database does not answer (connecting,
beginning, inserting, committing; or the connection is lost under the handler) the message is
held, not acked, and tried again until it does; a commit whose answer was lost is found by the
next try's insert, so nothing is applied twice. The handler must not commit, roll back or
settle the message with ``ack`` itself. The consumer runs without the transport's dedupe store
(the inbox replaces it). Inbox rows expire after ``retention`` seconds (7 days by default).

On PostgreSQL each message has a transaction of its own (the Rust inbox groups concurrent
messages in one transaction with a savepoint each; the rows are the same).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sqlite3
import threading
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Awaitable,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Tuple,
)

from . import _native
from ._bus import Payload, _encode, _message_headers
from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import asyncpg

__all__ = [
    "DEFAULT_RETENTION",
    "PgInbox",
    "PgOutbox",
    "SqliteInbox",
    "SqliteOutbox",
]

log = logging.getLogger("ampybus.inbox")

#: How long inbox rows count by default, in seconds (7 days; the Rust default).
DEFAULT_RETENTION: float = float(_native.INBOX_DEFAULT_RETENTION_SECS)

#: An inbox handler on PostgreSQL: ``async def handler(msg, conn)`` (a plain function works
#: too), ``conn`` an ``asyncpg.Connection`` inside the message's open transaction.
PgHandler = Callable[[Any, "asyncpg.Connection"], Optional[Awaitable[None]]]
#: An inbox handler on SQLite: ``def handler(msg, conn)`` run in a worker thread, ``conn`` a
#: ``sqlite3.Connection`` inside the message's open ``IMMEDIATE`` transaction.
SqliteHandler = Callable[[Any, sqlite3.Connection], None]

#: How often expired inbox rows are deleted (at most), seconds.
_PURGE_EVERY = 60.0
#: The reason a message without ``message_id`` is dead-lettered with (as in Rust).
_NO_MESSAGE_ID = "contract_violation: no message_id: the inbox keys messages by it"


def _pause(tries: int) -> float:
    """The pause before trying an unavailable database again (as the Rust inbox: 50 ms per
    try, at most 2 s)."""
    return min(0.05 * min(tries, 64), 2.0)


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Unavailable(Exception):
    """The database did not answer: the message is held and tried again."""


class _Inbox:
    """What both inboxes share: the skip counts and the consumer binding."""

    def __init__(self, retention: float) -> None:
        if not retention > 0:
            raise ConfigError(
                f"invalid configuration: inbox: `retention`: {retention!r} must be a positive "
                "number of seconds"
            )
        #: How long inbox rows count, in seconds.
        self.retention = float(retention)
        self._skipped: Dict[str, int] = {}
        self._last_purge = 0.0

    def skipped(self, consumer: str) -> int:
        """How many messages consumer ``consumer`` found applied already (through this handle)."""
        return self._skipped.get(consumer, 0)

    def _purge_due(self) -> bool:
        now = time.monotonic()
        if self._last_purge and now - self._last_purge < _PURGE_EVERY:
            return False
        self._last_purge = now
        return True

    async def _attempt(self, consumer: str, row: Tuple[Any, ...], msg: Any, handler: Any) -> bool:
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    async def apply(self, msg: Any, handler: Any, *, consumer: str) -> bool:
        """Applies ``msg`` once through ``handler`` for consumer ``consumer``.

        Returns ``True`` when the handler ran and its transaction committed (or was rolled
        back because the handler settled the message itself), ``False`` when the message was
        applied before (skipped). Raises what the handler raised (rolled back). Waits while
        the database does not answer. A message without ``message_id`` is dead-lettered
        (``contract_violation``) and ``True`` returned. The caller acks the message when
        this returns and it is unsettled — :meth:`ampybus.Bus.run` with ``inbox=`` does it.
        """
        row = _native.inbox_row(msg)
        if row is None:
            msg.dead_letter(_NO_MESSAGE_ID)
            return True
        tries = 0
        while True:
            try:
                handled = await self._attempt(consumer, row, msg, handler)
            except _Unavailable as e:
                tries += 1
                log.warning(
                    "inbox %s: database unavailable (%s); message %s held (not acked), trying again",
                    self._describe(),
                    e,
                    row[0],
                )
                await asyncio.sleep(_pause(tries))
                continue
            if tries:
                log.info("inbox %s: the database answers again after %d tries", self._describe(), tries)
            if not handled:
                self._skipped[consumer] = self._skipped.get(consumer, 0) + 1
                log.debug("inbox %s: %s applied before; skipped", self._describe(), row[0])
            return handled

    def _bind(self, native_bus: Any, consumer: str, handler: Any) -> Callable[[Any], Awaitable[None]]:
        """The handler :meth:`ampybus.Bus.run` calls for each message of ``consumer``."""
        native_bus.count_inbox_skipped(consumer, 0)

        async def run(msg: Any) -> None:
            if not await self.apply(msg, handler, consumer=consumer):
                native_bus.count_inbox_skipped(consumer, 1)

        return run


def _pg_down(e: BaseException, conn: Optional["asyncpg.Connection"]) -> bool:
    """True when ``e`` says the server did not answer (not that a statement failed)."""
    import asyncpg

    if isinstance(e, (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError)):
        return True
    if isinstance(
        e,
        (
            asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.AdminShutdownError,
            asyncpg.exceptions.CrashShutdownError,
            asyncpg.exceptions.ConnectionDoesNotExistError,
        ),
    ):
        return True
    return isinstance(e, asyncpg.InterfaceError) and (conn is None or conn.is_closed())


class PgInbox(_Inbox):
    """A transactional inbox (and outbox) in a PostgreSQL database, on ``asyncpg``.

    Made by :meth:`connect`. Handlers get an ``asyncpg.Connection`` of :attr:`pool` inside the
    message's open transaction (see the module documentation).
    """

    def __init__(self, pool: "asyncpg.Pool", shown: str, retention: float, own_pool: bool) -> None:
        super().__init__(retention)
        #: The connections handlers get.
        self.pool = pool
        self._shown = shown
        self._own_pool = own_pool
        #: ``(version found, version now)`` of schema ``ampybus`` when connecting.
        self.schema_versions: Tuple[int, int] = (0, 0)

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        pool: Optional["asyncpg.Pool"] = None,
        retention: float = DEFAULT_RETENTION,
        min_size: int = 1,
        max_size: int = 10,
    ) -> "PgInbox":
        """Creates or migrates schema ``ampybus`` in the database at ``dsn`` (the Rust core
        does it, with the Rust inbox's tables and version) and returns the inbox.

        Handlers get connections of ``pool`` when given (an ``asyncpg.Pool`` on the same
        database; :meth:`close` leaves it open), else of a pool made here from ``dsn``
        (``min_size``/``max_size`` connections). Raises :class:`ampybus.TransportError`
        naming the URL (without its password) when the server does not answer,
        :class:`ampybus.ConfigError` for a bad URL, a missing database, or tables of a newer
        version (naming both versions).
        """
        import asyncpg

        found, now, shown = await _native.inbox_migrate_pg(dsn)
        own = pool is None
        if pool is None:
            pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
        inbox = cls(pool, shown, retention, own)
        inbox.schema_versions = (int(found), int(now))
        return inbox

    def _describe(self) -> str:
        return self._shown

    def __repr__(self) -> str:
        return f"PgInbox({self._shown!r}, retention={self.retention})"

    async def close(self) -> None:
        """Closes the pool made by :meth:`connect` (a pool given to it stays open)."""
        if self._own_pool:
            await self.pool.close()

    async def __aenter__(self) -> "PgInbox":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _attempt(self, consumer: str, row: Tuple[Any, ...], msg: Any, handler: Any) -> bool:
        try:
            conn = await self.pool.acquire()
        except Exception as e:
            if _pg_down(e, None):
                raise _Unavailable(f"connecting: {e}") from e
            raise
        try:
            return await self._in_transaction(conn, consumer, row, msg, handler)
        finally:
            await self.pool.release(conn)

    async def _in_transaction(
        self, conn: "asyncpg.Connection", consumer: str, row: Tuple[Any, ...], msg: Any, handler: Any
    ) -> bool:
        tx = conn.transaction()
        try:
            await tx.start()
            status = await conn.execute(_native.PG_INBOX_INSERT_SQL, consumer, *row)
        except Exception as e:
            await _rollback_quietly(tx)
            if _pg_down(e, conn):
                raise _Unavailable(f"inserting the inbox row: {e}") from e
            raise
        if status.endswith(" 0"):  # "INSERT 0 0": either unique key holds it
            await _rollback_quietly(tx)
            return False
        try:
            result = handler(msg, conn)
            if inspect.isawaitable(result):
                await result
        except BaseException as e:
            await _rollback_quietly(tx)
            if isinstance(e, Exception) and conn.is_closed():
                # The connection went away under the handler: the outage's doing, not the
                # message's. Held and tried again.
                raise _Unavailable(f"the connection was lost during the transaction: {e}") from e
            raise
        if msg.settled not in (None, "ack"):
            await _rollback_quietly(tx)  # retry/dead_letter settled by the handler
            return True
        if msg.settled == "ack":
            log.warning(
                "inbox %s: the handler acked message %s before the commit; ack only by returning",
                self._shown,
                row[0],
            )
        try:
            await tx.commit()
        except Exception as e:
            await _rollback_quietly(tx)
            if _pg_down(e, conn):
                raise _Unavailable(f"commit: {e}") from e
            raise
        if self._purge_due():
            try:
                await conn.execute(_native.PG_INBOX_PURGE_SQL, self.retention)
            except Exception as e:  # the next purge tries again
                log.warning("inbox %s: purge failed: %s", self._shown, e)
        return True


async def _rollback_quietly(tx: Any) -> None:
    """Rolls back ``tx`` if it is open; a lost connection has rolled it back already."""
    try:
        await tx.rollback()
    except Exception:
        pass


class SqliteInbox(_Inbox):
    """A transactional inbox (and outbox) in the application's SQLite file, on ``sqlite3``.

    Opening it creates or migrates the tables (the Rust core does it; the file is created if
    missing and put in WAL mode). Raises :class:`ampybus.ConfigError` naming the file when it
    cannot be opened or holds tables of a newer version. Handlers are plain functions run in a
    worker thread, with a ``sqlite3.Connection`` (from :meth:`connection`) inside the message's
    ``BEGIN IMMEDIATE`` transaction (see the module documentation).
    """

    def __init__(self, path: str, *, retention: float = DEFAULT_RETENTION) -> None:
        super().__init__(retention)
        #: The database file.
        self.path = str(path)
        found, now = _native.inbox_migrate_sqlite(self.path)
        #: ``(version found, version now)`` of the tables when opened.
        self.schema_versions: Tuple[int, int] = (int(found), int(now))
        self._idle: List[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _describe(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"SqliteInbox({self.path!r}, retention={self.retention})"

    def connection(self) -> sqlite3.Connection:
        """A new connection set up as the inbox's: no implicit transactions
        (``isolation_level=None``: begin your own, ``BEGIN IMMEDIATE`` when staging),
        ``synchronous=FULL``, a 10 s busy timeout, usable from any thread (one at a time)."""
        c = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        c.execute("PRAGMA synchronous=FULL")
        return c

    def close(self) -> None:
        """Closes the idle connections of the inbox."""
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    def _take(self) -> sqlite3.Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self.connection()

    def _give(self, c: sqlite3.Connection) -> None:
        with self._lock:
            if len(self._idle) < 64:
                self._idle.append(c)
                return
        c.close()

    async def _attempt(self, consumer: str, row: Tuple[Any, ...], msg: Any, handler: Any) -> bool:
        return await asyncio.to_thread(self._attempt_sync, consumer, row, msg, handler)

    def _attempt_sync(self, consumer: str, row: Tuple[Any, ...], msg: Any, handler: Any) -> bool:
        try:
            conn = self._take()
        except sqlite3.Error as e:
            raise _Unavailable(f"cannot open: {e}") from e
        try:
            return self._in_transaction(conn, consumer, row, msg, handler)
        finally:
            self._give(conn)

    def _in_transaction(
        self, conn: sqlite3.Connection, consumer: str, row: Tuple[Any, ...], msg: Any, handler: Any
    ) -> bool:
        try:
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute(_native.SQLITE_INBOX_INSERT_SQL, (consumer, *row, _now_ms()))
        except sqlite3.OperationalError as e:  # locked past the busy timeout, I/O, full disk
            _sqlite_rollback(conn)
            raise _Unavailable(f"inserting the inbox row: {e}") from e
        if cur.rowcount == 0:
            _sqlite_rollback(conn)
            return False
        try:
            result = handler(msg, conn)
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError(
                    "SqliteInbox: the handler returned an awaitable; SQLite inbox handlers are plain "
                    "functions `def handler(msg, conn)`, run in a worker thread"
                )
        except BaseException:
            _sqlite_rollback(conn)
            raise
        if not conn.in_transaction:
            log.error(
                "inbox %s: the handler of message %s ended the transaction itself; its effects and "
                "the inbox row were committed (or rolled back) by it",
                self.path,
                row[0],
            )
            return True
        if msg.settled not in (None, "ack"):
            _sqlite_rollback(conn)
            return True
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            _sqlite_rollback(conn)
            raise _Unavailable(f"commit: {e}") from e
        if self._purge_due():
            cutoff = _now_ms() - int(self.retention * 1000)
            try:
                conn.execute(_native.SQLITE_INBOX_PURGE_SQL, (cutoff,))
            except sqlite3.Error as e:
                log.warning("inbox %s: purge failed: %s", self.path, e)
        return True


def _sqlite_rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


class _Outbox:
    """The values of a staged row, made by the Rust core (final ``message_id``, headers
    filled with every publish default, checked as a publish checks them, encoded)."""

    def __init__(self, *, producer: Optional[str] = None, source: Optional[str] = None) -> None:
        #: Default ``producer`` header of staged messages.
        self.producer = producer
        #: Default ``source`` header of staged messages.
        self.source = source

    def _row(
        self,
        topic: str,
        payload: Payload,
        partition_key: str,
        producer: Optional[str],
        source: Optional[str],
        schema_fqdn: Optional[str],
        dedupe_key: Optional[str],
        headers: Optional[Mapping[str, str]],
    ) -> Tuple[str, str, str, bytes, bytes]:
        data, fqdn = _encode(payload, schema_fqdn, "outbox.stage")
        h = _message_headers(
            "outbox.stage",
            headers,
            schema_fqdn=fqdn,
            producer=producer if producer is not None else self.producer,
            source=source if source is not None else self.source,
            partition_key=partition_key,
            dedupe_key=dedupe_key,
        )
        message_id, topic, key, encoded = _native.outbox_row(topic, h)
        return message_id, topic, key, encoded, data


class PgOutbox(_Outbox):
    """Stages messages into ``ampybus.outbox`` inside the application's ``asyncpg``
    transaction; the Rust relay publishes them after the commit."""

    async def stage(
        self,
        conn: "asyncpg.Connection",
        topic: str,
        payload: Payload,
        *,
        partition_key: str,
        producer: Optional[str] = None,
        source: Optional[str] = None,
        schema_fqdn: Optional[str] = None,
        dedupe_key: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> str:
        """Stages one message in ``conn``'s open transaction and returns its final
        ``message_id``.

        Arguments as :meth:`ampybus.Bus.publish` (``producer``/``source`` default to the
        outbox's). The key's next ``seq`` is taken under the per-key advisory transaction
        lock of the Rust stage (same statements), held until the transaction ends, so a key's
        rows are published in staging order. Raises :class:`ampybus.ConfigError` when
        ``conn`` is not in a transaction, :class:`ampybus.HeaderError` /
        :class:`ampybus.TopicError` for what a publish would refuse; database errors are
        ``asyncpg``'s.
        """
        if not conn.is_in_transaction():
            raise ConfigError(
                "invalid configuration: outbox.stage: `conn`: not in a transaction; stage inside "
                "the transaction whose commit publishes the message"
            )
        message_id, topic, key, encoded, data = self._row(
            topic, payload, partition_key, producer, source, schema_fqdn, dedupe_key, headers
        )
        await conn.execute(_native.PG_STAGE_LOCK_SQL, _native.PG_STAGE_LOCK_CLASS, key)
        await conn.execute(_native.PG_OUTBOX_INSERT_SQL, message_id, topic, key, encoded, data)
        return str(message_id)


class SqliteOutbox(_Outbox):
    """Stages messages into ``ampybus_outbox`` inside the application's ``sqlite3``
    transaction; the Rust relay publishes them after the commit."""

    def stage(
        self,
        conn: sqlite3.Connection,
        topic: str,
        payload: Payload,
        *,
        partition_key: str,
        producer: Optional[str] = None,
        source: Optional[str] = None,
        schema_fqdn: Optional[str] = None,
        dedupe_key: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> str:
        """Stages one message in ``conn``'s open transaction (begun ``IMMEDIATE``, as the
        inbox's, so the key's ``seq`` is taken under SQLite's write lock) and returns its
        final ``message_id``.

        Arguments as :meth:`ampybus.Bus.publish`. Raises :class:`ampybus.ConfigError` when
        ``conn`` is not in a transaction, :class:`ampybus.HeaderError` /
        :class:`ampybus.TopicError` for what a publish would refuse; database errors are
        ``sqlite3``'s.
        """
        if not conn.in_transaction:
            raise ConfigError(
                "invalid configuration: outbox.stage: `conn`: not in a transaction; stage inside "
                "the transaction whose commit publishes the message (BEGIN IMMEDIATE)"
            )
        message_id, topic, key, encoded, data = self._row(
            topic, payload, partition_key, producer, source, schema_fqdn, dedupe_key, headers
        )
        conn.execute(
            _native.SQLITE_OUTBOX_INSERT_SQL, (message_id, topic, key, encoded, data, _now_ms())
        )
        return str(message_id)

