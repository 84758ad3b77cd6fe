"""The write strategies as data: which steps run before the commit, after it, after a delay, on failure."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
import logging

from ..errors import UnknownStrategyError

log = logging.getLogger("cachesync")
# --------------------------------------------------------------------------- strategies


class Step(Enum):
    INVALIDATE = "invalidate"
    SET_VERSIONED = "set_versioned"
    SET_PLAIN = "set_plain"


@dataclass(frozen=True)
class Strategy:
    """A write strategy as data: the cache steps around the database write."""

    name: str
    before: tuple[Step, ...]
    """Steps run before the database write (when the ``write`` block is entered)."""
    after: tuple[Step, ...]
    """Steps run after the block exits normally (the commit happened inside it)."""
    delayed: tuple[Step, ...]
    """Steps run ``double_delete_delay`` seconds after the block exits."""
    on_error: tuple[Step, ...]
    """Steps run when the block raises (the write may or may not have committed)."""
    safe: bool
    summary: str


INV, SV, SP = Step.INVALIDATE, Step.SET_VERSIONED, Step.SET_PLAIN

STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("db_then_invalidate", (), (INV,), (), (INV,), True,
                 "Update the database, then invalidate (default). With leases no reader can write back a value "
                 "it loaded before the commit. Safe for every key."),
        Strategy("db_then_set_versioned", (), (SV,), (), (INV,), True,
                 "Update the database, then store the new value guarded by its version (a write-heavy key stays "
                 "warm). Safe when every write supplies a monotonically increasing version."),
        Strategy("delayed_double_delete", (INV,), (), (INV,), (INV,), False,
                 "Delete, update the database, delete again after double_delete_delay. Narrows the "
                 "delete-then-update window; correct only if the delay exceeds every reader's load time."),
        Strategy("delete_then_db", (INV,), (), (), (), False,
                 "UNSAFE: delete, then update the database. A reader between the two re-caches the old row "
                 "until the TTL."),
        Strategy("cache_then_db", (SP,), (), (), (), False,
                 "UNSAFE: update the cache, then the database. Two writers can interleave; a failed database "
                 "write leaves a value that was never committed."),
        Strategy("db_then_cache", (), (SP,), (), (), False,
                 "UNSAFE: update the database, then the cache, without a version. Two writers' cache updates "
                 "can land in the opposite order to their commits."),
    )
}


def resolve_strategy(name: object) -> Strategy:
    """The :class:`Strategy` of a name, or :class:`UnknownStrategyError`."""
    if isinstance(name, Strategy):
        return name
    if not isinstance(name, str) or name not in STRATEGIES:
        raise UnknownStrategyError(name, STRATEGIES)
    return STRATEGIES[name]
