"""The old module name of the L1's state machine, :mod:`cachesync.core.l1` (re-exported unchanged)."""

from __future__ import annotations

from .core.l1 import *  # noqa: F403
from .core.l1 import _ALL  # noqa: F401
