"""The old module name of :mod:`cachesync.core.scripts` (re-exported unchanged)."""

from __future__ import annotations

from .core.scripts import *  # noqa: F403
