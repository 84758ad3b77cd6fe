"""Helpers shared by the benchmarks: a private redis-server, timing, printing ratios."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

import redis


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A redis-server of our own on a free port, so that command counts are ours alone."""
    exe = shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None:
        raise SystemExit("bench needs redis-server on PATH (apt-get install redis-server) or --redis-url")
    port = free_port()
    d = tempfile.mkdtemp(prefix="cachesync-bench-")
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", d, "--maxclients", "4000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    c = redis.Redis.from_url(url)
    for _ in range(500):
        try:
            c.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.01)
    c.close()
    try:
        yield url
    finally:
        p.terminate()
        p.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def command_stats(url: str) -> dict[str, int]:
    c = redis.Redis.from_url(url)
    stats = c.info("commandstats")
    c.close()
    return {k[8:]: v["calls"] for k, v in stats.items() if k != "cmdstat_info"}


def command_count(url: str) -> int:
    return sum(command_stats(url).values())


def per_op(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def interleaved(cases: dict[str, Callable[[], object]], n: int, rounds: int) -> dict[str, float]:
    """Median seconds per op of each case, rounds interleaved so drift hits every case alike; the order of the
    cases rotates each round, so that no case is always the first (slow: cold) or the last."""
    samples: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    for r in range(rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            samples[k].append(per_op(cases[k], n))
    return {k: statistics.median(v) for k, v in samples.items()}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def env_line() -> str:
    import platform

    import redis as r

    return f"python {platform.python_version()}, redis-py {r.__version__}, cpus {os.cpu_count()}"
