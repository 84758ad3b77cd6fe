"""Capture triggers: the database records the invalidations of every change of a ruled table by itself.

For each table of the rules, :func:`install` creates row triggers (``AFTER INSERT``, ``UPDATE`` and ``DELETE``)
that compute the table's cache keys **in SQL** from the key templates (``"user:{id}"`` becomes
``'user:' || id``), from the new row image of an insert, the old one of a delete and **both** of an update (so a
changed key column invalidates the old and the new key), and write them in the same transaction:

* ``target="table"`` (every database): one outbox row per changed row, delivered by ``cachesync relay``;
* ``target="wal"`` (PostgreSQL 14+): one transactional WAL message per changed row
  (``pg_logical_emit_message(true, prefix, '{"keys": [...], "version": ...}')``, the format of
  :meth:`Outbox.emit`), delivered by ``cachesync cdc`` — no table, no relay.

Nothing runs in the application: every writer (raw SQL, bulk ``UPDATE``/``DELETE`` statements, another
language, a migration, an operator's console) is covered, and the writer pays no extra round trip and no Python
(``bench/bench_outbox.py`` measures what it pays). A rolled-back transaction leaves nothing.

The keys computed by the database must be the keys the application computes in Python, so the template
columns are checked when the triggers are installed: integer and text columns (and PostgreSQL ``uuid``) only,
whose SQL text form is Python's ``str()``; a NULL value is formatted as ``None``, like ``str.format`` does.
Templates with a format spec or conversion (``{id:05d}``, ``{id!r}``) are refused. The version column of a
rule must be one the triggers can turn into a number, checked at install time (an :class:`OutboxError` names
the table, the column and its type otherwise): integer and exact/float numeric columns are written as their SQL
text; timestamp/datetime columns (PostgreSQL ``timestamp``/``timestamptz``, MariaDB ``datetime``/``timestamp``)
as epoch **microseconds**, the value :func:`cachesync.protocol.encode_version` gives for the same datetime
(a naive one is taken as UTC, as there). Text, dates, booleans and the rest are refused. A key longer than the
relay's cache accepts (``max_key_bytes``) is not hashed: the relay parks its row, the CDC runner skips the key
(both with an ERROR line naming it).

Do not combine the triggers with :func:`cachesync.outbox.sqlalchemy.track` or :meth:`Outbox.record_change` for
the same tables: each change would be recorded twice (harmless, but twice the work).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from typing import Any

from ..db import MYSQL, POSTGRESQL, Dialect
from ..core.rules import Rules, TableRule
from . import DEFAULT_MESSAGE_PREFIX, Outbox, OutboxError

TARGETS = ("table", "wal")
"""Where the triggers write: ``"table"`` (the outbox table, every database) or ``"wal"`` (PostgreSQL WAL
messages read by ``cachesync cdc``)."""

_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,40}")

# SQL types whose text form equals Python's str() of the value the driver returns
_PG_OK = re.compile(r"(smallint|integer|bigint|text|character varying(\(\d+\))?|uuid)")
_MY_OK = {"tinyint", "smallint", "mediumint", "int", "integer", "bigint", "char", "varchar", "tinytext", "text",
          "mediumtext", "longtext"}


def _check_name(table: object) -> str:
    if not isinstance(table, str) or not _TABLE.fullmatch(table):
        raise OutboxError(f"table name {table!r}: capture triggers need a plain identifier (letters, digits, '_', "
                          "not starting with a digit, at most 41 characters)")
    return table


def _names(outbox: str, table: str) -> dict[str, str]:
    base = f"{outbox}_{table}"[:56]
    return {"fn": f"{base}_cap", "ins": f"{base}_ins", "upd": f"{base}_upd", "del": f"{base}_del",
            "pg": f"{base}_cap", "trn": f"{base}_trn"}


def _template_parts(rule: TableRule, template: str) -> list[tuple[str, str | None]]:
    parts = []
    for literal, field, spec, conv in string.Formatter().parse(template):
        if field is not None and (spec or conv):
            raise OutboxError(f"table {rule.table!r}: template {template!r} uses a format spec or conversion "
                              f"({{{field}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}); capture "
                              "triggers format plain fields only")
        parts.append((literal, field))
    return parts


def _key_sql(d: Dialect, rule: TableRule, template: str, image: str) -> str:
    """SQL text expression of one key template over row image ``image`` (``NEW``/``OLD``)."""
    pieces: list[str] = []
    for literal, field in _template_parts(rule, template):
        if literal:
            pieces.append(d.literal(literal))
        if field is not None:
            pieces.append(f"COALESCE({d.cast_text(f'{image}.{d.ident(field)}')}, 'None')")
    return d.concat(pieces) if pieces else "''"


def _keys_json(d: Dialect, rule: TableRule, images: Sequence[str]) -> str:
    exprs = [_key_sql(d, rule, t, img) for t in rule.keys for img in images if _needs(t, img, images)]
    return d.json_array(exprs)


def _needs(template: str, image: str, images: Sequence[str]) -> bool:
    """A template without fields is the same from both images: written once."""
    has_fields = any(f is not None for _, f, _, _ in string.Formatter().parse(template))
    return has_fields or image == images[-1]


# version columns: SQL types written as their text (a number) / converted from a timestamp to epoch microseconds
_PG_NUM = re.compile(r"(smallint|integer|bigint|numeric(\(\d+(,\d+)?\))?|real|double precision)")
_PG_TS = re.compile(r"timestamp(\(\d\))? with(out)? time zone")
_MY_NUM = {"tinyint", "smallint", "mediumint", "int", "integer", "bigint", "decimal", "numeric", "float", "double"}
_MY_TS = {"datetime", "timestamp"}


def version_kind(d: Dialect, sqltype: str) -> str | None:
    """How the triggers write a version column of SQL type ``sqltype``: ``"number"`` (its text), ``"timestamp"``
    (epoch microseconds) or ``None`` (refused: it cannot be turned into a number)."""
    t = sqltype.lower().strip()
    if d is POSTGRESQL:
        return "number" if _PG_NUM.fullmatch(t) else "timestamp" if _PG_TS.fullmatch(t) else None
    if d is MYSQL:
        return "number" if t in _MY_NUM else "timestamp" if t in _MY_TS else None
    u = t.upper()  # SQLite: by affinity (https://sqlite.org/datatype3.html); dates are stored as text there
    if "DATE" in u or "TIME" in u:
        return None
    return "number" if any(x in u for x in ("INT", "REAL", "FLOA", "DOUB", "NUM", "DEC")) else None


def _version_sql(d: Dialect, rule: TableRule, image: str, kind: str | None = "number") -> str:
    if rule.version is None:
        return "NULL"
    col = f"{image}.{d.ident(rule.version)}"
    if kind == "timestamp" and d.epoch_us is not None:  # version_kind() gives "timestamp" only where it is set
        return d.epoch_us.format(col)
    return d.cast_text(col)


# ------------------------------------------------------------------ introspection


def columns(conn: Any, d: Dialect, table: str) -> dict[str, str]:
    """Column name -> SQL type of ``table`` (empty if the table does not exist). Uses ``conn``; does not commit."""
    cur = conn.cursor()
    try:
        cur.execute(d.columns_sql, (table,))
        return {str(n): str(t).lower() for n, t in cur.fetchall()}
    finally:
        cur.close()


def _type_ok(d: Dialect, sqltype: str) -> bool:
    if d is POSTGRESQL:
        return bool(_PG_OK.fullmatch(sqltype))
    if d is MYSQL:
        return sqltype in _MY_OK
    # SQLite: the declared type's affinity (https://sqlite.org/datatype3.html): INTEGER or TEXT
    t = sqltype.upper()
    return "INT" in t or any(x in t for x in ("CHAR", "CLOB", "TEXT"))


def check_rule(d: Dialect, rule: TableRule, cols: dict[str, str]) -> None:
    """Refuse (``OutboxError`` naming table, column, type and template) what the triggers could not format as
    the application does."""
    if not cols:
        raise OutboxError(f"table {rule.table!r} does not exist (or has no columns): cannot install its capture "
                          "triggers")
    for t in rule.keys:
        for _, field in _template_parts(rule, t):
            if field is None:
                continue
            if field not in cols:
                raise OutboxError(f"table {rule.table!r} has no column {field!r} used by key template {t!r} "
                                  f"(columns: {sorted(cols)})")
            if not _type_ok(d, cols[field]):
                raise OutboxError(f"table {rule.table!r}: column {field!r} of key template {t!r} has type "
                                  f"{cols[field]!r}, whose SQL text form may differ from Python's str(); capture "
                                  "triggers accept integer and text columns (and uuid on PostgreSQL) in key templates; "
                                  "record such keys from the application instead")
    if rule.version is not None and rule.version not in cols:
        raise OutboxError(f"table {rule.table!r} has no version column {rule.version!r} (columns: {sorted(cols)})")
    if rule.version is not None and version_kind(d, cols[rule.version]) is None:
        raise OutboxError(f"table {rule.table!r}: version column {rule.version!r} has type {cols[rule.version]!r}, "
                          "which capture triggers cannot turn into a number; use an integer, numeric or timestamp "
                          "column (timestamps are written as epoch microseconds), or no version")


# ------------------------------------------------------------------ DDL


def _check_target(d: Dialect, target: object) -> None:
    if target not in TARGETS:
        raise OutboxError(f"trigger target {target!r}: expected one of {', '.join(TARGETS)}")
    if target == "wal" and not d.wal_messages:
        raise OutboxError(f"trigger target 'wal' writes PostgreSQL WAL messages; {d.name} has none: use "
                          "target='table' (the outbox table and cachesync relay)")


def trigger_ddl(d: Dialect, ob: Outbox, rule: TableRule, target: str = "table",
                cols: dict[str, str] | None = None) -> list[str]:
    """The statements that (re)create the capture triggers of ``rule``'s table (idempotent). ``cols`` (column ->
    SQL type, see :func:`columns`; default: none known, the version column written as its text) tells how the
    version column is written (:func:`version_kind`)."""
    _check_target(d, target)
    kind = version_kind(d, cols[rule.version]) if cols and rule.version in cols else "number"
    table = _check_name(rule.table)
    n = _names(ob.table, table)
    qt, ot = d.ident(table), ob.table
    events = {"ins": ("INSERT", ["NEW"]), "upd": ("UPDATE", ["OLD", "NEW"]), "del": ("DELETE", ["OLD"])}
    if d.trigger_functions:  # PostgreSQL: one plpgsql function for every event, and a TRUNCATE trigger
        branches: list[str] = []
        for ev, (op, images) in events.items():
            keys = _keys_json(d, rule, images)
            ver = _version_sql(d, rule, "OLD" if ev == "del" else "NEW", kind)
            if target == "wal":
                stmt = (f"PERFORM pg_logical_emit_message(true, {d.literal(ob.message_prefix)}, "
                        f"json_build_object('keys', {keys}, 'version', {ver})::text);")
            else:
                stmt = f"INSERT INTO {ot} (cache_keys, key_version, run_at) VALUES ({keys}::text, {ver}, 0);"
            branches.append(f"{'IF' if not branches else 'ELSIF'} TG_OP = '{op}' THEN {stmt}")
        # TRUNCATE fires no row trigger: a statement trigger records "every key of the table's templates"
        flush = d.literal(json.dumps({"prefixes": rule.prefixes()}, separators=(",", ":")))
        if target == "wal":
            stmt = f"PERFORM pg_logical_emit_message(true, {d.literal(ob.message_prefix)}, {flush});"
        else:
            stmt = f"INSERT INTO {ot} (cache_keys, key_version, run_at) VALUES ({flush}, NULL, 0);"
        branches.append(f"ELSIF TG_OP = 'TRUNCATE' THEN {stmt}")
        return [
            f"CREATE OR REPLACE FUNCTION {n['fn']}() RETURNS trigger LANGUAGE plpgsql AS $cs$ BEGIN "
            f"{' '.join(branches)} END IF; RETURN NULL; END $cs$",
            f"DROP TRIGGER IF EXISTS {n['pg']} ON {qt}",
            f"CREATE TRIGGER {n['pg']} AFTER INSERT OR UPDATE OR DELETE ON {qt} FOR EACH ROW "
            f"EXECUTE FUNCTION {n['fn']}()",
            f"DROP TRIGGER IF EXISTS {n['trn']} ON {qt}",
            f"CREATE TRIGGER {n['trn']} AFTER TRUNCATE ON {qt} FOR EACH STATEMENT EXECUTE FUNCTION {n['fn']}()",
        ]
    out: list[str] = []
    for ev, (op, images) in events.items():
        keys = _keys_json(d, rule, images)
        ver = _version_sql(d, rule, "OLD" if ev == "del" else "NEW", kind)
        insert = f"INSERT INTO {ot} (cache_keys, key_version, run_at) VALUES ({keys}, {ver}, 0)"
        out.append(f"DROP TRIGGER IF EXISTS {n[ev]}")
        out.append(f"CREATE TRIGGER {n[ev]} AFTER {op} ON {qt} FOR EACH ROW {d.trigger_body(insert)}")
    return out


def drop_ddl(d: Dialect, ob: Outbox, table: str) -> list[str]:
    """The statements that drop the capture triggers of ``table`` (idempotent)."""
    n = _names(ob.table, _check_name(table))
    if d.trigger_functions:
        return [f"DROP TRIGGER IF EXISTS {n['pg']} ON {d.ident(table)}",
                f"DROP TRIGGER IF EXISTS {n['trn']} ON {d.ident(table)}", f"DROP FUNCTION IF EXISTS {n['fn']}()"]
    return [f"DROP TRIGGER IF EXISTS {n[ev]}" for ev in ("ins", "upd", "del")]


def _rules_of(ob: Outbox, rules: Rules | None, tables: Sequence[str] | None) -> list[TableRule]:
    rules = rules if rules is not None else ob.rules
    if rules is None:
        raise OutboxError("capture triggers need rules: Outbox(rules=Rules.load('rules.toml')) or rules=...")
    names = list(rules.tables) if tables is None else list(tables)
    missing = [t for t in names if t not in rules.tables]
    if missing:
        raise OutboxError(f"no rule for table(s) {missing}; the rules cover {sorted(rules.tables)}")
    if not names:
        raise OutboxError("the rules name no table: nothing to capture")
    return [rules.tables[t] for t in names]


def install(conn: Any, ob: Outbox, rules: Rules | None = None, tables: Sequence[str] | None = None,
            target: str = "table") -> list[str]:
    """Create (or replace) the capture triggers of ``tables`` (default: every table of the rules) on ``conn``
    and, for ``target="table"``, the outbox table if missing; commits. Checks every template column first and
    changes nothing if one is refused. Returns the tables covered."""
    d = ob._dialect(conn)
    _check_target(d, target)
    chosen = _rules_of(ob, rules, tables)
    stmts: list[str] = []
    try:
        for rule in chosen:
            cols = columns(conn, d, _check_name(rule.table))
            check_rule(d, rule, cols)
            stmts += trigger_ddl(d, ob, rule, target, cols)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    if target == "table":
        ob.init(conn, notify=None)
    _run(conn, stmts)
    return [r.table for r in chosen]


def _run(conn: Any, stmts: Sequence[str]) -> None:
    """Execute ``stmts`` in one transaction on ``conn`` and commit (roll back and re-raise on error)."""
    cur = conn.cursor()
    try:
        for s in stmts:
            cur.execute(s)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        cur.close()


def uninstall(conn: Any, ob: Outbox, rules: Rules | None = None, tables: Sequence[str] | None = None) -> list[str]:
    """Drop the capture triggers of ``tables`` (default: every table of the rules); commits. Idempotent."""
    d = ob._dialect(conn)
    names = [r.table for r in _rules_of(ob, rules, tables)]
    _run(conn, [s for t in names for s in drop_ddl(d, ob, t)])
    return names


__all__ = ["DEFAULT_MESSAGE_PREFIX", "TARGETS", "check_rule", "columns", "drop_ddl", "install", "trigger_ddl",
           "uninstall", "version_kind"]
