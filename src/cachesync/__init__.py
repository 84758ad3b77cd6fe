"""cachesync: keep Redis (and an in-process L1) consistent with a SQL database.

Start with :class:`Cache` (sync) or :class:`AsyncCache` (asyncio).
"""

from .aio import AsyncCache
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
from .bloom import AsyncBloomFilter, BloomFilter
from .l1 import L1Options
from .core.options import CacheOptions
from .refresh import AsyncRefreshAhead, AsyncRefresher, RefreshAhead, Refresher, RefreshOptions
from .core import NOT_FOUND, STRATEGIES, Entry, NotFound, Strategy, Versioned
from .sync import Cache
from .writepath import AsyncWritePath, WritePath

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .audit import AuditOptions
    from .bus.options import WorkerOptions
    from .cdc.options import CdcOptions
    from .outbox.options import RelayOptions

_LAZY = {"AuditOptions": "cachesync.audit", "CdcOptions": "cachesync.cdc.options",
         "RelayOptions": "cachesync.outbox.options", "WorkerOptions": "cachesync.bus.options"}
"""The daemons' options objects, imported on first use (``import cachesync`` does not load the daemons)."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cachesync' has no attribute {name!r}")

def _version() -> str:
    """The installed distribution's version (pyproject.toml is its single source)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cachesync")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__: str = _version()

__all__ = [
    "NOT_FOUND", "NotFound", "STRATEGIES", "AsyncCache", "Cache", "CacheOptions", "CacheUnavailableError", "CachesyncError",
    "ConfigError", "CorruptEntryError", "RedisCommandError", "Entry", "InvalidKeyError", "InvalidationError", "SerializationError", "Strategy",
    "UnknownStrategyError", "UsageError", "ValueTooLargeError", "Versioned", "__version__",
    "AsyncBloomFilter", "AsyncRefreshAhead", "AsyncRefresher", "BloomFilter", "L1Options", "RefreshAhead", "RefreshOptions", "Refresher",
    "AsyncWritePath", "WritePath",
    "AuditOptions", "CdcOptions", "RelayOptions", "WorkerOptions",
    "BadDataError", "DatabaseUnavailableError", "ServiceError", "ServiceUnavailableError",
]
