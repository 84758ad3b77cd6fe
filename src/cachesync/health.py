"""Health endpoints and daemon metrics for ``cachesync relay``, ``worker`` and ``cdc``.

:class:`HealthServer` is a small stdlib HTTP server on its own daemon thread serving

* ``/metrics``: the Prometheus text of a :class:`~cachesync.metrics.PrometheusMetrics`;
* ``/healthz``: 200 while the process runs (liveness);
* ``/readyz``: 200 when every readiness check passes, else 503 with one line per failed check (readiness:
  connected to the database, Redis and the bus, and caught up within ``--ready-max-lag`` seconds).

``instrument_relay``/``instrument_worker``/``instrument_cdc`` export a daemon's ``stats`` (read at scrape time,
never counted twice) and its backlog/lag, and return the readiness checks; :class:`Summary` logs one INFO line
every ``interval`` seconds.
"""

from __future__ import annotations

import inspect
import os
import logging
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ._driver import redact_url, scrub
from .metrics import Metrics, Sample

log = logging.getLogger("cachesync.health")

Check = Callable[[], "str | None"]
"""A readiness check: None when fine, else a reason (no secrets)."""

DEFAULT_READY_MAX_LAG = 30.0
"""``--ready-max-lag`` default: seconds of backlog age / replication lag a ready daemon may have."""


class HealthServer:
    """``HealthServer(metrics, checks, addr="127.0.0.1", port=0)``; :meth:`start` binds (port 0: any free port,
    see ``.port``) and serves on a daemon thread; :meth:`stop` shuts it down."""

    def __init__(self, metrics: Metrics, checks: dict[str, Check] | None = None, addr: str = "127.0.0.1",
                 port: int = 0, secret_urls: Sequence[str] = ()) -> None:
        self.metrics, self.checks = metrics, dict(checks or {})
        self.addr, self.port = addr, port
        self.secret_urls = list(secret_urls)  # their secrets are masked in the /readyz reasons
        self._srv: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def readiness(self) -> list[str]:
        """The failed checks as ``name: reason`` lines (empty: ready)."""
        bad = []
        for name, check in self.checks.items():
            try:
                why = check()
            except Exception as e:  # a check that raises is a failed check
                why = f"{type(e).__name__}: {e}"
            if why is not None:  # a driver's message may echo a URL or a token of its password: masked
                bad.append(scrub(f"{name}: {why}", *self.secret_urls))
        return bad

    def start(self) -> HealthServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
                elif path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    bad = outer.readiness()
                    self._send(503 if bad else 200, ("\n".join(bad) if bad else "ready").encode() + b"\n")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("health: " + format, *args)

        self._srv = ThreadingHTTPServer((self.addr, self.port), Handler)
        self._srv.daemon_threads = True
        self.port = self._srv.server_address[1]
        self._thread = threading.Thread(target=self._srv.serve_forever, name="cachesync-health", daemon=True)
        self._thread.start()
        log.info("cachesync: serving /metrics, /healthz, /readyz on http://%s:%d", self.addr, self.port)
        return self

    def stop(self) -> None:
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
            self._srv = None


class Summary:
    """Logs ``line()`` at INFO every ``interval`` seconds on a daemon thread until :meth:`stop`."""

    def __init__(self, logger: logging.Logger, interval: float, line: Callable[[], str]) -> None:
        self.logger, self.interval, self.line = logger, interval, line
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cachesync-summary", daemon=True)

    def start(self) -> Summary:
        if self.interval > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.logger.info("%s", self.line())
            except Exception as e:
                self.logger.warning("cachesync: summary failed: %s: %s", type(e).__name__, e)

    def stop(self) -> None:
        self._stop.set()


def _stats(metrics: Metrics, prefix: str, stats: dict[str, int], names: dict[str, tuple[str, str]],
           namespace: str) -> None:
    """Export entries of a ``stats`` dict as counters ``{prefix}_{name}_total{namespace}``."""
    def reader(key: str) -> Callable[[], list[Sample]]:
        return lambda: [((namespace,), float(stats[key]))] if key in stats else []

    for key, (name, doc) in names.items():
        metrics.observe(f"{prefix}_{name}_total", doc, "counter", ("namespace",), reader(key))


def _redis_check(cache: Any) -> Check:
    def check() -> str | None:
        try:
            ping = getattr(cache, "ping", None)  # Cache.ping: every primary of a cluster (a plain PING: one node)
            if callable(ping) and not inspect.iscoroutinefunction(ping):
                ping()
            else:
                cache.redis.ping()
        except Exception as e:
            return f"Redis {redact_url(str(getattr(cache, 'url', '')))} unreachable: {type(e).__name__}"
        return None
    return check


class _Delivery:
    """Tracks whether the last delivery (Redis/bus) failed, through a daemon's hooks. A failure is forgotten
    after a success, or ``stale`` seconds without a new one (a failing daemon retries sooner than that)."""

    def __init__(self, stale: float = 60.0) -> None:
        self.stale = stale
        self._failing: str | None = None
        self._at = 0.0

    @property
    def failing(self) -> str | None:
        if self._failing is not None and time.monotonic() - self._at > self.stale:
            self._failing = None
        return self._failing

    def ok(self, *_: Any) -> None:
        self._failing = None

    def failed(self, e: BaseException) -> None:
        self._failing, self._at = f"{type(e).__name__}: {e}"[:300], time.monotonic()


# ---------------------------------------------------------------------------------------------- relay

RELAY_STATS = {
    "rows": ("relay_delivered", "Outbox rows delivered and deleted by the relay's claims"),
    "fast": ("relay_fast_applied", "Outbox rows applied from PostgreSQL notifications (fast path)"),
    "errors": ("relay_retries", "Failed deliveries or database errors, each retried with backoff"),
    "parked": ("relay_parked", "Unusable outbox rows parked (see outbox status / last_error)"),
}


def instrument_relay(relay: Any, metrics: Metrics, namespace: str,
                     ready_max_lag: float = DEFAULT_READY_MAX_LAG) -> tuple[dict[str, Check], Callable[[], str]]:
    """Export the relay's stats, backlog and commit->invalidated latency; return its readiness checks and its
    summary line."""
    from .db import connect
    from .outbox import PARKED, now_ms_sql

    _stats(metrics, "cachesync", relay.stats, RELAY_STATS, namespace)
    if metrics.enabled:
        relay.measure_latency(metrics.histogram(
            "cachesync_relay_latency_seconds", "Outbox row commit (created_at, database clock) to invalidated",
            ("namespace",)), (namespace,))
    lock = threading.Lock()
    conn: list[Any] = []
    now = now_ms_sql(relay.dialect)
    sql = (f"SELECT COUNT(*), {now} - MIN(created_at), {now} - MIN(CASE WHEN run_at <= {now} THEN created_at END) "
           f"FROM {relay.table} WHERE run_at < {PARKED}")
    last: dict[str, float] = {}

    def backlog() -> tuple[int, float | None, float | None]:
        with lock:
            try:
                if not conn:
                    conn.append(connect(relay.db_url))
                cur = conn[0].cursor()
                try:
                    cur.execute(sql)
                    n, age, due_age = cur.fetchone()
                finally:
                    cur.close()
                conn[0].commit()
            except Exception:
                if conn:
                    try:
                        conn.pop().close()
                    except Exception:
                        pass
                raise
        out = (int(n), None if age is None else max(0.0, float(age) / 1000),
               None if due_age is None else max(0.0, float(due_age) / 1000))
        last["rows"], last["age"] = out[0], out[1] or 0.0
        return out

    metrics.observe("cachesync_relay_backlog_rows", "Outbox rows waiting (due or delayed; parked excluded)",
                    "gauge", ("namespace",), lambda: [((namespace,), backlog()[0])])
    metrics.observe("cachesync_relay_oldest_age_seconds", "Age of the oldest waiting outbox row (database clock)",
                    "gauge", ("namespace",), lambda: [((namespace,), backlog()[1] or 0.0)])
    from .bus import BusUnavailableError
    from .errors import InvalidationError

    delivery = _Delivery(2 * relay.max_backoff + relay.poll_interval + 1.0)
    prev_err, prev_batch = relay.on_error, relay.on_batch

    def on_error(e: BaseException) -> None:
        if isinstance(e, (InvalidationError, BusUnavailableError)):  # database errors: the database check
            delivery.failed(e)
        if prev_err is not None:
            prev_err(e)

    def on_batch(n: int) -> None:
        delivery.ok()
        if prev_batch is not None:
            prev_batch(n)

    relay.on_error, relay.on_batch = on_error, on_batch

    def db() -> str | None:
        try:
            _, _, due_age = backlog()
        except Exception as e:
            return f"database {redact_url(relay.db_url)}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if due_age is not None and due_age > ready_max_lag:
            return f"oldest due outbox row is {due_age:.1f} s old (> --ready-max-lag {ready_max_lag:g})"
        return None

    checks: dict[str, Check] = {"database": db}
    if relay.cache is not None:
        checks["redis"] = _redis_check(relay.cache)
    checks["delivery"] = lambda: None if delivery.failing is None else f"last delivery failed: {delivery.failing}"
    return checks, lambda: (f"cachesync relay: delivered {relay.stats['rows']} rows "
                                  f"(fast {relay.stats['fast']}), retries {relay.stats['errors']}, "
                                  f"parked {relay.stats['parked']}, backlog {int(last.get('rows', 0))} "
                                  f"(oldest {last.get('age', 0.0):.1f} s)")


# ---------------------------------------------------------------------------------------------- worker

WORKER_STATS = {
    "messages": ("worker_applied", "Bus messages applied to Redis and acked"),
    "retries": ("worker_retries", "Bus messages nacked for a retry after a failed apply"),
    "dead": ("worker_dead_lettered", "Bus messages moved to the dead-letter stream"),
    "malformed": ("worker_malformed", "Bus messages that could not be decoded (dead-lettered with their raw body)"),
}


class _ObservedBus:
    """The worker's bus, seen through: counts consumed messages, measures the consumer lag (Redis Streams: from
    the entry id's millisecond timestamp, Redis clock) and notes whether the bus answers."""

    def __init__(self, bus: Any, consumed: Any, lag: Any, labels: tuple[str, ...]) -> None:
        self._bus, self._consumed, self._lag, self._labels = bus, consumed, lag, labels
        self.delivery = _Delivery()
        self.consumed = 0
        self.last_lag = 0.0

    def consume(self, *a: Any, **kw: Any) -> Any:
        try:
            ds = self._bus.consume(*a, **kw)
        except Exception as e:
            self.delivery.failed(e)
            raise
        self.delivery.ok()
        self.consumed += len(ds)
        if ds:
            self._consumed.inc(len(ds), self._labels)
        lag = 0.0
        now = time.time()
        for d in ds:
            if d.sent_at is not None:  # NATS JetStream (server clock), RabbitMQ (publisher clock)
                lag = max(lag, now - d.sent_at)
                continue
            ms, _, seq = str(d.id).partition("-")
            if ms.isdigit() and seq.isdigit() and len(ms) >= 12:  # Redis Streams: the entry id (Redis clock)
                lag = max(lag, now - int(ms) / 1000)
        self.last_lag = lag
        self._lag.set(lag, self._labels)
        return ds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)


def instrument_worker(worker: Any, metrics: Metrics, namespace: str,
                      ready_max_lag: float = DEFAULT_READY_MAX_LAG) -> tuple[dict[str, Check], Callable[[], str]]:
    """Export the worker's stats and consumer lag; return its readiness checks and its summary line."""
    _stats(metrics, "cachesync", worker.stats, WORKER_STATS, namespace)
    labels = (namespace,)
    bus = _ObservedBus(worker.bus,
                       metrics.counter("cachesync_worker_consumed_total", "Bus messages received by the worker",
                                       ("namespace",)),
                       metrics.gauge("cachesync_worker_lag_seconds", "Age of the oldest message of the last batch "
                                     "when received (0 when idle)", ("namespace",)), labels)
    worker.bus = bus

    def caught_up() -> str | None:
        if bus.last_lag > ready_max_lag:
            return f"consumer lag {bus.last_lag:.1f} s (> --ready-max-lag {ready_max_lag:g})"
        return None

    checks: dict[str, Check] = {
        "redis": _redis_check(worker.cache),
        "bus": lambda: None if bus.delivery.failing is None else f"bus: {bus.delivery.failing}",
        "lag": caught_up}
    return checks, lambda: (f"cachesync worker: consumed {bus.consumed}, applied {worker.stats['messages']}, "
                                   f"retries {worker.stats['retries']}, dead-lettered {worker.stats['dead']}, "
                                   f"lag {bus.last_lag:.1f} s")


# ---------------------------------------------------------------------------------------------- cdc

CDC_STATS = {
    "transactions": ("cdc_transactions_applied", "Committed transactions whose keys the CDC reader invalidated"),
    "changes": ("cdc_changes_applied", "Row changes (events) applied by the CDC reader"),
    "keys": ("cdc_keys_invalidated", "Keys invalidated (or published) by the CDC reader"),
    "reconnects": ("cdc_reconnects", "Reconnections of the CDC reader to the database"),
    "missing_old_image": ("cdc_missing_old_image", "Changes without the old values of key columns"),
    "skipped": ("cdc_skipped_events", "Events the CDC reader skipped (unusable; logged)"),
    "undecodable_events": ("cdc_undecodable_events", "MariaDB row events the binlog decoder could not read (every "
                           "key of their table invalidated)"),
    "undecodable_messages": ("cdc_undecodable_messages", "PostgreSQL pgoutput messages the decoder refused (every "
                             "key the rules cover invalidated)"),
    "messages_malformed": ("cdc_malformed_messages", "PostgreSQL WAL messages (Outbox.emit) that were malformed "
                           "(logged and skipped)"),
}


class _ObservedSource:
    """The CDC source, seen through: counts the transactions and events read from the log."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self.transactions = 0
        self.changes = 0

    def stream(self, position: Any) -> Any:
        for txn in self._source.stream(position):
            self.transactions += 1
            self.changes += len(txn.changes)
            yield txn

    def stream_marks(self, position: Any) -> Any:
        """The inline source's stream (PostgreSQL: read in the runner's thread), counted the same way; an
        ``inline`` source without it is read through :meth:`stream` in the reader thread."""
        for txn in self._source.stream_marks(position):
            if txn is not None:
                self.transactions += 1
                self.changes += len(txn.changes)
            yield txn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


class _ObservedCheckpoint:
    def __init__(self, cp: Any) -> None:
        self._cp = cp
        self.saved_at: float | None = None

    def save(self, *a: Any, **kw: Any) -> Any:
        out = self._cp.save(*a, **kw)
        self.saved_at = time.time()
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cp, name)


def instrument_cdc(runner: Any, db_url: str, metrics: Metrics, namespace: str,
                   ready_max_lag: float = DEFAULT_READY_MAX_LAG) -> tuple[dict[str, Check], Callable[[], str]]:
    """Export the CDC runner's stats, lag, position and checkpoint age; return its readiness checks and summary
    line. Call before ``runner.run()``."""
    from .db import connect, dialect_of

    st = runner.stats
    _stats(metrics, "cachesync", st, CDC_STATS, namespace)
    src = runner.source = _ObservedSource(runner.source)
    cp = runner.checkpoint = _ObservedCheckpoint(runner.checkpoint)
    lab = (namespace,)
    metrics.observe("cachesync_cdc_transactions_read_total", "Committed transactions read from the log", "counter",
                    ("namespace",), lambda: [(lab, src.transactions)])
    metrics.observe("cachesync_cdc_changes_read_total", "Row changes (events) read from the log", "counter",
                    ("namespace",), lambda: [(lab, src.changes)])
    metrics.observe("cachesync_cdc_lag_seconds", "Apply time minus commit time of the last applied transaction",
                    "gauge", ("namespace",),
                    lambda: [] if st.get("lag_ms") is None else [(lab, st["lag_ms"] / 1000)])
    metrics.observe("cachesync_cdc_checkpoint_age_seconds", "Seconds since the last checkpoint was saved", "gauge",
                    ("namespace",), lambda: [] if cp.saved_at is None else [(lab, time.time() - cp.saved_at)])

    def position() -> float | None:
        pos = st.get("position") or {}
        v = pos.get("lsn", pos.get("pos"))
        return None if v is None else float(v)

    metrics.observe("cachesync_cdc_position", "Applied log position (PostgreSQL: LSN; MariaDB: binlog offset)",
                    "gauge", ("namespace",), lambda: [] if position() is None else [(lab, position() or 0.0)])
    lock = threading.Lock()
    conn: list[Any] = []
    lsn_sql = dialect_of(db_url).wal_position_sql  # None: no byte lag to export (the check only connects)

    def server_lsn() -> float | None:
        with lock:
            try:
                if not conn:
                    conn.append(connect(db_url))
                cur = conn[0].cursor()
                try:
                    cur.execute(lsn_sql or "SELECT 1")
                    v = cur.fetchone()[0]
                finally:
                    cur.close()
                conn[0].commit()
            except Exception:
                if conn:
                    try:
                        conn.pop().close()
                    except Exception:
                        pass
                raise
        return float(v) if lsn_sql else None

    if lsn_sql is not None:
        metrics.observe("cachesync_cdc_lag_bytes", "PostgreSQL: WAL bytes between the server's position and the "
                        "applied one", "gauge", ("namespace",),
                        lambda: [] if position() is None else [(lab, max(0.0, (server_lsn() or 0.0) -
                                                                         (position() or 0.0)))])
    else:
        def binlog_lag() -> list[Sample]:
            pos = st.get("position") or {}
            if not pos.get("file") or pos.get("pos") is None:
                return []
            with lock:
                if not conn:
                    conn.append(connect(db_url))
                try:
                    lag = binlog_lag_bytes(conn[0], str(pos["file"]), int(pos["pos"]))
                except Exception:
                    try:
                        conn.pop().close()
                    except Exception:
                        pass
                    raise
            return [] if lag is None else [(lab, float(lag))]

        metrics.observe("cachesync_cdc_lag_bytes", "Log bytes between the server's position and the applied one "
                        "(PostgreSQL: WAL; MariaDB/MySQL: binlog, across files)", "gauge", ("namespace",), binlog_lag)

    def db() -> str | None:
        try:
            server_lsn()
        except Exception as e:
            return f"database {redact_url(db_url)}: {type(e).__name__}"
        lag = st.get("lag_ms")
        if lag is not None and lag / 1000 > ready_max_lag:
            return f"replication lag {lag / 1000:.1f} s (> --ready-max-lag {ready_max_lag:g})"
        return None

    checks: dict[str, Check] = {"database": db, "redis": _redis_check(runner.cache)}
    return checks, lambda: (f"cachesync cdc: read {src.transactions} transactions ({src.changes} changes), applied "
                            f"{st['transactions']} ({st['changes']} changes, {st['keys']} keys), lag "
                            f"{(st.get('lag_ms') or 0) / 1000:.3f} s, reconnects {st['reconnects']}")


def binlog_lag_bytes(conn: Any, file: str, pos: int) -> int | None:
    """MariaDB/MySQL: the binlog bytes written after ``(file, pos)`` (the rest of ``file`` plus every later file,
    from ``SHOW BINARY LOGS``); None when ``file`` is no longer listed (purged)."""
    cur = conn.cursor()
    try:
        cur.execute("SHOW BINARY LOGS")
        rows = cur.fetchall()
    finally:
        cur.close()
    conn.commit()
    total, found = 0, False
    for row in rows:
        name, size = str(row[0]), int(row[1])
        if name == file:
            found, total = True, max(0, size - pos)
        elif found:
            total += size
    return total if found else None


# ---------------------------------------------------------------------------------------------- misconfiguration


class NamespaceWatch:
    """Counts what a daemon delivers to a namespace no cache has recorded (``cachesync_unused_namespace_deliveries_
    total``): at each :meth:`update` (every scrape, and every ``interval`` seconds on a thread of its own), the growth
    of ``delivered()`` since the last update counts when the namespace is unseen, with a WARNING (the first time, then
    at most every ``warn_every`` seconds)."""

    def __init__(self, seen: Callable[[], bool], delivered: Callable[[], float], namespace: str,
                 logger: logging.Logger, what: str, warn_every: float = 600.0) -> None:
        self._seen, self._delivered = seen, delivered
        self.namespace, self._log, self._what, self._warn_every = namespace, logger, what, warn_every
        self._lock = threading.Lock()
        self._last = float(delivered())
        self._warned: float | None = None
        self.unused = 0.0
        self._stop = threading.Event()

    def update(self) -> float:
        """Count the deliveries since the last update if the namespace is unseen; returns the count."""
        with self._lock:
            now = float(self._delivered())
            delta, self._last = now - self._last, now
            if delta > 0 and not self._seen():
                self.unused += delta
                t = time.monotonic()
                if self._warned is None or t - self._warned >= self._warn_every:
                    self._warned = t
                    self._log.warning("cachesync %s: delivered %d invalidation(s) to namespace %r, which no cache "
                                      "has used (%d so far): check --namespace", self._what, delta, self.namespace,
                                      self.unused)
            return self.unused

    def start(self, interval: float = 30.0) -> NamespaceWatch:
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.update()
                except Exception:  # a failing stats read must not end the watch
                    pass
        threading.Thread(target=run, name="cachesync-namespace-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()


def check_namespace(redis_client: Any, namespace: str, metrics: Metrics, logger: logging.Logger,
                    what: str, delivered: Callable[[], float] | None = None) -> bool:
    """Warn (WARNING) when no cache has recorded ``namespace`` in this Redis within the last week: the daemon
    would invalidate keys nobody reads. Exports ``cachesync_namespace_seen{namespace}`` (1/0, read at scrape
    time) and, with ``delivered`` (the daemon's running count of delivered rows/messages/transactions), counts
    what it delivers while the namespace is unseen (:class:`NamespaceWatch`). Returns whether the namespace is
    known; Redis errors count as known (the readiness check reports them)."""
    from .cache_metrics import seen_key

    key = seen_key(namespace)

    def seen() -> bool:
        try:
            return bool(redis_client.exists(key))
        except Exception:
            return True

    metrics.observe("cachesync_namespace_seen", "1 when a cache recorded this namespace in Redis in the last "
                    "7 days (0: the daemon invalidates keys no application reads)", "gauge", ("namespace",),
                    lambda: [((namespace,), 1.0 if seen() else 0.0)])
    ok = seen()
    if not ok:
        logger.warning("cachesync %s: no cache has used namespace %r in this Redis in the last 7 days (no %s key): "
                       "its invalidations reach no application. Check --namespace (a Cache records its namespace "
                       "when it starts).", what, namespace, key)
    if delivered is not None:
        watch = NamespaceWatch(seen, delivered, namespace, logger, what).start()
        metrics.observe("cachesync_unused_namespace_deliveries_total", "Rows, messages or transactions delivered "
                        "while no cache had recorded the namespace", "counter", ("namespace",),
                        lambda: [((namespace,), watch.update())])
    return ok


def missing_tables(db_url: str, tables: list[str]) -> list[str]:
    """The tables of ``tables`` the database lacks (each probed with ``SELECT 1 FROM t WHERE 1 = 0``)."""
    from .db import connect

    conn = connect(db_url)
    missing = []
    try:
        for t in tables:
            cur = conn.cursor()
            try:
                cur.execute(f"SELECT 1 FROM {t} WHERE 1 = 0")
                cur.fetchall()
            except Exception:
                missing.append(t)
            finally:
                cur.close()
            conn.rollback()
    finally:
        conn.close()
    return missing


def check_tables(db_url: str, tables: list[str], metrics: Metrics, namespace: str, logger: logging.Logger,
                 what: str) -> list[str]:
    """Warn about rule tables the database lacks; export ``cachesync_rules_missing_tables{namespace}``."""
    try:
        missing = missing_tables(db_url, tables)
    except Exception as e:
        logger.warning("cachesync %s: could not check the rules' tables in %s: %s", what, redact_url(db_url),
                       type(e).__name__)
        return []
    n = float(len(missing))
    metrics.observe("cachesync_rules_missing_tables", "Tables named by the rules that the database lacks (at start)",
                    "gauge", ("namespace",), lambda: [((namespace,), n)])
    if missing:
        logger.warning("cachesync %s: the rules name tables that %s lacks: %s (their changes can never be seen; "
                       "check the rules file and --db-url)", what, redact_url(db_url), ", ".join(missing))
    return missing


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: Any) -> None:
    """``--metrics-port``, ``--metrics-addr``, ``--ready-max-lag``, ``--summary-interval`` of a daemon command."""
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics, /healthz and /readyz on this port (default: off; needs the prometheus "
                        "extra)")
    p.add_argument("--metrics-addr", default="127.0.0.1",
                   help="address of the metrics/health server (default: 127.0.0.1)")
    p.add_argument("--ready-max-lag", type=float, default=DEFAULT_READY_MAX_LAG,
                   help=f"/readyz fails when the backlog or lag is older than this many seconds "
                        f"(default: {DEFAULT_READY_MAX_LAG:g})")
    p.add_argument("--summary-interval", type=float, default=60.0,
                   help="seconds between one-line INFO summaries (default: 60; 0 = none)")


class Daemon:
    """What a daemon command does around its loop: metrics (Prometheus when ``--metrics-port`` is given, else
    off), readiness checks, the health server and the periodic summary. ``Daemon(args)``; then
    ``metrics``; :meth:`start` (checks, summary) and :meth:`stop`."""

    def __init__(self, args: Any) -> None:
        from .metrics import NOOP, PrometheusMetrics

        self.port: int | None = getattr(args, "metrics_port", None)
        self.addr: str = getattr(args, "metrics_addr", "127.0.0.1")
        self.ready_max_lag: float = getattr(args, "ready_max_lag", DEFAULT_READY_MAX_LAG)
        self.summary_interval: float = getattr(args, "summary_interval", 60.0)
        self.metrics: Metrics = PrometheusMetrics() if self.port is not None else NOOP
        self.server: HealthServer | None = None
        self.summary: Summary | None = None
        # every URL the daemon was given (options ending in _url, --bus, CACHESYNC_*_URL): masked in /readyz
        self.secret_urls = [v for k, v in vars(args).items() if isinstance(v, str) and (k.endswith("url") or k == "bus")]
        self.secret_urls += [v for k, v in os.environ.items() if k.startswith("CACHESYNC_") and k.endswith("_URL")]

    def start(self, logger: logging.Logger, checks: dict[str, Check], summary: Callable[[], str]) -> None:
        if self.port is not None:
            self.server = HealthServer(self.metrics, checks, self.addr, self.port, self.secret_urls).start()
        self.summary = Summary(logger, self.summary_interval, summary).start()

    def stop(self) -> None:
        if self.summary is not None:
            self.summary.stop()
        if self.server is not None:
            self.server.stop()
