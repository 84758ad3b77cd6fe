"""The outbox relay's options object (I/O-free: imports only the validation helper and the errors)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypedDict

from .. import _validate
from ..errors import OutboxConfigError

DEFAULT_TABLE = "cachesync_outbox"
"""Default outbox table name."""
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,54}")


@dataclass(frozen=True)
class RelayOptions:
    """Options of :class:`cachesync.outbox.relay.Relay` (``Relay(db_url, cache, options=RelayOptions(...))`` or
    the same names as keywords). Frozen and validated when built; durations in seconds. A bad value raises
    :class:`~cachesync.errors.OutboxConfigError` (a ``ConfigError`` and an ``OutboxError``) naming it."""

    table: str = DEFAULT_TABLE
    """The outbox table (a plain SQL identifier of at most 55 characters)."""
    apply: bool | None = None
    """Invalidate in the cache. ``None`` (default): True without a bus, False with one (then only publish)."""
    batch_size: int = 500
    """Rows claimed (and deleted) per transaction."""
    poll_interval: float | None = None
    """Seconds between polls. ``None`` (default): 1.0 when listening on PostgreSQL, else 0.05."""
    listen: bool = True
    """Use LISTEN/NOTIFY on PostgreSQL (ignored on other databases)."""
    lease: float = 30.0
    """SQLite: how long a claim keeps rows from other relays."""
    max_backoff: float = 5.0
    """Longest wait between retries while Redis or the bus is down."""
    init: bool = True
    """Create the outbox table (if missing) on start."""
    fast: bool | None = None
    """Apply the rows a notification carries at once, before claiming them. ``None`` (default): True when
    applying and listening on PostgreSQL; ``True`` has no effect elsewhere."""
    claim_delay: float = 0.1
    """Fast path only: after applying rows from notifications, keep applying the notifications that follow for up
    to this long before claiming (deleting) the applied rows; 0 claims after every notification."""

    def __post_init__(self) -> None:
        e = OutboxConfigError
        if not isinstance(self.table, str) or not _IDENT.fullmatch(self.table):
            raise e("table", f"outbox table name {self.table!r} must be a plain identifier (letters, digits, '_', "
                            "not starting with a digit, at most 55 characters)")
        for name in ("apply", "fast"):
            if getattr(self, name) is not None:
                _validate.boolean(name, getattr(self, name), error=e)
        for name in ("listen", "init"):
            _validate.boolean(name, getattr(self, name), error=e)
        _validate.positive("batch_size", self.batch_size, integer=True, error=e)
        if self.poll_interval is not None:
            _validate.seconds("poll_interval", self.poll_interval, error=e)
        _validate.seconds("lease", self.lease, error=e)
        _validate.seconds("max_backoff", self.max_backoff, error=e)
        _validate.seconds("claim_delay", self.claim_delay, zero=True, error=e)

    @classmethod
    def resolve(cls, options: RelayOptions | None, kwargs: dict[str, Any]) -> RelayOptions:
        """``options``, or one built from the keyword arguments (a :class:`ConfigError` if both are given)."""
        return _validate.options_from(cls, options, kwargs, error=OutboxConfigError)


class RelayOptionsKwargs(TypedDict, total=False):
    """The option keywords of ``Relay(...)``: one per :class:`RelayOptions` field."""

    table: str
    apply: bool | None
    batch_size: int
    poll_interval: float | None
    listen: bool
    lease: float
    max_backoff: float
    init: bool
    fast: bool | None
    claim_delay: float


__all__ = ["RelayOptions", "RelayOptionsKwargs"]
