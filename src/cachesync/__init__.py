"""cachesync: keep Redis (and an in-process L1) consistent with a SQL database.

Start with :class:`Cache` (sync) or :class:`AsyncCache` (asyncio).
"""

from .aio import AsyncCache
from .errors import (
    CacheUnavailableError,
    CachesyncError,
    ConfigError,
    CorruptEntryError,
    InvalidationError,
    InvalidKeyError,
    RedisCommandError,
    SerializationError,
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
]
