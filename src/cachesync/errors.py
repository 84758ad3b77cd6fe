"""Exceptions raised by cachesync (all of them live here; the modules that used to define some re-export them).

Every exception is a :class:`CachesyncError`. Three families, told apart by their base class and by the
``retryable`` attribute every one carries:

**Misuse** -- :class:`UsageError` (also a ``ValueError``): the caller passed something cachesync cannot accept;
retrying the same call cannot help. :class:`ConfigError` names the bad option and its value (every options
object -- :class:`~cachesync.CacheOptions`, ``RelayOptions``, ``WorkerOptions``, ``CdcOptions``,
``AuditOptions`` -- raises it when built); the component errors (:class:`OutboxError`, :class:`BusError`,
:class:`RuleError`, :class:`AuditError`, :class:`CdcConfigError`, :class:`CheckpointError`,
:class:`DatabaseURLError`) name the component. An option error of a component is both: e.g.
:class:`OutboxConfigError` is a :class:`ConfigError` and an :class:`OutboxError`, so ``except OutboxError``
written before the options objects still catches it (likewise :class:`BusConfigError`, :class:`CdcOptionError`,
:class:`AuditConfigError`, :class:`LabConfigError`).

**Bad data from outside** -- :class:`BadDataError` (also a ``ValueError``): something read from the wire or from
storage cannot be used (an outbox row, a bus message, a replication event, a checkpoint file, a stored cache
entry). Not the caller's fault. ``retryable`` is False for all of them today: the same bytes will fail the same
way, so a daemon parks the item (relay), dead-letters it (worker) or records and skips it (CDC) and carries on
with the others; a subclass that may succeed later sets ``retryable = True``. :class:`CorruptEntryError`
(a stored entry), :class:`CorruptCheckpointError` and :class:`DecodeError` (a pgoutput payload) are the
specific kinds.

**Unavailable or failing services** -- :class:`ServiceError` (``retryable`` is True): a server did not keep its
side. :class:`ServiceUnavailableError` when it could not be reached: :class:`CacheUnavailableError` (Redis),
:class:`BusUnavailableError` (the bus), :class:`DatabaseUnavailableError` (the database; CDC's
:class:`Disconnected`); :class:`InvalidationError` and :class:`RedisCommandError` when it answered with a
failure. The daemons retry these with backoff and keep the work.

:class:`LabError` (the lab cannot run) is a plain :class:`CachesyncError`; :class:`CdcError` is the base of the
CDC errors across the families. Internal signals that never leave the package stay in their modules:
``protocol.NoScript``/``CommandError``/``RedisDown`` (driver -> flow) and ``l1.SubscriptionLost``.
"""

from __future__ import annotations

from collections.abc import Iterable


class CachesyncError(Exception):
    """Base class of every exception cachesync raises."""

    retryable: bool = False
    """Whether the same operation may succeed later (a service came back) -- False for misuse and bad data."""


# ---------------------------------------------------------------------------------------------------- misuse


class UsageError(CachesyncError, ValueError):
    """The caller passed something cachesync cannot accept."""


class ConfigError(UsageError):
    """An option has a bad value; the message names the option."""

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        super().__init__(f"option {option!r}: {problem}")


class UnknownStrategyError(ConfigError):
    """A write strategy name that does not exist."""

    def __init__(self, name: object, known: Iterable[str]) -> None:
        self.name = name
        super().__init__("strategy", f"unknown write strategy {name!r}; known: {', '.join(sorted(known))}")


class InvalidKeyError(UsageError):
    """A cache key that is empty, not a string, or too long."""

    def __init__(self, key: object, problem: str) -> None:
        self.key = key
        super().__init__(f"invalid cache key {key!r}: {problem}")


class SerializationError(UsageError, TypeError):
    """A value that the configured serializer cannot encode (or a payload it cannot decode)."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"cannot serialize the value for key {key!r}: {problem}")


class ValueTooLargeError(UsageError):
    """A serialized value larger than the ``max_value_bytes`` option."""

    def __init__(self, key: str, size: int, limit: int) -> None:
        self.key, self.size, self.limit = key, size, limit
        super().__init__(f"value for key {key!r} is {size} bytes serialized; max_value_bytes is {limit}")


class RuleError(UsageError):
    """A rule that cannot be applied (unknown column, bad template, bad file); the message names it.
    (Defined here; also importable from :mod:`cachesync.rules`.)"""


class OutboxError(UsageError):
    """Bad outbox input (table name, keys, delay, connection); the message names the problem.
    (Also importable from :mod:`cachesync.outbox`.)"""


class OutboxConfigError(ConfigError, OutboxError):
    """A bad :class:`~cachesync.outbox.RelayOptions` value: a :class:`ConfigError` (names the option) that old
    ``except OutboxError`` clauses still catch."""


class BusError(UsageError):
    """A bus that cannot be opened or configured (bad URL, bad option); the message names it.
    (Also importable from :mod:`cachesync.bus`.)"""


class BusConfigError(ConfigError, BusError):
    """A bad bus or :class:`~cachesync.bus.WorkerOptions` option: a :class:`ConfigError` that old
    ``except BusError`` clauses still catch."""


class AuditError(UsageError):
    """Bad auditor input (rules, template, option); the message names it. (Also in :mod:`cachesync.audit`.)"""


class AuditConfigError(ConfigError, AuditError):
    """A bad :class:`~cachesync.audit.AuditOptions` value: a :class:`ConfigError` that ``except AuditError``
    still catches."""


class DatabaseURLError(UsageError):
    """A database URL that cannot be used; the message names it (without its password).
    (Also importable from :mod:`cachesync.db`.)"""


class CdcError(CachesyncError):
    """Base class of CDC errors (of every family: see the subclasses). (Also in :mod:`cachesync.cdc`.)"""


class CdcConfigError(CdcError, UsageError):
    """The database is not set up for CDC (binlog format, wal_level, privileges...); the message says what
    to change."""


class CdcOptionError(ConfigError, CdcConfigError):
    """A bad :class:`~cachesync.cdc.CdcOptions` value: a :class:`ConfigError` that ``except CdcConfigError``
    still catches."""


class CheckpointError(UsageError):
    """A checkpoint file that cannot be read, written, or belongs to another source; the message names it.
    (Also importable from :mod:`cachesync.cdc`.) A file whose content is damaged raises the subclass
    :class:`CorruptCheckpointError`, which is also a :class:`BadDataError`."""


# ---------------------------------------------------------------------------------------------------- bad data


class BadDataError(CachesyncError, ValueError):
    """Data read from outside (an outbox row, a bus message, a replication event) that cannot be used: not
    decodable, a field missing or of the wrong type, a non-numeric version, a key the cache refuses. Not the
    caller's misuse and not retryable: a daemon parks the item (relay), dead-letters it (worker) or records and
    skips it (cdc), and carries on with the others.

    ``retryable`` is False: the same data fails the same way; a subclass that may succeed later sets it True."""


class CorruptEntryError(BadDataError):
    """A stored entry cannot be read (undecodable value, non-numeric field, foreign Redis type).

    The read flows repair such entries (delete, count in ``stats["corrupt_entries"]``, read as a miss); this is
    raised only where no repair is possible."""


class CorruptCheckpointError(CheckpointError, BadDataError):
    """A checkpoint file whose content is not a cachesync CDC checkpoint (bad JSON, no position): bad data from
    storage. Still a :class:`CheckpointError` (and so a :class:`UsageError`) for the ``except`` clauses written
    before it existed."""


class DecodeError(CdcError, BadDataError):
    """A pgoutput payload that does not follow the protocol; the message names the type and offset.
    (Also importable from :mod:`cachesync.cdc.pgoutput`.)"""


# ---------------------------------------------------------------------------------------------------- services


class ServiceError(CachesyncError):
    """A server (Redis, the bus, the database) did not keep its side of the contract; retrying may succeed."""

    retryable = True


class ServiceUnavailableError(ServiceError):
    """A server could not be reached (or timed out)."""


class CacheUnavailableError(ServiceUnavailableError, ConnectionError):
    """Redis could not be reached (or timed out); the message names the URL without its password."""

    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        self.url = url
        msg = f"Redis at {url} is unreachable"
        if cause is not None:
            msg += f": {type(cause).__name__}: {cause}"
        super().__init__(msg)


class BusUnavailableError(ServiceUnavailableError, ConnectionError):
    """The bus server could not be reached or refused an operation; nothing was acknowledged.
    (Also importable from :mod:`cachesync.bus`.)"""


class DatabaseUnavailableError(ServiceUnavailableError):
    """The database could not be reached or dropped the connection."""


class Disconnected(CdcError, DatabaseUnavailableError):
    """The CDC source lost its connection; the runner reconnects from the last checkpoint."""


class PositionLost(CdcError, ServiceError):
    """The CDC position to resume from no longer exists (binlog purged); everything covered must be invalidated
    (the runner does, then restarts from the current position)."""


class InvalidationError(ServiceError):
    """An invalidation could not be applied; the message names every key that is still to be invalidated.

    The keys are never silently dropped: the caller must retry (or record them in
    the transactional outbox, which retries by itself).
    """

    def __init__(self, keys: Iterable[str], cause: BaseException | None = None) -> None:
        self.keys = list(keys)
        msg = f"invalidation of {len(self.keys)} key(s) failed, still to invalidate: {self.keys!r}"
        if cause is not None:
            msg += f" ({type(cause).__name__}: {cause})"
        super().__init__(msg)


class RedisCommandError(ServiceError):
    """Redis answered a command with an error reply that cachesync could not handle (not a connection problem)."""

    def __init__(self, url: str, cause: BaseException) -> None:
        self.url = url
        super().__init__(f"Redis at {url} refused a command: {cause}")


# ---------------------------------------------------------------------------------------------------- other


class LabError(CachesyncError):
    """The lab cannot run (no server, unreachable server, bad option); the message says what to do.
    (Also importable from :mod:`cachesync.lab`.)"""


class LabConfigError(ConfigError, LabError):
    """A bad lab option (``--readers``...): a :class:`ConfigError` that ``except LabError`` still catches."""
