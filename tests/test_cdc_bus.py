"""CDC -> bus -> worker end to end (``cachesync cdc --bus``), on Redis Streams and on NATS JetStream.

The runner publishes the keys of each committed transaction instead of invalidating them; a
:class:`cachesync.bus.worker.Worker` applies them. The checkpoint moves only after ``publish`` returned: with the
bus unreachable nothing is checkpointed. Real PostgreSQL (shared server, own slot), real Redis / NATS.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import cachesync
from cachesync.bus import Bus, open_bus
from cachesync.bus.worker import Worker
from test_cdc_conformance import Env, tombstoned, wait_for
import test_cdc_postgres
from test_outbox import free_port


@pytest.fixture(params=["redis", "nats", "rabbitmq"])
def bus_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue({"redis": "redis_url", "nats": "nats_url", "rabbitmq": "amqp_url"}[request.param]))


@pytest.fixture
def bus(bus_url: str) -> Iterator[Bus]:
    b = open_bus(bus_url, "cscdc" + uuid.uuid4().hex[:10], claim_idle=1.0)
    yield b
    b.destroy()
    b.close()


@pytest.fixture
def env(pg_url: str, redis_url: str, namespace: str, tmp_path: Path) -> Iterator[Env]:
    cache = cachesync.Cache(redis_url, namespace=namespace, tombstone_ttl=120)
    e = Env(test_cdc_postgres.TestPostgresConformance(), pg_url, cache, tmp_path)
    try:
        yield e
    finally:
        e.close()
        cache.close()


def test_cdc_publishes_and_worker_applies(env: Env, bus: Bus, bus_url: str, redis_url: str) -> None:
    env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
    wcache = cachesync.Cache(redis_url, namespace=env.cache.ctx.ns)
    env.cache.set("u:1", "cached")
    env.runner_kw = {"bus": bus}
    r = env.start()
    # a worker with its own bus connection (buses are not thread-safe), as `cachesync worker` would run
    wbus = open_bus(bus_url, bus.name)
    stop = threading.Event()
    w = Worker(wbus, wcache, group="g", consumer="w1")
    wt = threading.Thread(target=w.run, args=(stop, 0.2), daemon=True)
    wt.start()
    try:
        env.write(f"UPDATE {env.table} SET email = 'b@x' WHERE id = 1")
        env.write(f"INSERT INTO {env.table} VALUES (2, 'c@x', 'C')", f"DELETE FROM {env.table} WHERE id = 1")
        env.wait_keys("u:1", "e:a@x", "e:b@x", "u:2", "e:c@x")
        # the runner counts a batch once its publish has returned; the worker may apply it before that
        wait_for(lambda: r.stats["published"] >= 1 and r.stats["keys"] >= 5, 10, "the runner's stats")
        wait_for(lambda: w.stats["keys"] >= 5, 10, "the worker's stats")
        wait_for(lambda: r.stats["checkpoints"] >= 1, 10, "a checkpoint after publishing")
    finally:
        stop.set()
        wt.join(10)
        wbus.close()
        wcache.close()


def test_nothing_checkpointed_while_bus_is_down(env: Env, namespace: str) -> None:
    down = open_bus(f"redis://127.0.0.1:{free_port()}/0", "cscdc" + uuid.uuid4().hex[:8])
    env.runner_kw = {"bus": down, "reconnect_max_delay": 0.05}
    r = env.start()
    start = dict(r.position or {})
    env.write(f"INSERT INTO {env.table} VALUES (1, 'a@x', 'A')")
    wait_for(lambda: r.stats["redis_retries"] >= 3, 20, "publish retries")
    assert r.stats["checkpoints"] == 0 and r.position == start
    assert env.cp.load("postgresql", env.source.ident) == start  # type: ignore[union-attr]
    assert not tombstoned(env.cache, "u:1")
    r.stop()
    assert env.thread is not None
    env.thread.join(15)
    env.runner = env.thread = None
    assert env.cp.load("postgresql", env.source.ident) == start  # type: ignore[union-attr]
    down.close()
