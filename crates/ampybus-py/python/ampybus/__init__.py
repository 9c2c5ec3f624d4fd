"""ampybus: the ampy messaging contract and runtime, from asyncio.

The same Rust core as the ``ampybus`` CLI and Rust services (built with PyO3): topics,
headers and partition keys checked on publish, at-least-once durable consumers with
dedupe, per-key order, retries and a dead-letter queue, replay, metrics. Transports: the
embedded durable log (``file://`` or a path, the default), NATS JetStream (``nats://``),
Redis Streams (``redis://``) and Kafka (``kafka://``).

>>> import asyncio, ampybus
>>> async def main() -> None:
...     async with ampybus.connect("./ampybus-data", producer="oms@1", source="oms") as bus:
...         await bus.publish("ampy.dev.orders.v1.requests", b"...", partition_key="co_1")
...         async for msg in bus.subscribe("ampy.dev.orders.>", consumer="oms-audit"):
...             print(msg.topic, msg.headers.message_id)
...             await msg.ack()
...             break
"""

from __future__ import annotations

import collections.abc as _abc

from . import _native, inbox
from .app import App, DeadLetter
from ._bus import (
    RAW_BYTES_SCHEMA,
    Bus,
    ConsumerStats,
    Dlq,
    MetricsServer,
    Outgoing,
    Redriven,
    ReplayStatus,
    Subscription,
    connect,
)
from .errors import (
    AmpybusError,
    ClosedError,
    ConfigError,
    EnvelopeError,
    HeaderError,
    PayloadError,
    TimeoutError,
    TopicError,
    TransportError,
)

#: Message headers: a read-only mapping with typed accessors (``msg.headers``).
Headers = _native.Headers
#: A delivered message (``async for msg in bus.subscribe(...)``).
Message = _native.Message
#: A stored message read back (``bus.read``, ``bus.dlq.inspect``).
StoredMessage = _native.StoredMessage
#: What a publish returns: ``message_id``, ``sequence``, ``duplicate``.
Receipt = _native.Receipt

_abc.Mapping.register(Headers)

__version__: str = _native.__version__

__all__ = [
    "RAW_BYTES_SCHEMA",
    "AmpybusError",
    "App",
    "Bus",
    "ClosedError",
    "ConfigError",
    "ConsumerStats",
    "DeadLetter",
    "Dlq",
    "EnvelopeError",
    "HeaderError",
    "Headers",
    "Message",
    "MetricsServer",
    "Outgoing",
    "PayloadError",
    "Receipt",
    "Redriven",
    "ReplayStatus",
    "StoredMessage",
    "Subscription",
    "TimeoutError",
    "TopicError",
    "TransportError",
    "__version__",
    "connect",
    "inbox",
]
