"""Hostile input for the daemons (issue 10): one unusable outbox row, bus message or CDC event never stops the
relay, the worker or the CDC runner; it is parked / dead-lettered / recorded and skipped, and the valid items
around it are applied. Also: key scans by prefix see every key, and a string where a list of keys belongs is
refused. Real servers only."""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import cachesync
from cachesync import protocol as P
from cachesync.bus import Bus, Invalidation
from cachesync.bus.worker import Worker
from cachesync.db import connect
from cachesync.errors import BadDataError
from cachesync.outbox import PARKED, Outbox
from cachesync.outbox.relay import Relay
from cachesync.rules import RuleError, Rules
from private_servers import PrivatePostgres, private_pg  # noqa: F401 - fixture
from test_cdc_conformance import Env
from test_cdc_mysql import TestMariaDBConformance
from test_cdc_postgres import TestPostgresConformance, menv  # noqa: F401 - fixture
from test_outbox import invalidated, wait_for

MAXB = 40  # the caches of this module accept keys of at most 40 bytes
LONG = "k:" + "x" * 60


@pytest.fixture
def small_cache(redis_url: str, namespace: str) -> Iterator[cachesync.Cache]:
    c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0, max_key_bytes=MAXB, tombstone_ttl=120)
    yield c
    c.close()


# ---------------------------------------------------------------------------- relay


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/t.db"
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "mysql_url")


@pytest.fixture
def outbox(db_url: str) -> Iterator[Outbox]:
    ob = Outbox("cachesync_outbox_" + uuid.uuid4().hex[:10])
    conn = connect(db_url)
    ob.init(conn)
    yield ob
    ob.drop(conn)
    conn.close()


BAD_ROWS = [  # (cache_keys, key_version, what last_error must say)
    ('["bad:1"]', "abc", "not a number"),
    ('["bad:2"]', "nan", "finite"),
    (json.dumps([LONG]), None, "max_key_bytes"),
    ('"bad:3"', None, "non-empty JSON list"),  # a string where the list of keys belongs
    ('[1, 2]', None, "keys must be str"),
    ('[""]', None, "empty"),
    ('{"k": 1}', None, "non-empty JSON list"),
    ("not json", None, "JSONDecodeError"),
]


def _insert(conn, ob: Outbox, rows) -> None:
    cur = conn.cursor()
    d = ob._dialect(conn)
    for keys, ver in rows:
        cur.execute(d.sql(f"INSERT INTO {ob.table} (cache_keys, key_version) VALUES (?, ?)"), (keys, ver))
    conn.commit()
    cur.close()


def _parked(conn, ob: Outbox) -> list[tuple[str, str]]:
    cur = conn.cursor()
    cur.execute(f"SELECT cache_keys, last_error FROM {ob.table} WHERE run_at >= {PARKED} ORDER BY id")
    out = [tuple(r) for r in cur.fetchall()]
    conn.commit()
    cur.close()
    return out


def test_relay_parks_unusable_rows_and_applies_the_rows_around_them(db_url, outbox, small_cache):
    for k in ("good:1", "good:2", "bad:1", "bad:2"):
        small_cache.set(k, "cached")
    conn = connect(db_url)
    _insert(conn, outbox, [('["good:1"]', "5")] + [(k, v) for k, v, _ in BAD_ROWS] + [('["good:2"]', None)])
    relay = Relay(db_url, small_cache, table=outbox.table, listen=False)
    assert relay.drain() == 2 + len(BAD_ROWS)  # one batch: the good rows applied, the bad ones parked
    assert invalidated(small_cache, "good:1") and invalidated(small_cache, "good:2")
    assert small_cache.peek("bad:1")["v"] and small_cache.peek("bad:2")["v"]  # nothing applied for them
    parked = _parked(conn, outbox)
    assert [k for k, _ in parked] == [k for k, _, _ in BAD_ROWS]
    for (_, err), (_, _, why) in zip(parked, BAD_ROWS, strict=True):
        assert why in err, err
    assert relay.stats["parked"] == len(BAD_ROWS)
    relay.close()
    again = Relay(db_url, small_cache, table=outbox.table, listen=False)  # a restarted relay skips them
    assert again.drain() == 0 and len(_parked(conn, outbox)) == len(BAD_ROWS)
    again.close()
    conn.close()


def test_relay_run_keeps_going_past_unusable_rows(db_url, outbox, small_cache):
    """The loop (not only drain): with the PostgreSQL fast path, whose NOTIFY payload carries the bad row."""
    conn = connect(db_url)
    relay = Relay(db_url, small_cache, table=outbox.table, poll_interval=0.05)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            relay.run(stop)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        small_cache.set("after:1", "cached")
        _insert(conn, outbox, [('["v:1"]', "abc"), (json.dumps([LONG]), "3"), ('["after:1"]', "4")])
        wait_for(lambda: invalidated(small_cache, "after:1") or errors, 30, "the row after the bad ones")
        wait_for(lambda: relay.stats["parked"] == 2 or errors, 30, "the bad rows to be parked")
        assert not errors and t.is_alive()
    finally:
        stop.set()
        t.join(15)
    conn.close()


def test_relay_listener_survives_garbage_notifications(pg_url, small_cache):
    ob = Outbox("cachesync_outbox_" + uuid.uuid4().hex[:10])
    conn = connect(pg_url)
    ob.init(conn)
    relay = Relay(pg_url, small_cache, table=ob.table, poll_interval=0.05)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            relay.run(stop)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        wait_for(lambda: relay._conn is not None, 10, "the relay to listen")
        row = '[[{}, "[\\"{}\\"]", {}]]'.format  # one row as the trigger sends it: [id, cache_keys, version]
        garbage = [row(1, "g:1", '"abc"'), "[" * 5000, "garbage", "[1]", row("1e400", "g:1", "null"),
                   row(2, "y" * 60, "null"), row(3, "g:1", '"nan"'), "{}", "[[null, null, null]]",
                   '[[3, "\\"s\\"", 1]]', "\\u0000", "[[true, 7, {}]]", "[[]]", "[]"]
        with psycopg.connect(pg_url, autocommit=True) as c:
            for g in garbage:
                c.execute("SELECT pg_notify(%s, %s)", (ob.table, g))
        small_cache.set("after:2", "cached")
        ob.commit(conn, "after:2")
        wait_for(lambda: invalidated(small_cache, "after:2") or errors, 30, "the row after the garbage")
        assert not errors and t.is_alive()
        assert relay.stats["errors"] == 0  # not even a reconnect: the garbage was ignored
    finally:
        stop.set()
        t.join(15)
        ob.drop(conn)
        conn.close()


def test_relay_fast_path_is_not_fooled_by_a_forged_notification(pg_url, small_cache):
    """Any role may NOTIFY the channel: a notification naming the next row's id with other keys must not make the
    claim delete that row without applying it."""
    ob = Outbox("cachesync_outbox_" + uuid.uuid4().hex[:10])
    conn = connect(pg_url)
    ob.init(conn)
    relay = Relay(pg_url, small_cache, table=ob.table)
    try:
        relay._db()  # LISTENing
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute("SELECT pg_notify(%s, %s)", (ob.table, json.dumps([1, '["decoy:1"]', None])))
        assert relay.apply_notified(5.0) == 1  # the forged row was applied (harmless) and remembered
        small_cache.set("real:1", "cached")
        ob.commit(conn, "real:1")  # the real row 1
        relay.apply_notified(5.0)
        assert relay.drain() == 1
        assert invalidated(small_cache, "real:1")
    finally:
        relay.close()
        ob.drop(conn)
        conn.close()


# ---------------------------------------------------------------------------- worker


@pytest.fixture(params=["redis", "nats", "rabbitmq"])
def bus(request) -> Iterator[Bus]:
    name = "csh" + uuid.uuid4().hex[:10]
    if request.param == "redis":
        from cachesync.bus.redis_streams import RedisStreamsBus

        b: Bus = RedisStreamsBus(request.getfixturevalue("redis_url"), name, claim_idle=30)
    elif request.param == "nats":
        from cachesync.bus.nats_jetstream import NatsJetStreamBus

        b = NatsJetStreamBus(request.getfixturevalue("nats_url"), name, claim_idle=30)
    else:
        from cachesync.bus.rabbitmq import RabbitMQBus

        b = RabbitMQBus(request.getfixturevalue("amqp_url"), name, claim_idle=30)
        b.raw_url = request.getfixturevalue("amqp_url")  # type: ignore[attr-defined]
    b.consume("g", "setup", 1, 0)  # the group exists (RabbitMQ: its queue receives what is published next)
    yield b
    b.destroy()
    b.close()


def publish_raw(bus: Bus, bodies: list[bytes]) -> None:
    """Publish bodies as a foreign (or broken) producer would: straight to the broker, in order."""
    from cachesync.bus.nats_jetstream import NatsJetStreamBus
    from cachesync.bus.rabbitmq import RabbitMQBus
    from cachesync.bus.redis_streams import RedisStreamsBus

    if isinstance(bus, RedisStreamsBus):
        for b in bodies:
            bus.r.execute_command("XADD", bus.stream, "*", "m", b)
    elif isinstance(bus, NatsJetStreamBus):
        async def go() -> None:
            for b in bodies:
                await bus.js.publish(bus.subject, b, stream=bus.stream)
        bus._run(go())
    else:
        import pika

        assert isinstance(bus, RabbitMQBus)
        conn = pika.BlockingConnection(pika.URLParameters(bus.raw_url))  # type: ignore[attr-defined]
        ch = conn.channel()
        for b in bodies:
            ch.basic_publish(bus.name, "", b)
        conn.close()


BAD_MESSAGES = [
    b"\xff\xfe\x00",  # not UTF-8
    b"not json",
    b"[" * 100_000,  # deeper than json can recurse
    b"[]",
    b'{"k": "bad:1"}',  # keys as a string: never iterated character by character
    b'{"k": ["bad:2"], "v": "abc"}',
    b'{"k": ["bad:3"], "v": "NaN"}',
    b'{"k": ["bad:4"], "v": [1]}',
    b'{"k": [1]}',
    b'{"k": [""]}',
    b"{}",
    b'{"t": 5, "n": {}}',
    b'{"t": "users", "n": "row"}',
    json.dumps({"k": [LONG]}).encode(),  # decodable, but longer than the cache accepts
]
NO_NUMBER = json.dumps({"t": "users", "n": {"id": 1, "version": "abc"}}).encode()  # the rules' version is no number


def test_worker_dead_letters_malformed_messages_and_applies_the_rest(bus, small_cache):
    rules = Rules({"users": {"keys": ["user:{id}"], "version": "version"}})
    for k in ("good:1", "good:2", "user:7", "user:1", "b", "a"):
        small_cache.set(k, "cached")
    publish_raw(bus, [Invalidation(("good:1",), "3").encode(), *BAD_MESSAGES, NO_NUMBER,
                      Invalidation(table="users", new={"id": 7, "version": 9}).encode(),
                      Invalidation(("good:2",)).encode()])
    w = Worker(bus, small_cache, rules, group="g", batch_size=5)
    wait_for(lambda: (w.run_once(0.1), w.stats["messages"] == 4)[1], 30, "the valid messages")
    assert invalidated(small_cache, "good:1") and invalidated(small_cache, "good:2")
    assert invalidated(small_cache, "user:7")
    # a version column that is no number: the key is still invalidated (without raising the floor), and counted
    # ... and the message then dead-lettered with the reason (nothing hidden)
    assert invalidated(small_cache, "user:1") and w.stats["skipped"] == 1
    assert small_cache.peek("b")["v"] and small_cache.peek("a")["v"]  # not from '"bad:1"'
    dls = bus.dead_letters(100)
    assert len(dls) == len(BAD_MESSAGES) + 1 and w.stats["malformed"] == len(BAD_MESSAGES)
    assert any("version 'abc' is not a number" in dl.reason for dl in dls)
    assert all("BadDataError" in dl.reason for dl in dls), [dl.reason for dl in dls]
    assert {dl.body for dl in dls if dl.message is None} <= set(BAD_MESSAGES)
    assert any(dl.message is not None and dl.message.keys == (LONG,) for dl in dls)  # kept for a replay
    again = Worker(bus, small_cache, rules, group="g")  # a restarted worker: nothing left, no stop
    assert again.run_once(0.1) == 0 and len(bus.dead_letters(100)) == len(BAD_MESSAGES) + 1


def test_worker_dead_letters_a_row_its_rules_cannot_format(bus, small_cache):
    rules = Rules({"fmt": ["f:{id:05d}"]})
    small_cache.set("f:00007", "cached")
    publish_raw(bus, [Invalidation(table="fmt", new={"id": "x"}).encode(),
                      Invalidation(table="fmt", new={"id": 7}).encode()])
    w = Worker(bus, small_cache, rules, group="g")
    wait_for(lambda: (w.run_once(0.1), w.stats["messages"] == 1)[1], 30, "the valid message")
    assert invalidated(small_cache, "f:00007")
    (dl,) = bus.dead_letters()
    assert dl.reason.startswith("BadDataError") and "cannot format" in dl.reason and "f:{id:05d}" in dl.reason


def test_message_decode_refuses_keys_as_a_string() -> None:
    with pytest.raises(BadDataError, match="list of keys"):
        Invalidation.decode(b'{"k": "user:1"}')


# ---------------------------------------------------------------------------- CDC


class _Pg(TestPostgresConformance):
    __test__ = False


class _Maria(TestMariaDBConformance):
    __test__ = False


@pytest.fixture(params=["postgresql", "mysql"])
def cenv(request, redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Env]:
    suite = _Pg() if request.param == "postgresql" else _Maria()
    db_url = request.getfixturevalue("pg_url" if request.param == "postgresql" else "mysql_url")
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120, max_key_bytes=MAXB)
    e = Env(suite, db_url, cache, tmp_path)
    e.rules = Rules({e.table: {"keys": ["u:{id}", "e:{email}"], "version": "name"}})
    try:
        yield e
    finally:
        e.close()
        cache.close()


def test_cdc_skips_what_cannot_become_keys_and_applies_the_rest(cenv: Env, caplog) -> None:
    r = cenv.start()
    t = cenv.table
    long_email = "x" * 60
    with caplog.at_level(logging.ERROR, logger="cachesync.cdc"):
        cenv.write(f"INSERT INTO {t} VALUES (1, 'a@x', '5')",
                   f"INSERT INTO {t} VALUES (2, NULL, '6')",  # e:None, as str.format and the triggers say
                   f"INSERT INTO {t} VALUES (3, '{long_email}', 'abc')",  # too long; version not a number
                   f"INSERT INTO {t} VALUES (4, 'd@x', '7')")
        cenv.write(f"INSERT INTO {t} VALUES (5, 'f@x', '8')")  # the next transaction goes on
        cenv.wait_keys("u:1", "e:a@x", "u:2", "e:None", "u:3", "u:4", "e:d@x", "u:5", "e:f@x")
    assert cenv.error is None and cenv.thread is not None and cenv.thread.is_alive()
    assert r.stats["skipped"] == 1, r.stats
    lines = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(lines) == 1 and all(t in ln for ln in lines), lines
    assert "max_key_bytes" in lines[0] and "not a number" in lines[0]


# ---------------------------------------------------------------------------- rules, prefix scans


def test_rules_refuse_a_string_of_keys(tmp_path) -> None:
    p = tmp_path / "rules.toml"
    p.write_text('[tables.users]\nkeys = "user:{id}"\n')
    with pytest.raises(RuleError, match="not the string"):
        Rules.load(p)
    with pytest.raises(RuleError, match="not the string"):
        Rules({"users": {"keys": "user:{id}"}})


ODD_KEYS = ["#a", "#0123456789abcdef", "{x}", "a{b", "b}c", "[x]", "a*b", "a?b", "a\\b", "plain", "#{y}", "}"]


def test_prefix_scan_sees_every_key(cache) -> None:
    for k in ODD_KEYS:
        cache.set(k, "v")
    assert sorted(list(cache.keys_with_prefix(""))) == sorted(ODD_KEYS)
    assert sorted(list(cache.keys_with_prefix("#"))) == ["#0123456789abcdef", "#a", "#{y}"]
    assert list(cache.keys_with_prefix("[")) == ["[x]"]
    assert sorted(list(cache.keys_with_prefix("a"))) == ["a*b", "a?b", "a\\b", "a{b"]
    assert list(cache.keys_with_prefix("a*")) == ["a*b"] and list(cache.keys_with_prefix("{")) == ["{x}"]
    assert list(cache.keys_with_prefix("b}")) == ["b}c"] and list(cache.keys_with_prefix("}")) == ["}"]


# ---------------------------------------------------------------------------- capture triggers


def _app_table(conn, cols: str) -> str:
    name = "hv_" + uuid.uuid4().hex[:8]
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, {cols})")
    conn.commit()
    cur.close()
    return name


def _drop(conn, name: str) -> None:
    cur = conn.cursor()
    cur.execute(f"DROP TABLE IF EXISTS {name}")
    conn.commit()
    cur.close()


@pytest.mark.parametrize("vtype", ["VARCHAR(20)", "DATE", "TEXT"])
def test_triggers_refuse_a_version_column_that_is_no_number(db_url, outbox, vtype) -> None:
    from cachesync.outbox import OutboxError, triggers

    conn = connect(db_url)
    app = _app_table(conn, f"v {vtype}")
    try:
        with pytest.raises(OutboxError, match=f"table '{app}': version column 'v' has type .* cannot turn into a "
                                              "number"):
            triggers.install(conn, Outbox(outbox.table, rules=Rules({app: {"keys": ["k:{id}"], "version": "v"}})))
    finally:
        _drop(conn, app)
        conn.close()


@pytest.mark.parametrize("which", ["postgresql", "mysql"])
def test_triggers_write_timestamp_versions_as_epoch_microseconds(request, which, small_cache) -> None:
    import datetime as dt

    from cachesync.outbox import triggers
    from cachesync.protocol import encode_version

    url = request.getfixturevalue("pg_url" if which == "postgresql" else "mysql_url")
    conn = connect(url)
    app = _app_table(conn, "at TIMESTAMP(6)" if which == "postgresql" else "at DATETIME(6)")
    ob = Outbox("cachesync_outbox_" + uuid.uuid4().hex[:10],
                rules=Rules({app: {"keys": ["hv:{id}"], "version": "at"}}))
    try:
        triggers.install(conn, ob)
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {app} (id, at) VALUES (1, '2024-05-01 12:00:00.123456')")
        conn.commit()
        cur.execute(f"SELECT key_version FROM {ob.table}")
        (ver,) = cur.fetchone()
        conn.commit()
        cur.close()
        assert ver == encode_version(dt.datetime(2024, 5, 1, 12, 0, 0, 123456))  # what the application writes
        small_cache.set("hv:1", "cached")
        relay = Relay(url, small_cache, table=ob.table, listen=False)
        assert relay.drain() == 1 and relay.stats["parked"] == 0
        relay.close()
        assert invalidated(small_cache, "hv:1")
    finally:
        triggers.uninstall(conn, ob)
        ob.drop(conn)
        _drop(conn, app)
        conn.close()


def test_cdc_survives_wal_messages_json_cannot_hold(menv: Env, caplog) -> None:  # noqa: F811
    r = menv.start()
    ob, w, p = menv.outbox, menv.writer, menv.prefix  # type: ignore[attr-defined]
    huge = '{"keys": ["k:1"], "version": 1' + "0" * 400 + "}"  # an int no float can hold
    for content in (huge, "[" * 5000, '{"keys": ["' + "z" * 60 + '"]}'):  # too deep; a key the cache refuses
        w.execute("SELECT pg_logical_emit_message(true, %s::text, %s::text)", (p, content))
        w.commit()
    ob.emit_commit(w, "after:1")
    menv.wait_keys("after:1")  # the stream went on
    assert menv.error is None
    assert r.stats["messages_malformed"] == 2, r.stats


def test_cdc_publishes_datetime_versions_as_numbers(mysql_url: str, redis_url: str, namespace: str,
                                                    tmp_path: Path) -> None:
    import datetime as dt

    from cachesync.bus.redis_streams import RedisStreamsBus
    from cachesync.protocol import encode_version

    cache = cachesync.Cache(redis_url, namespace=namespace)
    bus = RedisStreamsBus(redis_url, "csh" + uuid.uuid4().hex[:10])
    e = Env(_Maria(), mysql_url, cache, tmp_path)
    try:
        e.write(f"ALTER TABLE {e.table} ADD COLUMN at DATETIME(6)")
        e.rules = Rules({e.table: {"keys": ["u:{id}"], "version": "at"}})
        e.runner_kw = {"bus": bus}
        e.start()
        e.write(f"INSERT INTO {e.table} (id, email, name, at) VALUES (1, 'a@x', 'A', '2024-05-01 12:00:00.5')")
        got: list = []
        wait_for(lambda: got.extend(bus.consume("g", "c", 10, 0.2)) or got, 30, "the published message")
        assert got[0].message.keys == ("u:1",)
        assert got[0].message.version == encode_version(dt.datetime(2024, 5, 1, 12, 0, 0, 500000))
    finally:
        e.close()
        bus.destroy()
        bus.close()
        cache.close()


def test_cdc_mariadb_row_event_the_decoder_cannot_read_flushes_its_table(mysql_url: str, redis_url: str,
                                                                         namespace: str, tmp_path: Path) -> None:
    """An invalid date (sql_mode ALLOW_INVALID_DATES) makes the binlog decoder raise: the runner goes on and,
    not knowing the rows, invalidates every key of the table."""
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    e = Env(_Maria(), mysql_url, cache, tmp_path)
    try:
        e.write(f"ALTER TABLE {e.table} ADD COLUMN d DATE")
        r = e.start()
        for k in ("u:1", "u:99", "e:zz"):
            cache.set(k, "cached")
        e.write("SET SESSION sql_mode = 'ALLOW_INVALID_DATES'",
                f"INSERT INTO {e.table} (id, email, name, d) VALUES (1, 'a@x', 'A', '2024-02-31')")
        e.write(f"INSERT INTO {e.table} (id, email, name) VALUES (2, 'b@x', 'B')")  # the stream goes on
        e.wait_keys("u:1", "u:99", "e:zz", "u:2", "e:b@x")
        assert e.error is None and r.stats["undecodable_events"] == 1, r.stats
    finally:
        e.close()
        cache.close()


def test_cdc_pgoutput_message_that_cannot_be_decoded_flushes_what_the_rules_cover(
        private_pg: PrivatePostgres, redis_url: str, namespace: str, tmp_path: Path) -> None:  # noqa: F811
    """A SQL_ASCII database (private server) stores text that is not UTF-8: pgoutput sends it as is, the decoder
    refuses it; the runner goes on and, not knowing the rows, invalidates every key the rules cover."""
    admin = psycopg.connect(private_pg.url, autocommit=True)
    admin.execute("CREATE DATABASE ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    url = private_pg.url.rsplit("/", 1)[0] + "/ascii"
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    e = Env(_Pg(), url, cache, tmp_path)
    try:
        r = e.start()
        for k in ("u:1", "u:99", "e:zz"):
            cache.set(k, "cached")
        e.write(f"INSERT INTO {e.table} VALUES (1, E'\\xff\\xfe@x', 'A')")
        e.write(f"INSERT INTO {e.table} VALUES (2, 'b@x', 'B')")  # the stream goes on
        e.wait_keys("u:1", "u:99", "e:zz", "u:2", "e:b@x")
        assert e.error is None and r.stats["undecodable_messages"] >= 1, r.stats
    finally:
        e.close()
        cache.close()
        admin.execute("DROP DATABASE IF EXISTS ascii WITH (FORCE)")
        admin.close()


# ---------------------------------------------------------------------------- Redis error replies (read-only replica)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A private redis-server (loopback, free port); ``_fill()`` makes it refuse writes with error replies,
    ``_free()`` makes it writable again."""
    import shutil
    import socket
    import subprocess

    import redis

    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is needed on PATH")
        pytest.skip("no redis-server on PATH")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url)
    try:
        wait_for(lambda: _ping(r), 10, "the private redis-server")
        yield url
    finally:
        r.close()
        proc.terminate()
        proc.wait(10)


def _ping(r) -> bool:
    import redis

    try:
        return bool(r.ping())
    except redis.ConnectionError:
        return False


def _fill(url: str) -> None:
    """Make the private Redis refuse writes with an error reply: a read-only replica of an unreachable master
    (what a client still connected to a demoted master sees after a failover)."""
    import socket

    import redis

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    r = redis.Redis.from_url(url)
    r.execute_command("REPLICAOF", "127.0.0.1", str(dead))
    with pytest.raises(redis.exceptions.ReadOnlyError):
        r.set("probe", "x")
    r.close()


def _free(url: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    r.execute_command("REPLICAOF", "NO", "ONE")
    r.close()


def test_worker_retries_a_redis_error_reply_and_keeps_running(private_redis, redis_url, namespace):
    from cachesync.bus.redis_streams import RedisStreamsBus

    url = private_redis
    cache = cachesync.Cache(url, namespace=namespace)
    bus = RedisStreamsBus(redis_url, "csh" + uuid.uuid4().hex[:10])
    cache.set("w:1", "cached")
    _fill(url)
    w = Worker(bus, cache, group="g", backoff=0.01, max_backoff=0.05, max_attempts=1000)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            w.run(stop, timeout=0.05)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        bus.publish([Invalidation(("w:1",), "3")])
        wait_for(lambda: w.stats["retries"] >= 2 or errors, 30, "retries of the error reply")
        assert not errors and t.is_alive()
        _free(url)
        wait_for(lambda: invalidated(cache, "w:1") or errors, 30, "the invalidation once Redis is writable")
        assert not errors and w.stats["dead"] == 0
    finally:
        stop.set()
        t.join(15)
        bus.destroy()
        bus.close()
        cache.close()


def test_relay_keeps_rows_on_a_redis_error_reply(private_redis, tmp_path, namespace):
    url = private_redis
    db = f"sqlite:///{tmp_path}/oom.db"
    ob = Outbox("cachesync_outbox")
    conn = connect(db)
    ob.init(conn)
    cache = cachesync.Cache(url, namespace=namespace)
    cache.set("r:1", "cached")
    ob.record(conn, "r:1", version=2)
    conn.commit()
    _fill(url)
    relay = Relay(db, cache)
    import redis

    with pytest.raises((cachesync.RedisCommandError, cachesync.InvalidationError, redis.exceptions.RedisError)):
        relay.run_once()  # a delivery failure: recorded on the row, retried (not a database error)
    cur = conn.cursor()
    cur.execute("SELECT attempts, last_error FROM cachesync_outbox")
    attempts, err = cur.fetchone()
    conn.commit()
    assert attempts == 1 and "read only replica" in err
    _free(url)
    assert relay.drain() == 1 and invalidated(cache, "r:1")
    relay.close()
    cache.close()
    conn.close()


def test_cdc_retries_a_redis_error_reply(private_redis, pg_url, namespace, tmp_path) -> None:
    url = private_redis
    cache = cachesync.Cache(url, namespace=namespace, tombstone_ttl=120)
    e = Env(_Pg(), pg_url, cache, tmp_path)
    try:
        r = e.start()
        cache.set("u:1", "cached")
        _fill(url)
        e.write(f"INSERT INTO {e.table} VALUES (1, 'a@x', 'A')")
        wait_for(lambda: r.stats["redis_retries"] >= 2 or e.error, 30, "retries of the error reply")
        assert e.error is None
        _free(url)
        e.wait_keys("u:1", "e:a@x")
    finally:
        e.close()
        cache.close()


def test_cdc_inline_never_acknowledges_a_commit_redis_refused(private_redis, pg_url, namespace, tmp_path) -> None:
    """PostgreSQL is read in the runner's thread: while Redis refuses a commit's invalidation, neither the
    checkpoint nor the slot's confirmed position moves past that commit (a restart would read it again); once
    Redis accepts, both do."""
    import psycopg

    url = private_redis
    cache = cachesync.Cache(url, namespace=namespace, tombstone_ttl=120)
    e = Env(_Pg(), pg_url, cache, tmp_path)
    e.runner_kw = {"checkpoint_in_background": False}
    slot_sql = "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s"
    try:
        r = e.start()
        assert e.source is not None and e.source.inline
        e.write(f"INSERT INTO {e.table} VALUES (1, 'a@x', 'A')")
        e.wait_keys("u:1")
        _fill(url)
        lsn = "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"
        with psycopg.connect(pg_url, autocommit=True) as c:
            (before,) = c.execute(lsn).fetchone()
            e.write(f"INSERT INTO {e.table} VALUES (2, 'b@x', 'B')")
            (after,) = c.execute(lsn).fetchone()  # past that commit
            wait_for(lambda: r.stats["redis_retries"] >= 3 or e.error, 30, "retries of the refused invalidation")
            assert e.error is None
            assert int(r.position["lsn"]) < after
            (confirmed,) = c.execute(slot_sql, (e.slot,)).fetchone()  # type: ignore[attr-defined]
            assert int(confirmed) < after
            _free(url)
            e.wait_keys("u:2", "e:b@x")
            wait_for(lambda: int(r.position["lsn"]) > before or e.error, 30, "the checkpoint past it")
            assert e.error is None
    finally:
        e.close()
        cache.close()


@pytest.mark.parametrize("n", [3, 2 * P.INVALIDATE_CHUNK + 3])  # one script call; several, pipelined
def test_an_invalidation_redis_refuses_names_its_keys(private_redis, namespace, n) -> None:
    """An error reply (a read-only replica after a failover, OOM) to an invalidation is an InvalidationError
    naming every key not invalidated, counted in invalidations_failed, never reported done; WritePath's
    on_invalidation_error="log" then logs it (the commit stands) instead of raising a RedisCommandError."""
    from cachesync import WritePath

    url = private_redis
    cache = cachesync.Cache(url, namespace=namespace)
    keys = [f"k{i}" for i in range(n)]
    cache.set(keys[0], "cached")
    _fill(url)
    try:
        with pytest.raises(cachesync.InvalidationError, match="read only") as ei:
            cache.invalidate_many([(keys, 3)])
        assert list(ei.value.keys) == keys
        assert cache.stats["invalidations_failed"] == n and cache.stats["invalidations"] == 0
        wp = WritePath(cache, Outbox("cachesync_outbox"))
        assert wp.invalidate_committed([(keys, 4)]) is False  # logged, not raised
    finally:
        _free(url)
    assert cache.invalidate_many([(keys, 3)]) == 1
    cache.close()
