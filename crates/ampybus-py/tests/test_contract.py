"""The contract from Python: what Python publishes passes the Rust validator; bad input raises
the exception of its Rust error kind, with the Rust message naming the field."""

from __future__ import annotations

import asyncio
import base64
import builtins
import json
from pathlib import Path
from typing import List, Tuple

import pytest
from ampy.bars.v1 import bars_pb2

import ampybus
from conftest import binary, within


async def _cli(*args: str) -> Tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        binary("AMPYBUS_CLI", "ampybus"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await within(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_python_headers_pass_the_rust_validator(tmp_path: Path, bus_factory) -> None:
    url = f"file://{tmp_path / 'bus'}"
    bus = await bus_factory(url)
    bar = bars_pb2.BarBatch()
    bar.bars.add().security.symbol = "AAPL"
    await bus.publish("ampy.prod.bars.v1.XNAS.AAPL", bar, partition_key="XNAS.AAPL")
    await bus.publish(
        "ampy.prod.orders.v1.requests",
        b"\x0a\x03co1",
        partition_key="co_1",
        schema_fqdn="ampy.orders.v1.OrderRequest",
        dedupe_key="co_1:submit",
        headers={"schema_version": "1.2.0", "desk": "rates"},
    )
    await bus.publish_batch(
        [ampybus.Outgoing("ampy.prod.news.v1.raw", b"n%d" % i, f"news-{i}") for i in range(3)]
    )
    stored = await bus.read("ampy.prod.>")
    assert len(stored) == 5
    out = tmp_path / "envelopes"
    out.mkdir()
    for i, m in enumerate(stored):
        env = {
            "topic": m.topic,
            "headers": m.headers.to_dict(),
            "payload_base64": base64.b64encode(m.payload).decode(),
        }
        (out / f"m{i}.json").write_text(json.dumps(env))
    code, stdout, stderr = await _cli("validate", str(out))
    assert code == 0, stdout + stderr
    assert stdout.count("OK ") == 5 and "FAIL" not in stdout
    h = stored[1].headers
    assert (h.dedupe_key, h["desk"], h.schema_version) == ("co_1:submit", "rates", "1.2.0")
    assert h.message_id is not None and h.run_id is not None and h.content_type == "application/x-protobuf"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"producer": ""}, "producer"),
        ({"source": ""}, "source"),
        ({"partition_key": ""}, "partition_key"),
        ({"headers": {"produced_at": "yesterday"}}, "produced_at"),
        ({"headers": {"schema_version": "1"}}, "schema_version"),
        ({"headers": {"message_id": "not-a-uuid"}}, "message_id"),
        ({"headers": {"content_encoding": "br"}}, "content_encoding"),
        ({"headers": {"traceparent": "00-zz"}}, "traceparent"),
        ({"schema_fqdn": "not a name"}, "schema_fqdn"),
    ],
)
async def test_invalid_header_names_the_field(embedded_url: str, bus_factory, kwargs, field: str) -> None:
    bus = await bus_factory(embedded_url)
    args = {"partition_key": "co_1", **kwargs}
    with pytest.raises(ampybus.HeaderError) as e:
        await bus.publish("ampy.dev.orders.v1.requests", b"x", **args)
    assert e.value.field == field, str(e.value)
    # Given by the Rust core with the error (`Error::field`), not read back from the text.
    assert e.value._field == field
    assert str(e.value).startswith(f"invalid header: `{field}`")
    assert isinstance(e.value, ampybus.AmpybusError) and e.value.kind == "header"
    assert await bus.read("ampy.dev.>") == []


def test_field_comes_with_the_error_and_falls_back_to_the_text() -> None:
    given = ampybus.HeaderError("invalid header: `a`: must be `b`", "a")
    assert (given.field, given.message) == ("a", "`a`: must be `b`")
    assert str(given) == "invalid header: `a`: must be `b`"
    assert ampybus.ConfigError("invalid configuration: option `x`: bad").field == "x"
    assert ampybus.ClosedError("closed: bus closed").field is None


async def test_partition_key_shape_by_domain(embedded_url: str, bus_factory) -> None:
    bus = await bus_factory(embedded_url)
    with pytest.raises(ampybus.HeaderError) as e:
        await bus.publish("ampy.dev.bars.v1.XNAS.AAPL", b"x", partition_key="AAPL")
    assert e.value.field == "partition_key"


async def test_same_message_as_the_rust_cli(tmp_path: Path, bus_factory) -> None:
    url = f"file://{tmp_path / 'bus'}"
    bus = await bus_factory(url)
    with pytest.raises(ampybus.HeaderError) as e:
        await bus.publish(
            "ampy.dev.news.v1.raw", b"x", partition_key="n1", headers={"produced_at": "yesterday"}
        )
    code, _, stderr = await _cli(
        "--url", url, "pub", "--topic", "ampy.dev.news.v1.raw", "--producer", "pytest@1",
        "--source", "pytest", "--pk", "n1", "--payload", "x", "--header", "produced_at=yesterday",
    )
    assert code != 0
    assert e.value.message in stderr, (str(e.value), stderr)


async def test_topic_and_config_errors(embedded_url: str, bus_factory) -> None:
    bus = await bus_factory(embedded_url)
    with pytest.raises(ampybus.TopicError, match="staging"):
        await bus.publish("ampy.staging.news.v1.raw", b"x", partition_key="n")
    with pytest.raises(ampybus.TopicError):
        await bus.publish("ampy.dev.news.v1.*", b"x", partition_key="n")
    with pytest.raises(ampybus.TopicError):
        await bus.subscribe("ampy.dev..x", consumer="c").start()
    with pytest.raises(ampybus.ConfigError, match="ftp"):
        await ampybus.connect("ftp://example.invalid/x")
    with pytest.raises(ampybus.ConfigError, match="`reason`"):
        await bus.dlq.inspect(reason="not_a_code")
    with pytest.raises(ValueError, match="naive"):
        from datetime import datetime

        await bus.read("ampy.dev.>", start=datetime(2025, 1, 1))
    with pytest.raises(TypeError, match="payload"):
        await bus.publish("ampy.dev.news.v1.raw", 42, partition_key="n")


async def test_batch_is_validated_before_anything_is_sent(embedded_url: str, bus_factory) -> None:
    bus = await bus_factory(embedded_url)
    batch: List[ampybus.Outgoing] = [
        ampybus.Outgoing("ampy.dev.news.v1.raw", b"a", "n1"),
        ampybus.Outgoing("ampy.dev.news.v1.raw", b"b", "n2"),
        ampybus.Outgoing("ampy.dev.news.v1.raw", b"c", "n3", headers={"produced_at": "soon"}),
    ]
    with pytest.raises(ampybus.HeaderError) as e:
        await bus.publish_batch(batch)
    assert str(e.value).startswith("invalid header: message 2: `produced_at`")
    assert e.value.field == "produced_at"
    assert await bus.read("ampy.dev.>") == []


async def test_keyword_and_header_clash(embedded_url: str, bus_factory) -> None:
    bus = await bus_factory(embedded_url)
    with pytest.raises(ampybus.HeaderError) as e:
        await bus.publish(
            "ampy.dev.news.v1.raw", b"x", partition_key="n1", headers={"partition_key": "n2"}
        )
    assert e.value.field == "partition_key"


def test_exception_classes_mirror_the_rust_kinds() -> None:
    kinds = {
        ampybus.TopicError: "topic",
        ampybus.HeaderError: "header",
        ampybus.EnvelopeError: "envelope",
        ampybus.PayloadError: "payload",
        ampybus.ConfigError: "config",
        ampybus.TransportError: "transport",
        ampybus.TimeoutError: "timeout",
        ampybus.ClosedError: "closed",
    }
    for cls, kind in kinds.items():
        assert issubclass(cls, ampybus.AmpybusError) and cls.kind == kind
    assert issubclass(ampybus.TimeoutError, builtins.TimeoutError)


async def test_unreachable_broker_is_a_transport_or_timeout_error() -> None:
    with pytest.raises((ampybus.TransportError, ampybus.TimeoutError)):
        await within(ampybus.connect("nats://127.0.0.1:1?connect_timeout_ms=500"), 60)
