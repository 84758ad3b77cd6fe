"""Message buses that carry invalidations from a producer (the outbox relay, CDC) to workers.

The interface is deliberately small so that other brokers (Kafka, ...) can be added; every implementation passes
the same conformance suite (:class:`cachesync.testing.BusConformance`, docs/testing.md)::

    bus.publish(batch)                       # durable when it returns; raises on failure (nothing acked)
    ds = bus.consume(group, consumer, max_messages=100, timeout=1.0)   # -> list[Delivery]
    bus.ack(ds)                              # after the invalidations were applied
    bus.nack(d, delay)                       # redeliver d after ``delay`` seconds, attempts + 1
    bus.dead_letter(d, reason)               # park d on the dead-letter stream with the reason
    bus.dead_letters(limit)                  # -> list[DeadLetter] (inspection)
    bus.close()

Delivery is at least once: a message consumed but not acked (the consumer died) is handed to another
consumer of the group after ``claim_idle`` seconds. Messages are :class:`Invalidation` objects: explicit
keys and/or a table change (``table`` + ``old``/``new`` row images) that a worker fans out to keys through
:class:`cachesync.rules.Rules`.

Implementations: :class:`cachesync.bus.redis_streams.RedisStreamsBus` (default; Redis Streams and consumer
groups), :class:`cachesync.bus.nats_jetstream.NatsJetStreamBus` (NATS JetStream) and
:class:`cachesync.bus.rabbitmq.RabbitMQBus` (RabbitMQ: a fanout exchange, one queue per group). :func:`open_bus`
opens one from a URL.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core import checked_keys, checked_version  # noqa: F401 (re-exported: they moved)
from ..errors import BadDataError, UsageError
from ..errors import BusError as BusError  # defined in errors.py, re-exported here
from ..errors import BusUnavailableError as BusUnavailableError
from .options import WorkerOptions, WorkerOptionsKwargs


@dataclass(frozen=True)
class Invalidation:
    """One invalidation message: explicit ``keys`` and/or a ``table`` change with ``old``/``new`` row images.

    ``version`` is the committed row version (raises the keys' version floor), ``None`` when unknown.
    """

    keys: tuple[str, ...] = ()
    version: str | None = None
    table: str | None = None
    old: Mapping[str, Any] | None = None
    new: Mapping[str, Any] | None = None
    traceparent: str | None = field(default=None, compare=False)
    """W3C trace context of the span that sent it (``cachesync.tracing``; wire field ``tp``, optional)."""

    def __post_init__(self) -> None:
        if isinstance(self.keys, str):
            raise BusError(f"Invalidation keys must be a sequence of keys, not the string {self.keys!r}")
        if not self.keys and self.table is None:
            raise BusError("an Invalidation needs keys or a table change")
        if self.table is not None and self.old is None and self.new is None:
            raise BusError(f"Invalidation of table {self.table!r} needs an old or a new row image")

    def encode(self) -> bytes:
        """The JSON wire form (row values that JSON lacks, e.g. datetimes, are sent as strings)."""
        d: dict[str, Any] = {}
        if self.keys:
            d["k"] = list(self.keys)
        if self.version is not None:
            d["v"] = self.version
        if self.table is not None:
            d["t"] = self.table
            if self.old is not None:
                d["o"] = dict(self.old)
            if self.new is not None:
                d["n"] = dict(self.new)
        if self.traceparent is not None:
            d["tp"] = self.traceparent
        return json.dumps(d, separators=(",", ":"), default=str).encode()

    @staticmethod
    def decode(data: bytes | str) -> Invalidation:
        """Inverse of :meth:`encode`; raises :class:`~cachesync.errors.BadDataError` for a malformed message
        (not UTF-8 JSON, not an object, ``k`` not a list of non-empty strings, ``v`` not a finite number or
        numeric string, ``t`` not a string, ``o``/``n`` not objects, neither keys nor a table change)."""
        try:
            d = json.loads(data)
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            ks = d.get("k", [])
            if not isinstance(ks, list):
                raise ValueError(f"keys ('k') must be a list of keys, not {type(ks).__name__} {ks!r:.80}")
            for k in ks:
                if not isinstance(k, str) or not k:
                    raise ValueError(f"every key ('k') must be a non-empty string, got {k!r:.80}")
            v = d.get("v")
            if v is not None:
                v = checked_version(v)
            t, o, n = d.get("t"), d.get("o"), d.get("n")
            if t is not None and not isinstance(t, str):
                raise ValueError(f"table ('t') must be a string, got {t!r:.80}")
            for name, img in (("o", o), ("n", n)):
                if img is not None and not isinstance(img, dict):
                    raise ValueError(f"row image ({name!r}) must be an object, got {img!r:.80}")
            tp = d.get("tp")  # optional trace context: anything but a short string is ignored, never fatal
            return Invalidation(tuple(ks), v, t, o, n, tp if isinstance(tp, str) and len(tp) <= 128 else None)
        except (ValueError, TypeError, RecursionError, UsageError) as e:  # UnicodeDecodeError is a ValueError
            raise BadDataError(f"malformed invalidation message {data[:200]!r}: {e}") from None




@dataclass
class Delivery:
    """A consumed message: ``id`` (bus specific), the :class:`Invalidation`, ``attempts`` (1 = first) and the
    consumer ``group`` it was delivered to."""

    id: str
    message: Invalidation
    attempts: int = 1
    group: str = ""
    raw: Any = field(default=None, repr=False)
    sent_at: float | None = field(default=None, compare=False)
    """When the message was first published, seconds since the epoch (NATS: the server's clock; RabbitMQ: the
    publisher's; None when the bus does not tell: the worker's consumer lag then reads the Redis Streams id)."""


@dataclass(frozen=True)
class DeadLetter:
    """A message parked after its last attempt, with the ``reason`` (the last error). ``message`` is ``None``
    for a message that could not be decoded; ``body`` is then its raw bytes (for an operator to inspect)."""

    message: Invalidation | None
    reason: str
    attempts: int
    body: bytes = b""


class Bus(abc.ABC):
    """The bus interface (see the module docstring). Implementations are thread-compatible, not thread-safe."""

    name: str
    malformed: int = 0
    """Messages this bus object found undecodable and dead-lettered itself while consuming (never delivered)."""

    @abc.abstractmethod
    def publish(self, batch: Sequence[Invalidation]) -> None:
        """Publish ``batch``; when this returns every message is stored durably by the bus. Raises otherwise."""

    @abc.abstractmethod
    def consume(self, group: str, consumer: str, max_messages: int = 100, timeout: float = 1.0) -> list[Delivery]:
        """Up to ``max_messages`` deliveries for ``consumer`` of ``group`` (created on first use, from the start
        of the stream), waiting at most ``timeout`` seconds; ``[]`` when none arrived. Includes messages whose
        ``nack`` delay has passed and messages of consumers idle for ``claim_idle`` seconds (takeover)."""

    @abc.abstractmethod
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge processed deliveries; they are not delivered again."""

    @abc.abstractmethod
    def nack(self, delivery: Delivery, delay: float) -> None:
        """Deliver ``delivery`` again after ``delay`` seconds with ``attempts + 1``."""

    @abc.abstractmethod
    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move ``delivery`` to the dead-letter stream with ``reason`` and acknowledge it."""

    @abc.abstractmethod
    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters (for inspection and tests)."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Delete the bus's streams (tests and teardown)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_bus(url: str, name: str = "cachesync", claim_idle: float = 30.0) -> Bus:
    """A bus from a URL: ``redis://...`` (Redis Streams, stream ``name``), ``nats://...`` (JetStream, stream
    ``name`` upper-cased, subject ``name.inv``) or ``amqp://...``/``amqps://...`` (RabbitMQ, fanout exchange
    ``name``, one queue ``name.g.<group>`` per group). ``claim_idle`` (default 30 s): seconds after which a
    message consumed but not acked is handed to another consumer of the group."""
    from .._driver import redact_url

    if not isinstance(url, str) or "://" not in url:
        shown = ("***@" + url.rsplit("@", 1)[1]) if isinstance(url, str) and "@" in url else url
        raise BusError(f"bus URL {shown!r} must start with redis://, rediss://, nats://, amqp:// or amqps://")
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "unix", "valkey", "valkeys"):
        from .redis_streams import RedisStreamsBus

        return RedisStreamsBus(url, name, claim_idle=claim_idle)
    if scheme in ("nats", "tls"):
        from .nats_jetstream import NatsJetStreamBus

        return NatsJetStreamBus(url, name, claim_idle=claim_idle)
    if scheme in ("amqp", "amqps"):
        from .rabbitmq import RabbitMQBus

        return RabbitMQBus(url, name, claim_idle=claim_idle)
    raise BusError(f"bus URL {redact_url(url)!r}: unknown scheme {scheme!r}; use redis://, nats:// or amqp://")


__all__ = ["Bus", "BusError", "BusUnavailableError", "DeadLetter", "Delivery", "Invalidation", "checked_keys", "checked_version",
           "open_bus", "WorkerOptions", "WorkerOptionsKwargs"]
