"""A sans-I/O decoder of PostgreSQL's ``pgoutput`` logical replication protocol (version 1).

Theory of operation
-------------------
The walsender sends one ``XLogData`` payload per logical message. :func:`decode` turns one payload
into one message object; it does no I/O and keeps no state. :class:`Decoder` adds the only state
the protocol needs: the ``Relation`` messages (column names per relation OID), which the server
sends before the first change of a relation in a session (and again after a schema change), and
the current transaction (``Begin`` ... ``Commit``).

Every malformed input -- truncated, unknown message type, bad tuple kind, a change for a relation
never described, trailing bytes -- raises :class:`DecodeError` (and nothing else), naming the
message type and the byte offset. The decoder never loops on its input without consuming it, so
it cannot hang.

Message layouts (all integers big-endian; ``String`` is NUL-terminated UTF-8), from
https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html:

====  ======================================================================================
 B    Begin: Int64 final_lsn, Int64 commit_time (µs since 2000-01-01), Int32 xid
 C    Commit: Int8 flags, Int64 commit_lsn, Int64 end_lsn, Int64 commit_time
 O    Origin: Int64 lsn, String name
 R    Relation: Int32 oid, String namespace, String name, Int8 replica_identity, Int16 ncols,
      ncols x (Int8 flags (1 = part of the key), String name, Int32 type_oid, Int32 typmod)
 Y    Type: Int32 oid, String namespace, String name
 I    Insert: Int32 oid, 'N', TupleData
 U    Update: Int32 oid, optional ('K' | 'O', TupleData), 'N', TupleData
 D    Delete: Int32 oid, ('K' | 'O'), TupleData
 T    Truncate: Int32 nrels, Int8 options, nrels x Int32 oid
 M    Message (``pg_logical_emit_message``; sent only with the ``messages`` option, PostgreSQL 14+):
      Int8 flags (1 = transactional, 0 = not), Int64 lsn, String prefix, Int32 length, Byte[length] content
====  ======================================================================================

TupleData: Int16 ncols, then per column one of ``n`` (NULL), ``u`` (unchanged TOASTed value: not
sent, left out of the row), ``t`` Int32 length + text, ``b`` Int32 length + binary. Values are kept
as the server's text representation (``str``); binary values as ``bytes``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ..errors import DecodeError as DecodeError  # defined in errors.py, re-exported here

PG_EPOCH_UNIX = 946684800  # 2000-01-01T00:00:00Z in Unix seconds


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    typmod: int
    key: bool


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_time: float  # Unix seconds
    xid: int


@dataclass(frozen=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: float  # Unix seconds


@dataclass(frozen=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str  # 'd' default (primary key), 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]

    @property
    def key_columns(self) -> frozenset[str]:
        return frozenset(c.name for c in self.columns if c.key)

    @property
    def column_names(self) -> tuple[str, ...]:
        """The columns' names in order (computed once per relation)."""
        try:
            return self.__dict__["_names"]  # type: ignore[no-any-return]
        except KeyError:
            names = tuple(c.name for c in self.columns)
            object.__setattr__(self, "_names", names)
            return names


@dataclass(frozen=True)
class TypeMsg:
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True)
class Insert:
    oid: int
    new: tuple[Any, ...]


@dataclass(frozen=True)
class Update:
    oid: int
    old_kind: str | None  # None, 'K' (key columns only) or 'O' (full old row)
    old: tuple[Any, ...] | None
    new: tuple[Any, ...]


@dataclass(frozen=True)
class Delete:
    oid: int
    old_kind: str  # 'K' or 'O'
    old: tuple[Any, ...]


@dataclass(frozen=True)
class Truncate:
    options: int
    oids: tuple[int, ...]


@dataclass(frozen=True)
class LogicalMessage:
    """A ``pg_logical_emit_message`` record: ``flags & 1`` = transactional (sent inside its transaction, only if
    it committed); non-transactional ones are sent at once, outside any transaction."""

    flags: int
    lsn: int
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        return bool(self.flags & 1)


Message = Begin | Commit | Origin | Relation | TypeMsg | Insert | Update | Delete | Truncate | LogicalMessage

UNCHANGED = object()
"""Placeholder of an unchanged TOASTed value in a decoded tuple (the server does not send it)."""


class _Reader:
    __slots__ = ("buf", "pos", "kind")

    def __init__(self, buf: bytes, kind: str) -> None:
        self.buf, self.pos, self.kind = buf, 1, kind

    def fail(self, what: str) -> DecodeError:
        return DecodeError(f"pgoutput {self.kind!r} message: {what} at byte {self.pos} of {len(self.buf)}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"truncated (needs {n} more bytes)")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def int8(self) -> int:
        return self.take(1)[0]

    def int16(self) -> int:
        v: int = struct.unpack(">h", self.take(2))[0]
        return v

    def int32(self) -> int:
        v: int = struct.unpack(">i", self.take(4))[0]
        return v

    def uint32(self) -> int:
        v: int = struct.unpack(">I", self.take(4))[0]
        return v

    def int64(self) -> int:
        v: int = struct.unpack(">q", self.take(8))[0]
        return v

    def uint64(self) -> int:
        v: int = struct.unpack(">Q", self.take(8))[0]
        return v

    def byte(self) -> str:
        return chr(self.int8())

    def string(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise self.fail("unterminated string")
        raw = self.buf[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"string is not UTF-8 ({e.reason})") from None

    def tuple(self) -> tuple[Any, ...]:
        n = self.int16()
        if n < 0:
            raise self.fail(f"negative column count {n}")
        out: list[Any] = []
        for _ in range(n):
            k = self.byte()
            if k == "n":
                out.append(None)
            elif k == "u":
                out.append(UNCHANGED)
            elif k in ("t", "b"):
                ln = self.int32()
                if ln < 0:
                    raise self.fail(f"negative value length {ln}")
                raw = self.take(ln)
                if k == "b":
                    out.append(raw)
                else:
                    try:
                        out.append(raw.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        raise self.fail(f"text value is not UTF-8 ({e.reason})") from None
            else:
                raise self.fail(f"unknown tuple column kind {k!r}")
        return tuple(out)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise self.fail(f"{len(self.buf) - self.pos} trailing byte(s)")


def _ts(us: int) -> float:
    return PG_EPOCH_UNIX + us / 1e6


def decode(payload: bytes) -> Message:
    """Decode one pgoutput payload into a message object; :class:`DecodeError` if it is malformed."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DecodeError(f"pgoutput payload must be bytes, got {type(payload).__name__}")
    buf = bytes(payload)
    if not buf:
        raise DecodeError("pgoutput payload is empty")
    kind = chr(buf[0])
    r = _Reader(buf, kind)
    msg: Message
    if kind == "B":
        msg = Begin(r.uint64(), _ts(r.int64()), r.uint32())
    elif kind == "C":
        msg = Commit(r.int8(), r.uint64(), r.uint64(), _ts(r.int64()))
    elif kind == "O":
        msg = Origin(r.uint64(), r.string())
    elif kind == "R":
        oid, ns, name, ident = r.uint32(), r.string(), r.string(), r.byte()
        if ident not in "dnfi":
            raise r.fail(f"unknown replica identity {ident!r}")
        n = r.int16()
        if n < 0:
            raise r.fail(f"negative column count {n}")
        cols = []
        for _ in range(n):
            flags = r.int8()
            cols.append(Column(r.string(), r.uint32(), r.int32(), bool(flags & 1)))
        msg = Relation(oid, ns, name, ident, tuple(cols))
    elif kind == "Y":
        msg = TypeMsg(r.uint32(), r.string(), r.string())
    elif kind == "I":
        oid = r.uint32()
        if r.byte() != "N":
            raise r.fail("expected 'N' before the new tuple")
        msg = Insert(oid, r.tuple())
    elif kind == "U":
        oid = r.uint32()
        k = r.byte()
        old_kind: str | None = None
        old = None
        if k in ("K", "O"):
            old_kind, old = k, r.tuple()
            k = r.byte()
        if k != "N":
            raise r.fail(f"expected 'K', 'O' or 'N' in an update, got {k!r}")
        msg = Update(oid, old_kind, old, r.tuple())
    elif kind == "D":
        oid = r.uint32()
        k = r.byte()
        if k not in ("K", "O"):
            raise r.fail(f"expected 'K' or 'O' in a delete, got {k!r}")
        msg = Delete(oid, k, r.tuple())
    elif kind == "T":
        n = r.int32()
        if n < 0:
            raise r.fail(f"negative relation count {n}")
        opts = r.int8()
        if n * 4 > len(buf):
            raise r.fail(f"relation count {n} larger than the message")
        msg = Truncate(opts, tuple(r.uint32() for _ in range(n)))
    elif kind == "M":
        flags = r.int8()
        if flags not in (0, 1):
            raise r.fail(f"unknown logical message flags {flags} (0 or 1 expected)")
        lsn, prefix = r.uint64(), r.string()
        ln = r.int32()
        if ln < 0:
            raise r.fail(f"negative logical message content length {ln}")
        msg = LogicalMessage(flags, lsn, prefix, r.take(ln))
    else:
        raise DecodeError(f"pgoutput: unknown message type {kind!r} (byte 0x{buf[0]:02x})")
    r.end()
    return msg


_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">bQQq")
_U32 = struct.Struct(">I")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_ROW_KINDS = frozenset((0x49, 0x55, 0x44))  # 'I', 'U', 'D'


def _fast_tuple(buf: bytes, off: int, names: tuple[str, ...]) -> tuple[dict[str, Any], int]:
    """TupleData at ``off`` as {column: value} (unchanged TOASTed values left out, as :meth:`Decoder._row`
    does) and the offset after it; raises struct.error/IndexError/UnicodeDecodeError on anything malformed
    (the caller then lets :func:`decode` name it)."""
    n = _I16.unpack_from(buf, off)[0]
    if n != len(names):
        raise IndexError("column count")
    off += 2
    row: dict[str, Any] = {}
    for name in names:
        c = buf[off]
        off += 1
        if c == 0x74 or c == 0x62:  # 't' text, 'b' binary
            ln = _I32.unpack_from(buf, off)[0]
            off += 4
            end = off + ln
            if ln < 0 or end > len(buf):
                raise IndexError("value length")
            row[name] = buf[off:end].decode("utf-8") if c == 0x74 else buf[off:end]
            off = end
        elif c == 0x6E:  # 'n'
            row[name] = None
        elif c == 0x75:  # 'u': not sent
            pass
        else:
            raise IndexError("column kind")
    return row, off


@dataclass
class RowChange:
    """One decoded row change: ``kind`` is ``insert``/``update``/``delete``/``truncate``."""

    kind: str
    relation: Relation
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    old_kind: str | None = None


@dataclass
class DecodedTransaction:
    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: float
    changes: list[RowChange] = field(default_factory=list)
    messages: list[LogicalMessage] = field(default_factory=list)  # transactional logical messages, in order


class Decoder:
    """Stateful layer over :func:`decode`: relation cache and transaction assembly.

    ``feed(payload)`` returns a :class:`DecodedTransaction` when the payload is a ``Commit``, else None.
    Transactional logical messages go into the transaction's ``messages``; non-transactional ones (sent outside
    any transaction) are only counted in ``nontransactional_messages``.
    """

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self._txn: DecodedTransaction | None = None
        self.nontransactional_messages = 0

    @property
    def in_transaction(self) -> bool:
        return self._txn is not None

    def _rel(self, oid: int, kind: str) -> Relation:
        try:
            return self.relations[oid]
        except KeyError:
            raise DecodeError(f"pgoutput {kind!r} message for relation {oid} before its Relation message") from None

    @staticmethod
    def _row(rel: Relation, values: tuple[Any, ...] | None) -> dict[str, Any] | None:
        if values is None:
            return None
        if len(values) != len(rel.columns):
            raise DecodeError(f"pgoutput tuple of {rel.namespace}.{rel.name} has {len(values)} columns, "
                              f"relation has {len(rel.columns)}")
        return {c.name: v for c, v in zip(rel.columns, values, strict=True) if v is not UNCHANGED}

    def _need_txn(self, kind: str) -> DecodedTransaction:
        if self._txn is None:
            raise DecodeError(f"pgoutput {kind!r} message outside a transaction (no Begin)")
        return self._txn

    def feed(self, payload: bytes) -> DecodedTransaction | None:
        if type(payload) is bytes and payload:
            # fast path for what a stream of row changes is made of (Begin, Insert/Update/Delete, Commit): read
            # in place, rows built straight into dicts; anything unusual (an unknown relation, a truncated or
            # malformed message, text that is not UTF-8) goes through decode(), which names the problem
            k = payload[0]
            try:
                if k == 0x42 and len(payload) == 21:  # 'B'
                    _final, ts, xid = _BEGIN.unpack_from(payload, 1)
                    self._txn = DecodedTransaction(xid, 0, 0, PG_EPOCH_UNIX + ts / 1e6)
                    return None
                if k == 0x43 and len(payload) == 26 and self._txn is not None:  # 'C'
                    _flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(payload, 1)
                    t = self._txn
                    t.commit_lsn, t.end_lsn, t.commit_time = commit_lsn, end_lsn, PG_EPOCH_UNIX + ts / 1e6
                    self._txn = None
                    return t
                if k in _ROW_KINDS and self._txn is not None:
                    got = self._fast_row(payload, k)
                    if got is not None:
                        self._txn.changes.append(got)
                        return None
            except (struct.error, IndexError, UnicodeDecodeError):
                pass  # decode() below raises the DecodeError naming what is wrong
        m = decode(payload)
        if isinstance(m, Begin):
            # a Begin inside a transaction means the stream restarted: drop the partial one
            self._txn = DecodedTransaction(m.xid, 0, 0, m.commit_time)
        elif isinstance(m, Commit):
            t = self._need_txn("C")
            t.commit_lsn, t.end_lsn, t.commit_time = m.commit_lsn, m.end_lsn, m.commit_time
            self._txn = None
            return t
        elif isinstance(m, Relation):
            self.relations[m.oid] = m
        elif isinstance(m, Insert):
            rel = self._rel(m.oid, "I")
            self._need_txn("I").changes.append(RowChange("insert", rel, None, self._row(rel, m.new)))
        elif isinstance(m, Update):
            rel = self._rel(m.oid, "U")
            self._need_txn("U").changes.append(
                RowChange("update", rel, self._row(rel, m.old), self._row(rel, m.new), m.old_kind))
        elif isinstance(m, Delete):
            rel = self._rel(m.oid, "D")
            self._need_txn("D").changes.append(RowChange("delete", rel, self._row(rel, m.old), None, m.old_kind))
        elif isinstance(m, Truncate):
            t = self._need_txn("T")
            for oid in m.oids:
                t.changes.append(RowChange("truncate", self._rel(oid, "T"), None, None))
        elif isinstance(m, LogicalMessage):
            if m.transactional:
                self._need_txn("M").messages.append(m)
            else:
                self.nontransactional_messages += 1
        # Origin, Type: nothing to do
        return None

    def _fast_row(self, buf: bytes, k: int) -> RowChange | None:
        """An Insert/Update/Delete read in place, or None to let :func:`decode` handle it (the slow path is the
        reference: same result, or the DecodeError)."""
        oid = _U32.unpack_from(buf, 1)[0]
        rel = self.relations.get(oid)
        if rel is None:
            return None
        names = rel.column_names
        tag = buf[5]
        old_kind: str | None = None
        old: dict[str, Any] | None = None
        new: dict[str, Any] | None = None
        off = 6
        if k == 0x49:  # 'I': 'N' tuple
            if tag != 0x4E:
                return None
            new, off = _fast_tuple(buf, off, names)
            kind = "insert"
        elif k == 0x55:  # 'U': ['K' | 'O' tuple] 'N' tuple
            if tag in (0x4B, 0x4F):
                old_kind = chr(tag)
                old, off = _fast_tuple(buf, off, names)
                tag = buf[off]
                off += 1
            if tag != 0x4E:
                return None
            new, off = _fast_tuple(buf, off, names)
            kind = "update"
        else:  # 'D': ('K' | 'O') tuple
            if tag not in (0x4B, 0x4F):
                return None
            old_kind = chr(tag)
            old, off = _fast_tuple(buf, off, names)
            kind = "delete"
        if off != len(buf):
            return None
        return RowChange(kind, rel, old, new, old_kind)

    def reset(self) -> None:
        """Forget the partial transaction (after a reconnect); relations are re-sent by the server."""
        self._txn = None
        self.relations.clear()
