"""The asyncio driver: executes :mod:`cachesync.protocol` flows with redis.asyncio."""

from __future__ import annotations

import asyncio
import time
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, Unpack, cast, overload

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import cache_metrics as _cm
from .. import core as P
from .. import tracing as _tr
from .._types import AsyncCachedDecorator
from .._driver import CLUSTER_DOWN, DEFAULT_REDIS_URL, KEPT_COMMANDS, KeyTemplate, connect, is_cluster, log, wraps
from ..errors import CacheUnavailableError, InvalidationError, RedisCommandError, UsageError
from ..core.keys import prefix_scan
from ..core.l1 import L1Options
from .conns import kept
from .l1 import L1Async
from ..core.options import CacheOptions, CacheOptionsKwargs, check_non_negative

T = TypeVar("T")

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, *CLUSTER_DOWN)
_RETRY: Any = object()
_ALONE: Any = object()  # _follow: the flight fell back (Redis failed its leader): read again outside any flight

AsyncScheduler = Callable[[float, Callable[[], Awaitable[None]]], Any]


async def _call(loader: Callable[..., Any], *args: Any) -> Any:
    r = loader(*args)
    if inspect.isawaitable(r):
        r = await r
    return r


class _Watchdog:
    """Bounds the in-flight commands of one cache with one timer task (checks every ``timeout / 4``)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.inflight: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.task = loop.create_task(self._run(), name="cachesync-watchdog")
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The timer task ended (a shutdown that cancels every task, say): the next command starts a new one."""
        if self.task is task:
            self.task, self.loop = None, None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.01, self.timeout / 4))
            now = loop.time()
            for t, started in list(self.inflight.items()):
                if now - started > self.timeout and t not in self.expired:
                    self.expired.add(t)
                    t.cancel()

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.task, self.loop = None, None

    def enter(self) -> asyncio.Task[Any]:
        """Start bounding the current task's command (the timer task starts with the first command of a loop)."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self.start(loop)
        task = asyncio.current_task()
        assert task is not None
        self.inflight[task] = loop.time()
        return task

    def cancelled(self, task: asyncio.Task[Any]) -> None:
        """In the ``except CancelledError`` of a bounded command: raise the timeout if the watchdog cancelled it
        (undoing its cancellation), else return and let the caller re-raise the cancellation (also when someone
        else cancelled the task too: its cancellation is not swallowed by the timeout)."""
        if task in self.expired and task.uncancel() == 0:
            raise RedisTimeoutError(f"no answer within socket_timeout={self.timeout}s") from None

    def leave(self, task: asyncio.Task[Any]) -> None:
        del self.inflight[task]
        if self.expired:
            self.expired.discard(task)


class AsyncCache:
    """The asyncio twin of :class:`cachesync.Cache`: same options, same methods, awaited.

    Loaders may be coroutine functions or plain functions. ``scheduler=`` replaces the event-loop timer that
    runs delayed steps (``scheduler(delay_seconds, coroutine_function)``), for tests.
    """

    def __init__(self, redis_url: str = DEFAULT_REDIS_URL, *, client: Any = None,
                 scheduler: AsyncScheduler | None = None, l1: L1Options | bool | Mapping[str, Any] | None = None,
                 record_namespace: bool = True, **options: Unpack[CacheOptionsKwargs]) -> None:
        self.options = CacheOptions.build(**options)
        l1_options = L1Options.build(l1)
        self.redis, self.url, owned_url = connect(redis_url, client, self.options, aredis, socket_timeout=False)
        self._watchdog = _Watchdog(self.options.socket_timeout)
        self._owns_client = owned_url is not None
        self.ctx = P.Context(self.options, cluster=is_cluster(self.redis))
        # GET/MGET/EVALSHA on connections kept checked out of the pool, where that is safe (cachesync._async.conns)
        self._kept = kept(self.redis) if self.options.kept_connections else None
        self._send: Callable[..., Awaitable[Any]] = self._kept if self._kept is not None else self.redis.execute_command
        self._metrics = _cm.instrument(self)  # None unless metrics= (stats stay a plain dict)
        self._unrecorded = record_namespace  # recorded in Redis by the first read (needs a running loop)
        self._flights: dict[str, list[asyncio.Future[P.Entry[Any]]]] = {}
        self._fallback: asyncio.Semaphore | None = None
        self._scheduler = scheduler
        self._tasks: set[asyncio.Task[None]] = set()
        self._undelivered: dict[int, list[str]] = {}  # delayed steps scheduled and not yet delivered
        self.l1: L1Async | None = None  # in-process L1 (``l1=``): see cachesync.l1 and docs/l1.md
        if l1_options is not None:
            self.l1 = L1Async(self, l1_options, owned_url)
            self.l1.core.add_listener(self._detach)  # another process's write, heard: its keys' flights too

    # ------------------------------------------------------------------ driver

    async def _command(self, eff: P.Cmd) -> Any:
        if eff.route is not None and self.ctx.cluster:  # a keyless command: on the key's primary, or on all
            r = self.redis
            nodes = r.get_primaries() if eff.route == "*" else r.get_node_from_key(eff.route)
            return await self._bounded(r.execute_command(*eff.args, target_nodes=nodes))
        if self._kept is not None and eff.args[0] in KEPT_COMMANDS:
            return await self._bounded(self._kept(*eff.args))
        return await self._bounded(self.redis.execute_command(*eff.args))

    async def _bounded(self, aw: Awaitable[T]) -> T:
        """Await one client call under the watchdog: a hung Redis raises ``TimeoutError`` after socket_timeout
        instead of hanging (every command, pipeline, ping and SCAN page). One watchdog task per cache cancels
        calls older than socket_timeout (a timer per call, asyncio.timeout or redis.asyncio's wait_for, costs
        ~10 % of a hit; :meth:`_hit` inlines these steps)."""
        wd = self._watchdog
        task = wd.enter()
        try:
            return await aw
        except asyncio.CancelledError:
            wd.cancelled(task)
            raise
        finally:
            wd.leave(task)

    async def _pipeline(self, cmds: Sequence[tuple[Any, ...]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for args in cmds:
            pipe.execute_command(*args)
        return cast(list[Any], await pipe.execute(raise_on_error=False))

    async def _batch(self, eff: P.Batch) -> list[Any]:
        cmds = eff.cmds
        if self._kept is not None and all(args[0] in KEPT_COMMANDS for args in cmds):
            res = await self._bounded(self._kept.many(cmds, lambda: self._pipeline(cmds)))
        else:
            res = await self._bounded(self._pipeline(cmds))
        out: list[Any] = []
        for r in res:
            if isinstance(r, _REDIS_DOWN):
                raise r
            out.append(P.NoScript() if isinstance(r, NoScriptError) else
                       P.CommandError(str(r)) if isinstance(r, Exception) else r)
        return out

    async def run(self, flow: P.Flow[T], loader: Callable[..., Any] | None = None) -> T:
        """Run a protocol flow (:mod:`cachesync.protocol`, or an add-on's, e.g. :mod:`cachesync.bloom`) to its
        result: the one way any code drives this cache. Its ``Cmd`` effects go to Redis, ``Load`` effects call
        ``loader`` (awaited when it returns an awaitable), ``Schedule`` effects become background steps. An
        unreachable Redis raises :class:`CacheUnavailableError` unless the flow handles it; an error reply raises
        :class:`RedisCommandError`.
        """
        return await self._run(flow, loader)

    async def _run(self, flow: P.Flow[T], loader: Callable[..., Any] | None = None,
                   first: tuple[Any, BaseException | None] | None = None) -> T:
        """:meth:`run`; ``first``: the (reply, exception) of its first command, already sent (see :meth:`_hit`)."""
        send: Any = None
        throw: BaseException | None = None
        obs, waited = self._metrics, 0.0
        try:
            while True:
                try:
                    eff = flow.send(send) if throw is None else flow.throw(throw)
                except StopIteration as stop:
                    return cast(T, stop.value)
                except _REDIS_DOWN as e:
                    raise CacheUnavailableError(self.url, e) from e
                except P.RedisDown as e:  # a flow that does not handle it (peek, audit reads): never the signal
                    raise CacheUnavailableError(self.url, e.cause) from e.cause
                except P.CommandError as e:
                    raise RedisCommandError(self.url, e) from None
                except P.NoScript:  # a flow that sent EVALSHA itself and did not reload: never the signal
                    raise RedisCommandError(self.url, P.CommandError("NOSCRIPT: the script is not loaded")) from None
                send, throw = None, None
                t = type(eff)
                if t is P.Cmd:
                    t0 = time.perf_counter() if obs is not None and eff.args[0] == "BLPOP" else 0.0
                    try:
                        if first is not None:
                            send, exc = first
                            first = None
                            if exc is not None:
                                raise exc
                        else:
                            send = await self._command(eff)
                    except NoScriptError:
                        throw = P.NoScript()
                    except _REDIS_DOWN as e:
                        throw = P.RedisDown(e)
                    except ResponseError as e:
                        throw = P.CommandError(str(e))
                    except BaseException as e:  # CancelledError: the flow releases its lease, then re-raises
                        throw = e
                    if t0:
                        waited += time.perf_counter() - t0
                elif t is P.Batch:
                    try:
                        send = await self._batch(eff)
                    except _REDIS_DOWN as e:
                        throw = P.RedisDown(e)
                    except BaseException as e:
                        throw = e
                elif t is P.Load:
                    if loader is None:
                        raise UsageError("the flow asked for a load, but run() was given no loader")
                    args = () if eff.keys is None else (eff.keys,)
                    t0 = time.perf_counter() if self._metrics is not None else 0.0
                    try:
                        if eff.fallback:
                            if self._fallback is None:
                                self._fallback = asyncio.Semaphore(self.options.fallback_concurrency)
                            async with self._fallback:
                                send = await _call(loader, *args)
                        else:
                            send = await _call(loader, *args)
                    except BaseException as e:  # incl. CancelledError (request timeout, client disconnect)
                        throw = e
                    if self._metrics is not None:
                        self._metrics.loaded(time.perf_counter() - t0)
                elif t is P.Schedule:
                    self._schedule(eff)
                else:  # pragma: no cover
                    raise AssertionError(f"unknown effect {eff!r}")
        finally:
            flow.close()
            if waited and obs is not None:
                obs.waited(waited)

    def _schedule(self, eff: P.Schedule) -> None:
        async def run() -> None:
            attempt = 0
            while True:
                try:
                    await self.run(eff.flow_factory())
                    self._undelivered.pop(id(run), None)
                    return
                except Exception as e:  # retried until it succeeds or aclose() gives up: never dropped silently
                    backoff = min(30.0, 0.1 * 2 ** attempt)
                    log.error("cachesync: delayed step for %r failed (attempt %d), retrying in %.1fs: %s",
                              eff.keys, attempt + 1, backoff, e)
                    attempt += 1
                    await asyncio.sleep(backoff)

        self._undelivered[id(run)] = eff.keys
        if self._scheduler is not None:
            self._scheduler(eff.delay, run)
            return

        async def later() -> None:
            await asyncio.sleep(eff.delay)
            await run()

        task = asyncio.get_running_loop().create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _record(self) -> None:
        """Record the namespace in Redis (once, in the background: the first read needs a running loop)."""
        self._unrecorded = False
        task = asyncio.get_running_loop().create_task(_cm.record_namespace_async(self))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, key: str, waiters: list[asyncio.Future[P.Entry[Any]]]) -> P.Entry[Any] | None:
        """Wait for the flight ``waiters`` of ``key`` (and any newer one): its result if this caller may take it,
        None when no flight is left and this caller must lead one (no await between the return and the lead), or
        ``_ALONE`` when it must read again outside any flight."""
        while True:
            # a follower waits on a future of its own: cancelling it never cancels the leader or the others
            self.ctx.stats["singleflight_joins"] += 1
            w: asyncio.Future[P.Entry[Any]] = asyncio.get_running_loop().create_future()
            waiters.append(w)
            res = await w
            if res is not _RETRY and P.follower_accepts(res):
                _cm.joined(self.ctx.stats, res)  # stats count per request: the follower's own outcome
                return res
            # the leader was cancelled, or its value may predate a write: read again (lead, or join a newer flight)
            self.ctx.stats["singleflight_retries"] += 1
            if res is not _RETRY and res.source == "fallback":
                # Redis failed the leader (down, or hung: its GET waited socket_timeout): the followers read again
                # side by side, each alone; a new flight would make them wait one socket_timeout each in turn
                return _ALONE  # type: ignore[no-any-return]
            nxt = self._flights.get(key)
            if nxt is None:
                return None
            waiters = nxt

    def _land(self, key: str, waiters: list[asyncio.Future[P.Entry[Any]]], res: Any,
              exc: BaseException | None = None) -> None:
        """End the flight of ``key`` led by this caller: its followers get ``res``, or ``exc`` (a cancelled
        leader's followers read again)."""
        if self._flights.get(key) is waiters:  # else _written detached it (a newer flight may lead now)
            del self._flights[key]
        for w in waiters:
            if not w.done():
                if exc is None:
                    w.set_result(res)
                elif isinstance(exc, asyncio.CancelledError):
                    w.set_result(_RETRY)
                else:
                    w.set_exception(exc)

    async def _single(self, key: str, fn: Callable[[], Awaitable[P.Entry[Any]]]) -> P.Entry[Any]:
        """``fn()`` single-flight: concurrent callers for one key share one call (see :meth:`_hit`)."""
        if self._unrecorded:
            self._record()
        if not self.options.singleflight:
            return await fn()
        waiters = self._flights.get(key)
        if waiters is not None:
            res = await self._follow(key, waiters)
            if res is _ALONE:
                return await fn()
            if res is not None:
                return res
        waiters = self._flights[key] = []
        try:
            res = await fn()
        except BaseException as e:
            self._land(key, waiters, None, e)
            raise
        self._land(key, waiters, res)
        return res

    # ------------------------------------------------------------------ reads

    @overload
    async def get(self, key: str, loader: Callable[[], Awaitable[P.Versioned[T] | P.NotFound]],
                  ttl: float | None = None) -> T | P.NotFound: ...

    @overload
    async def get(self, key: str, loader: Callable[[], Awaitable[T]], ttl: float | None = None) -> T | P.NotFound: ...

    @overload
    async def get(self, key: str, loader: Callable[[], P.Versioned[T] | P.NotFound],
                  ttl: float | None = None) -> T | P.NotFound: ...

    @overload
    async def get(self, key: str, loader: Callable[[], T], ttl: float | None = None) -> T | P.NotFound: ...

    async def get(self, key: str, loader: Callable[[], Any], ttl: float | None = None) -> Any:
        """See :meth:`cachesync.Cache.get`; ``loader`` may be a coroutine function."""
        if self._metrics is not None:  # metrics/tracing: the instrumented path
            return (await self.get_entry(key, loader, ttl)).value
        l1 = self.l1
        if l1 is not None:  # the L1 hit, inlined: no second coroutine
            e = l1.core.lookup(key)
            if e is not None:
                return e.value
        try:
            return (await self._read(key, loader, ttl)).value
        except Exception:  # a read that raised: counted as in get_entry
            self.ctx.stats["read_errors"] += 1
            raise

    @overload
    async def get_entry(self, key: str, loader: Callable[[], Awaitable[P.Versioned[T] | P.NotFound]],
                        ttl: float | None = None) -> P.Entry[T]: ...

    @overload
    async def get_entry(self, key: str, loader: Callable[[], Awaitable[T]], ttl: float | None = None) -> P.Entry[T]: ...

    @overload
    async def get_entry(self, key: str, loader: Callable[[], P.Versioned[T] | P.NotFound],
                        ttl: float | None = None) -> P.Entry[T]: ...

    @overload
    async def get_entry(self, key: str, loader: Callable[[], T], ttl: float | None = None) -> P.Entry[T]: ...

    async def get_entry(self, key: str, loader: Callable[[], Any], ttl: float | None = None) -> P.Entry[Any]:
        """See :meth:`cachesync.Cache.get_entry`."""
        try:
            if self._metrics is not None and self._metrics.traced:
                return cast(P.Entry[Any], await _tr.traced_get_async(self, lambda: self._get_entry(key, loader, ttl)))
            return await self._get_entry(key, loader, ttl)
        except Exception:  # a read that raised (see Cache.get_entry)
            self.ctx.stats["read_errors"] += 1
            raise

    async def _get_entry(self, key: str, loader: Callable[[], Any], ttl: float | None) -> P.Entry[Any]:
        l1 = self.l1
        if l1 is not None:
            e = l1.core.lookup(key)
            if e is not None:
                return cast(P.Entry[Any], e)
        return await self._read(key, loader, ttl)

    def _read(self, key: str, loader: Callable[..., Any], ttl: float | None) -> Awaitable[P.Entry[Any]]:
        """A read after the L1 (if any) had no copy: single-flight (concurrent reads of one key share one)."""
        l1 = self.l1
        if l1 is not None:
            return self._single(key, lambda: l1.load(
                key, ttl, lambda: self._run(P.get_flow(self.ctx, key, ttl), loader)))
        return self._hit(key, loader, ttl)

    async def _hit(self, key: str, loader: Callable[..., Any], ttl: float | None) -> P.Entry[Any]:
        """The hit fast path, single-flight (concurrent reads of one key share one ``GET``), in one coroutine:
        send :func:`~cachesync.protocol.get_flow`'s first command and serve :func:`~cachesync.protocol.fresh_hit`;
        anything else runs the flow, answering its first command with this reply. Same flight steps as
        :meth:`_single`, same watchdog steps as :meth:`_bounded`."""
        ctx = self.ctx
        args = P.hit_args(ctx, key, ttl)
        if self._unrecorded:
            self._record()
        single = self.options.singleflight
        waiters: list[asyncio.Future[P.Entry[Any]]] = []
        if single:
            joined = self._flights.get(key)
            if joined is not None:
                res = await self._follow(key, joined)
                if res is _ALONE:
                    single = False
                elif res is not None:
                    return res
            if single:
                self._flights[key] = waiters
        try:
            first: tuple[Any, BaseException | None]
            wd = self._watchdog
            task = wd.enter()
            try:
                f = await self._send(*args)
            except asyncio.CancelledError:
                wd.cancelled(task)
                raise
            finally:
                wd.leave(task)
        except Exception as e:  # mapped by _run exactly as if the flow had sent the command
            first = (None, e)
        except BaseException as e:  # CancelledError (its followers read again), KeyboardInterrupt
            if single:
                self._land(key, waiters, None, e)
            raise
        else:
            try:
                entry = P.fresh_hit(ctx, key, f, False)
            except P.CorruptEntry:
                pass  # the flow sees the same reply and repairs the entry
            except BaseException as e:
                if single:
                    self._land(key, waiters, None, e)
                raise
            else:
                if entry is not None:
                    if single:
                        self._land(key, waiters, entry)
                    return entry
            first = (f, None)
        try:
            res = await self._run(P.get_flow(ctx, key, ttl), loader, first)
        except BaseException as e:
            if single:
                self._land(key, waiters, None, e)
            raise
        if single:
            self._land(key, waiters, res)
        return res

    @overload
    async def get_many(self, keys: Iterable[str],
                       loader_many: Callable[[list[str]], Awaitable[Mapping[str, P.Versioned[T] | P.NotFound]]],
                       ttl: float | None = None) -> dict[str, T | P.NotFound]: ...

    @overload
    async def get_many(self, keys: Iterable[str], loader_many: Callable[[list[str]], Awaitable[Mapping[str, T]]],
                       ttl: float | None = None) -> dict[str, T | P.NotFound]: ...

    @overload
    async def get_many(self, keys: Iterable[str],
                       loader_many: Callable[[list[str]], Mapping[str, P.Versioned[T] | P.NotFound]],
                       ttl: float | None = None) -> dict[str, T | P.NotFound]: ...

    @overload
    async def get_many(self, keys: Iterable[str], loader_many: Callable[[list[str]], Mapping[str, T]],
                       ttl: float | None = None) -> dict[str, T | P.NotFound]: ...

    async def get_many(self, keys: Iterable[str], loader_many: Callable[[list[str]], Any],
                       ttl: float | None = None) -> dict[str, Any]:
        """See :meth:`cachesync.Cache.get_many`; ``loader_many`` may be a coroutine function."""
        if self.l1 is not None:
            entries = await self.get_many_entries(keys, loader_many, ttl)
            return {k: e.value for k, e in entries.items()}
        keys = P.key_list(keys, "get_many")
        try:
            return await self.run(P.get_many_values_flow(self.ctx, keys, ttl), loader_many)
        except Exception:
            self.ctx.stats["read_errors"] += len(set(keys))
            raise

    async def get_many_entries(self, keys: Iterable[str], loader_many: Callable[[list[str]], Any],
                               ttl: float | None = None) -> dict[str, P.Entry[Any]]:
        """See :meth:`cachesync.Cache.get_many_entries`."""
        keys = P.key_list(keys, "get_many")
        try:
            if self.l1 is not None:  # L1 hits served; the rest read in one batch and filled per key (cachesync.l1)
                return await self.l1.get_many(keys, ttl, lambda missing: self.run(
                    P.get_many_flow(self.ctx, missing, ttl), loader_many))
            return await self.run(P.get_many_flow(self.ctx, list(keys), ttl), loader_many)
        except Exception:
            self.ctx.stats["read_errors"] += len(set(keys))
            raise

    async def peek(self, key: str) -> dict[str, Any] | None:
        """See :meth:`cachesync.Cache.peek`."""
        return await self.run(P.peek_flow(self.ctx, key))

    # ------------------------------------------------------------------ writes

    async def invalidate(self, *keys: str, version: Any = None) -> int:
        """See :meth:`cachesync.Cache.invalidate`."""
        if self._metrics is not None and self._metrics.traced:
            with _tr.span("cachesync.invalidate", {"cachesync.namespace": self.options.namespace,
                                                  "cachesync.keys": len(keys)}):
                return await self._invalidate(keys, version)
        return await self._invalidate(keys, version)

    async def _invalidate(self, keys: tuple[str, ...], version: Any) -> int:
        P.star_keys(keys, "invalidate")
        if not keys:
            return 0
        try:
            return await self.run(P.invalidate_flow(self.ctx, keys, version))
        finally:
            self._written(keys)

    def _written(self, keys: Sequence[str]) -> None:
        """See :meth:`cachesync.Cache._written`: drop the L1 copies, detach the keys' flights in progress."""
        self._detach(keys)
        if self.l1 is not None:
            self.l1.invalidate_local(keys)

    def _detach(self, keys: Sequence[str] | None) -> None:
        """See :meth:`cachesync.Cache._detach` (the L1's subscriber task calls it on this loop)."""
        if self._flights:
            if keys is None:
                self._flights.clear()
            else:
                for k in keys:
                    self._flights.pop(k, None)

    async def invalidate_many(self, items: Iterable[tuple[Sequence[str], Any]]) -> int:
        """See :meth:`cachesync.Cache.invalidate_many`."""
        return await self._invalidate_merged(P.merge_invalidations(items))

    async def _invalidate_merged(self, versions: dict[str, str]) -> int:
        """See :meth:`cachesync.Cache._invalidate_merged`."""
        try:
            # a batch applied inside a recording span (a relay delivery, a worker apply) announces that span
            tp = (_tr.current_traceparent() or "") if self.ctx.channel else ""
            return await self.run(P.invalidate_many_flow(self.ctx, versions, tp))
        finally:
            self._written(list(versions))

    async def keys_with_prefix(self, *prefixes: str) -> AsyncIterator[str]:
        """See :meth:`cachesync.Cache.keys_with_prefix`."""
        P.star_keys(prefixes, "keys_with_prefix")
        pats, match = prefix_scan(self.ctx.ns, prefixes)
        seen: set[str] = set()
        try:
            for pat in pats:
                pages = self.redis.scan_iter(match=pat, count=1000)
                try:
                    while True:
                        try:  # each step bounded by socket_timeout; the caller's own time between steps is not
                            raw = await self._bounded(pages.__anext__())
                        except StopAsyncIteration:
                            break
                        k = match(raw)
                        if k is not None and k not in seen:
                            seen.add(k)
                            yield k
                finally:  # a caller that stops early (or a timeout) closes the SCAN iterator too
                    await pages.aclose()
        except _REDIS_DOWN as e:
            raise InvalidationError([f"{p}*" for p in prefixes], e) from e

    async def set(self, key: str, value: Any, ttl: float | None = None, version: Any = None) -> bool:
        """See :meth:`cachesync.Cache.set`."""
        if self._metrics is not None and self._metrics.traced:
            with _tr.span("cachesync.set", {"cachesync.namespace": self.options.namespace}):
                return await self._set(key, value, ttl, version)
        return await self._set(key, value, ttl, version)

    async def _set(self, key: str, value: Any, ttl: float | None, version: Any) -> bool:
        try:
            return await self.run(P.set_flow(self.ctx, key, value, ttl, version, guarded=True))
        finally:
            self._written((key,))

    @asynccontextmanager
    async def write(self, *keys: str, strategy: str | None = None, value: Any = P.MISSING, version: Any = None,
                    ttl: float | None = None, delay: float | None = None) -> AsyncIterator[P.WritePlan]:
        """See :meth:`cachesync.Cache.write` (``async with cache.write(...) as w:``)."""
        plan = P.WritePlan(self.ctx, keys, strategy, value, version, ttl, delay)
        if self._metrics is not None and self._metrics.traced:
            with _tr.span("cachesync.write", {"cachesync.namespace": self.options.namespace,
                                             "cachesync.keys": len(plan.keys)}):
                async with self._write(plan) as w:
                    yield w
            return
        async with self._write(plan) as w:
            yield w

    @asynccontextmanager
    async def _write(self, plan: P.WritePlan) -> AsyncIterator[P.WritePlan]:
        await self.run(plan.before())
        try:
            yield plan
        except BaseException:
            try:
                await self.run(plan.after(failed=True))
            finally:
                self._written(plan.keys)
            raise
        try:
            await self.run(plan.after(failed=False))
        finally:
            self._written(plan.keys)

    def cached(self, template: str, ttl: float | None = None, *, not_found: Any = P.NOT_FOUND
               ) -> AsyncCachedDecorator:
        """See :meth:`cachesync.Cache.cached`; decorates a coroutine function."""
        answer = P.not_found_answer(not_found)

        def deco(fn: Callable[..., Any]) -> Any:
            if not inspect.iscoroutinefunction(fn):
                raise UsageError(f"AsyncCache.cached decorates coroutine functions; {fn!r} is not one")
            kt = KeyTemplate(template, fn)

            @wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                v = await self.get(kt.format(*args, **kwargs), lambda: fn(*args, **kwargs), ttl)
                return answer() if v is P.NOT_FOUND else v

            async def invalidate(*a: Any, **kw: Any) -> int:
                return await self.invalidate(kt.format(*a, **kw))

            cast(Any, wrapper).key = kt.format
            cast(Any, wrapper).invalidate = invalidate
            return wrapper

        return cast(AsyncCachedDecorator, deco)

    # ------------------------------------------------------------------ misc

    @property
    def stats(self) -> dict[str, int]:
        """See :attr:`cachesync.Cache.stats`."""
        return dict(self.ctx.stats)

    async def ping(self) -> None:
        """Raise :class:`CacheUnavailableError` unless Redis answers."""
        try:
            if self.ctx.cluster:  # every primary must answer (a plain PING reaches one node only)
                await self._bounded(self.redis.ping(target_nodes="primaries"))
            else:
                await self._bounded(self.redis.ping())
        except _REDIS_DOWN as e:
            raise CacheUnavailableError(self.url, e) from e

    async def aclose(self, timeout: float | None = None) -> list[str]:
        """See :meth:`cachesync.Cache.close`: waits for delayed steps and their retries (at most ``timeout``,
        default ``double_delete_delay + 10`` seconds), closes the pool, and returns (and logs once at ERROR) the
        keys whose delayed step could not be delivered."""
        if self.l1 is not None:
            await self.l1.aclose()
        wait = self.options.double_delete_delay + 10.0 if timeout is None else check_non_negative("timeout", timeout)
        if self._tasks:
            _, late = await asyncio.wait(list(self._tasks), timeout=wait)
            for t in late:
                t.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
        undelivered = list(dict.fromkeys(k for ks in self._undelivered.values() for k in ks))
        self._undelivered.clear()
        if undelivered:
            log.error("cachesync: aclose() gave up after %.1fs; delayed steps NOT delivered for keys %r "
                      "(invalidate them again, or record them in the outbox)", wait, undelivered)
        self._watchdog.stop()
        if self._kept is not None:
            await self._kept.close()
        if self._owns_client:
            await self.redis.aclose()
        return undelivered

    async def __aenter__(self) -> AsyncCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


