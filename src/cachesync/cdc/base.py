"""The CDC source interface and the runner that turns committed transactions into invalidations.

Theory of operation
-------------------
A :class:`Source` (MariaDB binlog, PostgreSQL logical decoding) yields only *committed* transactions,
each with the position to resume *after* it. The runner:

1. loads the checkpoint (or, on first start, takes the source's current position and saves it);
2. reads an :attr:`Source.inline` source (PostgreSQL, MariaDB/MySQL) in the main thread, through its
   :meth:`Source.stream_marks`, which yields ``None`` whenever it has caught up: what was gathered is applied then
   (or once ``batch_max_keys`` keys are gathered). No thread hand-off on the commit -> invalidated path. A full
   batch (a backlog) is sent to Redis ahead (:meth:`CdcRunner._send_ahead`, on the runner's own connection:
   :mod:`cachesync.cdc.direct`) and the next batch is read meanwhile; its reply is read, and only then its
   position checkpointed, before the next batch is sent (at most one in flight). Any other source runs in one
   reader thread (``source.stream(position)``) that puts each transaction into a bounded queue (``queue_size``):
   when Redis is slow the queue fills, the reader blocks, the socket stops being read and the database buffers --
   the reader never reads ahead unboundedly;
3. in the main thread takes one transaction (waiting), then whatever else is already queued, up to
   ``batch_max_keys`` keys: a lone commit is applied at once (latency), a backlog in batches
   (throughput). The keys of a batch go to Redis in as few atomic script calls as possible
   (:meth:`cachesync.Cache.invalidate`); only after Redis accepted them is the checkpoint saved (file,
   fsync) and the source told (``ack``) so it can release WAL. A crash anywhere re-applies at most the
   unsaved batches: at-least-once, and invalidation is idempotent;
4. on a transient error of the source (:class:`Disconnected`: the database restarted, the connection was
   killed) it applies what it has, waits (exponential backoff, ``reconnect_delay`` .. ``reconnect_max_delay``)
   and starts a new reader from the last checkpoint;
5. on :class:`PositionLost` (the binlog/WAL the checkpoint points into is gone) every key the rules cover
   in the namespace is invalidated (SCAN by the rules' prefixes), then it restarts from the source's
   current position;
6. on stop (SIGTERM in the CLI) it applies what has been received, saves a final checkpoint and returns.

Lag: ``stats["lag_ms"]`` is wall clock at apply minus the transaction's commit time (PostgreSQL: µs
precision; MariaDB: the binlog stores whole seconds, so ±1 s). ``stats["apply_ms"]`` is receipt → applied.
Every ``stats_interval`` seconds a log line is written and the stats are stored in the Redis hash
``cs:{namespace}:cdc:{source ident}`` for monitoring.
"""

from __future__ import annotations

import abc
import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Unpack

from redis.exceptions import RedisError

from ..bus import Bus, BusUnavailableError, Invalidation, checked_keys, checked_version
from ..errors import CdcConfigError as CdcConfigError  # defined in errors.py, re-exported here
from ..errors import CdcError as CdcError
from ..errors import Disconnected as Disconnected
from ..errors import PositionLost as PositionLost
from ..errors import (
    BadDataError,
    CacheUnavailableError,
    InvalidationError,
    RedisCommandError,
)
from ..core.rules import Rules, TableRule
from .._sync.cache import Cache
from .checkpoint import FileCheckpoint
from .direct import DirectInvalidator, Pending
from .options import CdcOptions, CdcOptionsKwargs

log = logging.getLogger("cachesync.cdc")


@dataclass
class Change:
    """One row change. ``old`` is ``{}`` when an old image was expected but not sent (see REPLICA IDENTITY)."""

    schema: str | None
    table: str
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None
    truncate: bool = False


@dataclass
class Transaction:
    """A committed transaction: its changes, commit time (Unix seconds) and the position to resume after it.

    ``keys``: keys named explicitly by the transaction (PostgreSQL: ``cachesync`` logical messages written by
    :meth:`cachesync.outbox.Outbox.emit`), key -> version or None; invalidated with the row-change keys of the same
    transaction. ``messages``: how many such messages were applied."""

    position: dict[str, Any]
    commit_time: float | None
    changes: list[Change] = field(default_factory=list)
    received: float = field(default_factory=time.monotonic)
    keys: dict[str, Any] = field(default_factory=dict)
    messages: int = 0
    prefixes: list[str] = field(default_factory=list)
    """Key prefixes to flush (SCAN) named by the transaction itself (a capture trigger's TRUNCATE message)."""
    resolved: tuple[dict[str, Any], list[str]] | None = field(default=None, repr=False, compare=False)
    """:meth:`CdcRunner.keys_of` of this transaction, computed by the runner's reader thread (so that it overlaps
    the main thread's wait for Redis); None until then."""


class Source(abc.ABC):
    """A stream of committed transactions. ``stream`` runs in the reader thread (or, for an :attr:`inline`
    source, in the runner's own thread); the rest in the main one."""

    kind: str = "source"
    inline: bool = False
    """True: the source implements :meth:`stream_marks`, and the runner iterates that in its own thread, applying
    what it holds at each ``None`` -- no reader thread, no queue, no hand-off between threads. False (default):
    a reader thread runs :meth:`stream` and fills the bounded queue."""

    @property
    @abc.abstractmethod
    def ident(self) -> str:
        """Identity of this reader (checkpoint owner), e.g. ``mysql:host:3306/db#server_id=7``."""

    @abc.abstractmethod
    def check(self) -> None:
        """Preflight: raise :class:`CdcConfigError` naming any setting that prevents CDC."""

    @abc.abstractmethod
    def current_position(self) -> dict[str, Any]:
        """The position of the newest committed change (where a fresh reader starts)."""

    @abc.abstractmethod
    def stream(self, position: dict[str, Any]) -> Iterator[Transaction]:
        """Committed transactions after ``position``, blocking; raises :class:`Disconnected` /
        :class:`PositionLost`; returns when :meth:`close` was called."""

    def stream_marks(self, position: dict[str, Any]) -> Iterator[Transaction | None]:
        """:meth:`stream`, plus a ``None`` whenever it has caught up (nothing more can be read without waiting),
        before it waits, and at least every 0.2 s while idle; for an :attr:`inline` source. The runner stops it
        by closing the generator at a mark (then calls :meth:`close`), so it must yield a mark at least every
        0.2 s while nothing arrives."""
        raise NotImplementedError(f"{type(self).__name__} is not an inline source")

    def ack(self, position: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Everything up to ``position`` is applied and checkpointed (thread-safe; default: nothing)."""

    def reopen(self) -> None:  # noqa: B027 - optional hook
        """Allow :meth:`stream` again after :meth:`close` (the runner calls it before each new reader)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop :meth:`stream` (called from another thread) and release connections."""

    def counters(self) -> dict[str, int]:
        """Source-specific counters merged into the runner's ``stats`` (default: none)."""
        return {}


_END = object()


class CdcRunner:
    """Applies a :class:`Source`'s transactions to a :class:`Cache` and checkpoints them.

    ``options``: a :class:`~cachesync.cdc.CdcOptions` (batch_max_keys=500, queue_size=1000,
    stats_interval=10.0, reconnect_delay=0.2, reconnect_max_delay=5.0, on_missing_old_image="warn",
    checkpoint_in_background=True, checkpoint_interval=0.2: see there for what each does), or the same names as keywords -- not both
    (:class:`~cachesync.errors.CdcOptionError`). The resolved values are also attributes
    (``runner.batch_max_keys``...).

    ``bus``: a :class:`cachesync.bus.Bus`; the keys are then *published* (one :class:`~cachesync.bus.Invalidation`
    per key chunk and version, one ``publish`` call per batch) instead of invalidated in Redis, for workers
    (``cachesync worker``) to apply; the checkpoint is saved only after ``publish`` returned (the bus stored them
    durably). ``cache`` is still used for the prefix SCAN of TRUNCATE / lost positions (the keys found are
    published too) and for the stats hash.
    """

    def __init__(self, source: Source, cache: Cache, rules: Rules, checkpoint: FileCheckpoint, *,
                 bus: Bus | None = None, options: CdcOptions | None = None,
                 **kwargs: Unpack[CdcOptionsKwargs]) -> None:
        self.options = o = CdcOptions.resolve(options, dict(kwargs))
        self.source, self.cache, self.rules, self.checkpoint = source, cache, rules, checkpoint
        self.batch_max_keys, self.queue_size = o.batch_max_keys, o.queue_size
        self.stats_interval = float(o.stats_interval)
        self.reconnect_delay, self.reconnect_max_delay = float(o.reconnect_delay), float(o.reconnect_max_delay)
        self.on_missing_old_image = o.on_missing_old_image
        self.checkpoint_in_background = o.checkpoint_in_background
        self.checkpoint_interval = float(o.checkpoint_interval)
        self.bus = bus
        self._cp_cond = threading.Condition()
        self._cp_pending: dict[str, Any] | None = None
        self._cp_idle = False  # the saver waits for a position (only then does an apply wake it)
        self._cp_quit = False
        self._cp_error: BaseException | None = None
        self._stop = threading.Event()
        self._warned: set[str] = set()
        self._rules_by_table: dict[tuple[str | None, str], TableRule | None] = {}  # (schema, table) -> rule
        self.position: dict[str, Any] | None = None
        self.stats: dict[str, Any] = {
            "transactions": 0, "changes": 0, "keys": 0, "batches": 0, "checkpoints": 0, "reconnects": 0,
            "position_lost": 0, "redis_retries": 0, "missing_old_image": 0, "flushed_keys": 0,
            "lag_ms": None, "lag_ms_max": None, "apply_ms": None, "queued": 0, "position": None, "published": 0,
            "messages": 0, "skipped": 0,
        }
        self.stats.update(source.counters())
        self._last_stats = time.monotonic()
        # a single Redis server: the batches go out on one connection of the cache's pool kept by the runner
        self._direct = DirectInvalidator(cache) if DirectInvalidator.usable(cache) else None
        self._ahead: tuple[list[Transaction], dict[str, str | None], list[str], int, int, Pending | None] | None = None
        """A batch :meth:`_send_ahead` gathered (and sent): (txns, keys, prefixes, changes, messages, pending)."""

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Ask :meth:`run` to apply what it has received, save a final checkpoint and return (signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ keys

    def _rule(self, ch: Change) -> TableRule | None:
        k = (ch.schema, ch.table)
        try:
            return self._rules_by_table[k]
        except KeyError:
            pass
        r = self.rules.tables.get(f"{ch.schema}.{ch.table}") if ch.schema else None
        if r is None:
            r = self.rules.tables.get(ch.table)
        if len(self._rules_by_table) < 10_000:
            self._rules_by_table[k] = r
        return r

    def keys_of(self, txn: Transaction, into: dict[str, Any] | None = None,
                prefixes: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        """(key -> version or None, prefixes to flush) for one transaction; with ``into``/``prefixes`` the keys
        (highest version of a key wins) and prefixes are added to those (a batch's) and they are returned.

        A change (or a key the transaction names itself) that cannot be turned into keys the cache accepts --
        a key column that is NULL or missing from the row, a version column that is not a number, a key longer
        than ``max_key_bytes`` -- is recorded and skipped (``stats["skipped"]``, one ERROR line naming the table
        and the problem); the other changes of the transaction are applied and the checkpoint moves on."""
        keys: dict[str, str | None] = {} if into is None else into
        if prefixes is None:
            prefixes = []
        maxb = self.cache.options.max_key_bytes
        for ch in txn.changes:
            rule = self._rule(ch)
            if rule is None:
                continue
            if ch.truncate:
                prefixes.extend(rule.prefixes())
                continue
            rk = rule.resolve(ch.old, ch.new, maxb)
            if rk.problems:
                self._skip(".".join(p for p in (ch.schema, ch.table) if p), "; ".join(rk.problems), ch)
            if rk.missing_old:
                self.stats["missing_old_image"] += 1
                self._warn_missing(rule, ch, rk.missing_old)
                if self.on_missing_old_image == "flush":
                    prefixes.extend(TableRule.build(rule.table, rk.missing_old).prefixes())
            ver = rk.version
            for k in rk.keys:
                if k not in keys:
                    keys[k] = ver
                else:
                    _merge(keys, k, ver)
        for k, ver in txn.keys.items():  # keys the transaction named itself (logical messages)
            try:
                checked_keys([k], maxb)
                ver = None if ver is None else checked_version(ver)
            except BadDataError as e:
                self._skip("(logical message)", str(e), None)
                continue
            _merge(keys, k, ver)
        prefixes.extend(txn.prefixes)
        return keys, prefixes

    def _skip(self, table: str, problem: str, ch: Change | None) -> None:
        self.stats["skipped"] += 1
        what = "" if ch is None else f" ({'update' if ch.old and ch.new else 'insert' if ch.new else 'delete'})"
        log.error("CDC %s: a change of table %s%s cannot be turned (fully) into cache keys; what cannot is skipped "
                  "(counted in stats['skipped']): %s", self.source.ident, table, what, problem[:500])

    def _warn_missing(self, rule: TableRule, ch: Change, missing: list[str]) -> None:
        if rule.table in self._warned:
            return
        self._warned.add(rule.table)
        log.error(
            "CDC: a change of table %r came without the old values of the column(s) used by key template(s) %s, "
            "so the OLD key of a row whose key column changed cannot be invalidated. On PostgreSQL run "
            "`ALTER TABLE %s REPLICA IDENTITY FULL` (the old row image then carries every column); on MariaDB/"
            "MySQL set binlog_row_image=FULL. Until then: on_missing_old_image=%r (counted in "
            "stats['missing_old_image']; 'flush' invalidates every key of those templates).",
            rule.table, missing, ".".join(p for p in (ch.schema, ch.table) if p), self.on_missing_old_image)

    # ------------------------------------------------------------------ Redis

    def _retry(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """Run ``fn`` until Redis accepts it (backoff); while it fails nothing more is read (backpressure)."""
        delay = self.reconnect_delay
        while True:
            try:
                return fn(*args, **kw)
            except (InvalidationError, CacheUnavailableError, BusUnavailableError, RedisCommandError, RedisError) as e:
                self.stats["redis_retries"] += 1
                if self._stop.is_set() and self.stats["redis_retries"] > 3:
                    raise
                log.warning("CDC: %s failed, retrying in %.1fs (nothing is checkpointed until it succeeds): %s",
                            what, delay, str(e)[:300])
                time.sleep(delay)
                delay = min(delay * 2, self.reconnect_max_delay)

    def _release_direct(self) -> None:
        """Give the runner's own connection back to the cache's pool (a bounded pool may have no other) before the
        runner uses the cache's client itself; the next batch takes one again. Not while a batch sent ahead is
        unread (its connection holds its replies)."""
        d = self._direct
        if d is not None and d._pending is None:
            d.close()

    def flush_prefixes(self, prefixes: list[str]) -> int:
        """Invalidate every key in the namespace that starts with one of ``prefixes`` (SCAN); returns how many."""
        cache = self.cache
        self._release_direct()  # the SCAN takes a connection of the same pool (bounded: maybe the only one)
        keys = self._retry("SCAN", lambda: list(cache.keys_with_prefix(*prefixes)))
        self._invalidate(dict.fromkeys(keys))
        self.stats["flushed_keys"] += len(keys)
        return len(keys)

    def _gather(self, txns: list[Transaction]) -> tuple[dict[str, str | None], list[str], int, int]:
        """(keys, prefixes, changes, messages) of a batch."""
        keys: dict[str, str | None] = {}
        prefixes: list[str] = []
        changes = messages = 0
        for t in txns:  # one dict for the whole batch: a key named by several transactions keeps its highest version
            if t.resolved is None:
                self.keys_of(t, keys, prefixes)
            else:
                ks, ps = t.resolved
                for k, v in ks.items():
                    if k not in keys:
                        keys[k] = v
                    else:
                        _merge(keys, k, v)
                prefixes.extend(ps)
            changes += len(t.changes)
            messages += t.messages
        return keys, prefixes, changes, messages

    def _send_ahead(self, txns: list[Transaction]) -> bool:
        """Send the invalidations of a full batch of a backlog to Redis without waiting for the reply, so that the
        next batch is read while Redis runs the scripts; :meth:`apply` of the same list (which must come next, and
        before any other batch) reads the reply, then checkpoints. Only the plain case (a single Redis server, no
        bus, no prefix flush in the batch); False (nothing sent) otherwise -- :meth:`apply` then does it all."""
        d = self._direct
        if d is None or self.bus is not None or self._ahead is not None or self._cp_error is not None:
            return False
        keys, prefixes, changes, messages = self._gather(txns)
        if prefixes:
            self._ahead = (txns, keys, prefixes, changes, messages, None)  # gathered once; applied in order
            return True
        versions = {k: "" if v is None else v for k, v in keys.items()}
        self._ahead = (txns, keys, prefixes, changes, messages, d.start(versions) if versions else None)
        return True

    def apply(self, txns: list[Transaction]) -> None:
        """Invalidate the keys of ``txns`` (few script calls), then save the checkpoint and ack the source."""
        if self._cp_error is not None:
            raise self._cp_error
        ahead = self._ahead
        if ahead is not None and ahead[0] is not txns:
            self.apply(ahead[0])  # a batch sent ahead is applied (and checkpointed) first, whatever comes next
            ahead = None
        if not txns:
            return
        pending = None
        if ahead is not None:
            self._ahead = None
            _, keys, prefixes, changes, messages, pending = ahead
        else:
            keys, prefixes, changes, messages = self._gather(txns)
        self.stats["changes"] += changes
        self.stats["messages"] += messages
        if prefixes:
            self.flush_prefixes(prefixes)
        if pending is not None:
            d = self._direct
            assert d is not None
            first = [pending]

            def finish(versions: dict[str, str]) -> int:
                if first:  # the reply of what was sent ahead; on failure the whole batch is sent again
                    return d.finish(first.pop())
                return d.invalidate(versions)
            self._retry("invalidate", finish, pending.versions)
        else:
            self._invalidate(keys)
        now_wall, now = time.time(), time.monotonic()
        pos = txns[-1].position
        if self.checkpoint_in_background:
            with self._cp_cond:
                self._cp_pending = pos
                if self._cp_idle:  # else it is saving or pacing, and takes the newest position when done
                    self._cp_cond.notify()
        else:
            self._save(pos)
        st = self.stats
        st.update(self.source.counters())
        st["transactions"] += len(txns)
        st["keys"] += len(keys)
        st["batches"] += 1
        ct = txns[-1].commit_time
        if ct is not None:
            lag = max(0.0, (now_wall - ct) * 1000)
            st["lag_ms"] = round(lag, 3)
            st["lag_ms_max"] = lag if st["lag_ms_max"] is None else max(st["lag_ms_max"], round(lag, 3))
        st["apply_ms"] = round((now - txns[0].received) * 1000, 3)

    def _invalidate(self, keys: Mapping[str, str | None]) -> None:
        """Invalidate ``keys`` (key -> checked version) in Redis (:meth:`Cache.invalidate_many`: one script call
        per 500 keys, each with its version), or publish them on the bus (one message per version and
        ``batch_max_keys`` keys); retried until accepted. Returns only once Redis/the bus holds them: the
        checkpoint may then move past them."""
        if not keys:
            return
        if self.bus is not None:
            bus = self.bus
            by_ver: dict[str | None, list[str]] = {}
            for k, v in keys.items():
                by_ver.setdefault(v, []).append(k)
            msgs = [Invalidation(tuple(group[i:i + self.batch_max_keys]), v) for v, group in by_ver.items()
                    for i in range(0, len(group), self.batch_max_keys)]
            self._retry("publish", lambda: bus.publish(msgs))
            self.stats["published"] += len(msgs)
            return
        # the versions were checked (checked_version: already the encoded decimal string) and merged per key
        # here, so the batch goes straight to the one invalidation flow, as Cache.invalidate_many would send it
        versions = {k: "" if v is None else v for k, v in keys.items()}
        d = self._direct
        self._retry("invalidate", self.cache._invalidate_merged if d is None else d.invalidate, versions)

    # ------------------------------------------------------------------ checkpoints

    def _save(self, pos: dict[str, Any]) -> None:
        self.checkpoint.save(self.source.kind, self.source.ident, pos)
        self.position = pos
        self.source.ack(pos)
        self.stats["checkpoints"] += 1
        self.stats["position"] = pos

    def _saver(self) -> None:
        """Background thread: saves the newest applied position (fsync off the apply path); latest wins, at most
        one save per ``checkpoint_interval`` (stop/reconnect save at once)."""
        last = -float("inf")
        while True:
            with self._cp_cond:
                self._cp_idle = True
                while self._cp_pending is None and not self._cp_quit:
                    self._cp_cond.wait()
                self._cp_idle = False
                while not self._cp_quit and (wait := last + self.checkpoint_interval - time.monotonic()) > 0:
                    self._cp_cond.wait(wait)  # newer positions replace the pending one meanwhile
                pos, self._cp_pending = self._cp_pending, None
                quit_ = self._cp_quit
            if pos is not None:
                try:
                    self._save(pos)
                except BaseException as e:  # reported by the main loop
                    self._cp_error = e
                    return
                last = time.monotonic()
            if quit_ and pos is None:
                return

    def _flush_checkpoint(self) -> None:
        """Wait until every applied position is saved (before reconnecting, after stopping)."""
        if not self.checkpoint_in_background:
            return
        with self._cp_cond:
            pos, self._cp_pending = self._cp_pending, None
        if pos is not None:
            self._save(pos)
        if self._cp_error is not None:
            raise self._cp_error

    # ------------------------------------------------------------------ loop

    def _reader(self, position: dict[str, Any], q: queue.Queue[Any], quit_: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not quit_.is_set():
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False
        busy = max(1, min(self.batch_max_keys, self.queue_size // 2))
        try:
            for txn in self.source.stream(position):
                if q.qsize() >= busy:
                    # a backlog the main thread is behind on: its keys are formed here, while the main thread
                    # waits for Redis (when this thread is the slower one, the main thread forms them instead)
                    txn.resolved = self.keys_of(txn)
                if not put(txn):
                    return
            put(_END)
        except BaseException as e:  # handed to the main thread
            put(e)

    def _maybe_stats(self, force: bool = False) -> None:
        if not self.stats_interval and not force:
            return
        now = time.monotonic()
        if not force and now - self._last_stats < self.stats_interval:
            return
        self._last_stats = now
        st = self.stats
        st.update(self.source.counters())
        log.info("CDC %s: %d txns, %d changes, %d keys applied, lag %s ms (max %s), reconnects %d, position %s",
                 self.source.ident, st["transactions"], st["changes"], st["keys"], st["lag_ms"], st["lag_ms_max"],
                 st["reconnects"], st["position"])
        self._release_direct()  # the hset takes a connection of the same pool
        try:
            self.cache.redis.hset(f"cs:{self.cache.ctx.ns}:cdc:{self.source.ident}",
                                  mapping={k: str(v) for k, v in st.items()} | {"updated_at": str(time.time())})
        except Exception as e:  # monitoring must not stop the stream
            log.debug("CDC: cannot store stats in Redis: %s", e)

    def run(self) -> None:
        """Run until :meth:`stop`; raises :class:`CdcConfigError` and unexpected errors of the source."""
        self.source.check()
        pos = self.checkpoint.load(self.source.kind, self.source.ident)
        if pos is None:
            pos = self.source.current_position()
            log.info("CDC %s: no checkpoint in %s, starting at the current position %s",
                     self.source.ident, self.checkpoint.path, pos)
            self.checkpoint.save(self.source.kind, self.source.ident, pos)
        else:
            log.info("CDC %s: resuming from checkpoint %s", self.source.ident, pos)
        self.position = pos
        self.stats["position"] = pos
        delay = self.reconnect_delay
        saver = None
        if self.checkpoint_in_background:
            saver = threading.Thread(target=self._saver, daemon=True, name="cachesync-cdc-checkpoint")
            saver.start()
        # read in this thread only a source that says so and whose class has stream_marks (a wrapper that
        # forwards attributes but not that method is read through its own stream(), in a reader thread)
        inline = bool(getattr(self.source, "inline", False)) and callable(
            getattr(type(self.source), "stream_marks", None))
        try:
            while not self._stop.is_set():
                start_pos = self.position
                self.source.reopen()
                if inline:
                    stream = self.source.stream_marks(self.position)
                    try:
                        err = self._consume_inline(stream)
                    finally:
                        close = getattr(stream, "close", None)
                        if close is not None:
                            close()  # a generator: its cleanup (closing the connection) runs now
                        self.source.close()
                else:
                    q: queue.Queue[Any] = queue.Queue(self.queue_size)
                    quit_ = threading.Event()
                    th = threading.Thread(target=self._reader, args=(self.position, q, quit_), daemon=True,
                                          name="cachesync-cdc-reader")
                    th.start()
                    err = self._consume(q)
                    quit_.set()
                    self.source.close()
                    th.join(timeout=5.0)
                if saver is not None:
                    with self._cp_cond:
                        self._cp_quit = True
                        self._cp_cond.notify()
                    saver.join()
                    saver = None
                    self._flush_checkpoint()
                    if err is not None and not self._stop.is_set():
                        self._cp_quit = False
                        saver = threading.Thread(target=self._saver, daemon=True, name="cachesync-cdc-checkpoint")
                        saver.start()
                if err is None:
                    break
                if isinstance(err, PositionLost):
                    self.stats["position_lost"] += 1
                    covered = [p for r in self.rules.tables.values() for p in r.prefixes()]
                    log.error("CDC %s: %s. Invalidating every key the rules cover in namespace %r (prefixes %s) "
                              "and restarting from the current position.", self.source.ident, err,
                              self.cache.ctx.ns, sorted(set(covered)))
                    pos = self.source.current_position()
                    n = self.flush_prefixes(covered)
                    log.error("CDC %s: invalidated %d key(s); now at %s", self.source.ident, n, pos)
                    self.checkpoint.save(self.source.kind, self.source.ident, pos)
                    self.position = pos
                    continue
                if isinstance(err, Disconnected):
                    self.stats["reconnects"] += 1
                    if self.position != start_pos:  # the stream made progress: an outage of its own, from the start
                        delay = self.reconnect_delay
                    log.warning("CDC %s: %s; reconnecting in %.1fs from %s", self.source.ident, err, delay,
                                self.position)
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.reconnect_max_delay)
                    continue
                raise err
        finally:
            if saver is not None:
                with self._cp_cond:
                    self._cp_quit = True
                    self._cp_cond.notify()
                saver.join(timeout=10)
            self.source.close()
            self._maybe_stats(force=True)
            if self._direct is not None:
                self._direct.close()

    def _consume_inline(self, stream: Iterator[Transaction | None]) -> BaseException | None:
        """Read an :attr:`Source.inline` source in this thread: transactions are gathered up to
        ``batch_max_keys`` keys and applied as soon as the source yields ``None`` (caught up: a lone commit goes
        to Redis at once, with no hand-off between threads) or the batch is full; until stop (None) or a source
        error (returned, after applying what was read before it). While a batch is applied nothing is read (the
        database buffers: backpressure, as with a full queue)."""
        batch: list[Transaction] = []
        nkeys = 0
        limit = self.batch_max_keys
        stop = self._stop
        while True:
            err: BaseException | None = None
            try:
                item = next(stream)
            except StopIteration:
                item, err = None, Disconnected("the source stream ended")
            except Exception as e:  # as the reader thread hands it over (KeyboardInterrupt & co. propagate)
                item, err = None, e
            if item is not None:
                batch.append(item)
                nkeys += (len(item.changes) + len(item.keys)) or 1
                if nkeys < limit:
                    continue
                # a full batch of a backlog: applied while the next one is read (the one sent before it first)
                if self._ahead is not None:
                    self.apply(self._ahead[0])
                if not stop.is_set() and self._send_ahead(batch):
                    batch, nkeys = [], 0
                    continue
            if self._ahead is not None:
                self.apply(self._ahead[0])
            if batch:
                self.apply(batch)
                batch, nkeys = [], 0
            self._maybe_stats()
            if err is not None:
                return err
            if stop.is_set():
                return None

    def _consume(self, q: queue.Queue[Any]) -> BaseException | None:
        """Apply transactions from ``q`` until stop (None) or a source error (returned)."""
        while True:
            try:
                item = q.get(timeout=0.2)
            except queue.Empty:
                self._maybe_stats()
                if self._stop.is_set():
                    return None
                continue
            batch: list[Transaction] = []
            nkeys = 0
            err: BaseException | None = None
            while True:
                if item is _END:
                    err = Disconnected("the source stream ended")
                    break
                if isinstance(item, BaseException):
                    err = item
                    break
                batch.append(item)
                nkeys += (len(item.changes) + len(item.keys)) or 1
                if nkeys >= self.batch_max_keys:
                    break
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
            self.stats["queued"] = q.qsize()
            self.apply(batch)
            self._maybe_stats()
            if err is not None:
                return err
            if self._stop.is_set():
                # apply what has already arrived, then stop with a final checkpoint
                rest = []
                while True:
                    try:
                        it = q.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(it, Transaction):
                        rest.append(it)
                self.apply(rest)
                return None


def _merge(keys: dict[str, str | None], k: str, ver: str | None) -> None:
    """Add key ``k`` with checked version ``ver`` to ``keys``, keeping the highest version (None = unknown)."""
    old = keys.get(k)
    if k not in keys or (ver is not None and (old is None or float(ver) > float(old))):
        keys[k] = ver
