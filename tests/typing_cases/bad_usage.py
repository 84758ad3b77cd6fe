"""Checked by tests/test_typing.py: each line with an "E:" comment at its end must be a mypy error."""

from __future__ import annotations

import cachesync
from cachesync import NOT_FOUND

cache = cachesync.Cache(namespace="typing", lease_tll=5)  # E: a misspelt option
cache2 = cachesync.Cache(namespace="typing", default_ttl="60")  # E: wrong type
cache3 = cachesync.Cache(namespace="typing", on_redis_error="explode")  # E: not a known value


def load() -> int:
    return 1


x = cache.get("k", load)
y: int = x  # E: may be NOT_FOUND


@cache.cached("k:{a}")
def f(a: int) -> int:
    return a


f("not an int")  # E: the decorated signature is kept
z = NOT_FOUND + 1  # E: NOT_FOUND is not a number
