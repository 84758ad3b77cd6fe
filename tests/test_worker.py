"""Workers on every bus (Redis Streams, NATS JetStream, RabbitMQ): retries with exponential backoff, dead letters
with the reason, takeover of a dead consumer's messages, rule fan-out, and outbox -> relay -> bus -> worker end to
end."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

import cachesync
from cachesync.bus import Bus, Delivery, Invalidation
from cachesync.bus.worker import Worker
from cachesync.db import connect
from cachesync.outbox import Outbox
from cachesync.outbox.relay import Relay
from cachesync.rules import Rules
from test_outbox import PrivateRedis, free_port, invalidated, wait_for

RULES = Rules({"users": ["user:{id}", "user_by_email:{email}", "users:count"]})


@pytest.fixture(params=["redis", "nats", "rabbitmq"])
def bus(request) -> Iterator[Bus]:
    name = "csw" + uuid.uuid4().hex[:10]
    if request.param == "redis":
        from cachesync.bus.redis_streams import RedisStreamsBus

        b: Bus = RedisStreamsBus(request.getfixturevalue("redis_url"), name, claim_idle=0.3)
    elif request.param == "nats":
        from cachesync.bus.nats_jetstream import NatsJetStreamBus

        b = NatsJetStreamBus(request.getfixturevalue("nats_url"), name, claim_idle=0.3)
    else:
        from cachesync.bus.rabbitmq import RabbitMQBus

        b = RabbitMQBus(request.getfixturevalue("amqp_url"), name, claim_idle=0.3)
    yield b
    b.destroy()
    b.close()


def drain(w: Worker, until) -> None:
    wait_for(lambda: (w.run_once(0.1), until())[1], 30, "the worker")


def test_fan_out_through_rules(bus, cache):
    keys = ["user:1", "user_by_email:old@x", "user_by_email:new@x", "users:count", "extra"]
    for k in keys:
        cache.set(k, "v")
    bus.publish([Invalidation(table="users", old={"id": 1, "email": "old@x"}, new={"id": 1, "email": "new@x"}),
                 Invalidation(("extra",), "5")])
    w = Worker(bus, cache, RULES, group="g")
    drain(w, lambda: w.stats["messages"] == 2)
    assert all(invalidated(cache, k) for k in keys)
    assert w.stats["keys"] == 5


def test_retry_with_backoff_then_dead_letter(bus, namespace):
    down = cachesync.Cache(f"redis://127.0.0.1:{free_port()}/0", namespace=namespace, connect_timeout=0.2,
                           socket_timeout=0.2)
    retries: list[tuple[int, float]] = []
    dead: list[tuple[Delivery, str]] = []
    w = Worker(bus, down, group="g", max_attempts=3, backoff=0.01, max_backoff=1.0,
               on_retry=lambda d, delay, e: retries.append((d.attempts, delay)),
               on_dead=lambda d, reason: dead.append((d, reason)))
    bus.publish([Invalidation(("k1",))])
    drain(w, lambda: bool(dead))
    assert retries == [(1, 0.01), (2, 0.02)]  # exponential
    (dl,) = bus.dead_letters()
    assert dl.message.keys == ("k1",) and dl.attempts == 3
    assert "InvalidationError after 3 attempts" in dl.reason and "k1" in dl.reason
    down.close()


def test_unusable_message_dead_lettered_at_once(bus, cache):
    """A change the rules can only partly turn into keys: the keys it can form are invalidated, then the message
    is dead-lettered at once naming what could not (not retried, not silently acked)."""
    cache.set("user_by_email:no-id@x", "cached")
    w = Worker(bus, cache, RULES, group="g")
    bus.publish([Invalidation(table="users", new={"email": "no-id@x"})])  # rule needs {id}
    drain(w, lambda: w.stats["dead"] == 1)
    (dl,) = bus.dead_letters()
    assert "BadDataError" in dl.reason and "['id']" in dl.reason and "user:{id}" in dl.reason
    assert cache.peek("user_by_email:no-id@x").get("v") is None and w.stats["skipped"] == 1


def test_takeover_of_dead_consumer(bus, cache):
    cache.set("t:1", "v")
    bus.publish([Invalidation(("t:1",))])
    assert len(bus.consume("g", "dead-consumer", 10, 2.0)) == 1  # taken, never acked
    w = Worker(bus, cache, group="g", consumer="heir")
    drain(w, lambda: w.stats["messages"] == 1)
    assert invalidated(cache, "t:1")


def test_outbox_relay_bus_worker_end_to_end(bus, pg_url, cache):
    table = "cachesync_outbox_" + uuid.uuid4().hex[:10]
    ob = Outbox(table)
    conn = connect(pg_url)
    ob.init(conn)
    for i in range(50):
        cache.set(f"e:{i}", "v")
        ob.record(conn, f"e:{i}", version=i)
    conn.commit()
    relay = Relay(pg_url, bus=bus, table=table)
    assert relay.drain() == 50
    assert not invalidated(cache, "e:0")  # published, not applied by the relay
    w = Worker(bus, cache, group="g")
    drain(w, lambda: w.stats["messages"] == 50)
    assert all(invalidated(cache, f"e:{i}") for i in range(50))
    relay.close()
    ob.drop(conn)
    conn.close()


def test_worker_run_stops(bus, cache):
    w = Worker(bus, cache, group="g")
    stop = threading.Event()
    t = threading.Thread(target=w.run, args=(stop, 0.05))
    t.start()
    bus.publish([Invalidation(("s:1",))])
    wait_for(lambda: w.stats["messages"] == 1, 30, "the worker")
    stop.set()
    t.join()


def test_redis_streams_group_lost_with_the_stream_is_recreated(redis_url, cache):
    """The bus Redis lost the stream and its group (a restart without AOF, a DEL): the worker's next consume
    recreates the group and applies what was published since. (XREADGROUP answered NOGROUP, a ResponseError the
    worker does not retry: Worker.run died, and no invalidation was applied any more.)"""
    import redis as redis_lib

    from cachesync.bus.redis_streams import RedisStreamsBus

    name = "csw" + uuid.uuid4().hex[:10]
    b = RedisStreamsBus(redis_url, name, claim_idle=0.3)
    r = redis_lib.Redis.from_url(redis_url)
    try:
        w = Worker(b, cache, group="g")
        assert w.run_once(0.01) == 0  # the group exists now
        r.delete(name)  # the stream and its group are gone
        cache.set("k", "v")
        b.publish([Invalidation(("k",), None)])
        drain(w, lambda: w.stats["messages"] == 1)
        assert invalidated(cache, "k")
    finally:
        b.destroy()
        b.close()
        r.close()


@pytest.fixture
def bus_redis() -> Iterator[PrivateRedis]:
    """A redis-server of our own for the bus (its maxmemory is changed: never the shared one)."""
    pr = PrivateRedis()
    pr.start()
    yield pr
    pr.close()


def test_redis_streams_bus_out_of_memory_is_an_outage_the_worker_waits_out(bus_redis, cache):
    """The bus Redis is full (maxmemory, noeviction) or read-only (a failover to a replica): its errors are
    BusUnavailableError, which Worker.run backs off and retries. (They were plain ResponseErrors: Worker.run,
    which retries only BusUnavailableError, died, and a full bus Redis stopped every worker.)"""
    import redis as redis_lib

    from cachesync.bus import BusUnavailableError
    from cachesync.bus.redis_streams import RedisStreamsBus

    admin = redis_lib.Redis.from_url(bus_redis.url)
    b = RedisStreamsBus(bus_redis.url, "csw" + uuid.uuid4().hex[:10], claim_idle=0.3)
    try:
        w = Worker(b, cache, group="g")
        assert w.run_once(0.01) == 0
        cache.set("k", "v")
        b.publish([Invalidation(("k",), None)])
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")
        with pytest.raises(BusUnavailableError, match="OutOfMemoryError"):
            w.run_once(0.01)
        with pytest.raises(BusUnavailableError, match="OutOfMemoryError"):
            b.publish([Invalidation(("k",), None)])
        admin.config_set("maxmemory", "0")
        drain(w, lambda: w.stats["messages"] == 1)
        assert invalidated(cache, "k")
    finally:
        admin.config_set("maxmemory", "0")
        b.destroy()
        b.close()
        admin.close()


def test_a_row_with_more_keys_than_one_bus_message_holds_is_published_in_parts(bus, tmp_path, cache):
    """A row naming 20 000 long keys (a TRUNCATE's prefixes resolve to every key present; 1.4 MB of JSON): more
    than one NATS message may carry (max_payload, 1 MiB by default). The relay publishes the keys in several
    messages, and the worker applies them all. (One message per row: the publish failed with MaxPayloadError, a
    BusUnavailableError, so the relay retried the batch forever and no row behind it was delivered.)"""
    url = f"sqlite:///{tmp_path}/big.db"
    table = "cachesync_outbox_" + uuid.uuid4().hex[:10]
    ob = Outbox(table)
    conn = connect(url)
    ob.init(conn)
    keys = [f"big:{i:064d}" for i in range(20_000)]
    cache.set(keys[0], "v")
    cache.set(keys[-1], "v")
    cache.set("after", "v")
    ob.record(conn, *keys)
    ob.record(conn, "after")
    conn.commit()
    relay = Relay(url, bus=bus, table=table)
    try:
        assert relay.drain() == 2
    finally:
        relay.close()
    w = Worker(bus, cache, group="g", batch_size=100)
    drain(w, lambda: invalidated(cache, keys[0]) and invalidated(cache, keys[-1]) and invalidated(cache, "after"))
    assert w.stats["keys"] >= len(keys) + 1
    ob.drop(conn)
    conn.close()


def test_redis_streams_bus_url_query_options_do_not_change_its_protocol(redis_url, cache):
    """``?decode_responses=true`` / ``?protocol=3`` in the bus URL (copied from an application's Redis URL): the
    bus still reads RESP2 bytes. (decode_responses made every message look as if it had no 'm' field: each was
    dead-lettered with an empty body, its invalidation lost; protocol=3 made consume raise ValueError.)"""
    from cachesync.bus.redis_streams import RedisStreamsBus

    sep = "&" if "?" in redis_url else "?"
    b = RedisStreamsBus(f"{redis_url}{sep}decode_responses=true&protocol=3", "csw" + uuid.uuid4().hex[:10],
                        claim_idle=0.3)
    try:
        cache.set("k", "v")
        b.publish([Invalidation(("k",), "7")])
        w = Worker(b, cache, group="g")
        drain(w, lambda: w.stats["messages"] == 1)
        assert invalidated(cache, "k")
        assert w.stats["dead"] == 0 and b.malformed == 0 and b.dead_letters() == []
    finally:
        b.destroy()
        b.close()
