"""The old module name of :mod:`cachesync.core.options` (re-exported unchanged)."""

from __future__ import annotations

from .core.options import *  # noqa: F403
