"""SQLAlchemy 2.x integration: record invalidations in the session's / connection's own transaction.

``record(conn_or_session, *keys, ...)`` inserts an outbox row through a :class:`~sqlalchemy.engine.Connection`
or an ORM :class:`~sqlalchemy.orm.Session` (in its current transaction; nothing is recorded if it rolls back).

``OutboxSync(rules).install(Session)`` (a Session, a sessionmaker or the Session class) records invalidations
automatically:

* ORM inserts, updates and deletes (``after_flush``): the row images are built from the mapped columns
  (column names, as in the rules) — the old image from attribute history, the new one from the current
  values — so a changed key column invalidates both the old and the new key.
* Bulk ``update(Model)`` / ``delete(Model)`` statements (``do_orm_execute``): the affected rows' key columns
  are read first with the statement's WHERE clause (``FOR UPDATE`` where supported) in the same transaction.
  An UPDATE that sets a key column to an SQL expression (not a plain value) cannot be turned into keys: it
  raises :class:`OutboxError` unless the statement carries ``execution_options(cachesync_keys=[...])``
  (explicit keys, which always take precedence). Statements on tables without a rule are ignored. ORM bulk
  UPDATE by primary key (``session.execute(update(Model), [dicts])``) reads each named row the same way and
  takes its new values from the dicts.
* Bulk ``insert(Model)`` (``.values(...)`` with plain values, or ``session.execute(insert(Model), [dicts])``):
  keys from the new rows; an upsert that can update an existing row (``ON CONFLICT DO UPDATE``, ``ON DUPLICATE
  KEY UPDATE``) does not reveal that row's old keys: refused (``strict=True``) or logged and recorded from the
  new rows only, as below; an INSERT whose key columns are not all plain values (``from_select``, SQL
  expressions, multi-row ``.values([...])``) is refused (``strict=True``) or logged, as below.
* Raw ``text()`` INSERT/UPDATE/DELETE/REPLACE/MERGE/TRUNCATE through the session (``do_orm_execute``): the changed
  table is read from the SQL. A ruled table whose keys are constants (no ``{column}`` fields) is recorded; a
  ruled table whose keys need column values cannot be turned into keys from raw SQL: with ``strict=True``
  (the default) the statement is refused with :class:`OutboxError` before it runs, with ``strict=False`` it runs
  and a WARNING says it was not recorded. ``execution_options(cachesync_keys=[...])`` (``[]``: affects no cached
  key) records explicit keys and always passes. Statements run on ``session.connection().execute()`` or on an
  engine bypass the session's events and are not seen.
* Async: ``install(async_sessionmaker)`` listens on the maker's sync session class (one is created and set as
  its ``sync_session_class`` when it has none); ``install(async_session)`` on its ``sync_session``.
* Every recorded ``(keys, version)`` is also listed in ``session.info["cachesync_recorded"]`` for
  :class:`cachesync.WritePath`, which invalidates them right after the commit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import event, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import BindParameter, ClauseElement, TextClause

from ..db import MYSQL, POSTGRESQL, SQLITE, Dialect
from ..core.rules import Rules
from ..writepath import ORM_RECORDED
from . import Outbox, OutboxError

log = logging.getLogger("cachesync.outbox")
_DML_START = re.compile(r"\s*(?:(?:/\*.*?\*/|--[^\n]*(?:\n|$))\s*)*(UPDATE|DELETE|INSERT|REPLACE|MERGE|WITH|TRUNCATE)\b",
                        re.I | re.S)
# the changed table after the verb and its modifiers (MySQL LOW_PRIORITY/IGNORE/..., SQLite OR <conflict>,
# PostgreSQL ONLY), possibly schema-qualified and quoted
_DML_TABLE = re.compile(r"\b(?:UPDATE(?:\s+OR\s+\w+)?|DELETE(?:\s+(?:LOW_PRIORITY|QUICK|IGNORE))*\s+FROM|"
                        r"(?:INSERT|REPLACE)(?:\s+(?:OR\s+\w+|LOW_PRIORITY|DELAYED|HIGH_PRIORITY|IGNORE))*\s+INTO|"
                        r"MERGE\s+INTO|TRUNCATE(?:\s+TABLE)?)\s+(?:(?:LOW_PRIORITY|IGNORE|ONLY)\s+)*"
                        r"((?:[`\"]?\w+[`\"]?\.)*[`\"]?[A-Za-z_]\w*[`\"]?)", re.I)
# a multi-table UPDATE/DELETE (MySQL ``UPDATE a JOIN b SET ...``, ``UPDATE a, b SET ...``, ``DELETE a, b FROM ...``,
# ``DELETE FROM a, b USING ...``): its tables before SET / after DELETE, where a comma or a JOIN means several
_UPDATE_HEAD = re.compile(r"\bUPDATE\b(.*?)\bSET\b", re.I | re.S)
_DELETE_HEAD = re.compile(r"\bDELETE\b(.*?)(?:\bWHERE\b|\bUSING\b|\bORDER\b|\bLIMIT\b|\bRETURNING\b|;|$)", re.I | re.S)
_SEVERAL = re.compile(r",|\bJOIN\b", re.I)
_DELETE_FROM = re.compile(r"\s*(?:(?:LOW_PRIORITY|QUICK|IGNORE)\s+)*FROM\b", re.I)


def _several_tables(sql: str) -> bool:
    """Whether raw DML changes several tables at once (which of them, and which rows, the SQL does not say)."""
    for m in _UPDATE_HEAD.finditer(sql):
        if _SEVERAL.search(m.group(1)):
            return True
    for m in _DELETE_HEAD.finditer(sql):
        head = m.group(1)
        if _SEVERAL.search(head) or not _DELETE_FROM.match(head):  # DELETE a FROM a JOIN b
            return True
    return False


_OLD_IMAGES = "cachesync_old_images"  # flush_context.attributes: {(state, table): committed rule columns}
_DIALECTS = {"postgresql": POSTGRESQL, "mysql": MYSQL, "mariadb": MYSQL, "sqlite": SQLITE}


def _connection(bind: Connection | Session) -> Connection:
    if isinstance(bind, Session):
        return bind.connection()
    if isinstance(bind, Connection):
        return bind
    raise OutboxError(f"expected a SQLAlchemy Connection or Session, got {type(bind).__name__}")


def _dialect(conn: Connection) -> Dialect:
    try:
        return _DIALECTS[conn.dialect.name]
    except KeyError:
        raise OutboxError(f"the outbox does not support SQLAlchemy dialect {conn.dialect.name!r}; "
                          "use postgresql, mysql/mariadb or sqlite") from None


def _execute(conn: Connection, ob: Outbox, keys: Sequence[str], version: Any, delay: float,
             again_after: float | None) -> None:
    d = _dialect(conn)
    tp = ob.traceparent(conn.connection, d)  # the writer's span, for the relay and the L1s (tracing)
    sql, params = ob.insert_sql(d, ob.rows_for(keys, version, delay, again_after), tp)
    parts = sql.split("?")
    named = "".join(p + (f":p{i}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))
    conn.execute(text(named), {f"p{i}": v for i, v in enumerate(params)})


def _state_connection(state: Any) -> Connection:
    """The session's connection for an ORM statement: that of the statement's own bind (``Session(binds=...)``)."""
    return state.session.connection(bind_arguments=dict(state.bind_arguments))  # type: ignore[no-any-return]


def record(bind: Connection | Session, *keys: str, version: Any = None, delay: float = 0.0,
           again_after: float | None = None, outbox: Outbox | None = None) -> None:
    """Record that ``keys`` must be invalidated when ``bind``'s transaction commits (see
    :meth:`cachesync.outbox.Outbox.record` for ``version``, ``delay``, ``again_after``). ``outbox`` (default:
    table ``cachesync_outbox``) names the table."""
    _execute(_connection(bind), outbox or Outbox(), keys, version, delay, again_after)


class OutboxSync:
    """Automatic invalidations for ORM changes. ``OutboxSync(rules, outbox=None)``; rules are keyed by table
    name and use column names. ``install(target)`` listens on a Session, a sessionmaker or a Session class."""

    def __init__(self, rules: Rules, outbox: Outbox | None = None, *, strict: bool = True) -> None:
        if not isinstance(rules, Rules):
            raise OutboxError(f"OutboxSync needs cachesync.rules.Rules, got {type(rules).__name__}")
        self.rules = rules
        self.outbox = outbox or Outbox()
        self.strict = strict

    @staticmethod
    def _target(target: Any) -> Any:
        """The sync-side target of ``target``: an ``async_sessionmaker`` / ``AsyncSession`` (class or instance)
        listens through its sync session class / sync session (SQLAlchemy's events live on the sync side)."""
        if isinstance(target, sessionmaker):
            return target
        cls_name = type(target).__name__
        if cls_name == "async_sessionmaker":
            sync_cls = target.kw.get("sync_session_class")
            if sync_cls is None:  # give this maker its own sync Session class so that listening stays local to it
                sync_cls = type("CachesyncSyncSession", (Session,), {})
                target.configure(sync_session_class=sync_cls)
            return sync_cls
        if cls_name == "AsyncSession":
            return target.sync_session
        if isinstance(target, type) and target.__name__ == "AsyncSession":
            raise OutboxError("install() on the AsyncSession class itself is not supported; pass the "
                              "async_sessionmaker (or an AsyncSession instance)")
        return target

    def install(self, target: Session | sessionmaker[Any] | type[Session] | Any) -> OutboxSync:
        """Listen for flushes and bulk statements on ``target`` (a Session, sessionmaker, Session class, or an
        ``async_sessionmaker`` / ``AsyncSession``); returns self."""
        t = self._target(target)
        event.listen(t, "before_flush", self._before_flush)
        event.listen(t, "after_flush", self._after_flush)
        event.listen(t, "do_orm_execute", self._do_orm_execute)
        return self

    def uninstall(self, target: Session | sessionmaker[Any] | type[Session] | Any) -> None:
        """Stop listening on ``target``."""
        t = self._target(target)
        event.remove(t, "before_flush", self._before_flush)
        event.remove(t, "after_flush", self._after_flush)
        event.remove(t, "do_orm_execute", self._do_orm_execute)

    def _rec(self, session: Session, conn: Connection, keys: list[str], version: Any) -> None:
        _execute(conn, self.outbox, keys, version, 0.0, None)
        session.info.setdefault(ORM_RECORDED, []).append((keys, version))

    # ------------------------------------------------------------------ ORM unit of work

    def _ruled(self, mapper: Any) -> list[tuple[str, list[tuple[Any, Any]]]]:
        """The ruled tables ``mapper`` writes (several with joined-table inheritance), each with its
        ``(attribute, column)`` pairs."""
        out = []
        for t in mapper.tables:
            name = getattr(t, "name", None)
            if isinstance(name, str) and self.rules.covers(name):
                out.append((name, [(p, c) for p in mapper.column_attrs for c in p.columns if c.table is t]))
        return out

    def _before_flush(self, session: Session, flush_context: Any, instances: Any) -> None:
        """Read from the database the committed rule columns of changed / deleted rows whose old value the ORM does
        not know (an expired attribute, e.g. after ``expire_on_commit``, set again or never loaded): without it a
        changed key column would not invalidate the old key."""
        loaded: dict[Any, dict[str, Any]] = flush_context.attributes.setdefault(_OLD_IMAGES, {})
        for obj in [*session.dirty, *session.deleted]:
            state = inspect(obj)
            if state.key is None:
                continue
            mapper = state.mapper
            for name, pairs in self._ruled(mapper):
                rule = self.rules.tables[name]
                cols = rule.columns | ({rule.version} if rule.version else set())
                wanted = [(p, c) for p, c in pairs if c.name in cols]
                if not any(p.key not in state.dict or (state.attrs[p.key].history.added
                                                        and not state.attrs[p.key].history.deleted)
                           for p, _ in wanted):
                    continue
                where = [c == v for c, v in zip(mapper.primary_key, state.key[1], strict=True)]
                sel = select(*[c for _, c in wanted]).select_from(mapper.persist_selectable).where(*where)
                row = session.connection(bind_arguments={"mapper": mapper}).execute(sel).first()
                if row is not None:
                    loaded[(state, name)] = {c.name: v for (_, c), v in zip(wanted, row, strict=True)}

    @staticmethod
    def _images(state: Any, pairs: list[tuple[Any, Any]],
                loaded: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        old: dict[str, Any] = {}
        new: dict[str, Any] = {}
        for prop, column in pairs:
            col = column.name
            hist = state.attrs[prop.key].history
            if prop.key in state.dict:
                new[col] = state.dict[prop.key]
            elif loaded and col in loaded:  # not loaded, not changed: the committed value
                new[col] = loaded[col]
            if hist.deleted:
                old[col] = hist.deleted[0]
            elif loaded and col in loaded:  # the value before this flush, read by _before_flush
                old[col] = loaded[col]
            elif prop.key in state.dict:
                old[col] = state.dict[prop.key]
        return old, new

    def _after_flush(self, session: Session, flush_context: Any) -> None:
        items: list[tuple[list[str], Any, Any]] = []  # (keys, version, mapper: its bind gets the row)
        changes = [(o, "new") for o in session.new] + [(o, "dirty") for o in session.dirty] + \
                  [(o, "deleted") for o in session.deleted]
        loaded = flush_context.attributes.get(_OLD_IMAGES, {})
        for obj, kind in changes:
            state = inspect(obj)
            ruled = self._ruled(state.mapper)
            if not ruled or (kind == "dirty" and not session.is_modified(obj, include_collections=False)):
                continue
            for table, pairs in ruled:
                old, new = self._images(state, pairs, loaded.get((state, table)))
                o = None if kind == "new" else old
                n = None if kind == "deleted" else new
                keys = self.rules.keys_for(table, o, n)
                if keys:
                    items.append((keys, self.rules.version_for(table, n if n is not None else o), state.mapper))
        for keys, version, mapper in items:  # in the transaction of the row's own database (Session(binds=...))
            _execute(session.connection(bind_arguments={"mapper": mapper}), self.outbox, keys, version, 0.0, None)
        if items:
            session.info.setdefault(ORM_RECORDED, []).extend((k, v) for k, v, _ in items)

    # ------------------------------------------------------------------ bulk statements

    def _explicit(self, state: Any) -> bool:
        explicit = state.execution_options.get("cachesync_keys")
        if explicit is None:
            return False
        if isinstance(explicit, str):
            raise OutboxError("execution_options(cachesync_keys=...) takes a list of keys, not a string")
        if explicit:
            self._rec(state.session, _state_connection(state), list(explicit), None)
        return True

    def _text(self, state: Any) -> None:
        """A raw ``text()`` statement: recorded when its keys are known, else refused (strict) or logged."""
        sql = state.statement.text
        start = _DML_START.match(sql)
        if start is None or self._explicit(state):
            return
        if _several_tables(sql):  # read as its first table only, the others' keys stayed cached
            self._unrecorded(f"raw SQL {sql[:80]!r} changes several tables at once (a multi-table UPDATE/DELETE): "
                             "cannot tell which rows of which ruled tables it changes")
            return
        tables = [m.group(1).rsplit(".", 1)[-1].strip('`"') for m in _DML_TABLE.finditer(sql)]
        if not tables:
            if start.group(1).upper() == "WITH":
                return  # a WITH ... SELECT
            self._unrecorded(f"raw SQL {sql[:80]!r}: cannot tell which table it changes")
            return
        for name in dict.fromkeys(tables):
            if not self.rules.covers(name):
                continue
            rule = self.rules.tables[name]
            if rule.columns:
                self._unrecorded(f"raw SQL changes ruled table {name!r} whose keys need column values "
                                 f"({', '.join(sorted(rule.columns))}) that a text() statement does not reveal")
            else:
                self._rec(state.session, _state_connection(state), list(rule.keys), None)

    def _unrecorded(self, problem: str) -> None:
        msg = (f"cachesync OutboxSync: {problem}; pass .execution_options(cachesync_keys=[...]) (the keys it "
               "affects, or [] for none), or use the ORM update()/delete() constructs")
        if self.strict:
            raise OutboxError(msg + " (OutboxSync(strict=True) refuses unrecorded writes)")
        log.warning("%s; NOT recorded in the outbox (strict=False)", msg)

    def _insert(self, state: Any) -> None:
        """Bulk ``insert(Model)`` (``.values(...)`` or a list of parameter dicts): keys from the new rows."""
        stmt = state.statement
        table = stmt.table
        name = getattr(table, "name", None)
        if self._explicit(state) or name is None or not self.rules.covers(name):
            return
        rule = self.rules.tables[name]
        if not rule.columns:
            self._rec(state.session, _state_connection(state), list(rule.keys), None)
            return
        post = getattr(stmt, "_post_values_clause", None)
        if type(post).__name__ in ("OnConflictDoUpdate", "OnDuplicateClause"):  # strict: raises; lax: new keys only
            self._unrecorded(f"upsert (ON CONFLICT DO UPDATE / ON DUPLICATE KEY UPDATE) into ruled table {name!r}: "
                             "it can change an existing row whose old key columns "
                             f"({', '.join(sorted(rule.columns))}) the statement does not reveal")
        by_key = {}
        mapper = getattr(state.bind_mapper, "column_attrs", None) and state.bind_mapper
        if mapper is not None:
            by_key = {prop.key: prop.columns[0].name for prop in mapper.column_attrs}
        rows: list[dict[str, Any]] = []
        values = getattr(stmt, "_values", None)
        params = state.parameters
        if values and not getattr(stmt, "_multi_values", None) and not getattr(stmt, "select", None):
            row: dict[str, Any] = {}
            for k, v in values.items():
                if not (isinstance(v, BindParameter) and v.callable is None):
                    row = {}
                    break
                row[getattr(k, "name", k)] = v.value
            rows = [row] if row else []
        elif params:
            for p in params if isinstance(params, list) else [params]:
                rows.append({by_key.get(k, k): v for k, v in p.items()})
        if not rows or any(not rule.columns <= set(r) for r in rows):
            self._unrecorded(f"bulk INSERT into ruled table {name!r}: the new rows' key columns "
                             f"({', '.join(sorted(rule.columns))}) are not all plain values")
            return
        conn = _state_connection(state)
        for r in rows:
            keys = self.rules.keys_for(name, None, r)
            if keys:
                self._rec(state.session, conn, keys, self.rules.version_for(name, r))

    def _do_orm_execute(self, state: Any) -> None:
        if isinstance(state.statement, TextClause):
            self._text(state)
            return
        if state.is_insert:
            self._insert(state)
            return
        if not (state.is_update or state.is_delete):
            return
        stmt = state.statement
        table = stmt.table
        name = getattr(table, "name", None)
        if self._explicit(state):
            return
        conn = _state_connection(state)
        if name is None or not self.rules.covers(name):
            return
        rule = self.rules.tables[name]
        if not rule.columns:
            self._rec(state.session, conn, list(rule.keys), None)
            return
        sets: Mapping[Any, Any] = getattr(stmt, "_values", None) or {}
        set_values: dict[str, Any] = {}
        for k, v in sets.items():
            col = getattr(k, "name", k)
            plain = isinstance(v, BindParameter) and v.callable is None
            if col == rule.version and col not in rule.columns:
                set_values[col] = v.value if plain else None  # unknown new version: no version floor
            elif col in rule.columns:
                if not plain:
                    raise OutboxError(
                        f"cannot derive cache keys for bulk UPDATE of {name!r}: it sets key column {col!r} to an SQL "
                        "expression; set a plain value, or pass .execution_options(cachesync_keys=[...])")
                set_values[col] = v.value
        cols = sorted(rule.columns | ({rule.version} if rule.version else set()))
        missing = [c for c in cols if c not in table.c]
        if missing:
            raise OutboxError(f"rule for table {name!r} names column(s) {missing} the table does not have")
        params = state.parameters
        if state.is_update and isinstance(params, list) and params and state.bind_mapper is not None:
            self._bulk_by_pk(state, conn, name, table, cols, params)
            return
        sel = select(*[table.c[c] for c in cols]).where(*stmt._where_criteria)
        if _dialect(conn).for_update:
            sel = sel.with_for_update()
        for row in conn.execute(sel).mappings():
            old = dict(row)
            new = None if state.is_delete else {**old, **set_values}
            keys = self.rules.keys_for(name, old, new)
            if keys:
                self._rec(state.session, conn, keys, self.rules.version_for(name, new or old))

    def _bulk_by_pk(self, state: Any, conn: Connection, name: str, table: Any, cols: list[str],
                    params: list[Mapping[str, Any]]) -> None:
        """ORM bulk UPDATE by primary key (``session.execute(update(Model), [dicts])``): each dict names one row by
        its primary key and carries its new values; the row's rule columns are read first (``FOR UPDATE``)."""
        mapper = state.bind_mapper
        by_key = {prop.key: prop.columns[0].name for prop in mapper.column_attrs}
        pk = [c.name for c in mapper.primary_key]
        rule = self.rules.tables[name]
        for p in params:
            values = {by_key.get(k, k): v for k, v in p.items()}
            for c in rule.columns:
                if c in values and isinstance(values[c], ClauseElement):
                    raise OutboxError(
                        f"cannot derive cache keys for bulk UPDATE of {name!r}: it sets key column {c!r} to an SQL "
                        "expression; set a plain value, or pass .execution_options(cachesync_keys=[...])")
            if not all(c in values for c in pk):
                raise OutboxError(f"bulk UPDATE of {name!r} by primary key: a parameter set lacks the primary key")
            sel = select(*[table.c[c] for c in cols]).where(*[table.c[c] == values[c] for c in pk],
                                                             *state.statement._where_criteria)
            if _dialect(conn).for_update:
                sel = sel.with_for_update()
            for row in conn.execute(sel).mappings():
                old = dict(row)
                new = {**old, **{c: (None if isinstance(values[c], ClauseElement) else values[c])
                                 for c in cols if c in values}}
                keys = self.rules.keys_for(name, old, new)
                if keys:
                    self._rec(state.session, conn, keys, self.rules.version_for(name, new))


__all__ = ["OutboxSync", "record"]
