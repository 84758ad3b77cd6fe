"""RabbitMQ bus (AMQP 0-9-1, pika's blocking API): a fanout exchange with one durable queue per consumer group.

``RabbitMQBus(url, name)`` declares, for ``name`` (default ``cachesync``):

* the durable fanout exchange ``name``: ``publish`` sends every message there, so **every group gets every
  message** published while its queue exists;
* one durable queue per consumer group, ``name.g.<group>``, bound to it, declared on the group's first
  ``consume`` (or when the bus opens, for the groups given in ``groups=``);
* the backlog: exchange and queue ``name.backlog``, the exchange's ``alternate-exchange``. A message published
  while **no** group queue exists yet (the relay started before any worker) is kept there instead of being
  dropped, and the next group queue to be declared takes it over. So a single group (the usual deployment) sees
  every message from the first one. A group added later sees only messages published after its queue exists
  (RabbitMQ queues cannot be replayed): when several groups must all see everything from the start, open the
  producer's bus with ``groups=[...]`` or run each group's worker once before publishing;
* retries: the headers exchange ``name.delay`` and delay queues ``name.delay.<k>`` (see ``nack``);
* dead letters: the queue ``name.dead`` (headers ``cachesync-reason``, ``cachesync-attempts``,
  ``cachesync-group``);
* the registry ``name.queues``: the names of the group and delay queues created, so that ``destroy()`` (from
  any process) deletes them all.

Delivery guarantees:

* ``publish`` returns once RabbitMQ stored every message: durable exchange and queues, persistent messages
  (``delivery_mode=2``), all messages of a batch published in one AMQP transaction. RabbitMQ answers
  ``tx.commit-ok`` only after every message of the transaction was confirmed (its publisher-confirm machinery:
  written to disk by every queue it was routed to) and fails the commit if a queue rejected one — the same
  guarantee as waiting for a publisher confirm per message, without pika's blocking confirm mode waiting a
  round trip and a disk sync per message (``bench/bench_bus.py``: 16 ms per 100-message batch against 263 ms with per-message confirms, x0.062). A
  message no queue accepted (``mandatory`` returned, e.g. a bus destroyed meanwhile), a failed commit or an
  unreachable broker raise :class:`~cachesync.bus.BusUnavailableError` (naming the URL without its password);
  the caller publishes the batch again (duplicates are harmless, invalidations are idempotent).
* ``consume`` takes messages with ``basic.get`` (one round trip each, oldest first); when the queue is empty it
  waits for the next one with a short-lived ``basic.consume`` (prefetch 1, no polling), then takes the rest.
  ``attempts`` is 1 plus the header ``cachesync-attempts`` that ``nack`` sets (a redelivery after a takeover
  keeps the count). A message that is not an :class:`~cachesync.bus.Invalidation` is moved to the dead-letter
  queue at once (``dead_letters()`` lists it with ``message=None`` and its raw ``body``).
* ``ack`` commits the acks (synchronous: an error is raised, not lost).
* ``nack(d, delay)`` publishes a copy with ``cachesync-attempts`` and a per-message ``expiration`` of ``delay``
  to the delay queue of the delay's bucket, then acks the original. When the copy expires RabbitMQ dead-letters
  it through the default exchange, by its routing key, back to the group's queue (delay 0: straight back to the
  end of the group's queue). RabbitMQ expires per-message TTLs only at the head of a queue, so delays are
  bucketed (bucket ``k`` holds delays of ``2**(k/2)`` to ``2**((k+1)/2)`` ms; at most 62 buckets, delays are
  capped at 2**31 ms ~ 24.8 days): equal delays are exact, and a message waiting behind a longer delay of its
  bucket is late by less than 41 % of its own delay.
* ``dead_letter`` publishes the message to ``name.dead`` with the reason and attempts, then acks the original.
  ``dead_letters(limit)`` reads the oldest ``limit`` with ``basic.get`` on a channel of its own and closes it
  without acking: RabbitMQ puts them back at their positions (nothing is lost; another ``dead_letters()``
  running at the same moment in another process may miss the ones held by this one).

Takeover (``claim_idle``): unacked deliveries belong to the AMQP channel that received them, and RabbitMQ hands
them to another consumer only when that channel or connection closes — at once when the consuming process exits
or crashes, after the heartbeat timeout (the broker's, 60 s unless the URL sets ``heartbeat=``) when its host
vanishes or it stops calling the bus. Within one bus object (several consumer names on one connection, as the
conformance suite does) the bus enforces ``claim_idle`` itself: it remembers when each delivery was handed to
which consumer, and a ``consume`` by another consumer of the same group first requeues (``basic.reject``,
requeue) the deliveries that consumer has held unacked for ``claim_idle`` seconds or more; they go back to their
position at the head of the queue and are consumed next. A later ``ack``/``nack``/``dead_letter`` of such a
taken-over delivery (or of one received on a connection that has since been lost, which RabbitMQ requeued) is
ignored: the message is delivered again, at least once.

Errors: a bad URL or option raises :class:`~cachesync.bus.BusError`; a lost connection raises
:class:`~cachesync.bus.BusUnavailableError` and the next call reconnects (``publish`` and ``consume`` retry
once on a fresh connection when the one they found had died while idle).

Logging: pika logs every failed connection attempt and lost connection as ERROR records with tracebacks, which
the bus's own error (:class:`~cachesync.bus.BusUnavailableError`, logged by the worker) already reports; unless
the application set a level on the ``pika`` logger, the bus sets it to CRITICAL.

Threads: pika connections are not thread-safe, so the bus keeps two: one for ``publish``, ``dead_letters`` and
``destroy``, one for ``consume``, ``ack``, ``nack`` and ``dead_letter`` (opened on first use), each serialized by
a lock. One thread may publish while another consumes on the same bus object; calls of one side wait for each
other (a ``consume`` holds its connection while it waits for messages).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from .._driver import encode_userinfo, redact_url, url_secrets
from .. import _validate
from ..errors import BadDataError, BusConfigError
from . import Bus, BusError, BusUnavailableError, DeadLetter, Delivery, Invalidation

log = logging.getLogger("cachesync.bus.rabbitmq")

T = TypeVar("T")

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_GROUP = re.compile(r"[A-Za-z0-9_-]+")
_MAX_DELAY_MS = 2**31 - 1
_ATTEMPTS = "cachesync-attempts"
_REASON = "cachesync-reason"
_GROUP_H = "cachesync-group"
_BUCKET = "cachesync-delay"
_SENT = "cachesync-sent-ms"  # first publish time (publisher clock, ms since the epoch): the consumer lag


def _pika() -> Any:
    try:
        import pika
        import pika.exceptions
    except ImportError:
        raise BusError("the RabbitMQ bus needs pika: pip install 'cachesync[rabbitmq]'") from None
    quiet = logging.getLogger("pika")
    if quiet.level == logging.NOTSET:  # not configured by the application: see the module docstring
        quiet.setLevel(logging.CRITICAL)
    return pika


def delay_bucket(ms: int) -> int:
    """The delay-queue bucket of a delay of ``ms`` >= 1 milliseconds: ``floor(2 * log2(ms))``, at most 62 (``nack``
    caps delays at 2**31 - 1 ms, bucket 61)."""
    return max(0, min(62, int(2 * math.log2(max(1, ms)))))


@dataclass(frozen=True)
class _Tag:
    """``Delivery.raw``: the link, channel generation and delivery tag a delivery came from."""

    link: object
    gen: int
    tag: int


@dataclass
class _Held:
    group: str
    consumer: str
    since: float


class _Link:
    """One pika connection with one transactional channel (prefetch 1) and the state tied to that channel."""

    def __init__(self, bus: RabbitMQBus) -> None:
        self.bus = bus
        self.lock = threading.RLock()
        self.conn: Any = None
        self.ch: Any = None
        self.gen = 0  # bumped whenever the channel is replaced: deliveries of older generations are stale
        self.unacked: dict[int, _Held] = {}
        self.ready: set[str] = set()  # queues declared and bound through this channel
        self.returned: list[bytes] = []

    def is_open(self) -> bool:
        return self.ch is not None and bool(self.ch.is_open)

    def channel(self) -> Any:
        """The channel, reconnecting and declaring the bus's exchanges and fixed queues if needed."""
        if self.ch is not None and self.ch.is_open:
            return self.ch
        b = self.bus
        self.drop_channel()
        if self.conn is None or not self.conn.is_open:
            self.conn = None
            self.conn = b._pika.BlockingConnection(b._params)
        ch = self.conn.channel()
        ch.add_on_return_callback(lambda _ch, _method, _props, body: self.returned.append(body))
        ch.tx_select()
        ch.basic_qos(prefetch_count=1)
        ch.exchange_declare(b.backlog, "fanout", durable=True)
        ch.queue_declare(b.backlog, durable=True)
        ch.queue_bind(b.backlog, b.backlog)
        ch.exchange_declare(b.exchange, "fanout", durable=True, arguments={"alternate-exchange": b.backlog})
        ch.exchange_declare(b.delay_exchange, "headers", durable=True)
        ch.queue_declare(b.dead_queue, durable=True)
        ch.queue_declare(b.registry, durable=True)
        self.ch = ch
        return ch

    def drop_channel(self) -> None:
        """Forget the channel: its unacked deliveries are RabbitMQ's again (requeued when it closes)."""
        ch, self.ch = self.ch, None
        if ch is not None and ch.is_open:
            try:
                ch.close()
            except self.bus._errors:
                pass
        self.gen += 1
        self.unacked.clear()
        self.ready.clear()
        self.returned.clear()

    def reset(self) -> None:
        self.drop_channel()
        conn, self.conn = self.conn, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except self.bus._errors:
                pass

    def commit(self) -> None:
        """Commit the transaction; raise if RabbitMQ returned a published message (no queue took it)."""
        self.ch.tx_commit()
        self.conn.process_data_events(0)  # dispatch basic.return events (they arrive before tx.commit-ok)
        if self.returned:
            n, self.returned = len(self.returned), []
            raise BusUnavailableError(f"RabbitMQ bus at {self.bus.url} (exchange {self.bus.name!r}): {n} "
                                      "message(s) could not be routed to any queue (was the bus destroyed?)")

    def run(self, fn: Callable[[], T], retry: bool = True) -> T:
        """Run ``fn`` under the lock, mapping pika/socket errors to BusUnavailableError; with ``retry``, once
        more on a new connection when the channel it started on was already open (it may have died idle)."""
        with self.lock:
            was_open = self.is_open()
            try:
                return fn()
            except BusUnavailableError:  # ours (a ConnectionError, hence an OSError): already explained
                raise
            except self.bus._errors as e:
                if self.conn is None or not self.conn.is_open:
                    self.reset()
                else:
                    self.drop_channel()
                if not (retry and was_open):
                    raise self.bus._down(e) from e
                log.info("RabbitMQ bus at %s: %s: %s; retrying on a new connection", self.bus.url,
                         type(e).__name__, self.bus._scrub(str(e)))
            try:
                return fn()
            except BusUnavailableError:
                raise
            except self.bus._errors as e:
                self.reset()
                raise self.bus._down(e) from e


class RabbitMQBus(Bus):
    """RabbitMQ bus. ``RabbitMQBus(url="amqp://guest:guest@127.0.0.1:5672/%2F", name="cachesync",
    claim_idle=30.0, groups=(), timeout=5.0)``.

    ``url``: ``amqp://`` or ``amqps://`` (TLS), ``user:password@host:port/vhost`` (vhost ``/`` is ``%2F``), plus
    pika's URL options (``?heartbeat=30``, ...). ``claim_idle`` (default 30 s): a delivery a consumer of this
    bus object has held unacked that long is handed to the next other consumer of its group (see the module
    docstring for consumers in other processes). ``groups`` (default none): consumer groups whose queues are
    declared when the bus opens, so that they receive every message published from then on. ``timeout``
    (default 5 s): connect timeout (TCP, then 2x for the whole AMQP handshake) and how long a call may stay
    blocked by a broker resource alarm before it fails; the URL's ``socket_timeout``, ``stack_timeout`` and
    ``blocked_connection_timeout`` take precedence.

    Opening the bus connects once to declare the exchanges and fixed queues (and ``groups``), so an unreachable
    broker or a refused login raises :class:`~cachesync.bus.BusUnavailableError` at once.
    """

    def __init__(self, url: str = "amqp://guest:guest@127.0.0.1:5672/%2F", name: str = "cachesync", *,
                 claim_idle: float = 30.0, groups: Sequence[str] = (), timeout: float = 5.0) -> None:
        pika = _pika()
        if not isinstance(url, str) or "://" not in url or url.split("://", 1)[0].lower() not in ("amqp", "amqps"):
            raise BusError(f"RabbitMQ URL {redact_url(str(url))!r} must start with amqp:// or amqps://")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 200 or name.startswith("amq."):
            raise BusError(f"bus name {name!r} must be 1-200 letters, digits, '_', '-' or '.' and not start "
                           "with 'amq.'")
        _validate.positive("claim_idle", claim_idle, seconds=True, error=BusConfigError)
        _validate.positive("timeout", timeout, seconds=True, error=BusConfigError)
        if isinstance(groups, str):
            raise BusError(f"groups must be a list of group names, not the string {groups!r}")
        self.url = redact_url(url)
        self._secrets = url_secrets(url)
        url = encode_userinfo(url)  # a password's unencoded "/" or "#" would end the host part for the parser
        parts = urlsplit(url)
        try:
            params = pika.URLParameters(url)
        except (ValueError, TypeError, SyntaxError) as e:
            raise BusError(f"RabbitMQ URL {self.url!r}: {self._scrub(str(e))}") from None
        query = parse_qs(parts.query)
        if "socket_timeout" not in query:
            params.socket_timeout = float(timeout)
        if "stack_timeout" not in query:
            params.stack_timeout = float(timeout) * 2
        if "blocked_connection_timeout" not in query:
            params.blocked_connection_timeout = float(timeout)
        self._params = params
        self._pika = pika
        self._errors: tuple[type[BaseException], ...] = (pika.exceptions.AMQPError, OSError)
        self._closed_by_broker: type[BaseException] = pika.exceptions.ChannelClosedByBroker
        self.name = name
        self.claim_idle = float(claim_idle)
        self.timeout = float(timeout)
        self.exchange = name
        self.backlog = f"{name}.backlog"
        self.delay_exchange = f"{name}.delay"
        self.dead_queue = f"{name}.dead"
        self.registry = f"{name}.queues"
        self._created: set[str] = set()  # queues this bus recorded in the registry (or found existing)
        self._pub = _Link(self)  # publish, dead_letters, destroy
        self._sub = _Link(self)  # consume, ack, nack, dead_letter
        wanted = [self._check_group(g) for g in groups]
        try:
            self._pub.run(self._pub.channel, retry=False)
            for g in wanted:
                self._pub.run(functools.partial(self._ensure_group, self._pub, g), retry=False)
        except BaseException:
            self.close()
            raise

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _down(self, e: BaseException) -> BusUnavailableError:
        detail = str(e) or repr(e)
        return BusUnavailableError(self._scrub(f"RabbitMQ bus at {self.url} (exchange {self.name!r}): "
                                               f"{type(e).__name__}: {detail}"))

    def _props(self, headers: dict[str, Any] | None = None, expiration: str | None = None) -> Any:
        return self._pika.BasicProperties(delivery_mode=2, content_type="application/json", headers=headers,
                                          expiration=expiration)

    # ---------------------------------------------------------------- queues

    def _exists(self, link: _Link, queue: str) -> bool:
        tmp = link.conn.channel()
        try:
            tmp.queue_declare(queue, passive=True)
            return True
        except self._closed_by_broker as e:
            if getattr(e, "reply_code", None) == 404:
                return False
            raise
        finally:
            if tmp.is_open:
                tmp.close()

    def _declare(self, link: _Link, queue: str, declare: Callable[[Any], None]) -> None:
        """Declare ``queue`` (idempotent); the first time it is created, record it in the registry first."""
        ch = link.channel()
        if queue not in self._created and not self._exists(link, queue):
            ch.basic_publish("", self.registry, queue.encode(), self._props(), mandatory=True)
            link.commit()
        self._created.add(queue)
        declare(ch)
        link.ready.add(queue)

    def _check_group(self, group: object) -> str:
        if not isinstance(group, str) or not _GROUP.fullmatch(group) or len(group) > 50:
            raise BusError(f"consumer group {group!r} must be 1-50 letters, digits, '_' or '-'")
        return group

    def group_queue(self, group: str) -> str:
        """The queue of consumer group ``group``: ``name.g.<group>``."""
        return f"{self.name}.g.{group}"

    def _ensure_group(self, link: _Link, group: str) -> str:
        q = self.group_queue(group)
        if q not in link.ready:
            def declare(ch: Any) -> None:
                ch.queue_declare(q, durable=True)
                ch.queue_bind(q, self.exchange)

            self._declare(link, q, declare)
            self._take_backlog(link, q)
        return q

    def _take_backlog(self, link: _Link, queue: str) -> None:
        """Move the messages published while no group queue existed into ``queue``."""
        ch = link.channel()
        moved = 0
        while True:
            tags = []
            for _ in range(500):
                method, props, body = ch.basic_get(self.backlog, auto_ack=False)
                if method is None:
                    break
                ch.basic_publish("", queue, body, props, mandatory=True)
                tags.append(method.delivery_tag)
            if not tags:
                break
            link.commit()  # the copies are stored before the originals go
            for t in tags:
                ch.basic_ack(t)
            ch.tx_commit()
            moved += len(tags)
        if moved:
            log.info("RabbitMQ bus %r: %d message(s) published before any group queue existed moved to %s",
                     self.name, moved, queue)

    def _ensure_delay(self, link: _Link, bucket: int) -> None:
        q = f"{self.name}.delay.{bucket}"
        if q not in link.ready:
            def declare(ch: Any) -> None:
                ch.queue_declare(q, durable=True, arguments={"x-dead-letter-exchange": ""})
                ch.queue_bind(q, self.delay_exchange, arguments={"x-match": "all", _BUCKET: str(bucket)})

            self._declare(link, q, declare)

    # ---------------------------------------------------------------- Bus

    def publish(self, batch: Sequence[Invalidation]) -> None:
        if not batch:
            return
        bodies = [m.encode() for m in batch]
        link = self._pub

        def go() -> None:
            ch = link.channel()
            props = self._props({_SENT: int(time.time() * 1000)})
            for body in bodies:
                ch.basic_publish(self.exchange, "", body, props, mandatory=True)
            link.commit()

        link.run(go)

    def _live(self, d: Delivery) -> int | None:
        """The delivery tag of ``d`` if this bus still holds it unacked on its current channel, else None."""
        r, link = d.raw, self._sub
        if isinstance(r, _Tag) and r.link is link and r.gen == link.gen and r.tag in link.unacked:
            return r.tag
        return None

    def _claim(self, group: str, consumer: str) -> float | None:
        """Requeue the deliveries other consumers of ``group`` have held for ``claim_idle`` s; returns when the
        next one becomes claimable (monotonic clock), None if none."""
        link = self._sub
        now = time.monotonic()
        stale, nxt = [], None
        for tag, h in link.unacked.items():
            if h.group != group or h.consumer == consumer:
                continue
            due = h.since + self.claim_idle
            if due <= now:
                stale.append(tag)
            elif nxt is None or due < nxt:
                nxt = due
        if stale:
            ch = link.channel()
            for tag in sorted(stale):
                ch.basic_reject(tag, requeue=True)
                del link.unacked[tag]
            ch.tx_commit()
            log.info("RabbitMQ bus %r: %d message(s) held unacked for %.1fs or more by other consumers of group "
                     "%r requeued for %r", self.name, len(stale), self.claim_idle, group, consumer)
        return nxt

    def _delivery(self, group: str, consumer: str, method: Any, props: Any, body: bytes) -> Delivery | None:
        link = self._sub
        headers = props.headers or {}
        try:
            prior = int(headers.get(_ATTEMPTS, 0))
        except (TypeError, ValueError):
            prior = 0
        try:
            msg = Invalidation.decode(body)
        except BadDataError as e:  # never decodable: dead-lettered at once, never redelivered
            log.error("RabbitMQ bus %r: malformed message in group %r dead-lettered to %s: %s", self.name, group,
                      self.dead_queue, e)
            self.malformed += 1
            link.ch.basic_publish("", self.dead_queue, body, self._props(
                {_REASON: f"BadDataError: {e}"[:4000], _ATTEMPTS: prior + 1, _GROUP_H: group}), mandatory=True)
            link.commit()
            link.ch.basic_ack(method.delivery_tag)
            link.ch.tx_commit()
            return None
        tag = int(method.delivery_tag)
        link.unacked[tag] = _Held(group, consumer, time.monotonic())
        sent = headers.get(_SENT)
        return Delivery(f"{link.gen}:{tag}", msg, prior + 1, group, raw=_Tag(link, link.gen, tag),
                        sent_at=sent / 1000 if isinstance(sent, int) and not isinstance(sent, bool) else None)

    def _wait_one(self, queue: str, group: str, consumer: str, until: float) -> Delivery | None:
        """Wait until ``until`` (monotonic) for one message of ``queue`` with a temporary prefetch-1 consumer."""
        link = self._sub
        ch = link.ch
        got: list[tuple[Any, Any, bytes]] = []
        ctag = ch.basic_consume(queue, lambda _ch, method, props, body: got.append((method, props, body)),
                                auto_ack=False)
        try:
            while not got:
                left = until - time.monotonic()
                if left <= 0:
                    break
                link.conn.process_data_events(time_limit=left)
        finally:
            if ch.is_open:
                ch.basic_cancel(ctag)  # pika requeues deliveries that arrived after the first
                ch.tx_commit()  # (basic.reject is transactional on this channel)
        return self._delivery(group, consumer, *got[0]) if got else None

    def consume(self, group: str, consumer: str, max_messages: int = 100, timeout: float = 1.0) -> list[Delivery]:
        self._check_group(group)
        if not isinstance(consumer, str) or not consumer:
            raise BusError(f"consume needs a consumer name, got {consumer!r}")
        _validate.positive("max_messages", max_messages, integer=True, error=BusConfigError)
        _validate.number("timeout", timeout, error=BusConfigError)
        deadline = time.monotonic() + max(0.0, float(timeout))
        link = self._sub

        def go() -> list[Delivery]:
            q = self._ensure_group(link, group)
            out: list[Delivery] = []
            while True:
                next_claim = self._claim(group, consumer)
                ch = link.channel()
                while len(out) < max_messages:
                    method, props, body = ch.basic_get(q, auto_ack=False)
                    if method is None:
                        break
                    d = self._delivery(group, consumer, method, props, body)
                    if d is not None:
                        out.append(d)
                if out or time.monotonic() >= deadline:
                    return out
                d = self._wait_one(q, group, consumer, deadline if next_claim is None else min(deadline, next_claim))
                if d is not None:
                    out.append(d)

        return link.run(go)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        link = self._sub

        def go() -> None:
            tags = sorted({t for t in (self._live(d) for d in deliveries) if t is not None})
            if len(tags) < len(deliveries):
                log.debug("RabbitMQ bus %r: %d ack(s) of deliveries taken over or from a lost connection ignored "
                          "(they are delivered again)", self.name, len(deliveries) - len(tags))
            if not tags:
                return
            for t in tags:
                link.ch.basic_ack(t)
                link.unacked.pop(t, None)
            link.ch.tx_commit()

        link.run(go, retry=False)

    def nack(self, delivery: Delivery, delay: float) -> None:
        _validate.number("delay", delay, error=BusConfigError)
        ms = min(_MAX_DELAY_MS, max(0, math.ceil(delay * 1000)))
        q = self.group_queue(delivery.group)
        link = self._sub

        def go() -> None:
            tag = self._live(delivery)
            if tag is None:
                log.debug("RabbitMQ bus %r: nack of delivery %s ignored (taken over or connection lost; it is "
                          "delivered again)", self.name, delivery.id)
                return
            headers: dict[str, Any] = {_ATTEMPTS: delivery.attempts}
            if delivery.sent_at is not None:  # a retry keeps the first publish time: lag is the message's age
                headers[_SENT] = int(delivery.sent_at * 1000)
            if ms == 0:
                link.ch.basic_publish("", q, delivery.message.encode(), self._props(headers), mandatory=True)
            else:
                bucket = delay_bucket(ms)
                self._ensure_delay(link, bucket)
                link.ch.basic_publish(self.delay_exchange, q, delivery.message.encode(),
                                      self._props({**headers, _BUCKET: str(bucket)}, str(ms)), mandatory=True)
            link.commit()  # the copy is stored before the original goes
            link.ch.basic_ack(tag)
            link.unacked.pop(tag, None)
            link.ch.tx_commit()

        link.run(go, retry=False)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        headers = {_REASON: str(reason)[:4000], _ATTEMPTS: delivery.attempts, _GROUP_H: delivery.group}
        link = self._sub

        def go() -> None:
            tag = self._live(delivery)
            if tag is None:
                log.debug("RabbitMQ bus %r: dead_letter of delivery %s ignored (taken over or connection lost; "
                          "it is delivered again)", self.name, delivery.id)
                return
            link.ch.basic_publish("", self.dead_queue, delivery.message.encode(), self._props(headers),
                                  mandatory=True)
            link.commit()
            link.ch.basic_ack(tag)
            link.unacked.pop(tag, None)
            link.ch.tx_commit()

        link.run(go, retry=False)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        link = self._pub

        def go() -> list[DeadLetter]:
            link.channel()
            tmp = link.conn.channel()  # closed without acking: RabbitMQ puts the messages back in place
            try:
                out: list[DeadLetter] = []
                while len(out) < limit:
                    method, props, body = tmp.basic_get(self.dead_queue, auto_ack=False)
                    if method is None:
                        break
                    h = props.headers or {}
                    reason = h.get(_REASON, "")
                    try:
                        msg: Invalidation | None = Invalidation.decode(body)
                    except BadDataError:
                        msg = None
                    try:
                        attempts = int(h.get(_ATTEMPTS, 0))
                    except (TypeError, ValueError):
                        attempts = 0
                    out.append(DeadLetter(msg, reason.decode(errors="replace") if isinstance(reason, bytes)
                                          else str(reason), attempts, bytes(body or b"")))
                return out
            finally:
                if tmp.is_open:
                    tmp.close()

        return link.run(go)

    def destroy(self) -> None:
        """Delete the exchanges and every queue of the bus: the fixed ones and the group and delay queues in the
        registry (created by any process)."""
        link = self._pub

        def go() -> None:
            ch = link.channel()
            names = set(self._created)
            while True:
                method, _props, body = ch.basic_get(self.registry, auto_ack=False)
                if method is None:
                    break
                q = body.decode(errors="replace")
                if q.startswith((f"{self.name}.g.", f"{self.name}.delay.")):  # never anything else
                    names.add(q)
            for q in sorted(names) + [self.backlog, self.dead_queue, self.registry]:
                ch.queue_delete(q)
            for x in (self.exchange, self.backlog, self.delay_exchange):
                ch.exchange_delete(x)
            self._created.clear()
            link.drop_channel()
            self._sub.drop_channel()

        with self._sub.lock:
            link.run(go)

    def close(self) -> None:
        for link in (self._sub, self._pub):
            with link.lock:
                link.reset()
