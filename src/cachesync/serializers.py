"""The old module name of :mod:`cachesync.core.serializers` (re-exported unchanged)."""

from __future__ import annotations

from .core.serializers import *  # noqa: F403
