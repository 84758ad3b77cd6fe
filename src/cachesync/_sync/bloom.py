"""The synchronous Bloom filter driver: runs the flows of :mod:`cachesync.core.bloom` on a
:class:`cachesync.Cache`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .. import core as P
from ..core.bloom import BloomCore, add_flow, check_flow, rebuild_flow

if TYPE_CHECKING:
    from .cache import Cache


class BloomFilter:
    """A Bloom filter shared by every process using ``cache``'s Redis and namespace.

    ``BloomFilter(cache, name, expected_items=1_000_000, fp_rate=0.01, rebuild_timeout=600.0)``.
    """

    def __init__(self, cache: Cache, name: str, expected_items: int = 1_000_000, fp_rate: float = 0.01,
                 rebuild_timeout: float = 600.0) -> None:
        self.cache = cache
        self.core = BloomCore(cache.options.namespace, name, expected_items, fp_rate, rebuild_timeout)

    def add(self, *items: object) -> bool:
        """Set the bits of ``items`` (call before committing new rows: a rolled-back id is only a false positive). False if the filter is not built yet."""
        return self.cache.run(add_flow(self.core, items))

    def might_contain_many(self, items: Iterable[object]) -> list[bool]:
        """For each item: False = certainly absent, True = maybe present (also when there is no filter yet
        or Redis is unreachable)."""
        return self.cache.run(check_flow(self.core, list(items)))

    def might_contain(self, item: object) -> bool:
        """False = certainly absent; True = maybe present."""
        return self.might_contain_many([item])[0]

    def rebuild(self, items: Iterable[object]) -> bool:
        """Build a new filter from ``items`` (e.g. every id in the table) and swap it in with RENAME."""
        return self.cache.run(rebuild_flow(self.core, items))

    def guard(self, item: object, loader: Callable[[], Any]) -> Callable[[], Any]:
        """A loader that answers ``NOT_FOUND`` without calling ``loader`` when ``item`` is certainly absent:
        ``cache.get(f"user:{uid}", users.guard(uid, lambda: load_user(uid)))``."""
        def guarded() -> Any:
            return loader() if self.might_contain(item) else P.NOT_FOUND
        return guarded

    def get(self, item: object, key: str, loader: Callable[[], Any], ttl: float | None = None) -> Any:
        """``NOT_FOUND`` at once (no cache entry, no load) if ``item`` is certainly absent, else ``cache.get``."""
        if not self.might_contain(item):
            return P.NOT_FOUND
        return self.cache.get(key, loader, ttl)
