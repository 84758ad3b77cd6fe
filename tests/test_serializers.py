"""The JSON serializer round-trips exactly what it accepts (tagged datetime/date/Decimal/UUID/tuple/bytes,
escaped look-alike keys) or refuses it; pydantic models plug in."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections import OrderedDict
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cachesync
from cachesync import SerializationError
from cachesync.serializers import JsonSerializer, pydantic

J = JsonSerializer()


def rt(v):
    return J.loads(J.dumps(v))


def same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("v", [
    dt.datetime(2026, 12, 2, 11, 3, 4, 123456), dt.datetime(2026, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=5))),
    dt.date(2026, 2, 28), Decimal("12.3400"), Decimal("-1E+7"), uuid.UUID("12345678-1234-5678-1234-567812345678"),
    (1, "a", (2.5, None)), b"\x00\xffbin", {"when": dt.date(2020, 1, 1), "items": [(1, 2), Decimal("0.1")]},
])
def test_tagged_types_come_back_as_the_same_type(v):
    assert same(rt(v), v)


@pytest.mark.parametrize("v", [{"$cs": "datetime", "v": "2020-01-01"}, {"$cs$": 1, "$cs": 2, "$csx": 3},
                               {"$cs": "tuple", "v": [1, 2]}, [{"$cs$$": {"$cs": None}}]])
def test_a_user_dict_that_looks_like_a_tag_is_not_confused(v):
    assert same(rt(v), v)


def test_plain_json_is_written_as_itself():
    assert J.dumps({"a": [1, 2.5, True, None, "é"]}) == '{"a":[1,2.5,true,null,"é"]}'.encode()


@pytest.mark.parametrize("v,problem", [
    ({1: "a"}, r"dict key 1 is a int"), ({"x": {None: 1}}, r"at \['x'\]: dict key None"),
    ({"a": [1, {2}]}, r"at \['a'\]\[1\]: builtins.set"), (float("nan"), "nan"), (OrderedDict(a=1), "OrderedDict"),
    (enum.IntEnum("E", "A").A, "E"), (dt.timedelta(1), "timedelta"),
])
def test_what_does_not_round_trip_is_refused(v, problem):
    with pytest.raises(TypeError, match=problem):
        J.dumps(v)


def test_cache_names_the_key_of_a_refused_value(cache):
    with pytest.raises(SerializationError, match=r"key 'user:1'.*dict key 1"):
        cache.get("user:1", lambda: {1: "a"})
    when = dt.datetime(2026, 12, 2, 10, 0)
    assert cache.get("t", lambda: {"at": when, "amount": Decimal("9.99")}) == {"at": when, "amount": Decimal("9.99")}
    hit = cache.get("t", lambda: pytest.fail("must be a hit"))
    assert type(hit["at"]) is dt.datetime and type(hit["amount"]) is Decimal


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
    | st.datetimes() | st.dates() | st.decimals(allow_nan=False, allow_infinity=False) | st.uuids() | st.binary(),
    lambda ch: st.lists(ch, max_size=4) | st.tuples(ch, ch)
    | st.dictionaries(st.sampled_from(["$cs", "$cs$", "$cs$$", "$csx", "v", "a", ""]) | st.text(max_size=5), ch, max_size=4),
    max_leaves=20)


@given(json_values)
def test_round_trip_property(v):
    assert same(rt(v), v)


def test_pydantic_model_serializer(redis_url, namespace):
    from pydantic import BaseModel

    class User(BaseModel):
        id: int
        email: str
        seen: dt.datetime

    u = User(id=1, email="a@x", seen=dt.datetime(2026, 1, 1, 12))
    c = cachesync.Cache(redis_url, namespace=namespace, serializer=pydantic(User))
    try:
        assert c.get("u:1", lambda: u) == u
        got = c.get("u:1", lambda: pytest.fail("hit"))
        assert isinstance(got, User) and got == u
        with pytest.raises(SerializationError, match="stores User instances, got dict"):
            c.get("u:2", lambda: {"id": 2})
        assert c.get("u:3", lambda: cachesync.NOT_FOUND) is cachesync.NOT_FOUND
    finally:
        c.close()
    many = pydantic(User, many=True)
    assert many.loads(many.dumps([u, u])) == [u, u]
    with pytest.raises(cachesync.ConfigError, match="pydantic v2 BaseModel"):
        pydantic(dict)


try:  # module level: msgspec resolves the (postponed) annotations in the module's namespace
    import msgspec as _msgspec
except ImportError:  # pragma: no cover - the msgspec extra is part of [all]
    _msgspec = None

if _msgspec is not None:
    class Address(_msgspec.Struct):
        city: str

    class Customer(_msgspec.Struct):
        id: int
        ref: uuid.UUID
        seen: dt.datetime
        tags: list[str]
        address: Address | None = None


def test_msgspec_struct_serializer(redis_url, namespace):
    """A msgspec Struct round-trips through a real Redis as the same type; anything else is refused."""
    pytest.importorskip("msgspec")
    from cachesync.serializers import msgspec as msgspec_serializer

    u = Customer(id=1, ref=uuid.UUID(int=7), seen=dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC),
                 tags=["a", "b"], address=Address("Oslo"))
    c = cachesync.Cache(redis_url, namespace=namespace, serializer=msgspec_serializer(Customer))
    try:
        assert c.get("c:1", lambda: u) == u
        got = c.get("c:1", lambda: pytest.fail("hit expected"))
        assert type(got) is Customer and got == u and type(got.address) is Address and type(got.ref) is uuid.UUID
        assert c.get("c:1v", lambda: cachesync.Versioned(u, 3)) == u  # a versioned fill
        assert c.get("c:1v", lambda: pytest.fail("hit expected")) == u
        with pytest.raises(SerializationError, match="stores Customer instances, got dict"):
            c.get("c:2", lambda: {"id": 2})
        assert c.get("c:3", lambda: cachesync.NOT_FOUND) is cachesync.NOT_FOUND
        assert c.get("c:3", lambda: pytest.fail("negative hit expected")) is cachesync.NOT_FOUND
    finally:
        c.close()
    many = msgspec_serializer(list[Customer])
    assert many.loads(many.dumps([u, u])) == [u, u]
    with pytest.raises(TypeError, match="does not decode back as"):
        many.dumps([u, {"id": 2}])
    with pytest.raises(cachesync.ConfigError, match="cannot decode"):
        msgspec_serializer(object())


@pytest.mark.parametrize("data", [b"1", b" 1", b"1 ", b"\n{\"a\": [1, 2]}\t", b'"x"', b"[]", b"null", b"1 2", b"{", b"",
                                  b" ", b"[1]]", b"nul", "\"\u00e9\"".encode()])
def test_json_loads_reads_exactly_what_json_loads_reads(data: bytes) -> None:
    """The decoder skips json's two whitespace scans for what dumps writes; every other input (surrounding
    whitespace, trailing data, invalid JSON) gets json.loads's answer or its error."""
    import json

    s = JsonSerializer()
    try:
        want: object = json.loads(data)
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            s.loads(data)
        assert str(got.value) == str(e)
    else:
        assert s.loads(data) == want
