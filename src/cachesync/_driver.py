"""Shared pieces of the sync and async drivers (no protocol logic here)."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import select
import string
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, cast
from urllib.parse import quote, unquote, unquote_plus

from redis.exceptions import ClusterError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .core import NOT_FOUND
from .core.l1 import L1, L1Options
from .errors import ConfigError, UsageError

log = logging.getLogger("cachesync")

CLUSTER_DOWN = (ClusterError, RedisClusterException)
"""Redis Cluster errors that mean "unreachable" like a ConnectionError: CLUSTERDOWN/MASTERDOWN replies, too many
redirections, no reachable startup node ("Redis Cluster cannot be connected"), a slot no node covers. (The
flows never send a cross-slot command, so a RedisClusterException here is not a usage error.)"""

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


SECRET_QUERY_KEYS = frozenset({"password", "pass", "passwd", "pwd", "secret", "token", "auth", "api_key", "apikey",
                               "access_token", "sslpassword", "sslkey_password", "private_key_password"})
"""Query parameters of a URL whose values are secrets (compared case-insensitively)."""

MASK = "***"


def _split_userinfo(url: str) -> tuple[str, str, str] | None:
    """(``scheme://``, userinfo, rest from the host on) of a URL with credentials, else None.

    Written by hand rather than with ``urlsplit``: a password may hold unencoded ``/``, ``#``, ``?``, ``%`` or
    ``@``, which end the netloc for ``urlsplit`` and would leave part of the password in the "path". The
    userinfo ends at the LAST ``@`` (an ``@`` in a query string makes this over-redact, never leak).
    """
    head, sep, rest = url.partition("://")
    if not sep or rest.startswith("/"):  # sqlite:///path, unix:///path: no authority
        return None
    at = rest.rfind("@")
    if at < 0:
        return None
    return head + "://", rest[:at], rest[at + 1:]


_QUERY_PARAM = re.compile(r"([?&;])([^=&#;?]+)=([^&#;]*)")


def url_secrets(url: object) -> list[str]:
    """Every secret a URL carries, as written and percent-decoded: the password of its userinfo
    (``user:password@``, ``:password@``) and the values of query parameters such as ``?password=`` (see
    :data:`SECRET_QUERY_KEYS`). Longest first."""
    if not isinstance(url, str):
        return []
    found: set[str] = set()
    parts = _split_userinfo(url)
    tail = url
    if parts is not None:
        _, userinfo, tail = parts
        _user, colon, pw = userinfo.partition(":")
        if colon and pw:
            found.update((pw, unquote(pw)))
            # the pieces between delimiters, which a driver that mis-parsed the URL may echo alone
            found.update(piece for piece in re.split(r"[/#?@:%]", pw) if len(piece) >= 3)
    for m in _QUERY_PARAM.finditer(tail):
        if unquote(m.group(2)).lower() in SECRET_QUERY_KEYS and m.group(3):
            found.update((m.group(3), unquote_plus(m.group(3)), unquote(m.group(3))))
    return sorted((s for s in found if s), key=len, reverse=True)


def encode_userinfo(url: str) -> str:
    """``url`` with the user and password of its userinfo percent-encoded where they hold characters a URL parser
    would take for delimiters (unencoded ``/ # ? @ :`` or a ``%`` not starting an escape), so that drivers parse
    the host, port and path correctly instead of failing on (and echoing) a piece of the password. Already
    encoded parts are left as they are."""
    parts = _split_userinfo(url)
    if parts is None:
        return url
    scheme, userinfo, tail = parts
    user, colon, pw = userinfo.partition(":")

    def enc(part: str) -> str:
        return quote(re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", part), safe="%!$&'()*+,;=-._~")

    return f"{scheme}{enc(user)}{colon}{enc(pw)}@{tail}"


def redact_url(url: object) -> str:
    """A URL with its password and secret query values replaced by ``***``: safe for logs, errors, reprs and CLI
    output. The one redaction function of cachesync (database, Redis and bus URLs alike). It never raises and never
    parses the port, so a URL with an out-of-range port or a password holding unencoded ``/ # % @ ?`` is still
    redacted; a value that is not a string is shown as its type only."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    out = url
    parts = _split_userinfo(url)
    if parts is not None:
        scheme, userinfo, tail = parts
        user, colon, _pw = userinfo.partition(":")
        if colon:
            out = f"{scheme}{user}:{MASK}@{tail}"

    def mask(m: re.Match[str]) -> str:
        secret = unquote(m.group(2)).lower() in SECRET_QUERY_KEYS
        return f"{m.group(1)}{m.group(2)}={MASK}" if secret else m.group(0)

    return scrub(_QUERY_PARAM.sub(mask, out), url)


def scrub(text: object, *urls: object, secrets: Iterable[str] = ()) -> str:
    """``text`` (a message, possibly a driver's own, which may echo a URL or a token of its password) with every
    secret of ``urls`` (see :func:`url_secrets`) and every string of ``secrets`` replaced by ``***``. Any
    length counts: a one-letter password mangles the message rather than leak."""
    out = str(text)
    tokens = {s for u in urls for s in url_secrets(u)} | {s for s in secrets if s}
    for tok in sorted(tokens, key=len, reverse=True):
        out = out.replace(tok, MASK)
    return out


def scrub_exception(e: BaseException, *urls: object) -> BaseException:
    """``e`` with its message scrubbed of the secrets of ``urls`` (in place: the same exception type, so callers
    that catch the driver's class still do), and its chained context dropped (it may hold the raw message)."""
    tokens = [s for u in urls for s in url_secrets(u)]
    if tokens:
        try:
            e.args = tuple(scrub(a, secrets=tokens) if isinstance(a, str) else a for a in e.args)
        except (AttributeError, TypeError):
            pass
        e.__context__ = None
        e.__cause__ = None
        e.__suppress_context__ = True
    return e


def check_redis_url(url: object) -> str:
    if not isinstance(url, str) or not url:
        raise UsageError(f"redis_url must be a non-empty string, got {url!r}")
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix", "valkey", "valkeys"):
        raise UsageError(f"redis_url {redact_url(url)!r} must start with redis://, rediss:// or unix://")
    if scheme.startswith("valkey"):
        url = "redis" + url[len("valkey"):]
    return encode_userinfo(url)


class KeyTemplate:
    """``"user:{user_id}"`` formatted from a function's bound arguments."""

    def __init__(self, template: str, fn: Callable[..., Any]) -> None:
        if not isinstance(template, str) or not template:
            raise UsageError(f"cached() needs a key template string, got {template!r}")
        self.template = template
        self.sig = inspect.signature(fn)
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        names = set(self.sig.parameters)
        for f in fields:
            root = f.split(".")[0].split("[")[0]
            if root not in names:
                raise UsageError(f"key template {template!r} names {{{f}}}, which is not a parameter of "
                                 f"{getattr(fn, '__qualname__', fn)!r} (parameters: {', '.join(names)})")

    def format(self, *args: Any, **kwargs: Any) -> str:
        bound = self.sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return self.template.format(**bound.arguments)


def wraps(fn: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return functools.wraps(fn)


def client_url(client: Any) -> str:
    """A password-free description of a given redis-py client for error messages.

    ``redis://host:port/db`` (or ``unix://path``) for a plain client, ``redis-cluster://host:port,host:port``
    (the known primaries, or the startup nodes before the first command) for a ``RedisCluster``.
    """
    try:
        if type(client).__name__ == "RedisCluster":
            nodes = [n.name for n in client.get_primaries()] if client.get_nodes() else []
            if not nodes:
                nodes = list(getattr(client.nodes_manager, "startup_nodes", None) or [])
                nodes = [n if isinstance(n, str) else getattr(n, "name", str(n)) for n in nodes]
            return "redis-cluster://" + ",".join(sorted(nodes)) if nodes else "redis-cluster://"
        kw = client.connection_pool.connection_kwargs
        if kw.get("path"):
            return f"unix://{kw['path']}"
        return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    except Exception:  # an unusual client: still give a useful message
        return f"redis ({type(client).__name__} given)"


def connect(redis_url: str, client: Any, options: Any, lib: Any,
            socket_timeout: bool = True) -> tuple[Any, str, str | None]:
    """The Redis client of a cache: ``client`` as given, or a new one for ``redis_url`` built with ``lib``
    (``redis`` or ``redis.asyncio``). Returns (client, URL safe to show, URL this cache owns or None).

    ``max_connections=None`` picks the plain pool (no practical limit, fastest); a number picks a blocking pool
    of that size, where a caller waits for a free connection instead of failing. ``socket_timeout=False``
    leaves the socket timeout to the caller (the asyncio driver bounds each command with ``asyncio.timeout``,
    which is cheaper than redis.asyncio's ``wait_for`` per read).
    """
    if client is not None:
        _check_bytes(getattr(client, "connection_pool", None), "client", client_url(client))
        return client, client_url(client), None
    url = check_redis_url(redis_url)
    kw: dict[str, Any] = dict(socket_timeout=options.socket_timeout if socket_timeout else None,
                              socket_connect_timeout=options.connect_timeout)
    try:
        if options.max_connections is None:
            pool = lib.ConnectionPool.from_url(url, max_connections=2**31, **kw)
        else:
            pool = lib.BlockingConnectionPool.from_url(url, max_connections=options.max_connections,
                                                       timeout=options.socket_timeout, **kw)
    except (ValueError, TypeError) as e:  # a bad port, db number or option: redis-py echoes tokens of the URL
        raise UsageError(f"redis_url {redact_url(redis_url)!r}: {scrub(e, redis_url, url)}") from None
    _check_bytes(pool, "redis_url", redact_url(url))
    return lib.Redis.from_pool(pool), redact_url(url), url


def _check_bytes(pool: Any, what: str, shown: str) -> None:
    """Refuse a client or URL whose replies are decoded to str (``decode_responses``): cachesync reads its entries
    as bytes, and every entry would read as corrupt and be deleted (writers' values too)."""
    kw = getattr(pool, "connection_kwargs", None)
    if isinstance(kw, dict) and kw.get("decode_responses"):
        raise UsageError(f"{what} {shown!r}: decode_responses must be off (cachesync reads its entries as bytes and "
                         "decodes values itself); remove decode_responses from the URL (redis-py reads any value given there, "
                         "'false' too, as on) or pass a client made without it")


def is_cluster(client: Any) -> bool:
    return type(client).__name__ == "RedisCluster"


# --------------------------------------------------------------------------- L1 subscription (both drivers)


def subscription_pool(pool_cls: Any, url: str | None, client: Any, connect_timeout: float, ns: str) -> Any:
    """A pool for the subscription connection: same server as the cache, RESP2, no health-check PINGs,
    named ``cachesync-l1:<namespace>`` in ``CLIENT LIST``."""
    name = f"cachesync-l1:{ns}"
    if url is not None:
        pool = pool_cls.from_url(url, socket_connect_timeout=connect_timeout, socket_keepalive=True)
        # set after from_url: the URL's query options (?protocol=3, ?decode_responses=...) override its keywords,
        # and a RESP3 subscription never saw its SUBSCRIBE confirmed (the L1 stayed bypassed, silently)
        pool.connection_kwargs.update(protocol=2, decode_responses=False, health_check_interval=0, client_name=name)
        return pool
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
            raise RedisConnectionError("the cluster client knows no node yet")
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


KEPT_COMMANDS = frozenset({"GET", "MGET", "EVALSHA"})
"""The commands the caches send on kept connections (``cachesync._sync.conns`` / ``cachesync._async.conns``): none
has a redis-py response callback, so the reply is the same as ``execute_command``'s."""

_NO_LIMIT = 2**31

_KEPT: weakref.WeakSet[Any] = weakref.WeakSet()


def _forget_kept_after_fork() -> None:
    for k in list(_KEPT):
        k.forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_kept_after_fork)


def keep(kept: Any) -> Any:
    """Register a kept-connection holder: in a forked child its ``forked()`` forgets the parent's connections."""
    _KEPT.add(kept)
    return kept


def keepable(client: Any, pool_cls: type, blocking_cls: type) -> bool:
    """Whether ``client``'s pool hands out interchangeable connections that need not come back (a plain
    ``pool_cls`` of no practical size limit, not a ``blocking_cls``; RESP2: no push messages or maintenance
    notifications; no client-side cache; not a single-connection client; not a cluster)."""
    pool = getattr(client, "connection_pool", None)
    if is_cluster(client) or getattr(client, "connection", None) is not None:
        return False
    if not isinstance(pool, pool_cls) or isinstance(pool, blocking_cls):
        return False
    if getattr(pool, "max_connections", 0) < _NO_LIMIT or getattr(pool, "cache", None) is not None:
        return False
    kw = getattr(pool, "connection_kwargs", None)
    if not isinstance(kw, dict) or kw.get("protocol") not in (None, 2, "2"):
        return False
    return callable(getattr(pool, "get_connection", None)) and callable(getattr(pool, "release", None))


_hiredis_pack: Any
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    _hiredis_pack = None


def kept_packer(pool: Any) -> Callable[[tuple[Any, ...]], bytes] | None:
    """hiredis's ``pack_command`` where it writes the same bytes as redis-py's packer (a pool encoding ``str`` as
    strict UTF-8: checked for str, bytes, int and float arguments, the types the flows send; anything else raises
    ``TypeError`` there and is packed by redis-py, which names the problem). It skips redis-py's per-argument
    ``encode`` calls, which dominate a batch's 1,500-argument ``invalidate.lua`` call (an ad hoc timing in
    docs/benchmarks.md, run K)."""
    kw = getattr(pool, "connection_kwargs", None)
    if _hiredis_pack is None or not isinstance(kw, dict):
        return None
    enc = str(kw.get("encoding", "utf-8")).lower().replace("_", "-")
    if enc not in ("utf-8", "utf8") or kw.get("encoding_errors", "strict") != "strict":
        return None
    return cast(Callable[[tuple[Any, ...]], bytes], _hiredis_pack)


def kept_pack(pack: Callable[[tuple[Any, ...]], bytes] | None, args: tuple[Any, ...]) -> list[bytes] | None:
    """``args`` packed by ``pack`` (:func:`kept_packer`), or None: the caller packs with redis-py instead."""
    if pack is None:
        return None
    try:
        return [pack(args)]
    except TypeError:
        return None


def kept_failed(e: BaseException, conn: Any, was_kept: bool) -> bool:
    """A kept-connection command failed with ``e`` (the connection is disconnected and given back by then):
    whether to send it again through redis-py (its pool and the client's own retries) rather than raise. An error
    reply is never here (the connection stayed in step). A connection error on a connection that sat in the free
    list is what the pool's check would have caught (the server closed it while idle): sent again. A timeout is
    not (a hung server would double the wait), nor an interrupt or a cancellation, unless the client retries it."""
    if isinstance(e, RedisConnectionError) and not isinstance(e, RedisTimeoutError) and was_kept:
        return True
    return client_retries(conn, e)


def client_retries(conn: Any, e: BaseException) -> bool:
    """Whether ``conn``'s client retries ``e`` (a client given with ``Retry(..., retries > 0)``; the pool cachesync
    builds has none)."""
    retry = getattr(conn, "retry", None)
    if retry is None or retry.get_retries() <= 0:
        return False
    return isinstance(e, tuple(getattr(retry, "_supported_errors", ())))


def wait_readable(sock: Any, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds until ``sock`` (a socket, a descriptor, or an object with ``fileno()``) has
    bytes to read (or is closed), taking none off it: the one wait of the L1 subscriber and the CDC sources.
    ``poll``: ``select.select`` raises ValueError for a descriptor >= 1024 (a busy process). A TLS socket's
    already decrypted bytes (``pending()``) count."""
    pending = getattr(sock, "pending", None)
    if callable(pending) and pending():
        return True
    if hasattr(select, "poll"):
        p = select.poll()
        p.register(sock, select.POLLIN)
        return bool(p.poll(timeout * 1000))
    return bool(select.select([sock], [], [], timeout)[0])  # pragma: no cover - Windows


def socket_probe(sock: Any, stream: Any = None) -> Callable[[], bool] | None:
    """"Has data arrived on ``sock``?" as one non-blocking ``select`` (None when there is no socket). ``stream``:
    the connection's ``asyncio.StreamReader``, where the event loop moves arrived data before the subscriber task
    runs; data waiting there counts too (its ``_buffer``: a reader without one is probed on the socket only)."""
    if sock is None:
        return None
    fd = sock.fileno()
    if hasattr(select, "poll"):  # select.select raises ValueError for a descriptor >= 1024 (a busy process)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        pl = poller.poll

        def poll() -> bool:
            return bool(pl(0))
    else:  # pragma: no cover - Windows
        sel, rd = select.select, (fd,)

        def poll() -> bool:
            return bool(sel(rd, (), (), 0)[0])
    if stream is None or not isinstance(getattr(stream, "_buffer", None), bytearray):
        return poll
    return lambda: bool(stream._buffer) or poll()


def make_core(cache: Any, options: L1Options, clock: Callable[[], float] | None) -> L1:
    """The :class:`L1` of a cache, sized with the cache's serializer."""
    o = cache.options
    if not o.broadcast_invalidations:
        raise ConfigError("l1", "needs broadcast_invalidations=True (other processes learn of writes from it)")
    ser = o.serializer_obj

    def size_of(key: str, value: Any) -> int:
        return len(key) + 64 + (0 if value is NOT_FOUND else len(ser.dumps(value)))

    core = L1(options, o.namespace, size_of=size_of, negative_ttl=o.negative_ttl, lock_factory=threading.Lock,
              **({"clock": clock} if clock is not None else {}))
    core.traced = bool(o.tracing)
    if core.traced:  # drops heard on the channel become spans under the writer's traceparent
        from .tracing import span

        core.span = span
    return core
