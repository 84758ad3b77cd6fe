"""Our buses pass the shipped conformance suite (cachesync.testing.BusConformance, docs/testing.md); RabbitMQ adds
its own checks."""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest

from cachesync.bus import Bus, BusError, BusUnavailableError, Invalidation, open_bus
from cachesync.testing import BusConformance, free_port, wait_for


class TestRedisStreamsBus(BusConformance):
    @pytest.fixture(autouse=True)
    def _url(self, redis_url: str) -> None:
        self.url = redis_url

    def make_bus(self, name: str, claim_idle: float) -> Bus:
        from cachesync.bus.redis_streams import RedisStreamsBus

        return RedisStreamsBus(self.url, name, claim_idle=claim_idle)


class TestNatsJetStreamBus(BusConformance):
    @pytest.fixture(autouse=True)
    def _url(self, nats_url: str) -> None:
        self.url = nats_url

    def make_bus(self, name: str, claim_idle: float) -> Bus:
        from cachesync.bus.nats_jetstream import NatsJetStreamBus

        return NatsJetStreamBus(self.url, name, claim_idle=claim_idle)


def _broker_sockets(port: int) -> set[int]:
    """File descriptors of this process's TCP connections to ``port``."""
    out = set()
    for entry in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=os.dup(int(entry)))
        except (OSError, ValueError):
            continue
        try:
            peer = s.getpeername()
            if s.type == socket.SOCK_STREAM and isinstance(peer, tuple) and peer[1] == port:
                out.add(int(entry))
        except OSError:
            pass
        finally:
            s.close()
    return out


class TestRabbitMQBus(BusConformance):
    @pytest.fixture(autouse=True)
    def _url(self, amqp_url: str) -> None:
        self.url = amqp_url

    def make_bus(self, name: str, claim_idle: float) -> Bus:
        from cachesync.bus.rabbitmq import RabbitMQBus

        return RabbitMQBus(self.url, name, claim_idle=claim_idle)

    def _raw(self):  # a plain pika connection: a foreign publisher, and to look at the broker's state
        import pika

        return pika.BlockingConnection(pika.URLParameters(self.url))

    def _exists(self, conn, queue: str | None = None, exchange: str | None = None) -> bool:
        import pika.exceptions

        ch = conn.channel()
        try:
            if queue is not None:
                ch.queue_declare(queue, passive=True)
            else:
                ch.exchange_declare(exchange, passive=True)
            return True
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 404
            return False
        finally:
            if ch.is_open:
                ch.close()

    def test_backlog_goes_to_the_first_group_later_groups_see_later_messages(self, bus: Bus) -> None:
        bus.publish([Invalidation(("early",))])  # no group queue yet: kept in the backlog
        d1 = bus.consume("first", "c", 10, 2.0)
        assert [d.message.keys for d in d1] == [("early",)]
        bus.ack(d1)
        assert bus.consume("later", "c", 10, 0.05) == []  # its queue exists from now on
        bus.publish([Invalidation(("late",))])
        for g in ("first", "later"):
            ds = bus.consume(g, "c", 10, 2.0)
            assert [d.message.keys for d in ds] == [("late",)]
            bus.ack(ds)

    def test_groups_declared_at_open_get_every_message(self) -> None:
        from cachesync.bus.rabbitmq import RabbitMQBus

        name = "cst" + uuid.uuid4().hex[:10]
        producer = RabbitMQBus(self.url, name, groups=["a", "b"])
        try:
            producer.publish([Invalidation(("k",))])
            consumer = RabbitMQBus(self.url, name)  # another process's bus
            for g in ("a", "b"):
                ds = consumer.consume(g, "c", 10, 2.0)
                assert [d.message.keys for d in ds] == [("k",)]
                consumer.ack(ds)
            consumer.close()
        finally:
            producer.destroy()
            producer.close()

    def test_nack_without_delay_goes_to_the_end_of_the_queue(self, bus: Bus) -> None:
        bus.publish([Invalidation(("a",)), Invalidation(("b",))])
        (a,) = bus.consume("g", "c", 1, 2.0)
        bus.nack(a, 0)
        got = bus.consume("g", "c", 10, 2.0)
        if len(got) < 2:
            got += bus.consume("g", "c", 10, 2.0)
        assert [(d.message.keys, d.attempts) for d in got] == [(("b",), 1), (("a",), 2)]
        bus.ack(got)

    def test_delayed_message_waits_and_destroy_from_another_bus_removes_every_queue(self) -> None:
        from cachesync.bus.rabbitmq import RabbitMQBus, delay_bucket

        name = "cst" + uuid.uuid4().hex[:10]
        bus = RabbitMQBus(self.url, name, claim_idle=0.3)
        bus.publish([Invalidation(("d",))])
        (d,) = bus.consume("g", "c", 10, 2.0)
        bus.nack(d, 60)
        assert bus.consume("g", "c", 10, 0.05) == []  # parked for a minute
        queues = [f"{name}.g.g", f"{name}.delay.{delay_bucket(60_000)}", f"{name}.backlog", f"{name}.dead",
                  f"{name}.queues"]
        exchanges = [name, f"{name}.backlog", f"{name}.delay"]
        conn = self._raw()
        try:
            assert all(self._exists(conn, queue=q) for q in queues)
            other = RabbitMQBus(self.url, name)  # knows the group and delay queues only from the registry
            other.destroy()
            other.close()
            assert not any(self._exists(conn, queue=q) for q in queues)
            assert not any(self._exists(conn, exchange=x) for x in exchanges)
        finally:
            conn.close()
            bus.close()

    def test_delay_buckets(self) -> None:
        from cachesync.bus.rabbitmq import delay_bucket

        assert [delay_bucket(ms) for ms in (1, 2, 3, 10, 20, 100, 30_000)] == [0, 2, 3, 6, 8, 13, 29]
        assert delay_bucket(2**31 - 1) == 61 and delay_bucket(2**40) == 62

    def test_dead_letters_stay_and_undecodable_messages_are_parked(self, bus: Bus) -> None:
        conn = self._raw()
        try:
            bus.consume("g", "c", 10, 0)  # the group queue exists
            conn.channel().basic_publish(bus.name, "", b"not json")  # a foreign publisher
            bus.publish([Invalidation(("p",), "9")])
            got = bus.consume("g", "c", 10, 2.0)
            assert [d.message.keys for d in got] == [("p",)]  # the undecodable one went to the dead letters
            bus.dead_letter(got[0], "boom")
            for _ in range(2):  # inspecting leaves them in place; the undecodable one is listed with its body
                dls = bus.dead_letters()
                assert [(dl.message.keys, dl.reason, dl.attempts) for dl in dls if dl.message] == [(("p",), "boom", 1)]
                assert [(dl.body, dl.reason.split(":")[0]) for dl in dls if not dl.message] == [
                    (b"not json", "BadDataError")]
            ch = conn.channel()
            assert ch.queue_declare(f"{bus.name}.dead", passive=True).method.message_count == 2
            ch.close()
        finally:
            conn.close()

    def test_late_ack_nack_dead_letter_of_a_taken_over_delivery_are_ignored(self, bus: Bus) -> None:
        bus.publish([Invalidation(("t",))])
        (d,) = bus.consume("g", "slow", 10, 2.0)
        got = wait_for(lambda: bus.consume("g", "heir", 10, 0.2), 10, "takeover")
        bus.ack([d])
        bus.nack(d, 0)
        bus.dead_letter(d, "late")
        assert bus.consume("g", "other", 10, 0.05) == []  # the heir still holds it
        bus.ack(got)
        assert bus.consume("g", "heir", 10, 0.05) == [] and bus.dead_letters() == []

    def test_bad_urls_and_options(self) -> None:
        from cachesync.bus.rabbitmq import RabbitMQBus

        for url in ("http://127.0.0.1", "127.0.0.1:5672"):
            with pytest.raises(BusError, match="amqp://"):
                RabbitMQBus(url)
        with pytest.raises(BusError, match="nosuch") as e:
            RabbitMQBus("amqp://guest:s3cret@127.0.0.1:5672/%2F?nosuch=1")
        assert "s3cret" not in str(e.value)
        with pytest.raises(BusError, match="must start with") as e:
            open_bus("guest:s3cret@127.0.0.1:5672")
        assert "s3cret" not in str(e.value)
        for kw in ({"name": "amq.x"}, {"name": ""}, {"name": "a b"}, {"claim_idle": 0}, {"timeout": -1},
                   {"groups": "g"}, {"groups": ["a.b"]}):
            with pytest.raises(BusError):
                RabbitMQBus(self.url, **kw)
        b = open_bus(self.url, "cst" + uuid.uuid4().hex[:10])
        try:
            assert isinstance(b, RabbitMQBus)
            for args in (("a.b", "c"), ("g", ""), ("g", "c", 0)):
                with pytest.raises(BusError):
                    b.consume(*args)
        finally:
            b.destroy()
            b.close()

    def test_unreachable_or_refused_names_the_url_without_the_password(self) -> None:
        from cachesync.bus.rabbitmq import RabbitMQBus

        port = free_port()
        with pytest.raises(BusUnavailableError) as e:
            RabbitMQBus(f"amqp://guest:s3cretpw@127.0.0.1:{port}/%2F", timeout=2)
        assert f"amqp://guest:***@127.0.0.1:{port}/%2F" in str(e.value) and "s3cretpw" not in str(e.value)
        p = urlsplit(self.url)
        with pytest.raises(BusUnavailableError) as e:
            RabbitMQBus(f"amqp://{p.username or 'guest'}:wr0ng-s3cret@{p.hostname}:{p.port or 5672}{p.path}")
        assert "wr0ng-s3cret" not in str(e.value) and "***" in str(e.value)

    @pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
    def test_publish_and_consume_recover_from_a_lost_connection(self) -> None:
        from cachesync.bus.rabbitmq import RabbitMQBus

        port = urlsplit(self.url).port or 5672
        before = _broker_sockets(port)
        bus = RabbitMQBus(self.url, "cst" + uuid.uuid4().hex[:10], claim_idle=0.3)
        try:
            bus.consume("g", "c", 10, 0)  # both connections are open
            mine = _broker_sockets(port) - before
            assert len(mine) == 2
            for fd in mine:  # the network goes away under both connections
                with socket.socket(fileno=os.dup(fd)) as s:
                    s.shutdown(socket.SHUT_RDWR)
            bus.publish([Invalidation(("x",))])  # retried once on a new connection
            got = bus.consume("g", "c", 10, 2.0)
            assert [d.message.keys for d in got] == [("x",)]
            bus.ack(got)
        finally:
            bus.destroy()
            bus.close()
