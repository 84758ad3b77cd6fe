"""Fuzzing the daemons' decoders with Hypothesis (issue 10): every input either applies or is parked /
dead-lettered / skipped; nothing escapes the loop. Bus messages (Invalidation.decode, and a worker on a real
Redis Streams bus), outbox rows and NOTIFY payloads (the relay), CDC row images -> keys (the runner)."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cachesync
from cachesync.bus import Invalidation
from cachesync.bus.redis_streams import RedisStreamsBus
from cachesync.bus.worker import Worker
from cachesync.cdc import CdcRunner, FileCheckpoint
from cachesync.cdc.base import Change, Transaction
from cachesync.cdc.postgres import PostgresSource
from cachesync.errors import BadDataError
from cachesync.keys import check_key
from cachesync.outbox.relay import Relay
from cachesync.protocol import encode_version
from cachesync.rules import Rules

MAXB = 40
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=50),
                    st.binary(max_size=20), st.decimals(allow_nan=True), st.datetimes(), st.dates())
json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=60)),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=4),
                           max_leaves=12)
messages = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={"k": json_values, "v": json_values, "t": json_values, "o": json_values,
                                        "n": json_values}).map(lambda d: json.dumps(d).encode()),
    st.builds(lambda ks, v: json.dumps({"k": ks, "v": v}).encode(), st.lists(st.text(max_size=60), max_size=3),
              st.one_of(st.none(), st.integers(), st.text(max_size=10))),
)


@pytest.fixture
def small_cache(redis_url: str, namespace: str) -> Iterator[cachesync.Cache]:
    c = cachesync.Cache(redis_url, namespace=namespace, max_key_bytes=MAXB)
    yield c
    c.close()


def _usable(keys: Any, version: Any) -> None:
    """What the cache will be asked to do must be accepted by it (no error left for later)."""
    for k in keys:
        check_key(k, MAXB)
    if version is not None:
        encode_version(version)


@FUZZ
@given(messages)
def test_message_decode_returns_an_invalidation_or_raises_bad_data(body: bytes) -> None:
    try:
        m = Invalidation.decode(body)
    except BadDataError:
        return
    assert isinstance(m.keys, tuple) and all(isinstance(k, str) and k for k in m.keys)
    if m.version is not None:
        encode_version(m.version)
    assert Invalidation.decode(m.encode()) == m


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(messages, min_size=1, max_size=8))
def test_worker_applies_or_dead_letters_every_message(redis_url: str, small_cache: cachesync.Cache,
                                                      bodies: list[bytes]) -> None:
    bus = RedisStreamsBus(redis_url, "csf" + uuid.uuid4().hex[:10], claim_idle=30)
    try:
        good = Invalidation(("fuzz:ok",)).encode()
        for b in [*bodies, good]:
            bus.r.execute_command("XADD", bus.stream, "*", "m", b)
        w = Worker(bus, small_cache, Rules({"users": ["user:{id}"]}), group="g", batch_size=3)
        for _ in range(20):  # never raises; every message ends up acked or dead-lettered
            w.run_once(0.01)
            if w.stats["messages"] + w.stats["dead"] + w.stats["malformed"] - w._bad == len(bodies) + 1:
                break
        assert w.stats["messages"] + len(bus.dead_letters(100)) == len(bodies) + 1, w.stats
        assert bus.pending("g") == 0
    finally:
        bus.destroy()
        bus.close()


rows = st.tuples(st.integers(1, 2**40),
                 st.one_of(json_values.map(json.dumps), st.text(max_size=60), st.binary(max_size=20), st.none(),
                           st.integers()),
                 st.one_of(st.none(), st.text(max_size=12), st.integers(), st.floats(), st.binary(max_size=8)),
                 st.integers(0, 10))


@FUZZ
@given(st.lists(rows, max_size=10))
def test_relay_parses_every_row_into_usable_or_parked(pg_url: str, small_cache: cachesync.Cache,
                                                      raw: list[tuple[Any, ...]]) -> None:
    relay = Relay(pg_url, small_cache, init=False)
    good, bad = relay._parse(raw)
    assert len(good) + len(bad) == len(raw)
    for r in good:
        assert r.prefixes is not None or r.keys
        _usable(r.keys, r.version)
    assert all(isinstance(err, str) and err for _, err, _ in bad)


payloads = st.one_of(st.text(max_size=80), json_values.map(json.dumps),
                     st.lists(st.tuples(st.one_of(st.integers(), st.floats(), st.text(max_size=5), st.none()),
                                        st.one_of(json_values.map(json.dumps), st.integers(), st.none()),
                                        st.one_of(st.none(), st.text(max_size=8), st.integers(), st.floats())),
                              max_size=3).map(json.dumps))


@FUZZ
@given(st.lists(payloads, max_size=5))
def test_relay_fast_path_never_raises_on_a_payload(pg_url: str, small_cache: cachesync.Cache,
                                                   got: list[str]) -> None:
    relay = Relay(pg_url, small_cache, init=False)
    assert relay.fast
    n = relay._apply_payloads(got)
    assert n >= 0 and n == len(relay._applied)


images = st.one_of(st.none(), st.dictionaries(st.sampled_from(["id", "email", "ver", "other"]), scalars, max_size=4))


@pytest.fixture
def runner(pg_url: str, small_cache: cachesync.Cache, tmp_path: Path) -> CdcRunner:
    rules = Rules({"users": {"keys": ["u:{id}", "e:{email}", "all"], "version": "ver"}})
    src = PostgresSource(pg_url, rules, slot="unused_" + uuid.uuid4().hex[:8], create=False)
    return CdcRunner(src, small_cache, rules, FileCheckpoint(tmp_path / "cp.json"), stats_interval=0)


@FUZZ
@given(st.lists(st.tuples(images, images), min_size=1, max_size=5),
       st.dictionaries(st.text(max_size=50), scalars, max_size=3))
def test_cdc_rows_become_usable_keys_or_are_skipped(runner: CdcRunner, changes: list[tuple[Any, Any]],
                                                    named: dict[str, Any]) -> None:
    txn = Transaction({"lsn": 1}, None, [Change(None, "users", o, n) for o, n in changes if o or n], keys=named)
    keys, prefixes = runner.keys_of(txn)
    for k, v in keys.items():
        _usable([k], v)
    assert all(isinstance(p, str) for p in prefixes)


def test_cdc_versions_compare_as_numbers(runner: CdcRunner) -> None:
    txn = Transaction({"lsn": 1}, None, [Change(None, "users", None, {"id": 1, "email": "a", "ver": "9"}),
                                         Change(None, "users", None, {"id": 1, "email": "a", "ver": "10"})])
    keys, _ = runner.keys_of(txn)
    assert keys["u:1"] == "10"  # "10" > "9" as numbers, not as text
    assert encode_version(dt.datetime(2024, 1, 1)) == "1704067200000000"
