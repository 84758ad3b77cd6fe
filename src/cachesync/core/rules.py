"""Rules that derive cache keys from row changes, shared by the outbox, the workers and CDC.

A rule maps a table to key templates over its columns::

    [tables.users]
    keys = ["user:{id}", "user_by_email:{email}", "users:count"]
    version = "version"            # optional: the column holding the row version

For a change with an old row image and/or a new row image, every template is
formatted with each image: when a key column changes (``email``), both the old
and the new key are invalidated. A template with no fields (``users:count``)
is a list/aggregate key invalidated on every change of the table.

Rules load from a TOML file, from a Python file defining ``RULES`` (a dict of
table -> list of templates or :class:`TableRule`), or from a dict.
"""

from __future__ import annotations

import functools
import string
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadDataError
from ..errors import RuleError as RuleError  # defined in errors.py, re-exported here
from .values import checked_keys, checked_version


_MAX_EXACT = 2**53  # values.MAX_EXACT_VERSION: integer versions beyond it are refused by checked_version


@functools.lru_cache(maxsize=4096)
def _fields(template: str) -> tuple[str, ...]:
    """The field names of a key template, parsed once per template (every row change of a table formats the
    same few templates)."""
    try:
        return tuple(f for _, f, _, _ in string.Formatter().parse(template) if f is not None)
    except ValueError as e:
        raise RuleError(f"bad key template {template!r}: {e}") from None


@functools.lru_cache(maxsize=4096)
def _fieldset(template: str) -> frozenset[str]:
    return frozenset(_fields(template))


_FORMAT_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError)
"""What formatting a key template with a row may raise (a bad value for its format spec): a :class:`RuleError`."""


@dataclass(frozen=True)
class TableRule:
    """Key templates of one table (``keys``) and, optionally, the row's version column."""

    table: str
    keys: tuple[str, ...]
    version: str | None = None
    columns: frozenset[str] = field(default_factory=frozenset)

    @staticmethod
    def build(table: str, keys: Iterable[str], version: str | None = None) -> TableRule:
        if not isinstance(table, str) or not table:
            raise RuleError(f"table name must be a non-empty string, got {table!r}")
        if isinstance(keys, (str, bytes)):
            raise RuleError(f"table {table!r}: keys must be a list of key templates, not the string {keys!r} "
                            f"(write keys = [{keys!r}])")
        try:
            ks = tuple(keys)
        except TypeError:
            raise RuleError(f"table {table!r}: keys must be a list of key templates, got {keys!r}") from None
        if not ks:
            raise RuleError(f"table {table!r}: no key templates")
        cols: set[str] = set()
        for t in ks:
            if not isinstance(t, str) or not t:
                raise RuleError(f"table {table!r}: key template must be a non-empty string, got {t!r}")
            for f in _fields(t):
                if not f.isidentifier():
                    raise RuleError(f"table {table!r}: template {t!r} has field {{{f}}}; use plain column names")
                cols.add(f)
        if version is not None and not isinstance(version, str):
            raise RuleError(f"table {table!r}: version must be a column name, got {version!r}")
        return TableRule(table, ks, version, frozenset(cols))

    @functools.cached_property
    def _all_fields(self) -> frozenset[str]:
        """Every field of every template (computed once per rule)."""
        return frozenset(f for t in self.keys for f in _fields(t))

    def keys_for_row(self, row: Mapping[str, Any]) -> list[str]:
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise RuleError(f"table {self.table!r}: row has no column(s) {sorted(missing)} needed by key templates "
                            f"{list(self.keys)} (row columns: {sorted(row)})")
        return [self._format(t, row) for t in self.keys]

    def _format(self, template: str, row: Mapping[str, Any]) -> str:
        """``template`` formatted with ``row``; a value its format spec cannot take raises :class:`RuleError`."""
        try:
            return template.format_map({f: row[f] for f in _fields(template)})
        except _FORMAT_ERRORS as e:
            raise RuleError(f"table {self.table!r}: key template {template!r} cannot format the row "
                            f"({type(e).__name__}: {e})") from None

    def keys_for_images(self, old: Mapping[str, Any] | None,
                        new: Mapping[str, Any] | None) -> tuple[list[str], list[str]]:
        """Keys formatted from each image that has a template's columns, and the templates the OLD image
        could not form (it lacks a column: e.g. PostgreSQL without ``REPLICA IDENTITY FULL``). Pass ``old={}``
        when an old image is expected but was not sent. For CDC."""
        keys: list[str] = []
        missing: list[str] = []
        for t in self.keys:
            fs = _fields(t)
            for row in (old, new):
                if row is not None and all(f in row for f in fs):
                    keys.append(self._format(t, row))
            if old is not None and not all(f in old for f in fs):
                missing.append(t)
        return list(dict.fromkeys(keys)), missing

    def resolve(self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None,
                max_key_bytes: int) -> RowKeys:
        """What one change of this table means for the cache: THE place row changes become keys (the outbox's
        ``record_change``, the workers and CDC all call it). Each template is formatted with each image that has
        its columns, exactly as ``str.format`` would (a NULL column formats as ``None``, as in the application's
        own f-strings and in the capture triggers' SQL); a template that neither image can form, a value the template cannot format, a key the cache refuses and a version
        column that is not a number are ``problems`` (named; the rest still applies). ``missing_old``: the
        templates the old image lacks columns for (pass ``old={}`` when an old image is expected but was not
        sent, e.g. PostgreSQL without ``REPLICA IDENTITY FULL``)."""
        keys: list[str] = []
        problems: list[str] = []
        missing: list[str] = []
        if old is None and new is not None and new.keys() >= self._all_fields:
            # an insert with every column the templates use (what a backlog is mostly made of): each template
            # formed from the new image, nothing missing -- what the general loop below does, without its checks
            for t in self.keys:
                try:
                    k = t.format_map(new)  # the whole row: what _format's subset gives when every field is there
                except _FORMAT_ERRORS:
                    try:
                        k = self._format(t, new)  # the same error, named as the general loop names it
                    except RuleError as e:
                        problems.append(str(e))
                        continue
                if k and len(k) <= max_key_bytes and k.isascii():  # what checked_keys accepts without counting
                    keys.append(k)
                    continue
                try:
                    keys.append(checked_keys([k], max_key_bytes)[0])
                except BadDataError as e:
                    problems.append(str(e))
        else:
            if old is None and new is None:
                problems.append(f"table {self.table!r}: a change needs an old or a new row image")
            for t in self.keys:
                fs = _fieldset(t)
                formed = False
                old_has = old is not None and old.keys() >= fs
                for row, has in ((old, old_has), (new, new is not None and new.keys() >= fs)):
                    if not has:
                        continue
                    formed = True
                    try:
                        k = self._format(t, row)  # type: ignore[arg-type]  # has: the row is not None
                        keys.append(checked_keys([k], max_key_bytes)[0])
                    except (RuleError, BadDataError) as e:
                        problems.append(str(e))
                if old is not None and not old_has:
                    missing.append(t)
                if not formed and t not in missing and (old is not None or new is not None):
                    have = sorted({c for r in (old, new) if r is not None for c in r})
                    problems.append(f"table {self.table!r}: the row images lack the column(s) "
                                    f"{sorted(set(fs) - set(have))} of key template {t!r}")
        version: str | None = None
        if self.version is not None:
            raw = (new or old or {}).get(self.version)
            if type(raw) is str and len(raw) <= 15 and raw.isascii() and raw.isdigit():
                version = raw  # what checked_version returns for plain digits (< 2**53), without its regex
            elif type(raw) is int and -_MAX_EXACT <= raw <= _MAX_EXACT:
                version = str(raw)  # likewise
            elif raw is not None:
                try:
                    version = checked_version(raw)
                except BadDataError as e:
                    problems.append(f"version column {self.version!r}: {e}; its keys are invalidated without a "
                                    "version")
        return RowKeys(list(dict.fromkeys(keys)), version, missing, problems)

    def prefixes(self) -> list[str]:
        """The literal part of each template before its first field (for "invalidate everything")."""
        out = []
        for t in self.keys:
            lit = ""
            for literal, f, _, _ in string.Formatter().parse(t):
                lit += literal
                if f is not None:
                    break
            out.append(lit)
        return out


@dataclass(frozen=True)
class RowKeys:
    """What one row change means for the cache (:meth:`TableRule.resolve`): the ``keys`` to invalidate, the
    checked ``version`` (a decimal string, or None), the templates the old image could not form
    (``missing_old``), and what could not be turned into keys (``problems``: bad data, each named)."""

    keys: list[str]
    version: str | None
    missing_old: list[str]
    problems: list[str]


class Rules:
    """A set of :class:`TableRule` by table name."""

    def __init__(self, tables: Mapping[str, Any]) -> None:
        self.tables: dict[str, TableRule] = {}
        for name, spec in tables.items():
            if isinstance(spec, TableRule):
                self.tables[name] = spec
            elif isinstance(spec, Mapping):
                unknown = set(spec) - {"keys", "version"}
                if unknown:
                    raise RuleError(f"table {name!r}: unknown rule field(s) {sorted(unknown)}; known: keys, version")
                if "keys" not in spec:
                    raise RuleError(f"table {name!r}: missing 'keys'")
                self.tables[name] = TableRule.build(name, spec["keys"], spec.get("version"))
            elif isinstance(spec, (list, tuple)):
                self.tables[name] = TableRule.build(name, spec)
            else:
                raise RuleError(f"table {name!r}: expected a list of key templates or a table, got {spec!r}")

    @classmethod
    def load(cls, path: str | Path) -> Rules:
        """Load rules from a ``.toml`` file (``[tables.NAME] keys=[...]``) or a ``.py`` file defining ``RULES``."""
        p = Path(path)
        if not p.exists():
            raise RuleError(f"rules file {str(p)!r} does not exist")
        if p.suffix == ".toml":
            try:
                data = tomllib.loads(p.read_text())
            except tomllib.TOMLDecodeError as e:
                raise RuleError(f"rules file {str(p)!r}: {e}") from None
            if "tables" not in data or not isinstance(data["tables"], dict):
                raise RuleError(f"rules file {str(p)!r}: needs a [tables.NAME] section per table")
            return cls(data["tables"])
        if p.suffix == ".py":
            ns: dict[str, Any] = {}
            exec(compile(p.read_text(), str(p), "exec"), ns)  # noqa: S102 - the operator's own rules file
            if "RULES" not in ns:
                raise RuleError(f"rules file {str(p)!r} must define RULES")
            r = ns["RULES"]
            return r if isinstance(r, Rules) else cls(r)
        raise RuleError(f"rules file {str(p)!r}: expected .toml or .py")

    def covers(self, table: str) -> bool:
        return table in self.tables

    def keys_for(self, table: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None,
                 max_key_bytes: int = 1 << 20) -> list[str]:
        """Every key a change of ``table`` affects: the templates formatted with the old and the new image
        (:meth:`TableRule.resolve`). A table without a rule affects no key; a NULL key column forms no key.
        A problem (a template neither image has the columns of, a value it cannot format, no image at all)
        raises :class:`RuleError` naming it."""
        rule = self.tables.get(table)
        if rule is None:
            return []
        rk = rule.resolve(old, new, max_key_bytes)
        if rk.problems:
            raise RuleError("; ".join(rk.problems))
        return rk.keys

    def version_for(self, table: str, row: Mapping[str, Any] | None) -> Any:
        rule = self.tables.get(table)
        if rule is None or rule.version is None or row is None:
            return None
        return row.get(rule.version)
