"""The one invalidation path: ``Cache.invalidate_many`` / ``AsyncCache.invalidate_many`` (what the relay, the
workers, CDC and the auditor call), ``keys_with_prefix``, and ``Cache.run`` for add-on flows."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator

import pytest
import redis

import cachesync
from cachesync import protocol as P
from cachesync.errors import InvalidationError, InvalidKeyError, UsageError


def floor(cache: cachesync.Cache, key: str) -> bytes | None:
    e = cache.peek(key)
    return None if e is None else e.get("fl")


def test_each_key_gets_its_own_version_in_one_script_call(cache: cachesync.Cache, r: redis.Redis) -> None:
    for k in ("a", "b", "c"):
        cache.set(k, "v")
    cache.invalidate("warm-up")  # the script is loaded (a first EVALSHA may meet NOSCRIPT)
    calls: list[int] = []
    real = cache._command  # the driver's one seam for a flow's single commands

    def counting(eff: P.Cmd) -> object:
        if eff.args and eff.args[0] == "EVALSHA":
            calls.append(1)
        return real(eff)

    cache._command = counting  # type: ignore[method-assign]
    try:
        assert cache.invalidate_many([(["a", "b"], 5), (["c"], None), (["a"], 9)]) == 3
    finally:
        del cache._command
    assert len(calls) == 1  # one batch, one script call
    assert floor(cache, "a") == b"9"  # a key named twice keeps its highest version
    assert floor(cache, "b") == b"5" and floor(cache, "c") is None
    assert cache.get("a", lambda: P.Versioned("old", 8)) == "old"  # loaded, but the fill is refused (8 < 9)
    assert cache.peek("a").get("v") is None


def test_big_batches_are_chunked(cache: cachesync.Cache) -> None:
    keys = [f"k{i}" for i in range(P.INVALIDATE_CHUNK * 2 + 7)]
    for k in keys[:3]:
        cache.set(k, "v")
    assert cache.invalidate_many([(keys, 1)]) == 3
    assert all(floor(cache, k) == b"1" for k in (keys[0], keys[-1]))
    assert cache.stats["invalidations"] == len(keys)


@pytest.mark.parametrize("items, err, what", [
    ([("user:1", 1)], UsageError, "list of keys"),  # a string where the keys belong
    ([(["a"], "abc")], UsageError, "abc"),
    ([(["a"], float("nan"))], UsageError, "finite"),
    ([([1], None)], InvalidKeyError, "str"),
    ([(["a"],)], UsageError, "pairs"),
    ([(["x" * 2000], None)], InvalidKeyError, "max_key_bytes"),
])
def test_bad_batches_are_refused_before_anything_is_sent(cache: cachesync.Cache, items: object,
                                                         err: type[Exception], what: str) -> None:
    cache.set("a", "v")
    with pytest.raises(err, match=what):
        cache.invalidate_many(items)  # type: ignore[arg-type]
    assert cache.peek("a").get("v") is not None  # nothing applied


def test_unreachable_redis_names_the_keys(redis_url: str, namespace: str) -> None:
    c = cachesync.Cache("redis://127.0.0.1:1/0", namespace=namespace, socket_timeout=0.2)
    try:
        with pytest.raises(InvalidationError) as ei:
            c.invalidate_many([(["a", "b"], 1)])
        assert set(ei.value.keys) == {"a", "b"}
    finally:
        c.close()


def test_keys_with_prefix_and_the_old_module_is_gone(cache: cachesync.Cache) -> None:
    for k in ("p:1", "p:2", "q:1"):
        cache.set(k, "v")
    assert sorted(cache.keys_with_prefix("p:")) == ["p:1", "p:2"]
    assert sorted(cache.keys_with_prefix("p:", "q")) == ["p:1", "p:2", "q:1"]
    with pytest.raises(UsageError):
        list(cache.keys_with_prefix(["p:"]))  # type: ignore[arg-type]
    with pytest.raises(ImportError):
        importlib.import_module("cachesync.bus.apply")  # one invalidation path: no private second one


def test_run_drives_any_flow(cache: cachesync.Cache) -> None:
    cache.set("a", "v")
    got = cache.run(P.peek_values_flow(cache.ctx, ["a", "missing"]))
    assert got[0][0] is True and got[1] == (False, None, False, None)


async def test_async_twin(acache: cachesync.AsyncCache) -> None:
    await acache.set("a", "v")
    await acache.set("p:1", "v")
    assert await acache.invalidate_many([(["a"], 3), (["a", "b"], 2)]) == 1
    e = await acache.peek("a")
    assert e is not None and e.get("fl") == b"3"
    assert [k async for k in acache.keys_with_prefix("p:")] == ["p:1"]
    with pytest.raises(UsageError):
        await acache.invalidate_many([("a", 1)])


def test_run_reports_an_unreachable_redis_as_cache_unavailable(namespace: str) -> None:
    """A flow that does not handle RedisDown (peek, the auditor's reads) surfaces CacheUnavailableError naming
    the URL, never the protocol's internal signal."""
    c = cachesync.Cache("redis://127.0.0.1:1/0", namespace=namespace, socket_timeout=0.2, record_namespace=False)
    try:
        with pytest.raises(cachesync.CacheUnavailableError, match="127.0.0.1:1"):
            c.peek("k")
        with pytest.raises(cachesync.CacheUnavailableError):
            c.run(P.peek_values_flow(c.ctx, ["k"]))
    finally:
        c.close()


async def test_async_run_reports_an_unreachable_redis_as_cache_unavailable(namespace: str) -> None:
    c = cachesync.AsyncCache("redis://127.0.0.1:1/0", namespace=namespace, socket_timeout=0.2,
                             record_namespace=False)
    try:
        with pytest.raises(cachesync.CacheUnavailableError, match="127.0.0.1:1"):
            await c.peek("k")
    finally:
        await c.aclose()


def test_run_refuses_a_load_without_a_loader(cache: cachesync.Cache) -> None:
    def flow() -> P.Flow[object]:
        return (yield P.Load())

    with pytest.raises(UsageError, match="no loader"):
        cache.run(flow())


def test_a_not_found_exception_instance_keeps_a_short_traceback(cache: cachesync.Cache) -> None:
    gone = KeyError("gone")
    f = cache.cached("nfi:{i}", not_found=gone)(lambda i: cachesync.NOT_FOUND)
    depths = []
    for _ in range(3):
        with pytest.raises(KeyError):
            f(1)
        tb, n = gone.__traceback__, 0
        while tb is not None:
            tb, n = tb.tb_next, n + 1
        depths.append(n)
    assert depths[0] == depths[1] == depths[2]  # re-raising the instance does not pile up tracebacks


@pytest.mark.parametrize("items", [
    [(["a"], "12"), (["a"], "9")],  # digit strings: the highest number wins, not the longest or last string
    [(["a"], "007"), (["b"], "123456789012345")],  # leading zeros kept as given; 15 digits (below 2**53)
    [(["a"], "1.5"), (["a"], 2)],  # not digits only: through encode_version
    [(("a", "b"), None), ({"c"}, 3)],  # a tuple, a set: any iterable of keys but a string
    [(["a"], 5), (["a"], None), (["a"], 4)],  # an unknown version never lowers a known one
])
def test_merge_gives_what_encoding_each_version_gives(items: list[tuple[object, object]]) -> None:
    from cachesync.core.values import encode_version

    want: dict[str, str] = {}  # the plain definition: encode each version, keep the highest per key
    for keys, ver in items:
        v = encode_version(ver)
        for k in keys:  # type: ignore[attr-defined]
            old = want.get(k)
            if old is None or (v != "" and (old == "" or float(v) > float(old))):
                want[k] = v
    assert P.merge_invalidations(items) == want  # type: ignore[arg-type]


@pytest.mark.parametrize("items, err, what", [
    ([(["a"], "99999999999999999")], UsageError, "2\\*\\*53"),  # 17 digits, beyond 2**53: refused, not passed on
    ([(["a"], "\u00b2")], UsageError, "decimal"),  # superscript two
    ([([["a"]], None)], InvalidKeyError, "str"),  # an unhashable key: InvalidKeyError, not TypeError
])
def test_merge_refuses_what_looks_like_digits_but_is_not_a_version(items: object, err: type[Exception],
                                                                    what: str) -> None:
    with pytest.raises(err, match=what):
        P.merge_invalidations(items)  # type: ignore[arg-type]


def test_key_length_is_counted_in_utf8_bytes_beyond_the_cheap_bound(namespace: str) -> None:
    from cachesync.core.keys import check_key

    assert check_key("a" * 16, 16) == "a" * 16  # 16 characters, 16 bytes: longer than 16 / 4, still fits
    assert check_key("\u20ac" * 4, 16) == "\u20ac" * 4  # 4 characters of 3 bytes: fits without counting
    assert check_key("\u20ac" * 5, 16) == "\u20ac" * 5  # 15 bytes: counted, fits
    with pytest.raises(InvalidKeyError, match="17 bytes long"):
        check_key("\u20ac" * 5 + "ab", 16)
    with pytest.raises(InvalidKeyError, match="18 bytes long"):
        check_key("\U0001f600" * 4 + "ab", 16)  # 4-byte characters
    with pytest.raises(InvalidKeyError, match="empty"):
        check_key("", 16)


@contextlib.contextmanager
def batches_executed_by(cache: cachesync.Cache, execute: Callable[[tuple[tuple[object, ...], ...],
                                                                    Callable[[], list[object]]], list[object]]
                        ) -> Iterator[None]:
    """While inside, each batch the cache sends in one round trip (the driver's ``_batch``: a ``Batch`` effect, on
    a kept connection or a redis-py pipeline) runs ``execute(commands, real_send)`` (to watch what it sends, or to
    lose its replies)."""
    real = cache._batch

    def batch(eff: P.Batch) -> list[object]:
        return execute(eff.cmds, lambda: real(eff))

    cache._batch = batch  # type: ignore[method-assign]
    try:
        yield
    finally:
        del cache._batch


def test_big_batches_send_their_chunks_in_one_round_trip(cache: cachesync.Cache, r: redis.Redis) -> None:
    """Several ``invalidate.lua`` calls of one batch go in one pipeline (one round trip), each call still one
    atomic script with its own keys and versions."""
    keys = [f"k{i}" for i in range(P.INVALIDATE_CHUNK * 2 + 7)]
    cache.invalidate("warm-up")  # the script is loaded
    single: list[int] = []
    piped: list[list[object]] = []
    real = cache._command  # the driver's one seam for a flow's single commands

    def counting(eff: P.Cmd) -> object:
        if eff.args and eff.args[0] == "EVALSHA":
            single.append(1)
        return real(eff)

    def execute(cmds: tuple[tuple[object, ...], ...], ex: Callable[[], list[object]]) -> list[object]:
        piped.append([c[0] for c in cmds])
        return ex()

    cache._command = counting  # type: ignore[method-assign]
    try:
        with batches_executed_by(cache, execute):
            assert cache.invalidate_many([(keys, 7)]) == 0
    finally:
        del cache._command
    assert single == [] and piped == [["EVALSHA"] * 3]
    assert all(floor(cache, k) == b"7" for k in keys)


def test_a_flushed_script_cache_is_reloaded_for_a_pipelined_batch(cache: cachesync.Cache, r: redis.Redis) -> None:
    keys = [f"k{i}" for i in range(P.INVALIDATE_CHUNK + 3)]
    cache.set(keys[0], "v")
    cache.set(keys[-1], "v")
    r.script_flush()
    assert cache.invalidate_many([(keys, 3)]) == 2  # both calls answered NOSCRIPT, then were sent again
    assert all(floor(cache, k) == b"3" for k in keys)
    assert cache.stats["invalidations"] == len(keys) and cache.stats["invalidations_failed"] == 0


def test_a_cut_round_trip_names_every_key_it_carried(redis_url: str, namespace: str) -> None:
    """When the pipelined round trip is cut, each call may or may not have run: all its keys are named as still
    to invalidate (here the calls ran and only the replies were lost: naming them is harmless, invalidation is
    idempotent), and nothing is reported done that was not confirmed."""
    c = cachesync.Cache(redis_url, namespace=namespace)
    c.invalidate("warm-up")
    keys = [f"k{i}" for i in range(P.INVALIDATE_CHUNK + 3)]
    def replies_lost(cmds: tuple[tuple[object, ...], ...], ex: Callable[[], list[object]]) -> list[object]:
        ex()  # the calls run; the replies are lost
        raise redis.ConnectionError("gone")

    with batches_executed_by(c, replies_lost), pytest.raises(InvalidationError) as ei:
        c.invalidate_many([(keys, 1)])
    assert list(ei.value.keys) == keys
    assert c.stats["invalidations_failed"] == len(keys) and c.stats["invalidations"] == 1  # the warm-up
    assert floor(c, keys[0]) == b"1" and floor(c, keys[-1]) == b"1"
    c.close()


def test_unreachable_redis_while_reloading_names_only_the_unanswered_chunks(redis_url: str, namespace: str,
                                                                             r: redis.Redis) -> None:
    c = cachesync.Cache(redis_url, namespace=namespace)
    keys = [f"k{i}" for i in range(2 * P.INVALIDATE_CHUNK + 3)]
    c.invalidate("warm-up")
    real, resent = c._command, []  # the driver's one seam for a flow's single commands

    def second_resend_fails(eff: P.Cmd) -> object:
        if eff.args and eff.args[0] == "EVALSHA":  # a call sent again after NOSCRIPT (the pipeline does not come here)
            resent.append(1)
            if len(resent) == 3:  # chunk 1: NOSCRIPT again, SCRIPT LOAD, applied; chunk 2: cut
                raise redis.ConnectionError("gone")
        return real(eff)

    r.script_flush()  # all three pipelined calls meet NOSCRIPT
    c._command = second_resend_fails  # type: ignore[method-assign]
    try:
        with pytest.raises(InvalidationError) as ei:
            c.invalidate_many([(keys, 1)])
    finally:
        del c._command
    # chunk 1 was reloaded and applied; chunks 2 and 3 were never answered
    assert list(ei.value.keys) == keys[P.INVALIDATE_CHUNK:]
    assert c.stats["invalidations_failed"] == len(keys) - P.INVALIDATE_CHUNK
    assert floor(c, keys[0]) == b"1" and floor(c, keys[-1]) is None
    c.close()


def test_non_ascii_digit_versions_are_refused_by_merge_and_encode_version() -> None:
    """Python's float() reads Arabic-Indic digits, Lua's tonumber() does not: such a version would make the whole
    invalidate.lua call fail (a relay or CDC batch stuck on one row), so both refuse it as bad data."""
    from cachesync.core.values import encode_version


    with pytest.raises(UsageError, match="version"):
        encode_version("\u0661\u0662")
    with pytest.raises(UsageError, match="version"):
        P.merge_invalidations([(["a"], "\u0661\u0662")])
