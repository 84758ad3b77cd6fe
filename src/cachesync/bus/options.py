"""The bus worker's options object (I/O-free: imports only the validation helper and the errors)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from .. import _validate
from ..errors import BusConfigError


@dataclass(frozen=True)
class WorkerOptions:
    """Options of :class:`cachesync.bus.worker.Worker` (``Worker(bus, cache, rules, options=WorkerOptions(...))``
    or the same names as keywords). Frozen and validated when built; a bad value raises
    :class:`~cachesync.errors.BusConfigError` (a ``ConfigError`` and a ``BusError``) naming it."""

    group: str = "cachesync"
    """Consumer group: the workers of one group share the messages (each message is applied by one of them)."""
    consumer: str | None = None
    """This worker's name in the group. ``None`` (default): ``host-pid``."""
    batch_size: int = 100
    """Messages consumed (and applied in one pipelined batch) at a time."""
    max_attempts: int = 5
    """Attempts before a message that keeps failing (Redis down) goes to the dead-letter stream."""
    backoff: float = 0.1
    """Retry delay after the first failed attempt, doubled per attempt (``backoff * 2**(n-1)`` seconds)."""
    max_backoff: float = 30.0
    """Longest retry delay."""

    def __post_init__(self) -> None:
        e = BusConfigError
        if not isinstance(self.group, str) or not self.group:
            raise e("group", f"must be a non-empty string, got {self.group!r}")
        if self.consumer is not None and (not isinstance(self.consumer, str) or not self.consumer):
            raise e("consumer", f"must be None or a non-empty string, got {self.consumer!r}")
        _validate.positive("batch_size", self.batch_size, integer=True, error=e)
        _validate.positive("max_attempts", self.max_attempts, integer=True, error=e)
        _validate.seconds("backoff", self.backoff, error=e)
        _validate.seconds("max_backoff", self.max_backoff, error=e)

    @classmethod
    def resolve(cls, options: WorkerOptions | None, kwargs: dict[str, object]) -> WorkerOptions:
        """``options``, or one built from the keyword arguments (a :class:`ConfigError` if both are given)."""
        return _validate.options_from(cls, options, kwargs, error=BusConfigError)


class WorkerOptionsKwargs(TypedDict, total=False):
    """The option keywords of ``Worker(...)``: one per :class:`WorkerOptions` field."""

    group: str
    consumer: str | None
    batch_size: int
    max_attempts: int
    backoff: float
    max_backoff: float


__all__ = ["WorkerOptions", "WorkerOptionsKwargs"]
