"""NATS JetStream bus (the distributed option): a stream with a work-queue style durable pull consumer.

``NatsJetStreamBus(url, name)`` uses the stream ``NAME`` (upper-cased, non-identifier characters replaced by
``_``) with subjects ``name.inv`` (messages) and ``name.inv.dead`` (dead letters, headers
``Cachesync-Reason`` and ``Cachesync-Attempts``). A consumer group is a durable pull consumer named after
the group; every worker of the group fetches from it. A message not acked within ``claim_idle`` seconds
(``ack_wait``) is redelivered to another worker (takeover of a dead consumer); ``nack(delay)`` is JetStream's
``NAK`` with a delay. ``attempts`` is JetStream's delivery count (it also counts redeliveries after a
consumer died). ``publish`` returns after JetStream acknowledged every message (stored in the stream).

nats-py is asyncio only: the bus runs its own event loop in a daemon thread so that the interface stays
synchronous like the rest of the relay and worker.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from .._driver import encode_userinfo, redact_url
from .. import _validate
from ..errors import BadDataError, BusConfigError
from . import Bus, BusError, BusUnavailableError, DeadLetter, Delivery, Invalidation

log = logging.getLogger("cachesync.bus")

T = TypeVar("T")


class NatsJetStreamBus(Bus):
    """JetStream bus. ``NatsJetStreamBus(url="nats://127.0.0.1:4222", name="cachesync", claim_idle=30.0,
    timeout=5.0)``; ``timeout`` (default 5 s) bounds every server round trip."""

    def __init__(self, url: str = "nats://127.0.0.1:4222", name: str = "cachesync", *, claim_idle: float = 30.0,
                 timeout: float = 5.0) -> None:
        try:
            import nats
        except ImportError:
            raise BusError("the NATS bus needs nats-py: pip install 'cachesync[nats]'") from None
        if not isinstance(url, str) or url.split("://", 1)[0] not in ("nats", "tls"):
            raise BusError(f"NATS URL {redact_url(str(url))!r} must start with nats:// or tls://")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise BusError(f"bus name {name!r} must be non-empty letters, digits, '_', '-' or '.'")
        _validate.positive("claim_idle", claim_idle, seconds=True, error=BusConfigError)
        self.url = redact_url(url)
        self.name = name
        self.stream = re.sub(r"[^A-Za-z0-9_-]", "_", name).upper()
        self.subject = f"{name}.inv"
        self.dead_subject = f"{self.subject}.dead"
        self.claim_idle = float(claim_idle)
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cachesync-nats", daemon=True)
        self._thread.start()
        self._subs: dict[str, Any] = {}
        try:
            self.nc = self._run(nats.connect(encode_userinfo(url), connect_timeout=timeout, max_reconnect_attempts=-1,
                                             allow_reconnect=True, reconnect_time_wait=0.2))
        except BusUnavailableError:
            self._stop()
            raise
        self.js = self.nc.jetstream(timeout=timeout)
        self._run(self._ensure_stream())

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        import nats.errors

        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result((timeout or self.timeout) * 3 + 1)
        except (nats.errors.Error, OSError, TimeoutError) as e:
            raise BusUnavailableError(f"NATS JetStream bus at {self.url} (stream {self.stream!r}): "
                                      f"{type(e).__name__}: {e}") from e

    async def _ensure_stream(self) -> None:
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        cfg = StreamConfig(name=self.stream, subjects=[self.subject, self.dead_subject], storage=StorageType.FILE)
        try:
            await self.js.stream_info(self.stream)
        except NotFoundError:
            await self.js.add_stream(cfg)

    def publish(self, batch: Sequence[Invalidation]) -> None:
        if not batch:
            return

        async def go() -> None:
            await asyncio.gather(*(self.js.publish(self.subject, m.encode(), stream=self.stream) for m in batch))

        self._run(go())

    async def _sub(self, group: str) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        sub = self._subs.get(group)
        if sub is None:
            cfg = ConsumerConfig(durable_name=group, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                                 ack_wait=self.claim_idle, max_deliver=-1, filter_subject=self.subject,
                                 max_ack_pending=-1)
            sub = await self.js.pull_subscribe(self.subject, durable=group, stream=self.stream, config=cfg)
            self._subs[group] = sub
        return sub

    def consume(self, group: str, consumer: str, max_messages: int = 100, timeout: float = 1.0) -> list[Delivery]:
        if not group or not consumer or not re.fullmatch(r"[A-Za-z0-9_-]+", group):
            raise BusError(f"consume needs a group (letters, digits, '_', '-') and a consumer name, got "
                           f"{group!r}, {consumer!r}")

        async def go() -> list[Delivery]:
            sub = await self._sub(group)
            try:
                msgs = await sub.fetch(max_messages, timeout=max(timeout, 0.01))
            except TimeoutError:  # nats.errors.TimeoutError, and the plain one nats-py raises when the
                return []  # deadline runs out between its two pull requests (a loaded machine): no message either
            out = []
            for m in msgs:
                md = m.metadata
                try:
                    inv = Invalidation.decode(m.data or b"")
                except BadDataError as e:  # never decodable: dead-lettered at once, never redelivered
                    log.error("NATS bus %r: malformed message %s of group %r dead-lettered: %s", self.name,
                              md.sequence.stream, group, e)
                    await self._dead(m, m.data or b"", f"BadDataError: {e}", md.num_delivered)
                    self.malformed += 1
                    continue
                ts = getattr(md, "timestamp", None)
                out.append(Delivery(str(md.sequence.stream), inv, int(md.num_delivered), group, raw=m,
                                    sent_at=ts.timestamp() if ts is not None else None))
            return out

        return self._run(go(), timeout + self.timeout)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return

        async def go() -> None:
            await asyncio.gather(*(d.raw.ack_sync(timeout=self.timeout) for d in deliveries))

        self._run(go())

    def nack(self, delivery: Delivery, delay: float) -> None:
        self._run(delivery.raw.nak(delay=max(0.0, delay)))

    async def _dead(self, msg: Any, data: bytes, reason: str, attempts: int) -> None:
        await self.js.publish(self.dead_subject, data, stream=self.stream,
                              headers={"Cachesync-Reason": reason[:4000], "Cachesync-Attempts": str(attempts)})
        await msg.term()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        self._run(self._dead(delivery.raw, delivery.message.encode(), reason, delivery.attempts))

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        async def go() -> list[DeadLetter]:
            from nats.js.errors import NotFoundError

            out: list[DeadLetter] = []
            seq = 1
            while len(out) < limit:
                try:
                    m = await self.js.get_msg(self.stream, seq=seq, subject=self.dead_subject, next=True)
                except NotFoundError:
                    break
                h = m.headers or {}
                try:
                    msg: Invalidation | None = Invalidation.decode(m.data or b"")
                except BadDataError:
                    msg = None
                try:
                    attempts = int(h.get("Cachesync-Attempts", "0"))
                except ValueError:
                    attempts = 0
                out.append(DeadLetter(msg, h.get("Cachesync-Reason", ""), attempts, m.data or b""))
                seq = int(m.seq or 0) + 1
            return out

        return self._run(go())

    def destroy(self) -> None:
        from nats.js.errors import NotFoundError

        async def go() -> None:
            try:
                await self.js.delete_stream(self.stream)
            except NotFoundError:
                pass

        self._run(go())

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def close(self) -> None:
        try:
            self._run(self.nc.close())
        except BusUnavailableError:
            pass
        self._stop()
