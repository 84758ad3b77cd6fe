"""Deterministic race scenarios: timelines of real SQL statements and real cache commands.

Each scenario is one timeline function run under several variants (a write strategy,
with or without leases). Actors (writers, readers, a push service) each have their own
database connection and their own :class:`cachesync.Cache`, as separate processes would.
The controller executes the steps T1..Tn in exactly the listed order:

* a reader whose load must straddle a write runs in a thread; its loader blocks on
  :class:`threading.Event` objects the controller sets (no sleeps);
* delayed second deletes go to a :class:`ManualScheduler` and fire when the timeline says;
* the push service's refresh timer is a :class:`ManualTimer` advanced by the timeline.

After every step the timeline records the database's and the cache's value. The verdict:
``stale`` when the cache ends holding a value other than the database's;
``transient`` when it ends consistent but some read returned an out-of-date value
(or no plan) or a value that was never committed; ``consistent`` otherwise.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from .. import core as P
from ..errors import InvalidationError
from ..core.keys import entry_key
from .._sync.cache import Cache
from .embedded import LabError
from .labdb import LabDB, Session

NONE = "(none)"
RECOMMENDED = "db_then_invalidate"


@dataclass
class StepRecord:
    t: str
    actor: str
    action: str
    result: str
    db: str
    cache: str


@dataclass
class ScenarioResult:
    id: str
    group: int
    title: str
    variant: str
    strategy: str
    leases: bool
    role: str
    verdict: str
    db_final: str | None
    cache_final: str | None
    steps: list[StepRecord]
    stale_reads: int
    costs: dict[str, int]
    note: str

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return d


class ManualScheduler:
    """A ``Cache(scheduler=...)`` that records delayed steps; the timeline fires them."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, fn: Callable[[], None]) -> None:
        self.pending.append((delay, fn))

    def fire(self) -> float:
        delay = 0.0
        while self.pending:
            delay, fn = self.pending.pop(0)
            fn()
        return delay


class ManualTimer:
    """A periodic timer driven by :meth:`advance` instead of the wall clock."""

    def __init__(self, period: float, callback: Callable[[], None]) -> None:
        self.period = period
        self.callback = callback
        self.now = 0.0
        self.due = period

    def advance(self, seconds: float | None = None) -> None:
        self.now += self.period if seconds is None else seconds
        while self.now >= self.due - 1e-9:
            self.due += self.period
            self.callback()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lab:
    """One lab run: a Redis namespace and a database table, both private and removed by :meth:`close`."""

    def __init__(self, redis_url: str, db_url: str) -> None:
        self.redis_url = redis_url
        self.db_url = db_url
        self.namespace = "lab" + uuid.uuid4().hex[:10]
        try:
            self.redis: redis.Redis = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
            self.redis.ping()
        except redis.RedisError as e:
            from .._driver import redact_url

            raise LabError(f"cannot reach Redis at {redact_url(redis_url)}: {e}") from e
        self.db = LabDB(db_url)
        self.db.create()
        self._caches: list[Cache] = []

    def cache(self, leases: bool = True, scheduler: ManualScheduler | None = None, url: str | None = None,
              **kw: Any) -> Cache:
        c = Cache(url or self.redis_url, namespace=self.namespace, ttl_jitter=0.0, leases=leases, max_wait=0.5,
                  scheduler=scheduler, broadcast_invalidations=False, connect_timeout=0.5, socket_timeout=5.0,
                  **kw)
        self._caches.append(c)
        return c

    def close(self) -> None:
        for c in self._caches:
            try:
                c.close()
            except Exception:
                pass
        self._caches.clear()
        try:
            keys = list(self.redis.scan_iter(match=f"cs:{self.namespace}:*", count=500))
            if keys:
                self.redis.delete(*keys)
        except redis.RedisError:
            pass
        self.redis.close()
        self.db.drop()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Timeline:
    """The record of one variant's run: steps, committed history, reads, costs."""

    def __init__(self, lab: Lab, key: str, leases: bool, strategy: str) -> None:
        self.lab = lab
        self.key = key
        self.leases = leases
        self.strategy = strategy
        self.steps: list[StepRecord] = []
        self.history: list[str] = []  # committed values, oldest first
        self.stale_reads = 0
        self.dirty: list[str] = []  # values read that were not committed at the time
        self.costs = {"db_reads": 0, "db_writes": 0, "cache_writes": 0, "stale_reads": 0, "no_plan": 0,
                      "stale_steps": 0}
        self.caches: list[Cache] = []
        self.observer = lab.cache(leases=leases)
        self.obs_db = lab.db.session("observer")

    @property
    def committed(self) -> str | None:
        return self.history[-1] if self.history else None

    def session(self, actor: str) -> Session:
        return self.lab.db.session(actor)

    def cache_value(self) -> str | None:
        d = self.observer.peek(self.key)
        if not d or "value" not in d:
            return None
        v = d["value"]
        return None if v is P.NOT_FOUND else str(v)

    def cache_negative(self) -> bool:
        """Whether the cache holds a "not found" entry (negative caching): stale while the row exists."""
        d = self.observer.peek(self.key)
        return d is not None and d.get("value") is P.NOT_FOUND

    def step(self, actor: str, action: str, result: str = "") -> None:
        db, _ = self.obs_db.select(self.key)
        cv = self.cache_value()
        if cv is not None and cv != db:
            self.costs["stale_steps"] += 1
        self.steps.append(StepRecord(f"T{len(self.steps) + 1}", actor, action, result, db or NONE, cv or NONE))

    def judge_read(self, value: str | None, committed_at_start: str | None) -> str:
        """Classify a read: "" (fine), "stale" (older than committed at its start, or nothing), "dirty"."""
        start = committed_at_start
        if value == start:
            return ""
        if value is None or (value in self.history and start in self.history
                             and self.history.index(value) < self.history.index(start)):
            self.stale_reads += 1
            self.costs["stale_reads"] += 1
            return "stale"
        if value not in self.history:
            self.dirty.append(value)
            return "dirty"
        return ""

    def cache(self, **kw: Any) -> Cache:
        c = self.lab.cache(**kw)
        self.caches.append(c)
        return c

    def close(self) -> None:
        for c in self.caches:
            c.close()
            if c in self.lab._caches:
                self.lab._caches.remove(c)

    def finish(self, variant: Variant) -> ScenarioResult:
        db, _ = self.obs_db.select(self.key)
        cv = self.cache_value()
        never_committed = [v for v in self.dirty if v not in self.history]
        if (cv is not None and cv != db) or (db is not None and self.cache_negative()):
            verdict = "stale"
        elif self.stale_reads or never_committed:
            verdict = "transient"
        else:
            verdict = "consistent"
        for c in self.caches:
            st = c.stats
            self.costs["cache_writes"] += st["sets"] + st["fills"] + st["invalidations"]
        return ScenarioResult(variant.id, variant.group, GROUP_TITLES[variant.group], variant.label,
                              variant.strategy, variant.leases, variant.role, verdict, db, cv, self.steps,
                              self.stale_reads, dict(self.costs), variant.note)


STEP_TEXT = {
    P.Step.INVALIDATE: "invalidate.lua (DEL value, void lease)",
    P.Step.SET_PLAIN: "set.lua: cache = {v}",
    P.Step.SET_VERSIONED: "set.lua: cache = {v} if v{ver} is newest",
}


class Writer:
    """A writer process: its own DB connection and Cache; ``begin``/``update_db``/``finish`` are separate steps."""

    def __init__(self, tl: Timeline, name: str, strategy: str, delay: float | None = None,
                 cache: Cache | None = None) -> None:
        self.tl = tl
        self.name = name
        self.strategy = P.resolve_strategy(strategy)
        self.scheduler = ManualScheduler()
        self.cache = cache or tl.cache(leases=tl.leases, scheduler=self.scheduler)
        self.db = tl.session(name)
        self.delay = delay
        self.value = ""
        self.version: int | None = None
        self.cm: Any = None
        self.plan: P.WritePlan | None = None

    def _describe(self, steps: tuple[P.Step, ...], before: dict[str, int]) -> tuple[str, str]:
        action = "; ".join(STEP_TEXT[s].format(v=self.value, ver=self.version) for s in steps)
        st = self.cache.stats
        refused = st["sets_refused"] - before["sets_refused"]
        return action, ("refused (older version)" if refused else "done")

    def begin(self, value: str) -> None:
        self.value = value
        before = self.cache.stats
        kw: dict[str, Any] = {}
        if P.Step.SET_PLAIN in self.strategy.before:
            kw["value"] = value
        self.cm = self.cache.write(self.tl.key, strategy=self.strategy.name, delay=self.delay, **kw)
        self.plan = self.cm.__enter__()
        if self.strategy.before:
            action, result = self._describe(self.strategy.before, before)
            self.tl.step(self.name, f"before DB write: {action}", result)

    def update_db(self) -> None:
        self.version = self.db.update(self.tl.key, self.value)
        self.tl.costs["db_writes"] += 1
        self.tl.history.append(self.value)
        assert self.plan is not None
        self.plan.set_value(self.value, version=self.version)
        self.tl.step(self.name, f"UPDATE t SET val='{self.value}', version=version+1 WHERE k=?; COMMIT",
                     f"committed v{self.version}")

    def fail_db(self) -> None:
        err = self.db.update_failing(self.tl.key, self.value)
        self.tl.step(self.name, f"UPDATE t SET val='{self.value}' ...; INSERT (duplicate key); ROLLBACK",
                     f"failed: {err}, rolled back")

    def finish(self, failed: bool = False) -> None:
        before = self.cache.stats
        steps = self.strategy.on_error if failed else self.strategy.after
        try:
            if failed:
                exc = RuntimeError("database write failed")
                self.cm.__exit__(RuntimeError, exc, None)
            else:
                self.cm.__exit__(None, None, None)
        except InvalidationError as e:
            action = "; ".join(STEP_TEXT[s].format(v=self.value, ver=self.version) for s in steps)
            self.tl.step(self.name, f"after commit: {action}", f"FAILED: Redis unreachable ({type(e).__name__})")
            return
        if steps:
            action, result = self._describe(steps, before)
            self.tl.step(self.name, f"after commit: {action}", result)
        if self.scheduler.pending:
            self.tl.step(self.name, f"schedule the second delete in {self.delay} s", "pending")

    def fire_delayed(self, note: str) -> None:
        self.scheduler.fire()
        self.tl.step(self.name, f"delayed second delete fires ({note}): invalidate.lua", "done")


class Reader:
    """A reader process doing cache-aside reads through :meth:`Cache.get_entry` with a DB loader."""

    def __init__(self, tl: Timeline, name: str, leases: bool | None = None, url: str | None = None) -> None:
        self.tl = tl
        self.name = name
        self.cache = tl.cache(leases=tl.leases if leases is None else leases, url=url)
        self.db = tl.session(name)
        self._thread: threading.Thread | None = None
        self._loaded = threading.Event()
        self._resume = threading.Event()
        self._done = threading.Event()
        self._entry: P.Entry[Any] | None = None
        self._exc: BaseException | None = None
        self._loaded_value: str | None = None
        self._start_committed: str | None = None

    def _loader(self) -> Any:
        v, ver = self.db.select(self.tl.key)
        self.tl.costs["db_reads"] += 1
        self._loaded_value = v
        if v is None:
            return P.NOT_FOUND
        return P.Versioned(v, ver) if self.cache.options.leases else v

    def _miss_text(self) -> str:
        lease = ", lease granted" if self.cache.options.leases else ""
        return f"get.lua miss{lease}; SELECT val FROM t WHERE k=? -> {self._loaded_value}"

    def read(self, ttl: float | None = None) -> str | None:
        """One complete read, as a single step."""
        start = self.tl.committed
        self._loaded_value = None
        e = self.cache.get_entry(self.tl.key, self._loader, ttl)
        value = None if e.value is P.NOT_FOUND else str(e.value)
        kind = self.tl.judge_read(value, start)
        if e.source == "cache":
            action, res = "GET: hit", f"got {value}"
        elif e.source == "fallback":
            action = f"get.lua: Redis unreachable; SELECT val FROM t WHERE k=? -> {self._loaded_value}"
            res = f"got {value} (fallback load, no fill)"
        else:
            action = self._miss_text() + "; fill.lua"
            res = f"got {value}; fill {'accepted' if e.filled else 'refused (lease voided)'}"
        self.tl.step(self.name, action, res + (f" [{kind.upper()} READ]" if kind else ""))
        return value

    def start_paused(self) -> None:
        """Start a read whose loader stops after its SELECT (one step: the miss and the load)."""
        self._start_committed = self.tl.committed

        def loader() -> Any:
            value = self._loader()
            self._loaded.set()
            if not self._resume.wait(30):
                raise LabError("timeline controller never resumed the reader")
            return value

        def run() -> None:
            try:
                self._entry = self.cache.get_entry(self.tl.key, loader)
            except BaseException as e:
                self._exc = e
            finally:
                self._loaded.set()
                self._done.set()

        self._thread = threading.Thread(target=run, name=f"lab-{self.name}", daemon=True)
        self._thread.start()
        if not self._loaded.wait(30):
            raise LabError(f"{self.name} never reached its load")
        if self._exc is not None:
            raise self._exc
        if self._done.is_set():  # a hit: the read is over
            assert self._entry is not None
            value = None if self._entry.value is P.NOT_FOUND else str(self._entry.value)
            kind = self.tl.judge_read(value, self._start_committed)
            self.tl.step(self.name, "GET: hit", f"got {value}" + (f" [{kind.upper()} READ]" if kind else ""))
        else:
            self.tl.step(self.name, self._miss_text(), "loader still running (paused)")

    def finish_paused(self) -> None:
        """Let the paused loader return; the write-back (fill) is one step."""
        assert self._thread is not None
        hit = self._done.is_set()
        self._resume.set()
        self._thread.join(30)
        if self._exc is not None:
            raise self._exc
        if hit:
            return
        e = self._entry
        assert e is not None
        value = None if e.value is P.NOT_FOUND else str(e.value)
        self.tl.judge_read(value, self._start_committed)
        self.tl.step(self.name, f"fill.lua: write back {value}",
                     "accepted" if e.filled else "refused (lease voided by the invalidation)")


# --------------------------------------------------------------------------- timelines


def t_two_writers(tl: Timeline, cache_first: bool) -> None:
    """Scenarios 1 and 2a: writers A and B; their cache steps land in the opposite order to their DB steps."""
    old, va, vb = ("100", "99", "98") if not cache_first else ("5", "0", "1")
    tl.session("setup").insert(tl.key, old)
    tl.history.append(old)
    Reader(tl, "reader C").read()
    a, b = Writer(tl, "writer A", tl.strategy), Writer(tl, "writer B", tl.strategy)
    if not cache_first:  # DB: A then B; cache: B then A
        a.begin(va)
        b.begin(vb)
        a.update_db()
        b.update_db()
        b.finish()
        a.finish()
    else:  # cache: A then B; DB: B then A
        a.begin(va)
        b.begin(vb)
        b.update_db()
        b.finish()
        a.update_db()
        a.finish()
    Reader(tl, "reader C").read()


def t_db_fails(tl: Timeline) -> None:
    """Scenario 2b: the database write fails after the cache was updated."""
    tl.session("setup").insert(tl.key, "100")
    tl.history.append("100")
    c = Reader(tl, "reader C")
    c.read()
    a = Writer(tl, "writer A", tl.strategy)
    a.begin("99")
    a.fail_db()
    a.finish(failed=True)
    c.read()


def t_reader_between(tl: Timeline, fire: str | None = None, delay: float | None = None) -> None:
    """Scenario 3: a reader loads between the writer's first cache step and its DB commit."""
    tl.session("setup").insert(tl.key, "100")
    tl.history.append("100")
    Reader(tl, "reader C").read()
    a = Writer(tl, "writer A", tl.strategy, delay=delay)
    b = Reader(tl, "reader B")
    a.begin("99")
    b.start_paused()
    a.update_db()
    a.finish()
    if fire == "before_fill":
        a.fire_delayed(f"{delay} s passed; reader B's load takes longer")
    b.finish_paused()
    Reader(tl, "reader C").read()
    if fire == "after_fill":
        a.fire_delayed(f"{delay} s passed; reader B filled before it")
        Reader(tl, "reader D").read()


def t_hit_before_delete(tl: Timeline) -> None:
    """Scenario 4: a reader hits the old value between the commit and the invalidation."""
    tl.session("setup").insert(tl.key, "100")
    tl.history.append("100")
    c = Reader(tl, "reader C")
    c.read()
    a = Writer(tl, "writer A", tl.strategy)
    a.begin("99")
    a.update_db()
    c.read()
    a.finish()
    c.read()


def t_miss_before_write(tl: Timeline) -> None:
    """Scenario 5: a reader misses and loads before the write; it writes back after the invalidation."""
    tl.session("setup").insert(tl.key, "100")
    tl.history.append("100")
    b = Reader(tl, "reader B")
    b.start_paused()
    a = Writer(tl, "writer A", tl.strategy)
    a.begin("99")
    a.update_db()
    a.finish()
    b.finish_paused()
    Reader(tl, "reader C").read()


class PushService:
    """The incident's push service: a local plan refreshed every ``period`` (5 min, scaled down to 0.3 s).

    ``cache_only``: the refresh reads only Redis (no DB fallback): a miss is "no plan".
    Otherwise it reads through the cache (on a miss: SELECT and fill).
    """

    def __init__(self, tl: Timeline, cache_only: bool) -> None:
        self.tl = tl
        self.cache_only = cache_only
        self.reader = Reader(tl, "push service")
        self.plan: str | None = None
        self.timer = ManualTimer(0.3, self.refresh)

    def refresh(self) -> None:
        tl = self.tl
        if not self.cache_only:
            self.plan = self.reader.read()
            return
        start = tl.committed
        d = self.reader.cache.peek(tl.key)
        value = None if not d or "value" not in d else str(d["value"])
        kind = tl.judge_read(value, start)
        if value is None:
            tl.costs["no_plan"] += 1
            tl.step("push service", "timer tick: peek.lua -> miss", "NO PLAN: null-plan error [STALE READ]")
        else:
            self.plan = value
            tl.step("push service", "timer tick: peek.lua -> hit",
                    f"plan {value}" + (f" [{kind.upper()} READ]" if kind else ""))


def t_push(tl: Timeline, cache_only: bool, delay: float | None = None) -> None:
    """Scenario 6: the config service changes a plan; the push service refreshes on a timer."""
    tl.session("setup").insert(tl.key, "plan-v1")
    tl.history.append("plan-v1")
    Reader(tl, "config API").read()
    push = PushService(tl, cache_only)
    push.timer.advance()
    w = Writer(tl, "config service", tl.strategy, delay=delay)
    api = Reader(tl, "config API")
    w.begin("plan-v2")
    api.start_paused()
    push.timer.advance()
    w.update_db()
    w.finish()
    api.finish_paused()
    push.timer.advance()
    if w.scheduler.pending:
        w.fire_delayed(f"{delay} s passed")
        push.timer.advance()
        Reader(tl, "config API").read()
        push.timer.advance()


def t_delete_fails(tl: Timeline, retry: bool = False, short_ttl: float | None = None) -> None:
    """Scenario 7: the invalidation after the commit cannot reach Redis."""
    lab = tl.lab
    tl.session("setup").insert(tl.key, "100")
    tl.history.append("100")
    c = Reader(tl, "reader C")
    c.read(ttl=short_ttl)
    broken = tl.cache(leases=tl.leases, url=f"redis://127.0.0.1:{closed_port()}/0")
    a = Writer(tl, "writer A", tl.strategy, cache=broken)
    a.begin("99")
    a.update_db()
    a.finish()
    c.read()
    pttl = int(lab.redis.pttl(entry_key(lab.namespace, tl.key)))
    # whole seconds (rounded up), so the timeline (and the HTML report) is the same on every run
    tl.step("cache", "PTTL of the entry", f"{-(-pttl // 1000)} s left: stale until the TTL expires")
    if retry:
        good = tl.cache(leases=tl.leases)
        good.invalidate(tl.key, version=a.version)
        tl.step("writer A", "retry: invalidate.lua (Redis reachable again)", "done")
        c.read()
    if short_ttl is not None:
        import time

        from ..core.layout import decode_entry

        ek = entry_key(lab.namespace, tl.key)
        deadline = time.monotonic() + short_ttl + 5
        def holds() -> bool:
            raw = lab.redis.get(ek)
            return "v" in (decode_entry(raw if isinstance(raw, bytes) else None) or {})

        while holds() and time.monotonic() < deadline:
            time.sleep(0.02)  # the lab waits for Redis to expire the entry (workload time, not a test sleep)
        tl.step("cache", f"wait for the TTL ({short_ttl} s) to expire the entry",
                "expired" if not holds() else "still there 5 s after its TTL")
        c.read()


def t_delete_fails_outbox(tl: Timeline, capture: bool = False) -> None:
    """Scenario 7d: the invalidation goes through the transactional outbox; the relay applies it once Redis is back.

    Redis is unreachable for the application (writer, readers, relay) during the outage; readers fall back to
    the database. The outbox row is written in the writer's transaction, so nothing depends on the writer
    process surviving or retrying. 7e (``capture``): the writer only runs its UPDATE; a capture trigger on ``t``
    (:mod:`cachesync.outbox.triggers`, rule ``{k}``) writes the outbox row in the same transaction.
    """
    from ..outbox import Outbox, triggers
    from ..outbox.relay import Relay
    from ..core.rules import Rules

    lab = tl.lab
    tl.session("setup").insert(tl.key, "100")
    tl.history.append("100")
    Reader(tl, "reader C").read()
    rules = Rules({lab.db.table: {"keys": ["{k}"], "version": "version"}})
    outbox = Outbox(f"{lab.db.table}_ob", dialect=lab.db.dialect, rules=rules)
    admin = tl.session("outbox admin")
    with admin.lock:
        outbox.init(admin.conn)
        if capture:
            triggers.install(admin.conn, outbox)
    down = f"redis://127.0.0.1:{closed_port()}/0"
    relays: list[Relay] = []
    try:
        writer = tl.session("writer A")
        if capture:
            version = writer.update(tl.key, "99")
            tl.step("writer A", "UPDATE t SET val='99', version=version+1 WHERE k=?; COMMIT (the capture trigger "
                    "INSERTs INTO t_ob the keys computed from the row)", f"committed v{version} + 1 outbox row")
        else:
            version = writer.update_with_outbox(tl.key, "99", outbox)
            tl.step("writer A", "UPDATE t SET val='99', version=version+1 WHERE k=?; INSERT INTO t_ob (keys, "
                    "version); COMMIT", f"committed v{version} + 1 outbox row")
        tl.costs["db_writes"] += 1
        tl.history.append("99")
        relay_down = Relay(lab.db_url, tl.cache(leases=tl.leases, url=down), table=outbox.table, listen=False,
                           init=False)
        relays.append(relay_down)
        try:
            relay_down.run_once()
            result = "delivered (unexpected)"
        except InvalidationError:
            attempts = [a for a, _ in admin.outbox_rows(outbox)]
            result = f"FAILED: Redis unreachable; row kept (attempts={attempts[0] if attempts else '?'})"
            tl.costs["relay_attempts"] = tl.costs.get("relay_attempts", 0) + 1
        tl.step("relay", "claim the row; invalidate.lua", result)
        Reader(tl, "reader D", url=down).read()
        relay = Relay(lab.db_url, tl.cache(leases=tl.leases), table=outbox.table, listen=False, init=False)
        relays.append(relay)
        n = relay.drain()
        tl.costs["relay_attempts"] = tl.costs.get("relay_attempts", 0) + 1
        left = len(admin.outbox_rows(outbox))
        tl.step("relay", "Redis is back; next attempt (backoff <= 5 s): invalidate.lua (DEL value, void lease, "
                f"floor v{version}); DELETE the row", f"done ({n} row delivered, {left} left)")
        Reader(tl, "reader C").read()
    finally:
        for r in relays:
            r.close()
        with admin.lock:
            if capture:
                triggers.uninstall(admin.conn, outbox)
            outbox.drop(admin.conn)


class _Warnings(logging.Handler):
    """Collects the WARNING records a step logs (shown in the timeline instead of on stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _CommitHook:
    """A DB-API connection whose ``commit()`` records a timeline step right after the real COMMIT (so the step
    shows the cache as it was between the commit and the invalidation that follows)."""

    def __init__(self, conn: Any, on_commit: Callable[[], None]) -> None:
        self._conn = conn
        self._on_commit = on_commit

    def cursor(self) -> Any:
        return self._conn.cursor()

    def commit(self) -> None:
        self._conn.commit()
        self._on_commit()

    def rollback(self) -> None:
        self._conn.rollback()


def t_write_path(tl: Timeline, mode: str) -> None:
    """Scenarios 7f-7h: the production write path against each of its two halves, on one timeline.

    ``mode``: ``"writepath"`` (7f, :class:`cachesync.WritePath`: the outbox row in the UPDATE's transaction,
    COMMIT, invalidate at once; an invalidation failing after the commit is logged and left to the relay),
    ``"outbox"`` (7g: the outbox row only; the relay invalidates) or ``"request"`` (7h: invalidate in the request
    after the COMMIT, no outbox). First write with Redis up: does the next read see it? Second write with Redis
    unreachable from the moment of the COMMIT until after the write ("a blink"): does the request succeed, and is
    the invalidation still delivered once Redis is back?
    """
    from ..outbox import Outbox
    from ..outbox.relay import Relay
    from ..writepath import WritePath

    lab = tl.lab
    tl.session("setup").insert(tl.key, "100")
    tl.history.append("100")
    Reader(tl, "reader C").read()
    outbox = None if mode == "request" else Outbox(f"{lab.db.table}_ob", dialect=lab.db.dialect)
    admin = tl.session("outbox admin")
    if outbox is not None:
        with admin.lock:
            outbox.init(admin.conn)
    down = f"redis://127.0.0.1:{closed_port()}/0"
    up_cache = tl.cache(leases=tl.leases)
    down_cache = tl.cache(leases=tl.leases, url=down)
    relays: list[Relay] = []
    writer = tl.session("writer A")
    version = 0  # of the last write

    def relay_step(cache: Cache, action: str) -> None:
        assert outbox is not None
        relay = Relay(lab.db_url, cache, table=outbox.table, listen=False, init=False)
        relays.append(relay)
        tl.costs["relay_attempts"] = tl.costs.get("relay_attempts", 0) + 1
        try:
            n = relay.drain()
        except InvalidationError:
            attempts = [a for a, _ in admin.outbox_rows(outbox)]
            tl.step("relay", f"{action}claim the row; invalidate.lua",
                    f"FAILED: Redis unreachable; row kept (attempts={attempts[0] if attempts else '?'})")
            return
        left = len(admin.outbox_rows(outbox))
        tl.step("relay", f"{action}claim the row; invalidate.lua (DEL value, void lease, floor v{version}); "
                "DELETE the row", f"done ({n} row delivered, {left} left)")

    def write(value: str, blink: bool) -> None:
        nonlocal version
        cache = down_cache if blink else up_cache
        sql = f"UPDATE t SET val='{value}', version=version+1 WHERE k=?; "
        if mode == "writepath":
            def committed() -> None:
                tl.history.append(value)
                tl.step("writer A", f"wp.write(conn): {sql}INSERT INTO t_ob (keys, version); COMMIT",
                        f"committed v{version} + 1 outbox row")
                if blink:
                    tl.step("cache", "Redis becomes unreachable (a blink) right after the COMMIT", "down")

            assert outbox is not None
            wp = WritePath(cache, outbox=outbox)
            caught = _Warnings()
            logger = logging.getLogger("cachesync.writepath")
            logger.addHandler(caught)
            propagate, logger.propagate = logger.propagate, False  # the timeline shows it; not on stderr too
            try:
                with writer.lock, wp.write(_CommitHook(writer.conn, committed)) as w:
                    version = writer.update_open(tl.key, value)
                    w.add(tl.key, version=version)
            finally:
                logger.propagate = propagate
                logger.removeHandler(caught)
            if w.invalidated:
                result = "done; the request answers 200"
            else:
                tl.costs["logged_failures"] = tl.costs.get("logged_failures", 0) + len(caught.records)
                result = (f"FAILED: Redis unreachable; logged {len(caught.records)} WARNING (keys, Redis URL), "
                          "left to the outbox relay; the request answers 200 (its commit stands)")
            tl.step("writer A", "after commit: invalidate.lua (DEL value, void lease)", result)
        else:
            if mode == "outbox":
                version = writer.update_with_outbox(tl.key, value, outbox)
                action = f"{sql}INSERT INTO t_ob (keys, version); COMMIT"
            else:
                version = writer.update(tl.key, value)
                action = f"{sql}COMMIT"
            tl.history.append(value)
            tl.step("writer A", action, f"committed v{version}" + (" + 1 outbox row" if outbox else ""))
            if blink:
                tl.step("cache", "Redis becomes unreachable (a blink) right after the COMMIT", "down")
            if mode == "request":
                try:
                    cache.invalidate(tl.key, version=version)
                    result = "done; the request answers 200"
                except InvalidationError as e:
                    result = (f"FAILED: Redis unreachable ({type(e).__name__}); the request answers 500 although "
                              "its commit stands; nothing delivers the invalidation later")
                tl.step("writer A", "after commit: invalidate.lua (DEL value, void lease)", result)
        tl.costs["db_writes"] += 1

    try:
        write("99", blink=False)
        Reader(tl, "reader C").read()
        if outbox is not None:
            relay_step(up_cache, "")
            Reader(tl, "reader C").read()
        write("98", blink=True)
        Reader(tl, "reader D", url=down).read()
        if outbox is not None:
            relay_step(down_cache, "")
            relay_step(up_cache, "Redis is back; next attempt (backoff <= 5 s): ")
        else:
            tl.step("cache", "Redis is back", "up")
        Reader(tl, "reader C").read()
    finally:
        for r in relays:
            r.close()
        if outbox is not None:
            with admin.lock:
                outbox.drop(admin.conn)


# --------------------------------------------------------------------------- registry


GROUP_TITLES = {
    1: "Update DB then update cache: two writers' cache updates land in the opposite order",
    2: "Update cache then update DB: two writers reordered; the DB update failing",
    3: "Delete cache then update DB: a reader re-caches the old value; delayed double delete",
    4: "Update DB then delete cache: a reader hits the old value before the delete",
    5: "Update DB then delete cache: a reader that missed writes the old value back after the delete",
    6: "Push-system incident: delete cache, update DB; a push service refreshing on a timer gets no plan",
    7: "The cache delete fails (Redis unreachable): stale until the TTL, a retry, the outbox relay; the production "
       "write path",
}


@dataclass(frozen=True)
class Variant:
    id: str
    group: int
    label: str
    strategy: str
    leases: bool
    role: str  # "unsafe" | "mitigation" | "recommended"
    run: Callable[[Timeline], None]
    note: str = ""
    expected: str = field(default="", compare=False)


def _v(id: str, label: str, strategy: str, leases: bool, role: str, run: Callable[[Timeline], None],
       expected: str, note: str = "") -> Variant:
    return Variant(id, int(id[0]), label, strategy, leases, role, run, note, expected)


VARIANTS: list[Variant] = [
    _v("1a", "db_then_cache", "db_then_cache", False, "unsafe", lambda t: t_two_writers(t, False), "stale",
       "DB 100->99->98, cache 98 then 99 (the article's first table)."),
    _v("1b", "db_then_set_versioned", "db_then_set_versioned", True, "recommended",
       lambda t: t_two_writers(t, False), "consistent",
       "cachesync's update-the-cache strategy: A's older version is refused by set.lua."),
    _v("1c", "recommended (db_then_invalidate)", RECOMMENDED, True, "recommended",
       lambda t: t_two_writers(t, False), "consistent"),
    _v("2a", "cache_then_db, two writers", "cache_then_db", False, "unsafe", lambda t: t_two_writers(t, True),
       "stale", "Cache A=0 then B=1; DB B=1 then A=0 (the article's second table)."),
    _v("2b", "recommended, two writers", RECOMMENDED, True, "recommended", lambda t: t_two_writers(t, True),
       "consistent"),
    _v("2c", "cache_then_db, DB write fails", "cache_then_db", False, "unsafe", t_db_fails, "stale",
       "The cache holds 99, a value that was never committed."),
    _v("2d", "recommended, DB write fails", RECOMMENDED, True, "recommended", t_db_fails, "consistent",
       "On error the safe strategies invalidate (the commit may or may not have happened)."),
    _v("3a", "delete_then_db", "delete_then_db", False, "unsafe", lambda t: t_reader_between(t), "stale",
       "Plain cache-aside: reader B writes 100 back after the commit of 99."),
    _v("3b", "delayed double delete, delay too short", "delayed_double_delete", False, "mitigation",
       lambda t: t_reader_between(t, "before_fill", 0.05), "stale",
       "The second delete fires before reader B's write-back: useless."),
    _v("3c", "delayed double delete, delay long enough", "delayed_double_delete", False, "mitigation",
       lambda t: t_reader_between(t, "after_fill", 0.5), "transient",
       "Readers see 100 until the second delete; then 99."),
    _v("3d", "recommended (db_then_invalidate + leases)", RECOMMENDED, True, "recommended",
       lambda t: t_reader_between(t), "consistent"),
    _v("4a", "db_then_invalidate, plain cache-aside", RECOMMENDED, False, "unsafe", t_hit_before_delete,
       "transient", "The window is commit -> invalidate; the article's 'can be ignored'."),
    _v("4b", "recommended (db_then_invalidate + leases)", RECOMMENDED, True, "recommended", t_hit_before_delete,
       "transient", "No cache protocol closes this window without a distributed transaction; keep it short."),
    _v("5a", "db_then_invalidate without leases", RECOMMENDED, False, "unsafe", t_miss_before_write, "stale",
       "Reader B's fill of 100 lands after the delete."),
    _v("5b", "recommended (db_then_invalidate + leases)", RECOMMENDED, True, "recommended", t_miss_before_write,
       "consistent", "The invalidation voided B's lease: fill.lua refuses the old value."),
    _v("6a", "incident: delete_then_db, push reads cache only", "delete_then_db", False, "unsafe",
       lambda t: t_push(t, True), "stale", "Costs: no-plan errors and an old plan re-cached by the config API."),
    _v("6b", "fix 1: refresh the cache after the DB write", "db_then_set_versioned", False, "mitigation",
       lambda t: t_push(t, True), "consistent", "Costs: one cache write per change; old plan served until the set."),
    _v("6c", "fix 2: update the cache first, then the DB", "cache_then_db", False, "mitigation",
       lambda t: t_push(t, True), "consistent",
       "Costs: a plan is served before it is committed; a failed DB write leaves it there (2c)."),
    _v("6d", "fix 3: delayed double delete", "delayed_double_delete", False, "mitigation",
       lambda t: t_push(t, True, 0.6), "transient",
       "Costs: two deletes; the push service still sees no plan in both windows."),
    _v("6e", "fix 4: on a miss the push service reads the DB and fills", "delete_then_db", False, "mitigation",
       lambda t: t_push(t, False), "stale", "Costs: DB reads by the push service; still re-caches the old plan."),
    _v("6f", "recommended (db_then_invalidate + leases, push reads through)", RECOMMENDED, True, "recommended",
       lambda t: t_push(t, False), "consistent", "Costs: one DB read per change."),
    _v("7a", "db_then_invalidate, the delete fails", RECOMMENDED, True, "unsafe", lambda t: t_delete_fails(t),
       "stale", "InvalidationError names the key; nothing retries it here."),
    _v("7b", "recommended: retry the invalidation", RECOMMENDED, True, "recommended",
       lambda t: t_delete_fails(t, retry=True), "transient",
       "Retry (or an outbox) once Redis is back; stale reads only until then."),
    _v("7c", "the TTL as the bound (ttl 1 s)", RECOMMENDED, True, "mitigation",
       lambda t: t_delete_fails(t, short_ttl=1.0), "transient", "Without a retry the TTL bounds the stale window."),
    _v("7d", "recommended: transactional outbox + relay", RECOMMENDED, True, "recommended", t_delete_fails_outbox,
       "consistent",
       "Cost: the cache holds 100 until Redis is back and the relay's next attempt (backoff <= 5 s) delivers; "
       "readers that cannot reach Redis read the DB. A reader that reaches Redis while the relay cannot would "
       "read 100 until then (as in 7b), but no process has to survive or remember to retry."),
    _v("7e", "recommended: capture trigger (the database writes the outbox row) + relay", RECOMMENDED, True,
       "recommended", lambda t: t_delete_fails_outbox(t, capture=True), "consistent",
       "As 7d, with no application code: any writer's UPDATE (raw SQL, another service) records its invalidation."),
    _v("7f", "recommended: the production write path (WritePath: outbox row + invalidate at once)", RECOMMENDED,
       True, "recommended", lambda t: t_write_path(t, "writepath"), "consistent",
       "cachesync.WritePath: the first read after a write sees it (invalidated in the request), and an "
       "invalidation failing after the commit is logged, not raised, and delivered by the relay once Redis is "
       "back. A reader that reaches Redis while the relay cannot would read 98 until then (as in 7d)."),
    _v("7g", "outbox only: no invalidation in the request", RECOMMENDED, True, "mitigation",
       lambda t: t_write_path(t, "outbox"), "transient",
       "Durable, but the first read after the write hits the old value until the relay runs (no read-your-writes)."),
    _v("7h", "invalidate in the request only: no outbox", RECOMMENDED, True, "unsafe",
       lambda t: t_write_path(t, "request"), "stale",
       "Read-your-writes while Redis is up; when it blinks after the commit, the request fails although its "
       "commit stands, and nothing delivers the invalidation (as 7a)."),
]

BY_ID = {v.id: v for v in VARIANTS}


def select_variants(ids: list[str] | None) -> list[Variant]:
    """Variants for ``--scenario`` values: a group number ("3") or a variant id ("3b")."""
    if not ids:
        return list(VARIANTS)
    out: list[Variant] = []
    for raw in ids:
        i = raw.strip().lower()
        chosen = [v for v in VARIANTS if v.id == i or str(v.group) == i]
        if not chosen:
            raise LabError(f"unknown scenario {raw!r}; choose a group 1-7 or one of {', '.join(BY_ID)}")
        out += [v for v in chosen if v not in out]
    return out


def run_variant(lab: Lab, v: Variant) -> ScenarioResult:
    key = f"s{v.id}:{uuid.uuid4().hex[:6]}"
    tl = Timeline(lab, key, v.leases, v.strategy)
    try:
        v.run(tl)
        return tl.finish(v)
    finally:
        tl.close()


def run_scenarios(redis_url: str, db_url: str, ids: list[str] | None = None,
                  on_result: Callable[[ScenarioResult], None] | None = None,
                  on_start: Callable[[Lab], None] | None = None) -> list[ScenarioResult]:
    variants = select_variants(ids)
    results = []
    with Lab(redis_url, db_url) as lab:
        if on_start:
            on_start(lab)
        for v in variants:
            r = run_variant(lab, v)
            results.append(r)
            if on_result:
                on_result(r)
    return results
