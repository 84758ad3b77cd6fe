"""Kept connections, asyncio: the async cache's ``GET``, ``MGET`` and ``EVALSHA`` on connections it keeps checked
out of its client's pool. The same rules as :mod:`cachesync._sync.conns` (read its doc): a connection goes back on
the free list only after its reply was read whole; a broken socket, a timeout, a cancellation (the watchdog's
bound, a caller's timeout) or an interrupt disconnects it first; a kept connection the server closed while idle
is sent again through ``execute_command``; only a plain pool of no practical size limit, RESP2, not a cluster.
Also: connections belong to the event loop that made them, so a command on another loop starts a free list of
its own (the old loop's connections are never used again).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._driver import client_retries, keep, keepable


def kept(client: Any) -> AsyncKept | None:
    """An :class:`AsyncKept` for ``client``, or None where its pool must get every connection back."""
    if not keepable(client, aredis.ConnectionPool, aredis.BlockingConnectionPool):
        return None
    return keep(AsyncKept(client))  # type: ignore[no-any-return]


class AsyncKept:
    """Send :data:`~cachesync._driver.KEPT_COMMANDS` on connections kept checked out of ``client``'s pool."""

    __slots__ = ("client", "pool", "free", "closed", "_loop", "__weakref__")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pool = client.connection_pool
        self.free: list[Any] = []
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # another event loop's connections are never used here
            self.free, self._loop = [], loop
        free = self.free
        try:
            conn = free.pop()
            was_kept = True
        except IndexError:
            conn = await self.pool.get_connection()  # the pool's checks (connected, nothing unread) for a new one
            was_kept = False
        try:
            await conn.send_command(*args)
            reply = await conn.read_response()
        except ResponseError:  # an error reply, read whole: the connection is in step
            await self._put(conn, free)
            raise
        except RedisConnectionError as e:
            await self._drop(conn, True)
            if was_kept or client_retries(conn, e):
                # a kept connection the server closed while it sat in the free list: send again through the pool
                return await self.client.execute_command(*args)
            raise
        except RedisTimeoutError as e:  # not again on the same terms: a hung server would double the wait
            await self._drop(conn, True)
            if client_retries(conn, e):
                return await self.client.execute_command(*args)
            raise
        except BaseException:  # CancelledError (a timeout, the watchdog), KeyboardInterrupt, a parser error
            await self._drop(conn, True)
            raise
        await self._put(conn, free)
        return reply

    async def _put(self, conn: Any, free: list[Any]) -> None:
        if self.closed or free is not self.free:  # closed meanwhile, or the free list of a loop no longer used
            await self._drop(conn, False)
        else:
            free.append(conn)

    async def _drop(self, conn: Any, disconnect: bool) -> None:
        try:
            if disconnect:
                await conn.disconnect(nowait=True)
            await self.pool.release(conn)
        except Exception:  # pragma: no cover - a closed pool or loop: it holds nothing to return
            pass

    async def close(self) -> None:
        """Hand the free connections back to the pool; connections in use go back when their command ends."""
        self.closed = True
        while True:
            try:
                conn = self.free.pop()
            except IndexError:
                return
            await self._drop(conn, False)

    def forked(self) -> None:
        """In a forked child: forget the parent's connections (never sent on here)."""
        self.free = []
