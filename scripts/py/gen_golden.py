"""Generates the golden envelopes under ``golden/`` (except ``golden/malformed/``).

Payload bytes come from the reference ``ampy-proto`` 2.1.1 package
(``SerializeToString(deterministic=True)``). Everything is deterministic:
fixed ids, timestamps and contents, so re-running the script rewrites
identical files (``--check`` verifies that without writing).

Layout: ``golden/<domain>/{typical,minimal,edge}.json`` for the 12 payload
domains, and ``golden/dlq/{decode_error,handler_error,max_retries}.json``.

Envelope JSON form (keys in this order, 2-space indent, trailing newline)::

    {
      "topic": "ampy.prod.bars.v1.XNAS.AAPL",
      "headers": {...},            # all values strings, keys sorted
      "payload_base64": "...",     # bytes as carried (gzip when encoded)
      "payload_json": {...}        # proto3 JSON, original field names,
    }                              # keys sorted; omitted if undecodable

Every file is checked against the publish-side header rules before it is
written (see ``check_envelope``).

Usage: ``.venv-ampyproto/bin/python scripts/py/gen_golden.py [--check]``
(run ``scripts/python-env.sh`` first).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import gzip
import hashlib
import json
import re
import sys
import uuid
from dataclasses import dataclass, field
from decimal import Decimal as PyDecimal
from pathlib import Path
from typing import Any, Callable

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

import ampy_reflect
from ampy.bars.v1 import bars_pb2
from ampy.common.v1 import common_pb2
from ampy.corporate_actions.v1 import corporate_actions_pb2
from ampy.fills.v1 import fills_pb2
from ampy.fundamentals.v1 import fundamentals_pb2
from ampy.fx.v1 import fx_pb2
from ampy.metrics.v1 import metrics_pb2
from ampy.news.v1 import news_pb2
from ampy.orders.v1 import orders_pb2
from ampy.positions.v1 import positions_pb2
from ampy.signals.v1 import signals_pb2
from ampy.ticks.v1 import ticks_pb2
from ampy.universe.v1 import universe_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO_ROOT / "golden"

# Payloads strictly larger than this are gzip-compressed on the wire.
GZIP_THRESHOLD = 131_072
SCHEMA_VERSION = "1.0.0"
CONTENT_TYPE = "application/x-protobuf"
# First envelope's time; each next envelope is 1.5 s later.
CLOCK_START = dt.datetime(2025, 9, 5, 19, 31, 1, 462_000, tzinfo=dt.timezone.utc)
CLOCK_STEP = dt.timedelta(milliseconds=1500)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)

PAYLOAD_DOMAINS: tuple[str, ...] = (
    "bars",
    "ticks",
    "fundamentals",
    "news",
    "fx",
    "corporate_actions",
    "universe",
    "signals",
    "orders",
    "fills",
    "positions",
    "metrics",
)

# The test vector every implementation of the name-only hash must meet.
assert ampy_reflect.nameonly_schema_hash("ampy.bars.v1.BarBatch") == (
    "nameonly:sha256:"
    "3b2d6ec8fee72f3910ca2f7c9b852eb73c8d6be4150bad6e0142478a318031f9"
)


# --------------------------------------------------------------------------
# Small builders
# --------------------------------------------------------------------------


def dec(text: str) -> common_pb2.Decimal:
    """``"191.2500"`` -> Decimal(scaled=1912500, scale=4)."""
    value = PyDecimal(text)
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    scaled = int("".join(map(str, digits)) or "0")
    return common_pb2.Decimal(scaled=-scaled if sign else scaled, scale=-exponent)


def money(text: str, currency: str) -> common_pb2.Money:
    return common_pb2.Money(amount=dec(text), currency_code=currency)


def ts(text: str) -> Timestamp:
    """An RFC 3339 UTC time as a Timestamp."""
    out = Timestamp()
    out.FromJsonString(text)
    return out


def ts_of(when: dt.datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(when)
    return out


def sec(symbol: str, mic: str, figi: str = "", isin: str = "") -> common_pb2.SecurityId:
    return common_pb2.SecurityId(symbol=symbol, mic=mic, figi=figi, isin=isin)


def meta(run_id: str, source: str, producer: str) -> common_pb2.Meta:
    return common_pb2.Meta(
        run_id=run_id, source=source, producer=producer, schema_version=SCHEMA_VERSION
    )


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
        second: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.timezone.utc)


# --------------------------------------------------------------------------
# Envelope model
# --------------------------------------------------------------------------


@dataclass
class Producer:
    """Who publishes a domain: the ``producer``/``source``/``run_id`` headers."""

    producer: str
    source: str
    run_id: str


@dataclass
class Spec:
    """One golden envelope before ids, times and encoding are assigned."""

    path: str
    topic: str
    payload: Message | bytes
    fqdn: str
    partition_key: str
    who: Producer
    extra: dict[str, str] = field(default_factory=dict)
    schema_hash: bool = False


PRODUCERS: dict[str, Producer] = {
    "bars": Producer("yfinance-go@ingest-1", "yfinance-go", "run_0912"),
    "ticks": Producer("databento-cpp@ticks-1", "databento", "run_0913"),
    "fundamentals": Producer("tiingo-go@fundamentals-1", "tiingo", "run_0914"),
    "news": Producer("marketbeat-go@news-1", "marketbeat", "run_0915"),
    "fx": Producer("fxrates-go@fx-1", "fxrates", "run_0916"),
    "corporate_actions": Producer("yfinance-go@corp-1", "yfinance-go", "run_0917"),
    "universe": Producer("ampy-universe@daily-1", "ampy-universe", "run_0918"),
    "signals": Producer("ampy-model-server@hyper-1", "ampy-model-server", "run_0919"),
    "orders": Producer("ampy-oms@oms-1", "ampy-oms", "run_0920"),
    "fills": Producer("alpaca-broker@fills-1", "alpaca", "run_0921"),
    "positions": Producer("ampy-oms@positions-1", "ampy-oms", "run_0922"),
    "metrics": Producer("ampy-oms@metrics-1", "ampy-oms", "run_0923"),
}


def m(domain: str) -> common_pb2.Meta:
    who = PRODUCERS[domain]
    return meta(who.run_id, who.source, who.producer)


# --------------------------------------------------------------------------
# Payloads, per domain: typical, minimal, edge
# --------------------------------------------------------------------------

AAPL = ("AAPL", "XNAS", "BBG000B9XRY4", "US0378331005")


def bar(minute: int, open_: str, high: str, low: str, close: str, volume: int) -> bars_pb2.Bar:
    start = utc(2025, 9, 5, 13, 30) + dt.timedelta(minutes=minute)
    end = start + dt.timedelta(minutes=1)
    return bars_pb2.Bar(
        security=sec(*AAPL),
        start=ts_of(start),
        end=ts_of(end),
        open=dec(open_),
        high=dec(high),
        low=dec(low),
        close=dec(close),
        vwap=dec(f"{(PyDecimal(high) + PyDecimal(low) + PyDecimal(close)) / 3:.4f}"),
        volume=volume,
        trade_count=volume // 90 + 1,
        adjusted=False,
        adjustment_policy_id="raw",
        adjustment_policy=common_pb2.ADJUSTMENT_POLICY_RAW,
        event_time=ts_of(end),
        ingest_time=ts_of(end + dt.timedelta(milliseconds=412)),
        as_of=ts_of(end + dt.timedelta(milliseconds=412)),
        meta=m("bars"),
    )


def bars_payloads() -> list[Spec]:
    who = PRODUCERS["bars"]
    topic = "ampy.prod.bars.v1.XNAS.AAPL"
    typical = bars_pb2.BarBatch(
        bars=[
            bar(0, "192.3450", "192.5600", "192.2200", "192.4100", 184_230),
            bar(1, "192.4100", "192.4800", "192.1000", "192.1500", 121_877),
            bar(2, "192.1500", "192.9000", "192.1500", "192.8800", 203_511),
        ]
    )
    minimal = bars_pb2.BarBatch(
        bars=[
            bars_pb2.Bar(
                security=sec("AAPL", "XNAS"),
                start=ts("2025-09-05T13:30:00Z"),
                end=ts("2025-09-05T13:31:00Z"),
                open=dec("192.3450"),
                high=dec("192.5600"),
                low=dec("192.2200"),
                close=dec("192.4100"),
                volume=184_230,
            )
        ]
    )
    # A full session and more of 1-minute bars: well over 128 KiB raw.
    edge = bars_pb2.BarBatch()
    for i in range(700):
        base = PyDecimal("190") + PyDecimal(i % 97) / 10
        edge.bars.append(
            bar(
                i,
                f"{base:.4f}",
                f"{base + PyDecimal('0.4321'):.4f}",
                f"{base - PyDecimal('0.1234'):.4f}",
                f"{base + PyDecimal('0.0500'):.4f}",
                100_000 + 37 * i,
            )
        )
    fqdn = "ampy.bars.v1.BarBatch"
    return [
        Spec("bars/typical.json", topic, typical, fqdn, "XNAS.AAPL", who, schema_hash=True),
        Spec("bars/minimal.json", topic, minimal, fqdn, "XNAS.AAPL", who),
        Spec("bars/edge.json", topic, edge, fqdn, "XNAS.AAPL", who),
    ]


MSFT = sec("MSFT", "XNAS", "BBG000BPH459", "US5949181045")


def trade(i: int, price: str, size: int) -> ticks_pb2.Tick:
    when = utc(2025, 9, 5, 14, 0, 0) + dt.timedelta(microseconds=1_250 * i + 17)
    return ticks_pb2.Tick(
        trade=ticks_pb2.TradeTick(
            security=MSFT,
            price=dec(price),
            size=size,
            venue="XNAS",
            event_time=ts_of(when),
            ingest_time=ts_of(when + dt.timedelta(microseconds=850)),
            meta=m("ticks"),
        )
    )


def ticks_payloads() -> list[Spec]:
    who = PRODUCERS["ticks"]
    fqdn = "ampy.ticks.v1.TickBatch"
    typical = ticks_pb2.TickBatch(
        ticks=[trade(0, "505.1200", 100), trade(1, "505.1300", 25), trade(2, "505.1100", 300)]
    )
    minimal = ticks_pb2.TickBatch(
        ticks=[
            ticks_pb2.Tick(
                quote=ticks_pb2.QuoteTick(
                    security=sec("MSFT", "XNAS"),
                    bid=dec("505.11"),
                    bid_size=200,
                    ask=dec("505.13"),
                    ask_size=100,
                    event_time=ts("2025-09-05T14:00:00.000125Z"),
                )
            )
        ]
    )
    edge = ticks_pb2.TickBatch(
        ticks=[trade(i, f"{PyDecimal('505') + PyDecimal(i % 200) / 100:.4f}", 1 + i % 500)
               for i in range(1000)]
    )
    return [
        Spec("ticks/typical.json", "ampy.prod.ticks.v1.trade.MSFT", typical, fqdn,
             "MSFT.XNAS", who),
        Spec("ticks/minimal.json", "ampy.prod.ticks.v1.quote.MSFT", minimal, fqdn,
             "MSFT.XNAS", who),
        Spec("ticks/edge.json", "ampy.prod.ticks.v1.trade.MSFT", edge, fqdn, "MSFT.XNAS", who),
    ]


def line(key: str, value: str, currency: str = "USD") -> fundamentals_pb2.LineItem:
    return fundamentals_pb2.LineItem(
        key=key,
        value=dec(value),
        currency_code=currency,
        period_start=ts("2025-03-30T00:00:00Z"),
        period_end=ts("2025-06-30T00:00:00Z"),
    )


def fundamentals_payloads() -> list[Spec]:
    who = PRODUCERS["fundamentals"]
    fqdn = "ampy.fundamentals.v1.FundamentalsBatch"
    topic = "ampy.prod.fundamentals.v1.tiingo"
    key = "AAPL.XNAS|2025-06-30|tiingo"
    typical = fundamentals_pb2.FundamentalsBatch(
        snapshots=[
            fundamentals_pb2.FundamentalsSnapshot(
                security=sec(*AAPL),
                lines=[
                    line("revenue", "94036000000.00"),
                    line("net_income", "23434000000.00"),
                    line("eps_diluted", "1.57"),
                    line("total_assets", "331495000000.00"),
                    line("shares_outstanding", "14935826000", ""),
                ],
                source="tiingo",
                as_of=ts("2025-08-01T12:00:00Z"),
                meta=m("fundamentals"),
            )
        ]
    )
    minimal = fundamentals_pb2.FundamentalsBatch(
        snapshots=[
            fundamentals_pb2.FundamentalsSnapshot(
                security=sec("AAPL", "XNAS"),
                lines=[
                    fundamentals_pb2.LineItem(
                        key="revenue",
                        value=dec("94036000000"),
                        period_end=ts("2025-06-30T00:00:00Z"),
                    )
                ],
                source="tiingo",
            )
        ]
    )
    # Extreme decimals: int64 bounds, 18-digit and negative scales.
    extremes = [
        line("int64_max", "9223372036854775807"),
        line("int64_min", "-9223372036854775808"),
        line("tiny_ratio", "0.000000000000000001"),
        line("goodwill_impairment", "-0.000000000000000123"),
        line("revenue_jpy", "14102345678901", "JPY"),
        line("umsatz_\u20ac_bereinigt", "1234.5678", "EUR"),
    ]
    # 7E+12 with a negative scale: scaled=7, scale=-12.
    negative_scale = line("market_cap_rounded", "0")
    negative_scale.value.CopyFrom(common_pb2.Decimal(scaled=7, scale=-12))
    extremes.append(negative_scale)
    edge = fundamentals_pb2.FundamentalsBatch(
        snapshots=[
            fundamentals_pb2.FundamentalsSnapshot(
                security=sec(*AAPL),
                lines=extremes,
                source="tiingo",
                as_of=ts("2025-08-01T12:00:00.999999999Z"),
                meta=m("fundamentals"),
            )
        ]
    )
    return [
        Spec("fundamentals/typical.json", topic, typical, fqdn, key, who),
        Spec("fundamentals/minimal.json", topic, minimal, fqdn, key, who),
        Spec("fundamentals/edge.json", topic, edge, fqdn, key, who),
    ]


NEWS_PARAGRAPHS = (
    "Apple shares rose in early trading after the company outlined its "
    "September product event schedule. ",
    "Analysten erwarten ein starkes Quartal für das iPhone-Geschäft \u2014 "
    "besonders in Europa. ",
    "\u30a2\u30c3\u30d7\u30eb\u306e\u682a\u4fa1\u306f\u5bc4\u308a\u4ed8\u304d\u3067"
    "\u4e0a\u6607\u3057\u307e\u3057\u305f\u3002 ",
    "\u0410\u043a\u0446\u0438\u0438 Apple \u0432\u044b\u0440\u043e\u0441\u043b\u0438 "
    "\u043d\u0430 1,2 %. ",
    "\u0623\u0633\u0647\u0645 \u0622\u0628\u0644 \u062a\u0631\u062a\u0641\u0639. ",
    "Emoji check: \U0001f4c8\U0001f34f\u2705. ",
)


def news_item(item_id: str, body: str) -> news_pb2.NewsItem:
    return news_pb2.NewsItem(
        id=item_id,
        source="marketbeat",
        url=f"https://www.marketbeat.com/articles/{item_id.split(':')[-1]}",
        headline="Apple (AAPL) climbs ahead of September product event",
        body=body,
        tickers=["AAPL", "MSFT"],
        sentiment_score_bp=2500,
        published_at=ts("2025-09-05T12:15:00Z"),
        ingest_time=ts("2025-09-05T12:15:03.250Z"),
        meta=m("news"),
    )


def news_payloads() -> list[Spec]:
    who = PRODUCERS["news"]
    fqdn = "ampy.news.v1.NewsBatch"
    topic = "ampy.prod.news.v1.raw"
    typical_id = "marketbeat:2025-09-05:aapl-headline-8b12c6"
    typical = news_pb2.NewsBatch(items=[news_item(typical_id, "".join(NEWS_PARAGRAPHS[:2]))])
    minimal_id = "marketbeat:2025-09-05:msft-brief-19a0d3"
    minimal = news_pb2.NewsBatch(
        items=[
            news_pb2.NewsItem(
                id=minimal_id,
                headline="Microsoft announces quarterly dividend",
                published_at=ts("2025-09-05T12:30:00Z"),
            )
        ]
    )
    # A long multilingual article: > 128 KiB raw, so it is gzipped.
    edge_id = "marketbeat:2025-09-05:aapl-longform-77e4f0"
    body = "".join(
        f"[{i}] {NEWS_PARAGRAPHS[i % len(NEWS_PARAGRAPHS)]}\n" for i in range(2200)
    )
    edge_item = news_item(edge_id, body)
    edge_item.sentiment_score_bp = -10000
    edge = news_pb2.NewsBatch(items=[edge_item])
    return [
        Spec("news/typical.json", topic, typical, fqdn, typical_id, who,
             extra={"dedupe_key": typical_id}),
        Spec("news/minimal.json", topic, minimal, fqdn, minimal_id, who),
        Spec("news/edge.json", topic, edge, fqdn, edge_id, who, extra={"dedupe_key": edge_id}),
    ]


def fx_payloads() -> list[Spec]:
    who = PRODUCERS["fx"]
    fqdn = "ampy.fx.v1.FxRateBatch"
    topic = "ampy.prod.fx.v1.rates"
    usdjpy = fx_pb2.Pair(base="USD", quote="JPY")
    typical = fx_pb2.FxRateBatch(
        rates=[
            fx_pb2.FxRate(
                pair=usdjpy,
                bid=dec("147.234"),
                ask=dec("147.236"),
                mid=dec("147.235"),
                as_of=ts("2025-09-05T19:30:00Z"),
                meta=m("fx"),
            )
        ]
    )
    minimal = fx_pb2.FxRateBatch(
        rates=[fx_pb2.FxRate(pair=usdjpy, mid=dec("147.235"), as_of=ts("2025-09-05T19:30:00Z"))]
    )
    # A tick-by-tick series at 12-decimal precision.
    edge = fx_pb2.FxRateBatch()
    for i in range(300):
        mid = PyDecimal("147.235000000000") + PyDecimal(i) / PyDecimal(10**12)
        edge.rates.append(
            fx_pb2.FxRate(
                pair=usdjpy,
                bid=dec(f"{mid - PyDecimal('0.001'):.12f}"),
                ask=dec(f"{mid + PyDecimal('0.001'):.12f}"),
                mid=dec(f"{mid:.12f}"),
                as_of=ts_of(utc(2025, 9, 5, 19, 30) + dt.timedelta(microseconds=333 * i)),
            )
        )
    return [
        Spec("fx/typical.json", topic, typical, fqdn, "USD.JPY", who),
        Spec("fx/minimal.json", topic, minimal, fqdn, "USD.JPY", who),
        Spec("fx/edge.json", topic, edge, fqdn, "USD.JPY", who),
    ]


def corporate_actions_payloads() -> list[Spec]:
    who = PRODUCERS["corporate_actions"]
    fqdn = "ampy.corporate_actions.v1.CorporateActionBatch"
    topic = "ampy.prod.corporate_actions.v1.actions"
    ca = corporate_actions_pb2
    typical = ca.CorporateActionBatch(
        actions=[
            ca.CorporateAction(
                dividend=ca.DividendAction(
                    security=sec(*AAPL),
                    cash_amount=money("0.26", "USD"),
                    ex_date=ts("2025-08-11T00:00:00Z"),
                    pay_date=ts("2025-08-14T00:00:00Z"),
                    meta=m("corporate_actions"),
                )
            ),
            ca.CorporateAction(
                split=ca.SplitAction(
                    security=sec(*AAPL),
                    ratio_numerator=4,
                    ratio_denominator=1,
                    ex_date=ts("2020-08-31T00:00:00Z"),
                    meta=m("corporate_actions"),
                )
            ),
        ]
    )
    minimal = ca.CorporateActionBatch(
        actions=[
            ca.CorporateAction(
                split=ca.SplitAction(
                    security=sec("AAPL", "XNAS"),
                    ratio_numerator=4,
                    ratio_denominator=1,
                    ex_date=ts("2020-08-31T00:00:00Z"),
                )
            )
        ]
    )
    # Reverse split at the int32 limit, a dividend with 18 decimals, and a
    # dividend of exactly zero (amount present but all defaults).
    edge = ca.CorporateActionBatch(
        actions=[
            ca.CorporateAction(
                split=ca.SplitAction(
                    security=sec(*AAPL),
                    ratio_numerator=1,
                    ratio_denominator=2_147_483_647,
                    ex_date=ts("1970-01-01T00:00:00Z"),
                )
            ),
            ca.CorporateAction(
                dividend=ca.DividendAction(
                    security=sec(*AAPL),
                    cash_amount=money("0.000000000000000001", "USD"),
                    ex_date=ts("9999-12-31T00:00:00Z"),
                    pay_date=ts("9999-12-31T23:59:59.999999999Z"),
                )
            ),
            ca.CorporateAction(
                dividend=ca.DividendAction(
                    security=sec(*AAPL),
                    cash_amount=common_pb2.Money(amount=common_pb2.Decimal(), currency_code="USD"),
                    ex_date=ts("2025-11-10T00:00:00Z"),
                )
            ),
        ]
    )
    return [
        Spec("corporate_actions/typical.json", topic, typical, fqdn, "AAPL.XNAS", who),
        Spec("corporate_actions/minimal.json", topic, minimal, fqdn, "AAPL.XNAS", who),
        Spec("corporate_actions/edge.json", topic, edge, fqdn, "AAPL.XNAS", who),
    ]


SP500_SAMPLE = (
    ("AAPL", "XNAS", "BBG000B9XRY4", "US0378331005"),
    ("MSFT", "XNAS", "BBG000BPH459", "US5949181045"),
    ("NVDA", "XNAS", "BBG000BBJQV0", "US67066G1040"),
    ("AMZN", "XNAS", "BBG000BVPV84", "US0231351067"),
    ("GOOGL", "XNAS", "", ""),
    ("BRK.B", "XNYS", "", ""),
    ("JPM", "XNYS", "", ""),
    ("XOM", "XNYS", "", ""),
)


def universe_payloads() -> list[Spec]:
    who = PRODUCERS["universe"]
    fqdn = "ampy.universe.v1.UniverseBatch"
    topic = "ampy.prod.universe.v1.snapshots"
    typical = universe_pb2.UniverseBatch(
        snapshots=[
            universe_pb2.UniverseSnapshot(
                universe_id="sp500",
                constituents=[
                    universe_pb2.Constituent(symbol=s, mic=mic, figi=figi, isin=isin)
                    for s, mic, figi, isin in SP500_SAMPLE
                ],
                as_of=ts("2025-09-05T00:00:00Z"),
                ruleset="sp500-membership@2025-09",
                meta=m("universe"),
            )
        ]
    )
    minimal = universe_pb2.UniverseBatch(
        snapshots=[universe_pb2.UniverseSnapshot(universe_id="watchlist-empty")]
    )
    # Many repeated items: a 1500-name synthetic universe.
    edge = universe_pb2.UniverseBatch(
        snapshots=[
            universe_pb2.UniverseSnapshot(
                universe_id="us-all-common",
                constituents=[
                    universe_pb2.Constituent(
                        symbol=f"SYM{i:04d}", mic=("XNAS", "XNYS", "ARCX")[i % 3]
                    )
                    for i in range(1500)
                ],
                as_of=ts("2025-09-05T00:00:00Z"),
                ruleset="price>1&adv>100k",
                meta=m("universe"),
            )
        ]
    )
    return [
        Spec("universe/typical.json", topic, typical, fqdn, "sp500", who),
        Spec("universe/minimal.json", topic, minimal, fqdn, "watchlist-empty", who),
        Spec("universe/edge.json", topic, edge, fqdn, "us-all-common", who),
    ]


def signals_payloads() -> list[Spec]:
    who = PRODUCERS["signals"]
    fqdn = "ampy.signals.v1.SignalBatch"
    topic = "ampy.prod.signals.v1.hyper@2025-09-05"
    model = "hyper@2025-09-05"
    nvda = sec("NVDA", "XNAS")
    typical = signals_pb2.SignalBatch(
        signals=[
            signals_pb2.Signal(
                security=nvda,
                type=common_pb2.SIGNAL_TYPE_ALPHA,
                model_id=model,
                horizon="5d",
                generated_at=ts("2025-09-05T19:30:00Z"),
                expires_at=ts("2025-09-12T19:30:00Z"),
                score=dec("0.7342"),
                meta=m("signals"),
            )
        ]
    )
    minimal = signals_pb2.SignalBatch(
        signals=[
            signals_pb2.Signal(
                security=nvda,
                type=common_pb2.SIGNAL_TYPE_ACTION,
                model_id=model,
                action=common_pb2.ACTION_TYPE_BUY,
            )
        ]
    )
    # Extreme score, the latest representable expiry, explicit HOLD.
    edge = signals_pb2.SignalBatch(
        signals=[
            signals_pb2.Signal(
                security=nvda,
                type=common_pb2.SIGNAL_TYPE_ALPHA,
                model_id=model,
                horizon="5d",
                generated_at=ts("0001-01-01T00:00:00Z"),
                expires_at=ts("9999-12-31T23:59:59.999999999Z"),
                score=common_pb2.Decimal(scaled=-9_223_372_036_854_775_808, scale=2_147_483_647),
                meta=m("signals"),
            ),
            signals_pb2.Signal(
                security=nvda,
                type=common_pb2.SIGNAL_TYPE_ACTION,
                model_id=model,
                horizon="5d",
                action=common_pb2.ACTION_TYPE_HOLD,
            ),
        ]
    )
    return [
        Spec("signals/typical.json", topic, typical, fqdn, f"{model}|NVDA.XNAS|5d", who),
        Spec("signals/minimal.json", topic, minimal, fqdn, f"{model}|NVDA.XNAS", who),
        Spec("signals/edge.json", topic, edge, fqdn, f"{model}|NVDA.XNAS|5d", who),
    ]


ACCOUNT = "ALPACA-LIVE-01"


def orders_payloads() -> list[Spec]:
    who = PRODUCERS["orders"]
    fqdn = "ampy.orders.v1.OrderRequest"
    topic = "ampy.prod.orders.v1.requests"
    typical = orders_pb2.OrderRequest(
        account_id=ACCOUNT,
        client_order_id="co_20250905_001",
        security=sec(*AAPL),
        side=common_pb2.SIDE_BUY,
        order_type=common_pb2.ORDER_TYPE_LIMIT,
        tif=common_pb2.TIME_IN_FORCE_DAY,
        quantity=dec("100"),
        limit_price=dec("191.2500"),
        venue="XNAS",
        strategy_tag="hyper@2025-09-05",
        created_at=ts("2025-09-05T19:31:00.120Z"),
        meta=m("orders"),
    )
    minimal = orders_pb2.OrderRequest(
        account_id=ACCOUNT,
        client_order_id="co_20250905_002",
        security=sec("MSFT", "XNAS"),
        side=common_pb2.SIDE_SELL,
        order_type=common_pb2.ORDER_TYPE_MARKET,
        quantity=dec("10"),
    )
    # Stop-limit GTT with int64-bound quantity and a 9-decimal stop price.
    edge = orders_pb2.OrderRequest(
        account_id=ACCOUNT,
        client_order_id="co_20250905_003-\u00e9\u2713",
        security=sec("BRK.A", "XNYS"),
        side=common_pb2.SIDE_SELL,
        order_type=common_pb2.ORDER_TYPE_STOP_LIMIT,
        tif=common_pb2.TIME_IN_FORCE_GTT,
        quantity=common_pb2.Decimal(scaled=9_223_372_036_854_775_807, scale=0),
        limit_price=dec("712345.99"),
        stop_price=dec("712000.000000001"),
        venue="XNYS",
        strategy_tag="stratégie-\u00e9t\u00e9 \U0001f680",
        created_at=ts("2025-09-05T19:31:00.000000001Z"),
        meta=m("orders"),
    )
    out = []
    for name, order, hashed in (("typical", typical, True), ("minimal", minimal, False),
                                ("edge", edge, False)):
        coid = order.client_order_id
        out.append(Spec(f"orders/{name}.json", topic, order, fqdn, coid, who,
                        extra={"dedupe_key": coid}, schema_hash=hashed))
    return out


def fill(i: int, coid: str, price: str, qty: str) -> fills_pb2.FillEvent:
    return fills_pb2.FillEvent(
        account_id=ACCOUNT,
        client_order_id=coid,
        broker_order_id="8c1e9a52-3f1d-4b1e-9d7e-5b6a2f0c9e11",
        security=sec(*AAPL),
        price=dec(price),
        quantity=dec(qty),
        venue="XNAS",
        event_time=ts_of(utc(2025, 9, 5, 19, 31, 2) + dt.timedelta(milliseconds=7 * i)),
        meta=m("fills"),
    )


def fills_payloads() -> list[Spec]:
    who = PRODUCERS["fills"]
    topic = "ampy.prod.fills.v1.events"
    coid = "co_20250905_001"
    typical = fill(0, coid, "191.2400", "60")
    minimal = fills_pb2.FillEvent(
        account_id=ACCOUNT, client_order_id="co_20250905_002",
        price=dec("505.10"), quantity=dec("10"),
    )
    # 150 one-share partial fills of a single order, in a batch.
    edge = fills_pb2.FillBatch(
        fills=[fill(i, coid, f"{PyDecimal('191.2400') - PyDecimal(i % 5) / 100:.4f}", "1")
               for i in range(150)]
    )
    return [
        Spec("fills/typical.json", topic, typical, "ampy.fills.v1.FillEvent",
             f"{ACCOUNT}|{coid}", who),
        Spec("fills/minimal.json", topic, minimal, "ampy.fills.v1.FillEvent",
             f"{ACCOUNT}|co_20250905_002", who),
        Spec("fills/edge.json", topic, edge, "ampy.fills.v1.FillBatch", f"{ACCOUNT}|{coid}", who),
    ]


def positions_payloads() -> list[Spec]:
    who = PRODUCERS["positions"]
    topic = "ampy.prod.positions.v1.snapshots"
    key = f"{ACCOUNT}|AAPL.XNAS"
    typical = positions_pb2.PositionBatch(
        positions=[
            positions_pb2.PositionSnapshot(
                account_id=ACCOUNT,
                security=sec(*AAPL),
                quantity=dec("100"),
                avg_price=dec("191.2450"),
                unrealized_pnl=money("116.50", "USD"),
                realized_pnl=money("0.00", "USD"),
                as_of=ts("2025-09-05T19:35:00Z"),
                meta=m("positions"),
            )
        ]
    )
    minimal = positions_pb2.PositionSnapshot(
        account_id=ACCOUNT, security=sec("AAPL", "XNAS"), quantity=dec("100")
    )
    # A short position with huge P&L swings, snapshotted every minute.
    edge = positions_pb2.PositionBatch()
    for i in range(120):
        edge.positions.append(
            positions_pb2.PositionSnapshot(
                account_id=ACCOUNT,
                security=sec(*AAPL),
                quantity=dec(f"-{1_000_000 + i}.000001"),
                avg_price=dec("191.245012345678"),
                unrealized_pnl=money(f"-{987_654_321 + i}.987654321", "USD"),
                realized_pnl=money(f"{i}.5", "USD"),
                as_of=ts_of(utc(2025, 9, 5, 13, 30) + dt.timedelta(minutes=i)),
            )
        )
    return [
        Spec("positions/typical.json", topic, typical, "ampy.positions.v1.PositionBatch",
             key, who),
        Spec("positions/minimal.json", topic, minimal, "ampy.positions.v1.PositionSnapshot",
             key, who),
        Spec("positions/edge.json", topic, edge, "ampy.positions.v1.PositionBatch", key, who),
    ]


def metrics_payloads() -> list[Spec]:
    who = PRODUCERS["metrics"]
    fqdn = "ampy.metrics.v1.MetricBatch"
    topic = "ampy.prod.metrics.v1.ampy-oms"
    typical = metrics_pb2.MetricBatch(
        metrics=[
            metrics_pb2.Metric(
                name="oms.order_rejects",
                labels={"reason": "risk_limit", "venue": "XNAS", "env": "prod"},
                value=3.0,
                at=ts("2025-09-05T19:31:00Z"),
            )
        ]
    )
    minimal = metrics_pb2.MetricBatch(
        metrics=[metrics_pb2.Metric(name="oms.order_rejects", value=1.0)]
    )
    # Non-finite and extreme doubles, many labels, unicode label values.
    labels = {f"label_{i:02d}": f"value-{i}-\u00fc\u2713" for i in range(40)}
    edge = metrics_pb2.MetricBatch(
        metrics=[
            metrics_pb2.Metric(name="oms.order_latency_ms", labels=labels, value=value,
                               at=ts("2025-09-05T19:31:00.5Z"))
            for value in (float("nan"), float("inf"), float("-inf"), 1.7976931348623157e308,
                          5e-324, -0.5)
        ]
    )
    return [
        Spec("metrics/typical.json", topic, typical, fqdn, "ampy-oms|oms.order_rejects", who),
        Spec("metrics/minimal.json", topic, minimal, fqdn, "ampy-oms|oms.order_rejects", who),
        Spec("metrics/edge.json", topic, edge, fqdn, "ampy-oms|oms.order_latency_ms", who),
    ]


def dlq_specs() -> list[tuple[Spec, dict[str, str]]]:
    """The three DLQ envelopes: (original message, DLQ-only headers)."""
    bars_who = PRODUCERS["bars"]
    # Field 1 claims 16 bytes but only 6 follow: not a valid BarBatch.
    truncated = b"\x0a\x10\x0a\x04AAPL\x12\x00"
    decode = Spec(
        "dlq/decode_error.json", "ampy.prod.bars.v1.XNAS.AAPL", truncated,
        "ampy.bars.v1.BarBatch", "XNAS.AAPL", bars_who,
    )
    order = orders_pb2.OrderRequest(
        account_id=ACCOUNT,
        client_order_id="co_20250905_004",
        security=sec("NVDA", "XNAS"),
        side=common_pb2.SIDE_BUY,
        order_type=common_pb2.ORDER_TYPE_LIMIT,
        tif=common_pb2.TIME_IN_FORCE_DAY,
        quantity=dec("20000"),
        limit_price=dec("125.00"),
        created_at=ts("2025-09-05T19:40:00Z"),
        meta=m("orders"),
    )
    handler = Spec(
        "dlq/handler_error.json", "ampy.prod.orders.v1.requests", order,
        "ampy.orders.v1.OrderRequest", "co_20250905_004", PRODUCERS["orders"],
        extra={"dedupe_key": "co_20250905_004"},
    )
    retried = Spec(
        "dlq/max_retries.json", "ampy.prod.fills.v1.events",
        fill(1, "co_20250905_001", "191.2500", "40"), "ampy.fills.v1.FillEvent",
        f"{ACCOUNT}|co_20250905_001", PRODUCERS["fills"],
    )
    return [
        (decode, {
            "dlq_reason": "decode_error: payload does not decode as ampy.bars.v1.BarBatch "
                          "(length-delimited field 1 runs past the end of the buffer)",
            "dlq_consumer": "ampy-bars-writer@store-1",
            "retry_count": "0",
        }),
        (handler, {
            "dlq_reason": "handler_error: risk check failed: notional 2500000.00 USD "
                          "exceeds limit 1000000.00 USD",
            "dlq_consumer": "ampy-oms-risk@risk-2",
            "retry_count": "2",
        }),
        (retried, {
            "dlq_reason": "max_retries: 5 deliveries failed; last error: positions store "
                          "timeout after 30s",
            "dlq_consumer": "ampy-positions@ledger-1",
            "retry_count": "5",
        }),
    ]


# --------------------------------------------------------------------------
# Envelope assembly
# --------------------------------------------------------------------------


class Clock:
    """Hands out strictly increasing, deterministic times."""

    def __init__(self) -> None:
        self.now = CLOCK_START

    def tick(self) -> dt.datetime:
        current = self.now
        self.now += CLOCK_STEP
        return current


def fmt_time(when: dt.datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def digest(label: str) -> bytes:
    return hashlib.sha256(f"ampybus-golden:{label}".encode()).digest()


def uuid7(when: dt.datetime, label: str) -> str:
    """A UUIDv7 for ``when`` whose random bits derive from ``label``."""
    ms = (when - EPOCH) // dt.timedelta(milliseconds=1)
    rand = digest(f"uuid:{label}")
    raw = bytearray(16)
    raw[0:6] = ms.to_bytes(6, "big")
    raw[6] = 0x70 | (rand[0] & 0x0F)
    raw[7] = rand[1]
    raw[8] = 0x80 | (rand[2] & 0x3F)
    raw[9:16] = rand[3:10]
    return str(uuid.UUID(bytes=bytes(raw)))


def trace_ids(label: str) -> tuple[str, str]:
    raw = digest(f"trace:{label}").hex()
    return raw[:32], raw[32:48]


def sort_keys(value: Any) -> Any:
    """A JSON value with every object's keys sorted (canonical form)."""
    if isinstance(value, dict):
        return {k: sort_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sort_keys(v) for v in value]
    return value


def payload_bytes(payload: Message | bytes) -> bytes:
    if isinstance(payload, bytes):
        return payload
    data: bytes = payload.SerializeToString(deterministic=True)
    return data


def build(spec: Spec, clock: Clock, dlq: dict[str, str] | None = None) -> dict[str, Any]:
    """The envelope JSON object for ``spec`` (a DLQ envelope if ``dlq``)."""
    when = clock.tick()
    raw = payload_bytes(spec.payload)
    carried = raw
    headers = {
        "message_id": uuid7(when, spec.path),
        "schema_fqdn": spec.fqdn,
        "schema_version": SCHEMA_VERSION,
        "content_type": CONTENT_TYPE,
        "produced_at": fmt_time(when),
        "producer": spec.who.producer,
        "source": spec.who.source,
        "run_id": spec.who.run_id,
        "partition_key": spec.partition_key,
    }
    trace_id, span_id = trace_ids(spec.path)
    headers["traceparent"] = f"00-{trace_id}-{span_id}-01"
    headers["trace_id"] = trace_id
    headers["span_id"] = span_id
    if len(raw) > GZIP_THRESHOLD:
        headers["content_encoding"] = "gzip"
        carried = gzip.compress(raw, compresslevel=9, mtime=0)
    if spec.schema_hash:
        headers["schema_hash"] = ampy_reflect.nameonly_schema_hash(spec.fqdn)
    headers.update(spec.extra)
    topic = spec.topic
    if dlq is not None:
        domain = spec.topic.split(".")[2]
        topic = f"ampy.prod.dlq.v1.{domain}"
        headers.update(dlq)
        headers["original_topic"] = spec.topic
        headers["dlq_at"] = fmt_time(when + dt.timedelta(seconds=int(dlq["retry_count"]) * 2 + 1))
        headers["payload_hash"] = "sha256:" + hashlib.sha256(carried).hexdigest()
    envelope: dict[str, Any] = {
        "topic": topic,
        "headers": dict(sorted(headers.items())),
        "payload_base64": base64.b64encode(carried).decode("ascii"),
    }
    if not isinstance(spec.payload, bytes):
        assert spec.payload.DESCRIPTOR.full_name == spec.fqdn, spec.path
        envelope["payload_json"] = sort_keys(
            json_format.MessageToDict(spec.payload, preserving_proto_field_name=True)
        )
    return envelope


def render(envelope: dict[str, Any]) -> str:
    return json.dumps(envelope, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------
# Self-check: the publish-side contract rules
# --------------------------------------------------------------------------

TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
UUID7_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")
MIC_RE = r"[A-Z0-9]{4}"
SECURITY_RE = rf"[^|.\s]+(?:\.[^|.\s]+)*\.{MIC_RE}"
KEY_RULES: dict[str, str] = {
    "bars": rf"^{MIC_RE}\.[^|\s]+$",
    "ticks": rf"^{SECURITY_RE}$",
    "corporate_actions": rf"^{SECURITY_RE}$",
    "fx": r"^[A-Z0-9]{3,5}\.[A-Z0-9]{3,5}$",
    "fundamentals": rf"^{SECURITY_RE}\|\d{{4}}-\d{{2}}-\d{{2}}\|[^|\s]+$",
    "signals": rf"^[^|\s]+\|{SECURITY_RE}(?:\|[^|\s]+)?$",
    "orders": r"^[^|\s]+$",
    "fills": r"^[^|\s]+\|[^|\s]+$",
    "positions": rf"^[^|\s]+\|{SECURITY_RE}$",
    "metrics": r"^[^|\s]+\|[^|\s]+$",
    "news": r"^\S+$",
    "universe": r"^\S+$",
}
REQUIRED = (
    "message_id", "schema_fqdn", "schema_version", "content_type", "produced_at",
    "producer", "source", "run_id", "partition_key", "traceparent",
)


def check_topic(topic: str) -> str:
    """Checks the topic taxonomy; returns the domain."""
    tokens = topic.split(".")
    assert len(tokens) >= 5, topic
    assert tokens[0] == "ampy" and tokens[1] in ("dev", "paper", "prod"), topic
    assert tokens[3] == "v1", topic
    for token in tokens:
        assert token and not re.search(r"[\s*>]", token), topic
    return tokens[2]


def check_envelope(path: str, env: dict[str, Any]) -> None:
    """Asserts every publish-side rule the golden files promise."""
    assert list(env) == ["topic", "headers", "payload_base64"] + (
        ["payload_json"] if "payload_json" in env else []
    ), path
    headers: dict[str, str] = env["headers"]
    assert all(isinstance(v, str) for v in headers.values()), path
    for name in REQUIRED:
        assert headers.get(name), f"{path}: {name}"
    for name in ("producer", "source", "run_id", "dedupe_key", "dlq_consumer"):
        if name in headers:
            value = headers[name]
            assert value and value == value.strip() and value.isprintable(), f"{path}: {name}"
    domain = check_topic(env["topic"])
    assert UUID7_RE.match(headers["message_id"]), path
    produced = dt.datetime.strptime(headers["produced_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    produced_ms = (produced.replace(tzinfo=dt.timezone.utc) - EPOCH) // dt.timedelta(
        milliseconds=1
    )
    assert int(headers["message_id"].replace("-", "")[:12], 16) == produced_ms, path
    assert headers["schema_version"] == SCHEMA_VERSION and headers["content_type"] == CONTENT_TYPE
    assert TIME_RE.match(headers["produced_at"]), path
    trace = TRACEPARENT_RE.match(headers["traceparent"])
    assert trace and set(trace[1]) != {"0"} and set(trace[2]) != {"0"}, path
    assert headers["trace_id"] == trace[1] and headers["span_id"] == trace[2], path
    carried = base64.b64decode(env["payload_base64"], validate=True)
    if headers.get("content_encoding") is not None:
        assert headers["content_encoding"] == "gzip", path
        raw = gzip.decompress(carried)
        assert len(raw) > GZIP_THRESHOLD, path
    else:
        raw = carried
        assert len(raw) <= GZIP_THRESHOLD, path
    key = headers["partition_key"]
    if domain == "dlq":
        payload_domain = headers["original_topic"].split(".")[2]
        assert env["topic"] == f"ampy.prod.dlq.v1.{payload_domain}", path
        assert check_topic(headers["original_topic"]) == payload_domain
        assert re.match(r"^(decode_error|handler_error|max_retries): \S", headers["dlq_reason"])
        assert re.match(r"^\d+$", headers["retry_count"]), path
        assert TIME_RE.match(headers["dlq_at"]) and headers["dlq_at"] > headers["produced_at"]
        assert headers["payload_hash"] == "sha256:" + hashlib.sha256(carried).hexdigest()
    else:
        payload_domain = domain
    assert re.match(KEY_RULES[payload_domain], key), f"{path}: partition_key {key!r}"
    assert len(key) <= 256 and not re.search(r"\s", key), path
    if "schema_hash" in headers:
        assert headers["schema_hash"] == ampy_reflect.nameonly_schema_hash(headers["schema_fqdn"])
    cls = ampy_reflect.message_class(headers["schema_fqdn"])
    if "payload_json" in env:
        msg = cls.FromString(raw)
        assert msg.SerializeToString(deterministic=True) == raw, path
        assert json_format.ParseDict(env["payload_json"], cls()) == msg, path
        check_key_agrees(payload_domain, key, headers, json_format.MessageToDict(
            msg, preserving_proto_field_name=True))
    else:
        try:
            cls.FromString(raw)
        except Exception:  # the point of this fixture: it must not decode
            pass
        else:
            raise AssertionError(f"{path}: payload without payload_json decodes")


def check_key_agrees(
    domain: str, key: str, headers: dict[str, str], payload: dict[str, Any]
) -> None:
    """The partition (and dedupe) key must be derived from the payload.

    ``payload`` is the JSON of a single record or of a ``*Batch`` (one
    repeated field); every record of a batch must agree with the key.
    """
    values = list(payload.values())
    batch = len(values) == 1 and isinstance(values[0], list)
    items: list[dict[str, Any]] = values[0] if batch else [payload]

    def security(item: dict[str, Any]) -> tuple[str, str]:
        s = item["security"]
        return s["symbol"], s["mic"]

    for item in items:
        if domain == "bars":
            symbol, mic = security(item)
            assert key == f"{mic}.{symbol}"
        elif domain == "ticks":
            symbol, mic = security(next(iter(item.values())))
            assert key == f"{symbol}.{mic}"
        elif domain == "corporate_actions":
            symbol, mic = security(next(iter(item.values())))
            assert key == f"{symbol}.{mic}"
        elif domain == "news":
            assert key == item["id"] and headers.get("dedupe_key", key) == key
        elif domain == "fx":
            assert key == f"{item['pair']['base']}.{item['pair']['quote']}"
        elif domain == "fundamentals":
            symbol, mic = security(item)
            ends = {line["period_end"][:10] for line in item["lines"] if "period_end" in line}
            assert ends and all(key == f"{symbol}.{mic}|{end}|{item['source']}" for end in ends)
        elif domain == "universe":
            assert key == item["universe_id"]
        elif domain == "signals":
            symbol, mic = security(item)
            base = f"{item['model_id']}|{symbol}.{mic}"
            assert key in (base, f"{base}|{item.get('horizon', '')}")
        elif domain == "orders":
            assert key == item["client_order_id"] == headers["dedupe_key"]
        elif domain == "fills":
            assert key == f"{item['account_id']}|{item['client_order_id']}"
        elif domain == "positions":
            symbol, mic = security(item)
            assert key == f"{item['account_id']}|{symbol}.{mic}"
        elif domain == "metrics":
            service = key.split("|")[0]
            assert key == f"{service}|{item['name']}"
        else:
            raise AssertionError(domain)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

DOMAIN_BUILDERS: dict[str, Callable[[], list[Spec]]] = {
    "bars": bars_payloads,
    "ticks": ticks_payloads,
    "fundamentals": fundamentals_payloads,
    "news": news_payloads,
    "fx": fx_payloads,
    "corporate_actions": corporate_actions_payloads,
    "universe": universe_payloads,
    "signals": signals_payloads,
    "orders": orders_payloads,
    "fills": fills_payloads,
    "positions": positions_payloads,
    "metrics": metrics_payloads,
}


def generate() -> dict[str, str]:
    """Every golden file: relative path -> file text."""
    clock = Clock()
    files: dict[str, str] = {}
    for domain in PAYLOAD_DOMAINS:
        specs = DOMAIN_BUILDERS[domain]()
        assert [s.path for s in specs] == [
            f"{domain}/{n}.json" for n in ("typical", "minimal", "edge")
        ]
        for spec in specs:
            files[spec.path] = render(build(spec, clock))
    for spec, dlq in dlq_specs():
        files[spec.path] = render(build(spec, clock, dlq))
    previous = ""
    for path, text in files.items():
        env = json.loads(text)
        check_envelope(path, env)
        # Generation order is also message-id (time) order.
        assert env["headers"]["message_id"] > previous, path
        previous = env["headers"]["message_id"]
    for name in ("bars", "ticks", "news"):
        assert json.loads(files[f"{name}/edge.json"])["headers"]["content_encoding"] == "gzip"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the files on disk instead of writing them")
    args = parser.parse_args()
    files = generate()
    stale = []
    for rel, text in files.items():
        path = GOLDEN_DIR / rel
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    if stale:
        print("stale golden files: " + ", ".join(stale), file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'wrote'} {len(files)} golden files under {GOLDEN_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
