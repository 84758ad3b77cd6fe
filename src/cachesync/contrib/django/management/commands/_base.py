"""Management commands that delegate to the ``cachesync`` CLI with defaults from the Django settings."""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.core.management.base import BaseCommand

from cachesync.rules import Rules
from ...core import settings_value


def database_url(alias: str = "default") -> str:
    """A cachesync database URL for ``settings.DATABASES[alias]`` (PostgreSQL, MySQL/MariaDB or SQLite)."""
    db = settings.DATABASES[alias]
    engine = db["ENGINE"]
    if engine.endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    scheme = "postgresql" if "postgres" in engine else "mysql" if "mysql" in engine else None
    if scheme is None:
        raise SystemExit(f"cachesync: database {alias!r} uses {engine}; supported: postgresql, mysql, sqlite3")
    user = quote(str(db.get("USER") or ""), safe="")
    pw = quote(str(db.get("PASSWORD") or ""), safe="")
    auth = f"{user}:{pw}@" if pw else f"{user}@" if user else ""
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"{scheme}://{auth}{db.get('HOST') or '127.0.0.1'}{port}/{db['NAME']}"


def _rules_file() -> str | None:
    """``CACHESYNC["RULES"]`` as a file for the CLI: the path as given, or a dict written to a temporary .py file."""
    spec = settings_value("RULES")
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, Rules):
        spec = {t: {"keys": list(r.keys), "version": r.version} for t, r in spec.tables.items()}
    fd, path = tempfile.mkstemp(prefix="cachesync-rules-", suffix=".py")
    with os.fdopen(fd, "w") as f:
        f.write(f"RULES = {dict(spec)!r}\n")
    atexit.register(os.unlink, path)
    return path


class CliCommand(BaseCommand):
    """``python manage.py cachesync_<cmd> [cachesync <cmd> flags]``; ``--db-url``, ``--redis-url``,
    ``--namespace``, ``--table`` (relay) and ``--rules`` (``CACHESYNC["RULES"]``; a dict is written to a temporary file) default to the
    settings; ``--database ALIAS`` (default ``default``) picks the database."""

    cli: list[str] = []
    defaults: tuple[str, ...] = ("--db-url", "--redis-url", "--namespace")
    help = "Run the cachesync CLI command with defaults from settings.CACHESYNC and DATABASES."

    def argv(self, rest: list[str]) -> list[str]:
        alias = "default"
        if "--database" in rest:
            i = rest.index("--database")
            alias = rest[i + 1]
            rest = rest[:i] + rest[i + 2:]
        given = {a.split("=", 1)[0] for a in rest if a.startswith("--")}
        values: dict[str, Callable[[], Any]] = {"--db-url": lambda: database_url(alias), "--redis-url": lambda: settings_value("REDIS_URL"),
                  "--namespace": lambda: settings_value("NAMESPACE"), "--table": lambda: settings_value("OUTBOX_TABLE"),
                  "--rules": _rules_file}
        out = list(self.cli)
        for flag in self.defaults:
            if flag not in given:
                v = values[flag]()
                if isinstance(v, str):
                    out += [flag, v]
        return out + rest

    def run_from_argv(self, argv: list[str]) -> None:
        from cachesync.cli import main

        if "-h" in argv[2:] or "--help" in argv[2:]:
            sys.exit(main([*self.cli, "--help"]))
        sys.exit(main(self.argv(argv[2:])))

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("args", nargs="*")

    def handle(self, *args: Any, **options: Any) -> None:
        from cachesync.cli import main

        rc = main(self.argv(list(args)))
        if rc:
            raise SystemExit(rc)
