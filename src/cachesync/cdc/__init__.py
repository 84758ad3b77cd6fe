"""Change data capture: invalidate cache keys from the MariaDB/MySQL binlog or PostgreSQL logical decoding.

See docs/cdc.md. :class:`CdcRunner` applies a :class:`Source`'s committed transactions to a
:class:`cachesync.Cache` using :class:`cachesync.rules.Rules`, checkpointing in a :class:`FileCheckpoint`.
The sources live in :mod:`cachesync.cdc.mysql` and :mod:`cachesync.cdc.postgres` (imported lazily: their
drivers are optional extras).
"""

from __future__ import annotations

from .base import CdcConfigError, CdcError, CdcRunner, Change, Disconnected, PositionLost, Source, Transaction
from .checkpoint import CheckpointError, FileCheckpoint
from .options import CdcOptions, CdcOptionsKwargs

__all__ = ["CdcConfigError", "CdcError", "CdcOptions", "CdcOptionsKwargs", "CdcRunner", "Change", "CheckpointError", "Disconnected",
           "FileCheckpoint", "PositionLost", "Source", "Transaction"]
