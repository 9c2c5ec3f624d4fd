"""Blob-stored payloads from Python: the ``blob_store=`` bus URL option (a ``file://`` directory,
or an ``s3://`` bucket on the S3-compatible server of ``scripts/brokers.sh start s3``) carries a
payload over the 1 MiB inline limit as a pointer; the consumer gets it back whole."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, collect, token

S3_PORT = int(os.environ.get("S3_PORT", "9000"))


def _s3_bucket() -> str:
    """A fresh bucket on the test S3 server (started when absent)."""
    subprocess.run(["bash", str(REPO / "scripts/brokers.sh"), "start", "s3"], check=True,
                   capture_output=True)
    bucket = "ampybus-py-" + token()
    req = urllib.request.Request(f"http://127.0.0.1:{S3_PORT}/{bucket}", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    return bucket


@pytest.fixture(params=["file", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``blob_store=`` value: a fresh directory, or a fresh bucket (credentials in the
    standard AWS variables, as a deployment would give them)."""
    if request.param == "file":
        return f"file://{tmp_path / 'blobs'}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ampybus-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ampybus-test-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return f"s3://{_s3_bucket()}/py?endpoint=http://127.0.0.1:{S3_PORT}"


async def test_a_large_payload_travels_as_a_blob(url: str, blob_store: str, bus_factory) -> None:
    sep = "&" if "?" in url else "?"
    bus = await bus_factory(f"{url}{sep}blob_store={blob_store}")
    t = token()
    topic = f"ampy.dev.news.v1.blob{t}"
    payload = os.urandom(3 * 1024 * 1024)  # does not compress below 1 MiB
    await bus.publish(topic, payload, partition_key="n-1")
    sub = bus.subscribe(topic, consumer=f"blobs-{t}")
    [m] = await collect(sub, 1)
    assert m.payload == payload
    ref = m.headers.get("blob_ref")
    prefix = blob_store.split("?")[0]
    assert ref.startswith(prefix + "/news/"), ref
    assert m.headers.blob_size > 1024 * 1024  # as carried: gzip of random bytes
    await sub.close()
