"""The default bus: a Redis Stream read by consumer groups.

Keys (``name`` defaults to ``cachesync``): the stream ``name``, the retry schedule ``name:retry`` (a sorted
set of nacked messages by due time, moved back to the stream atomically by a Lua script) and the dead-letter
stream ``name:dead`` (fields ``m`` message, ``reason``, ``attempts``, ``group``). A consumer that dies leaves
its messages pending; after ``claim_idle`` seconds another consumer takes them over with ``XAUTOCLAIM``.

Durability is Redis's: ``publish`` returns once Redis accepted the ``XADD``; run the bus Redis with AOF
(``appendonly yes``) when a Redis crash must not lose queued invalidations.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._driver import check_redis_url, redact_url, scrub
from .. import _validate
from ..errors import BadDataError, BusConfigError
from . import Bus, BusError, BusUnavailableError, DeadLetter, Delivery, Invalidation

log = logging.getLogger("cachesync.bus")

_DOWN = (RedisConnectionError, RedisTimeoutError, OutOfMemoryError, ReadOnlyError)
"""Errors of an unusable bus Redis (BusUnavailableError: retried with backoff): unreachable, full (maxmemory with
noeviction) or a read-only replica after a failover. (The last two were plain ResponseErrors, which stopped
Worker.run.)"""

_NACK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if ARGV[5] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
return 1
"""

# move due retries back to the stream; reply: ms until the next retry is due (-1: none)
_PROMOTE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  local i1 = string.find(m, '\\n', 1, true)
  local i2 = string.find(m, '\\n', i1 + 1, true)
  redis.call('XADD', KEYS[1], '*', 'm', string.sub(m, i2 + 1), 'a', string.sub(m, i1 + 1, i2 - 1))
  redis.call('ZREM', KEYS[2], m)
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #nxt == 0 then return -1 end
return math.max(0, tonumber(nxt[2]) - now)
"""


class RedisStreamsBus(Bus):
    """Redis Streams bus. ``RedisStreamsBus(url, name="cachesync", claim_idle=30.0, delete_on_ack=True,
    maxlen=None)``.

    ``claim_idle`` (default 30 s): a message pending this long with a consumer is taken over by another.
    ``delete_on_ack`` (default True): ``XDEL`` acked messages so the stream stays small; set False when several
    groups read the same stream. ``maxlen`` (default None = never trim): approximate ``MAXLEN`` on publish;
    a trim can drop messages no group has read yet.
    """

    def __init__(self, url: str, name: str = "cachesync", *, claim_idle: float = 30.0, delete_on_ack: bool = True,
                 maxlen: int | None = None, socket_timeout: float = 5.0) -> None:
        url = check_redis_url(url)
        if not isinstance(name, str) or not name:
            raise BusError(f"bus name must be a non-empty string, got {name!r}")
        _validate.positive("claim_idle", claim_idle, seconds=True, error=BusConfigError)
        if maxlen is not None:
            _validate.positive("maxlen", maxlen, integer=True, error=BusConfigError)
        self.url = redact_url(url)
        self.name = name
        self.stream, self.retry_key, self.dead_key = name, f"{name}:retry", f"{name}:dead"
        self.claim_idle = float(claim_idle)
        self.delete_on_ack = delete_on_ack
        self.maxlen = maxlen
        self.socket_timeout = socket_timeout
        try:
            pool = redis.ConnectionPool.from_url(url, socket_timeout=socket_timeout,
                                                 socket_connect_timeout=socket_timeout)
        except (ValueError, TypeError) as e:  # redis-py echoes tokens of the URL (e.g. a bad port)
            raise BusError(f"bus URL {self.url!r}: {scrub(e, url)}") from None
        # set after from_url, whose keywords the URL's query options override: the bus reads RESP2 replies of
        # bytes whatever the URL says (?decode_responses=true dead-lettered every message with an empty body,
        # ?protocol=3 broke consume)
        pool.connection_kwargs.update(protocol=2, decode_responses=False)
        self.r: Any = redis.Redis(connection_pool=pool)
        self._nack = self.r.register_script(_NACK)
        self._promote = self.r.register_script(_PROMOTE)
        self._groups: set[str] = set()
        self._next_claim: dict[str, float] = {}
        self._cursor: dict[str, str] = {}

    def _down(self, e: Exception) -> BusUnavailableError:
        return BusUnavailableError(f"Redis Streams bus at {self.url} (stream {self.stream!r}): "
                                   f"{type(e).__name__}: {e}")

    def publish(self, batch: Sequence[Invalidation]) -> None:
        if not batch:
            return
        try:
            pipe = self.r.pipeline(transaction=False)
            for m in batch:
                if self.maxlen is None:
                    pipe.execute_command("XADD", self.stream, "*", "m", m.encode())
                else:
                    pipe.execute_command("XADD", self.stream, "MAXLEN", "~", self.maxlen, "*", "m", m.encode())
            pipe.execute()
        except _DOWN as e:
            raise self._down(e) from e

    def _ensure_group(self, group: str) -> None:
        if group in self._groups:
            return
        try:
            self.r.execute_command("XGROUP", "CREATE", self.stream, group, "0", "MKSTREAM")
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add(group)

    def _delivery(self, group: str, mid: Any, fields: Any) -> Delivery | None:
        if isinstance(fields, list):
            fields = dict(zip(fields[::2], fields[1::2], strict=False))
        sid = mid.decode() if isinstance(mid, bytes) else str(mid)
        try:
            prior = int(fields.get(b"a", b"0"))
        except (TypeError, ValueError):
            prior = 0
        body = fields.get(b"m")
        try:
            if not isinstance(body, bytes):
                raise BadDataError(f"stream entry {sid} has no 'm' field (fields: {sorted(fields)!r:.200})")
            return Delivery(sid, Invalidation.decode(body), prior + 1, group, raw=body)
        except BadDataError as e:  # never decodable: dead-lettered at once with the raw body, never redelivered
            log.error("Redis Streams bus %r: malformed message %s of group %r dead-lettered: %s", self.name, sid,
                      group, e)
            pipe = self.r.pipeline(transaction=True)
            pipe.execute_command("XADD", self.dead_key, "*", "m", body if isinstance(body, bytes) else b"",
                                 "reason", f"BadDataError: {e}", "attempts", prior + 1)
            pipe.execute_command("XACK", self.stream, group, sid)
            if self.delete_on_ack:
                pipe.execute_command("XDEL", self.stream, sid)
            pipe.execute()
            self.malformed += 1
            return None

    def consume(self, group: str, consumer: str, max_messages: int = 100, timeout: float = 1.0) -> list[Delivery]:
        if not group or not consumer:
            raise BusError(f"consume needs a group and a consumer name, got {group!r}, {consumer!r}")
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            self._ensure_group(group)
            while True:
                try:
                    out = self._consume_once(group, consumer, max_messages, deadline)
                except ResponseError as e:
                    if "NOGROUP" not in str(e):
                        raise
                    # the stream went with its group (a bus Redis restarted without AOF, a DEL): create it again,
                    # from the start of what the stream holds now (a ResponseError here stopped Worker.run)
                    log.warning("Redis Streams bus %r: consumer group %r is gone (%s); creating it again",
                                self.name, group, e)
                    self._groups.discard(group)
                    self._cursor.pop(group, None)
                    self._next_claim.pop(group, None)
                    self._ensure_group(group)
                    out = []
                if out or time.monotonic() >= deadline:
                    return out
        except _DOWN as e:
            raise self._down(e) from e

    def _consume_once(self, group: str, consumer: str, max_messages: int, deadline: float) -> list[Delivery]:
        next_due = int(self._promote(keys=[self.stream, self.retry_key], args=[max(100, max_messages)]))
        out: list[Delivery] = []
        now = time.monotonic()
        if now >= self._next_claim.get(group, 0.0):
            res = self.r.execute_command("XAUTOCLAIM", self.stream, group, consumer, int(self.claim_idle * 1000),
                                         self._cursor.get(group, "0-0"), "COUNT", max_messages)
            cur = res[0].decode() if isinstance(res[0], bytes) else str(res[0])
            self._cursor[group] = cur
            out += [d for mid, f in res[1] if f and (d := self._delivery(group, mid, f)) is not None]
            if cur == "0-0":
                self._next_claim[group] = now + self.claim_idle / 2
        if len(out) < max_messages:
            args: list[Any] = ["XREADGROUP", "GROUP", group, consumer, "COUNT", max_messages - len(out)]
            if not out:
                wait = min(deadline, self._next_claim.get(group, deadline)) - now
                if next_due >= 0:
                    wait = min(wait, next_due / 1000)
                if wait > 0.001:
                    args += ["BLOCK", max(1, int(wait * 1000))]
            res2 = self.r.execute_command(*args, "STREAMS", self.stream, ">")
            for _stream, entries in res2 or []:
                out += [d for mid, f in entries if (d := self._delivery(group, mid, f)) is not None]
        return out

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        ids = [d.id for d in deliveries]
        try:
            pipe = self.r.pipeline(transaction=True)
            for g in dict.fromkeys(d.group for d in deliveries):
                pipe.execute_command("XACK", self.stream, g, *[d.id for d in deliveries if d.group == g])
            if self.delete_on_ack:
                pipe.execute_command("XDEL", self.stream, *ids)
            pipe.execute()
        except _DOWN as e:
            raise self._down(e) from e

    def nack(self, delivery: Delivery, delay: float) -> None:
        member = f"{delivery.id}\n{delivery.attempts}\n".encode() + delivery.message.encode()
        try:
            self._nack(keys=[self.stream, self.retry_key],
                           args=[delivery.group, delivery.id, max(0, int(delay * 1000)), member, "1" if self.delete_on_ack else "0"])
        except _DOWN as e:
            raise self._down(e) from e

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        try:
            pipe = self.r.pipeline(transaction=True)
            pipe.execute_command("XADD", self.dead_key, "*", "m", delivery.message.encode(), "reason", reason,
                                 "attempts", delivery.attempts)
            pipe.execute_command("XACK", self.stream, delivery.group, delivery.id)
            if self.delete_on_ack:
                pipe.execute_command("XDEL", self.stream, delivery.id)
            pipe.execute()
        except _DOWN as e:
            raise self._down(e) from e

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        try:
            rows = self.r.execute_command("XRANGE", self.dead_key, "-", "+", "COUNT", limit)
        except _DOWN as e:
            raise self._down(e) from e
        out = []
        for _mid, f in rows:
            d = f if isinstance(f, dict) else dict(zip(f[::2], f[1::2], strict=False))
            body = d.get(b"m", b"")
            try:
                msg: Invalidation | None = Invalidation.decode(body)
            except BadDataError:
                msg = None
            out.append(DeadLetter(msg, d.get(b"reason", b"").decode(errors="replace"), int(d.get(b"attempts", 0)),
                                  body))
        return out

    def pending(self, group: str) -> int:
        """How many messages of ``group`` are delivered but not acked (plus scheduled retries)."""
        try:
            p = self.r.execute_command("XPENDING", self.stream, group)
            n = p["pending"] if isinstance(p, dict) else p[0]
            return int(n) + int(self.r.zcard(self.retry_key))
        except ResponseError:
            return 0

    def destroy(self) -> None:
        self.r.delete(self.stream, self.retry_key, self.dead_key)

    def close(self) -> None:
        self.r.close()
