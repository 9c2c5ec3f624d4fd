"""Shared fixtures of the Python SDK tests.

Real servers only: the embedded log in a temporary directory, and the NATS JetStream and
Redis servers that ``scripts/brokers.sh start nats redis`` runs on 127.0.0.1 (override with
``AMPYBUS_TEST_NATS_URL`` / ``AMPYBUS_TEST_REDIS_URL``). Topics and consumer names carry a
fresh uuid per test, so reruns against a persistent server do not see each other's data.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, List, Optional, TypeVar
from urllib.parse import urlparse

import pytest

import ampybus

# The Rust suites use this stream prefix too: NATS forbids streams with overlapping subjects,
# so every test on the shared server must share one prefix.
NATS_URL = os.environ.get(
    "AMPYBUS_TEST_NATS_URL",
    "nats://127.0.0.1:4222?stream_prefix=AMPYCONF&max_age_days=1&consumer_inactive_s=600",
)
REDIS_URL = os.environ.get("AMPYBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379")
#: The PostgreSQL server of the inbox tests (``postgres`` user, no password), no database.
PG_URL = os.environ.get("AMPYBUS_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432")
REPO = Path(__file__).resolve().parents[3]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))

#: Generous bound that turns a hang into a failure (not a synchronisation device).
TIMEOUT = 30.0

T = TypeVar("T")


def _reachable(url: str) -> None:
    """Fails (never skips) the test when a broker the suite needs is not running."""
    u = urlparse(url)
    try:
        socket.create_connection((u.hostname or "127.0.0.1", u.port or 0), timeout=2).close()
    except OSError as e:
        pytest.fail(f"{url} is not reachable ({e}); run `scripts/brokers.sh start nats redis`")


def token() -> str:
    """A fresh topic token / name suffix."""
    return "t" + uuid.uuid4().hex[:12]


def binary(env: str, relative: str) -> str:
    """A Rust program built by scripts/python-sdk.sh (path from `env`, else the target dir)."""
    path = os.environ.get(env) or str(TARGET / "debug" / relative)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it with scripts/python-sdk.sh test")
    return path


@pytest.fixture
def embedded_url(tmp_path: Path) -> str:
    """A fresh embedded log."""
    return f"file://{tmp_path / 'bus'}"


@pytest.fixture(params=["embedded", "nats"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The embedded log and NATS JetStream, one test run each."""
    if request.param == "nats":
        _reachable(NATS_URL)
        return NATS_URL
    return f"file://{tmp_path / 'bus'}"


@pytest.fixture(params=["embedded", "nats", "redis"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every transport of the wheel."""
    if request.param == "nats":
        _reachable(NATS_URL)
        return NATS_URL
    if request.param == "redis":
        _reachable(REDIS_URL)
        return f"{REDIS_URL}?key_prefix=pysdk-{token()}:"
    return f"file://{tmp_path / 'bus'}"


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    """A fresh database on the PostgreSQL server, dropped (connections and all) after the test."""
    import asyncpg

    _reachable(PG_URL)
    name = "ampybus_pytest_" + token()
    admin = await asyncpg.connect(PG_URL + "/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"{PG_URL}/{name}"
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def bus_factory() -> AsyncIterator[Callable[[str], Awaitable[ampybus.Bus]]]:
    """Connects buses that are closed after the test."""
    opened: List[ampybus.Bus] = []

    async def make(url: str) -> ampybus.Bus:
        b = await ampybus.connect(url, producer="pytest@1", source="pytest")
        opened.append(b)
        return b

    yield make
    for b in opened:
        await b.close()


async def within(aw: Awaitable[T], timeout: float = TIMEOUT) -> T:
    """Awaits `aw`, failing the test after `timeout` seconds instead of hanging."""
    return await asyncio.wait_for(aw, timeout)


async def collect(sub: ampybus.Subscription, n: int, *, ack: bool = True) -> List[ampybus.Message]:
    """The next `n` messages of `sub` (acked unless told not to)."""

    async def run() -> List[ampybus.Message]:
        got: List[ampybus.Message] = []
        async for m in sub:
            if ack:
                await m.ack()
            got.append(m)
            if len(got) == n:
                break
        return got

    return await within(run())


async def until(pred: Callable[[], Awaitable[Optional[T]]], timeout: float = TIMEOUT) -> T:
    """Polls `pred` (for state that has no event, e.g. a stored DLQ row) until truthy."""

    async def loop() -> T:
        while True:
            v = await pred()
            if v:
                return v
            await asyncio.sleep(0.02)

    return await within(loop(), timeout)
