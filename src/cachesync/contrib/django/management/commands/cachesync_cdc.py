"""``python manage.py cachesync_cdc ...``: ``cachesync cdc`` with defaults from the settings."""

from __future__ import annotations

from ._base import CliCommand


class Command(CliCommand):
    help = "cachesync cdc, with --db-url/--redis-url/--namespace (and more) from settings.CACHESYNC and DATABASES"
    cli = ["cdc"]
    defaults = ("--db-url", "--redis-url", "--namespace", "--rules")
