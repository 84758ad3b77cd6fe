"""Where a CDC reader remembers how far it has applied: a small JSON file, replaced atomically.

Why a file and not a Redis key: the checkpoint says "every change up to here has been invalidated
in Redis". If it lived in Redis, losing Redis (restart without persistence, failover to a lagging
replica) would lose the checkpoint together with the tombstones; and a Redis restored from an older
snapshot would carry a checkpoint *older* than what was applied -- harmless -- but a replica promoted
after the reader wrote a *newer* checkpoint to the old primary is not. A local file written with
write-to-temp + fsync + rename + fsync(dir) survives ``kill -9`` and power loss, is either the old or
the new content, and costs ~0.1-1 ms per save (saves happen once per applied batch, not per row).

The file holds ``{"source": KIND, "ident": ..., "position": {...}, "saved_at": unix_time}``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import CheckpointError as CheckpointError  # defined in errors.py, re-exported here
from ..errors import CorruptCheckpointError


class FileCheckpoint:
    """A checkpoint stored in ``path`` (JSON, replaced atomically with fsync).

    ``fsync`` (default True) can be turned off for benchmarks; without it a power loss may lose the last
    few checkpoints (never corrupt the file), which only means re-invalidating a few transactions.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.saves = 0

    def load(self, source: str, ident: str) -> dict[str, Any] | None:
        """The saved position, or None if there is no file. Raises :class:`CheckpointError` when the file is
        unreadable or was written by another source (``source``/``ident`` differ); :class:`CorruptCheckpointError`
        (a CheckpointError that is also a :class:`~cachesync.errors.BadDataError`) when its content is damaged."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CheckpointError(f"checkpoint file {str(self.path)!r} cannot be read: {e}") from None
        try:
            data = json.loads(raw)
            pos = data["position"]
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"checkpoint file {str(self.path)!r} is not a cachesync CDC checkpoint "
                                         f"({e}); move it away to start from the current position") from None
        if data.get("source") != source or data.get("ident") != ident:
            raise CheckpointError(
                f"checkpoint file {str(self.path)!r} belongs to source {data.get('source')!r} "
                f"({data.get('ident')!r}), not {source!r} ({ident!r}); use another --checkpoint path")
        if not isinstance(pos, dict):
            raise CorruptCheckpointError(f"checkpoint file {str(self.path)!r}: position must be an object")
        return pos

    def save(self, source: str, ident: str, position: dict[str, Any]) -> None:
        """Atomically replace the file with ``position`` (temp file, fsync, rename, fsync of the directory)."""
        data = json.dumps({"source": source, "ident": ident, "position": position, "saved_at": time.time()})
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data.encode())
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            if self.fsync:
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            raise CheckpointError(f"checkpoint file {str(self.path)!r} cannot be written: {e}") from None
        self.saves += 1
