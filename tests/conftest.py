"""Shared fixtures. Servers: see conftest_services (skip locally, fail loudly under CI when one is down)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

import cachesync

pytest_plugins = ["conftest_services"]


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses (tests never FLUSHDB the shared Redis)."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def cache(redis_url: str, namespace: str) -> Iterator[cachesync.Cache]:

    c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0)
    yield c
    c.close()


@pytest.fixture
async def acache(redis_url: str, namespace: str) -> AsyncIterator[cachesync.AsyncCache]:

    c = cachesync.AsyncCache(redis_url, namespace=namespace, ttl_jitter=0.0)
    yield c
    await c.aclose()


@pytest.fixture
def l1cache(redis_url: str, namespace: str) -> Iterator[cachesync.Cache]:
    """A cache with an L1 whose subscription is up."""
    c = cachesync.Cache(redis_url, namespace=namespace, ttl_jitter=0.0, l1=True)
    assert c.l1 is not None and c.l1.wait_ready(5)
    yield c
    c.close()


@pytest.fixture
def hung_url() -> Iterator[str]:
    """A server that accepts connections and never answers (a hung Redis)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    try:
        yield f"redis://127.0.0.1:{srv.getsockname()[1]}/0"
    finally:
        srv.close()
