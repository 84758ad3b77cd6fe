"""The CDC runner reading an inline source (``Source.inline``: PostgreSQL) in its own thread, checked against the
reader-thread path on the same transactions: lone commits applied at each "caught up" mark, a backlog in batches of
``batch_max_keys``, the highest version per key, bad rows skipped, nothing checkpointed before its batch is in
Redis, what was read before a source error applied and checkpointed before the reconnect, stop while idle. Real
Redis; interleavings forced with events (no sleeps, no timed assertions)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cachesync
from cachesync.cdc import Change, CdcRunner, Disconnected, FileCheckpoint, Source, Transaction
from cachesync.rules import Rules
from cachesync.testing._util import wait_for

RULES = Rules({"users": {"keys": ["user:{id}", "user_by_email:{email}"], "version": "version"}})


def txn(n: int, *rows: dict[str, Any]) -> Transaction:
    return Transaction({"n": n}, None, [Change("public", "users", None, r) for r in rows])


def backlog() -> list[Transaction]:
    return [txn(1, {"id": 1, "email": "a@x", "version": 1}),
            txn(2, {"id": 1, "email": "a@x", "version": 5}),
            txn(3, {"id": 1, "email": "a@x", "version": 3}),            # older: the floor stays at 5
            txn(4, {"id": 2, "email": "b@x", "version": "abc"}),        # bad version: keys without one
            txn(5, {"id": 4}, {"id": 3, "email": "c@x", "version": 9}),
            txn(6, {"email": "d@x", "version": 2})]                     # no id column: that key skipped


class Script(Source):
    """Yields ``items`` (transactions, ``None`` = caught up, an exception = raised) after the checkpoint, then
    ``None`` marks until closed (each after a bounded wait, as a real source's select does)."""

    kind = "script"

    def __init__(self, items: list[Transaction | None | Exception], inline: bool) -> None:
        self.items = items
        self.inline = inline
        self.closed = threading.Event()
        self.streams = 0
        self.threads: set[str] = set()  # the threads stream() ran in
        self.done = threading.Event()  # every item yielded
        self.hold: threading.Event | None = None  # set by the test: the stream waits on it before its first item

    @property
    def ident(self) -> str:
        return "script:test"

    def check(self) -> None:
        pass

    def current_position(self) -> dict[str, Any]:
        return {"n": 0}

    def stream(self, position: dict[str, Any]) -> Iterator[Transaction]:
        for t in self.stream_marks(position, marks=False):
            if t is not None:
                yield t

    def stream_marks(self, position: dict[str, Any], marks: bool = True) -> Iterator[Transaction | None]:
        self.streams += 1
        self.threads.add(threading.current_thread().name)
        if self.hold is not None:
            self.hold.wait(30)
        for it in self.items:
            if isinstance(it, Exception):
                self.items = [x for x in self.items if x is not it]  # raised once: the reconnect reads on
                raise it
            if it is None or it.position["n"] > position["n"]:
                yield it
        self.done.set()
        while not self.closed.is_set():
            if marks:
                yield None
            self.closed.wait(0.01)

    def reopen(self) -> None:
        self.closed.clear()

    def close(self) -> None:
        self.closed.set()


class Recording(CdcRunner):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def apply(self, txns: list[Transaction]) -> None:
        if txns:
            self.entered.set()
            if self.gate is not None:
                self.gate.wait(30)
            self.batches.append([t.position["n"] for t in txns])
            self.threads.add(threading.current_thread().name)
        super().apply(txns)


def run_until(runner: Recording, src: Script, cp: FileCheckpoint, last: int) -> None:
    th = threading.Thread(target=runner.run, daemon=True, name="runner-main")
    th.start()
    wait_for(lambda: cp.load(src.kind, src.ident) == {"n": last}, what="the last position checkpointed")
    runner.stop()
    th.join(10)
    assert not th.is_alive()


def state(cache: cachesync.Cache) -> dict[str, tuple[Any, Any]]:
    return {k: ((cache.peek(k) or {}).get("fl"), bool((cache.peek(k) or {}).get("ti")))
            for k in ("user:1", "user_by_email:a@x", "user:2", "user_by_email:b@x", "user:3", "user_by_email:c@x",
                      "user:4", "user_by_email:d@x")}


@pytest.mark.parametrize(("items", "batch_max_keys", "batches"), [
    # caught up after each commit: each applied alone, at once
    ([x for t in backlog() for x in (t, None)], 500, [[1], [2], [3], [4], [5], [6]]),
    # a backlog (no mark until the end): one batch
    ([*backlog(), None], 500, [[1, 2, 3, 4, 5, 6]]),
    # a backlog in batches of at most 2 keys' worth of changes (the 2-row transaction fills one alone)
    ([*backlog(), None], 2, [[1, 2], [3, 4], [5], [6]]),
])
def test_inline_matches_the_reader_thread(redis_url: str, tmp_path: Path, items: list[Any], batch_max_keys: int,
                                          batches: list[list[int]]) -> None:
    """Same transactions through the inline path and the reader-thread path (the reference): the same keys,
    versions and stats in Redis; the inline path applies in the runner's own thread, in the batches the marks and
    ``batch_max_keys`` make."""
    results = []
    for inline in (True, False):
        cache = cachesync.Cache(redis_url, namespace="t" + uuid.uuid4().hex[:12], tombstone_ttl=120)
        try:
            src = Script([backlog()[i - 1] if isinstance(x, Transaction) and (i := x.position["n"]) else None
                          for x in items], inline)
            cp = FileCheckpoint(tmp_path / f"cp{inline}.json")
            cp.save(src.kind, src.ident, {"n": 0})
            runner = Recording(src, cache, RULES, cp, stats_interval=0, batch_max_keys=batch_max_keys)
            if not inline:
                src.hold = threading.Event()  # the whole backlog queued before the first apply: one batch
            th = threading.Thread(target=runner.run, daemon=True, name="runner-main")
            th.start()
            if src.hold is not None:
                wait_for(lambda: runner.position is not None, what="the runner started")
                src.hold.set()
            wait_for(lambda cp=cp, src=src: cp.load(src.kind, src.ident) == {"n": 6}, what="everything applied")
            runner.stop()
            th.join(10)
            assert not th.is_alive()
            if inline:
                assert runner.batches == batches
                assert src.threads == runner.threads == {"runner-main"}  # no reader thread, no hand-off
            else:
                assert src.threads == {"cachesync-cdc-reader"}
            st = {k: runner.stats[k] for k in ("transactions", "changes", "keys", "skipped")}
            results.append((state(cache), st["transactions"], st["changes"], st["skipped"]))
        finally:
            cache.close()
    assert results[0] == results[1]
    s = results[0][0]
    assert s["user:1"] == (b"5", True) and s["user_by_email:a@x"] == (b"5", True) and s["user:3"] == (b"9", True)
    assert s["user:2"] == (None, True) and s["user:4"] == (None, True) and s["user_by_email:d@x"] == (b"2", True)
    assert results[0][1:] == (6, 7, 3)


def test_inline_checkpoint_waits_for_redis(redis_url: str, namespace: str, tmp_path: Path) -> None:
    """While the (gated) apply has not returned, nothing is checkpointed and at most one more batch is read (a full
    batch of a backlog is sent to Redis ahead, then the next one is read; that one is sent only after the first
    was applied): backpressure."""
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        src = Script([*(txn(i, {"id": i, "email": f"u{i}@x", "version": i}) for i in range(1, 11)), None], True)
        cp = FileCheckpoint(tmp_path / "cp.json")
        cp.save(src.kind, src.ident, {"n": 0})
        runner = Recording(src, cache, RULES, cp, stats_interval=0, batch_max_keys=4)
        runner.gate = threading.Event()
        th = threading.Thread(target=runner.run, daemon=True, name="runner-main")
        th.start()
        wait_for(runner.entered.is_set, what="the first apply")
        assert cp.load(src.kind, src.ident) == {"n": 0} and runner.position == {"n": 0}
        assert not (cache.peek("user:5") or {}).get("ti") and not src.done.is_set()  # backpressure
        runner.gate.set()
        wait_for(lambda: cp.load(src.kind, src.ident) == {"n": 10}, what="the last position checkpointed")
        runner.stop()
        th.join(10)
        assert runner.batches == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
        assert all((cache.peek(f"user:{i}") or {}).get("fl") == str(i).encode() for i in range(1, 11))
    finally:
        cache.close()


def test_inline_source_error_applies_what_was_read_first(redis_url: str, namespace: str, tmp_path: Path) -> None:
    """A Disconnected after two transactions (no mark between): both are applied and checkpointed, the runner
    reconnects from there, and the rest follows; nothing is applied twice or lost."""
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        ts = [txn(i, {"id": i, "email": f"u{i}@x", "version": i}) for i in range(1, 5)]
        src = Script([ts[0], ts[1], Disconnected("killed"), ts[2], ts[3], None], True)
        cp = FileCheckpoint(tmp_path / "cp.json")
        cp.save(src.kind, src.ident, {"n": 0})
        runner = Recording(src, cache, RULES, cp, stats_interval=0, reconnect_delay=0.01)
        run_until(runner, src, cp, 4)
        assert runner.batches == [[1, 2], [3, 4]] and src.streams == 2 and runner.stats["reconnects"] == 1
        assert all((cache.peek(f"user:{i}") or {}).get("fl") == str(i).encode() for i in range(1, 5))
    finally:
        cache.close()


def test_inline_stop_while_idle_and_bad_config_error(redis_url: str, namespace: str, tmp_path: Path) -> None:
    """Stop while the source only yields idle marks returns with the checkpoint saved; an unexpected source error
    (not Disconnected/PositionLost) leaves run() after applying what came before it."""
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        src = Script([txn(1, {"id": 1, "email": "a@x", "version": 1}), None], True)
        cp = FileCheckpoint(tmp_path / "cp.json")
        cp.save(src.kind, src.ident, {"n": 0})
        runner = Recording(src, cache, RULES, cp, stats_interval=0)
        run_until(runner, src, cp, 1)
        src2 = Script([txn(2, {"id": 2, "email": "b@x", "version": 2}), RuntimeError("boom")], True)
        runner2 = Recording(src2, cache, RULES, cp, stats_interval=0)
        with pytest.raises(RuntimeError, match="boom"):
            runner2.run()
        assert runner2.batches == [[2]] and cp.load(src2.kind, src2.ident) == {"n": 2}
        assert (cache.peek("user:2") or {}).get("fl") == b"2"
    finally:
        cache.close()


def test_the_daemons_observed_source_is_read_inline_and_counted(redis_url: str, namespace: str,
                                                                tmp_path: Path) -> None:
    """``cachesync cdc`` wraps its source to count what it reads (metrics): the wrapper offers ``stream_marks``,
    so the daemon reads an inline source in the runner's thread too, and counts transactions, not marks."""
    from cachesync.health import _ObservedSource

    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        src = Script([x for t in backlog() for x in (t, None)], inline=True)
        cp = FileCheckpoint(tmp_path / "cp.json")
        cp.save(src.kind, src.ident, {"n": 0})
        observed = _ObservedSource(src)
        runner = Recording(observed, cache, RULES, cp, stats_interval=0)
        run_until(runner, src, cp, 6)
        assert src.threads == runner.threads == {"runner-main"}
        assert observed.transactions == 6 and observed.changes == 7
    finally:
        cache.close()


def test_a_batch_sent_ahead_is_checkpointed_after_its_reply_and_resent_when_the_connection_is_cut(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    """A full batch of a backlog is sent to Redis ahead (its invalidations reach Redis while the next batch is
    read), but its position is checkpointed only once its reply was read; when the connection is cut before that,
    the whole batch is sent again: every key invalidated, every position checkpointed in order, nothing lost."""
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        src = Script([*(txn(i, {"id": i, "email": f"u{i}@x", "version": i}) for i in range(1, 11)), None], True)
        cp = FileCheckpoint(tmp_path / "cp.json")
        cp.save(src.kind, src.ident, {"n": 0})
        runner = Recording(src, cache, RULES, cp, stats_interval=0, batch_max_keys=4, reconnect_delay=0.01)
        assert runner._direct is not None
        runner.gate = threading.Event()
        th = threading.Thread(target=runner.run, daemon=True, name="runner-main")
        th.start()
        wait_for(runner.entered.is_set, what="the first apply")
        # the first batch was sent ahead: in Redis already, its reply unread, its position not checkpointed
        wait_for(lambda: bool((cache.peek("user:4") or {}).get("ti")), what="the batch sent ahead in Redis")
        assert cp.load(src.kind, src.ident) == {"n": 0} and runner.position == {"n": 0}
        conn = runner._direct.conn
        assert conn is not None and runner._direct._pending is not None
        cache.redis.delete(cache.ctx.ekey("user:1"))  # the entry the batch wrote: gone, so only a second send can put it back
        conn.disconnect()  # the connection lost before the reply is read
        runner.gate.set()
        wait_for(lambda: cp.load(src.kind, src.ident) == {"n": 10}, what="the last position checkpointed")
        runner.stop()
        th.join(10)
        assert runner.batches == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
        assert runner.stats["redis_retries"] >= 1
        assert (cache.peek("user:1") or {}).get("fl") == b"1"  # sent again after the cut
        assert all((cache.peek(f"user:{i}") or {}).get("fl") == str(i).encode() for i in range(1, 11))
        assert all((cache.peek(f"user_by_email:u{i}@x") or {}).get("fl") == str(i).encode() for i in range(1, 11))
    finally:
        cache.close()


def test_a_bounded_pool_of_one_connection_is_shared_with_the_scan_and_the_stats(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    """The runner keeps a connection of the cache's pool for its batches; with a bounded pool
    (``max_connections=1``) it gives that connection back before the prefix SCAN of a TRUNCATE and before storing
    its stats, which take theirs from the same pool: the TRUNCATE is applied and checkpointed (the runner does not
    retry the SCAN forever against its own connection) and the stats hash is written."""
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120, max_connections=1, socket_timeout=0.5)
    try:
        cache.set("user:7", "x", version=1)
        items: list[Transaction | None | Exception] = [
            txn(1, {"id": 1, "email": "a@x", "version": 1}), None,
            Transaction({"n": 2}, None, [Change("public", "users", None, None, truncate=True)]), None]
        src = Script(items, True)
        cp = FileCheckpoint(tmp_path / "cp.json")
        cp.save(src.kind, src.ident, {"n": 0})
        runner = Recording(src, cache, RULES, cp, stats_interval=0, reconnect_delay=0.01, reconnect_max_delay=0.05)
        assert runner._direct is not None
        run_until(runner, src, cp, 2)
        assert runner.stats["redis_retries"] == 0
        assert runner.stats["flushed_keys"] >= 1 and (cache.peek("user:7") or {}).get("ti")
        assert cache.redis.hget(f"cs:{namespace}:cdc:{src.ident}", "checkpoints")
    finally:
        cache.close()


class _Waits(threading.Event):
    """The runner's stop event, recording what each wait asked for (the reconnect backoff)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.asked.append(timeout)
        return super().wait(timeout)


def test_the_reconnect_backoff_starts_again_after_a_stream_that_made_progress(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    """Three disconnects, each after the stream applied a transaction: each is a new outage, waited
    reconnect_delay, not twice the last one (it doubled for the daemon's whole life: after a few reconnects
    every later one waited reconnect_max_delay). Two disconnects in a row with no progress still back off."""
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        ts = [txn(i, {"id": i, "email": f"u{i}@x", "version": i}) for i in range(1, 5)]
        src = Script([ts[0], None, Disconnected("a"), ts[1], None, Disconnected("b"), ts[2], None,
                      Disconnected("c"), Disconnected("d"), ts[3], None], True)
        cp = FileCheckpoint(tmp_path / "cp.json")
        cp.save(src.kind, src.ident, {"n": 0})
        runner = Recording(src, cache, RULES, cp, stats_interval=0, reconnect_delay=0.01, reconnect_max_delay=1.0)
        runner._stop = waits = _Waits()
        run_until(runner, src, cp, 4)
        assert runner.stats["reconnects"] == 4
        assert [w for w in waits.asked if w is not None and w >= 0.01][:4] == [0.01, 0.01, 0.01, 0.02]
    finally:
        cache.close()


def test_an_error_reply_while_the_runners_connection_connects_is_retried_not_fatal(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    """A backlog sent ahead on the runner's own connection, whose connect step gets an error reply (here SELECT of
    a database index the server does not have): the batch is retried (counted in redis_retries) and nothing is
    checkpointed, the runner keeps running until stopped. (The ResponseError escaped the send-ahead and stopped
    the runner.)"""
    bad = redis_url.rsplit("/", 1)[0] + "/999"
    cache = cachesync.Cache(bad, namespace=namespace, record_namespace=False)
    try:
        ts = [txn(i, {"id": i, "email": f"u{i}@x", "version": i}) for i in range(1, 7)]
        src = Script([*ts, None], True)
        cp = FileCheckpoint(tmp_path / "cp.json")
        cp.save(src.kind, src.ident, {"n": 0})
        runner = Recording(src, cache, RULES, cp, stats_interval=0, batch_max_keys=2, reconnect_delay=0.01,
                           reconnect_max_delay=0.05)
        assert runner._direct is not None  # the send-ahead path is the one under test
        errors: list[BaseException] = []

        def run() -> None:
            try:
                runner.run()
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion
                errors.append(e)
        th = threading.Thread(target=run, daemon=True)
        th.start()
        wait_for(lambda: runner.stats["redis_retries"] >= 3 or not th.is_alive(), what="retries or an exit")
        assert th.is_alive() and not errors, errors
        assert cp.load(src.kind, src.ident) == {"n": 0}  # nothing checkpointed
        runner.stop()
        th.join(10)
    finally:
        cache.close()
