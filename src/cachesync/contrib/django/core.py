"""Settings, the cache, signals, the bulk-update queryset and the ``cached`` helpers (see the package docstring).

Settings (``CACHESYNC = {...}``; every key optional except ``RULES`` for automatic invalidation):

=========================  ==============================  ================================================
key                        default                         meaning
=========================  ==============================  ================================================
``REDIS_URL``              ``"redis://127.0.0.1:6379/0"``  the cache's Redis
``NAMESPACE``              ``"default"``                   the cache namespace
``RULES``                  ``None``                        a dict (as :class:`cachesync.rules.Rules`) or a
                                                           path to a rules file (.toml/.py)
``OUTBOX_TABLE``           ``"cachesync_outbox"``          the outbox table (created by ``migrate``)
``OPTIONS``                ``{}``                          :class:`cachesync.CacheOptions` fields
``ON_INVALIDATION_ERROR``  ``"log"``                       ``"log"`` or ``"raise"`` (see WritePath)
``STRICT``                 ``True``                        ``QuerySet.update()`` setting a key column to an
                                                           expression raises instead of guessing
=========================  ==============================  ================================================
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

from django.conf import settings
from django.db import connections, models, router, transaction
from django.db.models import signals
from django.http import Http404

from ...errors import ConfigError
from ...outbox import Outbox, OutboxError
from ...core import NOT_FOUND, Versioned
from ...core.rules import Rules, TableRule
from ..._sync.cache import Cache
from ...writepath import WritePath

DEFAULTS: dict[str, Any] = {
    "REDIS_URL": "redis://127.0.0.1:6379/0", "NAMESPACE": "default", "RULES": None,
    "OUTBOX_TABLE": "cachesync_outbox", "OPTIONS": {}, "ON_INVALIDATION_ERROR": "log", "STRICT": True,
}

T = TypeVar("T")

_lock = threading.RLock()
_state: dict[str, Any] = {}


def settings_value(name: str) -> Any:
    """``settings.CACHESYNC[name]`` or its default; an unknown key in ``CACHESYNC`` is a :class:`ConfigError`."""
    conf = getattr(settings, "CACHESYNC", {}) or {}
    unknown = sorted(set(conf) - set(DEFAULTS))
    if unknown:
        raise ConfigError("CACHESYNC", f"unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    return conf.get(name, DEFAULTS[name])


def _get(name: str, build: Callable[[], T]) -> T:
    with _lock:
        if name not in _state:
            _state[name] = build()
        return cast(T, _state[name])


def reset() -> None:
    """Forget the cache, rules and write path built from the settings (closes the cache); for tests."""
    with _lock:
        c = _state.pop("cache", None)
        _state.clear()
    if c is not None:
        c.close()


def get_cache() -> Cache:
    """The process's :class:`cachesync.Cache`, built from the settings on first use."""
    return _get("cache", lambda: Cache(settings_value("REDIS_URL"), namespace=settings_value("NAMESPACE"),
                                       **settings_value("OPTIONS")))


def get_rules() -> Rules | None:
    """The :class:`~cachesync.rules.Rules` of ``CACHESYNC["RULES"]`` (``None`` when not set)."""
    def build() -> Rules | None:
        spec = settings_value("RULES")
        if spec is None or isinstance(spec, Rules):
            return spec
        return Rules.load(spec) if isinstance(spec, str) else Rules(spec)
    return _get("rules", build)


def get_outbox() -> Outbox:
    return _get("outbox", lambda: Outbox(settings_value("OUTBOX_TABLE"), rules=get_rules()))


def get_write_path() -> WritePath:
    """The :class:`cachesync.WritePath` used after commits (its ``invalidate_committed``)."""
    return _get("wp", lambda: WritePath(get_cache(), get_outbox(),
                                        on_invalidation_error=settings_value("ON_INVALIDATION_ERROR")))


def dialect_for(connection: Any) -> Any:
    from ...db import MYSQL, POSTGRESQL, SQLITE

    try:
        return {"postgresql": POSTGRESQL, "mysql": MYSQL, "sqlite": SQLITE}[connection.vendor]
    except KeyError:
        raise OutboxError(f"cachesync supports PostgreSQL, MySQL/MariaDB and SQLite, not {connection.vendor!r}") from None


def record(*keys: str, version: Any = None, using: str = "default") -> None:
    """Record ``keys`` in the outbox in the current transaction of database ``using`` and invalidate them once
    it commits (``transaction.on_commit``). The building block of the signals; call it for writes cachesync
    does not see (raw SQL, ``bulk_create``)."""
    _record([(list(keys), version)], using)


def _record(groups: list[tuple[list[str], Any]], using: str) -> None:
    groups = [(k, v) for k, v in groups if k]
    if not groups:
        return
    ob = get_outbox()
    conn = connections[using]
    d = dialect_for(conn)
    with conn.cursor() as cur:
        tp = ob.traceparent(conn.connection, d)  # the writer's span (tracing); the cursor opened the connection
        for keys, version in groups:
            sql, params = ob.insert_sql(d, ob.rows_for(keys, version), tp)
            cur.execute(sql.replace("?", "%s"), params)
    wp = get_write_path()
    transaction.on_commit(functools.partial(wp.invalidate_committed, groups), using=using)


# ---------------------------------------------------------------------------- row images

def _rule(model: type[models.Model]) -> TableRule | None:
    rules = get_rules()
    return None if rules is None else rules.tables.get(model._meta.db_table)


def _image(instance: models.Model) -> dict[str, Any]:
    return {str(f.column): getattr(instance, f.attname) for f in instance._meta.concrete_fields}


def _attnames(model: type[models.Model], cols: Iterable[str]) -> dict[str, str]:
    by_col = {str(f.column): f.attname for f in model._meta.concrete_fields}
    missing = [c for c in cols if c not in by_col]
    if missing:
        raise OutboxError(f"rule for table {model._meta.db_table!r} names column(s) {missing} the model "
                          f"{model.__name__} does not have (columns: {sorted(by_col)})")
    return {c: by_col[c] for c in cols}


def _rule_cols(rule: TableRule) -> list[str]:
    return sorted(rule.columns | ({rule.version} if rule.version else set()))


def _groups(model: type[models.Model], old: Mapping[str, Any] | None,
            new: Mapping[str, Any] | None) -> list[tuple[list[str], Any]]:
    rules = get_rules()
    assert rules is not None
    table = model._meta.db_table
    keys = rules.keys_for(table, old, new)
    return [(keys, rules.version_for(table, new if new is not None else old))] if keys else []


# ---------------------------------------------------------------------------- signals

def _pre_save(sender: type[models.Model], instance: models.Model, raw: bool = False, using: str = "default",
              **kw: Any) -> None:
    rule = _rule(sender)
    # not skipped for _state.adding: an unsaved instance with the pk of an existing row is saved as an UPDATE
    # (Django forces an INSERT only when the pk has a default)
    if rule is None or instance.pk is None or not rule.columns:
        return
    pk = sender._meta.pk
    if instance._state.adding and pk is not None and pk.has_default():
        return
    names = _attnames(sender, rule.columns)
    qs = sender._base_manager.using(using).filter(pk=instance.pk)
    if dialect_for(connections[using]).for_update and connections[using].in_atomic_block:
        # FOR UPDATE, in the save's transaction: a concurrent save of the row waits for it and reads the key
        # columns as that one left them (without the lock it recorded the keys the row had before the other
        # committed, and the other's new key, cached in between by a reader, stayed stale)
        qs = qs.select_for_update()
    row = qs.values(*names.values()).first()
    instance.__dict__["_cachesync_old"] = None if row is None else {c: row[a] for c, a in names.items()}


def _post_save(sender: type[models.Model], instance: models.Model, created: bool = False, raw: bool = False,
               using: str = "default", **kw: Any) -> None:
    if _rule(sender) is None:
        return
    old = None if created else getattr(instance, "_cachesync_old", None)
    instance.__dict__.pop("_cachesync_old", None)
    _record(_groups(sender, old, _image(instance)), using)


def _pre_delete(sender: type[models.Model], instance: models.Model, using: str = "default", **kw: Any) -> None:
    """Read the row's rule columns as the database has them (``FOR UPDATE``, inside the delete's transaction): the
    instance may be stale (another writer changed a key column since it was loaded), and the keys the cache
    holds the row under are the current ones."""
    rule = _rule(sender)
    if rule is None or instance.pk is None or not rule.columns:
        return
    names = _attnames(sender, _rule_cols(rule))
    qs = sender._base_manager.using(using).filter(pk=instance.pk)
    if dialect_for(connections[using]).for_update and connections[using].in_atomic_block:
        qs = qs.select_for_update()
    row = qs.values(*names.values()).first()
    instance.__dict__["_cachesync_deleted"] = None if row is None else {c: row[a] for c, a in names.items()}


def _post_delete(sender: type[models.Model], instance: models.Model, using: str = "default", **kw: Any) -> None:
    if _rule(sender) is None:
        return
    image, current = _image(instance), instance.__dict__.pop("_cachesync_deleted", None)
    groups = _groups(sender, image, None)
    if current is not None and any(image.get(c) != v for c, v in current.items()):
        groups += _groups(sender, {**image, **current}, None)  # and the row's current keys
    _record(groups, using)


def _m2m_changed(sender: type[models.Model], instance: models.Model, action: str, reverse: bool,
                 model: type[models.Model], pk_set: set[Any] | None, using: str = "default", **kw: Any) -> None:
    if action == "pre_clear":  # remember what is cleared: post_clear has no pk_set
        through = sender._meta
        src, dst = _through_fields(sender, type(instance), model, reverse)
        instance.__dict__["_cachesync_cleared"] = list(
            sender._base_manager.using(using).filter(**{src.attname: instance.pk}).values_list(dst.attname, flat=True))
        del through
        return
    if action not in ("post_add", "post_remove", "post_clear"):
        return
    groups: list[tuple[list[str], Any]] = []
    if _rule(type(instance)) is not None:
        groups += _groups(type(instance), _image(instance), _image(instance))
    if _rule(sender) is not None:
        src, dst = _through_fields(sender, type(instance), model, reverse)
        pks = instance.__dict__.pop("_cachesync_cleared", []) if action == "post_clear" else (pk_set or ())
        for pk in pks:
            row = {src.column: instance.pk, dst.column: pk}
            groups += _groups(sender, row, None)
    if _rule(model) is not None and pk_set:
        for obj in model._base_manager.using(using).filter(pk__in=pk_set):
            groups += _groups(model, _image(obj), _image(obj))
    _record(groups, using)


def _through_fields(through: type[models.Model], inst_model: type[models.Model], other: type[models.Model],
                    reverse: bool) -> tuple[Any, Any]:
    fks = [f for f in through._meta.concrete_fields if f.is_relation]
    src = next(f for f in fks if f.related_model is inst_model)
    dst = next(f for f in fks if f.related_model is other and f is not src)
    return src, dst


def connect_signals() -> None:
    """Listen for saves, deletes and m2m changes of every model (a model without a rule is ignored)."""
    signals.pre_save.connect(_pre_save, dispatch_uid="cachesync_pre_save")
    signals.post_save.connect(_post_save, dispatch_uid="cachesync_post_save")
    signals.pre_delete.connect(_pre_delete, dispatch_uid="cachesync_pre_delete")
    signals.post_delete.connect(_post_delete, dispatch_uid="cachesync_post_delete")
    signals.m2m_changed.connect(_m2m_changed, dispatch_uid="cachesync_m2m_changed")


# ---------------------------------------------------------------------------- bulk update

_in_bulk_update: contextvars.ContextVar[bool] = contextvars.ContextVar("cachesync_in_bulk_update", default=False)


class CachesyncQuerySet(models.QuerySet[Any]):
    """A QuerySet whose ``update()``, ``bulk_create()`` and ``bulk_update()`` (which send no signals) record the
    affected rows' keys (old and new) in the same transaction."""

    def update(self, **kwargs: Any) -> int:
        rule = _rule(self.model)
        if rule is None or _in_bulk_update.get():  # bulk_update's own UPDATEs: it records the rows itself
            return super().update(**kwargs)
        using = self.db
        with transaction.atomic(using=using, savepoint=False):
            if not rule.columns:
                n = super().update(**kwargs)
                _record([(list(rule.keys), None)], using)
                return n
            meta = self.model._meta
            set_values: dict[str, Any] = {}
            for name, v in kwargs.items():
                field = meta.get_field(name)
                col = field.column
                if getattr(field, "remote_field", None) is not None and hasattr(v, "prepare_database_save"):
                    v = v.prepare_database_save(field)  # a model instance: the column gets its key (as Django does)
                expr = hasattr(v, "resolve_expression")
                if col in rule.columns and expr:
                    if settings_value("STRICT"):
                        raise OutboxError(
                            f"cannot derive cache keys for {self.model.__name__}.objects.update(): it sets key "
                            f"column {col!r} to an expression; set a plain value, or call "
                            "cachesync.contrib.django.record(...) with the keys and CACHESYNC['STRICT']=False")
                    continue
                if col in rule.columns or col == rule.version:
                    set_values[col] = None if expr else v
            names = _attnames(self.model, _rule_cols(rule))
            qs = self.select_for_update() if dialect_for(connections[using]).for_update else self
            rows = [{c: r[a] for c, a in names.items()} for r in qs.values(*names.values())]
            n = super().update(**kwargs)
            groups: list[tuple[list[str], Any]] = []
            for old in rows:
                groups += _groups(self.model, old, {**old, **set_values})
            _record(groups, using)
            return n

    update.__dict__["alters_data"] = True

    def _rows(self, q: Any, names: Mapping[str, str], lock: bool) -> dict[Any, dict[str, Any]]:
        """``{pk: {column: value}}`` of the rule columns of the rows matching ``q`` (``FOR UPDATE`` when ``lock``
        on PostgreSQL/MariaDB)."""
        qs = self.model._base_manager.using(self.db).filter(q)
        if lock and connections[self.db].vendor in ("postgresql", "mysql"):
            qs = qs.select_for_update()
        pk = self.model._meta.pk
        assert pk is not None
        fields = list(dict.fromkeys([*names.values(), pk.attname]))
        return {r[pk.attname]: {c: r[a] for c, a in names.items()} for r in qs.values(*fields)}

    def bulk_create(self, objs: Iterable[Any], batch_size: int | None = None, ignore_conflicts: bool = False,
                    update_conflicts: bool = False, update_fields: Any = None, unique_fields: Any = None) -> Any:
        """``bulk_create`` (no signals) recording the keys of the rows it inserts, and with ``ignore_conflicts`` /
        ``update_conflicts`` of the rows that could conflict (read, ``FOR UPDATE``, before and after it by the
        model's unique fields), in the same transaction."""
        kw = {"batch_size": batch_size, "ignore_conflicts": ignore_conflicts, "update_conflicts": update_conflicts,
              "update_fields": update_fields, "unique_fields": unique_fields}
        rule = _rule(self.model)
        if rule is None:
            return super().bulk_create(objs, **kw)
        objs = list(objs)
        using = self.db
        with transaction.atomic(using=using, savepoint=False):
            if not rule.columns:
                created = super().bulk_create(objs, **kw)
                _record([(list(rule.keys), None)], using)
                return created
            names = _attnames(self.model, _rule_cols(rule))
            if not (ignore_conflicts or update_conflicts):
                created = super().bulk_create(objs, **kw)
                groups: list[tuple[list[str], Any]] = []
                for obj in created:
                    new = {c: getattr(obj, a) for c, a in names.items()}
                    unknown = sorted(c for c in rule.columns if new[c] is None)
                    if unknown:
                        self._unknown("bulk_create", unknown)  # strict: raises, the insert is rolled back
                        continue
                    groups += _groups(self.model, None, new)
                _record(groups, using)
                return created
            q = _unique_q(self.model, objs)
            if q is None:
                self._unknown("bulk_create(ignore_conflicts/update_conflicts=True)", ["(no unique field set)"])
                return super().bulk_create(objs, **kw)
            before = self._rows(q, names, lock=True)
            created = super().bulk_create(objs, **kw)
            after = self._rows(q, names, lock=False)
            groups = []
            for pk, new in after.items():
                old = before.get(pk)
                if old != new or (update_conflicts and old is not None):  # an upserted row: any column changed
                    groups += _groups(self.model, old, new)
            _record(groups, using)
            return created

    bulk_create.__dict__["alters_data"] = True

    def bulk_update(self, objs: Iterable[Any], fields: Any, batch_size: int | None = None) -> int:
        """``bulk_update`` (no signals) recording the old and new keys of the rows it updates: their rule columns
        are read (``FOR UPDATE``) before and after it in the same transaction."""
        rule = _rule(self.model)
        if rule is None:
            return super().bulk_update(objs, fields, batch_size=batch_size)
        objs = list(objs)
        using = self.db
        with transaction.atomic(using=using, savepoint=False):
            if not rule.columns:
                token = _in_bulk_update.set(True)
                try:
                    n = super().bulk_update(objs, fields, batch_size=batch_size)
                finally:
                    _in_bulk_update.reset(token)
                _record([(list(rule.keys), None)], using)
                return n
            names = _attnames(self.model, _rule_cols(rule))
            q = models.Q(pk__in=[o.pk for o in objs])
            before = self._rows(q, names, lock=True)
            token = _in_bulk_update.set(True)
            try:
                n = super().bulk_update(objs, fields, batch_size=batch_size)
            finally:
                _in_bulk_update.reset(token)
            after = self._rows(q, names, lock=False)
            groups: list[tuple[list[str], Any]] = []
            for pk, new in after.items():
                groups += _groups(self.model, before.get(pk), new)
            _record(groups, using)
            return n

    bulk_update.__dict__["alters_data"] = True

    def _unknown(self, op: str, columns: list[str]) -> None:
        """A write whose rows' key columns cannot be known: :class:`OutboxError` in strict mode, else skipped."""
        if settings_value("STRICT"):
            raise OutboxError(
                f"cannot derive cache keys for {self.model.__name__}.objects.{op}: key column(s) {columns} of the "
                "written rows are not known (the database did not return the primary keys, or no unique field is "
                "set to find the rows); set them, or call cachesync.contrib.django.record(...) with the keys and "
                "CACHESYNC['STRICT']=False")


def _unique_q(model: type[models.Model], objs: list[Any]) -> Any:
    """A ``Q`` matching every row that one of ``objs`` could conflict with: any unique field or unique set of
    fields (``unique``, ``unique_together``, unconditional ``UniqueConstraint``) equal to the object's values;
    ``None`` when no object has a complete unique value."""
    meta = model._meta
    sets: list[tuple[str, ...]] = [(f.attname,) for f in meta.concrete_fields if f.unique]
    for group in meta.unique_together:
        sets.append(tuple(cast(Any, meta.get_field(n)).attname for n in group))
    for c in meta.total_unique_constraints:
        sets.append(tuple(cast(Any, meta.get_field(n)).attname for n in c.fields))
    q = None
    for obj in objs:
        for names in sets:
            values = {n: getattr(obj, n) for n in names}
            if all(v is not None for v in values.values()):
                q = models.Q(**values) if q is None else q | models.Q(**values)
    return q


CachesyncManager = models.Manager.from_queryset(CachesyncQuerySet)
"""``objects = CachesyncManager()``: a manager whose querysets record bulk ``update()`` (see CachesyncQuerySet)."""


# ---------------------------------------------------------------------------- reads

def cached(template: str, ttl: float | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@cached("article:{pk}", ttl=60)`` on a function (a view helper, a queryset helper) returning JSON-able
    data, a :class:`~cachesync.Versioned` or :data:`~cachesync.NOT_FOUND`; ``NOT_FOUND`` raises ``Http404``."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        from ..._driver import KeyTemplate

        kt = KeyTemplate(template, fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            v = get_cache().get(kt.format(*args, **kwargs), lambda: fn(*args, **kwargs), ttl)
            if v is NOT_FOUND:
                raise Http404(f"no object for {kt.format(*args, **kwargs)!r}")
            return v

        cast(Any, wrapper).key = kt.format
        return wrapper
    return deco


def cached_get(model: type[models.Model], ttl: float | None = None, *, instance: bool = False,
               **lookup: Any) -> Any:
    """One row of ``model`` through the cache, keyed by its rule: the first key template whose fields are exactly
    ``lookup``'s column names (``cached_get(Article, id=5)`` -> ``"article:{id}"``). Returns the row as a dict of
    column values (``instance=True``: a model instance); raises ``Http404`` when there is no such row (cached
    negatively). The rule's version column is the cached version."""
    rule = _rule(model)
    if rule is None:
        raise ConfigError("RULES", f"no rule for table {model._meta.db_table!r} of {model.__name__}")
    from ...core.rules import _fields

    template = next((t for t in rule.keys if set(_fields(t)) == set(lookup)), None)
    if template is None:
        raise ConfigError("RULES", f"no key template of table {model._meta.db_table!r} is keyed by exactly "
                          f"{sorted(lookup)} (templates: {list(rule.keys)})")
    names = {str(f.column): f.attname for f in model._meta.concrete_fields}
    by_attn = {names[c]: v for c, v in lookup.items()}

    def load() -> Any:
        row = model._base_manager.using(router.db_for_read(model)).filter(**by_attn).values(*names.values()).first()
        if row is None:
            return NOT_FOUND
        out = {c: row[a] for c, a in names.items()}
        return Versioned(out, out.get(rule.version)) if rule.version else out

    v = get_cache().get(template.format(**lookup), load, ttl)
    if v is NOT_FOUND:
        raise Http404(f"no {model.__name__} with {lookup}")
    return model(**{names[c]: x for c, x in v.items()}) if instance else v
