"""One place for option checks: every options object and every constructor keyword goes through these.

I/O-free; imports only :mod:`cachesync.errors` and the standard library. Each check returns the value (as
``float``/``int``) or raises a :class:`~cachesync.errors.ConfigError` (or the subclass given as ``error``, e.g.
:class:`~cachesync.errors.OutboxConfigError` so that old ``except OutboxError`` clauses still catch it) naming the
option and the value. Bools are refused where a number is expected (``True`` is an ``int`` in Python), and so
are NaN and infinities.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, TypeVar, cast

from .errors import ConfigError

MAX_SECONDS = 100 * 365 * 86400.0
"""Longest duration or TTL accepted anywhere (100 years): Redis refuses larger expiry times, and a script that
failed on PEXPIRE after writing would leave a value with no expiry."""

T = TypeVar("T")


def _number(name: str, v: object, integer: bool, error: type[ConfigError], what: str) -> float:
    if isinstance(v, bool):
        raise error(name, f"must be {what}, got {v!r}")
    if isinstance(v, int):
        return v
    if not integer and isinstance(v, float) and math.isfinite(v):
        return v
    raise error(name, f"must be {what}, got {v!r}")


def _what(bound: str, integer: bool, seconds: bool, maximum: float | None) -> str:
    kind = "an integer" if integer else "a number of seconds" if seconds else "a number"
    top = "" if maximum is None else f" and <= {maximum:.0f}" + (" (100 years)" if maximum == MAX_SECONDS else "")
    return f"{kind} {bound}{top}"


def positive(name: str, v: object, *, integer: bool = False, seconds: bool = False, maximum: float | None = None,
             error: type[ConfigError] = ConfigError) -> float:
    """``v`` > 0 (and <= ``maximum`` if given); an ``int`` if ``integer``. ``seconds`` only words the message."""
    what = _what("> 0", integer, seconds, maximum)
    n = _number(name, v, integer, error, what)
    if not n > 0 or (maximum is not None and n > maximum):
        raise error(name, f"must be {what}, got {v!r}")
    return n


def non_negative(name: str, v: object, *, integer: bool = False, seconds: bool = False,
                 maximum: float | None = None, error: type[ConfigError] = ConfigError) -> float:
    """``v`` >= 0 (and <= ``maximum`` if given); an ``int`` if ``integer``."""
    what = _what(">= 0", integer, seconds, maximum)
    n = _number(name, v, integer, error, what)
    if not n >= 0 or (maximum is not None and n > maximum):
        raise error(name, f"must be {what}, got {v!r}")
    return n


def between(name: str, v: object, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
            error: type[ConfigError] = ConfigError) -> float:
    """A number in the interval from ``low`` to ``high`` (closed unless ``low_open``/``high_open``)."""
    what = f"a number {'>' if low_open else '>='} {low:g} and {'<' if high_open else '<='} {high:g}"
    n = _number(name, v, False, error, what)
    if (n <= low if low_open else n < low) or (n >= high if high_open else n > high):
        raise error(name, f"must be {what}, got {v!r}")
    return n


def seconds(name: str, v: object, *, zero: bool = False, error: type[ConfigError] = ConfigError) -> float:
    """A duration: a finite number of seconds > 0 (>= 0 with ``zero``) and at most :data:`MAX_SECONDS`; as float."""
    check = non_negative if zero else positive
    return float(check(name, v, seconds=True, maximum=MAX_SECONDS, error=error))


def number(name: str, v: object, *, error: type[ConfigError] = ConfigError) -> float:
    """Any finite number (a delay or timeout that the caller clamps itself)."""
    return _number(name, v, False, error, "a finite number")


def boolean(name: str, v: object, *, error: type[ConfigError] = ConfigError) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(v, bool):
        raise error(name, f"must be True or False, got {v!r}")
    return v


def one_of(name: str, v: T, choices: Iterable[T], *, error: type[ConfigError] = ConfigError) -> T:
    """``v`` is one of ``choices``."""
    options = list(choices)
    if isinstance(v, bool) or v not in options:
        raise error(name, f"must be one of {', '.join(repr(c) for c in options)}, got {v!r}")
    return v


def options_from(cls: type[T], options: T | None, kwargs: dict[str, object], *,
                 error: type[ConfigError] = ConfigError) -> T:
    """A component's options object: ``options`` as given, else ``cls(**kwargs)`` (a frozen dataclass validated in
    its ``__post_init__``). Both at once, an ``options`` of the wrong type or an unknown keyword raise ``error``."""
    if options is not None:
        if kwargs:
            raise error("options", f"pass either options= or the option keywords ({', '.join(sorted(kwargs))}), "
                                   "not both")
        if not isinstance(options, cls):
            raise error("options", f"must be a {cls.__name__}, got {type(options).__name__}")
        return options
    known = {f.name for f in dataclasses.fields(cast(Any, cls))}  # cls is a dataclass
    for k in kwargs:
        if k not in known:
            raise error(k, f"unknown option; known options: {', '.join(sorted(known))}")
    return cls(**kwargs)


def callable_or_none(name: str, v: object, *, error: type[ConfigError] = ConfigError) -> None:
    """``None`` or a callable (a hook)."""
    if v is not None and not callable(v):
        raise error(name, f"must be None or a callable, got {type(v).__name__}")


__all__ = ["MAX_SECONDS", "between", "boolean", "callable_or_none", "non_negative", "number", "one_of", "options_from", "positive", "seconds"]
