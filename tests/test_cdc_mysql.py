"""The CDC conformance suite against MariaDB's binlog, plus MariaDB-specific configuration checks."""

from __future__ import annotations

import itertools
import os

import pytest

from cachesync.cdc import Source
from cachesync.cdc.mysql import MySQLSource
from test_cdc_conformance import CdcConformance, Env

_ids = itertools.count(int.from_bytes(os.urandom(3), "big") * 64 + 100_000)


def server_id() -> int:
    """A server_id no concurrent test (or engineer) uses."""
    return next(_ids)


class TestMariaDBConformance(CdcConformance):
    @pytest.fixture
    def db_url(self, mysql_url: str) -> str:
        return mysql_url

    def make_source(self, env: Env) -> Source:
        return MySQLSource(env.db_url, server_id(), list(env.rules.tables))

    def kill_stream(self, env: Env) -> None:
        assert isinstance(env.source, MySQLSource) and env.source.connection_id
        cur = env.conn.cursor()
        cur.execute(f"KILL {int(env.source.connection_id)}")
        cur.close()
