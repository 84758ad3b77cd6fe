"""The pgoutput decoder: round trips of well-formed messages, and fuzzing with malformed/truncated input:
it raises DecodeError (never another exception, never hangs)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachesync.cdc.pgoutput import (Begin, Commit, DecodeError, Decoder, Delete, Insert, LogicalMessage, Relation,
                                    Truncate, Update, decode)


def s(x: str) -> bytes:
    return x.encode() + b"\0"


def tup(*vals: object) -> bytes:
    out = struct.pack(">h", len(vals))
    for v in vals:
        if v is None:
            out += b"n"
        elif v == "<u>":
            out += b"u"
        else:
            b = str(v).encode()
            out += b"t" + struct.pack(">i", len(b)) + b
    return out


REL = b"R" + struct.pack(">I", 16384) + s("public") + s("users") + b"f" + struct.pack(">h", 2) + \
    b"\x01" + s("id") + struct.pack(">Ii", 23, -1) + b"\x00" + s("email") + struct.pack(">Ii", 25, -1)
BEGIN = b"B" + struct.pack(">QqI", 100, 1_000_000, 7)
INS = b"I" + struct.pack(">I", 16384) + b"N" + tup(1, "a@x")
UPD = b"U" + struct.pack(">I", 16384) + b"O" + tup(1, "a@x") + b"N" + tup(1, "b@x")
DEL = b"D" + struct.pack(">I", 16384) + b"K" + tup(1, None)
TRUNC = b"T" + struct.pack(">ib", 1, 0) + struct.pack(">I", 16384)
COMMIT = b"C" + struct.pack(">bQQq", 0, 150, 200, 1_000_000)


def msg(content: bytes, prefix: str = "cachesync", flags: int = 1, lsn: int = 9) -> bytes:
    return b"M" + struct.pack(">bQ", flags, lsn) + s(prefix) + struct.pack(">i", len(content)) + content


MSG = msg(b'{"keys":["u:1"],"version":"7"}')
VALID = [REL, BEGIN, INS, UPD, DEL, TRUNC, COMMIT, b"O" + struct.pack(">Q", 5) + s("origin"),
         b"Y" + struct.pack(">I", 99) + s("public") + s("mytype"), msg(b"abc", "p"), MSG, msg(b"", flags=0)]


def test_decode_known_messages() -> None:
    r = decode(REL)
    assert isinstance(r, Relation) and r.key_columns == {"id"} and r.replica_identity == "f"
    assert isinstance(decode(BEGIN), Begin)
    assert decode(INS) == Insert(16384, ("1", "a@x"))
    u = decode(UPD)
    assert isinstance(u, Update) and u.old == ("1", "a@x") and u.new == ("1", "b@x")
    assert isinstance(decode(DEL), Delete)
    assert decode(TRUNC) == Truncate(0, (16384,))
    c = decode(COMMIT)
    assert isinstance(c, Commit) and c.end_lsn == 200 and c.commit_time == pytest.approx(946684801.0)


def test_decoder_assembles_a_transaction() -> None:
    d = Decoder()
    for m in (REL, BEGIN, INS, UPD, DEL, TRUNC):
        assert d.feed(m) is None
    t = d.feed(COMMIT)
    assert t is not None and t.end_lsn == 200
    assert [c.kind for c in t.changes] == ["insert", "update", "delete", "truncate"]
    assert t.changes[1].old == {"id": "1", "email": "a@x"} and t.changes[1].new == {"id": "1", "email": "b@x"}


def test_unchanged_toast_value_is_left_out() -> None:
    d = Decoder()
    d.feed(REL)
    d.feed(BEGIN)
    d.feed(b"U" + struct.pack(">I", 16384) + b"N" + tup(1, "<u>"))
    t = d.feed(COMMIT)
    assert t is not None and t.changes[0].new == {"id": "1"}


@pytest.mark.parametrize("bad, why", [
    (b"", "empty"), (b"Z123", "unknown message type"), (INS[:-1], "truncated"), (INS + b"x", "trailing"),
    (b"I" + struct.pack(">I", 1) + b"X" + tup(1), "expected 'N'"),
    (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"q", "unknown tuple column kind"),
    (b"R" + struct.pack(">I", 1) + b"public", "unterminated string"),
    (msg(b"abc", flags=2), "unknown logical message flags 2"), (MSG[:-1], "truncated"), (MSG + b"}", "trailing"),
    (b"M" + struct.pack(">bQ", 1, 9) + s("cachesync") + struct.pack(">i", -1), "negative logical message content"),
    (b"M" + struct.pack(">bQ", 1, 9) + b"cachesync", "unterminated string"),
    (b"M" + struct.pack(">bQ", 1, 9) + b"\xff\0" + struct.pack(">i", 0), "not UTF-8"),
    (b"M\x01", "truncated"),
])
def test_malformed_messages_raise_decode_error(bad: bytes, why: str) -> None:
    with pytest.raises(DecodeError, match=why):
        decode(bad)


def test_change_before_relation_or_outside_transaction() -> None:
    d = Decoder()
    d.feed(BEGIN)
    with pytest.raises(DecodeError, match="before its Relation"):
        d.feed(INS)
    d2 = Decoder()
    d2.feed(REL)
    with pytest.raises(DecodeError, match="outside a transaction"):
        d2.feed(INS)


def test_logical_message_decodes_and_joins_its_transaction() -> None:
    m = decode(MSG)
    assert m == LogicalMessage(1, 9, "cachesync", b'{"keys":["u:1"],"version":"7"}') and m.transactional
    assert not decode(msg(b"x", flags=0)).transactional  # type: ignore[union-attr]
    d = Decoder()
    d.feed(msg(b"n", flags=0))  # non-transactional: outside any transaction, only counted
    assert d.nontransactional_messages == 1
    d.feed(REL)
    d.feed(BEGIN)
    d.feed(INS)
    d.feed(MSG)
    d.feed(msg(b"other", "p"))
    t = d.feed(COMMIT)
    assert t is not None and [c.kind for c in t.changes] == ["insert"]
    assert [x.prefix for x in t.messages] == ["cachesync", "p"]
    with pytest.raises(DecodeError, match="'M' message outside a transaction"):
        d.feed(MSG)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([0, 1]), st.integers(0, 2**64 - 1), st.text(max_size=30).filter(lambda x: "\0" not in x),
       st.binary(max_size=100))
def test_fuzz_logical_message_round_trip(flags: int, lsn: int, prefix: str, content: bytes) -> None:
    raw = b"M" + struct.pack(">BQ", flags, lsn) + s(prefix) + struct.pack(">i", len(content)) + content
    assert decode(raw) == LogicalMessage(flags, lsn, prefix, content)
    for cut in range(len(raw)):  # every truncation is a DecodeError
        with pytest.raises(DecodeError):
            decode(raw[:cut])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=12), st.integers(-2**31, 2**31 - 1), st.binary(max_size=40))
def test_fuzz_logical_message_header(flags: int, prefix: bytes, length: int, rest: bytes) -> None:
    raw = b"M" + bytes([flags]) + struct.pack(">Q", 1) + prefix + b"\0" + struct.pack(">i", length) + rest
    try:
        m = decode(raw)
    except DecodeError:
        return
    assert isinstance(m, LogicalMessage) and flags in (0, 1) and len(m.content) == length == len(rest)


def _feed_all(msgs: list[bytes]) -> None:
    d = Decoder()
    for m in msgs:
        try:
            d.feed(m)
        except DecodeError:
            pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_fuzz_truncated_and_mutated(msg: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(msg)))
    pos = data.draw(st.integers(0, max(0, len(msg) - 1)))
    byte = data.draw(st.integers(0, 255))
    mutated = msg[:pos] + bytes([byte]) + msg[pos + 1:]
    for m in (msg[:cut], mutated, msg[:cut] + data.draw(st.binary(max_size=20))):
        try:
            decode(m)
        except DecodeError:
            pass
    _feed_all([REL, BEGIN, mutated, msg[:cut], COMMIT])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(VALID) | st.binary(max_size=40), max_size=12))
def test_fuzz_message_sequences(msgs: list[bytes]) -> None:
    _feed_all(msgs)


# --------------------------------------------------------------------------- the fast path of Decoder.feed
# Decoder.feed reads Begin/Insert/Update/Delete/Commit in place when the payload is ``bytes`` (what psycopg2
# hands over); any other buffer type goes through decode(), the reference. Both must agree on every input.

BIN_INS = b"I" + struct.pack(">I", 16384) + b"N" + struct.pack(">h", 2) + b"b" + struct.pack(">i", 2) + b"\x00\xff" \
    + b"n"
UPD_K = b"U" + struct.pack(">I", 16384) + b"K" + tup(1, None) + b"N" + tup(2, "<u>")
UPD_PLAIN = b"U" + struct.pack(">I", 16384) + b"N" + tup(1, "c@x")
DEL_O = b"D" + struct.pack(">I", 16384) + b"O" + tup(1, "é@x")
ROWS = [INS, UPD, DEL, BIN_INS, UPD_K, UPD_PLAIN, DEL_O]


def _outcome(payloads: list[bytes], slow: bool) -> list[object]:
    d = Decoder()
    out: list[object] = []
    for p in payloads:
        try:
            t = d.feed(bytearray(p) if slow else p)
        except DecodeError as e:
            out.append(("error", str(e)))
            continue
        if t is None:
            out.append(None)
        else:
            out.append((t.xid, t.commit_lsn, t.end_lsn, t.commit_time,
                        [(c.kind, c.relation.oid, c.old, c.new, c.old_kind) for c in t.changes]))
    return out


def test_fast_path_decodes_like_decode() -> None:
    stream = [REL, BEGIN, *ROWS, COMMIT, BEGIN, INS, COMMIT]
    fast = _outcome(stream, slow=False)
    assert fast == _outcome(stream, slow=True)
    assert fast[-1] is not None and fast[len(ROWS) + 2] is not None
    kinds = [c[0] for c in fast[len(ROWS) + 2][4]]  # type: ignore[index]
    assert kinds == ["insert", "update", "delete", "insert", "update", "update", "delete"]


def test_fast_path_refuses_what_decode_refuses() -> None:
    bad_utf8 = b"I" + struct.pack(">I", 16384) + b"N" + struct.pack(">h", 2) + b"t" + struct.pack(">i", 1) + b"\xff" + b"n"
    cases = [
        INS[:-1],                      # truncated
        INS + b"x",                    # trailing byte
        bad_utf8,                      # text that is not UTF-8
        b"I" + struct.pack(">I", 16384) + b"N" + tup(1),            # fewer columns than the relation
        b"I" + struct.pack(">I", 999) + b"N" + tup(1, "a"),         # unknown relation
        b"I" + struct.pack(">I", 16384) + b"X" + tup(1, "a"),       # no 'N'
        b"D" + struct.pack(">I", 16384) + b"N" + tup(1, "a"),       # delete without 'K'/'O'
        b"I" + struct.pack(">I", 16384) + b"N" + struct.pack(">h", 2) + b"t" + struct.pack(">i", -1) + b"n",
        b"I" + struct.pack(">I", 16384) + b"N" + struct.pack(">h", 2) + b"z" + b"n",
    ]
    for bad in cases:
        fast = _outcome([REL, BEGIN, bad], slow=False)
        assert fast == _outcome([REL, BEGIN, bad], slow=True), bad
        assert isinstance(fast[-1], tuple) and fast[-1][0] == "error", bad
    # a Commit or a row change outside a transaction, a short Begin
    for stray in (COMMIT, INS, BEGIN[:-1]):
        fast = _outcome([REL, stray], slow=False)
        assert fast == _outcome([REL, stray], slow=True)
        assert isinstance(fast[-1], tuple) and fast[-1][0] == "error"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ROWS), st.integers(0, 40), st.integers(0, 255), st.integers(0, 40))
def test_fast_path_agrees_on_mutated_rows(row: bytes, pos: int, byte: int, cut: int) -> None:
    b = bytearray(row)
    if pos < len(b):
        b[pos] = byte
    mutated = bytes(b[:len(b) - cut] if cut < len(b) else b)
    assert _outcome([REL, BEGIN, mutated, COMMIT], slow=False) == _outcome([REL, BEGIN, mutated, COMMIT], slow=True)


def test_source_txn_fast_path_matches_the_general_one() -> None:
    """PostgresSource._txn builds a transaction of row changes only (no logical message, nothing undecodable) on
    a fast path; the general path is the reference: the same changes (old images cut to the key columns when the
    old row is not full), position and commit time."""
    from cachesync.cdc.postgres import PostgresSource
    from cachesync.rules import Rules

    src = PostgresSource("postgresql://u@127.0.0.1:5432/db", Rules({"users": ["user:{id}", "e:{email}"]}))
    d = Decoder()
    t = None
    for p in [REL, BEGIN, *ROWS, TRUNC, COMMIT]:
        t = d.feed(p) or t
    assert t is not None and not t.messages
    fast, ref = src._txn(t), src._txn_general(t)
    assert [c.kind for c in t.changes][-1] == "truncate"
    assert (fast.position, fast.commit_time, fast.changes, fast.keys, fast.prefixes, fast.messages) == \
        (ref.position, ref.commit_time, ref.changes, ref.keys, ref.prefixes, ref.messages)
    assert fast.position == {"lsn": 200, "lsn_text": "0/C8"} and len(fast.changes) == len(ROWS) + 1
