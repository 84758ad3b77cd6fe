"""FastAPI / Starlette integration (``pip install cachesync[fastapi]``).

::

    cs = CacheSync("redis://127.0.0.1:6379/0", namespace="shop", outbox="orm")   # options as AsyncCache's
    app = FastAPI(lifespan=cs.lifespan)          # or: async with cs.started(): inside your own lifespan

    @app.get("/users/{user_id}")
    @cs.cached("user:{user_id}", ttl=60)          # NOT_FOUND -> 404 (not_found=...)
    async def get_user(user_id: int, session: AsyncSession = Depends(get_session)) -> dict:
        row = await session.get(User, user_id)
        return NOT_FOUND if row is None else Versioned({"id": row.id, ...}, row.version)

    @app.put("/users/{user_id}")
    async def put_user(user_id: int, body: Body, session=Depends(get_session),
                       wp: AsyncWritePath = Depends(cs.write_path)) -> dict:
        async with wp.write(session, f"user:{user_id}") as w: ...   # outbox + commit + invalidate at once

The :class:`~cachesync.AsyncCache` is created when the application starts (inside its event loop: a cache
created at import time is bound to no loop and fails with "Future attached to a different loop") and closed
at shutdown. The decorator never hands :data:`cachesync.NOT_FOUND` to the framework.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal, cast

from starlette.exceptions import HTTPException

from .._async.cache import AsyncCache
from ..errors import UsageError
from ..outbox import Outbox
from ..core import NOT_FOUND
from ..writepath import AsyncWritePath, Durable


class CacheSync:
    """One application's cache. ``CacheSync(redis_url="redis://127.0.0.1:6379/0", *, outbox=None,
    on_invalidation_error="log", **options)``; ``options`` are :class:`cachesync.CacheOptions` fields (and
    ``l1=``) passed to :class:`~cachesync.AsyncCache`. ``outbox`` (an :class:`~cachesync.outbox.Outbox`, or
    ``"triggers"`` / ``"cdc"`` / ``"orm"``) enables :meth:`write_path`; ``on_invalidation_error`` is its option.
    """

    def __init__(self, redis_url: str = "redis://127.0.0.1:6379/0", *, outbox: Outbox | Durable | None = None,
                 on_invalidation_error: Literal["log", "raise"] = "log", **options: Any) -> None:
        self.redis_url = redis_url
        self.options = options
        self.outbox = outbox
        self.on_invalidation_error = on_invalidation_error
        from ..core.options import CacheOptions

        CacheOptions.build(**{k: v for k, v in options.items() if k != "l1"})  # bad options fail at import time
        self._cache: AsyncCache | None = None
        self._wp: AsyncWritePath | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> AsyncCache:
        """Create the cache (in the running loop); idempotent."""
        if self._cache is None:
            self._cache = AsyncCache(self.redis_url, **self.options)
            if self.outbox is not None:
                self._wp = AsyncWritePath(self._cache, self.outbox,
                                          on_invalidation_error=self.on_invalidation_error)
        return self._cache

    async def stop(self) -> None:
        """Close the cache (waits for scheduled delayed steps)."""
        c, self._cache, self._wp = self._cache, None, None
        if c is not None:
            await c.aclose()

    @asynccontextmanager
    async def started(self) -> AsyncIterator[AsyncCache]:
        """``async with cs.started():`` the cache lives for the block (compose with your own lifespan)."""
        cache = await self.start()
        try:
            yield cache
        finally:
            await self.stop()

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """``FastAPI(lifespan=cs.lifespan)`` / ``Starlette(lifespan=cs.lifespan)``; also sets
        ``app.state.cachesync`` to the cache."""
        async with self.started() as cache:
            app.state.cachesync = cache
            yield

    @property
    def cache(self) -> AsyncCache:
        """The running cache; :class:`~cachesync.UsageError` before the application started or after it stopped."""
        if self._cache is None:
            raise UsageError("the cachesync cache is not running: pass lifespan=cs.lifespan to FastAPI()/Starlette() "
                             "(or run inside `async with cs.started():`)")
        return self._cache

    # ------------------------------------------------------------------ dependencies

    async def dependency(self) -> AsyncCache:
        """``cache: AsyncCache = Depends(cs.dependency)``."""
        return self.cache

    async def write_path(self) -> AsyncWritePath:
        """``wp: AsyncWritePath = Depends(cs.write_path)``: the application's :class:`~cachesync.AsyncWritePath`."""
        self.cache  # noqa: B018 - raises when not running
        if self._wp is None:
            raise UsageError("CacheSync(outbox=...) is needed for write_path: an Outbox, or 'triggers' / 'cdc' / "
                             "'orm' when the database or OutboxSync records the changes")
        return self._wp

    # ------------------------------------------------------------------ endpoints

    def cached(self, template: str, ttl: float | None = None, *,
               not_found: int | Callable[[], Any] = 404) -> Callable[[Callable[..., Awaitable[Any]]],
                                                                     Callable[..., Awaitable[Any]]]:
        """Cache an endpoint's result under ``template`` formatted with its parameters (``"user:{user_id}"``).

        The endpoint returns a value, a :class:`~cachesync.Versioned` or :data:`~cachesync.NOT_FOUND`. On
        ``NOT_FOUND`` (loaded or cached negatively) the client gets ``not_found``: an HTTP status (default 404,
        raised as ``HTTPException``) or a callable whose return value is the response (or which raises). The
        signature is kept, so FastAPI still sees the endpoint's parameters and dependencies.
        """
        if not (isinstance(not_found, int) or callable(not_found)):
            raise UsageError(f"not_found={not_found!r} must be an HTTP status code or a callable")

        def deco(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            if not inspect.iscoroutinefunction(fn):
                raise UsageError(f"CacheSync.cached decorates async endpoints; {fn!r} is not one")
            from .._driver import KeyTemplate

            kt = KeyTemplate(template, fn)

            @functools.wraps(fn)
            async def endpoint(*args: Any, **kwargs: Any) -> Any:
                value = await self.cache.get(kt.format(*args, **kwargs), lambda: fn(*args, **kwargs), ttl)
                if value is NOT_FOUND:
                    if isinstance(not_found, int):
                        raise HTTPException(status_code=not_found)
                    return not_found()
                return value

            cast(Any, endpoint).key = kt.format
            return endpoint

        return deco


__all__ = ["CacheSync"]
