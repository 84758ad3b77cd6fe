"""The conformance check of a :class:`cachesync.db.Dialect` (needs pytest): subclass :class:`DialectConformance`.

::

    import pytest
    from cachesync.db import POSTGRESQL
    from cachesync.testing import DialectConformance

    class TestPostgresDialect(DialectConformance):
        dialect = POSTGRESQL

        @pytest.fixture
        def db_url(self) -> str:  # the live checks run the dialect's SQL there
            return "postgresql://root@127.0.0.1:5432/test"

The static checks (every field set, with the right type; the methods give SQL text) need no database; the live
checks run each SQL snippet of the dialect on a connection of :meth:`DialectConformance.connect`. See
docs/testing.md.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from ..db import Dialect, connect
from ..outbox import Outbox, ddl

__all__ = ["DialectConformance"]

_BOOL = {"skip_locked", "for_update", "notify", "wal_messages", "backslash_escapes", "partial_index",
         "trigger_functions"}
_OPTIONAL = {"concat_function", "epoch_us", "wal_position_sql"}
_TRICKY = ["it's", "back\\slash", "per%cent", "qu?estion", "üñí"]


class DialectConformance:
    """Base class: set :attr:`dialect`; provide the fixture ``db_url`` for the live checks (they are skipped
    without it)."""

    dialect: ClassVar[Dialect]
    """The dialect under test."""

    def connect(self, db_url: str) -> Any:
        """A DB-API connection (autocommit off) to run the dialect's SQL on. Default: :func:`cachesync.db.connect`."""
        return connect(db_url)

    @pytest.fixture
    def conn(self, request: pytest.FixtureRequest) -> Iterator[Any]:
        try:
            url = request.getfixturevalue("db_url")
        except Exception as e:  # pytest.FixtureLookupError (public since pytest 8.1)
            if type(e).__name__ != "FixtureLookupError":
                raise
            pytest.skip("no db_url fixture: live dialect checks skipped")
        c = self.connect(url)
        try:
            yield c
        finally:
            try:
                c.rollback()
            finally:
                c.close()

    def _one(self, conn: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
        cur = conn.cursor()
        try:
            if params:
                cur.execute(self.dialect.sql(sql), params)
            else:
                cur.execute(sql)
            row = cur.fetchone()
        finally:
            cur.close()
        return row[0]

    # ------------------------------------------------------------------ static

    def test_every_field_is_set_with_its_type(self) -> None:
        d = self.dialect
        assert isinstance(d, Dialect)
        for f in dataclasses.fields(Dialect):
            v = getattr(d, f.name)
            if f.name in _BOOL:
                assert isinstance(v, bool), f"{d.name}.{f.name} must be a bool, got {v!r}"
            elif f.name == "driver_modules":
                assert isinstance(v, tuple) and v and all(isinstance(m, str) and m for m in v), (f.name, v)
            elif f.name in _OPTIONAL:
                assert v is None or (isinstance(v, str) and v.strip()), f"{d.name}.{f.name}: {v!r}"
            elif f.name == "table_options":
                assert isinstance(v, str), (f.name, v)
            else:
                assert isinstance(v, str) and v.strip(), f"{d.name}.{f.name} must be a non-empty string, got {v!r}"
        assert d.placeholder in ("?", "%s")
        assert len(d.ident_quote) == 1
        assert d.trigger_body_template.count("{}") == 1
        assert d.epoch_us is None or d.epoch_us.count("{}") == 1
        assert not d.skip_locked or d.for_update, "SKIP LOCKED is a clause of FOR UPDATE"

    def test_methods_build_sql_text(self) -> None:
        d = self.dialect
        assert d.sql("a = ? AND b = ?") == f"a = {d.placeholder} AND b = {d.placeholder}"
        assert d.ident("t") == f"{d.ident_quote}t{d.ident_quote}"
        assert d.literal("x").startswith("'") and d.literal("it's").count("'") == 4
        assert d.concat(["a"]) == "a" and "a" in d.concat(["a", "b"]) and "b" in d.concat(["a", "b"])
        assert d.json_array(["1", "2"]).endswith("(1, 2)")
        assert d.cast_text("x").startswith("CAST(x AS ")
        assert "INSERT" in d.trigger_body("INSERT")

    # ------------------------------------------------------------------ live

    def test_placeholder_and_literals_round_trip(self, conn: Any) -> None:
        d = self.dialect
        for s in _TRICKY:
            assert self._one(conn, "SELECT ?", (s,)) == s
            assert self._one(conn, f"SELECT {d.literal(s)}") == s

    def test_now_ms_is_the_database_clock_in_ms(self, conn: Any) -> None:
        v = int(self._one(conn, f"SELECT {self.dialect.now_ms}"))
        assert abs(v - time.time() * 1000) < 60_000, v  # same machine or a synced clock

    def test_text_expressions(self, conn: Any) -> None:
        d = self.dialect
        assert self._one(conn, f"SELECT {d.concat([d.literal('a:'), d.cast_text('42'), d.literal('-b')])}") == "a:42-b"
        got = self._one(conn, f"SELECT {d.cast_text(d.json_array([d.literal('x'), d.cast_text('7')]))}")
        assert json.loads(got) == ["x", "7"]

    def test_catalog_queries(self, conn: Any) -> None:
        d = self.dialect
        t = "csd_" + uuid.uuid4().hex[:10]
        cur = conn.cursor()
        try:
            cur.execute(f"CREATE TABLE {d.ident(t)} (id INTEGER PRIMARY KEY, email VARCHAR(20))")
            conn.commit()
            cur.execute(d.columns_sql, (t,))
            cols = {str(n): str(ty).lower() for n, ty in cur.fetchall()}
            assert set(cols) == {"id", "email"} and "int" in cols["id"], cols
            cur.execute(d.triggers_sql, (t + "\\_%",))
            assert cur.fetchall() in ([], ())
            conn.commit()
            if d.for_update:
                cur.execute(f"SELECT id FROM {t} FOR UPDATE" + (" SKIP LOCKED" if d.skip_locked else ""))
                cur.fetchall()
                conn.commit()
            if d.wal_position_sql is not None:
                cur.execute(d.wal_position_sql)
                assert float(cur.fetchone()[0]) > 0
                conn.commit()
        finally:
            conn.rollback()
            cur.execute(f"DROP TABLE IF EXISTS {t}")
            conn.commit()
            cur.close()

    def test_outbox_ddl_runs_and_records(self, conn: Any) -> None:
        d = self.dialect
        ob = Outbox("csd_" + uuid.uuid4().hex[:10], dialect=d)
        try:
            cur = conn.cursor()
            for stmt in ddl(d, ob.table):
                cur.execute(stmt)
            conn.commit()
            ob.record(conn, "k:1", version=3, delay=1)
            conn.commit()
            cur.execute(f"SELECT cache_keys, key_version, run_at - {d.now_ms} FROM {ob.table}")
            keys, ver, due = cur.fetchone()
            assert (json.loads(keys), ver) == (["k:1"], "3") and 0 < int(due) <= 1000
            conn.commit()
            cur.close()
        finally:
            conn.rollback()
            ob.drop(conn)
