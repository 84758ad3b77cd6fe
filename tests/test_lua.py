"""Each Lua script tested directly against the real Redis (no Python protocol in between)."""

from __future__ import annotations

import uuid

import pytest
import redis

from cachesync.scripts import SCRIPTS
from entries import hexists, hget, hgetall, hset  # noqa: F401


@pytest.fixture
def run(r: redis.Redis):
    def call(name: str, keys: list[str], *args: object):
        s = SCRIPTS[name]
        return r.eval(s.source, len(keys), *keys, *args)

    return call


@pytest.fixture
def k() -> list[str]:
    ek = f"cs:luatest:{{{uuid.uuid4().hex}}}"
    return [ek, ek + ":w"]


def test_get_miss_grants_lease_with_server_clock(run, r, k):
    out = run("get", k, "tok1", 5000, "L", 1000)
    assert out[:2] == [2, b"tok1"]
    h = hgetall(r, k[0])
    assert h[b"lt"] == b"tok1"
    sec, usec = r.time()
    now_ms = sec * 1000 + usec // 1000
    assert now_ms < int(h[b"ld"]) <= now_ms + 5000
    assert 0 < r.pttl(k[0]) <= 5000


def test_get_second_reader_waits_and_registers(run, r, k):
    run("get", k, "tok1", 5000, "L", 1000)
    out = run("get", k, "tok2", 5000, "L", 1000)
    assert out[0] == 3 and 0 < out[1] <= 5000 and out[2] is None
    assert hget(r, k[0], "w") == b"1"


def test_get_sent_again_by_the_lease_holder_is_granted_again(run, r, k):
    """A get.lua call whose reply was lost with its connection is sent again (kept connections do, as redis-py's
    retries do) with the same token: granted again, not a wait for itself until max_wait; nobody registered."""
    assert run("get", k, "tok1", 5000, "L", 1000)[:2] == [2, b"tok1"]
    out = run("get", k, "tok1", 5000, "L", 1000)
    assert out[:2] == [2, b"tok1"]
    assert hget(r, k[0], "lt") == b"tok1" and hget(r, k[0], "w") is None
    assert run("fill", k, "tok1", 1000, b"v", "", 60000, "0") == [1]


def test_fill_with_lease_is_a_hit_and_wakes_waiters(run, r, k):
    run("get", k, "tok1", 5000, "L", 1000)
    run("get", k, "tok2", 5000, "L", 1000)
    run("get", k, "tok3", 5000, "L", 1000)
    assert run("fill", k, "tok1", 1000, b'"v"', "7", 60000, "0") == [1]
    assert r.lrange(k[1], 0, -1) == [b'F07|"v"'] * 2  # two waiters woken, each handed the value
    assert run("get", k, "tok9", 5000, "L", 1000) == [1, b'"v"', b"7", b""]
    assert hget(r, k[0], "lt") is None


def test_fill_after_invalidation_is_refused(run, r, k):
    run("get", k, "tok1", 5000, "L", 1000)
    assert run("invalidate", k, 10000, "d", 1000, "", "", *[""] * (len(k) // 2)) == 0
    assert run("fill", k, "tok1", 1000, b'"old"', "", 60000, "0") == [0]
    assert hget(r, k[0], "v") is None
    assert hget(r, k[0], "ti") is not None  # tombstone


def test_fill_with_wrong_token_is_refused(run, k):
    run("get", k, "tok1", 5000, "L", 1000)
    assert run("fill", k, "other", 1000, b"1", "", 60000, "0") == [0]


def test_version_floor_refuses_older_fill_and_releases_lease(run, r, k):
    run("invalidate", k, 10000, "d", 1000, "", "", *["10"] * (len(k) // 2))
    assert hget(r, k[0], "fl") == b"10"
    run("get", k, "tok1", 5000, "L", 1000)
    assert run("fill", k, "tok1", 1000, b"9", "9", 60000, "0") == [-1]
    assert hget(r, k[0], "lt") is None
    out = run("get", k, "tok2", 5000, "L", 1000)
    assert out[0] == 2
    assert run("fill", k, "tok2", 1000, b"10", "10", 60000, "0") == [1]


def test_invalidate_raises_floor_from_cached_version(run, r, k):
    run("get", k, "t", 5000, "L", 1000)
    run("fill", k, "t", 1000, b"1", "5", 60000, "0")
    assert run("invalidate", k, 10000, "d", 1000, "", "", *[""] * (len(k) // 2)) == 1
    assert hget(r, k[0], "fl") == b"5"
    assert 0 < r.pttl(k[0]) <= 10000


def test_invalidate_publishes_entry_keys(run, r, k):
    p = r.pubsub()
    p.subscribe("cs:luatest:inv")
    assert p.get_message(timeout=1)["type"] == "subscribe"
    k2 = [k[0] + "x", k[0] + "x:w"]
    run("invalidate", k + k2, 10000, "d", 1000, "cs:luatest:inv", "", *[""] * (len(k + k2) // 2))
    msg = p.get_message(timeout=1)
    assert msg["data"] == f"{k[0]}\n{k2[0]}".encode()
    p.close()


def test_mark_stale_keeps_value_and_serves_it_to_waiters(run, r, k):
    run("get", k, "t", 5000, "L", 1000)
    run("fill", k, "t", 1000, b'"old"', "1", 60000, "0")
    run("invalidate", k, 10000, "s", 1000, "", "", *["2"] * (len(k) // 2))
    out = run("get", k, "t2", 5000, "L", 1000)  # lease + stale value for the reloader
    assert out == [2, b"t2", b'"old"', b"1"]
    out = run("get", k, "t3", 5000, "L", 1000)  # others: wait, with the stale value offered
    assert out[0] == 3 and out[2] == b'"old"'
    assert run("get", k, "t4", 5000, "P", 1000) == [1, b'"old"', b"1", b"s"]


def test_plain_mode_never_leases(run, r, k):
    assert run("get", k, "t", 5000, "P", 1000) == [0, None, None, None]
    assert r.exists(k[0]) == 0
    assert run("fill", k, "", 1000, b"1", "", 60000, "0") == [1]


def test_set_voids_lease_and_guards_version(run, r, k):
    run("get", k, "t", 5000, "L", 1000)
    assert run("set", k, b"2", "2", 60000, "0", 1000, "") == 1
    assert run("fill", k, "t", 1000, b"1", "1", 60000, "0") == [0]
    assert run("set", k, b"1", "1", 60000, "0", 1000, "") == -1
    assert hget(r, k[0], "v") == b"2"
    assert run("set", k, b"x", "", 60000, "0", 1000, "") == 1  # unversioned: unconditional


def test_negative_entry_flag(run, k):
    run("get", k, "t", 5000, "L", 1000)
    run("fill", k, "t", 1000, b"", "", 30000, "1")
    assert run("get", k, "t2", 5000, "L", 1000) == [1, b"", None, b"n"]


def test_release_wakes_waiters_and_frees_lease(run, r, k):
    run("get", k, "t", 5000, "L", 1000)
    run("get", k, "t2", 5000, "L", 1000)
    assert run("release", k, "wrong", 1000) == 0
    assert run("release", k, "t", 1000) == 1
    assert r.llen(k[1]) == 1
    assert run("get", k, "t3", 5000, "L", 1000)[0] == 2


def test_expired_lease_is_taken_over(run, r, k):
    run("get", k, "t", 5000, "L", 1000)
    hset(r, k[0], "ld", 1)  # deadline in the past (server clock)
    assert run("get", k, "t2", 5000, "L", 1000)[:2] == [2, b"t2"]
    assert run("fill", k, "t", 1000, b"1", "", 60000, "0") == [0]


def test_batch_get_and_fill(run, r, k):
    k2 = [k[0] + "b", k[0] + "b:w"]
    out = run("get", k + k2, "t", 5000, "L", 1000)
    assert out[0] == 2 and out[4] == 2
    assert run("fill", k + k2, "t", 1000, b"1", "", 60000, "0", b"", "", 30000, "1") == [1, 1]
    out = run("get", k + k2, "t", 5000, "L", 1000)
    assert out == [1, b"1", None, b"", 1, b"", None, b"n"]


def test_scripts_have_headers():
    for s in SCRIPTS.values():
        head = s.source.split("\n", 12)
        text = "\n".join(head)
        assert "KEYS" in text and "Reply" in text, s.name


def test_invalidate_turns_pending_wakeups_into_retries(run, r, k):
    """A value wake-up not yet popped (its waiter died) must not hand an invalidated value to a later waiter."""
    run("get", k, "t1", 5000, "L", 1000)
    run("get", k, "t2", 5000, "L", 1000)              # a waiter registers, then dies
    run("fill", k, "t1", 1000, b"old", "1", 60000, "0")
    assert r.lrange(k[1], 0, -1) == [b"F01|old"]
    run("invalidate", k, 10000, "d", 1000, "", "", *["2"] * (len(k) // 2))
    assert r.lrange(k[1], 0, -1) == [b"0"]            # now only a "retry"
    run("get", k, "t3", 5000, "L", 1000)
    run("get", k, "t4", 5000, "L", 1000)
    run("fill", k, "t3", 1000, b"new", "2", 60000, "0")
    assert r.lrange(k[1], 0, -1) == [b"F02|new"] * 2  # the pending retry became the new value too


def test_set_wakes_waiters_with_value_and_refusal_with_retry(run, r, k):
    run("get", k, "t1", 5000, "L", 1000)
    run("get", k, "t2", 5000, "L", 1000)
    assert run("set", k, b"w", "", 60000, "1", 1000, "") == 1
    assert r.lrange(k[1], 0, -1) == [b"F1|w"]


def test_invalidate_batch_gives_each_key_its_own_version(run, r, k):
    k2 = [f"cs:luatest:{{{uuid.uuid4().hex}}}"]
    k2.append(k2[0] + ":w")
    hset(r, k[0], mapping={"v": "a", "ver": "3"})
    hset(r, k2[0], mapping={"v": "b", "ver": "1"})
    assert run("invalidate", k + k2, 10000, "d", 1000, "", "", "7", "") == 2
    assert hget(r, k[0], "fl") == b"7"  # its own version
    assert hget(r, k2[0], "fl") == b"1"  # no version given: the cached one becomes the floor
    assert hget(r, k[0], "v") is None and hget(r, k2[0], "v") is None


@pytest.mark.parametrize("args", [
    (10000, "d", 1000, "", ""),  # no version for the key
    (10000, "d", 1000, "", "", "1", "2"),  # one too many
    (10000, "x", 1000, "", "", "1"),  # bad mode
    (0, "d", 1000, "", "", "1"),  # bad tombstone TTL
    (10000, "d", "nan", "", "", "1"),  # bad wake TTL
    (10000, "d", 1000, "", "", "abc"),  # a version that is not a number
    (10000, "d", 1000, "", "", "inf"),
])
def test_invalidate_validates_before_it_mutates(run, r, k, args):
    hset(r, k[0], mapping={"v": "a", "ver": "3"})
    with pytest.raises(redis.ResponseError, match="invalidate.lua"):
        run("invalidate", k, *args)
    assert hgetall(r, k[0]) == {b"v": b"a", b"ver": b"3"}  # nothing changed
