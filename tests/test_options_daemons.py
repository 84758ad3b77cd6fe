"""The daemons' options objects (RelayOptions, WorkerOptions, CdcOptions, AuditOptions), the shared validation
helper, and the exception hierarchy: every exception in errors.py, split into misuse / bad data / services."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cachesync
from cachesync import _validate, errors
from cachesync.audit import AuditOptions, Auditor
from cachesync.bus import Invalidation, WorkerOptions
from cachesync.bus.redis_streams import RedisStreamsBus
from cachesync.bus.worker import Worker
from cachesync.cdc import CdcOptions, CdcRunner, FileCheckpoint, Source, Transaction
from cachesync.cdc.pgoutput import decode as pg_decode
from cachesync.errors import (
    AuditError,
    BadDataError,
    BusError,
    CdcConfigError,
    ConfigError,
    OutboxError,
    ServiceError,
    ServiceUnavailableError,
    UsageError,
)
from cachesync.outbox import RelayOptions
from cachesync.outbox.relay import Relay
from cachesync.rules import Rules

NAN, INF = float("nan"), float("inf")

# ------------------------------------------------------------------------------------------- fixtures


class _IdleSource(Source):
    """A source with no transactions: the runner's constructor only asks it for counters."""

    kind = "idle"

    @property
    def ident(self) -> str:
        return "idle:test"

    def check(self) -> None:
        pass

    def current_position(self) -> dict[str, Any]:
        return {"n": 0}

    def stream(self, position: dict[str, Any]) -> Iterator[Transaction]:
        return iter(())

    def close(self) -> None:
        pass


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'outbox.db'}"


@pytest.fixture
def bus(redis_url: str) -> Iterator[RedisStreamsBus]:
    b = RedisStreamsBus(redis_url, "cst" + uuid.uuid4().hex[:10])
    yield b
    b.close()


def _relay(url: str, cache: cachesync.Cache, **kw: Any) -> Relay:
    return Relay(url, cache, **kw)


def _worker(bus: Any, cache: cachesync.Cache, **kw: Any) -> Worker:
    return Worker(bus, cache, **kw)


def _runner(cache: cachesync.Cache, tmp_path: Path, **kw: Any) -> CdcRunner:
    return CdcRunner(_IdleSource(), cache, Rules({"t": ["k:{id}"]}), FileCheckpoint(tmp_path / "cp.json"), **kw)


def _auditor(cache: cachesync.Cache, **kw: Any) -> Auditor:
    return Auditor(cache, loader=lambda key: None, **kw)


# ------------------------------------------------------------------------------------------- options objects

OPTIONS = [RelayOptions, WorkerOptions, CdcOptions, AuditOptions]


@pytest.mark.parametrize("cls", OPTIONS, ids=lambda c: c.__name__)
def test_options_are_frozen_dataclasses_with_valid_defaults(cls: Any) -> None:
    o = cls()
    f = dataclasses.fields(cls)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(o, f.name, f.default)
    assert getattr(o, f.name) == f.default
    copy = dataclasses.replace(o)  # replace() validates again
    assert copy == o and copy is not o


@pytest.mark.parametrize("name", ["RelayOptions", "WorkerOptions", "CdcOptions", "AuditOptions"])
def test_options_are_exported_from_the_top_level(name: str) -> None:
    assert name in cachesync.__all__
    assert getattr(cachesync, name) in OPTIONS


BAD = [  # (class, option, bad value, old component error class that must still catch it)
    (RelayOptions, "batch_size", 0, OutboxError), (RelayOptions, "batch_size", True, OutboxError),
    (RelayOptions, "batch_size", 1.5, OutboxError), (RelayOptions, "batch_size", "500", OutboxError),
    (RelayOptions, "poll_interval", 0, OutboxError), (RelayOptions, "poll_interval", NAN, OutboxError),
    (RelayOptions, "lease", -1, OutboxError), (RelayOptions, "lease", INF, OutboxError),
    (RelayOptions, "max_backoff", 0, OutboxError), (RelayOptions, "claim_delay", -0.1, OutboxError),
    (RelayOptions, "claim_delay", NAN, OutboxError), (RelayOptions, "listen", 1, OutboxError),
    (RelayOptions, "init", "yes", OutboxError), (RelayOptions, "fast", 0, OutboxError),
    (RelayOptions, "apply", "no", OutboxError), (RelayOptions, "table", "bad name", OutboxError),
    (RelayOptions, "table", "x" * 56, OutboxError),
    (WorkerOptions, "batch_size", 0, BusError), (WorkerOptions, "max_attempts", 0, BusError),
    (WorkerOptions, "max_attempts", 2.0, BusError), (WorkerOptions, "backoff", -1, BusError),
    (WorkerOptions, "backoff", False, BusError), (WorkerOptions, "max_backoff", NAN, BusError),
    (WorkerOptions, "group", "", BusError), (WorkerOptions, "group", None, BusError),
    (WorkerOptions, "consumer", "", BusError),
    (CdcOptions, "batch_max_keys", 0, CdcConfigError), (CdcOptions, "queue_size", -5, CdcConfigError),
    (CdcOptions, "queue_size", 10.0, CdcConfigError), (CdcOptions, "stats_interval", -1, CdcConfigError),
    (CdcOptions, "reconnect_delay", 0, CdcConfigError), (CdcOptions, "reconnect_max_delay", INF, CdcConfigError),
    (CdcOptions, "reconnect_max_delay", 0.1, CdcConfigError),  # below reconnect_delay (0.2)
    (CdcOptions, "on_missing_old_image", "ignore", CdcConfigError),
    (CdcOptions, "checkpoint_in_background", 1, CdcConfigError),
    (CdcOptions, "checkpoint_interval", -1, CdcConfigError), (CdcOptions, "checkpoint_interval", NAN, CdcConfigError),
    (AuditOptions, "grace", -1, AuditError), (AuditOptions, "grace", NAN, AuditError),
    (AuditOptions, "batch", 0, AuditError), (AuditOptions, "batch", 10.5, AuditError),
]


@pytest.mark.parametrize(("cls", "option", "value", "old"), BAD,
                         ids=[f"{c.__name__}.{o}={v!r}" for c, o, v, _ in BAD])
def test_each_bad_value_raises_config_error_naming_the_option(cls: Any, option: str, value: Any, old: type) -> None:
    with pytest.raises(ConfigError) as ei:
        cls(**{option: value})
    assert ei.value.option == option
    assert f"option {option!r}" in str(ei.value)
    if not (isinstance(value, float) and math.isnan(value)):
        assert repr(value)[:20] in str(ei.value)  # the value too
    assert isinstance(ei.value, old), "old `except` clauses of the component must still catch it"
    assert isinstance(ei.value, UsageError) and not ei.value.retryable


def test_relay_keywords_build_the_same_options_object(sqlite_url: str, cache: cachesync.Cache) -> None:
    kw: dict[str, Any] = {"batch_size": 7, "poll_interval": 0.5, "lease": 3.0, "max_backoff": 2.0, "claim_delay": 0.0,
          "listen": False, "init": False, "table": "ob_" + uuid.uuid4().hex[:8]}
    by_kw = _relay(sqlite_url, cache, **kw)
    by_obj = Relay(sqlite_url, cache, options=RelayOptions(**kw))
    assert by_kw.options == by_obj.options == RelayOptions(**kw)
    for r in (by_kw, by_obj):  # the old attributes keep working (resolved values)
        assert (r.batch_size, r.poll_interval, r.lease_ms, r.max_backoff, r.claim_delay, r.table) == \
            (7, 0.5, 3000, 2.0, 0.0, kw["table"])
        assert r.listen is False and r.fast is False and r.apply is True
    assert Relay(sqlite_url, cache).poll_interval == 0.05  # poll_interval=None resolved (no LISTEN on SQLite)
    with pytest.raises(dataclasses.FrozenInstanceError):
        by_obj.options.batch_size = 1  # type: ignore[misc]  # the test is that it raises


def test_worker_keywords_build_the_same_options_object(bus: RedisStreamsBus, cache: cachesync.Cache) -> None:
    kw: dict[str, Any] = {"group": "g1", "consumer": "c1", "batch_size": 3, "max_attempts": 2, "backoff": 0.5, "max_backoff": 4.0}
    by_kw = _worker(bus, cache, **kw)
    by_obj = Worker(bus, cache, options=WorkerOptions(**kw))
    assert by_kw.options == by_obj.options == WorkerOptions(**kw)
    for w in (by_kw, by_obj):
        assert (w.group, w.consumer, w.batch_size, w.max_attempts, w.backoff, w.max_backoff) == \
            ("g1", "c1", 3, 2, 0.5, 4.0)
        assert w.delay_for(3) == 2.0
    assert Worker(bus, cache).consumer  # consumer=None resolves to host-pid


def test_cdc_keywords_build_the_same_options_object(cache: cachesync.Cache, tmp_path: Path) -> None:
    kw: dict[str, Any] = {"batch_max_keys": 9, "queue_size": 4, "stats_interval": 0, "reconnect_delay": 0.05,
          "reconnect_max_delay": 0.5, "on_missing_old_image": "flush", "checkpoint_in_background": False}
    by_kw = _runner(cache, tmp_path, **kw)
    by_obj = _runner(cache, tmp_path, options=CdcOptions(**kw))
    assert by_kw.options == by_obj.options == CdcOptions(**kw)
    for r in (by_kw, by_obj):
        assert (r.batch_max_keys, r.queue_size, r.stats_interval, r.reconnect_delay, r.reconnect_max_delay,
                r.on_missing_old_image, r.checkpoint_in_background) == (9, 4, 0.0, 0.05, 0.5, "flush", False)


def test_auditor_keywords_build_the_same_options_object(cache: cachesync.Cache) -> None:
    by_kw, by_obj = _auditor(cache, grace=0, batch=7), _auditor(cache, options=AuditOptions(grace=0, batch=7))
    assert by_kw.options == by_obj.options == AuditOptions(grace=0, batch=7)
    assert (by_obj.grace, by_obj.batch) == (0.0, 7)


BOTH = [
    ("relay", OutboxError, lambda f: Relay(f["db"], f["cache"], options=RelayOptions(), batch_size=5)),
    ("worker", BusError, lambda f: Worker(f["bus"], f["cache"], options=WorkerOptions(), group="g")),
    ("cdc", CdcConfigError, lambda f: _runner(f["cache"], f["tmp"], options=CdcOptions(), queue_size=3)),
    ("audit", AuditError, lambda f: _auditor(f["cache"], options=AuditOptions(), grace=1)),
]


@pytest.fixture
def parts(sqlite_url: str, cache: cachesync.Cache, bus: RedisStreamsBus, tmp_path: Path) -> dict[str, Any]:
    return {"db": sqlite_url, "cache": cache, "bus": bus, "tmp": tmp_path}


@pytest.mark.parametrize(("what", "old", "build"), BOTH, ids=[b[0] for b in BOTH])
def test_options_and_keywords_together_is_a_config_error(parts: dict[str, Any], what: str, old: type,
                                                          build: Any) -> None:
    with pytest.raises(ConfigError, match="either options= or the option keywords") as ei:
        build(parts)
    assert ei.value.option == "options" and isinstance(ei.value, old)


def test_unknown_keyword_and_wrong_options_type_are_named(parts: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="'batchsize'.*unknown option; known options: apply, batch_size"):
        _relay(parts["db"], parts["cache"], batchsize=5)
    with pytest.raises(ConfigError, match="'options'.*must be a WorkerOptions, got RelayOptions"):
        Worker(parts["bus"], parts["cache"], options=RelayOptions())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'on_error'.*callable"):
        Relay(parts["db"], parts["cache"], on_error="log")  # type: ignore[arg-type]


def test_the_clis_build_the_options_before_connecting(tmp_path: Path) -> None:
    """A bad flag is refused (exit 2, naming the option) before any server is contacted."""
    unreachable = "redis://127.0.0.1:1/0"
    rules = tmp_path / "rules.toml"
    rules.write_text('[tables.t]\nkeys = ["k:{id}"]\n')
    cases = [
        (["relay", "--db-url", f"sqlite:///{tmp_path / 'x.db'}", "--redis-url", unreachable, "--batch-size", "0"],
         "'batch_size'"),
        (["relay", "--db-url", f"sqlite:///{tmp_path / 'x.db'}", "--redis-url", unreachable, "--lease", "-1"],
         "'lease'"),
        (["worker", "--bus", unreachable, "--redis-url", unreachable, "--max-attempts", "0"], "'max_attempts'"),
        (["cdc", "--db-url", "postgresql://u@127.0.0.1:1/db", "--rules", str(rules), "--redis-url", unreachable,
          "--queue-size", "0"], "'queue_size'"),
    ]
    for argv, named in cases:
        p = subprocess.run([sys.executable, "-m", "cachesync", *argv], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and named in p.stderr, (argv, p.returncode, p.stderr)
        assert "unreachable" not in p.stderr and "Connection" not in p.stderr


# ------------------------------------------------------------------------------------------- the helper


@pytest.mark.parametrize("v", [0, -1, True, False, NAN, INF, -INF, "1", None, [1]])
def test_positive_refuses(v: Any) -> None:
    with pytest.raises(ConfigError, match="'x'"):
        _validate.positive("x", v)


def test_validate_helpers_accept_and_bound() -> None:
    assert _validate.positive("x", 1) == 1 and _validate.positive("x", 0.5) == 0.5
    assert _validate.non_negative("x", 0) == 0
    assert _validate.seconds("x", 2) == 2.0 and isinstance(_validate.seconds("x", 2), float)
    with pytest.raises(ConfigError, match="100 years"):
        _validate.seconds("x", _validate.MAX_SECONDS * 2)
    with pytest.raises(ConfigError, match="an integer > 0"):
        _validate.positive("x", 2.0, integer=True)
    assert _validate.between("x", 0, 0, 1) == 0
    with pytest.raises(ConfigError):
        _validate.between("x", 0, 0, 1, low_open=True)
    assert _validate.one_of("x", "a", ("a", "b")) == "a"
    with pytest.raises(ConfigError, match="one of 'a', 'b', got 'c'"):
        _validate.one_of("x", "c", ("a", "b"))
    with pytest.raises(ConfigError, match="True or False, got 1"):
        _validate.boolean("x", 1)
    with pytest.raises(OutboxError):
        _validate.positive("x", 0, error=errors.OutboxConfigError)


IO_FREE = ["_validate.py", "errors.py", "outbox/options.py", "bus/options.py", "cdc/options.py"]


@pytest.mark.parametrize("path", IO_FREE)
def test_the_helper_and_the_options_modules_are_io_free(path: str) -> None:
    """They import only the standard library (no I/O modules), the helper and errors.py."""
    import ast

    tree = ast.parse((Path(cachesync.__file__).parent / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        elif isinstance(node, ast.ImportFrom):  # relative: only the helper and the errors
            got = {node.module} if node.module else {a.name for a in node.names}
            assert got <= {"errors", "_validate"}, (path, ast.unparse(node))
            continue
        else:
            continue
        for n in names:
            top = n.split(".")[0]
            assert top in sys.stdlib_module_names and top not in {"asyncio", "threading", "socket", "select"}, \
                (path, n)


# ------------------------------------------------------------------------------------------- exceptions

MOVED = [  # (old module, name): every exception that used to be defined outside errors.py
    ("cachesync.bus", "BusError"), ("cachesync.bus", "BusUnavailableError"), ("cachesync.rules", "RuleError"),
    ("cachesync.outbox", "OutboxError"), ("cachesync.audit", "AuditError"), ("cachesync.db", "DatabaseURLError"),
    ("cachesync.cdc", "CdcError"), ("cachesync.cdc", "CdcConfigError"), ("cachesync.cdc", "Disconnected"),
    ("cachesync.cdc", "PositionLost"), ("cachesync.cdc.base", "CdcError"), ("cachesync.cdc.base", "CdcConfigError"),
    ("cachesync.cdc.base", "Disconnected"), ("cachesync.cdc.base", "PositionLost"),
    ("cachesync.cdc", "CheckpointError"), ("cachesync.cdc.checkpoint", "CheckpointError"),
    ("cachesync.cdc.pgoutput", "DecodeError"), ("cachesync.lab", "LabError"),
    ("cachesync.lab.embedded", "LabError"),
]


@pytest.mark.parametrize(("module", "name"), MOVED, ids=[f"{m}.{n}" for m, n in MOVED])
def test_old_import_paths_of_moved_exceptions_still_work(module: str, name: str) -> None:
    cls = getattr(importlib.import_module(module), name)
    assert cls is getattr(errors, name) and cls.__module__ == "cachesync.errors"


def test_no_exception_class_is_defined_outside_errors_py() -> None:
    """Only the internal signals (never raised to callers) stay in their modules."""
    src = Path(cachesync.__file__).parent
    internal = {"NoScript", "CommandError", "RedisDown", "SubscriptionLost", "_WouldBlock"}  # _WouldBlock: cdc.mysql
    import re

    found = []
    for p in src.rglob("*.py"):
        if p.name == "errors.py":
            continue
        for m in re.finditer(r"^class (\w+)\((?:[\w.]*(?:Error|Exception)[\w.]*,? ?)+\):", p.read_text(), re.M):
            if m.group(1) not in internal:
                found.append(f"{p.relative_to(src)}:{m.group(1)}")
    assert not found, found


MISUSE = ["UsageError", "ConfigError", "UnknownStrategyError", "InvalidKeyError", "SerializationError",
          "ValueTooLargeError", "RuleError", "OutboxError", "OutboxConfigError", "BusError", "BusConfigError",
          "AuditError", "AuditConfigError", "DatabaseURLError", "CdcConfigError", "CdcOptionError", "CheckpointError",
          "LabConfigError"]
BAD_DATA = ["BadDataError", "CorruptEntryError", "CorruptCheckpointError", "DecodeError"]
SERVICES = ["ServiceError", "ServiceUnavailableError", "CacheUnavailableError", "BusUnavailableError",
            "DatabaseUnavailableError", "Disconnected", "PositionLost", "InvalidationError", "RedisCommandError"]


def test_the_hierarchy_splits_misuse_bad_data_and_services() -> None:
    for name in MISUSE:
        cls = getattr(errors, name)
        assert issubclass(cls, UsageError) and issubclass(cls, ValueError) and not cls.retryable, name
        assert not issubclass(cls, ServiceError), name
    for name in BAD_DATA:
        cls = getattr(errors, name)
        assert issubclass(cls, BadDataError) and issubclass(cls, ValueError) and not cls.retryable, name
        assert not issubclass(cls, ServiceError), name
    # Only the checkpoint's corrupt-file error is both (it stays a CheckpointError for old except clauses)
    assert [n for n in BAD_DATA if issubclass(getattr(errors, n), UsageError)] == ["CorruptCheckpointError"]
    for name in SERVICES:
        cls = getattr(errors, name)
        assert issubclass(cls, ServiceError) and cls.retryable, name
        assert not issubclass(cls, (UsageError, BadDataError)), name
    for name in ("CacheUnavailableError", "BusUnavailableError", "DatabaseUnavailableError", "Disconnected"):
        assert issubclass(getattr(errors, name), ServiceUnavailableError), name
    assert issubclass(errors.CacheUnavailableError, ConnectionError)  # as before
    assert issubclass(errors.BusUnavailableError, ConnectionError)
    every = {n for n in dir(errors) if isinstance(getattr(errors, n), type)
             and issubclass(getattr(errors, n), errors.CachesyncError)}
    assert every - set(MISUSE + BAD_DATA + SERVICES) == {"CachesyncError", "CdcError", "LabError"}


def test_malformed_wire_and_storage_items_raise_bad_data_not_usage(tmp_path: Path) -> None:
    # a bus message
    with pytest.raises(BadDataError) as e1:
        Invalidation.decode(b"not json")
    # a pgoutput payload from the replication stream (was a plain CachesyncError)
    with pytest.raises(BadDataError) as e2:
        pg_decode(b"\xff")
    # a checkpoint file on disk (was a UsageError only)
    cp = FileCheckpoint(tmp_path / "cp.json")
    (tmp_path / "cp.json").write_text("{not json")
    with pytest.raises(BadDataError) as e3:
        cp.load("idle", "idle:test")
    (tmp_path / "cp.json").write_text(json.dumps({"source": "idle", "ident": "idle:test", "position": [1]}))
    with pytest.raises(BadDataError, match="position must be an object"):
        cp.load("idle", "idle:test")
    for e in (e1.value, e2.value):
        assert not isinstance(e, UsageError) and not e.retryable
    assert isinstance(e3.value, errors.CheckpointError)  # old except clauses still catch it
    # misuse stays misuse: a checkpoint of another source is the caller's mistake, not bad data
    (tmp_path / "cp.json").write_text(json.dumps({"source": "other", "ident": "x", "position": {}}))
    with pytest.raises(errors.CheckpointError) as e4:
        cp.load("idle", "idle:test")
    assert not isinstance(e4.value, BadDataError)
