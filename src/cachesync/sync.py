"""The old module name of the synchronous driver, :mod:`cachesync._sync.cache` (re-exported unchanged)."""

from __future__ import annotations

from ._sync.cache import Cache, Scheduler

__all__ = ["Cache", "Scheduler"]
