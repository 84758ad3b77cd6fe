"""Test helpers: read and write cache entries in their Redis layout (cachesync.core.layout) field by field,
as the tests once did with HGET/HSET on the old hash layout."""

from __future__ import annotations

from typing import Any

from cachesync.core.layout import decode_entry, encode_entry


def hgetall(r: Any, key: str) -> dict[bytes, bytes]:
    """The fields of the entry at ``key`` (empty when absent), with bytes names like ``HGETALL``."""
    e = decode_entry(r.get(key))
    return {} if e is None else {k.encode(): v for k, v in e.items()}


def hget(r: Any, key: str, field: str) -> bytes | None:
    return hgetall(r, key).get(field.encode())


def hexists(r: Any, key: str, field: str) -> bool:
    return hget(r, key, field) is not None


def hset(r: Any, key: str, field: str | None = None, value: Any = None, mapping: dict[str, Any] | None = None) -> None:
    """Set fields of the entry at ``key`` (created when absent), keeping the key's TTL, like ``HSET``."""
    e = {k.decode(): v for k, v in hgetall(r, key).items()}
    if field is not None:
        e[field] = value
    e.update(mapping or {})
    r.set(key, encode_entry(e), keepttl=True)
