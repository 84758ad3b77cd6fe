"""The consistency auditor: compare what the cache holds with what the database holds, by row version.

::

    from cachesync.audit import Auditor
    report = Auditor(cache, "postgresql://...", Rules.load("rules.toml")).run(pattern="user:*")
    report.stale          # [Finding(key, kind, cached_version, db_version, table)], still wrong after the grace

    cachesync audit --redis-url URL --namespace NS --db-url URL --rules rules.toml [--pattern 'user:*']
                    [--grace 2] [--limit N] [--repair] [--json]

How it judges. Each cached entry of the namespace (``SCAN``, read-only: a pipelined ``GET`` of each entry,
decoded for the value's presence, version and negative flag; no lease is taken, no TTL touched) whose key matches a key template of a rule **with a
version column** (``[tables.users] keys = ["user:{id}"], version = "version"``) is looked up in the database by
the template's columns (``SELECT version FROM users WHERE id = ?``). Versions are compared, not values: the cache
stores the version the loader returned (``Versioned(value, version)``), and comparing values would need the
application's own row → value code. Verdicts:

* ``consistent``: the cached version equals the row's;
* ``stale``: the row's version is newer than the cached one (a lost or late invalidation, a stale write-back);
* ``ahead``: the cached version is newer than the row's (a write-through cache update whose transaction rolled
  back, or the row was rewritten with a lower version);
* ``deleted``: a value is cached for a row that does not exist;
* ``negative_but_exists``: a "not found" entry (negative caching) for a row that exists;
* entries without a value (tombstones, leases) and values marked stale by an invalidation (``serve_stale``) are
  fine; values cached without a version are counted as
  ``unversioned`` (not judged); keys that match no versioned template as ``unmatched``; list/aggregate templates
  (no fields) cannot be audited by version and are skipped.

A finding can be an invalidation in flight (the row committed, the relay or CDC has not applied it yet), so every
finding is checked again after ``grace`` seconds (default 2) — cache entry and row re-read — and is reported only if
it is still wrong with the **same** cached version (``stale`` in the report); the others are counted as
``transient``. ``repair=True`` (``--repair``) invalidates the persistent findings with the row's version (the
keys' version floor is raised, so an old value cannot come back); an ``ahead`` entry is deleted first, so that its
newer, phantom version does not stay the floor and refuse every fill of the row until the tombstone expires.

The command exits 0 when nothing persistent was found, 1 when something was (for monitoring), 2 on bad usage.
Templates must be reversible: fields separated by literal text (``"user:{id}"``, ``"o:{a}:{b}"``; not
``"{a}{b}"``, refused with the template named). Works on SQLite, PostgreSQL and MariaDB/MySQL.
"""

from __future__ import annotations

import fnmatch
import re
import string
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict, Unpack, cast

from . import core as P
from .db import connect, dialect_of
from . import _validate
from .errors import AuditConfigError
from .errors import AuditError as AuditError  # defined in errors.py, re-exported here
from .errors import UsageError
from .core.rules import Rules, TableRule
from ._sync.cache import Cache

KINDS = ("stale", "ahead", "deleted", "negative_but_exists", "value_differs")
"""The kinds of finding (see the module docstring)."""

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Finding:
    """One cache entry that disagrees with its row: ``kind`` (one of :data:`KINDS`), the versions (None when
    absent) and the ``table`` of the row."""

    key: str
    kind: str
    cached_version: int | float | None
    db_version: Any
    table: str


@dataclass
class AuditReport:
    """What :meth:`Auditor.run` found. ``stale``: persistent findings (still wrong after the grace, same cached
    version); ``transient``: findings that resolved themselves during the grace; ``repaired``: keys invalidated
    (``repair=True``)."""

    scanned: int = 0
    audited: int = 0
    consistent: int = 0
    unversioned: int = 0
    unmatched: int = 0
    empty: int = 0
    transient: int = 0
    stale: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.stale

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


@dataclass(frozen=True)
class _Template:
    rule: TableRule
    template: str
    fields: tuple[str, ...]
    regex: re.Pattern[str]


def _compile(rule: TableRule, template: str) -> _Template | None:
    parts = list(string.Formatter().parse(template))
    fields = tuple(dict.fromkeys(f for _, f, _, _ in parts if f is not None))
    if not fields:
        return None  # a list/aggregate key: no row to compare with
    pattern, prev_field, seen = "", False, set()
    for literal, f, spec, conv in parts:
        if literal:
            pattern += re.escape(literal)
            prev_field = False
        if f is not None:
            if spec or conv:
                raise AuditError(f"table {rule.table!r}: template {template!r} has a format spec or conversion; the "
                                 "auditor reverses plain fields only")
            if prev_field:
                raise AuditError(f"table {rule.table!r}: template {template!r} has two fields with no text between "
                                 "them; the auditor cannot tell where one ends")
            if not f.isidentifier():
                raise AuditError(f"table {rule.table!r}: template {template!r} has field {{{f}}}; use column names")
            pattern += f"(?P={f})" if f in seen else f"(?P<{f}>.+?)"
            seen.add(f)
            prev_field = True
    return _Template(rule, template, fields, re.compile(pattern + r"\Z", re.S))


@dataclass(frozen=True)
class AuditOptions:
    """Options of :class:`Auditor` (``Auditor(cache, db_url, rules, options=AuditOptions(...))`` or the same names
    as keywords). Frozen and validated when built; a bad value raises
    :class:`~cachesync.errors.AuditConfigError` (a ``ConfigError`` and an ``AuditError``) naming it."""

    grace: float = 2.0
    """Seconds a finding may be an invalidation in flight before it counts (it is checked again after that)."""
    batch: int = 500
    """Keys per Redis pipeline (the database is asked one indexed ``SELECT`` per key)."""

    def __post_init__(self) -> None:
        _validate.seconds("grace", self.grace, zero=True, error=AuditConfigError)
        _validate.positive("batch", self.batch, integer=True, error=AuditConfigError)


class AuditOptionsKwargs(TypedDict, total=False):
    """The option keywords of ``Auditor(...)``: one per :class:`AuditOptions` field."""

    grace: float
    batch: int


class Auditor:
    """``Auditor(cache, db_url, rules, *, loader=None, options=None, on_recheck=None, **options)``.

    ``cache``: the :class:`cachesync.Cache` whose namespace is audited. ``db_url``: the database. ``rules``: the
    rules (only tables with a ``version`` column are audited). ``loader``: key -> value, compared instead of the
    rules' versions. ``options``: an :class:`AuditOptions` (``grace`` default 2.0 s, ``batch`` default 500), or
    the same names as keywords -- not both. ``on_recheck()``: called once before the findings are checked again
    (tests force interleavings with it).
    """

    def __init__(self, cache: Cache, db_url: str | None = None, rules: Rules | None = None, *,
                 loader: Callable[[str], Any] | None = None, options: AuditOptions | None = None,
                 on_recheck: Callable[[], None] | None = None, **kwargs: Unpack[AuditOptionsKwargs]) -> None:
        self.options = o = _validate.options_from(AuditOptions, options, dict(kwargs), error=AuditConfigError)
        if rules is None and loader is None:
            raise AuditError("the auditor needs rules (with version columns) and a database, or a loader, or both")
        if rules is not None and not isinstance(rules, Rules):
            raise AuditError(f"rules must be a cachesync.rules.Rules, got {type(rules).__name__}")
        if rules is not None and not db_url:
            raise AuditError("rules need the database they describe: give db_url")
        if loader is not None and not callable(loader):
            raise AuditError(f"loader must be a callable key -> value, got {type(loader).__name__}")
        self.cache, self.db_url, self.rules, self.loader = cache, db_url, rules or Rules({}), loader
        self.dialect = dialect_of(db_url) if db_url else None
        self.grace, self.batch, self.on_recheck = float(o.grace), o.batch, on_recheck
        self.templates: list[_Template] = []
        for rule in self.rules.tables.values():
            if rule.version is None:
                continue
            for name in (rule.table, rule.version):
                if not _IDENT.fullmatch(name):
                    raise AuditError(f"table {rule.table!r}: {name!r} is not a plain SQL identifier")
            for t in rule.keys:
                c = _compile(rule, t)
                if c is not None:
                    self.templates.append(c)
        # the most specific template first: "u:{id}" also matches "u:1:p" (id "1:p"), whose own template is
        # "u:{id}:p"; judged against the wrong table, a stale entry can pass (MariaDB casts '1:p' to 1)
        self.templates.sort(key=lambda t: -len(re.sub(r"\{[^{}]*\}", "", t.template)))
        if rules is not None and not self.templates:
            raise AuditError("no rule has a version column and a key template with fields: nothing to audit "
                             "(add version = \"<column>\" to the tables' rules)")

    # ------------------------------------------------------------------ pieces

    def _match(self, key: str) -> tuple[_Template, dict[str, str]] | None:
        for t in self.templates:
            m = t.regex.match(key)
            if m is not None:
                return t, m.groupdict()
        return None

    def _keys(self, pattern: str) -> Iterator[str]:
        for key in self.cache.keys_with_prefix(_literal_prefix(pattern)):
            if pattern == "*" or fnmatch.fnmatchcase(key, pattern):
                yield key

    def _entries(self, keys: Sequence[str]) -> list[tuple[bool, int | float | None, bool, bytes | None]]:
        """Per key: (has a value, its version, negative entry, the stored payload)."""
        return self.cache.run(P.peek_values_flow(self.cache.ctx, keys))

    def _by_loader(self, key: str, entry: tuple[bool, int | float | None, bool, bytes | None]
                   ) -> tuple[str | None, Any]:
        """(kind or None, the loader's version) of an entry judged by the application's loader."""
        assert self.loader is not None
        has_value, ver, negative, payload = entry
        try:
            got = self.loader(key)
        except Exception as e:
            raise AuditError(f"the loader failed for key {key!r}: {type(e).__name__}: {e}") from e
        lver = got.version if isinstance(got, P.Versioned) else None
        value = P.Context.unwrap(got)
        if negative:
            return ("negative_but_exists" if value is not P.NOT_FOUND else None), lver
        if not has_value:
            return None, lver
        if value is P.NOT_FOUND:
            return "deleted", lver
        if ver is not None and lver is not None:
            d = P.decode_version(P.encode_version(lver))
            if d is not None and d != ver:
                return ("stale" if d > ver else "ahead"), lver
        ctx = self.cache.ctx
        assert payload is not None
        cached = ctx.decode(key, payload, False)
        fresh = ctx.ser.loads(ctx.encode(key, value)[0])  # the same round trip as a cached value (tuples -> lists)
        return (None if cached == fresh else "value_differs"), lver

    def _db_versions(self, conn: Any, items: list[tuple[_Template, dict[str, str]]]) -> list[tuple[bool, Any]]:
        """Per item: (row exists, its version)."""
        assert self.dialect is not None and conn is not None  # templates come from rules, which need a database
        ph = self.dialect.placeholder
        out: list[tuple[bool, Any]] = []
        # the driver's DB-API DataError (psycopg, pymysql, sqlite3): the column's type refuses the key's text
        data_error = getattr(sys.modules.get(type(conn).__module__.split(".")[0]), "DataError", ())
        cur = conn.cursor()
        try:
            for t, vals in items:
                where = " AND ".join(f"{f} = {ph}" for f in t.fields)
                try:
                    cur.execute(f"SELECT {t.rule.version} FROM {t.rule.table} WHERE {where}",
                                [vals[f] for f in t.fields])
                except data_error:  # 'abc' for an INTEGER id (PostgreSQL): no such row, as SQLite and MariaDB say
                    conn.rollback()
                    out.append((False, None))
                    continue
                row = cur.fetchone()
                out.append((False, None) if row is None else (True, row[0]))
            conn.commit()
        finally:
            cur.close()
        return out

    @staticmethod
    def _judge(entry: tuple[Any, ...], db: tuple[bool, Any]) -> str | None:
        has_value, ver, negative = entry[:3]
        exists, dbver = db
        if negative:
            return "negative_but_exists" if exists else None
        if not has_value:
            return None
        if not exists:
            return "deleted"
        if ver is None or dbver is None:
            return None
        d = P.decode_version(P.encode_version(dbver))
        if d is None or d == ver:
            return None
        return "stale" if d > ver else "ahead"

    def _check(self, conn: Any, keys: list[str], report: AuditReport | None) -> list[Finding]:
        matched: list[tuple[str, _Template, dict[str, str]]] = []
        rest: list[str] = []  # for the loader: no versioned template matches
        for k in keys:
            m = self._match(k)
            if m is None:
                rest.append(k)
                continue
            matched.append((k, m[0], m[1]))
        found = []
        if matched:
            entries = self._entries([k for k, _, _ in matched])
            dbs = self._db_versions(conn, [(t, v) for _, t, v in matched])
            for (k, t, _), e, db in zip(matched, entries, dbs, strict=True):
                kind = self._judge(e[:3], db)
                if kind is None and e[0] and e[1] is None and self.loader is not None:
                    rest.append(k)  # a value without a version: the loader can still judge it
                    continue
                self._count(report, e, kind)
                if kind is not None:
                    found.append(Finding(k, kind, e[1], db[1], t.rule.table))
        if rest and self.loader is None:
            if report is not None:
                report.unmatched += len(rest)
            return found
        if rest:
            for k, e in zip(rest, self._entries(rest), strict=True):
                kind, lver = self._by_loader(k, e)
                self._count(report, e, kind, by_value=True)
                if kind is not None:
                    found.append(Finding(k, kind, e[1], lver, "(loader)"))
        return found

    @staticmethod
    def _count(report: AuditReport | None, e: tuple[Any, ...], kind: str | None, by_value: bool = False) -> None:
        if report is None:
            return
        report.audited += 1
        if not e[0] and not e[2]:
            report.empty += 1
        elif kind is None and e[0] and e[1] is None and not by_value:
            report.unversioned += 1
        elif kind is None:
            report.consistent += 1

    # ------------------------------------------------------------------ run

    def run(self, pattern: str = "*", limit: int | None = None, repair: bool = False) -> AuditReport:
        """Audit the entries whose keys match the glob ``pattern`` (default every key), at most ``limit`` of them
        (default all). ``repair`` (default False): invalidate the persistent findings with the row's version."""
        if limit is not None:
            _validate.positive("limit", limit, integer=True, error=AuditConfigError)
        t0 = time.monotonic()
        report = AuditReport()
        conn = connect(self.db_url) if self.db_url else None
        try:
            suspects: list[Finding] = []
            chunk: list[str] = []
            for key in self._keys(pattern):
                if limit is not None and report.scanned >= limit:
                    break
                report.scanned += 1
                chunk.append(key)
                if len(chunk) >= self.batch:
                    suspects += self._check(conn, chunk, report)
                    chunk = []
            if chunk:
                suspects += self._check(conn, chunk, report)
            if suspects:
                if self.on_recheck is not None:
                    self.on_recheck()
                if self.grace:
                    time.sleep(self.grace)
                before = {f.key: f for f in suspects}
                again = {f.key: f for f in self._check(conn, list(before), None)}
                for k, f in before.items():
                    g = again.get(k)
                    if g is not None and g.kind == f.kind and g.cached_version == f.cached_version:
                        report.stale.append(g)
                    else:
                        report.transient += 1
            if repair:
                # An "ahead" entry's phantom version would stay the keys' version floor (invalidate.lua keeps the
                # highest version it has seen), refusing every fill of the row's real, lower version until the
                # tombstone expired. Its entry is deleted first (which also voids any lease on it), so that the
                # invalidation below leaves the row's own version as the floor.
                for f in report.stale:
                    if f.kind == "ahead":
                        self.cache.redis.delete(self.cache.ctx.ekey(f.key))
                self.cache.invalidate_many([([f.key], f.db_version if f.kind in ("stale", "ahead") else None)
                                            for f in report.stale])
                report.repaired.extend(f.key for f in report.stale)
        finally:
            if conn is not None:
                conn.close()
        report.seconds = time.monotonic() - t0
        return report


def _literal_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard (SCAN needs no more)."""
    i = min((j for j in (pattern.find(c) for c in "*?[\\") if j >= 0), default=len(pattern))
    return pattern[:i]


__all__ = ["KINDS", "AuditError", "AuditOptions", "AuditOptionsKwargs", "AuditReport", "Auditor", "Finding"]


# ---------------------------------------------------------------------- command line


def _cmd(args: Any) -> int:
    import json
    import os

    from ._driver import DEFAULT_REDIS_URL, redact_url

    db_url = args.db_url or os.environ.get("CACHESYNC_DB_URL")
    if not args.rules and not args.loader:
        raise AuditError("--rules is required (the rules file with the tables' key templates and version columns), "
                         "or --loader module:function")
    if args.rules and not db_url:
        raise AuditError("--db-url is required with --rules (or set CACHESYNC_DB_URL)")
    loader = _import_loader(args.loader) if args.loader else None
    redis_url = args.redis_url or os.environ.get("CACHESYNC_REDIS_URL") or DEFAULT_REDIS_URL
    auditor = None
    cache = Cache(redis_url, namespace=args.namespace)
    try:
        auditor = Auditor(cache, db_url if args.rules else None, Rules.load(args.rules) if args.rules else None,
                          loader=loader, options=AuditOptions(grace=args.grace))
        report = auditor.run(args.pattern, args.limit, repair=args.repair)
    except UsageError:
        raise
    except Exception as e:  # a server that cannot be reached: name it, without its password
        where = redact_url(db_url) if db_url and auditor is not None and "redis" not in type(e).__module__ else \
            redact_url(redis_url)
        raise AuditError(f"audit failed talking to {where}: {type(e).__name__}: {e}") from None
    finally:
        cache.close()
    if args.metrics_file:
        write_metrics(report, args.namespace, args.metrics_file)
    if args.json:
        print(json.dumps(report.to_dict(), default=str))
    else:
        against = " and ".join(([redact_url(db_url)] if db_url and args.rules else [])
                               + ([f"loader {args.loader}"] if args.loader else []))
        print(f"audit of namespace {args.namespace!r} in {redact_url(redis_url)} against {against}: "
              f"{report.scanned} entries scanned, {report.audited} audited in {report.seconds:.2f} s")
        print(f"  consistent {report.consistent}, empty (tombstones, leases) {report.empty}, unversioned "
              f"{report.unversioned}, unmatched {report.unmatched}, transient {report.transient}")
        print(f"  persistent findings {len(report.stale)}" + (f", repaired {len(report.repaired)}"
                                                               if args.repair else ""))
        for f in report.stale[:100]:
            print(f"    {f.kind:20s} {f.key}  cached v{f.cached_version}  row v{f.db_version}  ({f.table})")
        if len(report.stale) > 100:
            print(f"    ... {len(report.stale) - 100} more (--json lists them all)")
    return 0 if report.ok else 1


def write_metrics(report: AuditReport, namespace: str, path: str) -> None:
    """Write the report as Prometheus text to ``path`` (atomically; for node_exporter's textfile collector):
    ``cachesync_audit_findings{namespace,kind}`` (persistent findings of each kind of :data:`KINDS`),
    ``cachesync_audit_audited_entries``, ``cachesync_audit_transient_findings`` and
    ``cachesync_audit_last_run_timestamp_seconds``."""
    import os
    import time

    from .metrics import PrometheusMetrics

    m = PrometheusMetrics()
    by_kind = dict.fromkeys(KINDS, 0)
    for f in report.stale:
        by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
    g = m.gauge("cachesync_audit_findings", "Persistent audit findings by kind (last run)", ("namespace", "kind"))
    for kind, n in by_kind.items():
        g.set(n, (namespace, kind))
    m.gauge("cachesync_audit_audited_entries", "Entries audited (last run)", ("namespace",)).set(
        report.audited, (namespace,))
    m.gauge("cachesync_audit_transient_findings", "Findings that resolved during the grace (last run)",
            ("namespace",)).set(report.transient, (namespace,))
    m.gauge("cachesync_audit_last_run_timestamp_seconds", "When the last audit finished (Unix time)",
            ("namespace",)).set(time.time(), (namespace,))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(m.render())
        os.replace(tmp, path)
    except OSError as e:
        raise AuditError(f"--metrics-file {path!r} cannot be written: {e}") from None


def _import_loader(spec: str) -> Callable[[str], Any]:
    """``module:function`` -> the function (the operator's own code, imported like a WSGI app)."""
    import importlib

    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise AuditError(f"--loader {spec!r} must look like package.module:function")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise AuditError(f"--loader {spec!r} cannot be imported: {type(e).__name__}: {e}") from None
    if not callable(obj):
        raise AuditError(f"--loader {spec!r} is not callable")
    return cast(Callable[[str], Any], obj)


def register(subparsers: Any) -> None:
    """Add ``cachesync audit`` to the ``cachesync`` command line."""
    import argparse

    p = subparsers.add_parser(
        "audit", help="compare cached entries with their rows by version",
        description="Compare cached entries with their rows by version; exit 1 on persistent findings.",
        epilog="""examples:
  cachesync audit --redis-url redis://cache:6379/0 --namespace shop --db-url postgresql://app@db/shop --rules rules.toml
  cachesync audit --namespace shop --db-url sqlite:///app.db --rules rules.toml --pattern 'user:*' --json
  cachesync audit --namespace shop --loader myapp.cache:load --repair

The rules-file format (--rules) is described in docs/rules.md.""",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-url", default=None,
                   help="Redis holding the cache (default: $CACHESYNC_REDIS_URL or redis://127.0.0.1:6379/0)")
    p.add_argument("--namespace", default="default", help="cache namespace (default: default)")
    p.add_argument("--db-url", default=None, help="database URL (default: $CACHESYNC_DB_URL)")
    p.add_argument("--rules", default=None, help="rules file (.toml or .py): tables, key templates, version columns; format: docs/rules.md")
    p.add_argument("--loader", default=None, metavar="MODULE:FUNCTION",
                   help="the application's loader key -> value (or Versioned, NOT_FOUND), to judge entries no "
                        "versioned rule covers by value (default: none)")
    p.add_argument("--pattern", default="*", help="only keys matching this glob (default: *)")
    p.add_argument("--limit", type=int, default=None, help="audit at most this many entries (default: all)")
    p.add_argument("--grace", type=float, default=2.0,
                   help="seconds a finding may be an invalidation in flight before it counts (default: 2)")
    p.add_argument("--repair", action="store_true",
                   help="invalidate the persistent findings with the row's version (default: report only)")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    p.add_argument("--metrics-file", default=None,
                   help="also write the findings by kind as Prometheus text to this file, for node_exporter's "
                        "textfile collector (default: none; needs the prometheus extra)")
    p.set_defaults(func=_cmd)
