"""The consistency protocol's old module name: everything now lives in :mod:`cachesync.core` (values, effects,
strategies, context, read and write flows) and is re-exported here unchanged."""

from __future__ import annotations

from .core import *  # noqa: F403
from .core import __all__ as __all__
from .core.context import _groups, _interleave  # noqa: F401
from .core.read import _fallback_one, _hit, _release, _release_many, _repair  # noqa: F401
from .core.values import _reseed_tokens  # noqa: F401
