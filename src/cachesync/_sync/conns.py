"""Kept connections: the sync cache's ``GET``, ``MGET`` and ``EVALSHA`` on connections it keeps checked out.

redis-py's ``execute_command`` checks a connection out of the pool and back in for every command: two pool locks,
two ``getpid`` calls, a ``poll`` of the socket (does it hold unread data?), its own per-command metrics and a
retry wrapper (docs/benchmarks.md, run K: ``bench_hit.py`` measures the hit path with and without it). A
:class:`Kept` keeps the connections it has used checked out, in a free list of its own (``list.pop`` and
``list.append`` are atomic: one thread per connection at a time), and sends on them directly.

What makes that safe, and what keeps it as safe as the pool:

- a connection goes back on the free list only after its reply was read whole (a value, or an error reply:
  ``ResponseError``, ``NoScriptError``); on anything else (a broken or timed-out socket, ``KeyboardInterrupt``
  between the send and the read) it is disconnected first, so no later command can read an earlier command's
  reply (the pool's ``poll`` check guards against the same thing);
- a kept connection the server has closed meanwhile (its idle ``timeout``, a restart, ``CLIENT KILL``: what the
  pool's ``poll`` check would have caught) fails on its next command with a connection error; that command is
  sent again through ``execute_command`` (a fresh connection, the pool's checks). Otherwise a connection error or
  a timeout raises exactly as redis-py would with the pool cachesync builds (no retries); a client given with
  retries (``Retry`` with ``retries > 0``) gets them through ``execute_command`` (one attempt more than its own
  count). A timeout is never sent again unless the client retries: a hung server would double the wait;
- only where the pool hands out interchangeable connections with no per-command state: a plain ``ConnectionPool``
  of no practical size limit (a bounded or blocking pool must get its connections back, or another caller would
  wait for them), RESP2 (no push messages, no maintenance notifications), no client-side cache, not a
  single-connection client, not a cluster; anything else uses ``execute_command`` unchanged;
- a forked child starts with an empty free list (the parent's sockets are never used by the child); ``close()``
  hands the free connections back to the pool.

``cachesync._async.conns`` is the asyncio twin (same rules; one free list per event loop).

The commands sent here have no redis-py response callback (the reply is the same as ``execute_command``'s), and
redis-py's own command metrics (``redis.observability``) do not see them; cachesync's metrics do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.exceptions import ResponseError

from .._driver import keep, keepable, kept_failed, kept_pack, kept_packer


def kept(client: Any) -> Kept | None:
    """A :class:`Kept` for ``client``, or None where its pool must get every connection back (see the module doc)."""
    if not keepable(client, redis.ConnectionPool, redis.BlockingConnectionPool):
        return None
    return keep(Kept(client))  # type: ignore[no-any-return]


class Kept:
    """Send :data:`~cachesync._driver.KEPT_COMMANDS` on connections kept checked out of ``client``'s pool."""

    __slots__ = ("client", "pool", "free", "closed", "pack", "__weakref__")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pool = client.connection_pool
        self.free: list[Any] = []
        self.closed = False
        self.pack = kept_packer(self.pool)

    def __call__(self, *args: Any) -> Any:
        data = kept_pack(self.pack, args)
        free = self.free
        try:
            conn = free.pop()
            was_kept = True
        except IndexError:
            conn = self.pool.get_connection()  # the pool's checks (connected, nothing unread) for a new one
            was_kept = False
        try:
            if data is None:
                conn.send_command(*args)
            else:
                conn.send_packed_command(data)
            reply = conn.read_response()
        except ResponseError:  # an error reply, read whole: the connection is in step
            self._put(conn)
            raise
        except BaseException as e:  # whatever was sent may still answer: never kept (cachesync._driver.kept_failed)
            conn.disconnect()
            self._drop(conn)
            if kept_failed(e, conn, was_kept):
                return self.client.execute_command(*args)
            raise
        self._put(conn)
        return reply

    def many(self, cmds: Sequence[tuple[Any, ...]], fallback: Callable[[], list[Any]]) -> list[Any]:
        """Send ``cmds`` in one round trip on a kept connection and read every reply: a list with each error reply
        as its exception (``ResponseError``, ``NoScriptError``), as a non-transactional pipeline's
        ``execute(raise_on_error=False)`` gives it. A connection error or a timeout raises (after ``fallback()``,
        the redis-py pipeline, where :meth:`__call__` would send again); ``fallback()`` also packs what hiredis
        cannot."""
        pack = self.pack
        if pack is None:
            return fallback()
        try:
            data = b"".join([pack(args) for args in cmds])
        except TypeError:
            return fallback()
        free = self.free
        try:
            conn = free.pop()
            was_kept = True
        except IndexError:
            conn = self.pool.get_connection()
            was_kept = False
        out: list[Any] = []
        try:
            conn.send_packed_command([data])
            for _ in cmds:
                try:
                    out.append(conn.read_response())
                except ResponseError as e:  # an error reply, read whole
                    out.append(e)
        except BaseException as e:
            conn.disconnect()
            self._drop(conn)
            if kept_failed(e, conn, was_kept):
                return fallback()  # every command of the batch is one the flows may send again
            raise
        self._put(conn)
        return out

    def _put(self, conn: Any) -> None:
        if self.closed:
            self._drop(conn)
        else:
            self.free.append(conn)

    def _drop(self, conn: Any) -> None:
        try:
            self.pool.release(conn)
        except Exception:  # pragma: no cover - a pool reset by a fork, or closed: it holds nothing to return
            pass

    def close(self) -> None:
        """Hand the free connections back to the pool; connections in use go back when their command ends."""
        self.closed = True
        while True:
            try:
                conn = self.free.pop()
            except IndexError:
                return
            self._drop(conn)

    def forked(self) -> None:
        """In a forked child: forget the parent's connections (never sent on here; the pool resets itself)."""
        self.free = []
