"""The CDC runner's options object (I/O-free: imports only the validation helper and the errors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from .. import _validate
from ..errors import CdcOptionError


@dataclass(frozen=True)
class CdcOptions:
    """Options of :class:`cachesync.cdc.CdcRunner` (``CdcRunner(source, cache, rules, checkpoint,
    options=CdcOptions(...))`` or the same names as keywords). Frozen and validated when built; a bad value
    raises :class:`~cachesync.errors.CdcOptionError` (a ``ConfigError`` and a ``CdcConfigError``) naming it."""

    batch_max_keys: int = 500
    """Keys per applied batch (a backlog is applied in batches of at most this many keys)."""
    queue_size: int = 1000
    """Transactions the reader thread reads ahead at most (then it blocks and the database buffers); not used by a
    source read in the runner's own thread (PostgreSQL, MariaDB/MySQL)."""
    stats_interval: float = 10.0
    """Seconds between stats log lines / Redis stats-hash writes; 0 = never."""
    reconnect_delay: float = 0.2
    """First backoff (seconds) after a disconnection or a failed Redis write; doubled up to ``reconnect_max_delay``."""
    reconnect_max_delay: float = 5.0
    """Longest backoff (seconds); must be >= ``reconnect_delay``."""
    on_missing_old_image: str = "warn"
    """A change whose old row image lacks key columns: ``"warn"`` (log once per table) or ``"flush"`` (invalidate
    every key of the templates the old image could not form -- safe but costly)."""
    checkpoint_in_background: bool = True
    """Write and fsync the checkpoint file in a helper thread (newest position wins), off the commit ->
    invalidated path; a crash then re-applies what was applied during the last fsync. False saves after every
    batch in the main loop (a crash re-applies at most one batch), an fsync per batch in the latency."""
    checkpoint_interval: float = 0.2
    """With ``checkpoint_in_background``: seconds between two checkpoint saves (file write + fsync, then the
    source's ack) at most; the newest applied position wins. Never a position whose invalidations are not in
    Redis yet; a crash re-applies what was applied since the last save (idempotent). 0 = save after every batch
    (an fsync per single-row commit when idle, which competes with the database's own commit fsync on a shared
    disk). The final position is always saved on stop and before a reconnect."""

    def __post_init__(self) -> None:
        e = CdcOptionError
        _validate.positive("batch_max_keys", self.batch_max_keys, integer=True, error=e)
        _validate.positive("queue_size", self.queue_size, integer=True, error=e)
        _validate.seconds("stats_interval", self.stats_interval, zero=True, error=e)
        _validate.seconds("reconnect_delay", self.reconnect_delay, error=e)
        _validate.seconds("reconnect_max_delay", self.reconnect_max_delay, error=e)
        if self.reconnect_max_delay < self.reconnect_delay:
            raise e("reconnect_max_delay", f"must be >= reconnect_delay ({self.reconnect_delay!r}), "
                                           f"got {self.reconnect_max_delay!r}")
        _validate.one_of("on_missing_old_image", self.on_missing_old_image, ("warn", "flush"), error=e)
        _validate.boolean("checkpoint_in_background", self.checkpoint_in_background, error=e)
        _validate.seconds("checkpoint_interval", self.checkpoint_interval, zero=True, error=e)

    @classmethod
    def resolve(cls, options: CdcOptions | None, kwargs: dict[str, object]) -> CdcOptions:
        """``options``, or one built from the keyword arguments (a :class:`ConfigError` if both are given)."""
        return _validate.options_from(cls, options, kwargs, error=CdcOptionError)


class CdcOptionsKwargs(TypedDict, total=False):
    """The option keywords of ``CdcRunner(...)``: one per :class:`CdcOptions` field."""

    batch_max_keys: int
    queue_size: int
    stats_interval: float
    reconnect_delay: float
    reconnect_max_delay: float
    on_missing_old_image: str
    checkpoint_in_background: bool
    checkpoint_interval: float


__all__ = ["CdcOptions", "CdcOptionsKwargs"]
