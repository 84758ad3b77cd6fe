"""Pytest fixtures and helpers for the real backing servers used by the tests.

Load it from tests/conftest.py with::

    pytest_plugins = ["conftest_services"]

``scripts/services`` installs, starts and configures the servers (PostgreSQL with
wal_level=logical, MariaDB with a row-based binlog, Redis, NATS with JetStream, RabbitMQ).

If a server is unreachable, tests that need it are *skipped* on a developer
machine and *fail* loudly when the environment variable ``CI`` is non-empty
(``.ci/run`` sets ``CI=true``), so CI never goes green by skipping everything.

Every URL can be overridden from the environment:

    CACHESYNC_TEST_REDIS_URL  default redis://127.0.0.1:6379/15  (db 15, not db 0)
    CACHESYNC_TEST_PG_URL     default postgresql://root@127.0.0.1:5432/test
    CACHESYNC_TEST_MYSQL_URL  default mysql://root@127.0.0.1:3306/test
    CACHESYNC_TEST_NATS_URL   default nats://127.0.0.1:4222
    CACHESYNC_TEST_AMQP_URL   default amqp://guest:guest@127.0.0.1:5672/%2F
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

from cachesync._driver import redact_url

__all__ = [
    "REDIS_URL",
    "PG_URL",
    "MYSQL_URL",
    "NATS_URL",
    "AMQP_URL",
    "in_ci",
    "host_port",
    "require_service",
    "redis_url",
    "pg_url",
    "mysql_url",
    "nats_url",
    "amqp_url",
]

REDIS_URL: str = os.environ.get("CACHESYNC_TEST_REDIS_URL") or "redis://127.0.0.1:6379/15"
PG_URL: str = os.environ.get("CACHESYNC_TEST_PG_URL") or "postgresql://root@127.0.0.1:5432/test"
MYSQL_URL: str = os.environ.get("CACHESYNC_TEST_MYSQL_URL") or "mysql://root@127.0.0.1:3306/test"
NATS_URL: str = os.environ.get("CACHESYNC_TEST_NATS_URL") or "nats://127.0.0.1:4222"
AMQP_URL: str = os.environ.get("CACHESYNC_TEST_AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/%2F"

_DEFAULT_PORTS = {
    "redis": 6379,
    "rediss": 6380,
    "postgresql": 5432,
    "postgres": 5432,
    "mysql": 3306,
    "mariadb": 3306,
    "nats": 4222,
    "tls": 4222,
    "amqp": 5672,
    "amqps": 5671,
}

CONNECT_TIMEOUT = 2.0


def in_ci() -> bool:
    """True when running under CI (env ``CI`` set to any non-empty value)."""
    return bool(os.environ.get("CI"))


def host_port(url: str) -> tuple[str, int]:
    """(host, port) of a service URL, with the scheme's default port."""
    parts = urlsplit(url)
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme.split("+")[0].lower())
    if not parts.hostname or port is None:
        raise ValueError(f"cannot tell host and port from URL {redact_url(url)!r}")
    return parts.hostname, port


def require_service(name: str, host: str, port: int, url: str | None = None) -> None:
    """Make sure ``host:port`` accepts TCP connections.

    Otherwise fail the test (under CI) or skip it (elsewhere), naming the service.
    """
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return
    except OSError as exc:
        error = exc
    where = url or f"{host}:{port}"
    if in_ci():
        pytest.fail(
            f"REQUIRED SERVICE UNAVAILABLE: {name} at {where} ({error})\n"
            f"{'!' * 72}\n"
            f"CI is set, so a missing {name} is a failure, not a skip.\n"
            f"Start/configure the servers with `sudo scripts/services`.\n"
            f"{'!' * 72}",
            pytrace=False,
        )
    pytest.skip(f"{name} not reachable at {where} ({error}); run `sudo scripts/services` to start it")


def _require_url(name: str, url: str) -> str:
    host, port = host_port(url)
    require_service(name, host, port, redact_url(url))  # the skip/failure message shows no password
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Redis URL (db 15 by default); skips/fails if Redis is down."""
    return _require_url("Redis", REDIS_URL)


@pytest.fixture(scope="session")
def pg_url() -> str:
    """PostgreSQL URL (role root, db test, wal_level=logical); skips/fails if down."""
    return _require_url("PostgreSQL", PG_URL)


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """MariaDB URL (root, db test, row binlog); skips/fails if down."""
    return _require_url("MariaDB", MYSQL_URL)


@pytest.fixture(scope="session")
def nats_url() -> str:
    """NATS URL (JetStream enabled); skips/fails if down."""
    return _require_url("NATS", NATS_URL)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ URL (guest/guest, vhost /); skips/fails if down."""
    return _require_url("RabbitMQ", AMQP_URL)
