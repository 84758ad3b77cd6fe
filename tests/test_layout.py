"""The entry layout: ``lua/_entry.lua`` (what the scripts read and write) and ``cachesync.core.layout`` (its
Python mirror) agree, on real Redis; foreign strings are refused by both; the fresh layout is what makes a hit
one GET and a batch hit one MGET."""

from __future__ import annotations

from typing import Any

from hypothesis import given, HealthCheck, settings, strategies as st
import pytest
import redis

import cachesync
from cachesync.core.layout import decode_entry, encode_entry, FIELDS
from cachesync.core.scripts import SCRIPTS
from cachesync.core.values import CorruptEntry
from cachesync.keys import entry_key

# A script that writes the given fields with the prelude's entry_put (so the Lua encoder is under test)
_PUT = SCRIPTS["peek"].source.split("local e = entry_get(KEYS[1])")[0] + """
local e = {}
for i = 1, #ARGV, 2 do
  local name, x = ARGV[i], ARGV[i + 1]
  if name == 'n' or name == 's' then e[name] = true else e[name] = x end
end
entry_put(KEYS[1], e, 60000)
return redis.call('EXISTS', KEYS[1])
"""


def _peek(r: redis.Redis, key: str) -> dict[str, bytes] | None:
    reply = r.eval(SCRIPTS["peek"].source, 1, key)
    out = {k.decode(): v for k, v in zip(reply[::2], reply[1::2], strict=True)}
    return out or (None if not r.exists(key) else out)


nums = st.one_of(st.integers(-10**15, 10**15).map(str), st.floats(-1e6, 1e6, allow_nan=False).map(repr))
entries = st.fixed_dictionaries({}, optional={
    "v": st.binary(max_size=40), "ver": nums, "n": st.just("1"), "s": st.just("1"), "fl": nums,
    "lt": st.text("0123456789abcdef", min_size=1, max_size=20), "ld": st.integers(1, 10**13).map(str),
    "w": st.integers(1, 1000).map(str), "ti": st.integers(1, 10**13).map(str)})


def _meaningful(e: dict[str, Any]) -> bool:
    return any(k in e for k in ("v", "fl", "lt", "w", "ti"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(e=entries)
def test_lua_and_python_encode_the_same_bytes_and_decode_the_same_fields(r: redis.Redis, namespace: str,
                                                                         e: dict[str, Any]) -> None:
    key = entry_key(namespace, "layout")
    r.delete(key)
    argv: list[Any] = [x for kv in e.items() for x in kv]
    exists = r.eval(_PUT, 1, key, *argv)
    if not _meaningful(e):  # nothing left: entry_put deletes
        assert exists == 0
        return
    raw = r.get(key)
    assert raw == encode_entry(e)
    want = {k: (v if isinstance(v, bytes) else v.encode()) for k, v in e.items()}
    got = decode_entry(raw)
    assert got == _peek(r, key)
    assert got == want


@pytest.mark.parametrize("raw", [b"", b"x", b"V", b"Vabc|x", b"Vnan|x", b"M1|2|v", b"M||q|||||x", b"M|x|v|||||",
                                 b"M||v||soon|||x", b"M||v|||many||x", b"hello world"])
def test_foreign_strings_are_refused_by_both(r: redis.Redis, namespace: str, raw: bytes) -> None:
    key = entry_key(namespace, "foreign")
    r.set(key, raw)
    with pytest.raises(CorruptEntry):
        decode_entry(raw)
    with pytest.raises(redis.ResponseError, match="holds no cachesync entry"):
        r.eval(SCRIPTS["peek"].source, 1, key)


def test_a_fill_stores_the_fresh_form_and_a_hit_is_one_get(cache: cachesync.Cache, r: redis.Redis,
                                                          namespace: str) -> None:
    cache.get("k", lambda: cachesync.Versioned({"a": 1}, 7))
    assert r.get(entry_key(namespace, "k")) == b'V7|{"a":1}'
    cache.set("n", cachesync.NOT_FOUND)
    assert r.get(entry_key(namespace, "n")).startswith(b"N|")
    cache.invalidate("k", version=8)
    assert decode_entry(r.get(entry_key(namespace, "k")))["fl"] == b"8"
    assert r.get(entry_key(namespace, "k"))[:1] == b"M"
    assert set(FIELDS) >= set(decode_entry(r.get(entry_key(namespace, "k"))))


def test_a_batch_of_hits_is_one_mget(redis_url: str, namespace: str) -> None:
    sent: list[str] = []
    c = cachesync.Cache(redis_url, namespace=namespace)
    try:
        c.get_many([f"k{i}" for i in range(20)], lambda ks: {k: k.upper() for k in ks})
        orig = c._command  # the driver's one seam for a flow's single commands

        def spy(eff: Any) -> Any:
            sent.append(str(eff.args[0]))
            return orig(eff)

        c._command = spy  # type: ignore[method-assign]
        assert c.get_many([f"k{i}" for i in range(20)], lambda ks: pytest.fail("hits expected")) == \
            {f"k{i}": f"K{i}" for i in range(20)}
        assert sent == ["MGET"]
        assert c.stats["hits"] == 20
    finally:
        c.close()


def test_get_many_counts_and_logs_foreign_entries_it_repairs(cache: cachesync.Cache, r: redis.Redis,
                                                            namespace: str) -> None:
    r.set(entry_key(namespace, "a"), b"someone else's string")
    r.set(entry_key(namespace, "b"), b"M|x|v|||||1")  # our form, a non-numeric floor
    r.set(entry_key(namespace, "c"), b'V1|{not json')
    got = cache.get_many(["a", "b", "c"], lambda ks: {k: k for k in ks})
    assert got == {"a": "a", "b": "b", "c": "c"}
    assert cache.stats["corrupt_entries"] == 3 and cache.stats["deserialize_errors"] == 1
    assert cache.get_many(["a", "b", "c"], lambda ks: pytest.fail("hits expected")) == got


def test_get_many_values_keep_the_callers_order_with_hits_misses_and_negatives(cache: cachesync.Cache) -> None:
    cache.get_many(["b", "d"], lambda ks: {"b": "B"})  # b cached, d cached as NOT_FOUND
    got = cache.get_many(["d", "a", "b", "c", "a"], lambda ks: {k: k.upper() for k in ks})
    assert list(got) == ["d", "a", "b", "c"]
    assert got == {"d": cachesync.NOT_FOUND, "a": "A", "b": "B", "c": "C"}
    assert list(cache.get_many(["c", "b", "a"], lambda ks: pytest.fail("hits expected"))) == ["c", "b", "a"]
    entries = cache.get_many_entries(["d", "b"], lambda ks: pytest.fail("hits expected"))
    assert entries["d"].value is cachesync.NOT_FOUND and entries["b"].source == "cache"
