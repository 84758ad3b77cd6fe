"""The L1's synchronous driver: a daemon thread runs :func:`cachesync.core.l1.subscription_flow` with redis-py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import RedisError

from .._driver import make_core, socket_probe, subscription_pool, wait_readable
from ..core.l1 import Close, Connect, L1Options, Read, Send, Sleep, SubscriptionLost, subscription_flow

_POLL = 0.05  # how often a blocked read looks at the closed flag


def _parser_has_data(conn: Any) -> bool | None:
    """Whether redis-py's parser of ``conn`` holds bytes it has not returned yet, looked at without reading the
    socket (hiredis: its reader's buffer, and the reply redis-py before 8 parsed ahead in ``can_read``; the
    pure-Python parser: its socket buffer); None for a parser it cannot look into."""
    p = getattr(conn, "_parser", None)
    reader = getattr(p, "_reader", None)
    if reader is not None and callable(getattr(reader, "has_data", None)):
        return bool(reader.has_data()) or getattr(p, "_next_response", False) is not False
    buf = getattr(p, "_buffer", None)
    if buf is not None and callable(getattr(buf, "unread_bytes", None)):
        return bool(buf.unread_bytes())
    return None


class L1Sync:
    """The L1 of a :class:`cachesync.Cache` (``cache.l1``): the store (``core``) plus its subscriber thread."""

    def __init__(self, cache: Any, options: L1Options, url: str | None, *,
                 clock: Callable[[], float] | None = None) -> None:
        self.core = make_core(cache, options, clock)
        self._pool = subscription_pool(redis.ConnectionPool, url, None if url else cache.redis,
                                       cache.options.connect_timeout, cache.options.namespace)
        self._conn: Any = None
        self._buffered = True  # the subscription connection's parser may hold bytes (see _read)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.core.add_state_listener(lambda up: self._ready.set() if up else self._ready.clear())
        self._thread = threading.Thread(target=self._run, name=f"cachesync-l1-{self.core.ns}", daemon=True)
        self.start()

    def start(self) -> None:
        """Start the subscriber thread (idempotent; the constructor does it)."""
        if not self._thread.is_alive() and self._thread.ident is None and not self.core.closed:
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
        # Behind (rule 5 of cachesync.l1) is set BEFORE any call that may take bytes off the socket: redis-py's
        # can_read reads the socket into the parser's buffer (the pure-Python parser; hiredis before redis-py 8),
        # where the lookups' probe cannot see them. (Set after can_read returned, a subscriber stalled in between
        # served the old copy.) The wait itself polls the socket, which takes nothing off it.
        core = self.core
        conn = self._conn
        if self._buffered:  # the last read may have brought more than one reply
            has = _parser_has_data(conn)
            if has is None:  # a parser we cannot look into: ask it, as behind (it may read the socket)
                core.behind()
                if conn.can_read(timeout=0):
                    return conn.read_response()
            elif has:
                core.behind()
                return conn.read_response()
            self._buffered = False
        core.caught_up()  # everything that reached the connection is applied
        sock = getattr(conn, "_sock", None)
        if sock is None:
            raise OSError("the subscription connection has no socket")
        deadline = time.monotonic() + timeout
        while not core.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self._wait_readable(sock, min(left, _POLL)):
                core.behind()  # lookups bypass until this is applied
                self._buffered = True
                return conn.read_response()
        return None

    @staticmethod
    def _wait_readable(sock: Any, timeout: float) -> bool:
        """Wait for bytes on the subscription's socket, taking none off it (:func:`cachesync._driver.wait_readable`;
        a method so that tests can hold the subscriber here)."""
        return wait_readable(sock, timeout)

    def _run(self) -> None:
        """The subscriber thread: restarted (after bypassing the L1) whenever it fails unexpectedly."""
        while not self.core.closed:
            try:
                self._run_once()
                return
            except Exception as e:  # never "up" while deaf
                self.core.subscriber_died(e)
                self._drop_connection()
                self._stop.wait(0.2)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.disconnect()
            except Exception:  # noqa: S110 - the connection is gone either way
                pass

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
                    self._buffered = True
                    self._conn.connect()
                    self.core.set_probe(socket_probe(getattr(self._conn, "_sock", None)))
                elif t is Close:
                    self.core.set_probe(None)
                    self._drop_connection()
                elif t is Sleep:
                    self._stop.wait(eff.seconds)
            except (RedisError, OSError) as e:
                throw = SubscriptionLost(f"{type(e).__name__}: {e}")
