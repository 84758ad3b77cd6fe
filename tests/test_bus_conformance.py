"""The bus conformance suite: every bus implementation subclasses BusConformance and provides make_bus()."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from cachesync.bus import Bus, BusError, Invalidation
from test_outbox import wait_for


class BusConformance:
    """Subclass, set ``make_bus(name, claim_idle)``; every test uses a fresh stream, destroyed afterwards."""

    def make_bus(self, name: str, claim_idle: float) -> Bus:
        raise NotImplementedError

    @pytest.fixture
    def bus(self) -> Iterator[Bus]:
        b = self.make_bus("cst" + uuid.uuid4().hex[:10], 0.3)
        yield b
        b.destroy()
        b.close()

    def test_publish_consume_ack(self, bus: Bus) -> None:
        msgs = [Invalidation(("a", "b"), "3"), Invalidation(table="users", old={"id": 1}, new={"id": 1, "x": 2})]
        bus.publish(msgs)
        got = bus.consume("g", "c1", 10, 2.0)
        assert [d.message for d in got] == msgs
        assert all(d.attempts == 1 and d.group == "g" for d in got)
        bus.ack(got)
        assert bus.consume("g", "c1", 10, 0.05) == []

    def test_groups_each_get_every_message(self, bus: Bus) -> None:
        bus.publish([Invalidation(("k",))])
        d1 = bus.consume("g1", "c", 10, 2.0)
        assert [d.message.keys for d in d1] == [("k",)]
        bus.ack(d1)
        # a group created later still reads from the start of the stream (unless already deleted on ack)
        assert bus.consume("g1", "c", 10, 0.05) == []

    def test_batch_limit_and_order(self, bus: Bus) -> None:
        bus.publish([Invalidation((f"k{i}",)) for i in range(25)])
        seen: list[str] = []
        while len(seen) < 25:
            ds = bus.consume("g", "c", 10, 2.0)
            assert 0 < len(ds) <= 10
            seen += [d.message.keys[0] for d in ds]
            bus.ack(ds)
        assert seen == [f"k{i}" for i in range(25)]

    def test_nack_redelivers_with_attempts(self, bus: Bus) -> None:
        bus.publish([Invalidation(("r",))])
        (d,) = bus.consume("g", "c", 10, 2.0)
        bus.nack(d, 0.05)
        got: list = []
        wait_for(lambda: got.extend(bus.consume("g", "c", 10, 0.2)) or got, 10, "redelivery")
        assert got[0].message.keys == ("r",) and got[0].attempts == 2
        bus.ack(got)

    def test_unacked_taken_over_by_another_consumer(self, bus: Bus) -> None:
        bus.publish([Invalidation(("dead",))])
        (d,) = bus.consume("g", "dying", 10, 2.0)  # consumed, never acked: the consumer "died"
        got: list = []
        wait_for(lambda: got.extend(bus.consume("g", "heir", 10, 0.2)) or got, 10, "takeover")
        assert got[0].message.keys == ("dead",)
        bus.ack(got)

    def test_dead_letter_with_reason(self, bus: Bus) -> None:
        bus.publish([Invalidation(("p",), "9")])
        (d,) = bus.consume("g", "c", 10, 2.0)
        bus.dead_letter(d, "boom: redis down")
        (dl,) = bus.dead_letters()
        assert dl.message == Invalidation(("p",), "9") and dl.reason == "boom: redis down" and dl.attempts == 1
        assert bus.consume("g", "c", 10, 0.05) == []

    def test_empty_consume_returns_nothing(self, bus: Bus) -> None:
        assert bus.consume("g", "c", 10, 0.05) == []

    def test_bad_message_rejected(self) -> None:
        with pytest.raises(BusError):
            Invalidation()
        with pytest.raises(BusError):
            Invalidation("abc")  # type: ignore[arg-type]
        with pytest.raises(BusError):
            Invalidation.decode(b"not json")


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
