"""``python manage.py cachesync_audit ...``: ``cachesync audit`` with defaults from the settings."""

from __future__ import annotations

from ._base import CliCommand


class Command(CliCommand):
    help = "cachesync audit, with --db-url/--redis-url/--namespace (and more) from settings.CACHESYNC and DATABASES"
    cli = ["audit"]
    defaults = ("--db-url", "--redis-url", "--namespace", "--rules")
