"""Type stubs of the native module ``ampybus._native`` (built from ``crates/ampybus-py``).

Import ``ampybus`` instead; ``Message``, ``Headers``, ``StoredMessage`` and ``Receipt`` are
re-exported there.
"""

import asyncio
from datetime import datetime
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Type, TypeVar

__version__: str
RAW_BYTES_SCHEMA: str

# The inbox and outbox (ampybus.inbox): statements and defaults of the Rust core.
PG_INBOX_INSERT_SQL: str
PG_INBOX_PURGE_SQL: str
PG_STAGE_LOCK_SQL: str
PG_STAGE_LOCK_CLASS: int
PG_OUTBOX_INSERT_SQL: str
SQLITE_INBOX_INSERT_SQL: str
SQLITE_INBOX_PURGE_SQL: str
SQLITE_OUTBOX_INSERT_SQL: str
INBOX_DEFAULT_RETENTION_SECS: float

def inbox_migrate_pg(url: str) -> Awaitable[Tuple[int, int, str]]: ...
def inbox_migrate_sqlite(path: str) -> Tuple[int, int]: ...
def inbox_row(msg: "Message") -> Optional[Tuple[str, str, Optional[str], str]]: ...
def outbox_row(topic: str, headers: Dict[str, str]) -> Tuple[str, str, str, bytes]: ...

_M = TypeVar("_M")

class Ready:
    """An already-finished awaitable (what ``ack``/``retry``/``dead_letter`` return)."""

    def __await__(self) -> Iterator[None]: ...

class Headers(Mapping[str, str]):
    """Message headers: a read-only mapping of wire name to value, with typed accessors."""

    def __getitem__(self, name: str) -> str: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def __contains__(self, name: object) -> bool: ...
    def get(self, name: str, default: Any = None) -> Any: ...
    def to_dict(self) -> Dict[str, str]: ...
    @property
    def message_id(self) -> Optional[str]: ...
    @property
    def schema_fqdn(self) -> Optional[str]: ...
    @property
    def schema_version(self) -> Optional[str]: ...
    @property
    def content_type(self) -> Optional[str]: ...
    @property
    def content_encoding(self) -> Optional[str]: ...
    @property
    def produced_at(self) -> Optional[datetime]:
        """``produced_at`` as an aware UTC datetime."""
    @property
    def producer(self) -> Optional[str]: ...
    @property
    def source(self) -> Optional[str]: ...
    @property
    def run_id(self) -> Optional[str]: ...
    @property
    def partition_key(self) -> Optional[str]: ...
    @property
    def dedupe_key(self) -> Optional[str]: ...
    @property
    def traceparent(self) -> Optional[str]: ...
    @property
    def trace_id(self) -> Optional[str]: ...
    @property
    def retry_count(self) -> Optional[int]:
        """``retry_count`` as an int (0 when absent, ``None`` when not a number)."""
    @property
    def dlq_reason(self) -> Optional[str]: ...
    @property
    def original_topic(self) -> Optional[str]: ...
    @property
    def redrive_of(self) -> Optional[str]: ...
    @property
    def blob_size(self) -> Optional[int]: ...

class Message:
    """A delivered message; settle it once with ``ack``, ``retry`` or ``dead_letter``."""

    @property
    def topic(self) -> str: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def payload(self) -> bytes:
        """The raw payload: inflated, blob fetched and verified."""
    @property
    def message_id(self) -> Optional[str]: ...
    @property
    def partition_key(self) -> Optional[str]: ...
    @property
    def delivery_count(self) -> int:
        """1 on the first delivery, more after a redelivery."""
    @property
    def sequence(self) -> int: ...
    @property
    def stored_at(self) -> datetime: ...
    @property
    def settled(self) -> Optional[str]:
        """``"ack"``, ``"retry"``, ``"dead_letter"``, or ``None`` while unsettled."""
    def ack(self) -> Ready:
        """Done: acked (in batches) and recorded for dedupe."""
    def retry(self, delay: Optional[float] = None, cause: Optional[str] = None) -> Ready:
        """Again after ``delay`` seconds (``None``: the policy's backoff); DLQ after the last
        attempt, as ``max_retries: attempt N: <cause>`` when ``cause`` is given."""
    def dead_letter(self, reason: str) -> Ready:
        """Poison: to the DLQ now with ``reason`` (``code: detail`` or free text)."""
    def decode(self, cls: Type[_M]) -> _M:
        """The payload decoded as protobuf class ``cls`` (``schema_fqdn`` must match)."""
    def _release(self) -> None: ...

class StoredMessage:
    """A stored message read back (history, DLQ)."""

    @property
    def topic(self) -> str: ...
    @property
    def headers(self) -> Headers: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def sequence(self) -> int: ...
    @property
    def stored_at(self) -> datetime: ...
    @property
    def message_id(self) -> Optional[str]: ...
    @property
    def dlq_reason(self) -> Optional[str]: ...
    @property
    def dlq_code(self) -> Optional[str]: ...
    @property
    def original_topic(self) -> Optional[str]: ...
    @property
    def original_message_id(self) -> Optional[str]: ...
    def decode(self, cls: Type[_M]) -> _M: ...

class Receipt:
    """What a publish returns."""

    message_id: str
    sequence: int
    duplicate: bool

class MetricsServer:
    @property
    def address(self) -> str: ...
    def close(self) -> Awaitable[None]: ...

class Completer:
    """Resolves asyncio futures of one event loop in batches (made by ``ampybus._bus``)."""

    def __init__(self) -> None: ...
    def fileno(self) -> int:
        """The fd the loop watches (``add_reader(fd, drain)``); -1 when there is none."""
    def use_threadsafe(self, call_soon: Callable[[Callable[[], Any]], Any]) -> None:
        """Wake the loop with ``call_soon(drain)`` (``call_soon_threadsafe``) instead."""
    def drain(self) -> int:
        """Resolves every queued future; returns how many were queued."""

class NativeConsumer:
    @property
    def name(self) -> str: ...
    @property
    def running(self) -> bool: ...
    @property
    def held(self) -> int: ...
    def take(self, max: int) -> List[Message]: ...
    def arm(self, fut: "asyncio.Future[None]", completer: Completer) -> int:
        """1: ``fut`` resolves when messages are ready (or at close); 0: ready now; -1: closed."""
    def stats(self) -> Dict[str, Any]: ...
    def close(self, timeout: float = 5.0) -> Awaitable[Optional[Dict[str, Any]]]: ...

class NativeBus:
    @property
    def url(self) -> str: ...
    @property
    def transport(self) -> str: ...
    def publish(
        self,
        topic: str,
        payload: bytes,
        headers: Dict[str, str],
        fut: "asyncio.Future[Receipt]",
        completer: Completer,
    ) -> None: ...
    def publish_batch(
        self,
        items: List[Tuple[Any, ...]],
        common: Dict[str, str],
        default_schema: str,
        fut: "asyncio.Future[List[Receipt]]",
        completer: Completer,
    ) -> None: ...
    def _publisher_stats(self) -> Tuple[int, int]: ...
    def _bench_consume(
        self,
        pattern: str,
        consumer: str,
        n: int,
        workers: int = 64,
        dedupe: bool = False,
        max_in_flight: int = 4096,
    ) -> Awaitable[float]: ...
    def _bench_publish_wire(
        self,
        topic: str,
        n: int,
        batch: int = 1000,
        payload_len: int = 256,
        schema_fqdn: str = ...,
        wire: bool = True,
    ) -> Awaitable[float]: ...
    def subscribe(self, pattern: str, consumer: str, **options: Any) -> Awaitable[NativeConsumer]: ...
    def request_replay(
        self,
        consumer: str,
        pattern: str,
        start: str,
        end: str,
        keys: List[str] = ...,
        reason: str = ...,
        timeout: float = ...,
    ) -> Awaitable[Dict[str, Any]]: ...
    def read(
        self,
        pattern: str,
        start: Optional[str] = None,
        end: Optional[str] = None,
        keys: Optional[List[str]] = None,
        limit: Optional[int] = None,
    ) -> Awaitable[List[StoredMessage]]: ...
    def dlq_inspect(
        self, pattern: str, reason: Optional[str] = None, since: Optional[str] = None
    ) -> Awaitable[List[StoredMessage]]: ...
    def dlq_redrive(
        self,
        pattern: str,
        reason: Optional[str] = None,
        since: Optional[str] = None,
        rate: float = 100.0,
        dry_run: bool = False,
        skip_invalid: bool = False,
    ) -> Awaitable[List[Tuple[str, str, str]]]: ...
    def serve_metrics(self, addr: str) -> Awaitable[MetricsServer]: ...
    def metrics_text(self) -> str: ...
    def count_inbox_skipped(self, consumer: str, n: int) -> None: ...
    def health(self) -> Awaitable[None]: ...
    def consumer_lag(self, consumer: str) -> Awaitable[Optional[Dict[str, int]]]: ...
    def close(self) -> Awaitable[None]: ...

def connect(
    url: str,
    observability: bool = True,
    service: Optional[str] = None,
    registry: Optional[str] = None,
) -> Awaitable[NativeBus]: ...
