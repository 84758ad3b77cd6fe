"""/readyz's Redis check on a REAL Redis Cluster (its own, started by tests/redis_cluster.py): it must reach every
primary, not only the client's default node (a plain PING does), or a daemon whose invalidations cannot reach one
primary reports ready."""

from __future__ import annotations

import os
import signal
from typing import Any

from redis.cluster import RedisCluster
from redis_cluster import ClusterServers, redis_cluster_fixture  # noqa: F401  (the redis_cluster fixture)

import cachesync
from cachesync.health import _redis_check


def test_readiness_redis_check_fails_when_a_primary_other_than_the_default_node_is_down(
        redis_cluster: ClusterServers, namespace: str) -> None:
    client: Any = RedisCluster(host=redis_cluster.host, port=redis_cluster.ports[0], socket_timeout=0.5,
                               socket_connect_timeout=0.5)
    cache = cachesync.Cache(client=client, namespace=namespace, ttl_jitter=0.0)
    check = _redis_check(cache)
    assert check() is None  # every primary answers: ready
    default_port = client.get_default_node().port
    i = next(i for i, p in enumerate(redis_cluster.ports) if p != default_port)
    pid = redis_cluster.procs[i].pid
    os.kill(pid, signal.SIGSTOP)  # one primary stops answering (its slots' invalidations cannot be delivered)
    try:
        why = check()
    finally:
        os.kill(pid, signal.SIGCONT)
        cache.close()
        client.close()
    assert why is not None and "unreachable" in why
