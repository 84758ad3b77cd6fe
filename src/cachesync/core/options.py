"""One options object for a cache, every field documented with its default and validated when built."""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from .. import _validate
from .._validate import MAX_SECONDS as MAX_SECONDS  # moved to _validate; re-exported
from ..errors import ConfigError
from .serializers import Serializer, resolve_serializer

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


@dataclass(frozen=True)
class CacheOptions:
    """Options of :class:`cachesync.Cache` and :class:`cachesync.AsyncCache` (all keyword arguments).

    Durations are in seconds (floats allowed). Frozen: a cache's options cannot change after it is built
    (``dataclasses.replace(options, ...)`` builds a validated copy).
    """


    namespace: str = "default"
    """Prefix that isolates this cache's keys and channels (``cs:{namespace}:...``); 1-64 chars of ``[A-Za-z0-9_.:-]``."""
    default_ttl: float = 300.0
    """TTL of a cached value when ``get``/``set`` is given none."""
    negative_ttl: float = 30.0
    """TTL of a negative entry (the loader returned ``NOT_FOUND``): penetration protection."""
    ttl_jitter: float = 0.1
    """Avalanche protection: each TTL is stretched by a random factor in ``[0, ttl_jitter]`` (0 turns it off)."""
    lease_ttl: float = 5.0
    """How long a miss's lease keeps other readers waiting instead of loading (should exceed the loader's time)."""
    max_wait: float = 5.0
    """How long a reader waits for another reader's lease before it loads by itself (and does not fill)."""
    tombstone_ttl: float = 10.0
    """How long an invalidated entry keeps its tombstone (version floor and invalidation time)."""
    strategy: str = "db_then_invalidate"
    """Default write strategy (see :mod:`cachesync.protocol` ``STRATEGIES``)."""
    double_delete_delay: float = 0.5
    """Delay of the second delete for the ``delayed_double_delete`` strategy."""
    serializer: str | Serializer = "json"
    """``"json"`` (default, safe), ``"msgpack"``, ``"pickle"`` (only for a trusted Redis), or an object with dumps/loads."""
    max_key_bytes: int = 1024
    """Longest accepted key, in UTF-8 bytes."""
    max_value_bytes: int = 4 * 1024 * 1024
    """Largest accepted serialized value, in bytes."""
    on_redis_error: str = "load"
    """When Redis is unreachable during a read: ``"load"`` calls the loader (at most ``fallback_concurrency`` at once
    per process) and returns its value uncached; ``"fail"`` raises :class:`CacheUnavailableError`."""
    fallback_concurrency: int = 8
    """With ``on_redis_error="load"``: how many loaders may run at once in this process while Redis is down."""
    serve_stale: bool = False
    """Invalidations mark values stale instead of deleting them; while one reader reloads, others get the stale
    value (``Entry.stale`` is true). Reads that must see the newest commit should keep this off."""
    leases: bool = True
    """Take a lease on a miss and refuse fills whose lease was voided. ``False`` is plain cache-aside (unsafe;
    for comparison in the lab)."""
    singleflight: bool = True
    """Collapse concurrent misses for one key inside this process to one Redis round trip and one load."""
    broadcast_invalidations: bool = True
    """Publish every invalidation on ``cs:{namespace}:inv`` (for in-process L1 caches of other processes)."""
    socket_timeout: float = 5.0
    """Redis socket timeout."""
    connect_timeout: float = 1.0
    """Redis connect timeout."""
    max_connections: int | None = None
    """``None`` (default): redis-py's plain pool, one connection per concurrent caller, fastest.
    A number: a blocking pool of that size; a caller waits for a free connection instead of failing
    (no measurable cost on a single-threaded hit, see docs/benchmarks.md)."""
    kept_connections: bool = True
    """Send ``GET``, ``MGET`` and ``EVALSHA`` on connections the cache keeps checked out of its client's pool
    instead of checking one out and back in per command (docs/benchmarks.md, run K: ``bench_hit.py`` with and without
    it). Used only with a plain pool of no practical size limit, RESP2, no client-side cache and no cluster
    (the default pool qualifies); anything else uses redis-py's ``execute_command`` as before. ``False``: always
    ``execute_command`` (e.g. to keep redis-py's own per-command metrics)."""
    wake_ttl: float = 10.0
    """TTL of the list that wakes waiters after a fill (internal housekeeping)."""
    metrics: Any = None
    """``None`` (default): metrics off, no cost. A :class:`cachesync.metrics.Metrics` (``PrometheusMetrics()``,
    ``OtelMetrics()``): ``stats`` exported as ``cachesync_cache_*`` counters read at collection time, loader
    durations and the L1's ``cachesync_l1_*`` (see docs/operating.md)."""
    tracing: bool = False
    """``False`` (default): no spans, no cost. ``True`` (extra ``otel``): OpenTelemetry spans ``cachesync.get``,
    ``cachesync.invalidate``, ``cachesync.set`` and ``cachesync.write``, and invalidation messages carry the current
    span's ``traceparent`` so that the L1s of other processes record their drops in the writer's trace (see
    docs/operating.md, Tracing)."""

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not NAMESPACE_RE.match(self.namespace):
            raise ConfigError("namespace", f"{self.namespace!r} must be 1-64 chars of [A-Za-z0-9_.:-]")
        for name in ("default_ttl", "negative_ttl", "lease_ttl", "tombstone_ttl", "wake_ttl", "socket_timeout",
                     "connect_timeout"):
            check_positive(name, getattr(self, name))
        for name in ("max_wait", "double_delete_delay"):
            check_non_negative(name, getattr(self, name))
        _validate.between("ttl_jitter", self.ttl_jitter, 0, 1)
        for name in ("max_key_bytes", "max_value_bytes", "fallback_concurrency", "max_connections"):
            v = getattr(self, name)
            if name == "max_connections" and v is None:
                continue
            _validate.positive(name, v, integer=True)
        _validate.one_of("on_redis_error", self.on_redis_error, ("load", "fail"))
        for name in ("serve_stale", "leases", "singleflight", "broadcast_invalidations", "tracing", "kept_connections"):
            _validate.boolean(name, getattr(self, name))
        if self.metrics is not None:
            from ..metrics import Metrics

            if not isinstance(self.metrics, Metrics):
                raise ConfigError("metrics", f"must be None or a cachesync.metrics.Metrics (PrometheusMetrics(), "
                                  f"OtelMetrics()), got {type(self.metrics).__name__}")
        if self.tracing:  # the OpenTelemetry API must be importable (checked without importing it)
            import importlib.util

            if importlib.util.find_spec("opentelemetry") is None:
                raise ConfigError("tracing", "needs opentelemetry-api: pip install 'cachesync[otel]'")
        from .strategies import resolve_strategy

        resolve_strategy(self.strategy)
        self.serializer_obj  # noqa: B018 - resolved (and validated) now, not at the first read

    @functools.cached_property
    def serializer_obj(self) -> Serializer:
        """The serializer object that ``serializer`` names (not an option)."""
        return resolve_serializer(self.serializer)

    @classmethod
    def build(cls, **kwargs: Any) -> CacheOptions:
        """Build from keyword arguments, naming any unknown option."""
        known = {f.name for f in dataclasses.fields(cls)}
        for k in kwargs:
            if k not in known:
                raise ConfigError(k, f"unknown option; known options: {', '.join(sorted(known))}")
        return cls(**kwargs)


class CacheOptionsKwargs(TypedDict, total=False):
    """The keyword arguments of ``Cache(...)``/``AsyncCache(...)``: one per :class:`CacheOptions` field, so that a
    misspelt option is a type error (and, at run time, a :class:`ConfigError` naming it)."""

    namespace: str
    default_ttl: float
    negative_ttl: float
    ttl_jitter: float
    lease_ttl: float
    max_wait: float
    tombstone_ttl: float
    strategy: str
    double_delete_delay: float
    serializer: str | Serializer
    max_key_bytes: int
    max_value_bytes: int
    on_redis_error: Literal["load", "fail"]
    fallback_concurrency: int
    serve_stale: bool
    leases: bool
    singleflight: bool
    broadcast_invalidations: bool
    socket_timeout: float
    connect_timeout: float
    max_connections: int | None
    kept_connections: bool
    wake_ttl: float
    metrics: Any
    tracing: bool


def check_positive(name: str, v: object) -> float:
    """Validate a duration/TTL: a finite number > 0 and at most :data:`MAX_SECONDS`. Returns it as float."""
    return _validate.seconds(name, v)


def check_non_negative(name: str, v: object) -> float:
    """Validate a delay: a finite number >= 0 and at most :data:`MAX_SECONDS`. Returns it as float."""
    return _validate.seconds(name, v, zero=True)
