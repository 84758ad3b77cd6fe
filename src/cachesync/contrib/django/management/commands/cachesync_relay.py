"""``python manage.py cachesync_relay ...``: ``cachesync relay`` with defaults from the settings."""

from __future__ import annotations

from ._base import CliCommand


class Command(CliCommand):
    help = "cachesync relay, with --db-url/--redis-url/--namespace (and more) from settings.CACHESYNC and DATABASES"
    cli = ["relay"]
    defaults = ("--db-url", "--redis-url", "--namespace", "--table")
