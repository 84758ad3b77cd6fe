"""Default fixtures for the conformance suites: ``pytest_plugins = ["cachesync.testing.plugin"]`` in a
``conftest.py``. A fixture of the same name in a conftest or a test class wins over these.

* ``redis_url`` (session): ``CACHESYNC_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/15``; the test fails
  naming the URL (without its password) when Redis does not answer a PING.
"""

from __future__ import annotations

import os

import pytest

from .._driver import redact_url

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
"""``redis_url`` when ``CACHESYNC_TEST_REDIS_URL`` is unset or empty."""


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis the suites' caches use; tests use namespaces of their own and never flush the database."""
    import redis

    url = os.environ.get("CACHESYNC_TEST_REDIS_URL") or DEFAULT_REDIS_URL
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis at {redact_url(url)} does not answer ({type(e).__name__}); start it or set "
                    "CACHESYNC_TEST_REDIS_URL", pytrace=False)
    finally:
        client.close()
    return url
