"""The read flows: hit, or lease + load + fill, or wait for the lease holder (rules 1 and 2 of
:mod:`cachesync.core`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import logging
from typing import Any

from ..errors import UsageError
from .keys import wake_key
from .layout import decode_entry
from .options import check_positive
from .context import _groups, _interleave, Context, GetReply, parse_get, parse_wake
from .effects import Cmd, CommandError, Flow, HIT, LEASED, Load, MISS, RedisDown, script, WAIT, wait
from .values import CorruptEntry, decode_version, Entry, new_token, NOT_FOUND

log = logging.getLogger("cachesync")
# --------------------------------------------------------------------------- read flows


def _plain_hits(ctx: Context, ukeys: Sequence[str], idxs: list[int], reply: Sequence[Any],
                result: dict[str, Entry[Any]]) -> list[tuple[int, GetReply]]:
    """The batch fast path: ``get.lua``'s reply items that are plain hits (code 1, no flag: neither negative
    nor stale) are decoded into ``result`` here, in one loop without a :class:`GetReply` each; returns the
    other items, parsed, for the general rules (negative hits, waits, leases and undecodable payloads, which
    :func:`_hit` turns into a repair). Same outcome and the same ``hits`` count as :func:`_hit` per key."""
    loads = ctx.ser.loads
    rest: list[tuple[int, GetReply]] = []
    n = 0
    for j, i in enumerate(idxs):
        b = 4 * j
        if reply[b] == HIT and not reply[b + 3]:
            ver = reply[b + 2]
            try:
                value = loads(reply[b + 1])
                result[ukeys[i]] = cache_entry(value, None if ver is None else decode_version(ver))
                n += 1
                continue
            except Exception:  # noqa: S112 - undecodable: the general path below repairs it
                pass
        rest.append((i, parse_get(reply[b:b + 4])[0]))
    ctx.stats["hits"] += n
    return rest


def _mget_hits(ctx: Context, ukeys: Sequence[str], idxs: list[int], raws: Sequence[Any],
               result: dict[str, Any], corrupt: list[tuple[int, Exception]], bare: bool) -> list[int]:
    """The batch ``MGET`` fast path: fresh values in the compact layout (:mod:`cachesync.core.layout`) are
    decoded into ``result`` in one loop (as entries, or with ``bare`` as the values alone); foreign or undecodable entries go to ``corrupt`` (with the problem) for
    :func:`_repair`; returns the indexes left for ``get.lua`` (misses and every other state). Counts as
    :func:`_hit` does."""
    if len(raws) != len(idxs):
        raise CommandError(f"MGET answered {len(raws)} values for {len(idxs)} keys")
    loads = ctx.ser.loads
    rest: list[int] = []
    hits = negs = 0
    for i, raw in zip(idxs, raws, strict=True):
        if raw is None:
            rest.append(i)
            continue
        c = raw[0] if raw else 0
        if c == 86 or c == 78:  # b"V" / b"N"
            j = raw.find(b"|", 1)
            try:
                if j < 0:
                    raise CorruptEntry("not a cachesync entry (no version separator)")
                ver = decode_version(raw[1:j]) if j > 1 else None
                if c == 86:
                    try:
                        value = loads(raw[j + 1:])
                    except Exception as e:
                        ctx.stats["deserialize_errors"] += 1
                        raise CorruptEntry(f"payload cannot be decoded with {ctx.ser.name}: "
                                           f"{type(e).__name__}: {e}") from e
                    result[ukeys[i]] = value if bare else cache_entry(value, ver)
                    hits += 1
                else:
                    result[ukeys[i]] = NOT_FOUND if bare else cache_entry(NOT_FOUND, ver)
                    negs += 1
            except CorruptEntry as e:
                corrupt.append((i, e))
            continue
        try:
            decode_entry(raw)  # b"M" (get.lua judges it) or foreign
            rest.append(i)
        except CorruptEntry as e:
            corrupt.append((i, e))
    st = ctx.stats
    st["hits"] += hits
    if negs:
        st["negative_hits"] += negs
    return rest


def _hit(ctx: Context, key: str, r: GetReply) -> Entry[Any]:
    """A hit's Entry; :class:`CorruptEntry` when its payload cannot be decoded."""
    neg = r.flags == "n"
    assert r.payload is not None
    value = ctx.decode_stored(key, r.payload, neg)
    st = ctx.stats
    if neg:
        st["negative_hits"] += 1
    else:
        st["hits"] += 1
    return Entry(value, r.version, True) if r.flags == "s" else cache_entry(value, r.version)


def _repair(ctx: Context, key: str, ek: str, problem: object) -> Flow[Any]:
    """A corrupted or foreign entry (undecodable value, non-numeric field, wrong Redis type) is deleted, counted
    and logged once per key; the read goes on as a miss (lease, load, fill). Deleting is always safe: a lease
    it removes can no longer fill, and the next fill replaces the entry."""
    ctx.stats["corrupt_entries"] += 1
    if key not in ctx.corrupt_logged:
        if len(ctx.corrupt_logged) < 10_000:
            ctx.corrupt_logged.add(key)
        log.warning("cachesync: namespace %r key %r: corrupted or foreign entry (%s); deleted, read as a miss",
                    ctx.ns, key, problem)
    try:
        yield Cmd(("DEL", ek))
    except (RedisDown, CommandError):
        pass


def _release(ctx: Context, keys: list[str], token: str) -> Flow[Any]:
    """Give up a lease (no-op if the token does not hold it): waiters here and in other processes retry at once."""
    try:
        yield from script("release", keys, [token, ctx.wake_ms])
    except (RedisDown, CommandError):
        pass


_new_entry = Entry.__new__
_set_value, _set_version, _set_stale, _set_source, _set_filled = (
    Entry.__dict__[f].__set__ for f in ("value", "version", "stale", "source", "filled"))


def cache_entry(value: Any, version: int | float | None) -> Entry[Any]:
    """``Entry(value, version)`` of a hit (``source="cache"``), built without the frozen dataclass's
    ``__init__`` (one ``object.__setattr__`` call per field: half the cost of a batch hit's Python work)."""
    e = _new_entry(Entry)
    _set_value(e, value)
    _set_version(e, version)
    _set_stale(e, False)
    _set_source(e, "cache")
    _set_filled(e, False)
    return e


def hit_args(ctx: Context, key: str, ttl: float | None) -> tuple[str, ...]:
    """The first command of :func:`get_flow`: the fast-path ``GET`` of ``key``'s entry (validates the key and
    ``ttl``). A driver may send it before starting the flow and serve :func:`fresh_hit` without the flow."""
    if ttl is not None:
        check_positive("ttl", ttl)
    return ("GET", ctx.ekey(key))


def fresh_hit(ctx: Context, key: str, f: Any, count: bool = True) -> Entry[Any] | None:
    """The entry that the reply ``f`` of :func:`hit_args` serves (a fresh value in the compact layout of
    :mod:`cachesync.core.layout`, counted in ``hits`` or ``negative_hits``), or None when the read must go on
    (:func:`get_flow` does: a miss, or any other state, which ``get.lua`` judges). Raises :class:`CorruptEntry`
    for a string that is not an entry, or an undecodable payload or version (the flow repairs it). A driver
    trying the fast path passes ``count=False``: on a failure the flow judges the same reply again and counts
    it once."""
    if f is None:
        return None
    c = f[0] if f else 0
    if c == 86 or c == 78:  # b"V" / b"N"
        i = f.find(b"|", 1)
        if i < 0:
            raise CorruptEntry("not a cachesync entry (no version separator)")
        version = decode_version(f[1:i]) if i > 1 else None
        if c == 78:
            ctx.stats["negative_hits"] += 1
            return cache_entry(NOT_FOUND, version)
        value = ctx.decode_stored(key, f[i + 1:], False, count)
        ctx.stats["hits"] += 1
        return cache_entry(value, version)
    if c == 77:  # b"M": stale-marked, leased, tombstone: get.lua decides (a foreign one is repaired first)
        decode_entry(f)
        return None
    raise CorruptEntry("not a cachesync entry (unknown layout)")


def _holds_value(f: Any) -> bool:
    """Whether the reply of :func:`hit_args` holds a value (fresh or stale-marked): plain mode's miss test."""
    if f is None:
        return False
    try:
        e = decode_entry(f)
    except CorruptEntry:
        return False
    return e is not None and "v" in e


def get_flow(ctx: Context, key: str, ttl: float | None) -> Flow[Entry[Any]]:
    """Read one key: hit, or lease + load + fill, or wait for the lease holder.

    Cancellation-safe: whatever is thrown into the flow while it may hold a lease (a loader's exception,
    ``asyncio.CancelledError``, ``KeyboardInterrupt``) releases the lease first, so that waiters retry at once.
    """
    first = hit_args(ctx, key, ttl)
    ek = first[1]
    # Fast path: one plain GET (cheaper than a script call) serves every fresh hit. A driver may send this
    # first command itself before starting the flow (and answer it with its reply): see hit_args/fresh_hit.
    try:
        f = yield Cmd(first)
    except RedisDown as e:
        return (yield from _fallback_one(ctx, e))
    except CommandError as e:  # WRONGTYPE: a foreign key where the entry belongs
        yield from _repair(ctx, key, ek, e)
        f = None
    try:
        entry = fresh_hit(ctx, key, f)
        if entry is not None:
            return entry
    except CorruptEntry as e:
        yield from _repair(ctx, key, ek, e)
        f = None
    keys = [ek, wake_key(ek)]
    token = new_token()
    args = [token, ctx.lease_ms, ctx.mode, ctx.wake_ms]
    waited = 0.0
    o = ctx.o
    repaired = 0
    while True:
        if ctx.mode == "P" and not _holds_value(f):
            reply = [MISS, None, None, None]  # plain cache-aside: a miss loads without a lease
        else:
            try:
                reply = yield from script("get", keys, args)
            except RedisDown as e:
                return (yield from _fallback_one(ctx, e))
            except GeneratorExit:
                raise
            except BaseException:  # cancelled while get.lua may have granted us the lease
                yield from _release(ctx, keys, token)
                raise
        try:
            r = parse_get(reply)[0]
            if r.code == HIT:
                if r.flags == "s":  # plain mode: a stale-marked value counts as a hit
                    ctx.stats["stale_served"] += 1
                return _hit(ctx, key, r)
            if r.code == WAIT and o.serve_stale and r.payload is not None:
                entry = Entry(ctx.decode_stored(key, r.payload, False), r.version, True)
                ctx.stats["stale_served"] += 1
                return entry
        except CorruptEntry as e:
            if r.code == LEASED or repaired > 2:  # pragma: no cover - get.lua only leases an entry it can read
                raise
            repaired += 1
            yield from _repair(ctx, key, ek, e)
            f = None
            continue
        if r.code == WAIT:
            remaining = o.max_wait - waited
            if remaining <= 0:
                ctx.stats["loads"] += 1
                value = yield Load()
                return Entry(ctx.unwrap(value), source="loader")
            ctx.stats["waits"] += 1
            elapsed, item = yield from wait(ctx, [keys[1]], min(r.wait_s, remaining) + 0.001)
            waited += elapsed
            hit = None
            try:
                hit = parse_wake(item)
                if hit is not None:  # the lease holder's fill woke us with the value itself
                    return _hit(ctx, key, hit)
            except CorruptEntry:
                pass  # an unreadable wake-up item: read again
            f = None
            continue
        # LEASED (we hold the lease) or MISS (plain mode)
        ctx.stats["misses"] += 1
        ctx.stats["loads"] += 1
        try:
            value = yield Load()
            payload, ver, neg = ctx.encode(key, value)
            ttl_ms = ctx.ttl_ms(ttl, neg == "1")
        except GeneratorExit:
            raise
        except BaseException:
            if r.code == LEASED:
                yield from _release(ctx, keys, token)
            raise
        try:
            codes = yield from script("fill", keys, [token if r.code == LEASED else "", ctx.wake_ms, payload, ver,
                                              ttl_ms, neg])
        except RedisDown:
            ctx.stats["redis_errors"] += 1
            return Entry(ctx.unwrap(value), decode_version(ver or None), source="loader")
        except GeneratorExit:
            raise
        except BaseException:  # cancelled while fill.lua ran: the lease may still be ours
            if r.code == LEASED:
                yield from _release(ctx, keys, token)
            raise
        ok = int(codes[0]) == 1
        ctx.stats["fills" if ok else "fills_refused"] += 1
        if not ok:
            ctx.stats["fills_refused_older" if int(codes[0]) == -1 else "fills_refused_lease"] += 1
        return Entry(ctx.unwrap(value), decode_version(ver or None), source="loader", filled=ok)


def follower_accepts(entry: Entry[Any]) -> bool:
    """Read-your-writes through singleflight: may a reader that joined another caller's flight take its result?

    Only a hit or a value whose fill Redis accepted. A fill is accepted only while its lease is intact, so no
    invalidation came between the leader's lease and its fill; a value loaded without an accepted fill (refused,
    uncached fallback, a waiter's own load) may predate a write whose invalidation returned before the follower's
    read began, so the follower reads again. Both drivers apply this rule.
    """
    return entry.source == "cache" or entry.filled


def _fallback_one(ctx: Context, e: RedisDown) -> Flow[Entry[Any]]:
    ctx.stats["redis_errors"] += 1
    if ctx.o.on_redis_error == "fail":
        raise e.cause
    ctx.stats["fallback_loads"] += 1
    value = yield Load(fallback=True)
    return Entry(ctx.unwrap(value), source="fallback")


def _release_many(ctx: Context, eks: list[str], idxs: list[int], token: str) -> Flow[Any]:
    for group in _groups(ctx, [eks[i] for i in idxs]):
        yield from _release(ctx, _interleave([eks[idxs[j]] for j in group]), token)


def get_many_flow(ctx: Context, keys: Sequence[str], ttl: float | None) -> Flow[dict[str, Entry[Any]]]:
    """Read a batch: one ``MGET`` per slot group serves the fresh hits; for the rest one ``get.lua`` per slot
    group, one ``loader_many`` call for all leased keys, one fill. Returns each key's :class:`Entry`."""
    return (yield from _get_many(ctx, keys, ttl, False))


def get_many_values_flow(ctx: Context, keys: Sequence[str], ttl: float | None) -> Flow[dict[str, Any]]:
    """:func:`get_many_flow` answering each key's value (``NOT_FOUND`` included) instead of its entry, what
    ``Cache.get_many`` returns: a hit served by the ``MGET`` builds no :class:`Entry`."""
    return (yield from _get_many(ctx, keys, ttl, True))


def _loaded_many(values: Any) -> Mapping[str, Any]:
    """What ``loader_many`` returned, checked: a mapping whose keys are the str keys it was given. A key of another
    type (``{1: row}`` for ``["1"]``) would leave every asked key out, each cached as ``NOT_FOUND`` for
    ``negative_ttl``: a :class:`UsageError` naming the key instead."""
    if not isinstance(values, Mapping):
        raise UsageError(f"loader_many must return a mapping of key -> value, got {type(values).__name__}")
    for k in values:
        if not isinstance(k, str):
            raise UsageError(f"loader_many returned the key {k!r} ({type(k).__name__}): it is given the cache's str "
                             "keys and must map those same keys to values (a key it leaves out is NOT_FOUND)")
    return values


def _get_many(ctx: Context, keys: Sequence[str], ttl: float | None, bare: bool) -> Flow[dict[str, Any]]:
    ukeys = list(dict.fromkeys(keys))
    if ttl is not None:
        check_positive("ttl", ttl)
    eks = [ctx.ekey(k) for k in ukeys]
    token = new_token()
    args = [token, ctx.lease_ms, ctx.mode, ctx.wake_ms]
    result: dict[str, Entry[Any]] = {}
    fast: dict[str, Any] = {}  # the MGET's hits: bare values (``bare``) or entries

    def finish() -> dict[str, Any]:
        if bare:
            if not result and len(fast) == len(ukeys) and not ctx.cluster:
                return fast  # every key a hit, in the caller's order
            return {k: fast[k] if k in fast else result[k].value for k in ukeys}
        return {k: fast[k] if k in fast else result[k] for k in ukeys}

    pending = list(range(len(ukeys)))
    try:  # fast path: one MGET per slot group serves every fresh hit; the rest go through get.lua
        left: list[int] = []
        bad: list[tuple[int, Exception]] = []
        for group in _groups(ctx, eks):
            raws = yield Cmd(("MGET", *[eks[i] for i in group]))
            left += _mget_hits(ctx, ukeys, group, raws, fast, bad, bare)
        for i, problem in bad:  # deleted, counted and logged; then read through get.lua like a miss
            yield from _repair(ctx, ukeys[i], eks[i], problem)
            left.append(i)
        pending = left
    except CommandError:
        pass  # every key goes through get.lua, which reports or repairs
    except RedisDown as e:
        ctx.stats["redis_errors"] += 1
        if ctx.o.on_redis_error == "fail":
            raise e.cause from None
        down = [k for k in ukeys if k not in fast]
        ctx.stats["fallback_loads"] += 1
        got = _loaded_many((yield Load(down, fallback=True)))
        for k in down:
            result[k] = Entry(ctx.unwrap(got.get(k, NOT_FOUND)), source="fallback")
        return finish()
    waited = 0.0
    o = ctx.o
    repairs = 0
    while pending:
        leased: list[int] = []
        plain: list[int] = []
        waiting: list[tuple[int, float]] = []
        corrupt: list[int] = []
        asked: list[int] = []
        try:
            for group in _groups(ctx, [eks[i] for i in pending]):
                idxs = [pending[j] for j in group]
                asked.extend(idxs)
                reply = yield from script("get", _interleave([eks[i] for i in idxs]), args)
                if len(reply) != 4 * len(idxs):
                    raise CommandError(f"get.lua answered {len(reply)} items for {len(idxs)} keys")
                others = _plain_hits(ctx, ukeys, idxs, reply, result)
                for i, r in others:
                    k = ukeys[i]
                    try:
                        if r.code == HIT:
                            result[k] = _hit(ctx, k, r)
                        elif r.code == WAIT:
                            if o.serve_stale and r.payload is not None:
                                result[k] = Entry(ctx.decode_stored(k, r.payload, False), r.version, True)
                                ctx.stats["stale_served"] += 1
                            else:
                                waiting.append((i, r.wait_s))
                        elif r.code == LEASED:
                            leased.append(i)
                        else:
                            plain.append(i)
                    except CorruptEntry as e:
                        corrupt.append(i)
                        yield from _repair(ctx, k, eks[i], e)
        except RedisDown as e:
            if leased:
                yield from _release_many(ctx, eks, leased, token)
            ctx.stats["redis_errors"] += 1
            if o.on_redis_error == "fail":
                raise e.cause from None
            missing = [ukeys[i] for i in pending if ukeys[i] not in result]
            ctx.stats["fallback_loads"] += 1
            values = _loaded_many((yield Load(missing, fallback=True)))
            for k in missing:
                result[k] = Entry(ctx.unwrap(values.get(k, NOT_FOUND)), source="fallback")
            break
        except GeneratorExit:
            raise
        except BaseException:  # cancelled: release whatever get.lua may have leased to us in this round
            yield from _release_many(ctx, eks, asked, token)
            raise
        mine = leased + plain
        if mine:
            ctx.stats["misses"] += len(mine)
            ctx.stats["loads"] += 1
            try:
                values = _loaded_many((yield Load([ukeys[i] for i in mine])))
                enc = {i: ctx.encode(ukeys[i], values.get(ukeys[i], NOT_FOUND)) for i in mine}
                ttls = {i: ctx.ttl_ms(ttl, enc[i][2] == "1") for i in mine}
            except GeneratorExit:
                raise
            except BaseException:
                if leased:
                    yield from _release_many(ctx, eks, leased, token)
                raise
            for sub, tok in ((leased, token), (plain, "")):
                if not sub:
                    continue
                for group in _groups(ctx, [eks[i] for i in sub]):
                    idxs = [sub[j] for j in group]
                    fargs: list[Any] = [tok, ctx.wake_ms]
                    for i in idxs:
                        payload, ver, neg = enc[i]
                        fargs += [payload, ver, ttls[i], neg]
                    try:
                        codes = yield from script("fill", _interleave([eks[i] for i in idxs]), fargs)
                    except RedisDown:
                        ctx.stats["redis_errors"] += 1
                        codes = [0] * len(idxs)
                    except GeneratorExit:
                        raise
                    except BaseException:
                        if tok:
                            yield from _release_many(ctx, eks, sub, token)
                        raise
                    for i, c in zip(idxs, codes, strict=True):
                        ok = int(c) == 1
                        ctx.stats["fills" if ok else "fills_refused"] += 1
                        if not ok:
                            ctx.stats["fills_refused_older" if int(c) == -1 else "fills_refused_lease"] += 1
                        k = ukeys[i]
                        result[k] = Entry(ctx.unwrap(values.get(k, NOT_FOUND)), decode_version(enc[i][1] or None),
                                          source="loader", filled=ok)
        if corrupt and repairs < 3:  # repaired entries are read again at once (they now take a lease)
            repairs += 1
            pending = corrupt + [i for i, _ in waiting]
            if not waiting:
                continue
        elif corrupt:  # pragma: no cover - an entry that stays corrupt after three repairs
            raise CorruptEntry(f"entries of {[ukeys[i] for i in corrupt]!r} stay unreadable")
        if not waiting:
            break
        remaining = o.max_wait - waited
        if remaining <= 0:
            rest = [ukeys[i] for i, _ in waiting]
            ctx.stats["loads"] += 1
            values = _loaded_many((yield Load(rest)))
            for k in rest:
                result[k] = Entry(ctx.unwrap(values.get(k, NOT_FOUND)), source="loader")
            break
        ctx.stats["waits"] += 1
        first = _groups(ctx, [eks[i] for i, _ in waiting])[0]
        wks = [wake_key(eks[waiting[j][0]]) for j in first]
        elapsed, _ = yield from wait(ctx, wks, min(min(w for _, w in waiting), remaining) + 0.001)
        waited += elapsed
        pending = [i for i, _ in waiting] + (corrupt if corrupt and repairs <= 3 else [])
    return finish()
