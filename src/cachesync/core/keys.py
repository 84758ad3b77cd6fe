"""Redis key layout and Redis Cluster slots.

Every cache key ``k`` in namespace ``ns`` lives in one Redis hash ``cs:ns:{k}``
(value, version, lease, tombstone) plus a wake list ``cs:ns:{k}:w`` used to
notify waiting readers. The braces are a Redis Cluster hash tag, so a key's
hash and wake list are always in the same slot. A key that itself contains a
brace is tagged by a digest instead (``cs:ns:{#<sha1>}k``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from ..errors import InvalidKeyError, UsageError


def check_key(key: object, max_bytes: int) -> str:
    """Validate a cache key: a non-empty ``str`` of at most ``max_bytes`` UTF-8 bytes (a lone surrogate, which
    has no UTF-8 form and so could never be sent to Redis, is refused)."""
    if not isinstance(key, str):
        raise InvalidKeyError(key, f"keys must be str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError(key, "keys must not be empty")
    if len(key) <= max_bytes and key.isascii():  # one byte a character
        return key
    try:
        n = len(key.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InvalidKeyError(key[:40], f"not valid UTF-8 text (a lone surrogate at position {e.start})") from None
    if n > max_bytes:
        raise InvalidKeyError(key[:40] + "...", f"{n} bytes long; max_key_bytes is {max_bytes}")
    return key


def entry_key(ns: str, key: str) -> str:
    """The Redis hash holding ``key``'s entry."""
    if "{" in key or "}" in key:
        tag = "#" + hashlib.sha1(key.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()[:16]
        return f"cs:{ns}:{{{tag}}}{key}"
    return f"cs:{ns}:{{{key}}}"


def wake_key(ekey: str) -> str:
    """The wake list that belongs to an entry hash."""
    return ekey + ":w"


def user_key(ns: str, ekey: str) -> str:
    """Invert :func:`entry_key`. A plain key has no brace, so its only ``}`` ends the Redis key (``{#a}`` is the
    key ``#a``); a ``}`` before the end closes a digest tag (``{#<sha1>}a{b`` is the key ``a{b``)."""
    rest = ekey[len(ns) + 4:]
    i = rest.find("}")
    if rest.startswith("{#") and 0 <= i < len(rest) - 1:
        return rest[i + 1:]
    return rest[1:-1]


def _glob_escape(s: str) -> str:
    """``s`` as a literal in a Redis SCAN MATCH pattern (``* ? [ ] \\`` escaped)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def prefix_scan(ns: str, prefixes: Sequence[str]) -> tuple[list[str], Callable[[bytes | str], str | None]]:
    """What finding the keys of namespace ``ns`` that start with one of ``prefixes`` takes: the ``SCAN MATCH``
    patterns (entry hashes of plain keys, and of keys with a brace under their digest tag), and a function that
    turns one scanned Redis key into the cache key, or ``None`` when it is not a matching entry (a wake list,
    a foreign or non-UTF-8 key). ``""`` matches every key."""
    if isinstance(prefixes, str):
        raise UsageError(f"prefixes must be a list of key prefixes, not the string {prefixes!r}")
    ps = list(dict.fromkeys(prefixes))
    for p in ps:
        if not isinstance(p, str):
            raise UsageError(f"a key prefix must be a str, not {type(p).__name__}: {p!r}")
    ens = _glob_escape(ns)
    pats: set[str] = set()
    for p in ps:
        esc = _glob_escape(p)
        if "{" not in p and "}" not in p:
            pats.add(f"cs:{ens}:{{{esc}*")  # plain keys (no brace), including those that start with '#'
        pats.add(f"cs:{ens}:{{#{'?' * 16}}}{esc}*")  # keys with a brace: digest hash tag, then the key

    def match(raw: bytes | str) -> str | None:
        try:
            rk = raw.decode() if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:  # not a cachesync key (those are UTF-8)
            return None
        k = user_key(ns, rk)
        if entry_key(ns, k) == rk and any(k.startswith(p) for p in ps):
            return k
        return None

    return sorted(pats), match


def channel(ns: str) -> str:
    """The pub/sub channel on which invalidations of a namespace are announced."""
    return f"cs:{ns}:inv"


def _crc16(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def slot(rkey: str) -> int:
    """The Redis Cluster slot of a Redis key (honours ``{hash tags}``)."""
    b = rkey.encode("utf-8", "surrogatepass")
    s = b.find(b"{")
    if s != -1:
        e = b.find(b"}", s + 1)
        if e != -1 and e != s + 1:
            b = b[s + 1:e]
    return _crc16(b) % 16384


def group_by_slot(ekeys: list[str]) -> list[list[int]]:
    """Indexes of ``ekeys`` grouped by cluster slot (a batch script may only touch one slot)."""
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(ekeys):
        groups.setdefault(slot(k), []).append(i)
    return list(groups.values())
