"""Redis memory per cached entry: a cachesync entry vs a plain string key, same value, same TTL.

    .venv/bin/python bench/bench_memory.py [--redis-url URL] [--keys 100000]

Without --redis-url a private redis-server is started; with one, a unique namespace is used and deleted
afterwards. Prints MEMORY USAGE of one key of each kind and the INFO memory growth over ``--keys`` keys of
each kind, as ratios (goal of issue 15: <= x1.30), for an entry without a version and for one with a 13-digit
version (a millisecond timestamp, the longest common version).
"""

from __future__ import annotations

import argparse
import json
import os
import uuid

import redis

import cachesync
from cachesync.core.layout import decode_entry

from _util import env_line, private_redis

VALUE = {"id": 1234, "name": "Alice Example", "email": "alice@example.com", "plan": "pro", "n": 42}
TTL = 3600.0


def used(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def run(url: str, n: int) -> None:
    r = redis.Redis.from_url(url)
    ns = f"bench-mem-{uuid.uuid4().hex[:8]}"
    payload = json.dumps(VALUE, separators=(",", ":"))
    payload = payload[:-1] + ',"pad":"' + "x" * (100 - len(payload) - 9) + '"}'
    assert len(payload) == 100, len(payload)
    value = json.loads(payload)
    c = cachesync.Cache(url, namespace=ns, ttl_jitter=0.0)
    try:
        r.set(f"{ns}:plain:one", payload, ex=int(TTL))
        m_plain = int(r.memory_usage(f"{ns}:plain:one", samples=0))
        for label, version in (("no version", None), ("13-digit version", 1733170000000)):
            name = f"one-{version}"
            c.get(name, lambda: value if version is None else cachesync.Versioned(value, version), ttl=TTL)
            ek = c.ctx.ekey(name)
            raw = r.get(ek)
            fields = decode_entry(raw) or {}
            m_entry = int(r.memory_usage(ek, samples=0))
            print(f"\n## One key (MEMORY USAGE), {label}: entry fields {sorted(fields)}, stored {len(raw or b'')} "
                  f"bytes for a {len(payload)}-byte payload, TTL {TTL:.0f}s")
            print(f"  cachesync entry {m_entry} B   plain string {m_plain} B   => x{m_entry / m_plain:.2f} "
                  f"(goal <= x1.30: {'met' if m_entry / m_plain <= 1.3 else 'MISSED'})")
        # INFO memory over n keys of each kind
        for label, version in (("no version", None), ("13-digit version", 1733170000000)):
            keys = [f"k{version}:{i}" for i in range(n)]
            base = used(r)
            for i in range(0, n, 500):
                chunk = keys[i:i + 500]
                c.get_many(chunk, lambda ks: {k: value if version is None else cachesync.Versioned(value, version)
                                              for k in ks}, ttl=TTL)
            after_entries = used(r)
            p = r.pipeline(transaction=False)
            for i, k in enumerate(keys):
                p.set(f"{ns}:plain:{version}:{k}", payload, ex=int(TTL))
                if i % 1000 == 999:
                    p.execute()
            p.execute()
            after_plain = used(r)
            per_entry = (after_entries - base) / n
            per_plain = (after_plain - after_entries) / n
            print(f"\n## INFO memory over {n} keys of each kind, {label} (used_memory growth / key)")
            print(f"  cachesync entry {per_entry:.1f} B   plain string {per_plain:.1f} B   => "
                  f"x{per_entry / per_plain:.2f} (goal <= x1.30: {'met' if per_entry / per_plain <= 1.3 else 'MISSED'})")
        print(f"\nload average {os.getloadavg()[0]:.2f}")
    finally:
        c.close()
        for pattern in (f"cs:{ns}:*", f"{ns}:*"):
            batch = []
            for k in r.scan_iter(pattern, count=5000):
                batch.append(k)
                if len(batch) >= 5000:
                    r.delete(*batch)
                    batch = []
            if batch:
                r.delete(*batch)
        r.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url")
    ap.add_argument("--keys", type=int, default=100_000)
    a = ap.parse_args()
    print("bench_memory:", env_line())
    if a.redis_url:
        run(a.redis_url, a.keys)
    else:
        with private_redis() as url:
            run(url, a.keys)


if __name__ == "__main__":
    main()
