"""The asyncio API: :func:`connect`, :class:`Bus`, :class:`Subscription`, :class:`Dlq`.

Everything here is a thin layer over the native module (``ampybus._native``), which runs the
Rust core on a tokio runtime: publishing, the consumer runtime, replay and the DLQ tools are
the same code the ``ampybus`` CLI and Rust services run.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc as _abc
import inspect
import logging
import os
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import (
    Any,
    Awaitable,
    Callable,
    Deque,
    Dict,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)
from urllib.parse import quote

from . import _native
from .errors import ClosedError, HeaderError

__all__ = [
    "Bus",
    "ConsumerStats",
    "Dlq",
    "MetricsServer",
    "Outgoing",
    "Redriven",
    "ReplayStatus",
    "Subscription",
    "connect",
]

log = logging.getLogger("ampybus")

#: The ``schema_fqdn`` given to a ``bytes`` payload when none is named.
RAW_BYTES_SCHEMA: str = _native.RAW_BYTES_SCHEMA

#: What ``publish`` takes as a payload: bytes, or a ``google.protobuf`` message.
Payload = Any
#: A time argument: a timezone-aware ``datetime`` or an RFC3339 string.
TimeLike = Union[datetime, str]
#: A handler for :meth:`Bus.run`: sync or async, taking a :class:`ampybus.Message` (and, with
#: an inbox, the database connection: see :mod:`ampybus.inbox`).
Handler = Callable[..., Union[None, Awaitable[None]]]


#: One native completer per event loop (see :func:`_completer`).
_completers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]" = weakref.WeakKeyDictionary()
#: The last ``(weakref to loop, completer)`` pair handed out: the common case is one loop.
_last_completer: Tuple[Callable[[], Any], Any] = (lambda: None, None)


def _completer(loop: asyncio.AbstractEventLoop) -> Any:
    """The native completer of ``loop``: resolves futures the Rust side completes, in batches.

    The Rust side queues ``(future, result)`` pairs and writes one byte to a socket pair the
    loop watches (``add_reader``) when the queue was empty; the loop then resolves everything
    queued in one native call. Loops that cannot watch a socket are woken with
    ``call_soon_threadsafe`` instead.
    """
    global _last_completer
    last_loop, last = _last_completer
    if last_loop() is loop:
        return last
    c = _completers.get(loop)
    if c is None:
        c = _native.Completer()
        fd = c.fileno()
        try:
            if fd < 0:
                raise NotImplementedError
            loop.add_reader(fd, c.drain)
        except NotImplementedError:
            c.use_threadsafe(loop.call_soon_threadsafe)
        _completers[loop] = c
    _last_completer = (weakref.ref(loop), c)
    return c


def _time(name: str, value: Optional[TimeLike]) -> Optional[str]:
    """An RFC3339 string for the Rust side; naive datetimes are refused by name."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"{name}: naive datetime {value!r}; give a timezone-aware one "
                "(e.g. datetime.now(timezone.utc))"
            )
        return value.astimezone(timezone.utc).isoformat()
    if isinstance(value, str):
        return value
    raise TypeError(f"{name}: expected a datetime or an RFC3339 string, got {type(value).__name__}")


def _encode(payload: Payload, schema_fqdn: Optional[str], where: str) -> Tuple[bytes, str]:
    """Payload bytes and the ``schema_fqdn`` they are tagged with."""
    if isinstance(payload, bytes):
        return payload, schema_fqdn or RAW_BYTES_SCHEMA
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload), schema_fqdn or RAW_BYTES_SCHEMA
    descriptor = getattr(type(payload), "DESCRIPTOR", None)
    serialize = getattr(payload, "SerializeToString", None)
    name = getattr(descriptor, "full_name", None)
    if serialize is None or not isinstance(name, str):
        raise TypeError(
            f"{where}: `payload` must be bytes or a google.protobuf message, "
            f"got {type(payload).__name__}"
        )
    if schema_fqdn is not None and schema_fqdn != name:
        raise HeaderError(
            f"invalid header: `schema_fqdn`: {schema_fqdn!r} is not the payload's type {name!r}"
        )
    return serialize(deterministic=True), name


def _merge(
    where: str,
    extra: Optional[Mapping[str, str]],
    named: Sequence[Tuple[str, Optional[str]]],
) -> Dict[str, str]:
    """Extra headers with the keyword ones laid over them; a clash names the header."""
    out: Dict[str, str] = {}
    if extra:
        for k, v in extra.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(
                    f"{where}: `headers` must map str to str, got {k!r}: {type(v).__name__}"
                )
            out[k] = v
    for k, v in named:
        if v is None:
            continue
        if not isinstance(v, str):
            raise TypeError(f"{where}: `{k}` must be a str, got {type(v).__name__}")
        if k in out and out[k] != v:
            raise HeaderError(
                f"invalid header: `{k}`: given as a keyword ({v!r}) and in `headers` "
                f"({out[k]!r}); give it once"
            )
        out[k] = v
    return out


def _message_headers(
    where: str,
    headers: Optional[Mapping[str, str]],
    *,
    schema_fqdn: str,
    producer: Optional[str],
    source: Optional[str],
    partition_key: Optional[str],
    dedupe_key: Optional[str],
) -> Dict[str, str]:
    """The headers of one message to publish (or stage): ``headers`` with the keyword ones
    laid over them (see :func:`_merge`)."""
    return _merge(
        where,
        headers,
        (
            ("schema_fqdn", schema_fqdn),
            ("producer", producer),
            ("source", source),
            ("partition_key", partition_key),
            ("dedupe_key", dedupe_key),
        ),
    )


class Outgoing(NamedTuple):
    """One message of :meth:`Bus.publish_batch` (a plain tuple in this order works too)."""

    topic: str
    payload: Payload
    partition_key: str
    dedupe_key: Optional[str] = None
    schema_fqdn: Optional[str] = None
    headers: Optional[Mapping[str, str]] = None


@dataclass(frozen=True)
class ConsumerStats:
    """Counts of a consumer, as the Rust runtime keeps them."""

    #: Handled and acked (recorded for dedupe).
    handled_ok: int
    #: Attempts that ended in a retry being scheduled.
    retried: int
    #: Dead-lettered, by reason code (``max_retries``, ``handler_error``, …).
    dead_lettered: Dict[str, int]
    #: Skipped because this consumer name had applied them already.
    skipped_duplicates: int
    #: Handed back to the transport unsettled (close), so delivered again.
    released: int
    #: Fetched and not yet settled.
    in_flight: int

    @property
    def dead_lettered_total(self) -> int:
        """Dead-lettered over all codes."""
        return sum(self.dead_lettered.values())

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "ConsumerStats":
        return cls(
            handled_ok=d["handled_ok"],
            retried=d["retried"],
            dead_lettered=dict(d["dead_lettered"]),
            skipped_duplicates=d["skipped_duplicates"],
            released=d["released"],
            in_flight=d["in_flight"],
        )


@dataclass(frozen=True)
class ReplayStatus:
    """The final report of a replay (``ampy.control.v1.ReplayStatus``)."""

    request_id: str
    consumer: str
    #: ``completed``, ``rejected`` or ``failed``.
    state: str
    read: int
    applied: int
    skipped_duplicates: int
    failed: int
    first_message_id: str
    last_message_id: str
    error: str


class Redriven(NamedTuple):
    """One DLQ message sent back to its original topic by :meth:`Dlq.redrive`."""

    dlq_message_id: str
    topic: str
    message_id: str


class MetricsServer:
    """A running ``/metrics`` ``/health`` ``/stats`` endpoint (see :meth:`Bus.serve_metrics`)."""

    def __init__(self, native: Any) -> None:
        self._native = native

    @property
    def address(self) -> str:
        """``host:port`` it listens on."""
        return str(self._native.address)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.address}"

    async def close(self) -> None:
        """Stops serving."""
        await self._native.close()

    async def __aenter__(self) -> "MetricsServer":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Subscription:
    """A durable consumer, iterated with ``async for``.

    Made by :meth:`Bus.subscribe`; it starts on first use (``async for``, ``async with`` or
    :meth:`start`). Each message must be settled once with ``await msg.ack()``,
    ``await msg.retry(delay)`` or ``await msg.dead_letter(reason)``. At most ``workers``
    messages are handed out unsettled at a time (backpressure), and the next message of a
    partition key comes only after the previous one of that key was settled.

    Closing (``close()``, leaving ``async with``, or garbage collection) releases every
    unsettled message: it is delivered again to the next subscriber with the same consumer
    name. Nothing is acked that was not settled with ``ack``.
    """

    def __init__(self, bus: "Bus", pattern: str, consumer: str, options: Dict[str, Any]) -> None:
        self._bus = bus
        self.pattern = pattern
        self.consumer = consumer
        self._options = options
        self._batch = max(1, int(options.get("workers", 8)))
        self._native: Any = None
        self._buf: Deque[Any] = collections.deque()
        self._closing = False
        self._final: Optional[ConsumerStats] = None
        self._starting: Optional["asyncio.Future[Any]"] = None

    async def start(self) -> "Subscription":
        """Subscribes (idempotent); raises what the Rust consumer raises on start."""
        if self._closing:
            raise ClosedError(f"closed: subscription {self.consumer!r} was closed")
        if self._native is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(
                    self._bus._native.subscribe(self.pattern, self.consumer, **self._options)
                )
            self._native = await asyncio.shield(self._starting)
        return self

    def __aiter__(self) -> "Subscription":
        return self

    async def __anext__(self) -> Any:
        if self._closing:
            raise StopAsyncIteration
        buf = self._buf
        if buf:
            return buf.popleft()
        native = self._native
        if native is None:
            await self.start()
            native = self._native
        # Everything ready is taken in one native call; when nothing is, park on a future
        # the Rust side resolves when messages arrive (or at close).
        items = native.take(self._batch)
        while not items:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            state = native.arm(fut, _completer(loop))
            if state < 0:
                raise StopAsyncIteration
            if state > 0:
                await fut
            if self._closing:
                raise StopAsyncIteration
            if buf:  # another task took a batch meanwhile
                return buf.popleft()
            items = native.take(self._batch)
        buf.extend(items)
        return buf.popleft()

    async def __aenter__(self) -> "Subscription":
        return await self.start()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # After an exception (a cancelled task included) nobody settles what is held.
        await self.close(timeout=0.0 if exc_type is not None else 5.0)

    async def close(self, timeout: float = 5.0) -> Optional[ConsumerStats]:
        """Stops the consumer and returns its final counts.

        Messages handed out may still be settled for ``timeout`` seconds; then everything
        unsettled is released (delivered again later). A second call returns the same counts.
        """
        self._closing = True
        self._buf.clear()
        if self._native is None and self._starting is not None:
            try:
                self._native = await self._starting
            except Exception:  # the start failed: nothing to close
                return None
        if self._native is None:
            return self._final
        stats = await self._native.close(timeout)
        if stats is not None:
            self._final = ConsumerStats._from(stats)
        return self._final

    def stats(self) -> ConsumerStats:
        """Current counts (final counts once closed)."""
        if self._native is None:
            return self._final or ConsumerStats(0, 0, {}, 0, 0, 0)
        return ConsumerStats._from(self._native.stats())

    @property
    def held(self) -> int:
        """Messages handed out and not settled yet."""
        return 0 if self._native is None else int(self._native.held)


class Dlq:
    """Dead-letter queue tools of a bus: ``bus.dlq.inspect(...)``, ``bus.dlq.redrive(...)``."""

    #: Every env's DLQ topics.
    DEFAULT_PATTERN = "ampy.*.dlq.v1.>"

    def __init__(self, bus: "Bus") -> None:
        self._bus = bus

    async def inspect(
        self,
        pattern: str = DEFAULT_PATTERN,
        *,
        reason: Optional[str] = None,
        since: Optional[TimeLike] = None,
    ) -> List[Any]:
        """Dead-lettered messages (``StoredMessage``) under ``pattern``, in log order.

        ``reason`` keeps one reason code (``max_retries``, ``handler_error``, …); ``since``
        keeps those stored at or after a time.
        """
        return list(
            await self._bus._native.dlq_inspect(pattern, reason, _time("dlq.inspect: `since`", since))
        )

    async def redrive(
        self,
        pattern: str = DEFAULT_PATTERN,
        *,
        reason: Optional[str] = None,
        since: Optional[TimeLike] = None,
        rate: float = 100.0,
        dry_run: bool = False,
        skip_invalid: bool = False,
    ) -> List[Redriven]:
        """Publishes the selected DLQ messages back to their ``original_topic``.

        Each gets a new ``message_id``, ``redrive_of`` = the original id and ``retry_count``
        + 1, at most ``rate`` per second. The DLQ entries are kept (as with ``ampybus dlq
        redrive``). ``dry_run`` publishes nothing and returns what would be sent.

        Every selected entry is checked before any is sent: one that cannot be redriven (no
        ``original_topic``, …) fails the call and nothing is sent, unless ``skip_invalid``.
        Each sent entry is recorded in the transport's dedupe store, so calling again sends
        only what was not sent yet (an empty list when everything was).
        """
        rows = await self._bus._native.dlq_redrive(
            pattern, reason, _time("dlq.redrive: `since`", since), rate, dry_run, skip_invalid
        )
        return [Redriven(*r) for r in rows]


class Bus:
    """A connection to the bus; made by :func:`connect`. Use as ``async with``."""

    def __init__(self, native: Any, producer: Optional[str], source: Optional[str]) -> None:
        self._native = native
        #: Default ``producer`` header of publishes.
        self.producer = producer
        #: Default ``source`` header of publishes.
        self.source = source
        #: DLQ tools.
        self.dlq = Dlq(self)

    @property
    def url(self) -> str:
        """The URL, credentials removed."""
        return str(self._native.url)

    @property
    def transport(self) -> str:
        """The transport's name (``embedded``, ``nats``, ``redis``, …)."""
        return str(self._native.transport)

    def __repr__(self) -> str:
        return f"Bus(url={self.url!r}, transport={self.transport!r})"

    async def __aenter__(self) -> "Bus":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _headers(
        self,
        where: str,
        *,
        producer: Optional[str],
        source: Optional[str],
        partition_key: Optional[str],
        schema_fqdn: str,
        dedupe_key: Optional[str],
        headers: Optional[Mapping[str, str]],
    ) -> Dict[str, str]:
        return _message_headers(
            where,
            headers,
            schema_fqdn=schema_fqdn,
            producer=producer if producer is not None else self.producer,
            source=source if source is not None else self.source,
            partition_key=partition_key,
            dedupe_key=dedupe_key,
        )

    async def publish(
        self,
        topic: str,
        payload: Payload,
        *,
        partition_key: str,
        producer: Optional[str] = None,
        source: Optional[str] = None,
        schema_fqdn: Optional[str] = None,
        dedupe_key: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> Any:
        """Publishes one message; returns a ``Receipt`` once it is durable.

        ``payload`` is ``bytes`` (``schema_fqdn`` defaults to ``ampy.raw.v1.Bytes``) or a
        ``google.protobuf`` message (serialised; ``schema_fqdn`` from its descriptor).
        ``producer``/``source`` default to those given to :func:`connect`. The other
        contract headers (``message_id``, ``produced_at``, ``traceparent``, ``run_id``, …) are
        filled in; ``headers`` adds or sets any others. Everything is checked by the Rust
        validator: a bad topic raises :class:`TopicError`, a bad header :class:`HeaderError`
        naming it.
        """
        data, fqdn = _encode(payload, schema_fqdn, "publish")
        h = self._headers(
            "publish",
            producer=producer,
            source=source,
            partition_key=partition_key,
            schema_fqdn=fqdn,
            dedupe_key=dedupe_key,
            headers=headers,
        )
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._native.publish(topic, data, h, fut, _completer(loop))
        return await fut

    async def publish_batch(
        self,
        messages: Iterable[Union[Outgoing, Tuple[Any, ...], Mapping[str, Any]]],
        *,
        producer: Optional[str] = None,
        source: Optional[str] = None,
        schema_fqdn: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> List[Any]:
        """Publishes many messages as one batch (one commit on the embedded log, pipelined
        on a broker); returns their ``Receipt`` s in order.

        Each message is an :class:`Outgoing` (or a tuple in its order, or a dict with its
        field names); ``producer``, ``source``, ``schema_fqdn`` and ``headers`` given here
        apply to every message. Every message is validated before any is sent; the first
        invalid one raises with its index (``message 3: …``).
        """
        common = _merge(
            "publish_batch",
            headers,
            (
                ("producer", producer if producer is not None else self.producer),
                ("source", source if source is not None else self.source),
            ),
        )
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        default_schema = schema_fqdn or RAW_BYTES_SCHEMA
        completer = _completer(loop)
        # Each item reaches Rust in Outgoing's field order; an Outgoing (or plain tuple) with
        # a bytes payload and no own headers goes as it is (Rust reads its fields), anything
        # else is normalised here first. A list of such items goes to Rust as it is (Rust
        # answers False, having sent nothing, when one of them needs normalising).
        if type(messages) is list and self._native.publish_batch(
            messages, common, default_schema, fut, completer, True
        ):
            return await fut
        items: List[Tuple[Any, ...]] = []
        for i, m in enumerate(messages):
            kind = type(m)
            if (kind is Outgoing or kind is tuple) and 3 <= len(m) <= 6 and type(m[1]) is bytes:
                if len(m) < 6 or m[5] is None:
                    items.append(m)
                    continue
            where = f"publish_batch: message {i}"
            if isinstance(m, _abc.Mapping):
                m = Outgoing(**m)
            elif not isinstance(m, Outgoing):
                m = Outgoing(*m)
            data, fqdn = _encode(m.payload, m.schema_fqdn or schema_fqdn, where)
            own = None
            if m.headers:
                named = (("schema_fqdn", fqdn), ("partition_key", m.partition_key), ("dedupe_key", m.dedupe_key))
                own = _merge(where, m.headers, named)
            items.append((m.topic, data, m.partition_key, m.dedupe_key, fqdn, own))
        self._native.publish_batch(items, common, default_schema, fut, completer)
        return await fut

    def subscribe(
        self,
        pattern: str,
        *,
        consumer: str,
        workers: int = 8,
        max_in_flight: Optional[int] = None,
        max_attempts: int = 5,
        min_delay: float = 0.1,
        max_delay: float = 30.0,
        strict: Optional[bool] = None,
        ack_deadline: Optional[float] = None,
        start_at: Optional[Union[str, datetime]] = None,
        dedupe: bool = True,
        serve_replays: bool = True,
        max_payload_bytes: Optional[int] = None,
    ) -> Subscription:
        """A durable consumer named ``consumer`` on ``pattern`` (``*`` one token, ``>`` the rest).

        The Rust runtime does the work: at-least-once delivery, dedupe by ``message_id`` and
        ``dedupe_key`` (in the transport's store: shared by every instance of the consumer name
        on the embedded log's directory, NATS and Redis; on Kafka the default store is a SQLite
        file on one host, ``dedupe=redis://…`` shares it between hosts), per-key order with
        ``workers`` keys in parallel, retries with exponential backoff and full jitter
        (``max_attempts`` in total, ``min_delay``/``max_delay`` seconds), then the DLQ. Strict
        per-key order is the default for ``orders`` and ``fills``. Per-key order holds within
        this subscription; across several instances of one consumer name it holds on the
        embedded log, Kafka (there except around a rebalance), NATS and Redis (there one
        instance fetches at a time, the others are standbys; a URL with
        ``order=per_instance`` lets them share the work without that order). ``start_at``:
        ``"earliest"`` (default), ``"latest"`` or a time, for a new consumer name.
        ``serve_replays`` lets ``bus.replay(...)`` run through this consumer.
        """
        start = _time("subscribe: `start_at`", start_at) if isinstance(start_at, datetime) else start_at
        options: Dict[str, Any] = dict(
            workers=workers,
            max_in_flight=max_in_flight,
            max_attempts=max_attempts,
            min_delay=min_delay,
            max_delay=max_delay,
            strict=strict,
            ack_deadline=ack_deadline,
            start_at=start,
            dedupe=dedupe,
            serve_replays=serve_replays,
            max_payload_bytes=max_payload_bytes,
        )
        return Subscription(self, pattern, consumer, options)

    async def run(
        self,
        pattern: str,
        handler: Handler,
        *,
        consumer: str,
        workers: int = 8,
        stop: Optional[asyncio.Event] = None,
        shutdown_timeout: float = 30.0,
        inbox: Optional[Any] = None,
        **options: Any,
    ) -> ConsumerStats:
        """Runs ``handler`` for every message until ``stop`` is set or the task is cancelled.

        ``handler(msg)`` may be a plain or an ``async`` function; it runs on this event loop,
        up to ``workers`` at once (different partition keys; one key in order, as for
        :meth:`subscribe`).
        Returning acks the message; raising retries it per the policy (then DLQ
        ``max_retries``); the handler may also settle the message itself
        (``msg.retry``/``msg.dead_letter``). When ``stop`` is set, handlers that run finish
        (up to ``shutdown_timeout`` seconds) and the final counts are returned. Other
        ``options`` are those of :meth:`subscribe`.

        With ``inbox`` (an :class:`ampybus.inbox.PgInbox` or
        :class:`ampybus.inbox.SqliteInbox`) the consumer applies each message once:
        ``handler(msg, conn)`` gets a database connection inside the message's open
        transaction, where its inbox row is inserted; returning commits, then acks; raising
        rolls back, then retries; a message applied before is acked without calling it. The
        inbox replaces the dedupe store (``dedupe`` is off). On PostgreSQL the handler is
        ``async`` and ``conn`` an ``asyncpg.Connection``; on SQLite it is a plain function run
        in a worker thread and ``conn`` a ``sqlite3.Connection``. See :mod:`ampybus.inbox`.
        """
        if inbox is not None:
            if options.get("dedupe"):
                raise ValueError(
                    "run: `dedupe`: an inbox consumer deduplicates through its inbox; leave `dedupe` unset"
                )
            options["dedupe"] = False
            handler = inbox._bind(self._native, consumer, handler)
        sub = self.subscribe(pattern, consumer=consumer, workers=workers, **options)
        await sub.start()

        async def worker() -> None:
            while True:
                try:
                    msg = await sub.__anext__()
                except StopAsyncIteration:
                    return
                try:
                    result = handler(msg)
                    if inspect.isawaitable(result):
                        await result
                except Exception as e:
                    log.warning(
                        "handler failed for message %s on %s; retrying per the policy",
                        msg.message_id,
                        msg.topic,
                        exc_info=True,
                    )
                    if msg.settled is None:
                        # The cause is kept: a `max_retries` dead letter names it.
                        text = str(e)
                        cause = f"{type(e).__name__}: {text}" if text else type(e).__name__
                        _settle(lambda: msg.retry(cause=cause))
                    continue
                # A cancelled handler leaves the message unsettled: the close below
                # releases it (no attempt counted).
                if msg.settled is None:
                    _settle(msg.ack)

        watcher: Optional["asyncio.Task[Any]"] = None
        if stop is not None:

            async def watch() -> None:
                await stop.wait()
                await sub.close(timeout=shutdown_timeout)

            watcher = asyncio.ensure_future(watch())
        cancelled = False
        try:
            await asyncio.gather(*(worker() for _ in range(max(1, workers))))
        except BaseException:
            cancelled = True
            raise
        finally:
            if watcher is not None:
                if not watcher.done():
                    watcher.cancel()
                try:
                    await watcher
                except (asyncio.CancelledError, Exception):
                    pass
            final = await sub.close(timeout=0.0 if cancelled else shutdown_timeout)
        return final if final is not None else sub.stats()

    async def replay(
        self,
        pattern: str,
        start: TimeLike,
        end: TimeLike,
        *,
        consumer: str,
        keys: Optional[Sequence[str]] = None,
        reason: str = "",
        timeout: float = 600.0,
    ) -> ReplayStatus:
        """Asks the running consumer ``consumer`` (any process, any language) to replay
        ``[start, end)`` of ``pattern`` (optionally only ``keys``) through its own handler;
        returns its final report.

        Dedupe makes already-applied messages no-ops (``skipped_duplicates``). Raises
        :class:`ampybus.TimeoutError` when no final report comes within ``timeout`` seconds.
        """
        s = await self._native.request_replay(
            consumer,
            pattern,
            _time("replay: `start`", start),
            _time("replay: `end`", end),
            list(keys or ()),
            reason,
            timeout,
        )
        return ReplayStatus(**s)

    async def read(
        self,
        pattern: str,
        *,
        start: Optional[TimeLike] = None,
        end: Optional[TimeLike] = None,
        keys: Optional[Sequence[str]] = None,
        limit: Optional[int] = None,
    ) -> List[Any]:
        """Stored messages (``StoredMessage``) of ``pattern`` in ``[start, end)`` by store
        time, optionally only ``keys``, at most ``limit``, in log order. Reads history; acks
        nothing."""
        return list(
            await self._native.read(
                pattern,
                _time("read: `start`", start),
                _time("read: `end`", end),
                list(keys) if keys is not None else None,
                limit,
            )
        )

    async def serve_metrics(self, address: str = "127.0.0.1:0") -> MetricsServer:
        """Serves ``/metrics`` (Prometheus), ``/health`` and ``/stats`` for this bus and the
        consumers running on it; port 0 picks a free port (see ``.address``)."""
        return MetricsServer(await self._native.serve_metrics(address))

    def metrics_text(self) -> str:
        """This bus's metrics in the Prometheus text format."""
        return str(self._native.metrics_text())

    async def health(self) -> None:
        """Raises when the transport is not connected."""
        await self._native.health()

    async def consumer_lag(self, consumer: str) -> Optional[Dict[str, int]]:
        """``{"pending", "in_flight"}`` of durable consumer ``consumer``; ``None`` if unknown."""
        lag = await self._native.consumer_lag(consumer)
        return None if lag is None else dict(lag)

    async def close(self) -> None:
        """Flushes and closes the transport."""
        await self._native.close()


def _settle(fn: Callable[..., Any]) -> None:
    """Settles from :meth:`Bus.run`; a message released by a close is not an error there."""
    try:
        fn()
    except ClosedError:
        pass


def _url_with(url: str, options: Mapping[str, Any]) -> str:
    if not options:
        return url
    parts = []
    for k, v in options.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        parts.append(f"{quote(str(k))}={quote(str(v), safe='')}")
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(parts)


class _Connecting:
    """What :func:`connect` returns: awaitable (``bus = await ampybus.connect(...)``) and an
    async context manager (``async with ampybus.connect(...) as bus:``, closed on exit)."""

    def __init__(self, opening: Callable[[], Awaitable[Bus]]) -> None:
        self._opening = opening
        self._bus: Optional[Bus] = None

    def __await__(self) -> Any:
        return self._opening().__await__()

    async def __aenter__(self) -> Bus:
        self._bus = await self._opening()
        return self._bus

    async def __aexit__(self, *exc: object) -> None:
        if self._bus is not None:
            await self._bus.close()


def connect(
    url: Optional[str] = None,
    *,
    producer: Optional[str] = None,
    source: Optional[str] = None,
    observability: bool = True,
    service: Optional[str] = None,
    registry: Optional[str] = None,
    **options: Any,
) -> _Connecting:
    """Connects to the bus at ``url``: ``bus = await connect(...)``, or
    ``async with connect(...) as bus:`` (closed on exit; ``async with await connect(...)``
    works too).

    ``url``: ``file:///dir`` or a path (the embedded log, the default: ``$AMPYBUS_URL``, else
    ``./ampybus-data``), ``nats://host:4222``, ``tls://…``, ``redis://host:6379``,
    ``rediss://…``, ``kafka://host:9092``. Extra keyword ``options`` are the URL's query options
    (e.g. ``stream_prefix="AMPY"`` for NATS, ``key_prefix="x:"`` for Redis, ``namespace="x."`` for
    Kafka, ``sync="normal"`` for the embedded log) and are appended to it. ``producer``/``source`` are the defaults of every
    publish. ``observability=False`` turns metrics and spans off for this handle.
    ``registry`` (a registry TOML file) is enforced on publish and subscribe; ``service`` names
    the consuming service (subscriptions outside what it may read are refused).
    """
    if url is None:
        url = os.environ.get("AMPYBUS_URL") or "./ampybus-data"
    full = _url_with(url, options)

    async def opening() -> Bus:
        native = await _native.connect(full, observability, service, registry)
        return Bus(native, producer, source)

    return _Connecting(opening)
