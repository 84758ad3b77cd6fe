"""The CDC runner under a backlog: the reader thread forms each transaction's keys when the main thread is behind
(overlapping its wait for Redis), the main thread applies everything queued as one batch, a key named by several
transactions keeps its highest version, a bad row is skipped without stopping the stream, and the checkpoint moves
only after the batch is in Redis. Real Redis; the interleaving is forced with events (no sleeps, no timed assertions)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cachesync
from cachesync.cdc import Change, CdcRunner, FileCheckpoint, Source, Transaction
from cachesync.rules import Rules
from cachesync.testing._util import wait_for

RULES = Rules({"users": {"keys": ["user:{id}", "user_by_email:{email}"], "version": "version"}})


def txn(n: int, *rows: dict[str, Any]) -> Transaction:
    return Transaction({"n": n}, None, [Change("public", "users", None, r) for r in rows])


class Backlog(Source):
    """Yields ``txns`` at once (a backlog), then blocks until closed."""

    kind = "backlog"

    def __init__(self, txns: list[Transaction]) -> None:
        self.txns = txns
        self.after_first: threading.Event | None = None  # set: the rest is yielded only once this is set
        self.closed = threading.Event()
        self.yielded = threading.Event()

    @property
    def ident(self) -> str:
        return "backlog:test"

    def check(self) -> None:
        pass

    def current_position(self) -> dict[str, Any]:
        return {"n": 0}

    def stream(self, position: dict[str, Any]) -> Iterator[Transaction]:
        for i, t in enumerate(x for x in self.txns if x.position["n"] > position["n"]):
            if i == 1 and self.after_first is not None:
                self.after_first.wait(30)
            yield t
        self.yielded.set()
        self.closed.wait()

    def reopen(self) -> None:
        self.closed.clear()

    def close(self) -> None:
        self.closed.set()


class Gated(CdcRunner):
    """Holds its first apply until the test opens the gate, so the rest of the backlog queues up behind it."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[list[Transaction]] = []
        self.resolved_at_apply: list[bool] = []

    def apply(self, txns: list[Transaction]) -> None:
        if txns and not self.batches:
            self.entered.set()
            self.gate.wait(30)
        if txns:
            self.batches.append(list(txns))
            self.resolved_at_apply.extend(t.resolved is not None for t in txns)
        super().apply(txns)


@pytest.mark.parametrize(("batch_max_keys", "batches", "by_reader"), [
    # queue never a batch deep: the main thread forms every transaction's keys; the five queued as one batch
    (500, [1, 5], [False] * 6),
    # batches of 2 keys: once 2 transactions wait in the queue, the reader thread forms the keys of the next ones
    (2, [1, 2, 2, 1], [False, False, False, True, True, True]),
])
def test_backlog_batches_keep_the_highest_version_per_key(redis_url: str, namespace: str, tmp_path: Path,
                                                          batch_max_keys: int, batches: list[int],
                                                          by_reader: list[bool]) -> None:
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        backlog = [txn(1, {"id": 1, "email": "a@x", "version": 1}),
                   txn(2, {"id": 1, "email": "a@x", "version": 5}),
                   txn(3, {"id": 1, "email": "a@x", "version": 3}),            # older: the floor stays at 5
                   txn(4, {"id": 2, "email": "b@x", "version": "abc"}),        # bad version: keys without one
                   txn(5, {"id": 4}, {"id": 3, "email": "c@x", "version": 9}),
                   txn(6, {"email": "d@x", "version": 2})]                     # no id column: that key skipped
        src = Backlog(backlog)
        cp = FileCheckpoint(tmp_path / "cp.json")
        cp.save(src.kind, src.ident, {"n": 0})
        runner = Gated(src, cache, RULES, cp, stats_interval=0, batch_max_keys=batch_max_keys)
        src.after_first = runner.entered
        th = threading.Thread(target=runner.run, daemon=True)
        th.start()
        wait_for(src.yielded.is_set, what="the backlog read")
        runner.gate.set()
        wait_for(lambda: runner.position == {"n": 6} and cp.load(src.kind, src.ident) == {"n": 6},
                 what="the last position checkpointed")
        runner.stop()
        th.join(10)
        assert not th.is_alive()
        # the first transaction alone (taken before the rest arrived), then the five queued behind it
        assert [len(b) for b in runner.batches] == batches
        assert runner.resolved_at_apply == by_reader
        fl = {k: (cache.peek(k) or {}).get("fl") for k in ("user:1", "user_by_email:a@x", "user:3", "user:2")}
        assert fl["user:1"] == b"5" and fl["user_by_email:a@x"] == b"5" and fl["user:3"] == b"9"
        assert fl["user:2"] is None  # invalidated, without a version
        for k in ("user:1", "user:2", "user_by_email:b@x", "user:3", "user_by_email:c@x", "user_by_email:d@x"):
            assert (cache.peek(k) or {}).get("ti"), k
        assert runner.stats["skipped"] == 3 and runner.stats["transactions"] == 6
    finally:
        cache.close()


def test_nothing_checkpointed_before_the_batch_is_in_redis(redis_url: str, namespace: str, tmp_path: Path) -> None:
    """While the (gated) first apply has not reached Redis, the checkpoint stays where it was."""
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        src = Backlog([txn(i, {"id": i, "email": f"u{i}@x", "version": i}) for i in range(1, 50)])
        cp = FileCheckpoint(tmp_path / "cp.json")
        cp.save(src.kind, src.ident, {"n": 0})
        runner = Gated(src, cache, RULES, cp, stats_interval=0)
        th = threading.Thread(target=runner.run, daemon=True)
        th.start()
        wait_for(src.yielded.is_set, what="the backlog read")
        assert cp.load(src.kind, src.ident) == {"n": 0} and runner.position == {"n": 0}
        assert not (cache.peek("user:49") or {}).get("ti")
        runner.gate.set()
        wait_for(lambda: cp.load(src.kind, src.ident) == {"n": 49}, what="the last position checkpointed")
        runner.stop()
        th.join(10)
        assert all((cache.peek(f"user:{i}") or {}).get("fl") == str(i).encode() for i in range(1, 50))
    finally:
        cache.close()


def test_checkpoint_interval_saves_at_most_once_per_interval_and_at_stop(redis_url: str, namespace: str,
                                                                         tmp_path: Path) -> None:
    """The first applied position is saved at once; a later one waits for the interval (pending, newest wins),
    and stop saves it. The saved position is never one whose keys are not in Redis."""
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        src = Backlog([txn(i, {"id": i, "email": f"u{i}@x", "version": i}) for i in range(1, 21)])
        cp = FileCheckpoint(tmp_path / "cp.json")
        cp.save(src.kind, src.ident, {"n": 0})
        runner = Gated(src, cache, RULES, cp, stats_interval=0, checkpoint_interval=3600)
        src.after_first = runner.entered  # the first transaction is a batch of its own, the rest a second one
        th = threading.Thread(target=runner.run, daemon=True)
        th.start()
        wait_for(src.yielded.is_set, what="the backlog read")
        runner.gate.set()
        wait_for(lambda: runner.stats["transactions"] == 20, what="the backlog applied")
        first = runner.batches[0][-1].position
        wait_for(lambda: cp.load(src.kind, src.ident) == first, what="the first batch's position saved")
        assert (cache.peek("user:20") or {}).get("ti")
        assert first == {"n": 1} and len(runner.batches) == 2
        wait_for(lambda: runner._cp_pending == {"n": 20}, what="the newest position pending")  # not saved yet
        assert cp.load(src.kind, src.ident) == first and runner.stats["checkpoints"] == 1
        runner.stop()
        th.join(10)
        assert not th.is_alive()
        assert cp.load(src.kind, src.ident) == {"n": 20}
    finally:
        cache.close()


def test_resolve_versions_match_checked_version() -> None:
    """resolve() reads plain digit strings and ints without checked_version's regex: the same results."""
    from cachesync.core.values import checked_version
    from cachesync.errors import BadDataError

    rule = RULES.tables["users"]
    for raw in ["0", "7", "007", "999999999999999", "9999999999999999", "1.5", "-3", "1e3", "²", "٣", "", " 1",
                0, 7, -7, 2**53, 2**53 + 1, -(2**53) - 1, True, 1.25]:
        got = rule.resolve(None, {"id": 1, "email": "a", "version": raw}, 200)
        try:
            want, problem = checked_version(raw), False
        except BadDataError:
            want, problem = None, True
        assert got.version == want and bool(got.problems) == problem, raw


_VALUES = st.one_of(st.integers(-10**20, 10**20), st.text(max_size=30), st.none(), st.floats(allow_nan=True),
                    st.booleans(), st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                                           min_size=1, max_size=2), st.just("x" * 300))


@settings(max_examples=300, deadline=None)
@given(row=st.fixed_dictionaries({"id": _VALUES, "email": _VALUES, "n": _VALUES}),
       max_key_bytes=st.sampled_from([8, 40, 200]))
def test_resolve_insert_fast_path_matches_the_general_loop(row: dict[str, Any], max_key_bytes: int) -> None:
    """An insert with every column takes resolve()'s fast path (the whole row formatted, ASCII keys accepted without
    counting); an empty old image (``old={}``) sends the same new image through the general loop: the same keys,
    version and problems, whatever the values (format specs a value cannot take, empty, too long, non-ASCII, lone
    surrogates)."""
    rule = Rules({"t": {"keys": ["t:{id}", "t_by:{email}", "n:{n:05d}", "r:{email!r}", "w:{id:>6}"],
                        "version": "n"}}).tables["t"]
    fast = rule.resolve(None, row, max_key_bytes)
    general = rule.resolve({}, row, max_key_bytes)
    assert (fast.keys, fast.version, fast.problems) == (general.keys, general.version, general.problems), row
    assert fast.missing_old == [] and general.missing_old == list(rule.keys)
