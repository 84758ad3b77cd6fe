"""The CDC runner's invalidation transport: the one invalidation flow, on one connection the runner keeps.

:meth:`cachesync.Cache.invalidate_many` runs :func:`cachesync.core.invalidate_many_flow` through redis-py's client
(per call: a connection taken from the pool and given back, its health and event hooks). The runner applies
every batch from one thread, one batch at a time, so it can keep one connection of the cache's pool for itself
and send the flow's commands on it directly: the same flow (the same ``invalidate.lua`` calls, replies, errors
and stats), a third less time per call on the commit -> invalidated path. Used for a single Redis server (not a
cluster: there the cache's own driver routes each call); anything unusual (a connection error, a reply that is
not what the flow expects) is handed to the flow exactly as the cache's driver hands it, and the connection is
dropped after any connection error (the next call opens a new one; a batch that went out on a connection kept
since an earlier batch and found it closed by the server is sent again at once on a new one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import core as P
from .. import tracing as _tr
from .._driver import kept_packer
from .._sync.cache import Cache
from ..errors import CacheUnavailableError, InvalidationError, RedisCommandError

_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


class Pending:
    """A batch :meth:`DirectInvalidator.start` sent: its flow, the effect whose replies are to read."""

    __slots__ = ("flow", "versions", "eff", "unread", "error", "result", "kept")

    def __init__(self, flow: Any, versions: Mapping[str, str], kept: bool) -> None:
        self.flow, self.versions, self.kept = flow, versions, kept
        self.eff: Any = None
        self.unread = 0
        self.error: BaseException | None = None
        self.result: Any = None


def _cmds(eff: Any) -> list[tuple[Any, ...]]:
    if type(eff) is P.Cmd:
        return [eff.args]
    if type(eff) is P.Batch:
        return list(eff.cmds)
    raise AssertionError(f"unexpected effect {eff!r} in the invalidation flow")  # pragma: no cover


class DirectInvalidator:
    """Runs :func:`~cachesync.core.invalidate_many_flow` for ``cache`` on one connection of its pool (see the module
    docstring); :meth:`usable` says whether the cache allows it (a plain ``redis.Redis`` client, not a cluster)."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.pool: Any = cache.redis.connection_pool
        self.conn: Any = None
        self._pending: Pending | None = None  # a started batch whose replies are still to read
        # hiredis's packer where it writes redis-py's bytes (a strict UTF-8 pool): the kept connections' rule
        self._pack = kept_packer(self.pool)

    @staticmethod
    def usable(cache: Cache) -> bool:
        return (not cache.ctx.cluster and type(cache.redis) is redis.Redis
                and isinstance(getattr(cache.redis, "connection_pool", None), redis.ConnectionPool))

    def invalidate(self, versions: Mapping[str, str]) -> int:
        """What :meth:`Cache.invalidate_many` does with an already merged batch (key -> encoded version, "" =
        unknown): raises :class:`~cachesync.errors.InvalidationError` when Redis cannot be reached."""
        return self.finish(self.start(versions))

    def _again(self, p: Pending) -> bool:
        """Whether a batch that failed is sent again at once, on a new connection: it went out on the connection
        kept since an earlier batch, and that connection was lost, not timed out (the server closed it while idle --
        its ``timeout``, a proxy's idle limit, a restart: the pool's own callers would have been handed a fresh one)."""
        return p.kept and self.conn is None

    def start(self, versions: Mapping[str, str]) -> Pending:
        """Send the first command(s) of the batch's flow without waiting for the replies: :meth:`finish` reads
        them and runs the rest of the flow. Until then nothing else may use this connection -- if something does,
        it drops the connection first and :meth:`finish` of the unread batch reports Redis unreachable (the
        runner then sends it again: nothing counts as invalidated until its replies were read)."""
        ctx = self.cache.ctx
        tp = (_tr.current_traceparent() or "") if ctx.channel else ""
        p = Pending(P.invalidate_many_flow(ctx, versions, tp), versions, self.conn is not None)
        try:
            p.eff = p.flow.send(None)
        except StopIteration as stop:  # nothing to send (no keys)
            p.result = stop.value
            return p
        cmds = _cmds(p.eff)
        try:
            self._send(cmds)
            p.unread = len(cmds)
            self._pending = p
        except (*_DOWN, RedisError) as e:  # also an error reply while connecting (AUTH, SELECT): finish() reports
            p.error = e  # it as an InvalidationError, which the runner retries (it escaped and stopped the runner)
        return p

    def finish(self, p: Pending) -> int:
        """The result of a batch :meth:`start` sent (its replies read, the rest of its flow run); raises
        :class:`~cachesync.errors.InvalidationError` when Redis could not be reached."""
        cache = self.cache
        try:
            if p.eff is None:
                return int(p.result or 0)
            send: Any = None
            throw: BaseException | None = None
            if p.error is not None:
                throw = P.RedisDown(p.error)
            elif self._pending is not p:  # the connection was dropped under it: its replies are lost
                throw = P.RedisDown(RedisConnectionError("the connection was reset before the replies were read"))
            else:
                self._pending = None
                send, throw = self._answer(p.eff, p.unread)
            try:
                return int(self._run(p.flow, send, throw))
            except InvalidationError as e:
                cause = e.__cause__
                if not (self._again(p) and isinstance(cause, _DOWN) and not isinstance(cause, RedisTimeoutError)):
                    raise
                # sent again at once: its keys are not failed (yet); the lost connection stays in redis_errors
                cache.ctx.stats["invalidations_failed"] -= len(e.keys)
        finally:
            p.flow.close()
            cache._written(list(p.versions))  # as Cache.invalidate_many: the L1 copies, the keys' flights
        return self.invalidate(p.versions)  # once (the connection is new now)

    def _run(self, flow: Any, send: Any, throw: BaseException | None) -> Any:
        while True:
            try:
                eff = flow.send(send) if throw is None else flow.throw(throw)
            except StopIteration as stop:
                return stop.value
            except P.RedisDown as e:  # a flow that does not handle it: as the cache's driver reports it
                raise CacheUnavailableError(self.cache.url, e.cause) from e.cause
            except P.CommandError as e:
                raise RedisCommandError(self.cache.url, e) from None
            except P.NoScript:  # never the signal (the invalidation flow reloads; as the cache's driver maps it)
                raise RedisCommandError(self.cache.url, P.CommandError("NOSCRIPT: the script is not loaded")) from None
            send, throw = self._answer(eff, 0)

    def _answer(self, eff: Any, unread: int) -> tuple[Any, BaseException | None]:
        """(reply to send into the flow, or exception to throw into it) for effect ``eff``, mapped as the cache's
        driver maps them; ``unread``: its commands were sent already, this many replies are to read."""
        try:
            replies = self._read(unread) if unread else self._exec(_cmds(eff))
            if type(eff) is P.Cmd:
                r = replies[0]
                if isinstance(r, BaseException):
                    raise r
                return r, None
            return [P.NoScript() if isinstance(r, NoScriptError) else
                    P.CommandError(str(r)) if isinstance(r, BaseException) else r for r in replies], None
        except NoScriptError:
            return None, P.NoScript()
        except _DOWN as e:
            return None, P.RedisDown(e)
        except ResponseError as e:
            return None, P.CommandError(str(e))

    def _exec(self, cmds: list[tuple[Any, ...]]) -> list[Any]:
        self._send(cmds)
        return self._read(len(cmds))

    def _send(self, cmds: list[tuple[Any, ...]]) -> None:
        """Send ``cmds`` in one write (a connection error drops the connection and propagates)."""
        if self._pending is not None:  # replies nobody will read: the connection cannot be used any more
            self._pending = None
            self._drop()
        conn = self.conn
        try:
            if conn is None:
                conn = self.conn = self.pool.get_connection()
            pack = self._pack
            if pack is not None:
                packed: Any = [pack(c) for c in cmds]
            else:
                packed = conn.pack_commands(cmds) if len(cmds) > 1 else conn.pack_command(*cmds[0])
            conn.send_packed_command(packed, check_health=False)
        except BaseException:
            self._drop()
            raise

    def _read(self, n: int) -> list[Any]:
        """The next ``n`` replies in order (an error reply in its place, as an exception object)."""
        conn = self.conn
        out: list[Any] = []
        try:
            for _ in range(n):
                try:
                    out.append(conn.read_response())
                except ResponseError as e:
                    out.append(e)
        except BaseException:
            self._drop()
            raise
        return out

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:  # noqa: S110 - the connection is gone either way
                pass
            try:
                self.pool.release(conn)  # also when disconnect() failed: its pool slot is given back
            except Exception:  # noqa: S110 - the pool may be closed already
                pass

    def close(self) -> None:
        """Give the connection back to the pool (dropped if a started batch's replies were not read)."""
        if self._pending is not None:
            self._pending = None
            self._drop()
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                self.pool.release(conn)
            except Exception:  # noqa: S110 - the pool may be closed already
                pass
