"""Value serializers. JSON by default; msgpack optional; pickle only when chosen by name.

A serializer is any object with ``dumps(value) -> bytes`` and ``loads(bytes) -> value``.
Never unpickle data read from a shared Redis unless every writer is trusted:
that is why ``pickle`` is opt-in.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import re
import uuid
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Serializer(Protocol):
    """The serializer interface: bytes in, bytes out."""

    name: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


TAG = "$cs"
"""The key that marks a tagged value in the JSON serializer's output: ``{"$cs": "<type>", "v": <payload>}``."""

_ESCAPED = re.compile(r"\$cs\$*")  # "$cs", "$cs$", "$cs$$", ...: user keys that must be escaped (one more "$")


def _refuse(path: str, problem: str) -> TypeError:
    return TypeError(f"at {path or 'the top level'}: {problem}")


def _prepare(v: Any, path: str) -> Any:
    """``v`` as plain JSON types (tagged values, escaped keys); raises TypeError naming the path of a bad part."""
    t = type(v)
    if t is str or t is int or t is bool or v is None:
        return v
    if t is float:
        if v != v or v in (_INF, -_INF):
            raise _refuse(path, f"float {v!r} has no JSON form")
        return v
    if t is dict:
        out = {}
        for k, x in v.items():
            if type(k) is not str:
                raise _refuse(path, f"dict key {k!r} is a {type(k).__name__}; JSON keys are strings (convert it "
                              "yourself, or choose another serializer)")
            out[k + "$" if k.startswith(TAG) and _ESCAPED.fullmatch(k) else k] = _prepare(x, f"{path}[{k!r}]")
        return out
    if t is list:
        return [_prepare(x, f"{path}[{i}]") for i, x in enumerate(v)]
    if t is tuple:
        return {TAG: "tuple", "v": [_prepare(x, f"{path}[{i}]") for i, x in enumerate(v)]}
    if t is datetime.datetime:
        return {TAG: "datetime", "v": v.isoformat()}
    if t is datetime.date:
        return {TAG: "date", "v": v.isoformat()}
    if t is decimal.Decimal:
        return {TAG: "decimal", "v": str(v)}
    if t is uuid.UUID:
        return {TAG: "uuid", "v": str(v)}
    if t is bytes:
        return {TAG: "bytes", "v": base64.b64encode(v).decode()}
    raise _refuse(path, f"{t.__module__}.{t.__qualname__} is not supported by the json serializer (supported: "
                  "str, int, float, bool, None, list, dict with str keys, tuple, datetime, date, Decimal, UUID, bytes; "
                  "subclasses are refused so that what comes back is what went in); see docs/core.md#serialization")


_INF = float("inf")
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "tuple": tuple,
    "datetime": datetime.datetime.fromisoformat,
    "date": datetime.date.fromisoformat,
    "decimal": decimal.Decimal,
    "uuid": uuid.UUID,
    "bytes": base64.b64decode,
}


def _hook(d: dict[str, Any]) -> Any:
    if TAG in d:
        if len(d) != 2 or "v" not in d or d[TAG] not in _DECODERS:
            raise ValueError(f"malformed tagged value {d!r}")
        return _DECODERS[d[TAG]](d["v"])
    if any(k.startswith(TAG) for k in d):
        return {k[:-1] if _ESCAPED.fullmatch(k) else k: x for k, x in d.items()}
    return d


class JsonSerializer:
    """Compact JSON (UTF-8) that gives back exactly what it was given, or refuses it.

    Plain JSON types (str, int, float, bool, None, list, dict with str keys) are written as themselves; a dict
    with a non-str key, a NaN/infinite float, a subclass (an ``IntEnum``, an ``OrderedDict``) or any other type
    is refused (``TypeError`` naming where it is; the cache raises :class:`cachesync.SerializationError` with the
    cache key). ``tuple``, ``datetime.datetime``, ``datetime.date``, ``decimal.Decimal``, ``uuid.UUID`` and
    ``bytes`` are tagged (``{"$cs": "<type>", "v": ...}``) and come back as the same type; a user dict key
    spelled like the tag (``"$cs"``, ``"$cs$"``...) is escaped with one more ``$``, so no user data is taken
    for a tag. Aware datetimes come back with a fixed-offset ``timezone`` (same instant and offset).
    Decoding pays for tags only when the payload contains the tag (one substring test otherwise).
    """

    name = "json"

    def __init__(self) -> None:
        self._enc = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        self._dec = json.JSONDecoder()
        self._raw = self._dec.raw_decode
        self._tagged = json.JSONDecoder(object_hook=_hook)

    def dumps(self, value: Any) -> bytes:
        return self._enc.encode(_prepare(value, "")).encode()

    def loads(self, data: bytes) -> Any:
        if b'"$cs' in data:
            return self._tagged.decode(data.decode())
        s = data.decode()
        try:  # what dumps writes (no surrounding whitespace) without decode()'s two whitespace scans
            value, end = self._raw(s)
            if end == len(s):
                return value
        except ValueError:
            pass
        return self._dec.decode(s)  # surrounding whitespace, trailing data, or the error to raise


class ModelSerializer:
    """A serializer for one pydantic v2 model class (or a list of them): ``serializers.pydantic(Model)``.

    ``dumps`` takes a ``Model`` instance (or ``NOT_FOUND`` is handled by the cache, never reaching it) and writes
    ``model.model_dump_json()``; ``loads`` validates with ``Model.model_validate_json``. Anything else is refused.
    """

    def __init__(self, model: type[Any], many: bool = False) -> None:
        self.model = model
        self.many = many
        self.name = f"pydantic:{model.__name__}{'[]' if many else ''}"
        if many:
            from pydantic import TypeAdapter

            self._adapter: Any = TypeAdapter(list[model])  # type: ignore[valid-type]  # a runtime model class

    def dumps(self, value: Any) -> bytes:
        if self.many:
            if not isinstance(value, list) or not all(isinstance(v, self.model) for v in value):
                raise TypeError(f"{self.name} stores a list of {self.model.__name__}, got {type(value).__name__}")
            out: bytes = self._adapter.dump_json(value)
            return out
        if not isinstance(value, self.model):
            raise TypeError(f"{self.name} stores {self.model.__name__} instances, got {type(value).__name__}")
        out2: str = value.model_dump_json()
        return out2.encode()

    def loads(self, data: bytes) -> Any:
        if self.many:
            return self._adapter.validate_json(data)
        return self.model.model_validate_json(data)


def pydantic(model: type[Any], *, many: bool = False) -> ModelSerializer:
    """``Cache(..., serializer=cachesync.serializers.pydantic(User))``: values are ``User`` instances (with
    ``many=True``: lists of them), written as their JSON and validated on the way back."""
    if not (isinstance(model, type) and hasattr(model, "model_validate_json")):
        from ..errors import ConfigError

        raise ConfigError("serializer", f"pydantic() needs a pydantic v2 BaseModel class, got {model!r}")
    return ModelSerializer(model, many)


class MsgspecSerializer:
    """A msgspec JSON serializer for one type: ``serializers.msgspec(Struct)`` (needs ``msgspec``).

    ``typ`` is a class (a ``msgspec.Struct``, a dataclass...: ``dumps`` takes instances of it) or any type msgspec
    decodes (``list[User]``: ``dumps`` checks that the value decodes back as that type). Anything else is refused
    with a ``TypeError`` (the cache raises :class:`cachesync.SerializationError` naming the key) before it is
    stored; ``loads`` validates with ``msgspec.json.Decoder(typ)``.
    """

    def __init__(self, typ: Any) -> None:
        from ..errors import ConfigError

        try:
            import msgspec as m  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise ConfigError("serializer", "msgspec() needs the msgspec package: pip install cachesync[msgspec]"
                              ) from None
        self.typ = typ
        self._label = typ.__qualname__ if isinstance(typ, type) else repr(typ)
        self.name = f"msgspec:{self._label}"
        self._enc = m.json.Encoder()
        try:
            self._dec = m.json.Decoder(typ)
        except TypeError as e:
            raise ConfigError("serializer", f"msgspec() cannot decode {typ!r}: {e}") from None
        self._errors: tuple[type[BaseException], ...] = (m.ValidationError, m.DecodeError)

    def dumps(self, value: Any) -> bytes:
        if isinstance(self.typ, type):
            if not isinstance(value, self.typ):
                raise TypeError(f"{self.name} stores {self._label} instances, got {type(value).__name__}")
            out: bytes = self._enc.encode(value)
            return out
        out = self._enc.encode(value)
        try:
            self._dec.decode(out)
        except self._errors as e:
            raise TypeError(f"{self.name}: the value does not decode back as {self._label}: {e}") from None
        return out

    def loads(self, data: bytes) -> Any:
        return self._dec.decode(data)


def msgspec(typ: Any) -> MsgspecSerializer:
    """``Cache(..., serializer=cachesync.serializers.msgspec(MyStruct))``: typed values through msgspec JSON."""
    return MsgspecSerializer(typ)


class MsgpackSerializer:
    """msgpack (needs the ``msgpack`` package: ``pip install cachesync[msgpack]``)."""

    name = "msgpack"

    def __init__(self) -> None:
        import msgpack

        self._m = msgpack

    def dumps(self, value: Any) -> bytes:
        out: bytes = self._m.packb(value, use_bin_type=True)
        return out

    def loads(self, data: bytes) -> Any:
        return self._m.unpackb(data, raw=False)


class PickleSerializer:
    """pickle: only for a Redis that no untrusted party can write to."""

    name = "pickle"

    def dumps(self, value: Any) -> bytes:
        import pickle

        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> Any:
        import pickle

        return pickle.loads(data)  # noqa: S301 - explicitly chosen by the user


_BY_NAME: dict[str, type] = {"json": JsonSerializer, "msgpack": MsgpackSerializer, "pickle": PickleSerializer}


def resolve_serializer(spec: str | Serializer) -> Serializer:
    """Turn the ``serializer`` option (a name or an object) into a serializer."""
    from ..errors import ConfigError

    if isinstance(spec, str):
        try:
            cls = _BY_NAME[spec]
        except KeyError:
            raise ConfigError("serializer", f"unknown serializer {spec!r}; known: json, msgpack, pickle") from None
        try:
            out: Serializer = cls()
            return out
        except ImportError as e:
            raise ConfigError("serializer", f"{spec!r} needs a package that is not installed: {e}") from e
    if not (callable(getattr(spec, "dumps", None)) and callable(getattr(spec, "loads", None))):
        raise ConfigError("serializer", f"{spec!r} has no dumps()/loads()")
    return spec
