"""cachesync: keep Redis (and an in-process L1) consistent with a SQL database.

Start with :class:`Cache` (sync) or :class:`AsyncCache` (asyncio).

The names below are imported on first use (PEP 562): ``import cachesync`` loads only the exceptions, so that
``import cachesync.core`` (the protocol, no I/O) does not pull in redis-py, asyncio or the daemons.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BadDataError,
    CacheUnavailableError,
    CachesyncError,
    ConfigError,
    CorruptEntryError,
    DatabaseUnavailableError,
    InvalidationError,
    InvalidKeyError,
    RedisCommandError,
    SerializationError,
    ServiceError,
    ServiceUnavailableError,
    UnknownStrategyError,
    UsageError,
    ValueTooLargeError,
)

if TYPE_CHECKING:
    from ._async.bloom import AsyncBloomFilter
    from ._async.cache import AsyncCache
    from ._async.refresh import AsyncRefreshAhead, AsyncRefresher
    from ._sync.bloom import BloomFilter
    from ._sync.cache import Cache
    from ._sync.refresh import RefreshAhead, Refresher
    from .audit import AuditOptions
    from .bus.options import WorkerOptions
    from .cdc.options import CdcOptions
    from .core import NOT_FOUND, STRATEGIES, Entry, NotFound, Strategy, Versioned
    from .core.l1 import L1Options
    from .core.options import CacheOptions
    from .core.refresh import RefreshOptions
    from .outbox.options import RelayOptions
    from .writepath import AsyncWritePath, WritePath

_LAZY = {
    "Cache": "cachesync._sync.cache", "AsyncCache": "cachesync._async.cache",
    "BloomFilter": "cachesync._sync.bloom", "AsyncBloomFilter": "cachesync._async.bloom",
    "RefreshAhead": "cachesync._sync.refresh", "Refresher": "cachesync._sync.refresh",
    "AsyncRefreshAhead": "cachesync._async.refresh", "AsyncRefresher": "cachesync._async.refresh",
    "NOT_FOUND": "cachesync.core", "STRATEGIES": "cachesync.core", "Entry": "cachesync.core",
    "NotFound": "cachesync.core", "Strategy": "cachesync.core", "Versioned": "cachesync.core",
    "L1Options": "cachesync.core.l1", "CacheOptions": "cachesync.core.options",
    "RefreshOptions": "cachesync.core.refresh",
    "WritePath": "cachesync.writepath", "AsyncWritePath": "cachesync.writepath",
    "AuditOptions": "cachesync.audit", "CdcOptions": "cachesync.cdc.options",
    "RelayOptions": "cachesync.outbox.options", "WorkerOptions": "cachesync.bus.options",
}
"""Public name -> the module that defines it, imported on first use."""


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'cachesync' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def _version() -> str:
    """The installed distribution's version (pyproject.toml is its single source)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cachesync")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__: str = _version()

__all__ = [
    "NOT_FOUND", "NotFound", "STRATEGIES", "AsyncCache", "Cache", "CacheOptions", "CacheUnavailableError",
    "CachesyncError", "ConfigError", "CorruptEntryError", "RedisCommandError", "Entry", "InvalidKeyError",
    "InvalidationError", "SerializationError", "Strategy", "UnknownStrategyError", "UsageError", "ValueTooLargeError",
    "Versioned", "__version__", "AsyncBloomFilter", "AsyncRefreshAhead", "AsyncRefresher", "BloomFilter", "L1Options",
    "RefreshAhead", "RefreshOptions", "Refresher", "AsyncWritePath", "WritePath",
    "AuditOptions", "CdcOptions", "RelayOptions", "WorkerOptions",
    "BadDataError", "DatabaseUnavailableError", "ServiceError", "ServiceUnavailableError",
]
