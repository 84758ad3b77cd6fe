"""cachesync.core: the consistency protocol, with no I/O.

Theory of operation
===================

Every cache key is one Redis hash (see :mod:`cachesync.keys`) holding the
value, its version, a *lease* (token + deadline from the Redis clock), a
*version floor* and, after an invalidation, a *tombstone*. All state changes
are atomic Lua scripts (``cachesync/lua/*.lua``). The rules:

1. **Read (cache-aside with leases).** ``get.lua`` returns a hit, or, on a miss,
   grants the caller a lease (a random token stored in the hash). Only the lease
   holder loads from the database; other readers register as waiters and block
   on the key's wake list (``BLPOP``) until the holder fills, an invalidation
   arrives, or the lease deadline passes. A reader that has waited
   ``max_wait`` loads by itself and does not fill.
2. **Fill.** ``fill.lua`` stores the loaded value only if the caller *still*
   holds its lease and the value's version is not below the floor. An
   invalidation or a writer's ``set`` deletes the lease, so a reader that loaded
   a row before a write can never write it back after the write's invalidation:
   the stale write-back is refused, not merely unlikely.
3. **Invalidate.** ``invalidate.lua`` deletes (or, with ``serve_stale``,
   stale-marks) the value, voids the lease, raises the version floor to the
   committed version, leaves a tombstone for ``tombstone_ttl``, wakes waiters
   and announces the key on the namespace channel (for L1 caches).
4. **Set (writer).** ``set.lua`` stores a writer's new value, voids leases and,
   when a version is given, refuses to go backwards.
5. **Write strategies** are data (:data:`STRATEGIES`): which steps run before
   the database commit, after it, after a delay, and when the write fails.

The read and write paths are generators (like httpx's ``auth_flow``): they
*yield* three kinds of effect, :class:`Cmd` (one Redis command), :class:`Load`
(call the loader) and :class:`Schedule` (a delayed step), and receive their
results. Scripts (:func:`script`: EVALSHA with the NOSCRIPT fallback) and
waits (:func:`wait`: BLPOP) are sub-flows built from ``Cmd``.
:mod:`cachesync._sync` drives the flows with redis-py and :mod:`cachesync._async`
with redis.asyncio; neither holds protocol logic. A driver reports an
unreachable Redis by throwing :class:`RedisDown` into the generator, NOSCRIPT
by throwing :class:`NoScript`, and a loader's exception by throwing it as is.

Layout: :mod:`.values` (NOT_FOUND, Versioned, Entry, versions, keys, tokens), :mod:`.effects` (what flows
yield and receive; ``script``/``wait``), :mod:`.strategies`, :mod:`.context`, :mod:`.read`, :mod:`.write`,
plus :mod:`.keys`, :mod:`.options`, :mod:`.serializers`, :mod:`.rules`, :mod:`.scripts` and the state halves
:mod:`.l1`, :mod:`.refresh`, :mod:`.bloom`. Nothing here imports ``redis``, ``asyncio``, ``threading`` or
``socket`` (``tests/test_layers.py``); docs/architecture.md describes the layers.
"""

from __future__ import annotations

from .values import NotFound, NOT_FOUND, MISSING, Versioned, Entry, new_token, MAX_EXACT_VERSION, encode_version, CorruptEntry, decode_version, checked_version, checked_keys, key_list, star_keys, not_found_answer
from .effects import Cmd, Load, Schedule, Batch, NoScript, CommandError, RedisDown, Flow, HIT, LEASED, WAIT, MISS, SCRIPT_LOADS, script, wait
from .strategies import Step, Strategy, INV, SV, SP, STRATEGIES, resolve_strategy
from .context import Context, GetReply, parse_get, parse_wake
from .read import cache_entry, fresh_hit, get_flow, follower_accepts, get_many_flow, get_many_values_flow, hit_args
from .write import INVALIDATE_CHUNK, merge_invalidations, invalidate_many_flow, invalidate_flow, set_flow, steps_flow, WritePlan, peek_values_flow, peek_flow

__all__ = ['not_found_answer', 'cache_entry', 'fresh_hit', 'hit_args', 'Batch', 'Cmd', 'CommandError', 'Context', 'CorruptEntry', 'Entry', 'Flow', 'GetReply', 'HIT', 'INV', 'INVALIDATE_CHUNK', 'LEASED', 'Load', 'MAX_EXACT_VERSION', 'MISS', 'MISSING', 'NOT_FOUND', 'NoScript', 'NotFound', 'RedisDown', 'SP', 'SCRIPT_LOADS', 'STRATEGIES', 'SV', 'Schedule', 'Step', 'Strategy', 'Versioned', 'WAIT', 'WritePlan', 'checked_keys', 'checked_version', 'decode_version', 'encode_version', 'follower_accepts', 'get_flow', 'get_many_flow', 'get_many_values_flow', 'invalidate_flow', 'invalidate_many_flow', 'key_list', 'merge_invalidations', 'new_token', 'parse_get', 'parse_wake', 'peek_flow', 'peek_values_flow', 'resolve_strategy', 'script', 'set_flow', 'star_keys', 'steps_flow', 'wait']
