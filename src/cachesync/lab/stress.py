"""``cachesync lab stress``: concurrent readers and writers against one set of keys, per strategy.

Every write stores a fresh value (a global counter) and bumps the row's version inside
its transaction, so the version order is the commit order. After each commit the writer
records (value -> version, commit time). A read is *stale* when it returns a value whose
version is older than the newest version recorded before the read began; its stale window
is the time from the commit of the first newer version to the end of the read. After the
writers and readers stop and the delayed invalidations drain (``Cache.close`` joins them),
every key whose cache value differs from the database's is *inconsistent*.

``--delay-ms`` injects a seeded random pause (workload, not test synchronisation) inside the
loaders (between the SELECT and the fill) and the writers (between the first cache step and
the DB write, and between the commit and the cache step after it): it widens the races the
unsafe strategies lose.

Two schedules:

* ``free`` (the default): the threads run free for ``duration`` seconds; which races happen, and so the
  counts, depend on the OS scheduler (the seed fixes each thread's choices and pauses only).
* ``seeded``: ``rounds`` operations chosen by the seed run one at a time (a read, a write), except at
  seeded points where the dangerous interleaving is forced with :class:`threading.Event` objects:
  *writers reordered* (A's first cache step, B's, B's commit, A's commit, A's cache step after the
  commit, B's) and *a read straddling a write* (the writer's first cache step, the reader's miss and
  SELECT, paused; the writer's commit and cache step; the delayed second delete fired before or after the
  reader's write-back, as the seed says; the write-back). The schedule ends with one forced race per key.
  Every count except the stale windows (wall time) is a function of the seed: the same seed gives the same
  counts on every run.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import _validate
from .. import core as P
from ..errors import LabConfigError
from .._sync.cache import Cache
from .embedded import LabError
from .labdb import LabDB


@dataclass(frozen=True)
class StressConfig:
    readers: int = 8
    writers: int = 4
    duration: float = 2.0
    """Seconds of load per strategy."""
    keys: int = 8
    seed: int = 0
    delay_ms: float = 2.0
    """Upper bound of the seeded random pause injected in loaders and writers (0 = none)."""
    double_delete_delay: float = 0.02
    strategies: tuple[str, ...] = ()
    """Strategy names; ``NAME:plain`` runs it without leases. Empty = every strategy + db_then_invalidate:plain."""
    schedule: str = "free"
    """``free`` (threads race for ``duration`` s) or ``seeded`` (``rounds`` seeded operations, races forced)."""
    rounds: int = 300
    """Operations per strategy with ``schedule="seeded"``."""

    def validate(self) -> None:
        """:class:`LabError` naming the first bad option (run before any server or thread starts)."""
        for name in ("readers", "writers", "keys", "rounds"):
            _validate.positive(f"--{name}", getattr(self, name), integer=True, error=LabConfigError)
        _validate.positive("--duration", self.duration, error=LabConfigError)
        _validate.non_negative("--delay-ms", self.delay_ms, error=LabConfigError)
        _validate.non_negative("--double-delete-delay", self.double_delete_delay, error=LabConfigError)
        if self.schedule not in SCHEDULES:
            raise LabError(f"--schedule: unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        self.plan()

    def plan(self) -> list[tuple[str, str, bool]]:
        names = self.strategies or (*P.STRATEGIES, "db_then_invalidate:plain")
        out = []
        for n in names:
            base, _, mode = n.partition(":")
            if base not in P.STRATEGIES or mode not in ("", "plain"):
                raise LabError(f"unknown strategy {n!r}; choose from {', '.join(P.STRATEGIES)} (suffix :plain for no "
                               "leases)")
            out.append((n, base, mode != "plain"))
        return out


@dataclass
class StressResult:
    strategy: str
    leases: bool
    reads: int = 0
    writes: int = 0
    stale_reads: int = 0
    longest_stale_ms: float = 0.0
    inconsistent_keys: int = 0
    db_loads: int = 0
    errors: int = 0
    inconsistent: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Track:
    def __init__(self, keys: list[str]) -> None:
        self.lock = threading.Lock()
        self.latest = dict.fromkeys(keys, 1)
        self.version_of: dict[str, dict[str, int]] = {k: {"init": 1} for k in keys}
        self.commit_time: dict[str, dict[int, float]] = {k: {1: time.monotonic()} for k in keys}

    def committed(self, key: str, value: str, version: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.version_of[key][value] = version
            self.commit_time[key][version] = now
            if version > self.latest[key]:
                self.latest[key] = version


def _run_one(redis_url: str, db: LabDB, cfg: StressConfig, label: str, strategy: str, leases: bool,
             progress: Callable[[str, float], None] | None) -> StressResult:
    ns = "labstress" + uuid.uuid4().hex[:8]
    keys = [f"{strategy[:12]}-{i}-{uuid.uuid4().hex[:4]}" for i in range(cfg.keys)]
    setup = db.session("setup")
    for k in keys:
        setup.insert(k, "init")
    track = _Track(keys)
    res = StressResult(label, leases)
    counter = itertools.count(1)
    stop = threading.Event()
    lock = threading.Lock()
    caches: list[Cache] = []
    strat = P.STRATEGIES[strategy]
    dmax = cfg.delay_ms / 1000.0

    def new_cache() -> Cache:
        c = Cache(redis_url, namespace=ns, ttl_jitter=0.0, leases=leases, max_wait=1.0, lease_ttl=2.0,
                  broadcast_invalidations=False, double_delete_delay=cfg.double_delete_delay)
        with lock:
            caches.append(c)
        return c

    def pause(rng: random.Random) -> None:
        if dmax > 0:
            time.sleep(rng.random() * dmax)

    def writer(i: int) -> None:
        rng = random.Random(cfg.seed * 7919 + i)
        cache = new_cache()
        sess = db.session(f"w{i}-{label}")
        while not stop.is_set():
            key = rng.choice(keys)
            with lock:
                val = str(next(counter))
            try:
                kw: dict[str, Any] = {"value": val} if P.Step.SET_PLAIN in strat.before else {}
                with cache.write(key, strategy=strategy, **kw) as w:
                    pause(rng)
                    ver = sess.update(key, val)
                    track.committed(key, val, ver)
                    w.set_value(val, version=ver)
                    pause(rng)
                with lock:
                    res.writes += 1
            except Exception:
                with lock:
                    res.errors += 1

    def reader(i: int) -> None:
        rng = random.Random(cfg.seed * 104729 + i)
        cache = new_cache()
        sess = db.session(f"r{i}-{label}")
        while not stop.is_set():
            key = rng.choice(keys)

            def loader(key: str = key) -> Any:
                v, ver = sess.select(key)
                with lock:
                    res.db_loads += 1
                pause(rng)
                return P.Versioned(v, ver) if leases else v

            with track.lock:
                floor = track.latest[key]
            try:
                e = cache.get_entry(key, loader)
            except Exception:
                with lock:
                    res.errors += 1
                continue
            end = time.monotonic()
            with track.lock:
                ver = track.version_of[key].get(str(e.value))
                newer = [t for v, t in track.commit_time[key].items() if ver is not None and v > ver]
            with lock:
                res.reads += 1
                if ver is not None and ver < floor:
                    res.stale_reads += 1
                    if newer:
                        res.longest_stale_ms = max(res.longest_stale_ms, (end - min(newer)) * 1000.0)

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(cfg.writers)]
    threads += [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(cfg.readers)]
    completed = False
    try:
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while True:
            elapsed = time.monotonic() - t0
            if progress:
                progress(label, min(1.0, elapsed / cfg.duration))
            if elapsed >= cfg.duration:
                break
            time.sleep(min(0.1, cfg.duration - elapsed))  # the run's wall-clock budget (workload, not sync)
        completed = True
    finally:
        # also on Ctrl-C (KeyboardInterrupt in this thread): stop and join every thread and close every Cache
        # before the interpreter (and the embedded server) goes away under them
        stop.set()
        for t in threads:
            if t.ident is not None:
                t.join(60)
        for c in caches:  # joins pending delayed deletes: invalidations drain
            c.close()
        if not completed:
            _drop_namespace(redis_url, ns)
    _judge_keys(redis_url, db, ns, keys, res)
    res.longest_stale_ms = round(res.longest_stale_ms, 2)
    return res


class _PausedRead:
    """A read in its own thread whose loader stops after its SELECT until :meth:`finish` (no sleeps)."""

    def __init__(self, cache: Cache, key: str, loader: Callable[[], Any]) -> None:
        self._loaded = threading.Event()
        self._resume = threading.Event()
        self.entry: P.Entry[Any] | None = None
        self.exc: BaseException | None = None
        self.hit = False

        def paused_loader() -> Any:
            value = loader()
            self._loaded.set()
            if not self._resume.wait(30):
                raise LabError("stress schedule never resumed a paused reader")
            return value

        def run() -> None:
            try:
                self.entry = cache.get_entry(key, paused_loader)
            except BaseException as e:
                self.exc = e
            finally:
                self.hit = not self._resume.is_set()
                self._loaded.set()

        self._thread = threading.Thread(target=run, name="stress-paused-read", daemon=True)
        self._thread.start()
        if not self._loaded.wait(30):
            raise LabError("a paused reader never reached its load")

    def abandon(self) -> None:
        """Let the paused loader return and wait for the thread (cleanup after an error or Ctrl-C)."""
        self._resume.set()
        self._thread.join(30)

    def finish(self) -> P.Entry[Any]:
        self._resume.set()
        self._thread.join(30)
        if self._thread.is_alive():
            raise LabError("a paused reader never finished")
        if self.exc is not None:
            raise self.exc
        assert self.entry is not None
        return self.entry


def _run_seeded(redis_url: str, db: LabDB, cfg: StressConfig, label: str, strategy: str, leases: bool,
                progress: Callable[[str, float], None] | None) -> StressResult:
    """The ``seeded`` schedule: one operation at a time, dangerous interleavings forced at seeded points."""
    from .scenarios import ManualScheduler

    ns = "labstress" + uuid.uuid4().hex[:8]
    keys = [f"{strategy[:12]}-{i}-{uuid.uuid4().hex[:4]}" for i in range(cfg.keys)]
    setup = db.session("setup")
    for k in keys:
        setup.insert(k, "init")
    track = _Track(keys)
    res = StressResult(label, leases)
    strat = P.STRATEGIES[strategy]
    rng = random.Random(cfg.seed)  # the same schedule for every strategy
    counter = itertools.count(1)
    caches: list[Cache] = []

    def new_cache(scheduler: ManualScheduler | None = None) -> Cache:
        c = Cache(redis_url, namespace=ns, ttl_jitter=0.0, leases=leases, max_wait=1.0, lease_ttl=5.0,
                  broadcast_invalidations=False, scheduler=scheduler)
        caches.append(c)
        return c

    writers = []
    for i in range(cfg.writers):
        sched = ManualScheduler()
        writers.append((new_cache(sched), db.session(f"w{i}-{label}"), sched))
    readers = [(new_cache(), db.session(f"r{i}-{label}")) for i in range(cfg.readers)]

    class _Write:
        """One writer's write, split into its steps: ``enter`` (before steps), ``commit``, ``exit`` (after)."""

        def __init__(self, w: int, key: str) -> None:
            self.cache, self.sess, self.sched = writers[w]
            self.key = key
            self.val = str(next(counter))
            kw: dict[str, Any] = {"value": self.val} if P.Step.SET_PLAIN in strat.before else {}
            self.cm = self.cache.write(key, strategy=strategy, **kw)
            self.plan: Any = None

        def enter(self) -> None:
            self.plan = self.cm.__enter__()

        def commit(self) -> None:
            ver = self.sess.update(self.key, self.val)
            track.committed(self.key, self.val, ver)
            self.plan.set_value(self.val, version=ver)

        def exit(self) -> None:
            self.cm.__exit__(None, None, None)
            res.writes += 1

        def fire_delayed(self) -> None:
            self.sched.fire()

    def loader_of(r: int, key: str) -> Callable[[], Any]:
        sess = readers[r][1]

        def loader() -> Any:
            v, ver = sess.select(key)
            res.db_loads += 1
            return P.Versioned(v, ver) if leases else v

        return loader

    def judge(key: str, e: P.Entry[Any], floor: int, t0: float) -> None:
        res.reads += 1
        with track.lock:
            ver = track.version_of[key].get(str(e.value))
            newer = [t for v, t in track.commit_time[key].items() if ver is not None and v > ver]
        if ver is not None and ver < floor:
            res.stale_reads += 1
            if newer:
                res.longest_stale_ms = max(res.longest_stale_ms, (time.monotonic() - min(newer)) * 1000.0)

    def read(r: int, key: str) -> None:
        floor = track.latest[key]
        judge(key, readers[r][0].get_entry(key, loader_of(r, key)), floor, time.monotonic())

    def write(w: int, key: str) -> None:
        op = _Write(w, key)
        op.enter()
        op.commit()
        op.exit()
        op.fire_delayed()

    def writers_reordered(a: int, b: int, key: str) -> None:
        wa, wb = _Write(a, key), _Write(b, key)
        wa.enter()
        wb.enter()
        wb.commit()
        wa.commit()
        wa.exit()
        wb.exit()
        wa.fire_delayed()
        wb.fire_delayed()

    def read_straddles_write(r: int, w: int, key: str, fire_before_fill: bool) -> None:
        op = _Write(w, key)
        op.enter()
        floor = track.latest[key]
        pr = _PausedRead(readers[r][0], key, loader_of(r, key))
        try:
            op.commit()
            op.exit()
            if fire_before_fill:
                op.fire_delayed()
            judge(key, pr.finish(), floor, time.monotonic())
            op.fire_delayed()
        finally:
            pr.abandon()

    completed = False
    try:
        for n in range(cfg.rounds):
            key = rng.choice(keys)
            r, w, w2 = rng.randrange(cfg.readers), rng.randrange(cfg.writers), rng.randrange(cfg.writers)
            kind = rng.random()
            try:
                if kind < 0.5:
                    read(r, key)
                elif kind < 0.7:
                    write(w, key)
                elif kind < 0.85:
                    writers_reordered(w, w2 if w2 != w or cfg.writers == 1 else (w + 1) % cfg.writers, key)
                else:
                    read_straddles_write(r, w, key, rng.random() < 0.5)
            except LabError:
                raise
            except Exception:
                res.errors += 1
            if progress and (n % 10 == 0 or n == cfg.rounds - 1):
                progress(label, (n + 1) / cfg.rounds)
        # the schedule ends with one forced race per key (keys in seeded order, alternately writers reordered and
        # a read straddling a write), so the final state of every key is the outcome of a race
        final = list(keys)
        rng.shuffle(final)
        for i, key in enumerate(final):
            r, w = rng.randrange(cfg.readers), rng.randrange(cfg.writers)
            try:
                if i % 2 == 0:
                    writers_reordered(w, (w + 1) % cfg.writers, key)
                else:
                    read_straddles_write(r, w, key, rng.random() < 0.5)
            except LabError:
                raise
            except Exception:
                res.errors += 1
        completed = True
    finally:
        for c in caches:
            c.close()
        if not completed:
            _drop_namespace(redis_url, ns)
    _judge_keys(redis_url, db, ns, keys, res)
    res.longest_stale_ms = round(res.longest_stale_ms, 2)
    return res


def _drop_namespace(redis_url: str, ns: str) -> None:
    """Delete a run's keys after an error or Ctrl-C (best effort: Redis may be what failed)."""
    import redis

    try:
        with redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5) as r:
            found = list(r.scan_iter(match=f"cs:{ns}:*", count=500))
            if found:
                r.delete(*found)
    except redis.RedisError:
        pass


def _judge_keys(redis_url: str, db: LabDB, ns: str, keys: list[str], res: StressResult) -> None:
    """Count the keys whose cached value differs from the row; remove the namespace's keys."""
    observer = Cache(redis_url, namespace=ns, ttl_jitter=0.0)
    obs_db = db.session("observer")
    try:
        for k in keys:
            d = observer.peek(k)
            dbv, _ = obs_db.select(k)
            if d and "value" in d and str(d["value"]) != dbv:
                res.inconsistent.append(k)
        res.inconsistent_keys = len(res.inconsistent)
        found = list(observer.redis.scan_iter(match=f"cs:{ns}:*", count=500))
        if found:
            observer.redis.delete(*found)
    finally:
        observer.close()


SCHEDULES = ("free", "seeded")


def run_stress(redis_url: str, db_url: str, cfg: StressConfig,
               progress: Callable[[str, float], None] | None = None) -> list[StressResult]:
    """Run every strategy of ``cfg`` in turn; returns one :class:`StressResult` each."""
    cfg.validate()
    plan = cfg.plan()
    import redis

    try:
        r = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
        r.ping()
        r.close()
    except redis.RedisError as e:
        from .._driver import redact_url

        raise LabError(f"cannot reach Redis at {redact_url(redis_url)}: {e}") from e
    db = LabDB(db_url)
    db.create()
    try:
        run = _run_seeded if cfg.schedule == "seeded" else _run_one
        return [run(redis_url, db, cfg, label, strategy, leases, progress) for label, strategy, leases in plan]
    finally:
        db.drop()
