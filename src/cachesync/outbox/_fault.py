"""Fault injection for crash tests: ``CACHESYNC_FAULT="point:n,point:m"`` makes the process SIGKILL itself the
n-th time it reaches ``point`` (relay: claimed, applied, deleted, committed, fast_applied; worker: consumed, applied, acked).
Unset (the default) it costs one dict lookup. Not for production use."""

from __future__ import annotations

import os
import signal

_PLAN: dict[str, int] = {}
for _item in filter(None, os.environ.get("CACHESYNC_FAULT", "").split(",")):
    _p, _, _n = _item.partition(":")
    _PLAN[_p.strip()] = int(_n or "1")
_SEEN: dict[str, int] = {}


def point(name: str) -> None:
    """Reached fault point ``name``: die here (SIGKILL, no cleanup) if the plan says so."""
    if not _PLAN or name not in _PLAN:
        return
    _SEEN[name] = _SEEN.get(name, 0) + 1
    if _SEEN[name] >= _PLAN[name]:
        os.kill(os.getpid(), signal.SIGKILL)
