"""The production write path (cachesync.WritePath / AsyncWritePath): outbox row in the transaction, commit,
invalidation at once; with Redis down the request succeeds and the relay delivers the invalidation later."""

from __future__ import annotations

import logging

import psycopg
import pytest

import cachesync
from cachesync import AsyncWritePath, ConfigError, WritePath
from cachesync.db import connect
from cachesync.outbox import Outbox
from cachesync.outbox.relay import Relay
from test_outbox import app_table, db_url, fill, invalidated, outbox, private_redis, table  # noqa: F401


def _insert(db_url, app_table):  # noqa: F811
    conn = connect(db_url)
    conn.cursor().execute(f"INSERT INTO {app_table} (id, email, version) VALUES (1, 'a@x', 1)")
    conn.commit()
    return conn


def drain(db_url, cache, outbox):  # noqa: F811
    relay = Relay(db_url, cache, table=outbox.table)
    try:
        return relay.drain()
    finally:
        relay.close()


def _sql(conn, sql):
    return sql.replace("?", "%s") if type(conn).__module__.startswith(("psycopg", "pymysql")) else sql


def test_write_records_commits_and_invalidates_at_once(db_url, outbox, app_table, cache):  # noqa: F811
    conn = _insert(db_url, app_table)
    fill(cache, "user:1", "user_by_email:a@x", "other")
    wp = WritePath(cache, outbox)
    with wp.write(conn, "user:1", version=2) as w:
        conn.cursor().execute(_sql(conn, f"UPDATE {app_table} SET email=?, version=2 WHERE id=1"), ("b@x",))
        w.add("user_by_email:a@x")
    assert w.invalidated
    assert invalidated(cache, "user:1") and invalidated(cache, "user_by_email:a@x")  # before any relay ran
    assert cache.peek("other")["v"]
    assert outbox.pending(conn) == 2  # and durably recorded, in the same transaction
    conn2 = connect(db_url)
    cur = conn2.cursor()
    cur.execute(f"SELECT email FROM {app_table} WHERE id=1")
    assert cur.fetchone()[0] == "b@x"  # committed
    conn2.close()
    assert drain(db_url, cache, outbox) == 2
    conn.close()


def test_block_error_rolls_back_and_records_nothing(db_url, outbox, app_table, cache):  # noqa: F811
    conn = _insert(db_url, app_table)
    fill(cache, "user:1")
    wp = WritePath(cache, outbox)
    with pytest.raises(RuntimeError, match="boom"), wp.write(conn, "user:1", version=2):
        conn.cursor().execute(f"UPDATE {app_table} SET version=2 WHERE id=1")
        raise RuntimeError("boom")
    assert outbox.pending(conn) == 0 and not invalidated(cache, "user:1")
    cur = conn.cursor()
    cur.execute(f"SELECT version FROM {app_table} WHERE id=1")
    assert cur.fetchone()[0] == 1
    conn.close()


@pytest.mark.parametrize("db_url", ["postgresql", "sqlite"], indirect=True)
def test_redis_down_request_succeeds_and_relay_delivers_later(db_url, outbox, app_table, private_redis,  # noqa: F811
                                                              namespace, caplog):
    conn = _insert(db_url, app_table)
    url = private_redis.url.replace("redis://", "redis://:s3cret-pw@")
    app_cache = cachesync.Cache(url, namespace=namespace, socket_timeout=0.5, connect_timeout=0.5)
    wp = WritePath(app_cache, outbox)  # on_invalidation_error="log" is the default
    private_redis.stop()
    with caplog.at_level(logging.WARNING, logger="cachesync.writepath"):
        with wp.write(conn, "user:1", "user_by_email:a@x", version=2) as w:
            conn.cursor().execute(f"UPDATE {app_table} SET version=2 WHERE id=1")
    assert not w.invalidated and wp.failed_invalidations == 1
    msgs = [r.getMessage() for r in caplog.records if r.name == "cachesync.writepath"]
    assert len(msgs) == 1 and "'user:1'" in msgs[0] and "'user_by_email:a@x'" in msgs[0] and "s3cret" not in msgs[0]
    assert caplog.records[-1].levelno == logging.WARNING
    cur = conn.cursor()
    cur.execute(f"SELECT version FROM {app_table} WHERE id=1")
    assert cur.fetchone()[0] == 2  # the commit stands
    assert outbox.pending(conn) == 1  # the invalidation is left to the outbox
    private_redis.start()
    cache = cachesync.Cache(private_redis.url, namespace=namespace, tombstone_ttl=600)
    assert drain(db_url, cache, outbox) == 1
    assert invalidated(cache, "user:1") and invalidated(cache, "user_by_email:a@x")
    assert cache.peek("user:1")["fl"] in (b"2", "2", 2)  # with the committed version as the floor
    cache.close()
    app_cache.close()
    conn.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_raise_mode_raises_after_the_commit(db_url, outbox, app_table, private_redis, namespace):  # noqa: F811
    conn = _insert(db_url, app_table)
    cache = cachesync.Cache(private_redis.url, namespace=namespace, socket_timeout=0.5, connect_timeout=0.5)
    wp = WritePath(cache, outbox, on_invalidation_error="raise")
    private_redis.stop()
    with pytest.raises(cachesync.InvalidationError, match="user:1"), wp.write(conn, "user:1"):
        conn.cursor().execute(f"UPDATE {app_table} SET version=3 WHERE id=1")
    assert outbox.pending(conn) == 1  # committed, recorded
    cache.close()
    conn.close()


def test_bad_configuration_is_refused(cache):
    with pytest.raises(ConfigError, match="'outbox'.*triggers"):
        WritePath(cache, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="on_invalidation_error"):
        WritePath(cache, Outbox(), on_invalidation_error="ignore")  # type: ignore[arg-type]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_triggers_mode_commits_and_invalidates_without_inserting(db_url, outbox, app_table, cache):  # noqa: F811
    conn = _insert(db_url, app_table)
    fill(cache, "user:1")
    with WritePath(cache, "triggers").write(conn, "user:1"):
        conn.cursor().execute(f"UPDATE {app_table} SET version=4 WHERE id=1")
    assert invalidated(cache, "user:1") and outbox.pending(conn) == 0
    conn.close()


async def test_async_write_path_psycopg(pg_url, acache, namespace):
    ob = Outbox("cachesync_outbox_wp" + namespace)
    sync_conn = connect(pg_url)
    ob.init(sync_conn)
    try:
        await acache.set("user:9", "old")
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            wp = AsyncWritePath(acache, ob)
            async with wp.write(conn, "user:9", version=5) as w:
                await conn.execute("SELECT 1")
            assert w.invalidated
            e = await acache.peek("user:9")
            assert "v" not in e and "ti" in e
            async with conn.cursor() as cur:
                await cur.execute(f"SELECT count(*) FROM {ob.table}")
                assert (await cur.fetchone())[0] == 1
            with pytest.raises(ValueError):
                async with wp.write(conn, "user:10"):
                    raise ValueError("x")
            async with conn.cursor() as cur:
                await cur.execute(f"SELECT count(*) FROM {ob.table}")
                assert (await cur.fetchone())[0] == 1
    finally:
        ob.drop(sync_conn)
        sync_conn.close()
