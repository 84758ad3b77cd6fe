"""The CDC conformance suite against PostgreSQL logical decoding (pgoutput), plus PostgreSQL-specific checks."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import cachesync
from cachesync.cdc import Source
from cachesync.cdc.postgres import PostgresSource
from cachesync.outbox import Outbox, OutboxError
from cachesync.testing import CdcConformance, tombstoned, wait_for
from cachesync.testing import CdcEnv as Env


def drop_slot_and_publication(pg_url: str, slot: str, publication: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                  "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
        for _ in range(200):  # the walsender exits asynchronously: bounded wait until the slot is free
            row = c.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            if row is None or row[0] is None:
                break
            c.execute("SELECT pg_sleep(0.01)")
        c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                  (slot,))
        c.execute(f"DROP PUBLICATION IF EXISTS {publication}")


class TestPostgresConformance(CdcConformance):
    @pytest.fixture
    def db_url(self, pg_url: str) -> str:
        return pg_url

    def prepare_table(self, env: Env) -> None:
        env.write(f"ALTER TABLE {env.table} REPLICA IDENTITY FULL")
        env.slot = env.publication = "cs_" + env.table  # type: ignore[attr-defined]

    def make_source(self, env: Env) -> Source:
        return PostgresSource(env.db_url, env.rules, slot=env.slot, publication=env.publication)  # type: ignore

    def kill_stream(self, env: Env) -> None:
        cur = env.conn.cursor()
        cur.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
                    (env.slot,))  # type: ignore[attr-defined]
        env.conn.commit()

    def cleanup(self, env: Env) -> None:
        drop_slot_and_publication(env.db_url, env.slot, env.publication)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- WAL-message outbox (Outbox.emit)

class _MessageHooks(TestPostgresConformance):
    """The conformance hooks, with a per-test message prefix (other tests on the shared server emit too)."""

    __test__ = False

    def make_source(self, env: Env) -> Source:
        return PostgresSource(env.db_url, env.rules, slot=env.slot, publication=env.publication,  # type: ignore
                              message_prefix=env.prefix)  # type: ignore[attr-defined]


@pytest.fixture
def menv(pg_url: str, redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Env]:
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    e = Env(_MessageHooks(), pg_url, cache, tmp_path)
    e.prefix = "cs_" + e.table  # type: ignore[attr-defined]
    e.outbox = Outbox(message_prefix=e.prefix)  # type: ignore[attr-defined]
    e.writer = psycopg.connect(pg_url)  # type: ignore[attr-defined]
    try:
        yield e
    finally:
        e.writer.close()  # type: ignore[attr-defined]
        e.close()
        cache.close()


def test_emit_commit_invalidates_through_cdc(menv: Env) -> None:
    r = menv.start()
    ob, w = menv.outbox, menv.writer  # type: ignore[attr-defined]
    ob.emit_commit(w, "x:1", "x:2", version=7)
    menv.wait_keys("x:1", "x:2")
    wait_for(lambda: r.stats["messages"] >= 1, 10, "the message to be counted")
    assert r.stats["messages_malformed"] == 0


def test_rolled_back_emit_invalidates_nothing(menv: Env) -> None:
    menv.start()
    ob, w = menv.outbox, menv.writer  # type: ignore[attr-defined]
    w.execute(f"INSERT INTO {menv.table} VALUES (7, 'r@x', 'R')")
    ob.emit(w, "rb:1")
    w.rollback()
    ob.emit_commit(w, "ok:1")
    menv.wait_keys("ok:1")  # applied in commit order: the rolled-back one would be there by now
    assert not tombstoned(menv.cache, "rb:1") and not tombstoned(menv.cache, "u:7")


def test_emit_with_row_changes_in_one_transaction(menv: Env) -> None:
    r = menv.start()
    ob, w = menv.outbox, menv.writer  # type: ignore[attr-defined]
    w.execute(f"INSERT INTO {menv.table} VALUES (1, 'a@x', 'A')")
    ob.emit(w, "extra:1")
    w.execute(f"UPDATE {menv.table} SET email = 'b@x' WHERE id = 1")
    ob.emit_commit(w, "extra:2")
    menv.wait_keys("u:1", "e:a@x", "e:b@x", "extra:1", "extra:2")
    wait_for(lambda: r.stats["messages"] >= 2, 10, "both messages to be counted")
    assert r.stats["changes"] == 2 and r.stats["transactions"] >= 1


def test_malformed_and_foreign_messages_are_logged_counted_and_skipped(menv: Env,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    r = menv.start()
    ob, w, p = menv.outbox, menv.writer, menv.prefix  # type: ignore[attr-defined]
    caplog.set_level(logging.ERROR, logger="cachesync.cdc.postgres")
    for content in ("not json", '{"keys": []}', '{"keys": [1]}', '{"keys": ["k"], "version": "abc"}'):
        w.execute("SELECT pg_logical_emit_message(true, %s::text, %s::text)", (p, content))
        w.commit()
    w.execute("SELECT pg_logical_emit_message(true, %s::text, %s::text)", (p + "_other", '{"keys":["o:1"]}'))
    w.execute("SELECT pg_logical_emit_message(false, %s::text, %s::text)", (p, '{"keys":["nt:1"]}'))
    w.commit()
    ob.emit_commit(w, "after:1")
    menv.wait_keys("after:1")  # the stream went on
    assert r.stats["messages_malformed"] == 4, r.stats
    assert r.stats["messages_ignored"] >= 2, r.stats
    assert not tombstoned(menv.cache, "o:1") and not tombstoned(menv.cache, "nt:1")
    text = caplog.text
    assert text.count("malformed") == 4 and "Expecting value" in text and "non-empty list" in text
    assert menv.error is None


def test_emitted_message_survives_a_stop_before_apply(menv: Env) -> None:
    menv.start()
    ob, w = menv.outbox, menv.writer  # type: ignore[attr-defined]
    ob.emit_commit(w, "before:1")
    menv.wait_keys("before:1")
    menv.stop()
    ob.emit_commit(w, "while_down:1", version=3)  # committed while no reader runs: kept by the slot
    assert not tombstoned(menv.cache, "while_down:1")
    r = menv.start()
    menv.wait_keys("while_down:1")
    assert r.stats["messages"] == 1, r.stats  # resumed from the checkpoint: "before:1" not replayed


def test_emit_refuses_misuse(pg_url: str) -> None:
    import sqlite3

    ob = Outbox()
    with pytest.raises(OutboxError, match="PostgreSQL WAL message"):
        ob.emit(sqlite3.connect(":memory:"), "k")
    with psycopg.connect(pg_url, autocommit=True) as c, pytest.raises(OutboxError, match="autocommit"):
        ob.emit_commit(c, "k")
    with psycopg.connect(pg_url) as c:
        with pytest.raises(OutboxError, match="at least one"):
            ob.emit_commit(c)
        with c.transaction(), pytest.raises(OutboxError, match="transaction\\(\\) block"):
            ob.emit_commit(c, "k")
    with psycopg.connect(pg_url) as c:  # an error rolls the transaction back and is re-raised
        c.execute("CREATE TEMP TABLE t_emit (id int)")
        c.commit()
        c.execute("INSERT INTO t_emit VALUES (1)")
        with pytest.raises(OutboxError):
            Outbox(message_prefix="")
        ob2 = Outbox(max_key_bytes=4)
        with pytest.raises(Exception, match="max_key_bytes"):
            ob2.emit_commit(c, "too long")
        c.rollback()
        c.execute("INSERT INTO t_emit VALUES (2)")
        with pytest.raises(psycopg.Error):
            c.execute("SELECT 1 / 0")  # the transaction is now aborted
        with pytest.raises(psycopg.Error):
            ob.emit_commit(c, "k")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert c.execute("SELECT count(*) FROM t_emit").fetchone() == (0,)


# ---------------------------------------------------------------------------- DDL event triggers


def test_ddl_triggers_drop_and_rename_invalidate_every_key_of_the_table(menv: Env) -> None:
    from cachesync.cdc.postgres import drop_ddl_triggers, install_ddl_triggers

    prefix, t = menv.prefix, menv.table  # type: ignore[attr-defined]
    ob = menv.outbox  # type: ignore[attr-defined]
    install_ddl_triggers(menv.db_url, prefix)
    install_ddl_triggers(menv.db_url, prefix)  # idempotent
    try:
        menv.write(f"INSERT INTO {t} VALUES (1, 'a@x', 'A')")
        for k in ("u:1", "e:a@x", "other:1"):
            menv.cache.set(k, "cached")
        r = menv.start()
        menv.write(f"ALTER TABLE {t} ADD COLUMN extra INT")  # not a rename: nothing flushed
        ob.emit_commit(menv.writer, "marker:1")  # type: ignore[attr-defined]
        menv.wait_keys("marker:1")  # applied in commit order: the ALTER's message (if any) came before
        assert (menv.cache.peek("u:1") or {}).get("v")
        menv.write(f"ALTER TABLE {t} RENAME TO {t}_r")  # the rows are gone from the rule's name
        menv.wait_keys("u:1", "e:a@x")
        menv.cache.set("u:2", "cached")
        menv.write(f"ALTER TABLE {t}_r RENAME TO {t}")  # back under the rule's name
        menv.wait_keys("u:2")
        menv.cache.set("u:3", "cached")
        menv.write(f"DROP TABLE {t}")
        menv.wait_keys("u:3")
        assert (menv.cache.peek("other:1") or {}).get("v")  # not covered by the table's templates
        assert r.stats["flushed_keys"] >= 4
        menv.write(f"CREATE TABLE {t} (id INT PRIMARY KEY, email VARCHAR(100), name VARCHAR(100))")
    finally:
        drop_ddl_triggers(menv.db_url, prefix)
        drop_ddl_triggers(menv.db_url, prefix)  # idempotent


def test_ddl_trigger_rolled_back_sends_nothing(menv: Env) -> None:
    from cachesync.cdc.postgres import drop_ddl_triggers, install_ddl_triggers

    prefix, t = menv.prefix, menv.table  # type: ignore[attr-defined]
    install_ddl_triggers(menv.db_url, prefix)
    try:
        menv.cache.set("u:5", "cached")
        r = menv.start()
        menv.write(f"DROP TABLE {t}", rollback=True)
        menv.outbox.emit_commit(menv.writer, "marker:2")  # type: ignore[attr-defined]
        menv.wait_keys("marker:2")
        assert (menv.cache.peek("u:5") or {}).get("v") and r.stats["flushed_keys"] == 0
    finally:
        drop_ddl_triggers(menv.db_url, prefix)


def test_a_replication_socket_descriptor_above_1024_waits_idle_without_reconnecting(
        pg_url: str, redis_url: str, namespace: str, tmp_path: Path) -> None:
    """In a busy process (more than 1024 descriptors open) the replication connection's descriptor is above
    select()'s FD_SETSIZE: the idle wait still works (poll), instead of each wait failing as a lost connection (a
    reconnect, with its backoff, after every idle moment)."""
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    try:
        env = Env(TestPostgresConformance(), pg_url, cache, tmp_path)
        try:
            runner = env.start()
            wait_for(lambda: getattr(env.source, "_acked", 0) > 0 or env.error, what="the stream started")
            env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
            env.wait_keys("u:1", "e:a@x")
            env.write(f"INSERT INTO {env.table} VALUES (2, 'b@x', 'B')")
            env.wait_keys("u:2", "e:b@x")
            assert runner.stats["reconnects"] == 0 and env.error is None
        finally:
            env.close()
    finally:
        cache.close()
        for fd in fds:
            os.close(fd)
