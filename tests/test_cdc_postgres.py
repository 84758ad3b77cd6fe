"""The CDC conformance suite against PostgreSQL logical decoding (pgoutput), plus PostgreSQL-specific checks."""

from __future__ import annotations


import psycopg
import pytest

from cachesync.cdc import Source
from cachesync.cdc.postgres import PostgresSource
from test_cdc_conformance import CdcConformance, Env


def drop_slot_and_publication(pg_url: str, slot: str, publication: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                  "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
        for _ in range(200):  # the walsender exits asynchronously: bounded wait until the slot is free
            row = c.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            if row is None or row[0] is None:
                break
            c.execute("SELECT pg_sleep(0.01)")
        c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                  (slot,))
        c.execute(f"DROP PUBLICATION IF EXISTS {publication}")


class TestPostgresConformance(CdcConformance):
    @pytest.fixture
    def db_url(self, pg_url: str) -> str:
        return pg_url

    def prepare_table(self, env: Env) -> None:
        env.write(f"ALTER TABLE {env.table} REPLICA IDENTITY FULL")
        env.slot = env.publication = "cs_" + env.table  # type: ignore[attr-defined]

    def make_source(self, env: Env) -> Source:
        return PostgresSource(env.db_url, env.rules, slot=env.slot, publication=env.publication)  # type: ignore

    def kill_stream(self, env: Env) -> None:
        cur = env.conn.cursor()
        cur.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
                    (env.slot,))  # type: ignore[attr-defined]
        env.conn.commit()

    def cleanup(self, env: Env) -> None:
        drop_slot_and_publication(env.db_url, env.slot, env.publication)  # type: ignore[attr-defined]
