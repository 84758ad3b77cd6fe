"""The asyncio Bloom filter driver: runs the flows of :mod:`cachesync.core.bloom` on an
:class:`cachesync.AsyncCache`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from .. import core as P
from ..core.bloom import BloomCore, add_flow, check_flow, rebuild_flow

if TYPE_CHECKING:
    from .cache import AsyncCache


class AsyncBloomFilter:
    """:class:`BloomFilter` for a :class:`cachesync.AsyncCache` (same flows, awaited)."""

    def __init__(self, cache: AsyncCache, name: str, expected_items: int = 1_000_000, fp_rate: float = 0.01,
                 rebuild_timeout: float = 600.0) -> None:
        self.cache = cache
        self.core = BloomCore(cache.options.namespace, name, expected_items, fp_rate, rebuild_timeout)

    async def add(self, *items: object) -> bool:
        """See :meth:`BloomFilter.add`."""
        return await self.cache.run(add_flow(self.core, items))

    async def might_contain_many(self, items: Iterable[object]) -> list[bool]:
        """See :meth:`BloomFilter.might_contain_many`."""
        return await self.cache.run(check_flow(self.core, list(items)))

    async def might_contain(self, item: object) -> bool:
        """See :meth:`BloomFilter.might_contain`."""
        return (await self.might_contain_many([item]))[0]

    async def rebuild(self, items: Iterable[object]) -> bool:
        """See :meth:`BloomFilter.rebuild`."""
        return await self.cache.run(rebuild_flow(self.core, items))

    def guard(self, item: object, loader: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
        """See :meth:`BloomFilter.guard`; the guarded loader is a coroutine function (``loader`` may be one)."""
        async def guarded() -> Any:
            if not await self.might_contain(item):
                return P.NOT_FOUND
            got = loader()
            return (await got) if inspect.isawaitable(got) else got
        return guarded

    async def get(self, item: object, key: str, loader: Callable[[], Any], ttl: float | None = None) -> Any:
        """See :meth:`BloomFilter.get`."""
        if not await self.might_contain(item):
            return P.NOT_FOUND
        return await self.cache.get(key, loader, ttl)
