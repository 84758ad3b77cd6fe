"""Exceptions raised by cachesync.

Two families, as in h11: errors that say the caller misused the library
(:class:`UsageError` and its subclasses, all also ``ValueError``/``TypeError``)
and errors that say a server did not keep its side of the contract
(:class:`CacheUnavailableError`, :class:`InvalidationError`).
"""

from __future__ import annotations

from collections.abc import Iterable


class CachesyncError(Exception):
    """Base class of every exception cachesync raises."""


class UsageError(CachesyncError, ValueError):
    """The caller passed something cachesync cannot accept."""


class ConfigError(UsageError):
    """An option has a bad value; the message names the option."""

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        super().__init__(f"option {option!r}: {problem}")


class UnknownStrategyError(ConfigError):
    """A write strategy name that does not exist."""

    def __init__(self, name: object, known: Iterable[str]) -> None:
        self.name = name
        super().__init__("strategy", f"unknown write strategy {name!r}; known: {', '.join(sorted(known))}")


class InvalidKeyError(UsageError):
    """A cache key that is empty, not a string, or too long."""

    def __init__(self, key: object, problem: str) -> None:
        self.key = key
        super().__init__(f"invalid cache key {key!r}: {problem}")


class SerializationError(UsageError, TypeError):
    """A value that the configured serializer cannot encode (or a payload it cannot decode)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"cannot serialize the value for key {key!r}: {problem}")


class ValueTooLargeError(UsageError):
    """A serialized value larger than the ``max_value_bytes`` option."""

    def __init__(self, key: str, size: int, limit: int) -> None:
        self.key, self.size, self.limit = key, size, limit
        super().__init__(f"value for key {key!r} is {size} bytes serialized; max_value_bytes is {limit}")


class CacheUnavailableError(CachesyncError, ConnectionError):
    """Redis could not be reached (or timed out); the message names the URL without its password."""

    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        self.url = url
        msg = f"Redis at {url} is unreachable"
        if cause is not None:
            msg += f": {type(cause).__name__}: {cause}"
        super().__init__(msg)


class InvalidationError(CachesyncError):
    """An invalidation could not be applied; the message names every key that is still to be invalidated.

    The keys are never silently dropped: the caller must retry (or record them in
    the transactional outbox, which retries by itself).
    """

    def __init__(self, keys: Iterable[str], cause: BaseException | None = None) -> None:
        self.keys = list(keys)
        msg = f"invalidation of {len(self.keys)} key(s) failed, still to invalidate: {self.keys!r}"
        if cause is not None:
            msg += f" ({type(cause).__name__}: {cause})"
        super().__init__(msg)


class RedisCommandError(CachesyncError):
    """Redis answered a command with an error reply that cachesync could not handle (not a connection problem)."""

    def __init__(self, url: str, cause: BaseException) -> None:
        self.url = url
        super().__init__(f"Redis at {url} refused a command: {cause}")


class CorruptEntryError(CachesyncError):
    """A stored entry cannot be read (undecodable value, non-numeric field, foreign Redis type).

    The read flows repair such entries (delete, count in ``stats["corrupt_entries"]``, read as a miss); this is
    raised only where no repair is possible."""
