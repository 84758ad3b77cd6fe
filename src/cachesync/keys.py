"""The old module name of :mod:`cachesync.core.keys` (re-exported unchanged)."""

from __future__ import annotations

from .core.keys import *  # noqa: F403
