"""A real, throwaway 3-master Redis Cluster for the tests (``redis-server`` + ``redis-cli --cluster create``).

Import the fixture into a test module::

    from redis_cluster import redis_cluster_fixture  # noqa: F401  (provides the ``redis_cluster`` fixture)

It is module-scoped: three ``redis-server --cluster-enabled yes`` processes on free ports (and free cluster bus
ports, +10000), each with its own ``nodes.conf`` and no persistence, joined with ``redis-cli --cluster create``;
the fixture returns once every node reports ``cluster_state:ok`` and knows all three masters, and stops and
removes the servers afterwards. Without ``redis-server``/``redis-cli`` on PATH the tests are skipped, or fail
when the environment variable ``CI`` is set. The shared Redis on 6379 is never touched.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

START_TIMEOUT = 30.0


@dataclass
class ClusterServers:
    """The running cluster: its nodes' ports and a way to reach each one directly."""

    host: str
    ports: list[int]
    procs: list[subprocess.Popen[bytes]] = field(repr=False)
    dir: Path

    @property
    def url(self) -> str:
        """``redis://host:port`` of the first node (a RedisCluster client discovers the others)."""
        return f"redis://{self.host}:{self.ports[0]}"

    def node(self, i: int) -> redis.Redis:
        """A plain (non-cluster) client of node ``i``; close it after use."""
        return redis.Redis(host=self.host, port=self.ports[i])


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(n: int) -> list[int]:
    """``n`` ports P with both P and the cluster bus port P+10000 free (not 6379's neighbourhood)."""
    rng = random.Random()
    ports: list[int] = []
    for _ in range(10_000):
        p = rng.randrange(20_000, 55_000)
        if p not in ports and p + 10_000 not in ports and _free(p) and _free(p + 10_000):
            ports.append(p)
            if len(ports) == n:
                return ports
    raise RuntimeError("no free port pairs for a Redis Cluster")


def _poll(what: str, check: object, deadline: float, procs: list[subprocess.Popen[bytes]], log: Path) -> None:
    """Call ``check()`` until it is truthy; fail with the server log when a server dies or time runs out."""
    assert callable(check)
    while True:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"redis-server exited ({p.returncode}) while waiting for {what}:\n"
                                   f"{log.read_text(errors='replace')[-2000:] if log.exists() else ''}")
        try:
            if check():
                return
        except (redis.ConnectionError, redis.ResponseError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling a server condition, not standing in for one


def _require_binaries() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server, cli
    missing = " and ".join(n for n, p in (("redis-server", server), ("redis-cli", cli)) if not p)
    msg = f"Redis Cluster tests need {missing} on PATH (e.g. apt-get install redis-server)"
    if os.environ.get("CI"):
        pytest.fail(f"REQUIRED TOOL MISSING under CI: {msg}", pytrace=False)
    pytest.skip(msg)


def start_cluster(base: Path, host: str = "127.0.0.1", masters: int = 3, extra: tuple[str, ...] = ()) -> ClusterServers:
    """Start ``masters`` cluster-enabled servers under ``base`` and join them (no replicas); ``extra`` are more
    ``redis-server`` arguments (e.g. ``("--cluster-require-full-coverage", "no")``)."""
    server, cli = _require_binaries()
    ports = _pick_ports(masters)
    procs: list[subprocess.Popen[bytes]] = []
    log = base / "servers.log"
    try:
        with log.open("ab") as out:
            for p in ports:
                d = base / str(p)
                d.mkdir(parents=True, exist_ok=True)
                procs.append(subprocess.Popen(
                    [server, "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                     "--save", "", "--appendonly", "no", "--port", str(p), "--bind", host, "--dir", str(d),
                     "--daemonize", "no", "--cluster-node-timeout", "5000", *extra],
                    stdout=out, stderr=subprocess.STDOUT))
        cs = ClusterServers(host, ports, procs, base)
        deadline = time.monotonic() + START_TIMEOUT
        for i in range(masters):
            c = cs.node(i)
            try:
                _poll(f"node {ports[i]} to answer PING", c.ping, deadline, procs, log)
            finally:
                c.close()
        r = subprocess.run([cli, "--cluster", "create", *[f"{host}:{p}" for p in ports], "--cluster-replicas", "0",
                            "--cluster-yes"], capture_output=True, text=True, timeout=START_TIMEOUT)
        if r.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        for i in range(masters):
            c = cs.node(i)

            def ok(c: redis.Redis = c) -> bool:
                info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if isinstance(info, dict):
                    state, known = info.get("cluster_state"), int(info.get("cluster_known_nodes", 0))
                else:
                    kv = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
                    state, known = kv.get("cluster_state"), int(kv.get("cluster_known_nodes", "0"))
                return state == "ok" and known == masters

            try:
                _poll(f"node {ports[i]} to report cluster_state:ok", ok, deadline, procs, log)
            finally:
                c.close()
        return cs
    except BaseException:
        stop_cluster(procs)
        raise


def stop_cluster(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module", name="redis_cluster")
def redis_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    """A running 3-master Redis Cluster (module-scoped); see the module docstring."""
    base = tmp_path_factory.mktemp("redis-cluster")
    cs = start_cluster(base)
    try:
        yield cs
    finally:
        stop_cluster(cs.procs)
        shutil.rmtree(base, ignore_errors=True)
