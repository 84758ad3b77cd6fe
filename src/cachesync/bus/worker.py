"""The worker: consumes invalidations from a bus, fans table changes out to keys through the rules, applies
them to Redis in one pipelined batch, and acks only after applying.

A failed batch (Redis unreachable) is retried per message with exponential backoff (``backoff * 2**(n-1)``
seconds, capped at ``max_backoff``); after ``max_attempts`` attempts a message goes to the dead-letter stream
with the reason. A message that can never be applied (a table change the rules cannot turn into keys) is
dead-lettered at once, and so is a malformed message (:class:`~cachesync.errors.BadDataError`: not JSON, keys
not a list of strings, a non-numeric version, a key longer than the cache's ``max_key_bytes``, a rule's version
column that is not a number): the valid messages of the same batch are applied and acked. Messages of a dead
worker are taken over after the bus's ``claim_idle``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Unpack

from redis.exceptions import RedisError

from .. import tracing
from .. import _validate
from ..errors import BadDataError, BusConfigError, InvalidationError, RedisCommandError, UsageError
from ..core.rules import Rules
from .._sync.cache import Cache
from ..outbox._fault import point
from . import Bus, BusError, BusUnavailableError, Delivery, checked_keys, checked_version
from .options import WorkerOptions, WorkerOptionsKwargs

log = logging.getLogger("cachesync.worker")


class Worker:
    """``Worker(bus, cache, rules=None, *, options=None, on_retry=None, on_dead=None, **options)``.

    ``options``: a :class:`~cachesync.bus.WorkerOptions` (group, consumer, batch_size, max_attempts, backoff,
    max_backoff: see there for each default), or the same names as keywords -- not both
    (:class:`~cachesync.errors.BusConfigError`); the resolved values are also attributes (``worker.consumer``
    defaults to ``host-pid``). ``on_retry(delivery, delay, error)`` and ``on_dead(delivery, reason)`` are hooks
    (tests, metrics).

    ``stats``: ``messages``/``keys`` applied and acked, ``retries`` (nacks), ``dead`` (dead-lettered by the worker,
    for any reason), ``skipped`` (messages part of whose table change the rules could not turn into keys: the rest
    was applied, then the message dead-lettered with the reason), ``malformed`` (malformed messages: dead-lettered by the worker, or by the bus while decoding,
    which never delivers them).
    """

    def __init__(self, bus: Bus, cache: Cache, rules: Rules | None = None, *, options: WorkerOptions | None = None,
                 on_retry: Callable[[Delivery, float, BaseException], None] | None = None,
                 on_dead: Callable[[Delivery, str], None] | None = None,
                 **kwargs: Unpack[WorkerOptionsKwargs]) -> None:
        self.options = o = WorkerOptions.resolve(options, dict(kwargs))
        _validate.callable_or_none("on_retry", on_retry, error=BusConfigError)
        _validate.callable_or_none("on_dead", on_dead, error=BusConfigError)
        self.bus, self.cache, self.rules = bus, cache, rules
        self.group = o.group
        self.consumer = o.consumer or f"{socket.gethostname()[:40]}-{os.getpid()}"
        self.batch_size, self.max_attempts = o.batch_size, o.max_attempts
        self.backoff, self.max_backoff = float(o.backoff), float(o.max_backoff)
        self.on_retry, self.on_dead = on_retry, on_dead
        self.stats = {"messages": 0, "keys": 0, "retries": 0, "dead": 0, "malformed": 0, "skipped": 0}
        self._bad = 0

    def resolve(self, d: Delivery) -> tuple[list[str], str | None]:
        """A message's keys (its explicit keys plus the rules' keys of its table change,
        :meth:`cachesync.rules.TableRule.resolve`) and version (the message's, else the rule's version column).
        A message left with no key at all raises :class:`BadDataError` (the worker dead-letters it)."""
        keys, version, _ = self._resolve(d)
        return keys, version

    def _resolve(self, d: Delivery) -> tuple[list[str], str | None, str]:
        """:meth:`resolve` plus what the rules could not turn into keys ("" = nothing): the worker applies the
        rest, then dead-letters the message with that reason (``stats["skipped"]``), so nothing is hidden."""
        m = d.message
        maxb = self.cache.options.max_key_bytes
        keys = checked_keys(list(m.keys), maxb)
        version = None if m.version is None else checked_version(m.version)
        problem = ""
        if m.table is not None:
            rule = None if self.rules is None else self.rules.tables.get(m.table)
            if self.rules is None:
                if not keys:
                    raise BusError(f"message for table {m.table!r} has no keys and the worker has no rules "
                                   "(--rules)")
            elif rule is not None:
                rk = rule.resolve(m.old, m.new, maxb)
                if rk.problems:
                    problem = "; ".join(rk.problems)
                    if not keys and not rk.keys:
                        raise BadDataError(f"message {d.id}: {problem}")
                keys += rk.keys
                if version is None:
                    version = rk.version
        return list(dict.fromkeys(keys)), version, problem

    def keys_of(self, d: Delivery) -> list[str]:
        """The keys of :meth:`resolve`."""
        return self.resolve(d)[0]

    def version_of(self, d: Delivery) -> str | None:
        """The version of :meth:`resolve`."""
        return self.resolve(d)[1]

    def delay_for(self, attempts: int) -> float:
        """Backoff before attempt ``attempts + 1``: ``backoff * 2**(attempts-1)`` capped at ``max_backoff``."""
        return float(min(self.max_backoff, self.backoff * 2 ** max(0, attempts - 1)))

    def _dead(self, d: Delivery, reason: str) -> None:
        log.error("cachesync worker: dead-lettering message %s after %d attempt(s): %s", d.id, d.attempts, reason)
        self.bus.dead_letter(d, reason)
        self.stats["dead"] += 1
        if self.on_dead is not None:
            self.on_dead(d, reason)

    def run_once(self, timeout: float = 1.0) -> int:
        """Consume one batch (waiting up to ``timeout`` s) and process it; returns how many messages were acked."""
        ds = self.bus.consume(self.group, self.consumer, self.batch_size, timeout)
        self._count_malformed()
        if not ds:
            return 0
        point("consumed")
        good: list[tuple[Delivery, list[str], str | None]] = []
        partial: dict[int, str] = {}  # id(delivery) -> what its rules could not turn into keys
        for d in ds:
            try:
                keys, version, problem = self._resolve(d)
                good.append((d, keys, version))
                if problem:
                    partial[id(d)] = problem
            except (UsageError, BadDataError) as e:  # RuleError, BusError, bad data: can never succeed
                self._bad += isinstance(e, BadDataError)
                self._dead(d, f"{type(e).__name__}: {e}")
        self._count_malformed()
        if not good:
            return 0
        try:
            try:
                with tracing.span("cachesync.worker.apply", {"cachesync.messages": len(good)},
                                  next((d.message.traceparent for d, _, _ in good if d.message.traceparent), None)):
                    self.cache.invalidate_many([(ks, v) for _, ks, v in good])
            except (UsageError, BadDataError):  # not expected after the checks: find the bad message(s) one by one
                ok = []
                for item in good:
                    try:
                        self.cache.invalidate_many([(item[1], item[2])])
                        ok.append(item)
                    except (UsageError, BadDataError) as e:
                        self._bad += 1
                        self._dead(item[0], f"{type(e).__name__}: {e}")
                self._count_malformed()
                good = ok
        except (InvalidationError, RedisCommandError, RedisError) as e:  # Redis down, or an error reply (OOM...)
            for d, _, _ in good:
                if d.attempts >= self.max_attempts:
                    self._dead(d, f"{type(e).__name__} after {d.attempts} attempts: {e}")
                else:
                    delay = self.delay_for(d.attempts)
                    self.stats["retries"] += 1
                    if self.on_retry is not None:
                        self.on_retry(d, delay, e)
                    self.bus.nack(d, delay)
            return 0
        point("applied")
        self.bus.ack([d for d, _, _ in good if id(d) not in partial])
        for d, _, _ in good:  # applied what could be; the rest goes to the dead letters, never silently dropped
            if id(d) in partial:
                self.stats["skipped"] += 1
                self._dead(d, f"BadDataError: applied its other keys; {partial[id(d)]}")
        point("acked")
        self.stats["messages"] += len(good)
        self.stats["keys"] += sum(len(ks) for _, ks, _ in good)
        return len(good)

    def _count_malformed(self) -> None:
        self.stats["malformed"] = self._bad + int(getattr(self.bus, "malformed", 0))

    def run(self, stop: threading.Event | None = None, timeout: float = 1.0) -> None:
        """Work until ``stop`` is set; bus outages are logged and retried with backoff."""
        stop = stop or threading.Event()
        backoff = 0.0
        while not stop.is_set():
            try:
                self.run_once(timeout)
                backoff = 0.0
            except BusUnavailableError as e:
                backoff = min(self.max_backoff, backoff * 2 if backoff else 0.05)
                log.warning("cachesync worker: bus unavailable, retrying in %.2fs: %s", backoff, e)
                stop.wait(backoff)


