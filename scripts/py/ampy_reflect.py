"""Reflection helpers over the reference ``ampy-proto`` Python package.

Shared by ``cross_lang.py`` (cross-language wire tests) and
``gen_golden.py`` (golden envelopes). Everything here is deterministic: the
same call always builds the same message.
"""

from __future__ import annotations

import hashlib
import importlib
from types import ModuleType
from typing import Iterator

from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

AMPY_PROTO_VERSION = "2.1.1"

# Every package of ampy-proto, in the order used by the Rust crate.
DOMAINS: tuple[str, ...] = (
    "common",
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

# 2025-09-05T09:00:00Z, the base of every generated timestamp.
BASE_SECONDS = 1_757_062_800
# Cycles through the four JSON renderings of Timestamp nanos: 9, 3, 6 and
# 0 fractional digits.
NANOS_CYCLE: tuple[int, ...] = (123_456_789, 120_000_000, 123_456_000, 0)
# Exercises multi-byte UTF-8 (2, 3 and 4 bytes) in every string field.
UNICODE_SUFFIX = "-\u00e9\u2713\U0001f680"


def module(domain: str) -> ModuleType:
    """Imports ``ampy.<domain>.v1.<domain>_pb2``."""
    return importlib.import_module(f"ampy.{domain}.v1.{domain}_pb2")


def message_classes() -> Iterator[tuple[str, type[Message]]]:
    """Yields ``(full name, class)`` for every message of every package.

    Files in ``DOMAINS`` order, messages in declaration order; synthetic map
    entry types are skipped.
    """
    for domain in DOMAINS:
        file_desc = module(domain).DESCRIPTOR
        for desc in file_desc.message_types_by_name.values():
            yield from _walk(desc)


def _walk(desc: Descriptor) -> Iterator[tuple[str, type[Message]]]:
    if desc.GetOptions().map_entry:
        return
    yield desc.full_name, GetMessageClass(desc)
    for nested in desc.nested_types:
        yield from _walk(nested)


def message_class(full_name: str) -> type[Message]:
    """The generated class for a fully-qualified ampy message name."""
    for name, cls in message_classes():
        if name == full_name:
            return cls
    raise KeyError(full_name)


def sample(full_name: str, seed: int = 0) -> Message:
    """A deterministic, fully populated instance of ``full_name``."""
    msg = message_class(full_name)()
    populate(msg, seed)
    return msg


class _Counter:
    """Hands out distinct small integers so that sibling fields differ."""

    def __init__(self, start: int) -> None:
        self.value = start

    def next(self) -> int:
        self.value += 1
        return self.value


def populate(msg: Message, seed: int) -> None:
    """Sets every field of ``msg`` to a non-default value.

    Repeated fields get 2 items and maps 2 entries; nested messages are
    populated recursively; for each oneof, branch ``seed % len(branches)``
    is chosen (so the two items of a repeated field take different branches);
    enums take non-zero values; Timestamps are set.
    """
    _populate(msg, seed, _Counter(seed * 1000))


def _populate(msg: Message, seed: int, counter: _Counter) -> None:
    desc = msg.DESCRIPTOR
    if desc.full_name == "google.protobuf.Timestamp":
        assert isinstance(msg, timestamp_pb2.Timestamp)
        n = counter.next()
        msg.seconds = BASE_SECONDS + 61 * n
        msg.nanos = NANOS_CYCLE[n % len(NANOS_CYCLE)]
        return
    chosen = {
        oneof.name: oneof.fields[seed % len(oneof.fields)].name
        for oneof in desc.oneofs
    }
    for field in desc.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen[oneof.name] != field.name:
            continue
        _fill_field(msg, field, seed, counter)


def _is_map(field: FieldDescriptor) -> bool:
    return bool(
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.message_type.GetOptions().map_entry
    )


def _fill_field(
    msg: Message, field: FieldDescriptor, seed: int, counter: _Counter
) -> None:
    name = field.name
    if _is_map(field):
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        container = getattr(msg, name)
        for i in range(2):
            key = scalar_value(key_field, counter.next(), f"{name}_{i}")
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                _populate(container[key], seed + i, counter)
            else:
                container[key] = scalar_value(value_field, counter.next(), name)
    elif field.is_repeated:
        container = getattr(msg, name)
        for i in range(2):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                _populate(container.add(), seed + i, counter)
            else:
                container.append(scalar_value(field, counter.next(), name))
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        child = getattr(msg, name)
        child.SetInParent()
        _populate(child, seed, counter)
    else:
        setattr(msg, name, scalar_value(field, counter.next(), name))


def scalar_value(field: FieldDescriptor, n: int, label: str) -> object:
    """A non-default value for a scalar or enum field, derived from ``n``."""
    t = field.type
    if t in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
    ):
        # Above 2**53: JSON must carry it as a string to stay exact.
        value = 9_007_199_254_740_993 + n
        return -value if n % 2 else value
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return 18_000_000_000_000_000_000 + n
    if t in (
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SFIXED32,
    ):
        # Negative int32 values take 10 bytes on the wire: worth covering.
        return -(1000 + n) if n % 2 else 1000 + n
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return 4_000_000_000 + n
    if t == FieldDescriptor.TYPE_DOUBLE:
        return n + 0.1
    if t == FieldDescriptor.TYPE_FLOAT:
        return n + 0.5
    if t == FieldDescriptor.TYPE_BOOL:
        return True
    if t == FieldDescriptor.TYPE_STRING:
        return f"{label}-{n}{UNICODE_SUFFIX}"
    if t == FieldDescriptor.TYPE_BYTES:
        return bytes([n % 256, 0, 255])
    if t == FieldDescriptor.TYPE_ENUM:
        values = field.enum_type.values
        return values[1 + n % (len(values) - 1)].number
    raise ValueError(f"unsupported field type {t} for {field.full_name}")


def nameonly_schema_hash(full_name: str) -> str:
    """``nameonly:sha256:`` + hex(sha256("fqdn:" + full_name))."""
    digest = hashlib.sha256(f"fqdn:{full_name}".encode()).hexdigest()
    return f"nameonly:sha256:{digest}"
