"""The old module name of the asyncio driver, :mod:`cachesync._async.cache` (re-exported unchanged)."""

from __future__ import annotations

from ._async.cache import AsyncCache

__all__ = ["AsyncCache"]
