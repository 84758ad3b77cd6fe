"""What a flow yields (``Cmd``, ``Batch``, ``Load``, ``Schedule``), what a driver throws into it, and the
sub-flows every flow is built from (``script``: EVALSHA with the NOSCRIPT fallback; ``wait``: BLPOP)."""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
import logging
from typing import TYPE_CHECKING, Any

from .scripts import SCRIPTS
from .values import T

if TYPE_CHECKING:
    from .context import Context

log = logging.getLogger("cachesync")
# --------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class Cmd:
    """Run one plain Redis command (``args[0]`` is its name); send back its reply.

    ``route`` matters only on Redis Cluster, for a command without keys: a key (run it on the primary that owns
    the key's slot) or ``"*"`` (run it on every primary).
    """

    args: tuple[Any, ...]
    route: str | None = None


@dataclass(frozen=True, slots=True)
class Load:
    """Call the loader; send back its value (``keys is None``) or a mapping key -> value (batch).

    ``fallback`` loads are throttled to ``fallback_concurrency`` by the driver.
    """

    keys: list[str] | None = None
    fallback: bool = False


@dataclass(frozen=True, slots=True)
class Schedule:
    """Run ``flow_factory()``'s flow after ``delay`` seconds, in the background; retry it until it succeeds."""

    delay: float
    flow_factory: Any
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Batch:
    """Run several plain Redis commands in one pipelined round trip (not a transaction); send back their replies
    in order, an error reply as a :class:`CommandError` in its place (NOSCRIPT as a :class:`NoScript`). Keyed
    commands only (they are routed by key on a cluster)."""

    cmds: tuple[tuple[Any, ...], ...]


class NoScript(Exception):
    """Thrown into a flow by a driver when Redis answers NOSCRIPT (its script cache was flushed or restarted)."""


class CommandError(Exception):
    """Thrown into a flow by a driver when Redis answers an error reply other than NOSCRIPT (e.g. WRONGTYPE)."""


class RedisDown(Exception):
    """Thrown into a flow by a driver when Redis is unreachable."""

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(str(cause))


Flow = Generator[Any, Any, T]
"""A flow that returns a ``T``: drive it with :meth:`Cache.run` / :meth:`AsyncCache.run` (``Flow[int]``...)."""

HIT, LEASED, WAIT, MISS = 1, 2, 3, 0


# --------------------------------------------------------------------------- sub-flows


SCRIPT_LOADS = 3
"""How many times :func:`script` loads a script that Redis keeps answering NOSCRIPT for (its script cache flushed
again between the load and the call) before it gives up with a :class:`CommandError`."""


def script(name: str, keys: list[str], args: list[Any]) -> Flow[Any]:
    """Run Lua script ``name`` (``EVALSHA``; on NOSCRIPT, ``SCRIPT LOAD`` where the keys live, then again, up to
    :data:`SCRIPT_LOADS` times; then a :class:`CommandError` naming the script: NOSCRIPT never leaves a flow)."""
    s = SCRIPTS[name]
    cmd = ("EVALSHA", s.sha, len(keys), *keys, *args)
    for _ in range(SCRIPT_LOADS):
        try:
            return (yield Cmd(cmd))
        except NoScript:
            yield Cmd(("SCRIPT", "LOAD", s.source), route=keys[0] if keys else "*")
    try:
        return (yield Cmd(cmd))
    except NoScript:
        raise CommandError(f"NOSCRIPT: Redis lost the cachesync script {name}.lua again right after each of "
                           f"{SCRIPT_LOADS} SCRIPT LOADs (its script cache is being flushed)") from None


def wait(ctx: Context, wake_keys: list[str], timeout: float) -> Flow[tuple[float, Any]]:
    """Block on the wake lists (one ``BLPOP`` of at most 80 % of the socket timeout; callers loop for longer).

    Returns ``(seconds waited, popped item or None)``.
    """
    t0 = time.monotonic()
    timeout = min(timeout, max(0.01, ctx.o.socket_timeout * 0.8))
    popped = yield Cmd(("BLPOP", *wake_keys, f"{timeout:.3f}"))
    return time.monotonic() - t0, (popped[1] if popped else None)
