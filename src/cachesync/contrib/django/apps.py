"""The Django app: connects the model signals at start-up."""

from __future__ import annotations

from django.apps import AppConfig


class CachesyncConfig(AppConfig):
    name = "cachesync.contrib.django"
    label = "cachesync"
    verbose_name = "cachesync"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        from .core import connect_signals, settings_value

        settings_value("RULES")  # an unknown CACHESYNC key fails at start-up, naming it
        connect_signals()
