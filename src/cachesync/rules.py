"""The old module name of :mod:`cachesync.core.rules` (re-exported unchanged)."""

from __future__ import annotations

from .core.rules import *  # noqa: F403
