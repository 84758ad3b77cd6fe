"""Small helpers of the conformance suites (no pytest needed): bounded polls and free ports."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(cond: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``cond()`` every 5 ms until it returns something truthy (returned) or ``timeout`` seconds pass
    (``AssertionError`` naming ``what``). The suites wait for an observable condition, never sleep."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for "server unreachable" tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tombstoned(cache: Any, key: str) -> bool:
    """Whether ``key`` holds an invalidation tombstone in ``cache`` (a :class:`cachesync.Cache`)."""
    e = cache.peek(key)
    return bool(e and e.get("ti"))
