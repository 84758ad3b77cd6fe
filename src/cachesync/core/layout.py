"""The entry layout in Redis, mirrored from ``lua/_entry.lua`` (the scripts' one definition of it).

An entry is one Redis string, so that a hit is one ``GET`` and a batch hit one ``MGET``:

* ``b"V" + ver + b"|" + payload``: a fresh value whose version floor equals its version (``ver`` empty: none);
* ``b"N" + ver + b"|" + payload``: the same for a negative (``NOT_FOUND``) entry;
* ``b"M" + ver|fl|flags|lt|ld|w|ti| + payload``: every other state (a stale-marked value, a lease, waiters, a
  tombstone, a floor above the value's version); ``flags`` holds ``v`` (a value), ``n`` (negative), ``s``
  (stale-marked).

Fields: ``ver`` the value's version, ``fl`` the version floor, ``lt``/``ld`` lease token and deadline (server
ms), ``w`` registered waiters, ``ti`` time of the last invalidation (server ms, the tombstone). Anything else at
an entry's key is foreign; the scripts replace it, and readers treat it as :class:`CorruptEntry`.

:func:`decode_entry` answers the same fields as ``peek.lua``; :func:`encode_entry` writes what ``entry_put``
writes (``tests/test_layout.py`` checks both against the scripts).
"""

from __future__ import annotations

from collections.abc import Mapping

from .values import CorruptEntry

#: The field names of an entry, in the order ``peek.lua`` lists them.
FIELDS = ("v", "ver", "n", "s", "fl", "lt", "ld", "w", "ti")


def _num(x: bytes, version: bool) -> bool:
    if not x:
        return True
    try:
        n = float(x)
    except ValueError:
        return False
    return n == n and abs(n) < (1e300 if version else 1e16)


def decode_entry(raw: bytes | None) -> dict[str, bytes] | None:
    """The fields of a stored entry (``n`` and ``s`` as ``b"1"`` when set, absent fields left out), None when
    there is no entry; :class:`CorruptEntry` when ``raw`` is not an entry."""
    if raw is None:
        return None
    c = raw[:1]
    if c in (b"V", b"N"):
        i = raw.find(b"|", 1)
        if i < 0 or not _num(raw[1:i], True):
            raise CorruptEntry("not a cachesync entry (no version separator)")
        out = {"v": raw[i + 1:]}
        if i > 1:
            out["ver"] = out["fl"] = raw[1:i]
        if c == b"N":
            out["n"] = b"1"
        return out
    if c != b"M":
        raise CorruptEntry("not a cachesync entry (unknown layout)")
    parts = raw[1:].split(b"|", 7)
    if len(parts) != 8:
        raise CorruptEntry("not a cachesync entry (too few fields)")
    ver, fl, flags, lt, ld, w, ti, payload = parts
    if not (_num(ver, True) and _num(fl, True) and _num(ld, False) and _num(w, False) and _num(ti, False)) \
            or flags.strip(b"vns"):
        raise CorruptEntry("not a cachesync entry (bad field)")
    fields: dict[str, bytes] = {}
    if b"v" in flags:
        fields["v"] = payload
    for name, x in (("ver", ver), ("n", b"1" if b"n" in flags else b""), ("s", b"1" if b"s" in flags else b""),
                    ("fl", fl), ("lt", lt), ("ld", ld), ("w", w), ("ti", ti)):
        if x:
            fields[name] = x
    return fields


def _b(x: bytes | str | int | float) -> bytes:
    if isinstance(x, bytes):
        return x
    return (x if isinstance(x, str) else repr(x)).encode()


def encode_entry(fields: Mapping[str, bytes | str | int | float]) -> bytes:
    """The stored form of an entry with these fields (names as in :data:`FIELDS`; ``n``/``s`` set when truthy
    and not ``"0"``), as ``entry_put`` in ``_entry.lua`` writes it. For tests and tools; no validation."""
    f = {k: _b(v) for k, v in fields.items() if v is not None}
    neg = f.get("n", b"0") not in (b"", b"0")
    stale = f.get("s", b"0") not in (b"", b"0")
    ver = f.get("ver", b"")
    if "v" in f and not stale and not any(k in f for k in ("lt", "ld", "w", "ti")) and f.get("fl", b"") == ver:
        return (b"N" if neg else b"V") + ver + b"|" + f["v"]
    flags = (b"v" if "v" in f else b"") + (b"n" if neg else b"") + (b"s" if stale else b"")
    return b"|".join([b"M" + ver, f.get("fl", b""), flags, f.get("lt", b""), f.get("ld", b""), f.get("w", b""),
                      f.get("ti", b""), f.get("v", b"")])
