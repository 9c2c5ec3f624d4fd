"""The topic registry from Python: ``connect(registry=…, service=…)`` enforces what the Rust bus
enforces, with the same messages."""

from __future__ import annotations

from pathlib import Path

import pytest

import ampybus
from conftest import collect

REGISTRY = """
[[topic]]
pattern = "ampy.*.orders.v1.>"
owner = "oms"
schemas = ["ampy.raw.v1.Bytes"]
tier = "at_least_once_dedupe"
retention_days = 30
consumers = ["risk"]
"""


async def test_registry_enforced_on_publish_and_subscribe(tmp_path: Path) -> None:
    reg = tmp_path / "registry.toml"
    reg.write_text(REGISTRY)
    url = f"file://{tmp_path / 'bus'}"
    oms = await ampybus.connect(url, producer="oms@1", source="pytest", registry=str(reg))
    ui = await ampybus.connect(
        url, producer="ui@1", source="pytest", registry=str(reg), service="ui"
    )
    risk = await ampybus.connect(url, registry=str(reg), service="risk")
    try:
        await oms.publish("ampy.dev.orders.v1.requests", b"x", partition_key="co_1")
        with pytest.raises(ampybus.HeaderError) as e:
            await ui.publish("ampy.dev.orders.v1.requests", b"x", partition_key="co_2")
        assert e.value.field == "producer"
        assert str(e.value) == (
            'invalid header: `producer`: service `ui` (producer "ui@1") may not publish topic '
            '"ampy.dev.orders.v1.requests": it is owned by `oms` '
            f'(registry {reg}:2, pattern "ampy.*.orders.v1.>")'
        )
        with pytest.raises(ampybus.TopicError, match="no entry of the registry"):
            await oms.publish("ampy.dev.news.v1.raw", b"x", partition_key="n-1")
        with pytest.raises(ampybus.ConfigError, match="service `ui` may not read pattern"):
            async with ui.subscribe("ampy.dev.orders.>", consumer="ui"):
                pass
        sub = risk.subscribe("ampy.dev.orders.>", consumer="risk")
        got = await collect(sub, 1)
        assert [m.headers.partition_key for m in got] == ["co_1"]
        await sub.close()
    finally:
        for b in (oms, ui, risk):
            await b.close()
