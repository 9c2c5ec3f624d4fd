"""A service in one object: :class:`App` runs several consumers on one bus, an optional ops
endpoint (``/health``, ``/metrics``, ``/stats``), middleware around every handler, and one
shutdown on SIGINT/SIGTERM with one deadline — what ``ampybus::service::Service`` is in Rust.

>>> import ampybus
>>> app = ampybus.App("./ampybus-data", ops_addr="127.0.0.1:9464")
>>> @app.consumer("ampy.dev.orders.v1.>", name="oms")
... async def on_order(order: "OrderRequest") -> None:   # decoded from the annotation
...     ...
>>> # app.run()   # until SIGTERM (returns: exit 0) or SIGINT (SystemExit(130))

A handler returns to ack; raising retries the message with the exception as its cause (a
message out of attempts is dead-lettered as ``max_retries: attempt N: ValueError: …``);
raising :class:`DeadLetter` dead-letters it at once with its reason.

An inbox consumer (:mod:`ampybus.inbox`) is declared like any other, with ``inbox=``; its
handler also gets the database connection inside the message's open transaction::

    inbox = SqliteInbox("positions.sqlite3")

    @app.consumer("ampy.dev.fills.v1.>", name="positions", inbox=inbox)
    def on_fill(fill: "FillEvent", conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO fills (id) VALUES (?)", (fill.fill_id,))

Returning commits the transaction (with the message's inbox row), then acks; raising rolls
it back, then retries (:class:`DeadLetter`: rolls back, then dead-letters); a message applied
before is acked without calling the handler.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import typing
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional

from ._bus import Bus, ConsumerStats, connect

__all__ = ["App", "DeadLetter", "cause_of"]

#: ``async def middleware(msg, call_next)``: may look at ``msg``, refuse it (raise
#: :class:`DeadLetter`), or ``await call_next(msg)`` and look at what happened.
Middleware = Callable[[Any, Callable[[Any], Awaitable[None]]], Awaitable[None]]


class DeadLetter(Exception):
    """Raised by a handler: dead-letter the message now with ``reason`` (``code: detail``
    with a known code is kept, e.g. ``"schema_mismatch: v2 expected"``; other text becomes
    ``handler_error: <text>``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def cause_of(e: BaseException) -> str:
    """The cause kept for a retry: ``Type: text`` (the type alone when the text is empty)."""
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _message_class(fn: Callable[..., Any]) -> Optional[type]:
    """The protobuf class the handler's first parameter is annotated with, if any."""
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        raise TypeError(f"consumer {fn.__name__}: the handler must take the message")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: no decoding
        hints = {}
    cls = hints.get(params[0].name)
    if isinstance(cls, type) and hasattr(cls, "DESCRIPTOR") and hasattr(cls, "FromString"):
        return cls
    return None


@dataclass
class _Consumer:
    pattern: str
    name: str
    handler: Callable[..., Any]
    cls: Optional[type]
    wants_msg: bool
    options: Dict[str, Any] = field(default_factory=dict)
    #: The inbox the handler applies messages through (``None``: a plain consumer).
    inbox: Optional[Any] = None


class App:
    """Consumers on one bus, run and stopped together (see the module's docs).

    ``url`` and ``connect_options`` are those of :func:`ampybus.connect`. ``ops_addr``
    (``host:port``; port 0 picks one) serves ``/health``, ``/metrics`` and ``/stats`` while
    the app runs. ``shutdown_timeout`` is the one deadline of the shutdown: every consumer's
    running handlers finish within it, the rest is released for redelivery.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        *,
        ops_addr: Optional[str] = None,
        shutdown_timeout: float = 30.0,
        **connect_options: Any,
    ) -> None:
        self.url = url
        self.ops_addr = ops_addr
        self.shutdown_timeout = shutdown_timeout
        self._connect_options = connect_options
        self._consumers: List[_Consumer] = []
        self._middleware: List[Middleware] = []
        #: The bus while the app runs (``None`` before and after).
        self.bus: Optional[Bus] = None
        #: The address of the ops endpoint while the app runs.
        self.ops_address: Optional[str] = None
        #: Each consumer's final counts after :meth:`serve` returned.
        self.stats: Dict[str, ConsumerStats] = {}

    def consumer(
        self, pattern: str, *, name: str, inbox: Optional[Any] = None, **options: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Registers the decorated function as the handler of a durable consumer ``name`` on
        ``pattern``; ``options`` are those of :meth:`ampybus.Bus.subscribe` (``workers``,
        ``max_attempts``, ``strict``, ``start_at``, …).

        The handler (plain or ``async``) takes the message: when its first parameter is
        annotated with a protobuf class, the payload is decoded as that class (a message of
        another ``schema_fqdn`` is dead-lettered as ``schema_mismatch``, one that does not
        decode as ``decode_error``); a second parameter gets the :class:`ampybus.Message`.

        With ``inbox`` (an :class:`ampybus.inbox.SqliteInbox` or
        :class:`ampybus.inbox.PgInbox`) the consumer applies each message once, as
        :meth:`ampybus.Bus.run` with ``inbox=`` does, and the handler is
        ``handler(message, conn)`` or ``handler(message, conn, msg)``: ``message`` decoded
        from the annotation as above (else the :class:`ampybus.Message`), ``conn`` the
        database connection inside the message's open transaction (SQLite: a
        ``sqlite3.Connection``, the handler a plain function run in a worker thread;
        PostgreSQL: an ``asyncpg.Connection``, the handler ``async``), ``msg`` the
        :class:`ampybus.Message`. Decoding happens before the transaction begins (a message
        that does not decode is dead-lettered without touching the database). Returning
        commits, then acks; raising rolls back, then retries (:class:`DeadLetter`: rolls
        back, then dead-letters); a message applied before is acked without calling the
        handler and counted (``inbox.skipped(name)``, ``bus_inbox_skipped_total``).
        Middleware wraps the whole step: it sees every message (those the inbox skips too)
        before any transaction, and a refusal there touches no database. The inbox replaces
        the dedupe store: ``dedupe`` must be left unset.
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError("consumer: `name` must be a non-empty string")
        if any(c.name == name for c in self._consumers):
            raise ValueError(f"consumer: `name` {name!r} is given twice")
        if inbox is not None:
            if not callable(getattr(inbox, "apply", None)):
                raise TypeError(
                    f"consumer {name!r}: `inbox`: expected an ampybus.inbox.SqliteInbox or "
                    f"PgInbox, got {type(inbox).__name__}"
                )
            if options.get("dedupe"):
                raise ValueError(
                    f"consumer {name!r}: `dedupe`: an inbox consumer deduplicates through its "
                    "inbox; leave `dedupe` unset"
                )

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            params = list(inspect.signature(fn).parameters.values())
            if inbox is not None and len(params) < 2:
                raise TypeError(
                    f"consumer {name!r}: an inbox handler takes the message and the connection: "
                    f"`{fn.__name__}(message, conn)`"
                )
            wants_msg = len(params) >= (3 if inbox is not None else 2)
            self._consumers.append(
                _Consumer(pattern, name, fn, _message_class(fn), wants_msg, dict(options), inbox)
            )
            return fn

        return register

    def middleware(self, fn: Middleware) -> Middleware:
        """Registers ``async def fn(msg, call_next)`` around every handler (the first
        registered is the outermost). It may look at the message, refuse it (raise
        :class:`DeadLetter`, or any exception to retry), or ``await call_next(msg)``."""
        if not inspect.iscoroutinefunction(fn):
            raise TypeError("middleware: expected an `async def fn(msg, call_next)`")
        self._middleware.append(fn)
        return fn

    def _chain(self, c: _Consumer, bus: Bus) -> Callable[[Any], Awaitable[None]]:
        def decoded(msg: Any) -> Any:
            if c.cls is None:
                return msg
            want = c.cls.DESCRIPTOR.full_name
            got = msg.headers.schema_fqdn
            if got != want:
                raise DeadLetter(f"schema_mismatch: expected {want} got {got}")
            try:
                return c.cls.FromString(msg.payload)
            except Exception as e:
                raise DeadLetter(f"decode_error: {want}: {e}") from e

        async def plain(msg: Any) -> None:
            arg = decoded(msg)
            result = c.handler(arg, msg) if c.wants_msg else c.handler(arg)
            if inspect.isawaitable(result):
                await result

        async def through_inbox(msg: Any) -> None:
            arg = decoded(msg)

            def in_transaction(m: Any, conn: Any) -> Any:
                return c.handler(arg, conn, m) if c.wants_msg else c.handler(arg, conn)

            if not await c.inbox.apply(msg, in_transaction, consumer=c.name):
                bus._native.count_inbox_skipped(c.name, 1)

        call = plain
        if c.inbox is not None:
            bus._native.count_inbox_skipped(c.name, 0)  # the metric exists from the start
            call = through_inbox

        handler = call
        for mw in reversed(self._middleware):
            handler = _bind(mw, handler)
        return handler

    async def serve(self, stop: Optional[asyncio.Event] = None) -> str:
        """Runs every consumer until SIGINT, SIGTERM or ``stop`` is set, then stops them all
        at once within ``shutdown_timeout``; returns ``"SIGINT"``, ``"SIGTERM"`` or
        ``"requested"``."""
        if not self._consumers:
            raise ValueError("App.serve: no consumer registered (use @app.consumer)")
        loop = asyncio.get_running_loop()
        stop = stop or asyncio.Event()
        why: List[str] = []

        def on_signal(name: str) -> None:
            if not why:
                why.append(name)
            stop.set()

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal, sig.name)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals here: `stop` only
        bus = await connect(self.url, **self._connect_options)
        self.bus = bus
        server = None
        try:
            if self.ops_addr is not None:
                server = await bus.serve_metrics(self.ops_addr)
                self.ops_address = server.address

            async def one(c: _Consumer) -> ConsumerStats:
                handler = self._chain(c, bus)
                options = dict(c.options)
                if c.inbox is not None:
                    options["dedupe"] = False  # the inbox replaces the dedupe store

                async def settle(msg: Any) -> None:
                    try:
                        await handler(msg)
                    except DeadLetter as d:
                        if msg.settled is None:
                            msg.dead_letter(d.reason)
                    except Exception as e:
                        if msg.settled is None:
                            msg.retry(cause=cause_of(e))

                return await bus.run(
                    c.pattern,
                    settle,
                    consumer=c.name,
                    stop=stop,
                    shutdown_timeout=self.shutdown_timeout,
                    **options,
                )

            results = await asyncio.gather(*(one(c) for c in self._consumers))
            self.stats = {c.name: s for c, s in zip(self._consumers, results)}
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            if server is not None:
                await server.close()
            self.bus = None
            self.ops_address = None
            await bus.close()
        return why[0] if why else "requested"

    def run(self) -> None:
        """Runs the app (:meth:`serve`) in a new event loop until a signal: returns after
        SIGTERM (exit code 0, drained) and raises ``SystemExit(130)`` after SIGINT."""
        if asyncio.run(self.serve()) == "SIGINT":
            raise SystemExit(130)


def _bind(mw: Middleware, inner: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
    async def layer(msg: Any) -> None:
        await mw(msg, inner)

    return layer
