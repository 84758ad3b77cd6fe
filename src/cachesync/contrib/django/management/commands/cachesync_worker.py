"""``python manage.py cachesync_worker ...``: ``cachesync worker`` with defaults from the settings."""

from __future__ import annotations

from ._base import CliCommand


class Command(CliCommand):
    help = "cachesync worker, with --db-url/--redis-url/--namespace (and more) from settings.CACHESYNC and DATABASES"
    cli = ["worker"]
    defaults = ("--redis-url", "--namespace", "--rules")
