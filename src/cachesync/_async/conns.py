"""Kept connections, asyncio: the async cache's ``GET``, ``MGET`` and ``EVALSHA`` on connections it keeps checked
out of its client's pool. The same rules as :mod:`cachesync._sync.conns` (read its doc): a connection goes back on
the free list only after its reply was read whole; a broken socket, a timeout, a cancellation (the watchdog's
bound, a caller's timeout) or an interrupt disconnects it first; a kept connection the server closed while idle
is sent again through ``execute_command``; only a plain pool of no practical size limit, RESP2, not a cluster.
Also: connections belong to the event loop that made them, so each loop has a free list of its own (one thread with
its own loop never sends on another's connections; a closed loop's list goes with it).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aredis
from redis.exceptions import ResponseError

from .._driver import keep, keepable, kept_failed, kept_pack, kept_packer


def kept(client: Any) -> AsyncKept | None:
    """An :class:`AsyncKept` for ``client``, or None where its pool must get every connection back."""
    if not keepable(client, aredis.ConnectionPool, aredis.BlockingConnectionPool):
        return None
    return keep(AsyncKept(client))  # type: ignore[no-any-return]


class AsyncKept:
    """Send :data:`~cachesync._driver.KEPT_COMMANDS` on connections kept checked out of ``client``'s pool."""

    __slots__ = ("client", "pool", "free", "closed", "pack", "_loop", "_lists", "__weakref__")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pool = client.connection_pool
        self.free: list[Any] = []
        self.closed = False
        self.pack = kept_packer(self.pool)
        self._loop: asyncio.AbstractEventLoop | None = None
        # one free list per event loop (connections belong to the loop that made them): threads with a loop each,
        # or asyncio.run() twice; a closed loop's list goes with the loop
        self._lists: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[Any]] = weakref.WeakKeyDictionary()

    def _take_free(self) -> list[Any]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            free = self._lists.get(loop)
            if free is None:
                free = self._lists[loop] = []
            self.free, self._loop = free, loop
        return self.free

    async def __call__(self, *args: Any) -> Any:
        data = kept_pack(self.pack, args)
        free = self._take_free()
        try:
            conn = free.pop()
            was_kept = True
        except IndexError:
            conn = await self.pool.get_connection()  # the pool's checks (connected, nothing unread) for a new one
            was_kept = False
        try:
            if data is None:
                await conn.send_command(*args)
            else:
                await conn.send_packed_command(data)
            reply = await conn.read_response()
        except ResponseError:  # an error reply, read whole: the connection is in step
            await self._put(conn, free)
            raise
        except BaseException as e:  # CancelledError (a timeout, the watchdog) too (cachesync._driver.kept_failed)
            await self._drop(conn, True)
            if kept_failed(e, conn, was_kept):
                return await self.client.execute_command(*args)
            raise
        await self._put(conn, free)
        return reply

    async def many(self, cmds: Sequence[tuple[Any, ...]], fallback: Callable[[], Awaitable[list[Any]]]) -> list[Any]:
        """See :meth:`cachesync._sync.conns.Kept.many`: ``cmds`` in one round trip, each error reply as its
        exception; ``fallback()`` is the redis.asyncio pipeline."""
        pack = self.pack
        if pack is None:
            return await fallback()
        try:
            data = b"".join([pack(args) for args in cmds])
        except TypeError:
            return await fallback()
        free = self._take_free()
        try:
            conn = free.pop()
            was_kept = True
        except IndexError:
            conn = await self.pool.get_connection()
            was_kept = False
        out: list[Any] = []
        try:
            await conn.send_packed_command([data])
            for _ in cmds:
                try:
                    out.append(await conn.read_response())
                except ResponseError as e:  # an error reply, read whole
                    out.append(e)
        except BaseException as e:
            await self._drop(conn, True)
            if kept_failed(e, conn, was_kept):
                return await fallback()  # every command of the batch is one the flows may send again
            raise
        await self._put(conn, free)
        return out

    async def _put(self, conn: Any, free: list[Any]) -> None:
        if self.closed:
            await self._drop(conn, False)
        else:
            free.append(conn)  # the list of the loop the command ran on

    async def _drop(self, conn: Any, disconnect: bool) -> None:
        try:
            if disconnect:
                await conn.disconnect(nowait=True)
            await self.pool.release(conn)
        except Exception:  # pragma: no cover - a closed pool or loop: it holds nothing to return
            pass

    async def close(self) -> None:
        """Hand the free connections (of every loop) back to the pool; connections in use go back when their
        command ends."""
        self.closed = True
        for free in [self.free, *self._lists.values()]:
            while True:
                try:
                    conn = free.pop()
                except IndexError:
                    break
                await self._drop(conn, False)

    def forked(self) -> None:
        """In a forked child: forget the parent's connections (never sent on here)."""
        self.free, self._loop = [], None
        self._lists = weakref.WeakKeyDictionary()
