"""MariaDB read inline (``MySQLSource.inline``: in the runner's own thread, through ``stream_marks``): a mark
(``None``) when caught up -- right after connecting (the server's filtered start events), after each commit, and
again while idle --; a lone commit applied at each mark with no reader thread; stop while idle; a killed binlog
connection applies what was read and resumes from the checkpoint. Real MariaDB and Redis; no timed assertions
(waits are bounded only as a safety net)."""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cachesync
from cachesync.cdc import CdcRunner, FileCheckpoint, Transaction
from cachesync.cdc.mysql import MySQLSource
from cachesync.db import connect
from cachesync.rules import Rules
from cachesync.testing._util import wait_for

_ids = itertools.count(int.from_bytes(os.urandom(3), "big") * 64 + 300_000)


@pytest.fixture
def table(mysql_url: str) -> Iterator[str]:
    t = "inl_" + uuid.uuid4().hex[:10]
    conn = connect(mysql_url)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {t} (id INT PRIMARY KEY, email VARCHAR(100), version INT)")
    conn.commit()
    try:
        yield t
    finally:
        cur.execute(f"DROP TABLE IF EXISTS {t}")
        conn.commit()
        conn.close()


def _write(url: str, *stmts: str) -> None:
    conn = connect(url)
    try:
        cur = conn.cursor()
        for s in stmts:
            cur.execute(s)
            conn.commit()
    finally:
        conn.close()


class _Collect(threading.Thread):
    """Iterates ``stream_marks`` in a thread, recording transactions' row ids and marks in order."""

    def __init__(self, src: MySQLSource, pos: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.src, self.pos = src, pos
        self.items: list[Any] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        it = self.src.stream_marks(self.pos)
        try:
            for x in it:
                self.items.append(None if x is None else [int(c.new["id"]) for c in x.changes if c.new])
                if self.src._closed:
                    break
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            it.close()

    def marks_after(self, row: int) -> int:
        got = [i for i, x in enumerate(self.items) if x is not None and row in x]
        return sum(1 for x in self.items[got[0] + 1:] if x is None) if got else 0


def test_stream_marks_yields_a_mark_when_caught_up_and_while_idle(mysql_url: str, table: str) -> None:
    src = MySQLSource(mysql_url, next(_ids), [table])
    src.check()
    pos = src.current_position()
    c = _Collect(src, pos)
    c.start()
    try:
        # nothing written yet: the server's start events are filtered out, then a mark (not a blocked read)
        wait_for(lambda: c.items.count(None) >= 2 or c.error is not None, what="marks while idle")
        _write(mysql_url, f"INSERT INTO {table} VALUES (1, 'a@x', 1)")
        wait_for(lambda: c.marks_after(1) >= 2 or c.error is not None, what="marks after the commit")
        _write(mysql_url, f"INSERT INTO {table} VALUES (2, 'b@x', 1)", f"INSERT INTO {table} VALUES (3, 'c@x', 1)")
        wait_for(lambda: c.marks_after(3) >= 1 or c.error is not None, what="a mark after the last commit")
        assert c.error is None
        assert [x for x in c.items if x is not None] == [[1], [2], [3]]
    finally:
        src.close()
        c.join(10)
    assert not c.is_alive()


class _Recording(CdcRunner):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.threads: set[str] = set()
        self.batches: list[list[int]] = []

    def apply(self, txns: list[Transaction]) -> None:
        if txns:
            self.threads.add(threading.current_thread().name)
            self.batches.append([int(c.new["id"]) for t in txns for c in t.changes if c.new])
        super().apply(txns)


def test_mariadb_is_read_in_the_runner_thread_and_each_lone_commit_applied(
        mysql_url: str, redis_url: str, table: str, tmp_path: Path) -> None:
    rules = Rules({table: {"keys": ["user:{id}", "user_by_email:{email}"], "version": "version"}})
    cache = cachesync.Cache(redis_url, namespace="t" + uuid.uuid4().hex[:12], tombstone_ttl=120)
    try:
        src = MySQLSource(mysql_url, next(_ids), [table])
        cp = FileCheckpoint(tmp_path / "cp.json")
        runner = _Recording(src, cache, rules, cp, stats_interval=0)
        th = threading.Thread(target=runner.run, daemon=True, name="runner-main")
        th.start()
        wait_for(lambda: runner.position is not None, what="the runner started")
        for i in range(1, 4):  # one at a time: each is applied at the mark after it, with nothing after it
            _write(mysql_url, f"INSERT INTO {table} VALUES ({i}, 'u{i}@x', {i})")
            wait_for(lambda i=i: (cache.peek(f"user:{i}") or {}).get("fl") == str(i).encode(),
                     what=f"row {i} invalidated")
        assert [n for n in (t.name for t in threading.enumerate()) if n == "cachesync-cdc-reader"] == []
        runner.stop()  # while idle: returns at the next mark
        th.join(10)
        assert not th.is_alive()
        assert runner.threads == {"runner-main"} and runner.batches == [[1], [2], [3]]
        assert (cache.peek("user_by_email:u3@x") or {}).get("fl") == b"3"
        assert cp.load(src.kind, src.ident) == runner.position
    finally:
        cache.close()


def test_inline_kill_applies_what_was_read_and_resumes(mysql_url: str, redis_url: str, table: str,
                                                       tmp_path: Path) -> None:
    """The binlog connection killed while the runner waits inline: it reconnects from the checkpoint and the
    commits made meanwhile are applied; nothing is lost."""
    rules = Rules({table: ["user:{id}"]})
    cache = cachesync.Cache(redis_url, namespace="t" + uuid.uuid4().hex[:12], tombstone_ttl=120)
    try:
        src = MySQLSource(mysql_url, next(_ids), [table])
        runner = CdcRunner(src, cache, rules, FileCheckpoint(tmp_path / "cp.json"), stats_interval=0,
                           reconnect_delay=0.01)
        th = threading.Thread(target=runner.run, daemon=True)
        th.start()
        wait_for(lambda: runner.position is not None and src.connection_id is not None, what="connected")
        _write(mysql_url, f"INSERT INTO {table} VALUES (1, 'a@x', 1)")
        wait_for(lambda: bool((cache.peek("user:1") or {}).get("ti")), what="row 1 invalidated")
        first = src.connection_id
        _write(mysql_url, f"KILL {int(first or 0)}", f"INSERT INTO {table} VALUES (2, 'b@x', 1)")
        wait_for(lambda: bool((cache.peek("user:2") or {}).get("ti")), what="row 2 invalidated after the kill")
        assert runner.stats["reconnects"] >= 1 and src.connection_id != first
        runner.stop()
        th.join(10)
        assert not th.is_alive()
    finally:
        cache.close()


def test_stream_marks_across_a_binlog_rotation(mysql_url: str, table: str) -> None:
    """A binlog rotation (FLUSH BINARY LOGS: a rotate and a format description event between two commits) while
    read inline: no commit skipped or repeated, marks before and after it, the position in the new file."""
    src = MySQLSource(mysql_url, next(_ids), [table])
    src.check()
    pos = src.current_position()
    c = _Collect(src, pos)
    c.start()
    try:
        wait_for(lambda: c.items.count(None) >= 1 or c.error is not None, what="a mark while idle")
        _write(mysql_url, f"INSERT INTO {table} VALUES (1, 'a@x', 1)")
        wait_for(lambda: c.marks_after(1) >= 1 or c.error is not None, what="a mark after the first commit")
        _write(mysql_url, "FLUSH BINARY LOGS")
        _write(mysql_url, f"INSERT INTO {table} VALUES (2, 'b@x', 1)")
        wait_for(lambda: c.marks_after(2) >= 1 or c.error is not None, what="a mark after the second commit")
        assert c.error is None
        assert [x for x in c.items if x is not None] == [[1], [2]]
    finally:
        src.close()
        c.join(10)
    assert not c.is_alive()


def test_stream_marks_with_a_socket_descriptor_above_1024(mysql_url: str, table: str) -> None:
    """In a busy process (more than 1024 descriptors open) the binlog socket's descriptor is above select()'s
    FD_SETSIZE: the idle wait still works (poll), instead of every wait failing as a lost connection (the runner
    reconnecting forever and applying nothing)."""
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        src = MySQLSource(mysql_url, next(_ids), [table])
        src.check()
        pos = src.current_position()
        c = _Collect(src, pos)
        c.start()
        try:
            wait_for(lambda: c.items.count(None) >= 2 or c.error is not None, what="marks while idle")
            _write(mysql_url, f"INSERT INTO {table} VALUES (1, 'a@x', 1)")
            wait_for(lambda: c.marks_after(1) >= 1 or c.error is not None, what="a mark after the commit")
            assert c.error is None
            assert [x for x in c.items if x is not None] == [[1]]
        finally:
            src.close()
            c.join(10)
        assert not c.is_alive()
    finally:
        for fd in fds:
            os.close(fd)
