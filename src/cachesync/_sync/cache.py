"""The synchronous driver: executes :mod:`cachesync.protocol` flows with redis-py."""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, Unpack, cast, overload

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import cache_metrics as _cm
from .. import core as P
from .. import tracing as _tr
from .._types import CachedDecorator
from .._driver import CLUSTER_DOWN, DEFAULT_REDIS_URL, KEPT_COMMANDS, KeyTemplate, connect, is_cluster, log, wraps
from ..errors import CacheUnavailableError, InvalidationError, RedisCommandError, UsageError
from ..core.keys import prefix_scan
from ..core.l1 import L1Options
from .conns import kept
from .l1 import L1Sync
from ..core.options import CacheOptions, CacheOptionsKwargs, check_non_negative

T = TypeVar("T")

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, *CLUSTER_DOWN)

Scheduler = Callable[[float, Callable[[], None]], Any]


_CACHES: weakref.WeakSet[Cache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: the flights they were leading (their locks held) would
    never end there, and a read of such a key in the child would join one and wait for ever; the fallback permits
    they held would never come back (a child's fallback loads would block for ever once they were all taken);
    the delayed steps they had scheduled are the parent's to deliver (the child's close() would wait for them and
    report them undelivered), and a lock one of them held would stay held."""
    for c in list(_CACHES):
        c._flights = {}
        c._flights_lock = threading.Lock()
        c._fallback = threading.BoundedSemaphore(c.options.fallback_concurrency)
        c._pending = set()
        c._pending_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Flight:
    """One in-process load in flight: followers block on ``lock`` (held by the leader until it is done)."""

    __slots__ = ("lock", "result", "exc")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.result: Any = None
        self.exc: BaseException | None = None


class _Pending:
    """A delayed step (e.g. the second delete of ``delayed_double_delete``) not yet delivered."""

    __slots__ = ("keys", "done", "timer", "abandoned")

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.done = threading.Event()
        self.timer: Any = None
        self.abandoned = False


def _thread_scheduler(delay: float, fn: Callable[[], None]) -> threading.Timer:
    t = threading.Timer(delay, fn)
    t.daemon = True
    t.start()
    return t


class Cache:
    """A consistent cache-aside cache on Redis (synchronous; thread-safe).

    ``Cache(redis_url="redis://127.0.0.1:6379/0", namespace="default", **options)``; every option is a field
    of :class:`cachesync.CacheOptions`. ``client=`` passes a ready redis-py client (``Redis`` or
    ``RedisCluster``) instead of a URL; ``scheduler=`` replaces the timer thread that runs delayed steps
    (``scheduler(delay_seconds, fn)``), for tests.
    """

    def __init__(self, redis_url: str = DEFAULT_REDIS_URL, *, client: Any = None,
                 scheduler: Scheduler | None = None, l1: L1Options | bool | Mapping[str, Any] | None = None,
                 record_namespace: bool = True, **options: Unpack[CacheOptionsKwargs]) -> None:
        self.options = CacheOptions.build(**options)
        l1_options = L1Options.build(l1)
        self.redis, self.url, owned_url = connect(redis_url, client, self.options, redis)
        self._owns_client = owned_url is not None
        self.ctx = P.Context(self.options, cluster=is_cluster(self.redis))
        # GET/MGET/EVALSHA on connections kept checked out of the pool, where that is safe (cachesync._sync.conns)
        self._kept = kept(self.redis) if self.options.kept_connections else None
        self._send: Callable[..., Any] = self._kept if self._kept is not None else self.redis.execute_command
        self._metrics = _cm.instrument(self)  # None unless metrics= (stats stay a plain dict)
        self._flights: dict[str, _Flight] = {}
        self._flights_lock = threading.Lock()  # a flight's end and _written's detach (never the join)
        _CACHES.add(self)  # (reset in a forked child)
        self._fallback = threading.BoundedSemaphore(self.options.fallback_concurrency)
        self._scheduler = scheduler or _thread_scheduler
        self._pending: set[_Pending] = set()
        self._pending_lock = threading.Lock()
        self.l1: L1Sync | None = None  # in-process L1 (``l1=``): see cachesync.l1 and docs/l1.md
        if l1_options is not None:
            self.l1 = L1Sync(self, l1_options, owned_url)
            self.l1.core.add_listener(self._detach)  # another process's write, heard: its keys' flights too
        self._seen: threading.Thread | None = _cm.record_namespace_sync(self) if record_namespace else None

    # ------------------------------------------------------------------ driver

    def _command(self, eff: P.Cmd) -> Any:
        if eff.route is not None and self.ctx.cluster:  # a keyless command: on the key's primary, or on all
            r = self.redis
            nodes = r.get_primaries() if eff.route == "*" else r.get_node_from_key(eff.route)
            return r.execute_command(*eff.args, target_nodes=nodes)
        if self._kept is not None and eff.args[0] in KEPT_COMMANDS:
            return self._kept(*eff.args)
        return self.redis.execute_command(*eff.args)

    def _pipeline(self, cmds: Sequence[tuple[Any, ...]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for args in cmds:
            pipe.execute_command(*args)
        return cast(list[Any], pipe.execute(raise_on_error=False))

    def _batch(self, eff: P.Batch) -> list[Any]:
        cmds = eff.cmds
        if self._kept is not None and all(args[0] in KEPT_COMMANDS for args in cmds):
            res = self._kept.many(cmds, lambda: self._pipeline(cmds))
        else:
            res = self._pipeline(cmds)
        out: list[Any] = []
        for r in res:
            if isinstance(r, _REDIS_DOWN):
                raise r
            out.append(P.NoScript() if isinstance(r, NoScriptError) else
                       P.CommandError(str(r)) if isinstance(r, Exception) else r)
        return out

    def run(self, flow: P.Flow[T], loader: Callable[..., Any] | None = None) -> T:
        """Run a protocol flow (:mod:`cachesync.protocol`, or an add-on's, e.g. :mod:`cachesync.bloom`) to its
        result: the one way any code drives this cache. Its ``Cmd`` effects go to Redis, ``Load`` effects call
        ``loader``, ``Schedule`` effects become background steps. An unreachable Redis raises
        :class:`CacheUnavailableError` unless the flow handles it; an error reply raises :class:`RedisCommandError`.
        """
        return self._run(flow, loader)

    def _run(self, flow: P.Flow[T], loader: Callable[..., Any] | None = None,
             first: tuple[Any, BaseException | None] | None = None) -> T:
        """:meth:`run`; ``first``: the (reply, exception) of the flow's first command, already sent by the
        caller (the hit fast path of :meth:`_read`); it is answered with that instead of sending it again."""
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
                            send = self._command(eff)
                    except NoScriptError:
                        throw = P.NoScript()
                    except _REDIS_DOWN as e:
                        throw = P.RedisDown(e)
                    except ResponseError as e:
                        throw = P.CommandError(str(e))
                    except BaseException as e:  # KeyboardInterrupt, SystemExit: the flow releases what it holds
                        throw = e
                    if t0:
                        waited += time.perf_counter() - t0
                elif t is P.Batch:
                    try:
                        send = self._batch(eff)
                    except _REDIS_DOWN as e:
                        throw = P.RedisDown(e)
                    except BaseException as e:
                        throw = e
                elif t is P.Load:
                    if loader is None:
                        raise UsageError("the flow asked for a load, but run() was given no loader")
                    t0 = time.perf_counter() if self._metrics is not None else 0.0
                    try:
                        if eff.fallback:
                            with self._fallback:
                                send = loader() if eff.keys is None else loader(eff.keys)
                        else:
                            send = loader() if eff.keys is None else loader(eff.keys)
                    except BaseException as e:  # incl. KeyboardInterrupt: thrown in, so the lease is released
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
        pending = _Pending(eff.keys)
        with self._pending_lock:
            self._pending.add(pending)

        def run(attempt: int) -> None:
            if pending.abandoned:
                return
            try:
                self.run(eff.flow_factory())
            except Exception as e:  # retried until it succeeds or close() gives up: never dropped silently
                if pending.abandoned:
                    return
                backoff = min(30.0, 0.1 * 2 ** attempt)
                log.error("cachesync: delayed step for %r failed (attempt %d), retrying in %.1fs: %s",
                          eff.keys, attempt + 1, backoff, e)
                pending.timer = self._scheduler(backoff, lambda: run(attempt + 1))
                return
            with self._pending_lock:
                self._pending.discard(pending)
            pending.done.set()

        pending.timer = self._scheduler(eff.delay, lambda: run(0))

    def _single(self, key: str, fn: Callable[[], P.Entry[Any]]) -> P.Entry[Any]:
        if not self.options.singleflight:
            return fn()
        st = self.ctx.stats
        while True:
            mine = _Flight()
            f = self._flights.setdefault(key, mine)  # atomic: exactly one caller becomes the leader
            if f is mine:
                break
            st["singleflight_joins"] += 1
            with f.lock:  # wait for the leader
                pass
            if f.exc is not None and not isinstance(f.exc, (KeyboardInterrupt, SystemExit)):
                raise f.exc
            if f.exc is None and P.follower_accepts(f.result):
                _cm.joined(st, f.result)  # stats count per request: the follower's own outcome
                return cast(P.Entry[Any], f.result)
            st["singleflight_retries"] += 1  # the leader was interrupted, or its value may predate a write
            if f.exc is None and f.result.source == "fallback":
                # Redis failed the leader: the followers read again side by side, each alone (in a new flight
                # each would wait for the previous one's load in turn)
                return fn()
        try:
            mine.result = fn()
            return cast(P.Entry[Any], mine.result)
        except BaseException as e:
            mine.exc = e
            raise
        finally:
            with self._flights_lock:
                if self._flights.get(key) is mine:  # else _written detached it (a newer flight may lead now)
                    del self._flights[key]
            mine.lock.release()

    # ------------------------------------------------------------------ reads

    @overload
    def get(self, key: str, loader: Callable[[], P.Versioned[T] | P.NotFound],
            ttl: float | None = None) -> T | P.NotFound: ...

    @overload
    def get(self, key: str, loader: Callable[[], T], ttl: float | None = None) -> T | P.NotFound: ...

    def get(self, key: str, loader: Callable[[], Any], ttl: float | None = None) -> Any:
        """The cached value of ``key``, loading it with ``loader()`` on a miss (leased, single-flight).

        ``loader`` returns the value, ``Versioned(value, version)``, or ``NOT_FOUND`` (cached as a negative
        entry for ``negative_ttl``). ``ttl`` defaults to ``default_ttl``. Returns the value or ``NOT_FOUND``.
        """
        if self._metrics is not None:  # metrics/tracing: the instrumented path
            return self.get_entry(key, loader, ttl).value
        try:
            l1 = self.l1
            if l1 is not None:  # the L1 hit, inlined (one call less than get_entry)
                e = l1.core.lookup(key)
                if e is not None:
                    return e.value
                return self._l1_miss(l1, key, loader, ttl).value
            return self._read(key, loader, ttl).value
        except Exception:  # a read that raised: counted as in get_entry
            self.ctx.stats["read_errors"] += 1
            raise

    @overload
    def get_entry(self, key: str, loader: Callable[[], P.Versioned[T] | P.NotFound],
                  ttl: float | None = None) -> P.Entry[T]: ...

    @overload
    def get_entry(self, key: str, loader: Callable[[], T], ttl: float | None = None) -> P.Entry[T]: ...

    def get_entry(self, key: str, loader: Callable[[], Any], ttl: float | None = None) -> P.Entry[Any]:
        """Like :meth:`get`, returning the full :class:`Entry` (version, stale flag, source)."""
        try:
            if self._metrics is not None and self._metrics.traced:
                return cast(P.Entry[Any], _tr.traced_get(self, lambda: self._get_entry(key, loader, ttl)))
            return self._get_entry(key, loader, ttl)
        except Exception:  # a read that raised (loader error, Redis down with on_redis_error="fail", ...)
            self.ctx.stats["read_errors"] += 1
            raise

    def _get_entry(self, key: str, loader: Callable[[], Any], ttl: float | None) -> P.Entry[Any]:
        l1 = self.l1
        if l1 is not None:
            e = l1.core.lookup(key)
            if e is not None:
                return cast(P.Entry[Any], e)
            return self._l1_miss(l1, key, loader, ttl)
        return self._read(key, loader, ttl)

    def _l1_miss(self, l1: L1Sync, key: str, loader: Callable[..., Any], ttl: float | None) -> P.Entry[Any]:
        return self._single(key, lambda: l1.load(
            key, ttl, lambda: self._run(P.get_flow(self.ctx, key, ttl), loader)))

    def _read(self, key: str, loader: Callable[..., Any], ttl: float | None) -> P.Entry[Any]:
        """The hit fast path: send :func:`~cachesync.protocol.get_flow`'s first command (the plain ``GET``)
        directly and serve :func:`~cachesync.protocol.fresh_hit`; anything else (a miss, a stale-marked or corrupt
        entry, an error) runs the flow single-flight, answering its first command with this reply. Concurrent
        hits of one key each read Redis (as a plain client would); misses share one flight."""
        ctx = self.ctx
        args = P.hit_args(ctx, key, ttl)
        first: tuple[Any, BaseException | None]
        try:
            f = self._send(*args)
        except Exception as e:  # mapped by _run exactly as if the flow had sent the command
            first = (None, e)
        else:
            try:
                entry = P.fresh_hit(ctx, key, f, False)
                if entry is not None:
                    return entry
            except P.CorruptEntry:
                pass  # the flow sees the same reply and repairs the entry
            first = (f, None)
        return self._single(key, lambda: self._run(P.get_flow(ctx, key, ttl), loader, first))

    @overload
    def get_many(self, keys: Iterable[str],
                 loader_many: Callable[[list[str]], Mapping[str, P.Versioned[T] | P.NotFound]],
                 ttl: float | None = None) -> dict[str, T | P.NotFound]: ...

    @overload
    def get_many(self, keys: Iterable[str], loader_many: Callable[[list[str]], Mapping[str, T]],
                 ttl: float | None = None) -> dict[str, T | P.NotFound]: ...

    def get_many(self, keys: Iterable[str], loader_many: Callable[[list[str]], Mapping[str, Any]],
                 ttl: float | None = None) -> dict[str, Any]:
        """Values of many keys: one round trip to read, one ``loader_many(missing_keys)`` call, one to fill.

        ``loader_many`` returns a mapping key -> value (or ``Versioned``); a key it leaves out is ``NOT_FOUND``.
        """
        if self.l1 is not None:
            entries = self.get_many_entries(keys, loader_many, ttl)
            return {k: e.value for k, e in entries.items()}
        keys = P.key_list(keys, "get_many")
        try:
            return self.run(P.get_many_values_flow(self.ctx, keys, ttl), loader_many)
        except Exception:
            self.ctx.stats["read_errors"] += len(set(keys))
            raise

    @overload
    def get_many_entries(self, keys: Iterable[str],
                         loader_many: Callable[[list[str]], Mapping[str, P.Versioned[T] | P.NotFound]],
                         ttl: float | None = None) -> dict[str, P.Entry[T]]: ...

    @overload
    def get_many_entries(self, keys: Iterable[str], loader_many: Callable[[list[str]], Mapping[str, T]],
                         ttl: float | None = None) -> dict[str, P.Entry[T]]: ...

    def get_many_entries(self, keys: Iterable[str], loader_many: Callable[[list[str]], Mapping[str, Any]],
                         ttl: float | None = None) -> dict[str, P.Entry[Any]]:
        """Like :meth:`get_many`, returning :class:`Entry` objects."""
        keys = P.key_list(keys, "get_many")
        try:
            if self.l1 is not None:  # L1 hits served; the rest read in one batch and filled per key (cachesync.l1)
                return self.l1.get_many(keys, ttl, lambda missing: self.run(
                    P.get_many_flow(self.ctx, missing, ttl), loader_many))
            return self.run(P.get_many_flow(self.ctx, list(keys), ttl), loader_many)
        except Exception:
            self.ctx.stats["read_errors"] += len(set(keys))
            raise

    def peek(self, key: str) -> dict[str, Any] | None:
        """The raw entry of ``key`` (fields ``value``, ``ver``, ``lt``, ``fl``, ``ti`` ...) without side effects."""
        return self.run(P.peek_flow(self.ctx, key))

    # ------------------------------------------------------------------ writes

    def invalidate(self, *keys: str, version: Any = None) -> int:
        """Invalidate ``keys`` after a committed write; voids outstanding leases.

        ``version`` (the committed row version) raises the keys' version floor so that no older value can be
        filled. Returns how many keys held a value. Raises :class:`InvalidationError` naming the keys when
        Redis cannot be reached.
        """
        if self._metrics is not None and self._metrics.traced:
            with _tr.span("cachesync.invalidate", {"cachesync.namespace": self.options.namespace,
                                                  "cachesync.keys": len(keys)}):
                return self._invalidate(keys, version)
        return self._invalidate(keys, version)

    def _invalidate(self, keys: tuple[str, ...], version: Any) -> int:
        P.star_keys(keys, "invalidate")
        if not keys:
            return 0
        try:
            return self.run(P.invalidate_flow(self.ctx, keys, version))
        finally:
            self._written(keys)

    def _written(self, keys: Sequence[str]) -> None:
        """After a write's cache step (returned or raised): drop this process's L1 copies, and detach the keys'
        flights in progress, whose GET or fill may have run in Redis before the step (read-your-writes: a read
        that starts now leads a flight of its own instead of joining one; their followers keep them)."""
        self._detach(keys)
        if self.l1 is not None:
            self.l1.invalidate_local(keys)

    def _detach(self, keys: Sequence[str] | None) -> None:
        """Detach the flights in progress of ``keys`` (None: all), see :meth:`_written`; also what the L1 calls when
        it applies an invalidation (another process's write) or flushes. Never raises."""
        if self._flights:
            with self._flights_lock:
                if keys is None:
                    self._flights.clear()
                else:
                    for k in keys:
                        self._flights.pop(k, None)

    def invalidate_many(self, items: Iterable[tuple[Sequence[str], Any]]) -> int:
        """Invalidate a batch of ``(keys, version)`` pairs, each key with its own committed version, exactly as
        :meth:`invalidate` does for each pair: one ``invalidate.lua`` call per 500 keys (per slot group on a
        cluster). A key named twice keeps its highest version. What the relay, the workers, CDC and the auditor
        call. Returns how many keys held a value; raises :class:`InvalidationError` naming the keys not yet
        invalidated when Redis cannot be reached or refuses a call (an error reply: a read-only replica, OOM)
        (idempotent: retry the whole batch).
        """
        return self._invalidate_merged(P.merge_invalidations(items))

    def _invalidate_merged(self, versions: dict[str, str]) -> int:
        """:meth:`invalidate_many` of an already merged batch (key -> encoded version, "" = unknown; what
        :func:`~cachesync.core.merge_invalidations` returns): CDC merges while it reads and calls this."""
        try:
            # a batch applied inside a recording span (a relay delivery, a worker apply) announces that span
            tp = (_tr.current_traceparent() or "") if self.ctx.channel else ""
            return self.run(P.invalidate_many_flow(self.ctx, versions, tp))
        finally:
            self._written(list(versions))

    def keys_with_prefix(self, *prefixes: str) -> Iterator[str]:
        """Every cached key of this namespace that starts with one of ``prefixes`` (``""``: every key), each
        once, found by ``SCAN`` (on every primary of a cluster); for prefix invalidations. Raises
        :class:`InvalidationError` naming the prefixes when Redis cannot be reached."""
        P.star_keys(prefixes, "keys_with_prefix")
        pats, match = prefix_scan(self.ctx.ns, prefixes)
        seen: set[str] = set()
        try:
            for pat in pats:
                for raw in self.redis.scan_iter(match=pat, count=1000):
                    k = match(raw)
                    if k is not None and k not in seen:
                        seen.add(k)  # SCAN may return a key twice
                        yield k
        except _REDIS_DOWN as e:
            raise InvalidationError([f"{p}*" for p in prefixes], e) from e

    def set(self, key: str, value: Any, ttl: float | None = None, version: Any = None) -> bool:
        """Store a writer's new value; voids leases. With ``version``, refuses (returns False) to go backwards."""
        if self._metrics is not None and self._metrics.traced:
            with _tr.span("cachesync.set", {"cachesync.namespace": self.options.namespace}):
                return self._set(key, value, ttl, version)
        return self._set(key, value, ttl, version)

    def _set(self, key: str, value: Any, ttl: float | None, version: Any) -> bool:
        try:
            return self.run(P.set_flow(self.ctx, key, value, ttl, version, guarded=True))
        finally:
            self._written((key,))

    @contextmanager
    def write(self, *keys: str, strategy: str | None = None, value: Any = P.MISSING, version: Any = None,
              ttl: float | None = None, delay: float | None = None) -> Iterator[P.WritePlan]:
        """Wrap a database write: the strategy's cache steps run before the block, after it, after a delay.

        ``with cache.write("user:1") as w: <update and commit>``. For ``db_then_set_versioned`` (and the unsafe
        ``db_then_cache``) call ``w.set_value(new, version=...)`` inside the block or pass ``value=``;
        ``cache_then_db`` needs ``value=`` up front. If the block raises, the strategy's ``on_error`` steps run
        (the safe strategies invalidate, in case the commit happened) and the exception propagates.
        """
        plan = P.WritePlan(self.ctx, keys, strategy, value, version, ttl, delay)
        if self._metrics is not None and self._metrics.traced:
            with _tr.span("cachesync.write", {"cachesync.namespace": self.options.namespace,
                                             "cachesync.keys": len(plan.keys)}), self._write(plan) as w:
                yield w
            return
        with self._write(plan) as w:
            yield w

    @contextmanager
    def _write(self, plan: P.WritePlan) -> Iterator[P.WritePlan]:
        self.run(plan.before())
        try:
            yield plan
        except BaseException:
            try:
                self.run(plan.after(failed=True))
            finally:
                self._written(plan.keys)
            raise
        try:
            self.run(plan.after(failed=False))
        finally:
            self._written(plan.keys)

    def cached(self, template: str, ttl: float | None = None, *, not_found: Any = P.NOT_FOUND) -> CachedDecorator:
        """Decorator: ``@cache.cached("user:{user_id}")`` caches the function's result under the formatted key.

        The wrapper has ``.key(*args, **kwargs)`` and ``.invalidate(*args, **kwargs)``. ``not_found`` (default
        ``NOT_FOUND``): what the wrapper gives for a ``NOT_FOUND`` result: an exception (instance or class) is
        raised (``not_found=HTTPException(404)`` on a web endpoint), a callable is called (``not_found=lambda:
        None``) and its result returned, any other value is returned instead.
        """
        answer = P.not_found_answer(not_found)

        def deco(fn: Callable[..., Any]) -> Any:
            kt = KeyTemplate(template, fn)

            @wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                v = self.get(kt.format(*args, **kwargs), lambda: fn(*args, **kwargs), ttl)
                return answer() if v is P.NOT_FOUND else v

            cast(Any, wrapper).key = kt.format
            cast(Any, wrapper).invalidate = lambda *a, **kw: self.invalidate(kt.format(*a, **kw))
            return wrapper

        return cast(CachedDecorator, deco)

    # ------------------------------------------------------------------ misc

    @property
    def stats(self) -> dict[str, int]:
        """Counters: hits, misses, negative_hits, stale_served, loads, fills, fills_refused, waits, ..."""
        return dict(self.ctx.stats)

    def ping(self) -> None:
        """Raise :class:`CacheUnavailableError` unless Redis answers."""
        try:
            if self.ctx.cluster:  # every primary must answer (a plain PING reaches one node only)
                self.redis.ping(target_nodes="primaries")
            else:
                self.redis.ping()
        except _REDIS_DOWN as e:
            raise CacheUnavailableError(self.url, e) from e

    def close(self, timeout: float | None = None) -> list[str]:
        """Wait for pending delayed steps *and their retries*, then close the pool (if this cache created it).

        ``timeout`` (default ``double_delete_delay + 10`` seconds) bounds the wait. Returns the keys whose
        delayed step could still not be delivered (empty when everything was delivered); they are also logged
        once at ERROR, so that no scheduled second delete is ever dropped silently.
        """
        if self.l1 is not None:
            self.l1.close()
        wait = self.options.double_delete_delay + 10.0 if timeout is None else check_non_negative("timeout", timeout)
        deadline = time.monotonic() + wait
        if self._seen is not None:  # the namespace record (one SET): not written after close() returns
            self._seen.join(min(wait, self.options.socket_timeout + self.options.connect_timeout))
            self._seen = None
        with self._pending_lock:
            pending = list(self._pending)
        for p in pending:
            p.done.wait(max(0.0, deadline - time.monotonic()))
        undelivered: list[str] = []
        with self._pending_lock:
            for p in list(self._pending):
                p.abandoned = True
                if isinstance(p.timer, threading.Timer):
                    p.timer.cancel()
                undelivered.extend(p.keys)
            self._pending.clear()
        undelivered = list(dict.fromkeys(undelivered))
        if undelivered:
            log.error("cachesync: close() gave up after %.1fs; delayed steps NOT delivered for keys %r "
                      "(invalidate them again, or record them in the outbox)", wait, undelivered)
        if self._kept is not None:
            self._kept.close()
        if self._owns_client:
            self.redis.close()
        return undelivered

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
