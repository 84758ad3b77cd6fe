"""Value serializers. JSON by default; msgpack optional; pickle only when chosen by name.

A serializer is any object with ``dumps(value) -> bytes`` and ``loads(bytes) -> value``.
Never unpickle data read from a shared Redis unless every writer is trusted:
that is why ``pickle`` is opt-in.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Serializer(Protocol):
    """The serializer interface: bytes in, bytes out."""

    name: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JsonSerializer:
    """Compact JSON (UTF-8). Tuples come back as lists; dict keys must be strings."""

    name = "json"

    def __init__(self) -> None:
        self._enc = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        self._dec = json.JSONDecoder()

    def dumps(self, value: Any) -> bytes:
        return self._enc.encode(value).encode()

    def loads(self, data: bytes) -> Any:
        return self._dec.decode(data.decode())


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
    from .errors import ConfigError

    if isinstance(spec, str):
        try:
            cls = _BY_NAME[spec]
        except KeyError:
            raise ConfigError("serializer", f"unknown serializer {spec!r}; known: json, msgpack, pickle") from None
        try:
            out: Serializer = cls()  # type: ignore[assignment]
            return out
        except ImportError as e:
            raise ConfigError("serializer", f"{spec!r} needs a package that is not installed: {e}") from e
    if not (callable(getattr(spec, "dumps", None)) and callable(getattr(spec, "loads", None))):
        raise ConfigError("serializer", f"{spec!r} has no dumps()/loads()")
    return spec
