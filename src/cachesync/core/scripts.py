"""The Lua scripts, loaded once from the package with importlib.resources.

Drivers call them with EVALSHA and fall back to SCRIPT LOAD on NOSCRIPT
(a restarted or failed-over Redis has an empty script cache).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

NAMES = ("get", "fill", "set", "invalidate", "release", "peek", "bloom_add", "bloom_check", "bloom_rebuild")
#: The scripts that read or write entries: each is sent with ``_entry.lua`` (the entry layout) in front of it.
ENTRY_SCRIPTS = frozenset({"get", "fill", "set", "invalidate", "release", "peek"})


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str


def _load() -> dict[str, Script]:
    out = {}
    base = resources.files("cachesync") / "lua"
    prelude = (base / "_entry.lua").read_text(encoding="utf-8")
    for name in NAMES:
        src = (base / f"{name}.lua").read_text(encoding="utf-8")
        if name in ENTRY_SCRIPTS:
            src = prelude + src
        out[name] = Script(name, src, hashlib.sha1(src.encode(), usedforsecurity=False).hexdigest())
    return out


SCRIPTS: dict[str, Script] = _load()
