"""Exceptions raised by ampybus: one class per error kind of the Rust core.

Every error raised by the bus is an :class:`AmpybusError`. Its subclass says what went
wrong (the Rust ``ErrorKind``) and its text is exactly the Rust error's message, e.g.
``invalid header: `producer`: must not be empty``. :attr:`AmpybusError.message` is the
part after the kind's prefix and :attr:`AmpybusError.field` the field the Rust core says the
error is about (``Error::field``: for a :class:`HeaderError` the header that broke its rule;
otherwise the option, key or token the message names).
"""

from __future__ import annotations

import builtins
import re
from typing import ClassVar, Optional

__all__ = [
    "AmpybusError",
    "TopicError",
    "HeaderError",
    "EnvelopeError",
    "PayloadError",
    "ConfigError",
    "TransportError",
    "TimeoutError",
    "ClosedError",
]

_FIELD = re.compile(r"`([^`]+)`")


class AmpybusError(Exception):
    """Base class of every ampybus error."""

    #: The Rust ``ErrorKind`` label (``"topic"``, ``"header"``, …).
    kind: ClassVar[str] = "error"
    #: The prefix the Rust core writes before the message (``"invalid header"``).
    prefix: ClassVar[str] = ""

    def __init__(self, message: str = "", field: Optional[str] = None) -> None:
        super().__init__(message)
        self._field = field

    @property
    def message(self) -> str:
        """The message without the kind's prefix."""
        text = str(self)
        head = self.prefix + ": "
        return text[len(head):] if self.prefix and text.startswith(head) else text

    @property
    def field(self) -> Optional[str]:
        """The field the error is about, as the Rust core gave it; for an error raised by
        Python code with a message only, the first name in backticks in it."""
        if self._field is not None:
            return self._field
        m = _FIELD.search(str(self))
        return m.group(1) if m else None


class TopicError(AmpybusError):
    """A topic or topic pattern broke the taxonomy rules."""

    kind = "topic"
    prefix = "invalid topic"


class HeaderError(AmpybusError):
    """A header is missing or breaks its rule; :attr:`field` names the header."""

    kind = "header"
    prefix = "invalid header"


class EnvelopeError(AmpybusError):
    """An envelope (JSON or wire form) is malformed as a whole."""

    kind = "envelope"
    prefix = "invalid envelope"


class PayloadError(AmpybusError):
    """The payload cannot be encoded, decoded, inflated or fetched."""

    kind = "payload"
    prefix = "invalid payload"


class ConfigError(AmpybusError):
    """A URL, option or configuration value is invalid."""

    kind = "config"
    prefix = "invalid configuration"


class TransportError(AmpybusError):
    """The broker or log failed or refused the operation."""

    kind = "transport"
    prefix = "transport error"


class TimeoutError(AmpybusError, builtins.TimeoutError):  # noqa: A001 (mirrors the Rust kind)
    """The operation did not finish in time (also a built-in ``TimeoutError``)."""

    kind = "timeout"
    prefix = "timed out"


class ClosedError(AmpybusError):
    """The bus, subscription or message was closed or shut down."""

    kind = "closed"
    prefix = "closed"
