"""Checked by tests/test_typing.py with mypy --strict: every line here must type-check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cachesync
from cachesync import NOT_FOUND, NotFound, Versioned


@dataclass
class User:
    id: int
    name: str


def load_user(uid: int) -> Versioned[User] | NotFound:
    return Versioned(User(uid, "a"), 1) if uid else NOT_FOUND


def load_many(keys: list[str]) -> dict[str, User]:
    return {k: User(1, k) for k in keys}


cache = cachesync.Cache("redis://127.0.0.1:6379/0", namespace="typing", default_ttl=60, on_redis_error="fail")

u = cache.get("user:1", lambda: load_user(1))
if u is NOT_FOUND:
    missing: Literal[NotFound.NOT_FOUND] = u
else:
    name: str = u.name

e = cache.get_entry("user:1", lambda: load_user(1))
if not isinstance(e.value, NotFound):
    user_id: int = e.value.id

many = cache.get_many(["a", "b"], load_many)
for v in many.values():
    if v is not NOT_FOUND:
        n: str = v.name


@cache.cached("user:{uid}")
def cached_user(uid: int) -> Versioned[User] | NotFound:
    return load_user(uid)


got = cached_user(3)
if got is not NOT_FOUND:
    also: str = got.name
k: str = cached_user.key(3)
acache = cachesync.AsyncCache(namespace="typing")


async def load_user_async(uid: int) -> User:
    return User(uid, "b")


async def main() -> None:
    a = await acache.get("user:2", lambda: load_user_async(2))
    if a is not NOT_FOUND:
        s: str = a.name
        print(s)

    @acache.cached("u:{uid}")
    async def cached_async(uid: int) -> User:
        return User(uid, "c")

    c = await cached_async(1)
    if c is not NOT_FOUND:
        t: str = c.name
        print(t)
