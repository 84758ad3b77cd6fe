"""The outbox relay: claims outbox rows in batches, applies them to Redis and/or publishes them on a bus,
then deletes them.

Crash safety: a row is deleted only in the transaction that claimed it (PostgreSQL, MariaDB/MySQL:
``SELECT ... FOR UPDATE SKIP LOCKED``, so several relays share the work) or, on SQLite, after a lease claim
(``claimed_until``/``claimed_by``; a dead relay's rows come back when its lease expires) — and only after
the invalidations were applied to Redis or acknowledged by the bus. A relay killed at any point leaves the
rows in the table; the next relay applies them again (invalidation is idempotent).

When Redis or the bus is unreachable the rows stay (``attempts`` + 1, ``last_error``), the relay backs off
exponentially up to ``max_backoff`` and resumes. On PostgreSQL the relay ``LISTEN``\\ s on the channel named
after the table (the outbox trigger ``NOTIFY``\\ s on insert) and also polls every ``poll_interval`` seconds,
because notifications sent while it was disconnected are lost. Rows with a future ``run_at`` (delayed
deletes) are claimed when due; the relay sleeps until the earliest one.

Fast path (PostgreSQL, applying to Redis): the trigger's notification carries the id, keys and version of each
committed immediate row (PostgreSQL delivers it only after the commit). The relay applies them to
Redis as soon as the notification arrives — no database round trip first — and remembers their ids in memory;
the claim that follows deletes those rows without applying them again. A relay that dies in between loses only
that memory: the rows are still in the table and are applied again when claimed (idempotent). Every relay that
listens receives every notification, and every one applies it (duplicate, harmless Redis work; no relay has to
ask the database which one should).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Unpack

from redis.exceptions import RedisError

from .. import tracing
from .._driver import redact_url
from ..bus import Bus, BusUnavailableError, Invalidation, checked_keys, checked_version
from ..db import MYSQL, POSTGRESQL, SQLITE, connect, dialect_of
from .. import _validate
from ..errors import BadDataError, InvalidationError, OutboxConfigError, RedisCommandError, UsageError
from ..metrics import Histogram
from .._sync.cache import Cache
from . import _MAX_KEY_BYTES, DEFAULT_TABLE, PARKED, Outbox, OutboxError, has_column, now_ms_sql
from ._fault import point
from .options import RelayOptions, RelayOptionsKwargs

log = logging.getLogger("cachesync.relay")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True

_DELIVERY_ERRORS = (InvalidationError, BusUnavailableError, RedisCommandError, RedisError)
"""Retried with backoff, rows kept (attempts + 1, last_error): Redis or the bus down, or a Redis error reply
(e.g. OOM when Redis is full)."""

_MEMORY = 100_000
"""Row ids the fast path remembers (applied, not yet deleted; deleted recently). Forgetting one early costs only
a duplicate apply."""


@dataclass(slots=True)
class Row:
    """A claimed outbox row."""

    id: int
    keys: list[str]
    version: str | None
    attempts: int
    prefixes: list[str] | None = None  # a capture trigger's TRUNCATE: every key with these prefixes
    raw: tuple[Any, ...] = ()  # the claimed columns (id, cache_keys, key_version, attempts), to park it
    age_ms: float | None = None  # with metrics: database-clock ms since created_at, at the claim
    traceparent: str | None = None  # the writer's trace context (column traceparent, when the table has it)


class Relay:
    """Moves outbox rows to Redis (and/or a bus). ``Relay(db_url, cache=None, *, bus=None, options=None,
    on_error=None, on_batch=None, **options)``.

    ``cache``: the :class:`cachesync.Cache` to invalidate in (needed unless only publishing). ``bus``: publish
    every row on this bus. ``options``: a :class:`~cachesync.outbox.RelayOptions` (table, apply, batch_size,
    poll_interval, listen, lease, max_backoff, init, fast, claim_delay: see there for each default), or the
    same names as keywords -- not both (:class:`~cachesync.errors.OutboxConfigError`). The resolved values are
    also attributes (``relay.batch_size``, ``relay.poll_interval``, ``relay.fast``...). ``on_error(exc)`` /
    ``on_batch(n)``: hooks called after a failed delivery / a completed batch (tests, metrics). See the module
    docstring for the fast path: rows stay in the outbox until claimed (a crash meanwhile only re-applies
    them); a wake-up without rows (delayed or oversized rows) or a failed apply is claimed at once.

    ``stats``: ``batches``/``rows``/``keys`` completed (deleted) by claims, ``applied`` rows applied to Redis by
    the claim path, ``fast`` rows applied from notifications, ``skipped`` claimed rows the fast path had already
    applied (deleted without a second apply), ``errors``, ``parked``.
    """

    def __init__(self, db_url: str, cache: Cache | None = None, *, bus: Bus | None = None,
                 options: RelayOptions | None = None, on_error: Callable[[BaseException], None] | None = None,
                 on_batch: Callable[[int], None] | None = None, **kwargs: Unpack[RelayOptionsKwargs]) -> None:
        self.options = o = RelayOptions.resolve(options, dict(kwargs))
        _validate.callable_or_none("on_error", on_error, error=OutboxConfigError)
        _validate.callable_or_none("on_batch", on_batch, error=OutboxConfigError)
        self.dialect = dialect_of(db_url)
        self.db_url = db_url
        self.table = o.table
        self.apply = (bus is None) if o.apply is None else o.apply
        if self.apply and cache is None:
            raise OutboxError("the relay needs a cache (redis_url) to apply invalidations, or a bus to publish to")
        if not self.apply and bus is None:
            raise OutboxError("the relay with apply=False needs a bus")
        self.cache, self.bus = cache, bus
        self.batch_size = o.batch_size
        self.listen = o.listen and self.dialect is POSTGRESQL
        self.poll_interval = float((1.0 if self.listen else 0.05) if o.poll_interval is None else o.poll_interval)
        self.claim_delay = float(o.claim_delay)
        self._claim_now = False  # set by the fast path when a notification needs the claim path
        self.lease_ms = int(o.lease * 1000)
        self.max_backoff = float(o.max_backoff)
        self.on_error, self.on_batch = on_error, on_batch
        self.relay_id = f"{socket.gethostname()[:40]}:{os.getpid()}:{id(self) & 0xffff:x}"
        self.outbox = Outbox(self.table, dialect=self.dialect)
        self.fast = (self.apply and self.listen) if o.fast is None else (o.fast and self.apply and self.listen)
        self.stats = {"batches": 0, "rows": 0, "keys": 0, "applied": 0, "fast": 0, "skipped": 0, "errors": 0,
                      "parked": 0}
        # fast path: applied, not yet deleted (insertion order = age): id -> (keys, version) as applied
        self._applied: dict[int, Any] = {}
        self._deleted: dict[int, None] = {}  # deleted by this relay's claims lately: a late notification is stale
        self._conn: Any = None
        self._init = o.init
        self._now = now_ms_sql(self.dialect)
        t = self.table
        self.latency: Histogram | None = None  # set by measure_latency()
        self._latency_labels: tuple[str, ...] = ()
        self._age_col = ""
        self._tp_col = ""  # ", traceparent" when OpenTelemetry is installed and the table has the column
        self._claim_sql = (f"DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE run_at <= {self._now} "
                           f"ORDER BY id LIMIT {self.batch_size} FOR UPDATE SKIP LOCKED) "
                           "RETURNING id, cache_keys, key_version, attempts" + self._age_col)
        self._due_sql = f"SELECT MIN(run_at) - {self._now} FROM {t} WHERE run_at > 0 AND run_at < {PARKED}"
        self._due: float | None = None  # seconds until the next delayed row, learnt with the last COMMIT

    def measure_latency(self, histogram: Histogram, labels: tuple[str, ...] = ()) -> None:
        """Observe each delivered row's commit -> invalidated latency in ``histogram``: the row's age at the claim
        (``created_at``, database clock) plus the local time from the claim to the delivery. Call before
        :meth:`run`; the table needs the ``created_at`` column (every table ``outbox init`` made since it exists)."""
        self.latency, self._latency_labels = histogram, labels
        self._age_col = f", {self._now} - created_at"
        self._claim_sql = self._claim_sql.removesuffix(self._age_col) + self._age_col

    # ------------------------------------------------------------------ connections

    def _db(self) -> Any:
        if self._conn is None:
            if self.dialect is MYSQL:
                from pymysql.constants import CLIENT

                # multi-statements: "DELETE ...; COMMIT" in one round trip (the relay sends only its own SQL)
                conn = connect(self.db_url, client_flag=CLIENT.MULTI_STATEMENTS)
            else:
                conn = connect(self.db_url)
            if self._init:
                self.outbox.init(conn, notify=None)  # keeps the NOTIFY trigger as the operator set it
                self._init = False
            if tracing.AVAILABLE and not self._tp_col and has_column(conn, self.dialect, self.table, "traceparent"):
                self._tp_col = ", traceparent"  # claimed last: deliveries become children of the writers' spans
                self._claim_sql += self._tp_col
            conn.commit()
            if self.dialect is MYSQL:
                cur = conn.cursor()
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")  # no gap locks on inserts
                cur.close()
            elif self.dialect is POSTGRESQL:
                # The relay sends BEGIN itself, in the same round trip as the claim (psycopg would send it alone);
                # claim and next-due queries are prepared once. synchronous_commit=off only affects the relay's
                # own commits (the deletes): a database crash may undo the last ones, so those rows are applied
                # again (idempotent); no invalidation can be lost that way.
                conn.autocommit = True
                conn.execute("SET synchronous_commit = off")
                conn.execute(f"PREPARE cachesync_claim AS {self._claim_sql}")
                conn.execute(f"PREPARE cachesync_due AS {self._due_sql}")
                if self.listen:  # before the first claim, so that no NOTIFY falls in between
                    conn.execute(f'LISTEN "{self.table}"')
            else:
                self._reclaim_dead(conn)
            self._conn = conn
        return self._conn

    def _reclaim_dead(self, conn: Any) -> int:
        """SQLite: release the leases of relays on this host whose process is gone (crashed), so their rows are
        retried now instead of when the lease expires. A live pid (or another host) keeps its lease."""
        host = self.relay_id.rsplit(":", 2)[0]
        cur = conn.cursor()
        try:
            cur.execute(f"SELECT DISTINCT claimed_by FROM {self.table} WHERE claimed_until > {self._now} "
                        "AND claimed_by IS NOT NULL")
            dead = []
            for (owner,) in cur.fetchall():
                parts = str(owner).rsplit(":", 2)
                if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1])):
                    dead.append(owner)
            n = 0
            for owner in dead:
                cur.execute(f"UPDATE {self.table} SET claimed_until = 0 WHERE claimed_by = ?", (owner,))
                n += cur.rowcount
                log.warning("cachesync relay: released %d outbox rows leased by dead relay %s", cur.rowcount, owner)
            conn.commit()
            return n
        finally:
            cur.close()

    def _reset(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None
        self._due = None

    def close(self) -> None:
        """Close the database connections (not the cache or the bus)."""
        self._reset()

    # ------------------------------------------------------------------ one batch

    def _max_key_bytes(self) -> int:
        return self.cache.ctx.o.max_key_bytes if self.cache is not None else _MAX_KEY_BYTES

    def _parse(self, raw: list[tuple[Any, ...]]) -> tuple[list[Row], list[tuple[int, str, tuple[Any, ...]]]]:
        """Claimed rows -> (usable rows, unusable ones with the reason). A row is unusable when its cache_keys is
        not JSON, not a non-empty list of keys the cache accepts (``max_key_bytes``) or ``{"prefixes": [...]}``,
        or its key_version is not a number; it is parked, never retried (retrying cannot fix the data).

        The common row (a JSON list of ASCII keys short enough to need no byte count, a version of decimal digits
        or NULL) is accepted by the cheap checks below; any other row goes through :func:`checked_keys` and
        :func:`checked_version`, which accept or refuse it as they always did."""
        good: list[Row] = []
        bad: list[tuple[int, str, tuple[Any, ...]]] = []
        mkb = self._max_key_bytes()
        short = mkb  # an ASCII key of at most this many characters fits (one byte a character)
        age_on, tp_on, loads = bool(self._age_col), bool(self._tp_col), json.loads
        for t in raw:
            rid = t[0]
            try:
                if len(t) < 4:
                    raise BadDataError(f"outbox row has {len(t)} column(s), expected id, cache_keys, key_version, "
                                       "attempts")
                _, keys, ver, attempts = t[:4]
                if not isinstance(keys, (str, bytes, bytearray)):
                    raise BadDataError(f"cache_keys is {type(keys).__name__}, not JSON text")
                ks = loads(keys)
                if ver is not None:
                    if type(ver) is str and len(ver) < 16 and ver.isascii() and ver.isdigit():
                        pass  # what checked_version returns for it (below 2**53, digits only)
                    else:
                        ver = checked_version(ver)
                if type(ks) is list and ks:
                    for k in ks:
                        if type(k) is not str or not k or len(k) > short or not k.isascii():
                            checked_keys(ks, mkb)  # the slow check decides (and names the bad key)
                            break
                elif isinstance(ks, dict) and isinstance(ks.get("prefixes"), list) and all(
                        isinstance(p, str) for p in ks["prefixes"]):
                    for p in ks["prefixes"]:
                        p.encode()  # UnicodeEncodeError (a lone surrogate JSON spelt): no SCAN can carry it
                    if self.cache is None:
                        raise ValueError(f"the row asks to invalidate every key with the prefixes {ks['prefixes']} "
                                         "(a TRUNCATE): a relay needs a cache (--redis-url; with --bus also --apply) "
                                         "to find them")
                    good.append(Row(int(rid), [], ver, int(attempts), ks["prefixes"], t,
                                    float(t[4]) if age_on and len(t) > 4 and t[4] is not None else None,
                                    t[-1] if tp_on and len(t) > 4 and isinstance(t[-1], str) else None))
                    continue
                elif not isinstance(ks, list) or not ks:
                    raise ValueError("cache_keys is not a non-empty JSON list (or {\"prefixes\": [...]})")
                else:
                    checked_keys(ks, mkb)  # a list subclass: never from json.loads, checked all the same
                good.append(Row(int(rid), ks, ver, int(attempts), None, t,
                                float(t[4]) if age_on and len(t) > 4 and t[4] is not None else None,
                                t[-1] if tp_on and len(t) > 4 and isinstance(t[-1], str) else None))
            except (ValueError, TypeError, RecursionError, UsageError) as e:  # incl. BadDataError, UnicodeDecodeError
                bad.append((int(rid), f"{type(e).__name__}: {e}", tuple(t)))
        return good, bad

    def _deliver(self, rows: list[Row]) -> list[tuple[int, str, tuple[Any, ...]]]:
        tps = list(dict.fromkeys(r.traceparent for r in rows if r.traceparent))  # the first writer's trace, others linked
        with tracing.span("cachesync.relay.deliver", {"cachesync.rows": len(rows), "cachesync.table": self.table},
                          tps[0] if tps else None, tps[1:]):
            return self._deliver_rows(rows)

    def _deliver_rows(self, rows: list[Row]) -> list[tuple[int, str, tuple[Any, ...]]]:
        """Apply/publish ``rows``; returns the rows found unusable meanwhile (to park; the others were delivered).
        Raises the delivery errors (Redis, the bus) for the whole batch."""
        bad: list[tuple[int, str, tuple[Any, ...]]] = []
        t0 = time.monotonic()
        for r in rows:
            if r.prefixes is not None:  # resolved now: the keys present in Redis (also what a bus needs)
                assert self.cache is not None  # _parse parks the row otherwise
                r.keys = list(self.cache.keys_with_prefix(*r.prefixes))
        rows = [r for r in rows if r.keys]
        if self.apply:
            assert self.cache is not None
            # the fast path applied the others: only if it applied exactly this row's keys and version (anyone may
            # NOTIFY the channel: a forged notification with a row's id must not stand in for the row)
            applied = self._applied
            todo = [r for r in rows if applied.get(r.id) != (tuple(r.keys), r.version)] if applied else rows
            if todo:
                try:
                    self.cache.invalidate_many([(r.keys, r.version) for r in todo])
                except (UsageError, BadDataError):  # not expected after _parse: find the unusable row(s)
                    for r in todo:
                        try:
                            self.cache.invalidate_many([(r.keys, r.version)])
                        except (UsageError, BadDataError) as e:
                            bad.append((r.id, f"{type(e).__name__}: {e}", r.raw))
                    ids = {b[0] for b in bad}
                    rows = [r for r in rows if r.id not in ids]
            self.stats["applied"] += len(todo) - len(bad)
        if self.bus is not None:
            tp = tracing.current_traceparent()
            self.bus.publish([Invalidation(ks, r.version, traceparent=tp) for r in rows for ks in _parts(r.keys)])
        if self.latency is not None:
            extra = time.monotonic() - t0
            for r in rows:
                if r.age_ms is not None:
                    self.latency.observe(max(0.0, r.age_ms / 1000) + extra, self._latency_labels)
        return bad

    @staticmethod
    def _drop_bad(rows: list[Row], bad: list[tuple[int, str, tuple[Any, ...]]]) -> list[tuple[int, str, tuple[Any, ...]]]:
        """Remove the ``bad`` rows from ``rows`` (in place) and return ``bad``."""
        if bad:
            ids = {b[0] for b in bad}
            rows[:] = [r for r in rows if r.id not in ids]
        return bad

    def _ids(self, ids: list[int]) -> str:
        """SQL condition on ``id`` matching exactly ``ids`` (sorted): a range when they are contiguous."""
        if len(ids) > 1 and ids[-1] - ids[0] == len(ids) - 1:
            return f"id BETWEEN {int(ids[0])} AND {int(ids[-1])}"  # every id of the range is one of ours
        return f"id IN ({','.join(str(int(i)) for i in ids)})"

    def run_once(self) -> int:
        """Claim, deliver and delete one batch. Returns how many rows were completed (0: nothing due).

        Raises :class:`InvalidationError`/:class:`BusUnavailableError` after recording the failed attempt.
        """
        if self.dialect is POSTGRESQL:
            return self._once_pg()
        return self._once_lease() if self.dialect is SQLITE else self._once_locked()

    def _once_pg(self) -> int:
        """PostgreSQL, three round trips: ``BEGIN; DELETE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)
        RETURNING ...`` (claims and deletes, uncommitted), the Redis pipeline / bus publish, then ``COMMIT`` (with
        the next-due query in the same round trip). A crash before COMMIT rolls the delete back: rows stay."""
        conn = self._db()
        cur = conn.cursor()
        try:
            cur.execute("BEGIN; EXECUTE cachesync_claim")
            cur.nextset()
            raw = cur.fetchall()
            if not raw:
                self._end(cur, "ROLLBACK")
                return 0
            point("claimed")
            raw.sort()
            rows, bad = self._parse(raw)
            try:
                bad += self._drop_bad(rows, self._deliver(rows))
            except _DELIVERY_ERRORS as e:
                cur.execute("ROLLBACK")
                self._failed(cur, [r.id for r in rows], e)  # autocommit: committed at once
                raise
            point("applied")
            for rid, err, t in bad:  # deleted by the claim: put back, parked
                log.error("cachesync relay: outbox row %d of %s is unusable, parked: %s", rid, self.table, err)
                cur.execute(f"INSERT INTO {self.table} (id, cache_keys, key_version, attempts, run_at, last_error) "
                            f"VALUES (%s, %s, %s, %s, {PARKED}, %s)", (rid, t[1], t[2], t[3], err[:2000]))
            self.stats["parked"] += len(bad)
            point("deleted")
            self._end(cur, "COMMIT")
            point("committed")
            self._done(rows)
            return len(rows) + len(bad)
        except BaseException:
            try:
                if conn.info.transaction_status != 0:  # not idle
                    conn.execute("ROLLBACK")
            except Exception:
                pass
            raise
        finally:
            cur.close()

    def _end(self, cur: Any, verb: str) -> None:
        """PostgreSQL: end the claim transaction and learn when the next delayed row is due, in one round trip."""
        cur.execute(f"{verb}; EXECUTE cachesync_due")
        cur.nextset()
        v = cur.fetchone()[0]
        self._due = self.poll_interval if v is None else max(0.0, min(self.poll_interval, float(v) / 1000))

    def _once_locked(self) -> int:
        conn = self._db()
        cur = conn.cursor()
        try:
            cur.execute(f"SELECT id, cache_keys, key_version, attempts{self._age_col}{self._tp_col} FROM {self.table} WHERE run_at <= {self._now} "
                        f"ORDER BY id LIMIT {self.batch_size} FOR UPDATE SKIP LOCKED")
            raw = cur.fetchall()
            if not raw:
                conn.commit()
                return 0
            point("claimed")
            rows, bad = self._parse(list(raw))
            try:
                bad += self._drop_bad(rows, self._deliver(rows))
            except _DELIVERY_ERRORS as e:
                conn.rollback()
                self._failed(cur, [r.id for r in rows], e)
                conn.commit()
                raise
            point("applied")
            self._park(cur, bad)
            point("deleted")
            if rows:  # delete and commit in one round trip (multi-statement connection)
                cur.execute(f"DELETE FROM {self.table} WHERE {self._ids([r.id for r in rows])}; COMMIT")
                while cur.nextset():
                    pass
            else:
                conn.commit()
            point("committed")
            self._done(rows)
            return len(rows) + len(bad)
        except BaseException:
            try:
                conn.rollback()
            except Exception:
                pass
            raise
        finally:
            cur.close()

    def _once_lease(self) -> int:
        conn = self._db()
        cur = conn.cursor()
        try:
            cur.execute(f"UPDATE {self.table} SET claimed_until = {self._now} + {self.lease_ms}, claimed_by = ? "
                        f"WHERE id IN (SELECT id FROM {self.table} WHERE run_at <= {self._now} AND claimed_until <= "
                        f"{self._now} ORDER BY id LIMIT {self.batch_size}) "
                        "RETURNING id, cache_keys, key_version, attempts" + self._age_col + self._tp_col,
                        (self.relay_id,))
            raw = sorted(cur.fetchall())
            conn.commit()
            if not raw:
                return 0
            point("claimed")
            rows, bad = self._parse(raw)
            try:
                bad += self._drop_bad(rows, self._deliver(rows))
            except _DELIVERY_ERRORS as e:
                self._failed(cur, [r.id for r in rows], e, release=True)
                conn.commit()
                raise
            point("applied")
            if rows:
                cur.execute(f"DELETE FROM {self.table} WHERE claimed_by = ? AND {self._ids([r.id for r in rows])}",
                            (self.relay_id,))
            self._park(cur, bad)
            point("deleted")
            conn.commit()
            point("committed")
            self._done(rows)
            return len(rows) + len(bad)
        except BaseException:
            try:
                conn.rollback()
            except Exception:
                pass
            raise
        finally:
            cur.close()

    def _failed(self, cur: Any, ids: list[int], e: BaseException, release: bool = False) -> None:
        self.stats["errors"] += 1
        if not ids:
            return
        extra = ", claimed_until = 0" if release else ""
        cur.execute(self.dialect.sql(f"UPDATE {self.table} SET attempts = attempts + 1, last_error = ?{extra} "
                                     f"WHERE {self._ids(sorted(ids))}"), (str(e)[:2000],))

    def _park(self, cur: Any, bad: list[tuple[int, str, tuple[Any, ...]]]) -> None:
        for rid, err, _ in bad:
            log.error("cachesync relay: outbox row %d of %s is unusable, parked: %s", rid, self.table, err)
            cur.execute(self.dialect.sql(f"UPDATE {self.table} SET run_at = {PARKED}, last_error = ? WHERE id = ?"),
                        (err[:2000], rid))
        self.stats["parked"] += len(bad)

    def _done(self, rows: list[Row]) -> None:
        if self.fast:
            applied, deleted = self._applied, self._deleted
            if applied:
                for r in rows:
                    if applied.pop(r.id, None) == (tuple(r.keys), r.version):
                        self.stats["skipped"] += 1
            deleted.update(dict.fromkeys([r.id for r in rows]))
            _trim(deleted)
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["keys"] += sum(len(r.keys) for r in rows)
        if self.on_batch is not None:
            self.on_batch(len(rows))

    def _next_due(self) -> float:
        """Seconds until the earliest delayed row is due (capped at ``poll_interval``)."""
        if self._due is not None:  # PostgreSQL: learnt in the round trip that ended the last claim
            due, self._due = self._due, None
            return due
        conn = self._db()
        cur = conn.cursor()
        try:
            cur.execute(self._due_sql)
            v = cur.fetchone()[0]
            conn.commit()
        finally:
            cur.close()
        if v is None:
            return self.poll_interval
        return max(0.0, min(self.poll_interval, float(v) / 1000))

    # ------------------------------------------------------------------ fast path

    def _notified(self, timeout: float) -> list[str]:
        """PostgreSQL: the payloads of the notifications received so far, else of those arriving within ``timeout``
        seconds (blocking on the socket until the first one; then all that are already there)."""
        conn = self._db()
        got = [n.payload for n in conn.notifies(timeout=0)]  # kept by psycopg during the last batch
        if not got and timeout > 0:
            got = [n.payload for n in conn.notifies(timeout=timeout, stop_after=1)]
            if got:
                got += [n.payload for n in conn.notifies(timeout=0)]  # several in one packet: take them all now
        return got

    def apply_notified(self, timeout: float = 0.0) -> int:
        """Fast path by hand (:meth:`run` does it itself): wait up to ``timeout`` seconds for notifications, apply
        the rows they carry to Redis and remember their ids (the next claim deletes them without applying them
        again). Returns how many rows were applied (0 also when the fast path is off or Redis failed: the claim
        path then applies and retries them)."""
        if not self.listen:
            return 0
        return self._apply_payloads(self._notified(timeout))

    def _apply_payloads(self, payloads: list[str]) -> int:
        if not self.fast:
            return 0
        items: list[tuple[list[str], Any]] = []
        ids: list[int] = []
        seen: list[tuple[tuple[str, ...], str | None]] = []
        tps: list[str] = []  # the writers' traceparents (4th item of a row, when the table has the column)
        for p in payloads:
            if not p:  # only a wake-up: delayed rows, or too many for one notification
                self._claim_now = True
                continue
            try:
                rows = json.loads(p)
            except (ValueError, TypeError, RecursionError):  # not ours: ignored
                continue
            if isinstance(rows, list) and rows and not isinstance(rows[0], list):
                rows = [rows]  # one row per notification (the trigger); a list of rows is accepted too
            for row in rows if isinstance(rows, list) else ():
                try:
                    rid, keys, ver = int(row[0]), json.loads(row[1]), row[2]
                    if rid in self._applied or rid in self._deleted:
                        continue
                    if not isinstance(keys, list) or not keys:
                        self._claim_now = True
                        continue  # unusable: the claim path parks it
                    checked_keys(keys, self._max_key_bytes())
                    ver = None if ver is None else checked_version(ver)
                except (ValueError, TypeError, IndexError, KeyError, OverflowError, RecursionError, UsageError):
                    self._claim_now = True  # the claim path parks an unusable row
                    continue
                items.append((keys, ver))
                ids.append(rid)
                seen.append((tuple(keys), ver))
                if len(row) > 3 and isinstance(row[3], str) and 0 < len(row[3]) <= 128:
                    tps.append(row[3])
        if not items:
            return 0
        assert self.cache is not None
        tps = list(dict.fromkeys(tps))  # as in _deliver: the first writer's trace, the others linked
        try:
            with tracing.span("cachesync.relay.deliver", {"cachesync.rows": len(ids), "cachesync.table": self.table,
                                                          "cachesync.fast_path": True},
                              tps[0] if tps else None, tps[1:]):
                self.cache.invalidate_many(items)
        except (InvalidationError, RedisCommandError, RedisError, UsageError, BadDataError) as e:  # the claim
            # that follows retries or parks
            log.debug("cachesync relay: fast path failed, rows left to the claim: %s", e)
            self._claim_now = True
            return 0
        point("fast_applied")
        for rid, what in zip(ids, seen, strict=True):
            self._applied[rid] = what
        _trim(self._applied)
        self.stats["fast"] += len(ids)
        return len(ids)

    # ------------------------------------------------------------------ loop

    def _wait(self, seconds: float, stop: threading.Event) -> None:
        if seconds <= 0:
            return
        if not self.listen:
            stop.wait(seconds)
            return
        # PostgreSQL: the claiming connection also LISTENs (its backend is the one woken by the NOTIFY, so the
        # claim that follows runs on a warm process). Notifications that arrived during the last batch were
        # kept by psycopg and end the wait at once; otherwise block on the socket until one arrives (no tick).
        # The rows they carry are applied here, before the claim that will delete them. While notifications keep
        # carrying rows, the claim waits up to claim_delay (its round trips would delay the next notification).
        self._claim_now = False
        got = self._notified(seconds)
        if not got or not self._apply_payloads(got) or self._claim_now:
            return
        end = time.monotonic() + min(self.claim_delay, seconds)
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            got = self._notified(left)
            if not got:
                return
            self._apply_payloads(got)
            if self._claim_now:
                return

    def drain(self) -> int:
        """Deliver every row that is due now, then return how many (raises if Redis/the bus is down)."""
        total = 0
        while True:
            n = self.run_once()
            total += n
            if n == 0:
                return total

    def run(self, stop: threading.Event | None = None) -> None:
        """Relay until ``stop`` is set (or forever). Errors of Redis, the bus or the database are logged and
        retried with exponential backoff; nothing is lost."""
        stop = stop or threading.Event()
        backoff = 0.0
        while not stop.is_set():
            try:
                n = self.run_once()
                backoff = 0.0
                if n >= self.batch_size:
                    continue
                self._wait(self._next_due(), stop)
            except _DELIVERY_ERRORS as e:
                backoff = min(self.max_backoff, backoff * 2 if backoff else 0.05)
                log.warning("cachesync relay: delivery failed, retrying in %.2fs: %s", backoff, e)
                if self.on_error is not None:
                    self.on_error(e)
                stop.wait(backoff)
            except UsageError:
                raise
            except Exception as e:  # database errors: reconnect
                backoff = min(self.max_backoff, backoff * 2 if backoff else 0.05)
                log.warning("cachesync relay: database %s: %s: %s; reconnecting in %.2fs", redact_url(self.db_url),
                            type(e).__name__, e, backoff)
                self.stats["errors"] += 1
                if self.on_error is not None:
                    self.on_error(e)
                self._reset()
                stop.wait(backoff)
        self.close()


_PART_BYTES = 256 * 1024
"""Most bytes of JSON keys one bus message carries: a row with more keys (a TRUNCATE's prefixes resolve to every key
present) is published as several messages, well under NATS's ``max_payload`` (1 MiB by default). (One message per
row failed to publish, for ever: the relay retried the batch and no row behind it was delivered.)"""


def _parts(keys: list[str]) -> list[tuple[str, ...]]:
    """``keys`` as the key tuples of the bus messages of one row (one tuple, unless they exceed _PART_BYTES)."""
    if 6 * sum(map(len, keys)) + 3 * len(keys) <= _PART_BYTES:  # JSON spends at most 6 bytes a character
        return [tuple(keys)]
    out: list[tuple[str, ...]] = []
    part: list[str] = []
    size = 0
    for k in keys:
        n = len(json.dumps(k)) + 1
        if part and size + n > _PART_BYTES:
            out.append(tuple(part))
            part, size = [], 0
        part.append(k)
        size += n
    if part:
        out.append(tuple(part))
    return out


def _trim(d: dict[int, Any]) -> None:
    """Forget the oldest ids beyond the memory bound."""
    extra = len(d) - _MEMORY
    if extra > 0:
        for k in list(itertools.islice(d, extra)):
            del d[k]


def wait_empty(db_url: str, table: str = DEFAULT_TABLE, timeout: float = 30.0) -> bool:
    """Wait until the outbox holds no due or delayed row (parked rows excepted); True if it emptied."""
    ob = Outbox(table, dialect=dialect_of(db_url))
    conn = connect(db_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ob.pending(conn) == 0:
                return True
            time.sleep(0.02)
        return False
    finally:
        conn.close()
