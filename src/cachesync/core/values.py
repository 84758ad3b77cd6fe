"""Values the protocol hands out and checks: ``NOT_FOUND``, ``Versioned``, ``Entry``, versions, keys, tokens."""

from __future__ import annotations

import datetime as _dt
import decimal
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
import enum
import logging
from typing import Any, Final, Generic, TypeVar, cast

from ..errors import UsageError
from ..errors import BadDataError, CorruptEntryError
from .keys import check_key

log = logging.getLogger("cachesync")
class NotFound(enum.Enum):
    """The type of :data:`NOT_FOUND` (usable in ``isinstance`` and ``Literal[NotFound.NOT_FOUND]``)."""

    NOT_FOUND = "NOT_FOUND"

    def __repr__(self) -> str:
        return "NOT_FOUND"

    def __bool__(self) -> bool:
        return False


NOT_FOUND: Final = NotFound.NOT_FOUND
"""Return this from a loader when the row does not exist; ``get`` returns it for a negative entry."""

MISSING: Any = object()


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Versioned(Generic[T]):
    """A loader's (or writer's) value with its version: ``return Versioned(row, row.version)``.

    ``version`` is an int, float, Decimal, datetime or a numeric string
    (compared numerically in Redis, exact up to 2**53).
    """

    value: T
    version: Any


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    """What a read returns in full (``get_entry``)."""

    value: T | NotFound
    """The value, or ``NOT_FOUND``."""
    version: int | float | None = None
    stale: bool = False
    """True when a stale-marked value was served (``serve_stale``)."""
    source: str = "cache"
    """``"cache"``, ``"loader"`` (this call loaded it) or ``"fallback"`` (Redis was down)."""
    filled: bool = False
    """For ``source="loader"``: whether Redis accepted the write-back."""

    @property
    def found(self) -> bool:
        return self.value is not NOT_FOUND


_TOKENS = itertools.count(1)
_PREFIX = os.urandom(8).hex()


def _reseed_tokens() -> None:
    """A forked child draws a new random prefix: workers forked after ``import cachesync`` (gunicorn
    ``--preload``, uWSGI, Celery prefork, multiprocessing with fork) never share the parent's token sequence,
    so one worker's voided lease can never be filled through another worker's identical token."""
    global _TOKENS, _PREFIX
    _TOKENS = itertools.count(1)
    _PREFIX = os.urandom(8).hex()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_tokens)


def new_token() -> str:
    """A lease token unique across processes, forked ones included (random per-process prefix + counter)."""
    return f"{_PREFIX}{next(_TOKENS):x}"


MAX_EXACT_VERSION = 2**53
"""Largest integer version the Lua scripts compare exactly (Lua numbers are doubles); larger ones are refused."""

_NUMERIC = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)  # ASCII digits: what Lua reads


def encode_version(v: Any) -> str:
    """A version as the decimal string the Lua scripts compare numerically ("" for None).

    Refused with :class:`UsageError` naming the value: bools, NaN and infinities (float, Decimal or string),
    integers beyond +-2**53 (they would compare inexactly in Redis), and anything not numeric.
    """
    if v is None:
        return ""
    if isinstance(v, bool):
        raise UsageError(f"version must be a number or datetime, not bool ({v!r})")
    if isinstance(v, int):
        if abs(v) > MAX_EXACT_VERSION:
            raise UsageError(f"version {v!r} is beyond +-2**53, which Redis cannot compare exactly")
        return str(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise UsageError(f"version must be finite, got {v!r}")
        if abs(v) > MAX_EXACT_VERSION:
            raise UsageError(f"version {v!r} is beyond +-2**53, which Redis cannot compare exactly")
        return repr(v)
    if isinstance(v, decimal.Decimal):
        if not v.is_finite():
            raise UsageError(f"version must be finite, got {v!r}")
        if abs(v) > MAX_EXACT_VERSION:
            raise UsageError(f"version {v!r} is beyond +-2**53, which Redis cannot compare exactly")
        return str(v)
    if isinstance(v, _dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=_dt.UTC)
        us = int(v.timestamp() * 1_000_000)
        if abs(us) > MAX_EXACT_VERSION:  # after the year 2255 (epoch microseconds beyond 2**53)
            raise UsageError(f"version {v!r} is beyond +-2**53 epoch microseconds, which Redis cannot compare "
                             "exactly")
        return str(us)
    if isinstance(v, str):
        if not _NUMERIC.fullmatch(v):
            raise UsageError(f"version string must be a finite decimal number, got {v[:40]!r}")
        if abs(float(v)) > MAX_EXACT_VERSION:
            raise UsageError(f"version {v[:40]!r} is beyond +-2**53, which Redis cannot compare exactly")
        return v
    raise UsageError(f"version must be int, float, Decimal, datetime or a numeric string, not {type(v).__name__}")


CorruptEntry = CorruptEntryError
"""Raised inside a flow when a stored entry cannot be read (a foreign or damaged field); the flows repair it."""


def decode_version(b: bytes | str | None) -> int | float | None:
    """A stored version field as a number; :class:`CorruptEntry` when the field is not numeric."""
    if b is None:
        return None
    try:
        s = b.decode() if isinstance(b, bytes) else b
        try:
            return int(s)
        except ValueError:
            f = float(s)
            if f != f or f in (float("inf"), float("-inf")):
                raise ValueError(s) from None
            return f
    except (ValueError, UnicodeDecodeError):
        raise CorruptEntry(f"version field {b[:40]!r} is not a number") from None


def checked_version(v: Any) -> str:
    """A version read from outside (a message, an outbox row, a replication event) as the decimal string the
    scripts compare: ints, finite floats, Decimals, datetimes (epoch microseconds, as
    :func:`encode_version`) and finite numeric strings; raises
    :class:`~cachesync.errors.BadDataError` naming the value otherwise (``"abc"``, ``"nan"``, bytes, lists...)."""
    if isinstance(v, (bytes, bytearray)):
        try:
            v = bytes(v).decode("ascii")
        except UnicodeDecodeError:
            raise BadDataError(f"version {bytes(v)[:40]!r} is not a number") from None
    try:
        s = encode_version(v)
    except UsageError as e:
        raise BadDataError(f"version {v!r:.80} is not a number: {e}") from None
    try:
        f = float(s)
    except (ValueError, OverflowError):
        raise BadDataError(f"version {v!r:.80} is not a number") from None
    if not math.isfinite(f):
        raise BadDataError(f"version {v!r:.80} is not a finite number")
    return s


def checked_keys(keys: Any, max_key_bytes: int) -> list[str]:
    """Keys read from outside, validated as the cache will (a list of non-empty strings of at most
    ``max_key_bytes`` UTF-8 bytes); raises :class:`~cachesync.errors.BadDataError` naming the first bad one."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, (list, tuple)):
        raise BadDataError(f"keys must be a list of keys, not {type(keys).__name__} {keys!r:.80}")
    for k in keys:
        try:
            check_key(k, max_key_bytes)
        except UsageError as e:
            raise BadDataError(str(e)) from None
    return list(keys)


# --------------------------------------------------------------------------- key arguments


def key_list(keys: object, fn: str) -> list[str]:
    """An iterable of keys as a list; a single string (which would be read character by character) is refused."""
    if isinstance(keys, (str, bytes, bytearray, memoryview)):
        shown = keys[:40] if isinstance(keys, str) else bytes(keys[:40])
        raise UsageError(f"{fn}() takes an iterable of keys, not the single string {shown!r}: wrap it in a list")
    try:
        return list(cast("Iterable[str]", keys))
    except TypeError:
        raise UsageError(f"{fn}() takes an iterable of keys, got {type(keys).__name__}") from None


def star_keys(keys: Sequence[object], fn: str) -> None:
    """Keys given as ``fn(*keys)``: a list or tuple passed as one argument is refused with a clear message."""
    for k in keys:
        if isinstance(k, (list, tuple, set, frozenset, dict)):
            raise UsageError(f"{fn}() takes keys as separate arguments, got a {type(k).__name__}: "
                             f"call {fn}(*keys)")


def not_found_answer(not_found: Any) -> Callable[[], Any]:
    """What a ``cached`` wrapper does for a ``NOT_FOUND`` result: raise ``not_found`` when it is an exception
    (instance or class), call it when it is another callable (its result is the answer, as in
    :mod:`cachesync.contrib.fastapi`), else return it."""
    if isinstance(not_found, BaseException):
        def raise_it() -> Any:  # the same instance each time: its traceback reset, so it never grows
            raise not_found.with_traceback(None)
        return raise_it
    if isinstance(not_found, type) and issubclass(not_found, BaseException):
        def raise_new() -> Any:
            raise not_found()
        return raise_new
    if callable(not_found):
        return cast(Callable[[], Any], not_found)
    return lambda: not_found
