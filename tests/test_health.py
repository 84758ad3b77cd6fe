"""``cachesync relay``/``worker`` with ``--metrics-port``: real subprocesses scraped over HTTP while real traffic
flows; ``/readyz`` flips when Redis or the database goes away (private servers the test stops)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cachesync.bus import Invalidation
from cachesync.bus.redis_streams import RedisStreamsBus
from cachesync.db import connect
from cachesync.keys import entry_key
from cachesync.outbox import Outbox
from private_servers import free_port, private_pg  # noqa: F401  (fixture)
from entries import hexists, hget, hgetall, hset  # noqa: F401


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, text = get(port, "/metrics")
    assert code == 200, text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Daemon:
    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "cachesync", "-v", "-v", *args, "--metrics-port",
                                      str(self.port), "--summary-interval", "0.2"],
                                     stdout=self.log, stderr=self.log, env=dict(os.environ))
        wait_for(lambda: self.proc.poll() is not None or get(self.port, "/healthz")[0] == 200, 30, "/healthz")
        assert self.proc.poll() is None, self.output()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        out = self.output()
        self.log.close()
        return out


@pytest.fixture
def table() -> str:
    return "cachesync_outbox_" + uuid.uuid4().hex[:10]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_relay_metrics_move_with_traffic(kind, pg_url, redis_url, namespace, table, tmp_path):
    db_url = f"sqlite:///{tmp_path}/o.db" if kind == "sqlite" else pg_url
    ob = Outbox(table)
    conn = connect(db_url)
    ob.init(conn)
    conn.commit()
    d = Daemon(["relay", "--db-url", db_url, "--redis-url", redis_url, "--namespace", namespace, "--table", table,
                "--batch-size", "50"])
    try:
        lab = (("namespace", namespace),)
        wait_for(lambda: get(d.port, "/readyz") == (200, "ready\n"), 20, "ready")
        before = scrape(d.port)
        assert before[("cachesync_relay_delivered_total", lab)] == 0
        assert before[("cachesync_relay_backlog_rows", lab)] == 0
        assert before[("cachesync_namespace_seen", lab)] == 0  # no cache uses this test's namespace
        for i in range(20):
            ob.record(conn, f"k:{i}")
        conn.commit()
        wait_for(lambda: scrape(d.port)[("cachesync_relay_delivered_total", lab)] == 20, 30, "20 rows delivered")
        after = scrape(d.port)
        assert after[("cachesync_relay_latency_seconds_count", lab)] == 20
        assert after[("cachesync_relay_latency_seconds_sum", lab)] > 0
        assert after[("cachesync_relay_backlog_rows", lab)] == 0
        assert after[("cachesync_unused_namespace_deliveries_total", lab)] == 20  # counted: nobody reads them
        r = redis.Redis.from_url(redis_url)
        assert hexists(r, entry_key(namespace, "k:3"), "ti")
        r.delete(*[entry_key(namespace, f"k:{i}") for i in range(20)])
        r.close()
        wait_for(lambda: "cachesync relay: delivered 20 rows" in d.output(), 10, "the summary line")
    finally:
        out = d.close()
        ob.drop(conn)
        conn.close()
    assert f"namespace {namespace}" in out
    assert f"no cache has used namespace {namespace!r}" in out  # the loud startup warning


class PrivateRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="cachesync-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL)
        wait_for(lambda: self._ping(), 20, "private Redis")

    def _ping(self) -> bool:
        try:
            c = redis.Redis(port=self.port, socket_timeout=1)
            c.ping()
            c.close()
            return True
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    srv = PrivateRedis()
    srv.start()
    yield srv
    srv.close()


@pytest.mark.timeout(90)
def test_readyz_flips_when_redis_goes_away(private_redis, namespace, table, tmp_path):
    db_url = f"sqlite:///{tmp_path}/o.db"
    d = Daemon(["relay", "--db-url", db_url, "--redis-url", private_redis.url, "--namespace", namespace,
                "--table", table, "--max-backoff", "0.2"])
    try:
        wait_for(lambda: get(d.port, "/readyz")[0] == 200, 20, "ready")
        private_redis.stop()
        code, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(get(d.port, "/readyz")), 20, "503")
        assert "redis:" in body and "unreachable" in body
        assert get(d.port, "/healthz")[0] == 200  # alive all the same
        private_redis.start()
        wait_for(lambda: get(d.port, "/readyz")[0] == 200, 30, "ready again")
    finally:
        d.close()


@pytest.mark.timeout(120)
def test_readyz_flips_when_the_database_goes_away(private_pg, redis_url, namespace, table):  # noqa: F811
    d = Daemon(["relay", "--db-url", private_pg.url, "--redis-url", redis_url, "--namespace", namespace,
                "--table", table, "--max-backoff", "0.2", "--poll-interval", "0.2"])
    try:
        wait_for(lambda: get(d.port, "/readyz")[0] == 200, 20, "ready (the relay creates its table)")
        private_pg.stop()
        code, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(get(d.port, "/readyz")), 30, "503")
        assert "database: database postgresql://root@127.0.0.1" in body
        private_pg.start()
        wait_for(lambda: get(d.port, "/readyz")[0] == 200, 60, "ready again")
    finally:
        d.close()


@pytest.mark.timeout(90)
def test_readyz_fails_when_the_backlog_is_too_old(redis_url, namespace, table, tmp_path):
    """A relay that cannot deliver (its Redis is gone) while rows wait: the backlog-age bound fails /readyz."""
    db_url = f"sqlite:///{tmp_path}/o.db"
    ob = Outbox(table)
    conn = connect(db_url)
    ob.init(conn)
    ob.record(conn, "k:old")
    conn.commit()
    time.sleep(1.1)  # the row's age is the condition under test (database clock), not a timing assertion
    dead = f"redis://127.0.0.1:{free_port()}/0"
    d = Daemon(["relay", "--db-url", db_url, "--redis-url", dead, "--namespace", namespace, "--table", table,
                "--ready-max-lag", "1", "--max-backoff", "0.2"])
    try:
        code, body = get(d.port, "/readyz")
        assert code == 503
        assert "oldest due outbox row is" in body and "--ready-max-lag 1" in body
        assert scrape(d.port)[("cachesync_relay_backlog_rows", (("namespace", namespace),))] == 1
    finally:
        d.close()
        conn.close()


@pytest.mark.timeout(90)
def test_worker_metrics_move_with_traffic(redis_url, namespace):
    stream = "cachesync-t-" + uuid.uuid4().hex[:8]
    bus = RedisStreamsBus(redis_url, stream)
    d = Daemon(["worker", "--bus", redis_url, "--bus-name", stream, "--redis-url", redis_url, "--namespace",
                namespace])
    lab = (("namespace", namespace),)
    try:
        wait_for(lambda: get(d.port, "/readyz")[0] == 200, 20, "ready")
        bus.publish([Invalidation((f"w:{i}",)) for i in range(10)])
        wait_for(lambda: scrape(d.port).get(("cachesync_worker_applied_total", lab)) == 10, 30, "10 applied")
        got = scrape(d.port)
        assert got[("cachesync_worker_consumed_total", lab)] == 10
        assert got[("cachesync_worker_dead_lettered_total", lab)] == 0
        assert got[("cachesync_unused_namespace_deliveries_total", lab)] == 10
        assert ("cachesync_worker_lag_seconds", lab) in got
        wait_for(lambda: "cachesync worker: consumed 10, applied 10" in d.output(), 10, "the summary line")
    finally:
        out = d.close()
        r = redis.Redis.from_url(redis_url)
        r.delete(*[entry_key(namespace, f"w:{i}") for i in range(10)])
        for k in r.scan_iter(f"{stream}*"):
            r.delete(k)
        r.close()
        bus.close()
    assert f"namespace {namespace}" in out


@pytest.mark.timeout(120)
def test_cdc_metrics_move_with_traffic(pg_url, redis_url, namespace, tmp_path):
    from test_cdc_postgres import drop_slot_and_publication

    table = "cdcm_" + uuid.uuid4().hex[:10]
    slot = "cs_" + table
    rules = tmp_path / "rules.toml"
    rules.write_text(f'[tables.{table}]\nkeys = ["k:{{id}}"]\n')
    conn = connect(pg_url)
    cur = conn.cursor()
    cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, v INT)")
    cur.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    conn.commit()
    lab = (("namespace", namespace),)
    d = Daemon(["cdc", "--db-url", pg_url, "--redis-url", redis_url, "--rules", str(rules), "--namespace", namespace,
                "--checkpoint", str(tmp_path / "cp.json"), "--stats-interval", "0", "--slot", slot,
                "--publication", slot])
    try:
        wait_for(lambda: get(d.port, "/readyz")[0] == 200, 30, "ready")
        wait_for(lambda: (tmp_path / "cp.json").exists(), 30, "the first checkpoint")
        for i in range(5):
            cur.execute(f"INSERT INTO {table} (id, v) VALUES ({i}, 1)")
            conn.commit()
        wait_for(lambda: scrape(d.port).get(("cachesync_cdc_transactions_applied_total", lab)) == 5, 30,
                 "5 transactions applied")
        got = scrape(d.port)
        assert got[("cachesync_cdc_transactions_read_total", lab)] == 5
        assert got[("cachesync_cdc_changes_applied_total", lab)] == 5
        assert got[("cachesync_cdc_keys_invalidated_total", lab)] == 5
        assert got[("cachesync_cdc_position", lab)] > 0
        assert got[("cachesync_cdc_lag_seconds", lab)] >= 0
        assert got[("cachesync_cdc_lag_bytes", lab)] >= 0
        assert got[("cachesync_cdc_checkpoint_age_seconds", lab)] >= 0
        assert got[("cachesync_cdc_skipped_events_total", lab)] == 0
        assert got[("cachesync_unused_namespace_deliveries_total", lab)] == 5  # no cache uses the namespace
        assert got[("cachesync_rules_missing_tables", lab)] == 0
        wait_for(lambda: "cachesync cdc: read 5 transactions" in d.output(), 10, "the summary line")
    finally:
        out = d.close()
        drop_slot_and_publication(pg_url, slot, slot)
        cur.execute(f"DROP TABLE {table}")
        conn.commit()
        conn.close()
        r = redis.Redis.from_url(redis_url)
        r.delete(*[entry_key(namespace, f"k:{i}") for i in range(5)])
        r.close()
    assert f"namespace {namespace}" in out and table in out
    assert f"no cache has used namespace {namespace!r}" in out


@pytest.mark.parametrize("kind", ["nats", "rabbitmq", "redis"])
def test_worker_consumer_lag_on_every_bus(kind, request, redis_url):
    """The worker's lag gauge reads the message's publish time: NATS JetStream's server timestamp, RabbitMQ's
    cachesync-sent-ms header (kept across a retry), Redis Streams' entry id."""
    from cachesync import health
    from cachesync.metrics import PrometheusMetrics

    name = "cslag" + uuid.uuid4().hex[:8]
    if kind == "nats":
        from cachesync.bus.nats_jetstream import NatsJetStreamBus

        bus: Any = NatsJetStreamBus(request.getfixturevalue("nats_url"), name)
    elif kind == "rabbitmq":
        from cachesync.bus.rabbitmq import RabbitMQBus

        bus = RabbitMQBus(request.getfixturevalue("amqp_url"), name)
    else:
        bus = RedisStreamsBus(redis_url, name)
    m = PrometheusMetrics()
    seen = health._ObservedBus(bus, m.counter("cachesync_worker_consumed_total", "", ("namespace",)),
                               m.gauge("cachesync_worker_lag_seconds", "", ("namespace",)), ("ns",))
    try:
        bus.consume("g", "c", 10, 0.05)  # creates the group before the publish
        before = time.time()
        bus.publish([Invalidation(("k",))])
        (d,) = seen.consume("g", "c", 10, 5.0)
        assert 0 < seen.last_lag < 60
        if kind != "redis":
            assert d.sent_at is not None and before - 1 <= d.sent_at <= time.time()
        if kind == "rabbitmq":
            bus.nack(d, 0)
            got: list[Any] = []
            wait_for(lambda: got.extend(bus.consume("g", "c", 10, 0.2)) or got, 10, "redelivery")
            assert got[0].attempts == 2 and got[0].sent_at == pytest.approx(d.sent_at, abs=0.001)
            d = got[0]
        bus.ack([d])
        fams = {s.name: s.value for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
        assert fams["cachesync_worker_lag_seconds"] == seen.last_lag
    finally:
        bus.destroy()
        bus.close()


def test_binlog_lag_bytes_counts_across_files(mysql_url):
    from cachesync import health

    conn = connect(mysql_url)
    try:
        cur = conn.cursor()
        cur.execute("SHOW MASTER STATUS")
        file, pos = cur.fetchone()[:2]
        cur.close()
        conn.commit()
        assert health.binlog_lag_bytes(conn, file, 4) >= int(pos) - 4 > 0  # behind: the file's bytes after 4
        lag = health.binlog_lag_bytes(conn, file, int(pos))
        assert lag is not None and lag >= 0  # caught up (other tests may write meanwhile)
        assert health.binlog_lag_bytes(conn, "no-such-binlog.000001", 4) is None
    finally:
        conn.close()


def test_cdc_exports_binlog_lag_bytes_on_mariadb(mysql_url, namespace):
    """The cdc's lag in log position on MariaDB: read at scrape time from SHOW BINARY LOGS and the applied
    position in the runner's stats (a runner stand-in: instrument_cdc reads only these attributes)."""
    from types import SimpleNamespace

    from cachesync import health
    from cachesync.metrics import PrometheusMetrics

    conn = connect(mysql_url)
    cur = conn.cursor()
    cur.execute("SHOW MASTER STATUS")
    file = cur.fetchone()[0]
    cur.close()
    conn.close()
    st = {"transactions": 0, "changes": 0, "keys": 0, "reconnects": 0, "position": {"file": file, "pos": 4}}
    runner = SimpleNamespace(stats=st, source=SimpleNamespace(), checkpoint=SimpleNamespace(), cache=None)
    m = PrometheusMetrics()
    health.instrument_cdc(runner, mysql_url, m, namespace)
    fams = {(s.name, tuple(s.labels.items())): s.value
            for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    assert fams[("cachesync_cdc_lag_bytes", (("namespace", namespace),))] > 0


def test_readyz_reasons_mask_the_secrets_of_the_daemons_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed check's reason may carry a driver's message, which may echo a URL or its password: /readyz masks
    the secrets of every URL the daemon was given (options, CACHESYNC_*_URL) before it answers."""
    import argparse
    import logging

    from cachesync.health import Daemon

    monkeypatch.setenv("CACHESYNC_BUS_URL", "redis://:envSecret9@127.0.0.1:1/0")
    args = argparse.Namespace(metrics_port=0, metrics_addr="127.0.0.1", ready_max_lag=5.0, summary_interval=0.0,
                              db_url="postgresql://app:dbSecret7@127.0.0.1:5432/test",
                              redis_url="redis://:rdSecret8@127.0.0.1:6379/0")
    d = Daemon(args)
    d.start(logging.getLogger("test"), {"database": lambda: "FATAL: bad login app:dbSecret7 and rdSecret8",
                                        "bus": lambda: "refused envSecret9"}, lambda: "")
    try:
        assert d.server is not None
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(f"http://127.0.0.1:{d.server.port}/readyz", timeout=5)
        body = ei.value.read().decode()
        assert ei.value.code == 503 and "database:" in body and "bus:" in body
        for secret in ("dbSecret7", "rdSecret8", "envSecret9"):
            assert secret not in body, body
    finally:
        d.stop()
