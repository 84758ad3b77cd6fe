"""The conformance suite of a :class:`cachesync.bus.Bus` (needs pytest): subclass :class:`BusConformance`.

::

    import pytest
    from cachesync.testing import BusConformance

    class TestMyBus(BusConformance):
        @pytest.fixture(autouse=True)
        def _url(self) -> None:
            self.url = "mybus://127.0.0.1:7000"

        def make_bus(self, name: str, claim_idle: float) -> MyBus:
            return MyBus(self.url, name, claim_idle=claim_idle)

Every test gets a fresh bus from :meth:`BusConformance.make_bus` (a new stream name each time), destroyed and
closed afterwards. See docs/testing.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest

from ..bus import Bus, BusError, Invalidation
from ..errors import BadDataError
from ._util import wait_for

__all__ = ["BusConformance"]


class BusConformance:
    """Base class of a bus's conformance tests; subclasses implement :meth:`make_bus`.

    Hooks (methods a subclass may override): :meth:`make_bus` (required), :meth:`stream_name` (default: ``"cst"``
    + 10 random hex digits), :meth:`claim_idle` (default 0.3 s) and :meth:`teardown_bus` (default:
    ``bus.destroy(); bus.close()``).
    """

    def make_bus(self, name: str, claim_idle: float) -> Bus:
        """A new bus on stream/queue ``name`` whose unacknowledged deliveries may be taken over by another
        consumer after ``claim_idle`` seconds."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_bus(name, claim_idle)")

    def stream_name(self) -> str:
        """The stream name of one test's bus: unique, so that tests (and concurrent runs) never share one."""
        return "cst" + uuid.uuid4().hex[:10]

    def claim_idle(self) -> float:
        """``claim_idle`` (seconds) passed to :meth:`make_bus`; the takeover tests wait at most 10 s for it."""
        return 0.3

    def teardown_bus(self, bus: Bus) -> None:
        """Remove what the test left on the server and close the bus."""
        try:
            bus.destroy()
        finally:
            bus.close()

    @pytest.fixture
    def bus(self) -> Iterator[Bus]:
        b = self.make_bus(self.stream_name(), self.claim_idle())
        yield b
        self.teardown_bus(b)

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
        got = wait_for(lambda: bus.consume("g", "c", 10, 0.2), 10, "redelivery")
        assert got[0].message.keys == ("r",) and got[0].attempts == 2
        bus.ack(got)

    def test_unacked_taken_over_by_another_consumer(self, bus: Bus) -> None:
        bus.publish([Invalidation(("dead",))])
        (d,) = bus.consume("g", "dying", 10, 2.0)  # consumed, never acked: the consumer "died"
        got = wait_for(lambda: bus.consume("g", "heir", 10, 0.2), 10, "takeover")
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
            Invalidation(cast(Any, "abc"))  # a string, not a sequence of keys
        with pytest.raises(BadDataError):  # data from the wire: not the caller's misuse
            Invalidation.decode(b"not json")
