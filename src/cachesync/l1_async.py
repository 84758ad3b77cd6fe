"""The old module name of the L1's asyncio driver, :mod:`cachesync._async.l1` (re-exported unchanged)."""

from __future__ import annotations

from ._async.l1 import L1Async

__all__ = ["L1Async"]
