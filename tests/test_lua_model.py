"""Model-based test: the Lua scripts against a Python reference model of the protocol (Hypothesis stateful).

The model keeps, per key: value, version, negative flag, stale flag, version floor, lease token,
waiter count, tombstone. Lease deadlines are far in the future except when the ``expire_lease``
rule moves one into the past (in Redis and in the model alike).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cachesync.scripts import SCRIPTS

from conftest_services import REDIS_URL, require_service
from entries import hexists, hget, hgetall, hset  # noqa: F401

KEYS = ["a", "b"]
TOKENS = ["t1", "t2", "t3"]
versions = st.one_of(st.none(), st.integers(min_value=0, max_value=5))


@dataclass
class E:
    v: bytes | None = None
    ver: int | None = None
    n: bool = False
    s: bool = False
    fl: int | None = None
    lt: str | None = None
    w: int = 0
    ti: bool = False
    expired: bool = False

    def exists(self) -> bool:
        return any([self.v is not None, self.fl is not None, self.lt is not None, self.w, self.ti])


def vmax(*xs: int | None) -> int | None:
    xs2 = [x for x in xs if x is not None]
    return max(xs2) if xs2 else None


class Model:
    def __init__(self) -> None:
        self.e = {k: E() for k in KEYS}

    def get(self, k: str, token: str, mode: str) -> tuple:
        e = self.e[k]
        if e.v is not None and not e.s:
            return (1, e.v, e.ver, "n" if e.n else "")
        if mode == "P":
            return (1, e.v, e.ver, "s") if e.v is not None else (0, None, None, None)
        if e.lt is not None and not e.expired and e.lt != token:  # the holder's own call again: granted again
            e.w += 1
            return (3, e.v, e.ver)
        e.lt, e.expired = token, False
        return (2, token, e.v, e.ver)

    def _store(self, e: E, v: bytes, ver: int | None, neg: bool) -> None:
        fl = vmax(e.fl, ver)
        e.__dict__.update(E(v=v, ver=ver, n=neg, fl=fl).__dict__)

    def fill(self, k: str, token: str, v: bytes, ver: int | None, neg: bool) -> int:
        e = self.e[k]
        if token != "" and e.lt != token:
            return 0
        if ver is not None and e.fl is not None and ver < e.fl:
            e.lt, e.w, e.expired = None, 0, False
            return -1
        self._store(e, v, ver, neg)
        return 1

    def set(self, k: str, v: bytes, ver: int | None) -> int:
        e = self.e[k]
        if ver is not None and e.fl is not None and ver < e.fl:
            e.lt, e.w, e.expired = None, 0, False
            return -1
        self._store(e, v, ver, False)
        return 1

    def invalidate(self, ks: list[str], ver: int | None, mode: str) -> int:
        had = 0
        for k in ks:
            e = self.e[k]
            had += e.v is not None
            fl = vmax(e.fl, e.ver, ver)
            if mode == "s" and e.v is not None:
                e.lt, e.w, e.s, e.ti, e.fl, e.expired = None, 0, True, True, fl, False
            else:
                e.__dict__.update(E(fl=fl, ti=True).__dict__)
        return had

    def release(self, k: str, token: str) -> int:
        e = self.e[k]
        if e.lt == token:
            e.lt, e.w, e.expired = None, 0, False
            return 1
        return 0


class LuaVsModel(RuleBasedStateMachine):
    r: redis.Redis

    @initialize()
    def setup(self) -> None:
        self.model = Model()
        self.prefix = f"cs:model:{uuid.uuid4().hex[:8]}"

    def keys(self, k: str) -> list[str]:
        ek = f"{self.prefix}:{{{k}}}"
        return [ek, ek + ":w"]

    def call(self, name: str, keys: list[str], *args: object):
        s = SCRIPTS[name]
        return self.r.evalsha(s.sha, len(keys), *keys, *args)

    @rule(k=st.sampled_from(KEYS), token=st.sampled_from(TOKENS), mode=st.sampled_from("LLLP"))
    def get(self, k: str, token: str, mode: str) -> None:
        out = self.call("get", self.keys(k), token, 600000, mode, 60000)
        exp = self.model.get(k, token, mode)
        if exp[0] == 3:
            assert out[0] == 3 and out[2] == exp[1] and _ver(out[3]) == exp[2]
        elif exp[0] == 2:
            assert out[0] == 2 and out[1] == token.encode() and out[2] == exp[2] and _ver(out[3]) == exp[3]
        elif exp[0] == 1:
            assert [out[0], out[1], _ver(out[2]), out[3]] == [1, exp[1], exp[2], exp[3].encode()]
        else:
            assert out == [0, None, None, None]

    @rule(k=st.sampled_from(KEYS), token=st.sampled_from(TOKENS + [""]), v=st.binary(max_size=3), ver=versions,
          neg=st.booleans())
    def fill(self, k: str, token: str, v: bytes, ver: int | None, neg: bool) -> None:
        out = self.call("fill", self.keys(k), token, 60000, v, "" if ver is None else ver, 600000, "1" if neg else "0")
        assert out == [self.model.fill(k, token, v, ver, neg)]

    @rule(k=st.sampled_from(KEYS), v=st.binary(max_size=3), ver=versions)
    def set(self, k: str, v: bytes, ver: int | None) -> None:
        out = self.call("set", self.keys(k), v, "" if ver is None else ver, 600000, "0", 60000, "")
        assert out == self.model.set(k, v, ver)

    @rule(ks=st.lists(st.sampled_from(KEYS), min_size=1, max_size=2, unique=True),
          vers=st.lists(versions, min_size=2, max_size=2), mode=st.sampled_from("ds"))
    def invalidate(self, ks: list[str], vers: list[int | None], mode: str) -> None:
        """One call for a batch, each key with its own version (the model applies them key by key)."""
        keys = [x for k in ks for x in self.keys(k)]
        args = ["" if v is None else v for v in vers[:len(ks)]]
        out = self.call("invalidate", keys, 600000, mode, 60000, "", "", *args)
        assert out == sum(self.model.invalidate([k], v, mode) for k, v in zip(ks, vers, strict=False))

    @rule(k=st.sampled_from(KEYS), token=st.sampled_from(TOKENS))
    def release(self, k: str, token: str) -> None:
        assert self.call("release", self.keys(k), token, 60000) == self.model.release(k, token)

    @rule(k=st.sampled_from(KEYS))
    def expire_lease(self, k: str) -> None:
        """The lease deadline passes (moved into the past on the server): another reader may take over."""
        e = self.model.e[k]
        if e.lt is not None:
            hset(self.r, self.keys(k)[0], "ld", 1)
            e.expired = True

    @invariant()
    def state_matches(self) -> None:
        if not hasattr(self, "model"):
            return
        for k in KEYS:
            h = hgetall(self.r, self.keys(k)[0])
            e = self.model.e[k]
            assert h.get(b"v") == e.v, (k, h, e)
            assert _ver(h.get(b"ver")) == e.ver, (k, h, e)
            assert _ver(h.get(b"fl")) == e.fl, (k, h, e)
            assert (h.get(b"lt") or b"").decode() == (e.lt or ""), (k, h, e)
            assert (h.get(b"s") == b"1") == e.s, (k, h, e)
            assert int(h.get(b"w") or 0) == e.w, (k, h, e)
            assert (h != {}) == e.exists(), (k, h, e)

    def teardown(self) -> None:
        if hasattr(self, "prefix"):
            for k in KEYS:
                self.r.delete(*self.keys(k))


def _ver(b: bytes | None) -> int | None:
    return None if b is None else int(b)


@pytest.fixture(scope="module")
def rclient():
    require_service("redis", *_hp(REDIS_URL))
    c = redis.Redis.from_url(REDIS_URL)
    for s in SCRIPTS.values():
        c.script_load(s.source)
    yield c
    c.close()


def _hp(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    p = urlsplit(url)
    return p.hostname or "127.0.0.1", p.port or 6379


def test_lua_scripts_match_the_reference_model(rclient):
    LuaVsModel.r = rclient
    LuaVsModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
    LuaVsModel.TestCase().runTest()
