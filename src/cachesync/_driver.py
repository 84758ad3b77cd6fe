"""Shared pieces of the sync and async drivers (no protocol logic here)."""

from __future__ import annotations

import functools
import inspect
import logging
import string
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import ClusterError, RedisClusterException

from .errors import UsageError

log = logging.getLogger("cachesync")

CLUSTER_DOWN = (ClusterError, RedisClusterException)
"""Redis Cluster errors that mean "unreachable" like a ConnectionError: CLUSTERDOWN/MASTERDOWN replies, too many
redirections, no reachable startup node ("Redis Cluster cannot be connected"), a slot no node covers. (The
flows never send a cross-slot command, so a RedisClusterException here is not a usage error.)"""

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redact_url(url: str) -> str:
    """A URL with its password replaced by ``***`` (safe for logs and error messages)."""
    try:
        p = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if p.password is None:
        return url
    user = p.username or ""
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, f"{user}:***@{host}", p.path, p.query, p.fragment))


def check_redis_url(url: object) -> str:
    if not isinstance(url, str) or not url:
        raise UsageError(f"redis_url must be a non-empty string, got {url!r}")
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix", "valkey", "valkeys"):
        raise UsageError(f"redis_url {redact_url(url)!r} must start with redis://, rediss:// or unix://")
    if scheme.startswith("valkey"):
        url = "redis" + url[len("valkey"):]
    return url


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
        return client, client_url(client), None
    url = check_redis_url(redis_url)
    kw: dict[str, Any] = dict(socket_timeout=options.socket_timeout if socket_timeout else None,
                              socket_connect_timeout=options.connect_timeout)
    if options.max_connections is None:
        pool = lib.ConnectionPool.from_url(url, max_connections=2**31, **kw)
    else:
        pool = lib.BlockingConnectionPool.from_url(url, max_connections=options.max_connections,
                                                   timeout=options.socket_timeout, **kw)
    return lib.Redis.from_pool(pool), redact_url(url), url


def is_cluster(client: Any) -> bool:
    return type(client).__name__ == "RedisCluster"
