"""The write flows: the one invalidation path (``invalidate_many_flow``), writers' sets, the write strategies'
steps, and side-effect-free peeks (rules 3 to 5 of :mod:`cachesync.core`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import logging
from typing import Any, Final

from ..errors import InvalidationError, UsageError
from ..errors import CorruptEntryError, InvalidKeyError
from .keys import wake_key
from .layout import decode_entry
from .options import check_non_negative
from .context import _groups, _interleave, Context
from .effects import Batch, CommandError, Flow, NoScript, RedisDown, Schedule, script
from .scripts import SCRIPTS
from .strategies import resolve_strategy, SP, Step
from .values import decode_version, encode_version, MISSING, star_keys, Versioned

log = logging.getLogger("cachesync")
# --------------------------------------------------------------------------- write flows


INVALIDATE_CHUNK: Final = 500
"""Keys per ``invalidate.lua`` call: a bigger batch is split (and, on a cluster, grouped by slot first)."""


def merge_invalidations(items: Iterable[tuple[Sequence[str], Any]], fn: str = "invalidate_many") -> dict[str, str]:
    """Key -> encoded version ("" = unknown) for a batch of ``(keys, version)`` pairs, each key once.

    A key named by several pairs keeps its highest version (the floor only ever rises, so this is what
    applying the pairs one by one would leave). A pair's ``keys`` must be a list or tuple of keys, not a string.
    """
    out: dict[str, str] = {}
    get = out.get
    for item in items:
        try:
            keys, version = item
        except (TypeError, ValueError):
            raise UsageError(f"{fn}() takes (keys, version) pairs, got {item!r}") from None
        tk = type(keys)
        if tk is not list and tk is not tuple and (isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable)):
            raise UsageError(f"{fn}() takes a list of keys per (keys, version) pair, not {keys!r}")
        if version is None:
            ver = ""
        elif type(version) is str and len(version) < 16 and version.isascii() and version.isdigit():
            ver = version  # what encode_version returns for it (digits only, below 2**53)
        else:
            ver = encode_version(version)
        for k in keys:
            try:
                old = get(k)
            except TypeError:  # unhashable: not a key (refused just below)
                old = None
            if old is None:
                if type(k) is not str and not isinstance(k, str):
                    raise InvalidKeyError(k, f"keys must be str, not {type(k).__name__} (in {fn}())")
                out[k] = ver
            elif ver != "" and (old == "" or float(ver) > float(old)):
                out[k] = ver
    return out


def invalidate_many_flow(ctx: Context, versions: Mapping[str, str], traceparent: str | None = None) -> Flow[int]:
    """Invalidate a batch: ``versions`` maps each key to its encoded committed version ("" = unknown), as
    :func:`merge_invalidations` returns it. One ``invalidate.lua`` call per slot group and
    :data:`INVALIDATE_CHUNK` keys, each key with its own version. The one invalidation path: ``invalidate``,
    ``invalidate_many``, the write strategies, the relay, the workers, CDC and the auditor all come here.

    Returns how many keys held a value. Raises :class:`InvalidationError` naming the keys not yet invalidated
    when Redis cannot be reached, or refuses a call with an error reply (a read-only replica, OOM: that call's keys
    may be partly done) (those already done stay done, which is harmless: invalidation is idempotent).
    ``traceparent``: the span to announce on the channel with the keys (default: the traced cache's current one).
    """
    ukeys = list(versions)
    if not ukeys:
        return 0
    ekey, known = ctx.ekey, ctx._ekeys
    eks = [known.get(k) or ekey(k) for k in ukeys]
    if traceparent is None:  # a traced cache: the current span (the L1s that drop these keys record it)
        traceparent = (ctx.traceparent() or "") if ctx.channel else ""
    tp = traceparent if ctx.channel else ""
    head = [ctx.tomb_ms, "s" if ctx.o.serve_stale else "d", ctx.wake_ms, ctx.channel, tp]
    had = 0
    if not ctx.cluster:  # one group: the keys in order, sliced (no index lists)
        vers = list(versions.values())
        ks = _interleave(eks)
        starts = range(0, len(eks), INVALIDATE_CHUNK)
        if len(starts) > 1:  # several calls: pipelined in one round trip (each call still one atomic script)
            had = yield from _pipelined(ctx, ukeys, ks, vers, head, starts)
        else:
            try:
                had = int((yield from script("invalidate", ks, [*head, *vers])))
            except RedisDown as e:
                ctx.stats["redis_errors"] += 1
                ctx.stats["invalidations_failed"] += len(ukeys)
                raise InvalidationError(ukeys, e.cause) from e.cause
            except CommandError as e:  # refused (a read-only replica, OOM): maybe partly applied, all still to do
                ctx.stats["invalidations_failed"] += len(ukeys)
                raise InvalidationError(ukeys, e) from e
        ctx.stats["invalidations"] += len(ukeys)
        return had
    done: set[int] = set()
    for group in _groups(ctx, eks):
        for c in range(0, len(group), INVALIDATE_CHUNK):
            chunk = group[c:c + INVALIDATE_CHUNK]
            try:
                had += int((yield from script("invalidate", _interleave([eks[i] for i in chunk]),
                                              [*head, *(versions[ukeys[i]] for i in chunk)])))
            except RedisDown as e:
                ctx.stats["redis_errors"] += 1
                ctx.stats["invalidations_failed"] += len(ukeys) - len(done)
                raise InvalidationError([ukeys[i] for i in range(len(ukeys)) if i not in done], e.cause) from e.cause
            except CommandError as e:  # refused: this chunk and the rest are still to do
                ctx.stats["invalidations_failed"] += len(ukeys) - len(done)
                raise InvalidationError([ukeys[i] for i in range(len(ukeys)) if i not in done], e) from e
            done.update(chunk)
    ctx.stats["invalidations"] += len(ukeys)
    return had


def _pipelined(ctx: Context, ukeys: list[str], ks: list[str], vers: list[str], head: list[Any],
               starts: range) -> Flow[int]:
    """The ``invalidate.lua`` calls of :func:`invalidate_many_flow` on one node, one per chunk of
    :data:`INVALIDATE_CHUNK` keys, sent in one pipelined round trip. A chunk answered NOSCRIPT is sent again
    through :func:`script` (which loads it). When Redis cannot be reached, the :class:`InvalidationError` names
    every key whose call was not answered: with the round trip cut, a sent call may or may not have run, so those
    keys are still to invalidate (harmless if they were: invalidation is idempotent). Refused calls (error
    replies) are reported after the others ran, in one :class:`InvalidationError` naming their keys."""
    sha = SCRIPTS["invalidate"].sha
    cmds = []
    for c in starts:
        kk = ks[2 * c:2 * (c + INVALIDATE_CHUNK)]
        cmds.append(("EVALSHA", sha, len(kk), *kk, *head, *vers[c:c + INVALIDATE_CHUNK]))
    try:
        replies = yield Batch(tuple(cmds))
    except RedisDown as e:
        ctx.stats["redis_errors"] += 1
        ctx.stats["invalidations_failed"] += len(ukeys)
        raise InvalidationError(ukeys, e.cause) from e.cause
    had = 0
    error: CommandError | None = None
    unanswered = [isinstance(r, (CommandError, NoScript)) for r in replies]

    def left() -> list[str]:
        return [k for j, c2 in enumerate(starts) if unanswered[j] for k in ukeys[c2:c2 + INVALIDATE_CHUNK]]

    for i, (c, r) in enumerate(zip(starts, replies, strict=True)):
        if isinstance(r, CommandError):
            error = error or r  # the other calls ran: report the first refusal after them
            continue
        if isinstance(r, NoScript):
            try:
                r = yield from script("invalidate", ks[2 * c:2 * (c + INVALIDATE_CHUNK)],
                                      [*head, *vers[c:c + INVALIDATE_CHUNK]])
            except RedisDown as e:
                todo = left()
                ctx.stats["redis_errors"] += 1
                ctx.stats["invalidations_failed"] += len(todo)
                raise InvalidationError(todo, e.cause) from e.cause
            except CommandError as e:
                error = error or e
                continue  # still unanswered
            unanswered[i] = False
        had += int(r)
    if error is not None:  # refused calls (a read-only replica, OOM): maybe partly applied, their keys still to do
        todo = left()
        ctx.stats["invalidations_failed"] += len(todo)
        raise InvalidationError(todo, error) from error
    return had


def invalidate_flow(ctx: Context, keys: Sequence[str], version: Any = None) -> Flow[int]:
    """Invalidate keys after a write that committed ``version``: :func:`invalidate_many_flow` of one pair."""
    star_keys(keys, "invalidate")
    return invalidate_many_flow(ctx, merge_invalidations([(keys, version)], "invalidate"))


def set_flow(ctx: Context, key: str, value: Any, ttl: float | None, version: Any, guarded: bool) -> Flow[bool]:
    """A writer stores a value (voids leases; refuses an older version when ``guarded``)."""
    ek = ctx.ekey(key)
    if version is not None:
        value = Versioned(value, version)
    payload, ver, neg = ctx.encode(key, value)
    if not guarded:
        ver = ""
    try:
        r = yield from script("set", [ek, wake_key(ek)], [payload, ver, ctx.ttl_ms(ttl, neg == "1"), neg, ctx.wake_ms,
                                                       ctx.channel])
    except RedisDown as e:
        ctx.stats["redis_errors"] += 1
        ctx.stats["invalidations_failed"] += 1
        raise InvalidationError([key], e.cause) from e.cause
    ok = int(r) == 1
    ctx.stats["sets" if ok else "sets_refused"] += 1
    return ok


def steps_flow(ctx: Context, steps: Sequence[Step], keys: Sequence[str], value: Any, version: Any,
               ttl: float | None) -> Flow[None]:
    """Run a strategy's steps for ``keys``."""
    for step in steps:
        if step is Step.INVALIDATE:
            yield from invalidate_flow(ctx, keys, version)
        else:
            if value is MISSING:
                raise UsageError(f"write strategy step {step.value} needs the new value: pass value= to write() or "
                                 "call set_value() inside the block")
            if step is Step.SET_VERSIONED and version is None:
                raise UsageError("strategy db_then_set_versioned needs version= (the row's new version)")
            for k in keys:
                yield from set_flow(ctx, k, value, ttl, version, step is Step.SET_VERSIONED)


class WritePlan:
    """The state of one ``cache.write(...)`` block, shared by the sync and async drivers."""

    def __init__(self, ctx: Context, keys: Sequence[str], strategy: str | None, value: Any, version: Any,
                 ttl: float | None, delay: float | None) -> None:
        star_keys(keys, "write")
        if not keys:
            raise UsageError("write() needs at least one cache key")
        self.ctx = ctx
        self.keys = [k for k in dict.fromkeys(keys)]
        for k in self.keys:
            ctx.ekey(k)
        self.strategy = resolve_strategy(strategy if strategy is not None else ctx.o.strategy)
        self.value = value
        self.version = version
        self.ttl = ttl
        self.delay = ctx.o.double_delete_delay if delay is None else check_non_negative("delay", delay)
        if SP in self.strategy.before and value is MISSING:
            raise UsageError(f"strategy {self.strategy.name} updates the cache before the database: pass value=")

    def set_value(self, value: Any, version: Any = None) -> None:
        """Give the new value (and version) for a strategy that stores it after the commit."""
        self.value = value
        if version is not None:
            self.version = version

    def before(self) -> Flow[None]:
        return steps_flow(self.ctx, self.strategy.before, self.keys, self.value, self.version, self.ttl)

    def after(self, failed: bool) -> Flow[None]:
        s = self.strategy
        steps = s.on_error if failed else s.after
        yield from steps_flow(self.ctx, steps, self.keys, self.value, self.version, self.ttl)
        if s.delayed and not failed:
            keys, version, ctx = self.keys, self.version, self.ctx
            yield Schedule(self.delay, lambda: steps_flow(ctx, s.delayed, keys, MISSING, version, None), keys)


def peek_values_flow(ctx: Context, keys: Sequence[str]
                     ) -> Flow[list[tuple[bool, int | float | None, bool, bytes | None]]]:
    """Per key, without side effects (for audits): (holds a value, its version, negative entry, the stored
    payload). A value stale-marked by an invalidation (``serve_stale``) counts as no value: it is known to be
    old. One pipelined round trip."""
    replies = yield Batch(tuple(("GET", ctx.ekey(k)) for k in keys))
    out: list[tuple[bool, int | float | None, bool, bytes | None]] = []
    for r in replies:
        try:
            if isinstance(r, CommandError):  # a foreign key (wrong type) where an entry belongs: no value
                raise CorruptEntryError(str(r))
            e = decode_entry(r)
        except CorruptEntryError:
            out.append((False, None, False, None))
            continue
        if e is None:
            out.append((False, None, False, None))
            continue
        v = e.get("v")
        has_value = v is not None and "s" not in e
        try:
            dver = decode_version(e["ver"]) if "ver" in e else None
        except CorruptEntryError:
            dver = None
        out.append((has_value, dver, "n" in e, v if has_value else None))
    return out


def peek_flow(ctx: Context, key: str) -> Flow[dict[str, Any] | None]:
    """Read an entry's raw state without taking a lease (for audits and the lab)."""
    ek = ctx.ekey(key)
    reply = yield from script("peek", [ek], [])
    fields = dict(zip(reply[::2], reply[1::2], strict=True))
    if not fields:
        return None
    out: dict[str, Any] = {}
    for k, v in fields.items():
        name = k.decode() if isinstance(k, bytes) else k
        out[name] = v
    if "v" in out:
        out["value"] = ctx.decode(key, out["v"], out.get("n") in (b"1", "1"))
    return out
