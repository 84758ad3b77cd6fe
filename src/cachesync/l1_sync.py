"""The L1's synchronous driver: a daemon thread runs :func:`cachesync.l1.subscription_flow` with redis-py."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import RedisError

from .errors import ConfigError
from .core import NOT_FOUND
from .l1 import L1, Close, Connect, L1Options, Read, Send, Sleep, SubscriptionLost, subscription_flow

_POLL = 0.05  # how often a blocked read looks at the closed flag


def subscription_pool(pool_cls: Any, url: str | None, client: Any, connect_timeout: float, ns: str) -> Any:
    """A pool for the subscription connection: same server as the cache, RESP2, no health-check PINGs,
    named ``cachesync-l1:<namespace>`` in ``CLIENT LIST``."""
    name = f"cachesync-l1:{ns}"
    if url is not None:
        return pool_cls.from_url(url, protocol=2, decode_responses=False, health_check_interval=0,
                                 socket_connect_timeout=connect_timeout, socket_keepalive=True, client_name=name)
    if type(client).__name__ == "RedisCluster":
        return ClusterSubscriptionPool(pool_cls, client, name)
    cp = getattr(client, "connection_pool", None)
    if cp is None:
        raise ConfigError("l1", f"the L1 needs a redis-py client with a connection_pool or a RedisCluster, not "
                                f"{type(client).__name__}")
    kw = {k: v for k, v in cp.connection_kwargs.items() if not k.startswith("maint")}
    kw.update(protocol=2, decode_responses=False, health_check_interval=0, client_name=name)
    return pool_cls(connection_class=cp.connection_class, **kw)


class ClusterSubscriptionPool:
    """Connections for the L1's subscription on a Redis Cluster (sync or asyncio ``RedisCluster``).

    A ``PUBLISH`` on any node of a cluster reaches the subscribers of every node (the cluster bus carries it), so
    one subscription on one node hears the invalidations of every slot. Each new connection goes to the next
    node the client knows, so a reconnect after that node failed lands on another one (the L1 is flushed and
    bypassed meanwhile, as on a single server). Same settings as the client's connections, RESP2.
    """

    def __init__(self, pool_cls: Any, client: Any, client_name: str) -> None:
        self.pool_cls, self.client, self.client_name = pool_cls, client, client_name
        self._pools: dict[str, Any] = {}
        self._next = 0
        self._async = pool_cls.__module__.startswith("redis.asyncio")

    def _nodes(self) -> list[Any]:
        nodes = list(self.client.get_nodes())
        if not nodes:  # an asyncio cluster client that has not run a command yet
            nodes = list(getattr(self.client.nodes_manager, "startup_nodes", {}).values())
        if not nodes:
            raise redis.ConnectionError("the cluster client knows no node yet")
        return sorted(nodes, key=lambda n: n.name)

    def make_connection(self) -> Any:
        nodes = self._nodes()
        node = nodes[self._next % len(nodes)]
        self._next += 1
        pool = self._pools.get(node.name)
        if pool is None:
            if hasattr(node, "connection_kwargs"):  # redis.asyncio.cluster.ClusterNode
                kw, cls = dict(node.connection_kwargs), node.connection_class
            else:  # redis.cluster.ClusterNode: its own Redis client
                cp = node.redis_connection.connection_pool
                kw, cls = dict(cp.connection_kwargs), cp.connection_class
            kw = {k: v for k, v in kw.items() if not k.startswith("maint") and k != "event_dispatcher"}
            kw.update(host=node.host, port=node.port, protocol=2, decode_responses=False, health_check_interval=0,
                      client_name=self.client_name)
            pool = self._pools[node.name] = self.pool_cls(connection_class=cls, **kw)
        return pool.make_connection()

    def disconnect(self) -> Any:
        """Close the pools' connections (a coroutine for the asyncio client)."""
        pools = list(self._pools.values())
        if self._async:
            async def close_all() -> None:
                for p in pools:
                    await p.disconnect()
            return close_all()
        for p in pools:
            p.disconnect()
        return None


def socket_probe(sock: Any) -> Callable[[], bool] | None:
    """"Has data arrived on ``sock``?" as one non-blocking ``select`` (None when there is no socket)."""
    if sock is None:
        return None
    fd = sock.fileno()
    sel = select.select
    rd = (fd,)
    return lambda: bool(sel(rd, (), (), 0)[0])


def make_core(cache: Any, options: L1Options, clock: Callable[[], float] | None) -> L1:
    """The :class:`L1` of a cache, sized with the cache's serializer."""
    o = cache.options
    if not o.broadcast_invalidations:
        raise ConfigError("l1", "needs broadcast_invalidations=True (other processes learn of writes from it)")
    ser = o.serializer_obj

    def size_of(key: str, value: Any) -> int:
        return len(key) + 64 + (0 if value is NOT_FOUND else len(ser.dumps(value)))

    core = L1(options, o.namespace, size_of=size_of, negative_ttl=o.negative_ttl,
              **({"clock": clock} if clock is not None else {}))
    core.traced = bool(o.tracing)
    return core


class L1Sync:
    """The L1 of a :class:`cachesync.Cache` (``cache.l1``): the store (``core``) plus its subscriber thread."""

    def __init__(self, cache: Any, options: L1Options, url: str | None, *,
                 clock: Callable[[], float] | None = None) -> None:
        self.core = make_core(cache, options, clock)
        self._pool = subscription_pool(redis.ConnectionPool, url, None if url else cache.redis,
                                       cache.options.connect_timeout, cache.options.namespace)
        self._conn: Any = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.core.add_state_listener(lambda up: self._ready.set() if up else self._ready.clear())
        self._thread = threading.Thread(target=self._run, name=f"cachesync-l1-{self.core.ns}", daemon=True)
        self._thread.start()

    # the hot path is Cache.get_entry -> core.lookup; misses come here
    def load(self, key: str, ttl: float | None, fetch: Callable[[], Any]) -> Any:
        """Read ``key`` with ``fetch()`` and fill the L1 unless an invalidation raced with the read."""
        core = self.core
        token = core.begin(key)
        entry = None
        try:
            entry = fetch()
            return entry
        finally:
            core.finish(key, token, entry, ttl)

    def get_many(self, keys: Any, ttl: float | None, fetch_many: Callable[[list[str]], Any]) -> dict[str, Any]:
        """Entries of ``keys`` in order: L1 hits, the rest read with ``fetch_many(missing)`` (one batch) and filled
        key by key unless an invalidation raced with the read (:meth:`L1.split`, :meth:`L1.finish_many`)."""
        core = self.core
        ukeys, hits, tokens = core.split(keys)
        if not tokens:
            return hits
        entries = None
        try:
            entries = fetch_many(list(tokens))
        finally:
            core.finish_many(tokens, entries, ttl)
        assert entries is not None
        return {k: hits[k] if k in hits else entries[k] for k in ukeys}

    def invalidate_local(self, keys: Any) -> None:
        """Drop this process's copies at once (read-your-writes); peers hear it on the channel."""
        self.core.invalidate(keys)

    @property
    def stats(self) -> dict[str, Any]:
        """See :attr:`cachesync.l1.L1.stats`."""
        return self.core.stats

    def wait_ready(self, timeout: float = 5.0) -> bool:
        """Block until the subscription is up (the L1 serves hits); False on timeout."""
        return self._ready.wait(timeout)

    def clear(self) -> None:
        """Flush this process's L1."""
        self.core.clear()

    def close(self) -> None:
        """Stop the subscriber thread and flush the L1."""
        self.core.close()
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._pool.disconnect()

    # ---------------------------------------------------------------- the subscriber thread

    def _read(self, timeout: float) -> Any:
        core = self.core
        conn = self._conn
        if conn.can_read(timeout=0):  # more is buffered or has arrived: the L1 is still behind
            core.behind()
            return conn.read_response()
        core.caught_up()  # everything that reached the connection is applied
        deadline = time.monotonic() + timeout
        while not core.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if conn.can_read(timeout=min(left, _POLL)):
                core.behind()  # lookups bypass until this is applied (rule 5 of cachesync.l1)
                return conn.read_response()
        return None

    def _run(self) -> None:
        """The subscriber thread: restarted (after bypassing the L1) whenever it fails unexpectedly."""
        while not self.core.closed:
            try:
                self._run_once()
                return
            except Exception as e:  # never "up" while deaf
                self.core.subscriber_died(e)
                if self._conn is not None:
                    conn, self._conn = self._conn, None
                    try:
                        conn.disconnect()
                    except Exception:  # noqa: S110
                        pass
                self._stop.wait(0.2)

    def _run_once(self) -> None:
        flow = subscription_flow(self.core)
        send: Any = None
        throw: BaseException | None = None
        while True:
            try:
                eff = flow.send(send) if throw is None else flow.throw(throw)
            except StopIteration:
                break
            send, throw = None, None
            t = type(eff)
            try:
                if t is Read:
                    send = self._read(eff.timeout)
                elif t is Send:
                    self._conn.send_command(*eff.args)
                elif t is Connect:
                    self._conn = self._pool.make_connection()
                    self._conn.connect()
                    self.core.set_probe(socket_probe(getattr(self._conn, "_sock", None)))
                elif t is Close:
                    self.core.set_probe(None)
                    if self._conn is not None:
                        conn, self._conn = self._conn, None
                        try:
                            conn.disconnect()
                        except Exception:  # noqa: S110
                            pass
                elif t is Sleep:
                    self._stop.wait(eff.seconds)
            except (RedisError, OSError) as e:
                throw = SubscriptionLost(f"{type(e).__name__}: {e}")
